"""Applying runs at the edges: a Cox head, failed folds, mixed run folders, reused output
folders, unreadable slide files, model subsets."""
from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pandas as pd
import pytest

from dsca.cli.dsca_main import main


def _apply(*args: str) -> int:
    return main(["-q", *args, "--workers", "0"])


def test_a_cox_run_predicts_risks_and_td_auc_without_a_survival_curve(infer_config, synth_store,
                                                                      synth_cohort, tmp_path):
    from dsca.config import load_config
    from dsca.train import train_cross_validation

    cfg = infer_config("cox.yaml", loss="survple", dims="32-16-16-1", epochs=1, folds=[0])
    train_cross_validation(load_config(cfg), tmp_path / "cox")
    assert _apply("predict", "--run", str(tmp_path / "cox"), "--store", str(synth_store), "--labels",
                  str(synth_cohort.labels_csv), "--out", str(tmp_path / "p"), "--bootstrap", "10") == 0
    table = pd.read_csv(tmp_path / "p" / "predictions.csv", dtype={"patient_id": str})
    assert list(table.columns) == ["patient_id", "risk", "risk_fold0", "risk_group", "t", "e"]
    own = pd.read_csv(tmp_path / "cox" / "predictions.csv", dtype={"patient_id": str},
                      float_precision="round_trip").set_index("patient_id")
    mine = pd.read_csv(tmp_path / "p" / "predictions.csv", dtype={"patient_id": str},
                       float_precision="round_trip")
    np.testing.assert_array_equal(mine["risk_fold0"], own.loc[mine["patient_id"], "risk"])
    metrics = json.loads((tmp_path / "p" / "metrics.json").read_text())
    assert metrics["td_auc"] is not None and metrics["ibs"] is None  # no curve: no Brier score
    assert main(["-q", "report", "--predictions", str(tmp_path / "p" / "predictions.csv"), "--labels",
                 str(synth_cohort.labels_csv), "--out", str(tmp_path / "r")]) == 0


def test_failed_folds_are_skipped_and_a_run_without_models_is_refused(cv_run, tmp_path, caplog):
    from dsca.infer import ModelLoadError, load_run_models

    run = tmp_path / "run"
    shutil.copytree(cv_run, run)
    result = run / "fold1" / "result.json"
    result.write_text(json.dumps({**json.loads(result.read_text()), "status": "failed",
                                  "reason": "training diverged"}))
    with caplog.at_level(logging.WARNING):
        assert [m.name for m in load_run_models(run)] == ["fold0"]
    assert "training diverged" in caplog.text
    (run / "fold0" / "result.json").unlink()
    with pytest.raises(ModelLoadError, match="no finished fold"):
        load_run_models(run)
    with pytest.raises(ModelLoadError, match="no finished model fold7"):
        load_run_models(cv_run, ["fold7"])
    assert [m.name for m in load_run_models(cv_run, ["fold1", "fold0"])] == ["fold1", "fold0"]


def test_a_folder_with_fold_and_final_models_is_refused(cv_run, final_run, synth_store, tmp_path, capsys):
    mixed = tmp_path / "mixed"
    shutil.copytree(final_run, mixed)
    shutil.copytree(cv_run / "fold0", mixed / "fold0")
    assert _apply("predict", "--run", str(mixed), "--store", str(synth_store), "--out", str(tmp_path / "p")) == 2
    assert "both fold models" in capsys.readouterr().err
    assert main(["-q", "report", "--run", str(final_run)]) == 2
    assert "a final run" in capsys.readouterr().err


def test_output_folders_never_overwrite_a_run_and_hold_no_stale_results(cv_run, synth_store, synth_cohort,
                                                                        tmp_path, capsys):
    for out in (cv_run, cv_run / "."):
        assert _apply("predict", "--run", str(cv_run), "--store", str(synth_store), "--out", str(out)) == 2
        assert "run folder" in capsys.readouterr().err
    out = tmp_path / "p"
    assert _apply("predict", "--run", str(cv_run), "--store", str(synth_store), "--out", str(out),
                  "--labels", str(synth_cohort.labels_csv), "--bootstrap", "0") == 0
    assert (out / "metrics.json").is_file() and (out / "km.png").is_file()
    assert _apply("predict", "--run", str(cv_run), "--store", str(synth_store), "--out", str(out),
                  "--models", "fold1") == 0
    assert not (out / "metrics.json").exists() and not (out / "km.png").exists()
    table = pd.read_csv(out / "predictions.csv")
    assert [c for c in table.columns if c.startswith("risk_fold")] == ["risk_fold1"]


def test_slides_outside_the_labels_and_unreadable_slide_files(cv_run, synth_store, synth_cohort, tmp_path,
                                                              capsys, caplog):
    from dsca.store import FeatureStore

    slides = FeatureStore.open(synth_store).patient_slides()
    pid, (first, *_) = next(iter(slides.items()))
    labels = pd.read_csv(synth_cohort.labels_csv)
    labels[labels["pathology_id"] != first].to_csv(tmp_path / "fewer.csv", index=False)
    assert _apply("heatmap", "--run", str(cv_run), "--store", str(synth_store), "--out", str(tmp_path / "h"),
                  "--slides", first, "--labels", str(tmp_path / "fewer.csv")) == 2
    assert first in capsys.readouterr().err
    wsi = tmp_path / "wsi"
    wsi.mkdir()
    (wsi / f"{first}.svs").write_text("not a slide")
    out = tmp_path / "h2"
    with caplog.at_level(logging.WARNING):
        assert _apply("heatmap", "--run", str(cv_run), "--store", str(synth_store), "--out", str(out),
                      "--slides", first, "--wsi", str(wsi)) == 0
    assert f"{first}: no overlay or tiles" in caplog.text and str(wsi / f"{first}.svs") in caplog.text
    assert (out / first / "attention.csv").is_file() and not (out / first / "overlay.png").exists()
    (wsi / f"{first}.tiff").write_text("a second file for the same slide")
    assert _apply("heatmap", "--run", str(cv_run), "--store", str(synth_store), "--out", str(tmp_path / "h3"),
                  "--slides", first, "--wsi", str(wsi)) == 2
    assert not (tmp_path / "h3").exists()
