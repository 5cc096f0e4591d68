"""A final model: one network trained on every labelled patient, for deployment.

Cross-validation estimates how well the recipe generalises; the model to deploy is then trained
once on all patients for a fixed number of epochs, by default the median best epoch of the
cross-validation's folds (:func:`cv_best_epochs`). With no validation set there is no early
stopping and no ReduceLROnPlateau: the learning rate stays at ``lr``. Its training patients'
risks set its risk-group threshold and the scale its risks are standardized by, as for a fold.

    OUT/final/best.pt      the weights after the last epoch, self-contained (dsca predict, heatmap)
    OUT/final/result.json  epochs, history, bin edges, metrics on the training patients
    OUT/metrics.json       the same metrics, and where the epoch count came from
    OUT/predictions.csv    the training patients' predictions (split "train")
    OUT/config.yaml, run.json, train.log
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from dsca.atomic import atomic_write
from dsca.config import ConfigError, TrainConfig
from dsca.labels import load_labels, patient_slides
from dsca.optim import build_optimizer
from dsca.train.data import open_store
from dsca.train.device import cpu_threads, grad_scaler, resolve_device
from dsca.train.fold import FoldFailed, finite_weights, make_self_contained, seed_everything
from dsca.train.logfile import log_to_file
from dsca.train.report import fold_report, jsonable
from dsca.train.rundir import open_run_dir
from dsca.train.steps import predict, train_epoch

__all__ = ["cv_best_epochs", "train_final", "FINAL_DIR", "FINAL_FOLD"]

log = logging.getLogger(__name__)

FINAL_DIR = "final"
FINAL_FOLD = -1  # the fold number its checkpoint carries


def cv_best_epochs(cv_run: str | Path) -> tuple[int, list[int]]:
    """(median best epoch, each finished fold's best epoch) of a cross-validation run.

    An even number of folds gives a half-way median; it is rounded up (one more epoch rather
    than one fewer than half the folds needed).

    Raises:
        ConfigError: ``cv_run`` has no readable metrics.json or no finished fold.
    """
    path = Path(cv_run) / "metrics.json"
    try:
        report = json.loads(path.read_text())
        best = [int(f["best_epoch"]) for f in report["folds"] if f.get("status") == "ok"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path}: cannot read the folds' best epochs ({err})") from None
    best = [b for b in best if b > 0]
    if not best:
        raise ConfigError(f"{path}: no finished fold with a best epoch; pass --epochs")
    return int(math.ceil(float(np.median(best)))), best


def train_final(cfg: TrainConfig, out_dir: str | Path, epochs: int, *, device: str | None = None,
                overwrite: bool = False, epochs_from: str = "") -> dict[str, Any]:
    """Train one model on every labelled patient of the store for ``epochs`` epochs.

    Args:
        epochs_from: where ``epochs`` came from, recorded in metrics.json.

    Returns:
        metrics.json's content.

    Raises:
        ConfigError, LabelError, RunDirError, StoreError: before anything is trained.
        FoldFailed: the model diverged (NaN/inf weights or predictions); no checkpoint is written.
    """
    from dsca import build_model
    from dsca.store import PatientDataset

    if epochs < 1:
        raise ConfigError(f"the final model needs at least 1 epoch, got {epochs}")
    out = Path(out_dir)
    dev = resolve_device(device or cfg.device)
    labels = load_labels(cfg.labels, bins=cfg.bins, columns=cfg.labels_map)
    in_store = open_store(cfg)
    mapping = patient_slides(labels, list(labels.index), in_store, store_name=str(cfg.store),
                             drop_missing=True)
    if not mapping:
        raise ConfigError(f"{cfg.source}: no labelled patient has slides in {cfg.store}")
    dataset = PatientDataset(cfg.store, mapping, labels=labels)
    run = open_run_dir(out, {**cfg.to_dict(), "final_epochs": epochs}, resume=False, overwrite=overwrite)
    folder = out / FINAL_DIR
    folder.mkdir(parents=True, exist_ok=True)
    with log_to_file(out / "train.log", append=False), cpu_threads(cfg.num_threads):
        with atomic_write(out / "config.yaml") as f:
            import yaml

            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
        log.info("final model: %d patients, %d epochs (%s) on %s", len(mapping), epochs,
                 epochs_from or "--epochs", dev)
        seed_everything(cfg.seed)
        model = build_model(cfg.model).to(dev)
        optimizer = build_optimizer(model, cfg.opt, cfg.lr, cfg.weight_decay, cfg.opt_eps, cfg.opt_betas)
        scaler = grad_scaler(dev, cfg.amp)
        history = []
        for epoch in range(epochs):
            step_loss, _ = train_epoch(model, dataset, optimizer, cfg, dev, epoch, scaler,
                                       f"final epoch {epoch + 1}/{epochs}")
            history.append({"epoch": epoch + 1, "train_step_loss": step_loss})
            log.info("final epoch %d: train step loss %.4f", epoch + 1, step_loss)
        if not finite_weights(model):
            raise FoldFailed(f"the final model diverged (NaN or inf weights after {epochs} epochs); "
                             "nothing was saved")
        outputs = {"train": predict(model, dataset, cfg, dev, "final eval")}
        if not bool(torch.isfinite(outputs["train"].out).all()):
            raise FoldFailed("the final model predicts NaN or inf; nothing was saved")
        edges = np.asarray(labels.attrs["bin_edges"])
        report = fold_report(cfg, outputs, edges, FINAL_FOLD)
        # CPU tensors: a plain torch.load(..., weights_only=True) works on any machine
        state = {"epoch": epochs - 1, "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
        make_self_contained(folder / "best.pt", state, cfg, edges, outputs["train"].risk,
                            run.run_id, FINAL_FOLD)
        result = {"fold": FINAL_FOLD, "status": "ok", "best_epoch": epochs, "epochs_run": epochs,
                  "epochs_from": epochs_from or "--epochs", "history": history,
                  "bin_edges": edges.tolist(), "run_id": run.run_id, "n_patients": len(mapping),
                  "train": report["train"]}
        with atomic_write(folder / "result.json") as f:
            json.dump(jsonable({**result, "predictions": report["predictions"]}), f, indent=1)
        if cfg.save_prediction:
            with atomic_write(out / "predictions.csv") as f:
                pd.DataFrame(report["predictions"]).to_csv(f, index=False)
        with atomic_write(out / "metrics.json") as f:
            json.dump(jsonable(result), f, indent=1)
        log.info("final model on %d patients: training C-index %.3f; %s", len(mapping),
                 report["train"]["cindex"], folder / "best.pt")
        return result
