"""Patient-level labels and discrete time bins (dsca.labels)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dsca.labels import LabelError, load_labels, patient_slides, rebin


def _rows(times, events, slides_per_patient=None):
    rows = []
    for i, (t, e) in enumerate(zip(times, events)):
        for k in range((slides_per_patient or {}).get(i, 1)):
            rows.append({"pathology_id": f"S{i}-{k}", "patient_id": f"P{i}", "e": e, "t": t})
    return rows


def test_bins_at_quartiles_of_event_times(write_csv):
    # event times 10..80 (8 events); censored patients at 5 and 100 widen the outer edges
    times = [10, 20, 30, 40, 50, 60, 70, 80, 5, 100]
    events = [1] * 8 + [0, 0]
    df = load_labels(write_csv(_rows(times, events)))
    q = np.quantile([10, 20, 30, 40, 50, 60, 70, 80], [0.25, 0.5, 0.75])  # 27.5, 45, 62.5
    edges = df.attrs["bin_edges"]
    assert edges[0] == pytest.approx(5 - 1e-5) and edges[-1] == pytest.approx(100 + 1e-5)
    assert edges[1:4] == pytest.approx(q.tolist())
    expected = {10: 0, 20: 0, 30: 1, 40: 1, 50: 2, 60: 2, 70: 3, 80: 3, 5: 0, 100: 3}
    assert dict(zip(df["t"], df["y_t"])) == expected
    assert (df["y_c"] == 1 - df["e"]).all()


def test_left_closed_bins(write_csv):
    # a time exactly on an interior edge belongs to the bin on its right
    times = [1, 2, 3, 4, 5]
    df = load_labels(write_csv(_rows(times, [1] * 5)), bins=4)
    assert df.attrs["bin_edges"][1] == pytest.approx(2.0)
    assert df.loc["P1", "y_t"] == 1


def test_patient_level_rows_and_extra_columns(write_csv):
    rows = _rows([10, 20, 30, 40, 50], [1, 0, 1, 1, 1], slides_per_patient={1: 3})
    for r in rows:
        r["dir_name"] = "d-" + r["pathology_id"]
    df = load_labels(write_csv(rows))
    assert list(df.index) == ["P0", "P1", "P2", "P3", "P4"]
    assert df.loc["P1", "slide_ids"] == ["S1-0", "S1-1", "S1-2"]
    assert df.loc["P1", "dir_name"] == "d-S1-0"
    assert list(df.columns[:5]) == ["t", "e", "y_t", "y_c", "slide_ids"]


def test_conflicting_slide_rows_use_first_and_warn(write_csv, caplog):
    rows = _rows([10, 20, 30, 40, 50], [1, 1, 1, 1, 1], slides_per_patient={2: 2})
    rows[3]["t"] = 999  # second slide of P2 disagrees
    df = load_labels(write_csv(rows))
    assert df.loc["P2", "t"] == 30
    assert "different t/e" in caplog.text


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"t": -1}, "non-negative"),
        ({"t": float("nan")}, "non-negative"),
        ({"t": "abc"}, "non-negative"),
        ({"e": 2}, "e must be 0"),
    ],
)
def test_bad_values_name_the_slide(write_csv, change, message):
    rows = _rows([10, 20, 30, 40, 50], [1] * 5)
    rows[2].update(change)
    with pytest.raises(LabelError, match=message) as err:
        load_labels(write_csv(rows))
    assert "S2-0" in str(err.value) and "labels.csv" in str(err.value)


def test_missing_column_and_duplicate_slide(write_csv):
    rows = [{k: v for k, v in r.items() if k != "e"} for r in _rows([1, 2, 3, 4], [1] * 4)]
    with pytest.raises(LabelError, match="missing column.*e"):
        load_labels(write_csv(rows))
    rows = _rows([1, 2, 3, 4, 5], [1] * 5)
    rows[1]["pathology_id"] = rows[0]["pathology_id"]
    with pytest.raises(LabelError, match="listed more than once"):
        load_labels(write_csv(rows, "dup.csv"))
    with pytest.raises(LabelError, match="not found"):
        load_labels("/nonexistent/labels.csv")


def test_too_few_event_times(write_csv):
    with pytest.raises(LabelError, match="cannot make 4 time bins"):
        load_labels(write_csv(_rows([5, 5, 5, 9], [1, 1, 1, 0])))
    with pytest.raises(LabelError, match="no uncensored"):
        load_labels(write_csv(_rows([5, 6, 7, 9], [0, 0, 0, 0]), "cens.csv"))


def test_rebin_on_training_patients(write_csv):
    times = list(range(10, 130, 10))  # 12 patients, all events
    df = load_labels(write_csv(_rows(times, [1] * 12)))
    train = [f"P{i}" for i in range(6)]  # times 10..60
    fold = rebin(df, train)
    assert fold.attrs["bin_edges"][1:4] == pytest.approx(np.quantile(times[:6], [0.25, 0.5, 0.75]).tolist())
    assert fold.attrs["bin_edges"][-1] == pytest.approx(120 + 1e-5)  # still covers every patient
    assert fold.loc["P11", "y_t"] == 3 and df.attrs["bin_edges"] != fold.attrs["bin_edges"]
    assert (df["y_t"] == load_labels(write_csv(_rows(times, [1] * 12), "again.csv"))["y_t"]).all()


def test_patient_slides_against_store(write_csv, caplog):
    df = load_labels(write_csv(_rows([1, 2, 3, 4, 5], [1] * 5, slides_per_patient={0: 2})))
    got = patient_slides(df, ["P0", "P1"], {"S0-1", "S1-0"}, store_name="x.zarr")
    assert got == {"P0": ["S0-1"], "P1": ["S1-0"]}
    assert "not in the store" in caplog.text
    with pytest.raises(LabelError, match="x.zarr: patient 'P2'.*no slide in the store"):
        patient_slides(df, ["P1", "P2"], {"S1-0"}, store_name="x.zarr")
    with pytest.raises(LabelError, match="unknown patient 'Q9'"):
        patient_slides(df, ["Q9"], {"S1-0"})


@pytest.mark.parametrize(
    "csv", ["tcga_lgg/TCGA_LGG_path_full.csv", "tcga_brca/tcga_brca_path_full.csv", "nlst/nlst_path_full.csv"]
)
def test_reference_cohorts(reference_dir, csv):
    """Bins follow pandas.qcut / pandas.cut as the reference applies them, on its real CSVs."""
    path = reference_dir / "labels" / csv
    df = load_labels(path)
    raw = pd.read_csv(path, dtype={"patient_id": str, "pathology_id": str})
    first = raw.groupby("patient_id").head(1).set_index("patient_id")
    _, edges = pd.qcut(first.loc[first["e"] == 1, "t"], q=4, retbins=True)
    edges[0], edges[-1] = first["t"].min() - 1e-5, first["t"].max() + 1e-5
    expected = pd.cut(first["t"], bins=edges, right=False, labels=False)
    assert len(df) == raw["patient_id"].nunique()
    assert (df["y_t"] == expected.loc[df.index]).all()
    assert df["y_t"].value_counts().min() > 0
    assert sum(map(len, df["slide_ids"])) == len(raw)
    # The whole output is the plain pandas reading of the CSV (as before read_label_table):
    # patients in first-appearance order, first row's t/e, every slide in CSV order, extras.
    assert list(df.index) == list(dict.fromkeys(raw["patient_id"])) and df.index.name == "patient_id"
    assert df["t"].tolist() == first.loc[df.index, "t"].astype(float).tolist()
    assert df["e"].tolist() == first.loc[df.index, "e"].tolist() and (df["y_c"] == 1 - df["e"]).all()
    assert df["slide_ids"].to_dict() == raw.groupby("patient_id", sort=False)["pathology_id"].agg(list).to_dict()
    extras = [c for c in raw.columns if c not in ("pathology_id", "patient_id", "t", "e")]
    assert list(df.columns) == ["t", "e", "y_t", "y_c", "slide_ids", *extras]
    assert df[["t", "e", "y_t", "y_c"]].dtypes.astype(str).tolist() == ["float64", "int64", "int64", "int64"]
    for c in extras:
        assert df[c].tolist() == first.loc[df.index, c].tolist()
    assert df.attrs == {"bin_edges": pytest.approx(list(edges)), "source": str(path)}
