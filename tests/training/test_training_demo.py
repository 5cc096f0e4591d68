"""`dsca demo` end to end at a small size (the full-size numbers are in the README): the
planted signal must be learned, the shuffled-label control must not.

At this size a fold's test set is 32 patients, whose C-index has a bootstrap spread of about
+-0.08, and other seeds (other cohorts) can land anywhere from no signal to 0.72 after 8
epochs: the cross-validated margin asked for is modest, and the learned signal is checked on
the 100 patients of the external cohort (its bootstrap interval must exclude 0.5)."""
from __future__ import annotations

import json

import pandas as pd

from dsca.cli.dsca_main import main


def test_demo_runs_signal_and_control(tmp_path, capsys, monkeypatch):
    # a relative --out, as the README's first command uses
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "demo"
    assert main(["demo", "--out", "demo", "--patients", "160", "--epochs", "8", "--folds", "0,1"]) == 0
    text = capsys.readouterr().out
    assert "test C-index (signal)" in text and "test C-index (control)" in text
    summary = {}
    for run in ("signal", "control"):
        metrics = json.loads((out / run / "metrics.json").read_text())
        assert [f["fold"] for f in metrics["folds"]] == [0, 1]
        assert (out / run / "km_test.png").is_file() and (out / run / "training_curves.png").is_file()
        summary[run] = metrics["summary"]
    assert summary["signal"]["test_cindex_mean"] > summary["control"]["test_cindex_mean"] + 0.1
    assert summary["signal"]["test_pooled_hazard_ratio"] > 1.0
    # the control permutes (t, e) across patients and keeps every slide with its patient
    signal = pd.read_csv(out / "cohort" / "synth_path_full.csv")
    control = pd.read_csv(out / "labels_shuffled.csv")
    assert (signal["pathology_id"] == control["pathology_id"]).all()
    assert (signal["patient_id"] == control["patient_id"]).all()
    first = lambda df: df.groupby("patient_id")[["t", "e"]].first()  # noqa: E731
    assert sorted(map(tuple, first(signal).to_numpy())) == sorted(map(tuple, first(control).to_numpy()))
    assert not first(signal).equals(first(control))
    # the run applied: an external cohort of new patients, heatmaps of test slides on their WSIs
    assert "external cohort (100 new patients" in text and "attention vs the planted motif" in text
    external = json.loads((out / "signal-predict" / "metrics.json").read_text())
    assert external["n"] == 100 and external["cindex_ci_low"] > 0.5
    table = pd.read_csv(out / "signal-predict" / "predictions.csv")
    assert list(table.columns[:4]) == ["patient_id", "risk", "risk_fold0", "risk_fold1"]
    heatmaps = sorted((out / "signal-heatmaps").iterdir())
    assert len(heatmaps) == 3
    for folder in heatmaps:
        for name in ("attention.csv", "heatmap.png", "overlay.png", "attention.geojson", "topk.csv"):
            assert (folder / name).is_file(), folder / name
        assert (out / "cohort" / "wsi" / f"{folder.name}.tiff").is_file()
