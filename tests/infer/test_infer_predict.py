"""`dsca predict` and self-contained checkpoints, on real runs trained on the synthetic store."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dsca.cli.dsca_main import main


@pytest.fixture(scope="module")
def predicted(cv_run, synth_store, synth_cohort, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("predicted")
    assert main(["-q", "predict", "--run", str(cv_run), "--store", str(synth_store), "--labels",
                 str(synth_cohort.labels_csv), "--out", str(out), "--bootstrap", "50",
                 "--workers", "0"]) == 0
    return out


def _csv(path: Path) -> pd.DataFrame:
    """A CSV as written (pandas' default parser may be 1 ulp off)."""
    return pd.read_csv(path, dtype={"patient_id": str}, float_precision="round_trip")


def _run_predictions(run: Path) -> pd.DataFrame:
    return _csv(run / "predictions.csv")


def test_each_fold_model_reproduces_the_runs_own_predictions_exactly(cv_run, predicted):
    mine = _csv(predicted / "predictions.csv").set_index("patient_id")
    theirs = _run_predictions(cv_run)
    for fold in (0, 1):
        rows = theirs[theirs["fold"] == fold]
        assert set(rows["split"]) == {"train", "val", "test"}
        got = mine.loc[rows["patient_id"], f"risk_fold{fold}"].to_numpy()
        np.testing.assert_array_equal(got, rows["risk"].to_numpy())


def test_contract_columns_and_the_ensemble_from_the_folds_training_risks(cv_run, predicted):
    table = _csv(predicted / "predictions.csv")
    assert list(table.columns[:5]) == ["patient_id", "risk", "risk_fold0", "risk_fold1", "risk_group"]
    theirs = _run_predictions(cv_run)
    z, thresholds = [], []
    for fold in (0, 1):
        train = theirs[(theirs["fold"] == fold) & (theirs["split"] == "train")]["risk"].to_numpy()
        mean, std = train.mean(), train.std()
        z.append((table[f"risk_fold{fold}"].to_numpy() - mean) / std)
        thresholds.append((np.median(train) - mean) / std)
    np.testing.assert_allclose(table["risk"], np.mean(z, axis=0), rtol=1e-12, atol=1e-12)
    expected = np.where(table["risk"] > np.mean(thresholds), "high", "low")
    assert (table["risk_group"].to_numpy() == expected).all()
    # the ensemble survival curve: each fold's step curve read at the mean edges, averaged
    edges = [np.asarray(json.loads((cv_run / f"fold{k}" / "result.json").read_text())["bin_edges"])
             for k in (0, 1)]
    common = np.mean(edges, axis=0)
    surv_cols = [f"surv_{k}" for k in range(1, len(common))]
    curves = []
    for fold in (0, 1):
        rows = theirs[theirs["fold"] == fold].set_index("patient_id").loc[table["patient_id"]]
        s = np.concatenate([np.ones((len(rows), 1)), rows[surv_cols].to_numpy()], axis=1)
        done = [int(np.sum(edges[fold][1:] <= t)) for t in common[1:]]
        curves.append(s[:, done])
    np.testing.assert_allclose(table[surv_cols].to_numpy(), np.mean(curves, axis=0), atol=1e-6)
    meta = json.loads((predicted / "predict.json").read_text())
    assert meta["models"] == ["fold0", "fold1"] and np.allclose(meta["bin_edges"], common)


def test_metrics_with_labels_match_independent_oracles(predicted, synth_cohort):
    from lifelines import CoxPHFitter
    from sksurv.metrics import concordance_index_censored

    metrics = json.loads((predicted / "metrics.json").read_text())
    for key in ("cindex", "cindex_ci_low", "cindex_ci_high", "td_auc", "ibs", "logrank_p",
                "hazard_ratio", "hazard_ratio_ci_low", "hazard_ratio_ci_high", "n"):
        assert metrics[key] is not None, key
    table = _csv(predicted / "predictions.csv")
    labels = pd.read_csv(synth_cohort.labels_csv, dtype={"patient_id": str}).groupby("patient_id").first()
    t, e = labels.loc[table["patient_id"], "t"].to_numpy(float), labels.loc[table["patient_id"], "e"].to_numpy()
    assert metrics["n"] == len(table) == labels.shape[0]
    cindex = concordance_index_censored(e.astype(bool), t, table["risk"].to_numpy())[0]
    assert metrics["cindex"] == pytest.approx(cindex, abs=1e-12)
    assert metrics["cindex_ci_low"] <= metrics["cindex"] <= metrics["cindex_ci_high"]
    fit = CoxPHFitter().fit(pd.DataFrame({"t": t, "e": e, "high": (table["risk_group"] == "high").astype(int)}),
                            "t", "e")
    assert metrics["hazard_ratio"] == pytest.approx(float(np.exp(fit.params_["high"])), rel=1e-4)
    assert (predicted / "km.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_best_checkpoint_is_self_contained_and_loads_weights_only(cv_run, synth_store, tmp_path):
    from dsca.infer import load_run_models

    state = torch.load(cv_run / "fold0" / "best.pt", weights_only=True)
    info = state["inference"]
    result = json.loads((cv_run / "fold0" / "result.json").read_text())
    np.testing.assert_array_equal(info["bin_edges"].numpy(), result["bin_edges"])
    train = _run_predictions(cv_run).query("fold == 0 and split == 'train'")["risk"].to_numpy()
    np.testing.assert_array_equal(np.sort(info["train_risk"].numpy()), np.sort(train))
    assert info["head"] == "discrete" and info["store"]["feature_dim"] == 32
    assert info["model_config"]["dims"] == (32, 16, 16, 4)
    # only run.json and the checkpoints: no config, results or predictions to lean on
    bare = tmp_path / "bare"
    for fold in (0, 1):
        (bare / f"fold{fold}").mkdir(parents=True)
        shutil.copy(cv_run / f"fold{fold}" / "best.pt", bare / f"fold{fold}")
        shutil.copy(cv_run / f"fold{fold}" / "result.json", bare / f"fold{fold}")  # status ok
    shutil.copy(cv_run / "run.json", bare)
    models = load_run_models(bare)
    assert [m.name for m in models] == ["fold0", "fold1"]
    assert main(["-q", "predict", "--run", str(bare), "--store", str(synth_store), "--out",
                 str(tmp_path / "p"), "--workers", "0"]) == 0
    got = _csv(tmp_path / "p" / "predictions.csv")
    assert len(got) == 20 and got["risk"].notna().all()


def test_a_checkpoint_without_the_inference_record_is_completed_from_its_run(cv_run, tmp_path):
    from dsca.infer import load_run_models

    old = tmp_path / "old"
    shutil.copytree(cv_run, old)
    for fold in (0, 1):
        state = torch.load(old / f"fold{fold}" / "best.pt", weights_only=True)
        del state["inference"]
        torch.save(state, old / f"fold{fold}" / "best.pt")
    new, legacy = load_run_models(cv_run), load_run_models(old)
    for a, b in zip(new, legacy):
        np.testing.assert_array_equal(np.sort(a.train_risk), np.sort(b.train_risk))
        np.testing.assert_array_equal(a.bin_edges, b.bin_edges)
        assert a.config == b.config and a.fingerprint == b.fingerprint
    (old / "predictions.csv").unlink()
    with pytest.raises(ValueError, match="older checkpoint without its inference record"):
        load_run_models(old)


def _store(tmp_path: Path, dim: int, extractor: str | None = None) -> Path:
    from dsca.store.convert import convert_cohort
    from dsca.store.synth import SynthSpec, write_synthetic_cohort

    cohort = write_synthetic_cohort(tmp_path / f"c{dim}", SynthSpec(patients=5, dim=dim, patches=6, seed=2),
                                    progress=False)
    out = tmp_path / f"s{dim}.zarr"
    report = convert_cohort(x5_features=cohort.x5_features, x20_features=cohort.x20_features,
                            x5_coords=cohort.x5_coords, x20_coords=cohort.x20_coords,
                            labels=cohort.labels_csv, out=out, progress=False, extractor=extractor)
    assert report.ok
    return out


def test_a_store_of_another_encoder_is_one_clear_error(cv_run, tmp_path, capsys):
    other_dim = _store(tmp_path, 16)
    assert main(["-q", "predict", "--run", str(cv_run), "--store", str(other_dim), "--out",
                 str(tmp_path / "p1")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(other_dim) in err[0] and "16-dim" in err[0] and "32-dim" in err[0]
    assert not (tmp_path / "p1").exists()
    other_name = _store(tmp_path, 32, extractor="uni_v1")
    assert main(["-q", "predict", "--run", str(cv_run), "--store", str(other_name), "--out",
                 str(tmp_path / "p2")]) == 2
    assert "--allow-other-extractor" in capsys.readouterr().err
    assert main(["-q", "predict", "--run", str(cv_run), "--store", str(other_name), "--out",
                 str(tmp_path / "p2"), "--allow-other-extractor", "--workers", "0"]) == 0
    assert len(pd.read_csv(tmp_path / "p2" / "predictions.csv")) == 5


def test_bad_runs_and_patients_are_named(cv_run, synth_store, tmp_path, capsys):
    assert main(["-q", "predict", "--run", str(tmp_path), "--store", str(synth_store), "--out",
                 str(tmp_path / "p")]) == 2
    assert "no run.json" in capsys.readouterr().err
    assert main(["-q", "predict", "--run", str(cv_run), "--store", str(synth_store), "--out",
                 str(tmp_path / "p"), "--patients", "SYN-0001", "NOPE"]) == 2
    assert "NOPE" in capsys.readouterr().err
    assert main(["-q", "predict", "--run", str(cv_run), "--store", str(synth_store), "--out",
                 str(tmp_path / "p"), "--patients", "SYN-0001", "--workers", "0"]) == 0
    assert pd.read_csv(tmp_path / "p" / "predictions.csv")["patient_id"].tolist() == ["SYN-0001"]


def test_final_model_trains_for_the_median_best_epoch_and_predict_applies_it(
        final_run, cv_run, synth_store, synth_cohort, tmp_path):
    from dsca.train.final import cv_best_epochs

    metrics = json.loads((final_run / "metrics.json").read_text())
    epochs, best = cv_best_epochs(cv_run)
    assert metrics["epochs_run"] == epochs == int(np.ceil(np.median(best)))
    assert metrics["n_patients"] == 20
    state = torch.load(final_run / "final" / "best.pt", weights_only=True)
    assert state["fold"] == -1 and state["inference"]["n_train"] == 20
    assert main(["-q", "predict", "--run", str(final_run), "--store", str(synth_store), "--labels",
                 str(synth_cohort.labels_csv), "--out", str(tmp_path / "p"), "--bootstrap", "0",
                 "--workers", "0"]) == 0
    table = _csv(tmp_path / "p" / "predictions.csv")
    assert list(table.columns[:4]) == ["patient_id", "risk", "risk_final", "risk_group"]
    own = _csv(final_run / "predictions.csv").set_index("patient_id")
    np.testing.assert_array_equal(table["risk_final"], own.loc[table["patient_id"], "risk"])
    # the training C-index of the final model is the C-index of its risks on all its patients
    got = json.loads((tmp_path / "p" / "metrics.json").read_text())
    assert got["per_model_cindex"]["final"] == pytest.approx(metrics["train"]["cindex"], abs=1e-12)


def test_cv_best_epochs_rounds_an_even_median_up(tmp_path):
    from dsca.train.final import cv_best_epochs

    folds = [{"fold": k, "status": "ok", "best_epoch": b} for k, b in enumerate([3, 4, 8, 9])]
    folds.append({"fold": 4, "status": "failed", "best_epoch": 0})
    (tmp_path / "metrics.json").write_text(json.dumps({"summary": {}, "folds": folds}))
    assert cv_best_epochs(tmp_path) == (6, [3, 4, 8, 9])


def test_final_option_errors(final_run, tmp_path, capsys):
    config = final_run / "config.yaml"
    assert main(["-q", "train", "--config", str(config), "--final", "--out", str(tmp_path / "f")]) == 2
    assert "exactly one of --cv-run" in capsys.readouterr().err
    assert main(["-q", "train", "--config", str(config), "--epochs", "2", "--out", str(tmp_path / "f")]) == 2
    assert "only apply with --final" in capsys.readouterr().err


def test_report_recomputes_predicts_metrics_from_its_saved_predictions(predicted, synth_cohort, tmp_path, capsys):
    args = ["-q", "report", "--predictions", str(predicted / "predictions.csv"), "--labels",
            str(synth_cohort.labels_csv), "--out", str(tmp_path / "r")]
    assert main(args) == 0
    assert f"matches {predicted / 'metrics.json'}" in capsys.readouterr().out
    assert (tmp_path / "r" / "km.png").is_file()
    saved = json.loads((predicted / "metrics.json").read_text())
    assert json.loads((tmp_path / "r" / "metrics.json").read_text()) == saved
    # two high-risk patients' risks swapped: the C-index moves, the groups stay valid
    table = _csv(predicted / "predictions.csv")
    high = table[table["risk_group"] == "high"]["risk"]
    a, b = high.idxmax(), high.idxmin()
    table.loc[[a, b], "risk"] = table.loc[[b, a], "risk"].to_numpy()
    tampered = tmp_path / "t"
    tampered.mkdir()
    table.to_csv(tampered / "predictions.csv", index=False)
    for name in ("predict.json", "metrics.json"):
        (tampered / name).write_text((predicted / name).read_text())
    assert main([*args[:3], str(tampered / "predictions.csv"), *args[4:]]) == 1
    assert "cindex" in capsys.readouterr().out
    # a risk group that its risk contradicts is an input error naming the patient
    table.loc[a, "risk_group"] = "low"
    table.to_csv(tampered / "predictions.csv", index=False)
    assert main([*args[:3], str(tampered / "predictions.csv"), *args[4:]]) == 2
    assert "risk_group disagrees" in capsys.readouterr().err
    assert main(["-q", "report", "--predictions", str(predicted / "predictions.csv")]) == 2
    assert "needs --labels" in capsys.readouterr().err
