"""The reference study's real label CSVs are read the way convert needs them."""
from __future__ import annotations

import pandas as pd
import pytest

from dsca.store.convert import ConvertError, read_label_slides


@pytest.mark.parametrize("name", ["tcga_brca/tcga_brca_path_full.csv", "tcga_lgg/TCGA_LGG_path_full.csv",
                                  "nlst/nlst_path_full.csv"])
def test_reference_label_csvs(reference_dir, name):
    path = reference_dir / "labels" / name
    df = pd.read_csv(path, dtype=str)
    table = read_label_slides(path, set(df.pathology_id))
    mapping = table.patients
    assert not table.problems and not table.missing
    assert len(mapping) == df.pathology_id.nunique()
    # ids stay strings exactly as written (NLST's are numbers; no float-ification like "100012.0")
    sid, pid = df.pathology_id.iloc[0], df.patient_id.iloc[0]
    assert mapping[sid] == pid
    multi = df.groupby("patient_id").pathology_id.nunique()
    assert sum(1 for p in mapping.values() if p in set(multi[multi > 1].index)) == int(multi[multi > 1].sum())


def test_labels_without_required_columns(tmp_path):
    bad = tmp_path / "labels.csv"
    bad.write_text("slide,patient\nA,B\n")
    with pytest.raises(ConvertError, match="missing column.*pathology_id"):
        read_label_slides(bad, {"A"})


def _porpoise(synth_cohort, tmp_path, svs: bool = True):
    """The cohort's labels as a CLAM/PORPOISE table: case_id, slide_id (.svs), survival_months, censorship."""
    df = pd.read_csv(synth_cohort.labels_csv, dtype=str)
    table = pd.DataFrame({"case_id": df.patient_id, "slide_id": df.pathology_id + (".svs" if svs else ""),
                          "survival_months": df.t, "censorship": (1 - df.e.astype(int)).astype(str)})
    path = tmp_path / "porpoise.csv"
    table.to_csv(path, index=False)
    return path, df


def test_porpoise_table_needs_a_map_and_then_matches_svs_ids(synth_cohort, tmp_path):
    from dsca.store import FeatureStore
    from dsca.store.convert import convert_cohort

    path, df = _porpoise(synth_cohort, tmp_path)
    kw = dict(x5_features=synth_cohort.x5_features, x20_features=synth_cohort.x20_features,
              x5_coords=synth_cohort.x5_coords, x20_coords=synth_cohort.x20_coords, labels=path, progress=False)
    with pytest.raises(ConvertError, match="--labels-map slide=slide_id,patient=case_id,"
                                           "time=survival_months,censorship=censorship"):
        convert_cohort(out=tmp_path / "refused.zarr", **kw)
    assert not (tmp_path / "refused.zarr").exists()
    report = convert_cohort(out=tmp_path / "s.zarr", labels_map="slide=slide_id,patient=case_id,"
                            "time=survival_months,censorship=censorship", **kw)
    assert report.ok, list(report.lines())
    fs = FeatureStore.open(tmp_path / "s.zarr")
    assert fs.patient_slides() == {p: sorted(g.pathology_id) for p, g in df.groupby("patient_id")}


def test_label_ids_that_match_no_feature_file_get_a_hint(synth_cohort, tmp_path, caplog):
    from dsca.store.convert import convert_cohort

    df = pd.read_csv(synth_cohort.labels_csv, dtype=str)
    df["pathology_id"] = df.pathology_id.str.lower()  # another spelling of every id
    path = tmp_path / "labels.csv"
    df.to_csv(path, index=False)
    report = convert_cohort(x5_features=synth_cohort.x5_features, x20_features=synth_cohort.x20_features,
                            x5_coords=synth_cohort.x5_coords, x20_coords=synth_cohort.x20_coords, labels=path,
                            out=tmp_path / "s.zarr", progress=False)
    assert len(report.missing) == len(df)
    hints = [r.getMessage() for r in caplog.records if "match no feature file" in r.getMessage()]
    assert len(hints) == 1 and "check that the label slide ids are the feature files' names" in hints[0]


def test_labelled_slides_without_features_are_missing(synth_cohort, tmp_path, capsys, caplog):
    from dsca.cli.store_main import main
    from dsca.store import FeatureStore

    df = pd.read_csv(synth_cohort.labels_csv, dtype=str)
    unlabelled = df.pathology_id.iloc[0]
    extra = pd.DataFrame([{"pathology_id": "TCGA-XX-0001-01Z-00-DX1", "patient_id": "TCGA-XX-0001", "e": "1", "t": "9"},
                          {"pathology_id": "TCGA-XX-0002-01Z-00-DX1", "patient_id": "TCGA-XX-0002", "e": "0", "t": "90"}])
    labels = tmp_path / "labels.csv"
    pd.concat([df.iloc[1:], extra]).to_csv(labels, index=False)
    out = tmp_path / "s.zarr"
    args = ["-q", "convert", "--x5-features", str(synth_cohort.x5_features), "--x20-features",
            str(synth_cohort.x20_features), "--x5-coords", str(synth_cohort.x5_coords), "--x20-coords",
            str(synth_cohort.x20_coords), "--labels", str(labels), "--out", str(out)]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [
        f"{sid}: listed in the labels CSV but has no feature files (missing)" for sid in extra.pathology_id]
    assert "missing 2" in captured.out and "failed 0" in captured.out
    # every slide with features converted; patient ids from the CSV, none for the unlabelled one
    fs = FeatureStore.open(out)
    assert fs.slide_ids == sorted(synth_cohort.slide_ids)
    assert fs.slide_attrs(unlabelled)["patient_id"] is None
    sid = df.pathology_id.iloc[1]
    assert fs.slide_attrs(sid)["patient_id"] == df.patient_id.iloc[1]
    assert any("1 slides are not in the labels CSV" in r.getMessage() for r in caplog.records)
    # a resume still reports them: the CSV, not this run's work, defines what is missing
    assert main(args) == 1
    assert f"skipped {len(synth_cohort.slide_ids)} (already complete)" in capsys.readouterr().out


def test_na_patient_ids_and_duplicate_columns(synth_cohort, tmp_path):
    df = pd.read_csv(synth_cohort.labels_csv, dtype=str)
    na = df.pathology_id.iloc[:3].tolist()
    df.loc[df.pathology_id.isin(na), "patient_id"] = "NA"  # R's write.csv for a missing value
    path = tmp_path / "labels.csv"
    df.to_csv(path, index=False)
    table = read_label_slides(path, set(df.pathology_id))
    assert sorted(table.problems) == sorted(na) and "NA" not in table.patients.values()
    assert all("no patient_id in labels.csv" in reason for reason in table.problems.values())
    # a second patient_id column would be renamed by pandas and silently ignored
    path.write_text("pathology_id,patient_id,t,e,patient_id\nA,P1,5,1,P2\n")
    with pytest.raises(ConvertError, match="patient_id' appears more than once"):
        read_label_slides(path, {"A"})


def test_a_slide_listed_twice_is_refused_even_for_the_same_patient(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("pathology_id,patient_id,t,e\nA,P1,5,1\nB,P2,7,0\nA,P1,559,0\n")
    table = read_label_slides(path, {"A", "B"})
    assert table.problems == {"A": "duplicate slide id in labels.csv (lines 2 and 4): patients P1 and P1"}
    assert table.patients == {"B": "P2"}
