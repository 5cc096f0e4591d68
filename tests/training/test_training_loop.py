"""Training loop: gradient accumulation, outputs, reproducibility, resume, CLI (dsca.train)."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import yaml

from dsca import build_model
from dsca.cli.dsca_main import main
from dsca.config import load_config, parse_config
from dsca.labels import load_labels, rebin
from dsca.losses import discrete_nll, l1_penalty
from dsca.splits import load_split
from dsca.train import accumulate_group, train_cross_validation


def _patients(n, seed=0, d=32):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        blocks = 3 + i % 4
        x20 = torch.randn(1, 16 * blocks, d, generator=g)
        x5 = torch.randn(1, blocks, d, generator=g)
        coords = torch.stack([torch.arange(blocks), torch.zeros(blocks, dtype=torch.long)], 1)[None]
        # times tie in pairs, censored patients among them: the Cox risk sets must hold them
        label = torch.tensor([10.0 * (i // 2 + 1), float(i % 3 != 0), float(i % 4), float(i % 3 == 0)],
                             dtype=torch.float64)
        out.append((x20, x5, coords, label))
    return out


def _efron_nll_by_loops(eta, event, time):
    """-log Efron partial likelihood / B, term by term (independent of dsca.losses)."""
    total = eta.new_zeros(())
    for t in sorted({float(v) for v, e in zip(time, event) if e}):
        dead = [i for i in range(len(eta)) if event[i] and float(time[i]) == t]
        risk = [j for j in range(len(eta)) if float(time[j]) >= t]
        at_risk = sum(torch.exp(eta[j]) for j in risk)
        tied = sum(torch.exp(eta[i]) for i in dead)
        for k, i in enumerate(dead):
            total = total + eta[i] - torch.log(at_risk - k / len(dead) * tied)
    return -total / len(eta)


@pytest.mark.parametrize("loss", ["survmle", "survple"])
def test_per_patient_backward_equals_group_loss(loss):
    """Backward per patient (scaled) gives the gradients of the group's loss computed at once."""
    dims = "32-16-16-1" if loss == "survple" else "32-16-16-4"
    cfg = parse_config({"store": "x", "labels": "y", "splits": "z{}", "dims": dims, "tra_nhead": 2,
                        "dropout": 0.3, "loss": loss, "alpha": 0.1, "reg_l1": 1e-3})
    patients = _patients(6)
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}

    torch.manual_seed(1)  # same dropout masks in both passes
    total, _, _ = accumulate_group(model, iter(patients), len(patients), cfg)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    out = torch.cat([model(x20, x5, c) for x20, x5, c, _ in patients])
    lab = torch.stack([p[3] for p in patients])
    if loss == "survple":
        ref = _efron_nll_by_loops(out[:, 0], lab[:, 1], lab[:, 0])
    else:
        ref = discrete_nll(out, lab[:, 2], lab[:, 3], alpha=0.1)
    (ref + l1_penalty(model.parameters(), 1e-3)).backward()
    assert total == pytest.approx(float(ref.detach()), rel=1e-5)
    assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


def _summary_keys(report):
    s = report["summary"]
    return {k: s[k] for k in ("test_cindex_mean", "test_cindex_std", "val_loss_mean")}


def test_train_writes_outputs_and_is_reproducible(small_config, tmp_path):
    cfg = load_config(small_config())
    a = train_cross_validation(cfg, tmp_path / "a")
    out = tmp_path / "a"
    for name in ("metrics.json", "predictions.csv", "train.log", "config.yaml", "run.json",
                 "training_curves.png", "km_test.png", "fold0/best.pt", "fold1/result.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert isinstance(metrics["summary"]["test_cindex_mean"], float)
    assert isinstance(metrics["summary"]["test_cindex_std"], float)
    assert [f["fold"] for f in metrics["folds"]] == [0, 1]
    for f in metrics["folds"]:
        assert 0.0 <= f["test"]["cindex"] <= 1.0 and {"train", "val", "test"} <= f.keys()
        assert f["test"]["cindex_ci_low"] <= f["test"]["cindex"] <= f["test"]["cindex_ci_high"]
        assert len(f["history"]) == 2
    preds = pd.read_csv(out / "predictions.csv")
    assert list(preds.columns[:8]) == ["fold", "split", "patient_id", "t", "e", "y_t", "risk",
                                       "risk_group"]
    # each fold's groups: split at that fold model's median risk on its training patients
    for fold, rows in preds.groupby("fold"):
        median = rows.loc[rows["split"] == "train", "risk"].median()
        assert metrics["folds"][fold]["train_risk_median"] == pytest.approx(median)
        assert ((rows["risk"] > median) == (rows["risk_group"] == "high")).all()
    s = metrics["summary"]
    assert s["n_folds"] == 2 and s["n_folds_failed"] == 0
    assert not any(k.startswith("test_cindex_ci_") for k in s)  # per-fold bounds: never averaged
    assert 0 < s["test_pooled_logrank_p"] <= 1 and s["test_pooled_hazard_ratio"] > 0
    assert {"surv_1", "surv_4"} <= set(preds.columns)
    # every patient is tested exactly once over the 5 folds of the synthetic cohort; 2 run here
    assert preds.loc[preds["split"] == "test", "patient_id"].is_unique
    assert "fold 1 epoch 2" in (out / "train.log").read_text()
    b = train_cross_validation(cfg, tmp_path / "b")
    assert _summary_keys(a) == _summary_keys(b)
    pd.testing.assert_frame_equal(preds, pd.read_csv(tmp_path / "b" / "predictions.csv"))


class _Killed(BaseException):
    """Stands for the SIGKILL that ends a run right after a checkpoint."""


def test_resume_continues_a_killed_fold(small_config, tmp_path, monkeypatch):
    import dsca.train.fold

    cfg = load_config(small_config(epochs=3, folds=[0]))
    full = train_cross_validation(cfg, tmp_path / "full")
    # a run killed right after the last.pt of its epoch 2 was written
    run = tmp_path / "run"
    real_save = dsca.train.fold._save_last

    def save_then_die(path, run_id, fold, epoch, *args):
        real_save(path, run_id, fold, epoch, *args)
        if epoch == 1:
            raise _Killed

    monkeypatch.setattr(dsca.train.fold, "_save_last", save_then_die)
    with pytest.raises(_Killed):
        train_cross_validation(cfg, run)
    monkeypatch.undo()
    # every checkpoint is plain tensors and values: it loads with weights_only
    state = torch.load(run / "fold0" / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and state["kind"] == "last" and "rng" in state
    resumed = train_cross_validation(cfg, run, resume=True)
    assert [h["epoch"] for h in resumed["folds"][0]["history"]] == [1, 2, 3]
    assert "resumed after epoch 2" in (run / "train.log").read_text()

    def curve(report):
        return [{k: v for k, v in h.items() if k != "seconds"} for h in report["folds"][0]["history"]]

    assert curve(resumed) == curve(full)
    assert _summary_keys(resumed) == pytest.approx(_summary_keys(full))
    # a finished fold is skipped on resume
    again = train_cross_validation(cfg, run, resume=True)
    assert _summary_keys(again) == pytest.approx(_summary_keys(full))
    assert "fold 0: finished earlier, skipped" in (run / "train.log").read_text()


def test_cox_head(small_config, tmp_path):
    """The Cox head trains (also through DataLoader worker processes, as the reference config
    asks for with num_workers: 8), ranks by its log hazard, and its reported test metrics are
    those of its saved predictions, recomputed by scikit-survival."""
    sksurv_metrics = pytest.importorskip("sksurv.metrics")
    cfg = load_config(small_config(dims="32-16-16-1", loss="survple", folds=[2], epochs=2,
                                   bp_every_iters=6, num_workers=1))
    report = train_cross_validation(cfg, tmp_path / "cox")
    preds = pd.read_csv(tmp_path / "cox" / "predictions.csv")
    assert (preds["risk"] == preds["log_hazard"]).all()
    test = preds[preds["split"] == "test"]
    c = sksurv_metrics.concordance_index_censored(test["e"].to_numpy(bool), test["t"].to_numpy(float),
                                                   test["risk"].to_numpy(float))[0]
    assert report["folds"][0]["test"]["cindex"] == pytest.approx(c, abs=1e-12)
    val = preds[preds["split"] == "val"]
    val_loss = _efron_nll_by_loops(torch.tensor(val["risk"].to_numpy()), val["e"].to_numpy(),
                                   val["t"].to_numpy())
    assert report["folds"][0]["val"]["loss"] == pytest.approx(float(val_loss), rel=1e-5)


def test_cut_points_from_training_patients_by_default(small_config, tmp_path, synth_cohort):
    """bin_cut: train (the default) cuts the bins on each fold's training patients; cohort
    cuts them on every patient, as the reference."""
    cfg = load_config(small_config(folds=[2], epochs=1))
    assert cfg.bin_cut == "train"
    report = train_cross_validation(cfg, tmp_path / "fold_bins")
    labels = load_labels(synth_cohort.labels_csv)
    fold_labels = rebin(labels, load_split(synth_cohort.splits[2]).train)
    assert report["folds"][0]["bin_edges"] == pytest.approx(fold_labels.attrs["bin_edges"])
    assert report["folds"][0]["bin_edges"] != pytest.approx(labels.attrs["bin_edges"])
    preds = pd.read_csv(tmp_path / "fold_bins" / "predictions.csv").set_index("patient_id")
    assert (preds["y_t"] == fold_labels.loc[preds.index, "y_t"]).all()
    cohort = train_cross_validation(load_config(small_config(folds=[2], epochs=1, bin_cut="cohort")),
                                    tmp_path / "cohort_bins")
    assert cohort["folds"][0]["bin_edges"] == pytest.approx(labels.attrs["bin_edges"])


def test_cli_train_and_bad_inputs(small_config, tmp_path, capsys, synth_cohort):
    cfg = small_config(epochs=1, folds=[0])
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "o"), "--folds", "1"]) == 0
    assert "test C-index" in capsys.readouterr().out
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["folds"][0]["fold"] == 1

    assert main(["train", "--config", str(small_config(bp_every_iter=4)), "--out", str(tmp_path / "x")]) == 2
    assert "did you mean 'bp_every_iters'" in capsys.readouterr().err

    # a split naming a patient that is not in the labels
    bad_split = tmp_path / "bad-fold0.npz"
    import numpy as np

    with np.load(synth_cohort.splits[0]) as d:
        np.savez(bad_split, train_patients=list(d["train_patients"]) + ["NOBODY"],
                 val_patients=d["val_patients"], test_patients=d["test_patients"])
    cfg = small_config(splits=str(tmp_path / "bad-fold{}.npz"), folds=[0])
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "bad-fold0.npz" in err and "NOBODY" in err
    assert not (tmp_path / "y").exists()  # nothing written for a run that cannot start

    # labels whose patients have no slide in the store
    labels = pd.read_csv(synth_cohort.labels_csv)
    lost = labels["patient_id"] == labels.loc[0, "patient_id"]
    labels.loc[lost, "pathology_id"] = [f"MISSING-{i}" for i in range(lost.sum())]
    labels.to_csv(tmp_path / "l.csv", index=False)
    cfg = small_config(labels=str(tmp_path / "l.csv"), folds=[0, 1, 2, 3, 4])
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "z")]) == 2
    assert "has no slide in the store" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()

    # --quiet keeps the console quiet while train.log still gets the INFO progress
    cfg = small_config(epochs=1, folds=[0])
    assert main(["train", "-q", "--config", str(cfg), "--out", str(tmp_path / "q")]) == 0
    assert "fold 0 epoch 1" in (tmp_path / "q" / "train.log").read_text()


class _Samples(torch.utils.data.Dataset):
    """PatientSample-like items from :func:`_patients`."""

    def __init__(self, patients):
        self.patients = patients

    def __len__(self):
        return len(self.patients)

    def __getitem__(self, i):
        from types import SimpleNamespace

        x20, x5, coords, label = self.patients[i]
        return SimpleNamespace(x20=x20[0], x5=x5[0], coords=coords[0], label=label.tolist(),
                               patient_id=f"P{i}")


@pytest.mark.parametrize(("last_group", "steps"), [("drop", 2), ("step", 3)])
def test_last_incomplete_group(last_group, steps):
    """5 patients in groups of 2: the reference never back-propagates the fifth (drop, the
    default); 'step' steps it too. Either way every patient's output is collected."""
    from dsca.train.steps import train_epoch as _train_epoch

    cfg = parse_config({"store": "x", "labels": "y", "splits": "z{}", "dims": "32-16-16-4",
                        "tra_nhead": 2, "bp_every_iters": 2, "last_group": last_group})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grads_at_step = []
    opt.register_step_pre_hook(lambda o, *_: grads_at_step.append(
        sum(p.grad.abs().sum() for p in model.parameters() if p.grad is not None)))
    loss, outputs = _train_epoch(model, _Samples(_patients(5)), opt, cfg, torch.device("cpu"),
                                 epoch=0, scaler=None, desc="t")
    assert len(grads_at_step) == steps and all(g > 0 for g in grads_at_step)
    assert sorted(outputs.patient_ids) == [f"P{i}" for i in range(5)] and outputs.out.shape == (5, 4)
    assert all(p.grad is None for p in model.parameters())  # nothing left over for next epoch
    assert parse_config({"store": "x", "labels": "y", "splits": "z{}"}).last_group == "drop"


def test_early_stopping_rules_of_the_reference():
    """Ties count as improvements; patience counts bad epochs after the best; no stop at or
    before es_start_epoch; nothing is recorded during the warm-up."""
    from dsca.train.early_stop import EarlyStop as _EarlyStop

    stop = _EarlyStop(patience=2, warmup=1, start_epoch=0, mode="min")
    assert not stop.update(0, 0.1)  # warm-up: even a good value is not recorded
    assert stop.update(1, 1.0) and stop.update(2, 1.0)  # a tie is a new best (saves, resets)
    assert stop.best_epoch == 2
    assert not stop.update(3, 1.5) and not stop.stop
    assert not stop.update(4, 1.2) and stop.stop
    late = _EarlyStop(patience=1, warmup=0, start_epoch=3, mode="min")
    late.update(0, 1.0)
    for epoch in (1, 2, 3):
        late.update(epoch, 2.0)
        assert not late.stop  # 1..3 bad epochs, but not yet past epoch 3
    late.update(4, 2.0)
    assert late.stop
    nan = _EarlyStop(patience=3, warmup=0, start_epoch=0, mode="min")
    assert not nan.update(0, float("nan")) and nan.update(1, 5.0) and not nan.update(2, float("nan"))
    assert nan.best == 5.0 and nan.best_epoch == 1
    ci = _EarlyStop(patience=1, warmup=0, start_epoch=0, mode="max")
    assert ci.update(0, 0.6) and ci.update(1, 0.7) and not ci.update(2, 0.65) and ci.stop


def test_reference_config_trains_without_edits(reference_dir, reference_size_store, tmp_path):
    """The study's config_hier.yaml, with only store/labels/splits added (and epochs cut to 1
    to keep the test short), runs `dsca train` end to end; outputs go to its save_path."""
    cohort, store = reference_size_store
    text = (reference_dir / "config_hier.yaml").read_text()
    assert "\nepochs: 150\n" in text
    text = text.replace("\nepochs: 150\n", "\nepochs: 1\n")
    splits = str(cohort.splits[0]).replace("fold0", "fold{}")
    text += f"store: {store}\nlabels: {cohort.labels_csv}\nsplits: {splits}\n"
    config = tmp_path / "config_hier.yaml"
    config.write_text(text)
    assert main(["train", "--config", str(config), "--folds", "0"]) == 0
    out = tmp_path / "results-brca-hier" / "reproducing_dsca"  # save_path, relative to the file
    metrics = json.loads((out / "metrics.json").read_text())
    assert [f["fold"] for f in metrics["folds"]] == [0]
    assert isinstance(metrics["summary"]["test_cindex_mean"], float)
    used = yaml.safe_load((out / "config.yaml").read_text())
    assert (used["opt"], used["bp_every_iters"], used["lr"], used["alpha"]) == ("lookahead_adam", 16, 8e-5, 0.1)
    assert used["model"]["dims"] == [1024, 384, 384, 4] and used["model"]["tra_nhead"] == 8
    assert (out / "predictions.csv").is_file() and (out / "fold0" / "best.pt").is_file()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"store": "/nonexistent/cohort.zarr"}, "no zarr store here"),
        ({"dims": "64-16-16-4"}, "holds 32-dim features but dims starts with 64"),
    ],
)
def test_cli_store_errors_are_one_line(small_config, tmp_path, capsys, override, message):
    """A missing store or one whose features do not fit dims: exit 2, one line, nothing written."""
    cfg = small_config(epochs=1, folds=[0], **override)
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dsca train: error:") and message in err[0]
    assert not (tmp_path / "o").exists()


def test_loader_workers_capped():
    """num_workers: 8 (the reference's) is capped at the CPUs; with cache_features the loader
    stays in this process, where the cache lives."""
    import os

    from dsca.train.data import patient_loader as _loader

    base = {"store": "x", "labels": "y", "splits": "z{}"}
    ds = _Samples(_patients(2))
    assert _loader(ds, parse_config({**base, "num_workers": 512})).num_workers == len(os.sched_getaffinity(0))
    assert _loader(ds, parse_config({**base, "num_workers": 1})).num_workers == 1
    assert _loader(ds, parse_config({**base, "num_workers": 2, "cache_features": True})).num_workers == 0
