"""The reference study's real label CSVs are read the way convert needs them."""
from __future__ import annotations

import pandas as pd
import pytest

from dsca.store.convert import ConvertError, read_label_slides


@pytest.mark.parametrize("name", ["tcga_brca/tcga_brca_path_full.csv", "tcga_lgg/TCGA_LGG_path_full.csv",
                                  "nlst/nlst_path_full.csv"])
def test_reference_label_csvs(reference_dir, name):
    path = reference_dir / "labels" / name
    mapping, conflicts = read_label_slides(path)
    df = pd.read_csv(path, dtype=str)
    assert not conflicts
    assert len(mapping) == df.pathology_id.nunique()
    # ids stay strings exactly as written (NLST's are numbers; no float-ification like "100012.0")
    sid, pid = df.pathology_id.iloc[0], df.patient_id.iloc[0]
    assert mapping[sid] == pid
    multi = df.groupby("patient_id").pathology_id.nunique()
    assert sum(1 for p in mapping.values() if p in set(multi[multi > 1].index)) == int(multi[multi > 1].sum())


def test_labels_without_required_columns(tmp_path):
    bad = tmp_path / "labels.csv"
    bad.write_text("slide,patient\nA,B\n")
    with pytest.raises(ConvertError, match="no 'pathology_id' column"):
        read_label_slides(bad)


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
