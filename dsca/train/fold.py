"""One fold: train with early stopping, keep the best weights, evaluate them, write its folder.

Per epoch: train (:mod:`dsca.train.steps`), evaluate the validation set, ReduceLROnPlateau and
early stopping on the monitored validation value (:mod:`dsca.train.early_stop`), write the
resumable ``last.pt``. A new best epoch's weights are written to ``best.next.pt`` first and
become ``best.pt`` only once that epoch's ``last.pt`` is written, so that a kill in between
never leaves ``best.pt`` one epoch ahead of the state a resume continues from. After training
the best weights are evaluated on train/val/test (:mod:`dsca.train.report`). A fold whose
model diverges (NaN/inf weights or predictions) is recorded as failed with its reason.

Under torchrun's data mode every rank runs this with its :class:`~dsca.train.distributed.Shard`:
the ranks split each optimizer group and each evaluated set and compute the same history and
metrics; only rank 0 touches the fold's folder, and what it reads (``last.pt`` to resume,
``best.pt`` to evaluate) it broadcasts.

    fold<k>/last.pt      resumable state; fold<k>/best.pt best weights, once evaluated with
                         what applying them needs (:mod:`dsca.train.checkpoint`)
    fold<k>/result.json  the fold's metrics, history and predictions
"""
from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dsca.atomic import atomic_write
from dsca.config import TrainConfig
from dsca.optim import build_optimizer
from dsca.train.checkpoint import (
    CheckpointError,
    inference_record,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from dsca.train.data import FoldData
from dsca.train.device import grad_scaler
from dsca.train.distributed import SINGLE, Shard
from dsca.train.early_stop import EarlyStop, monitor_mode, monitored_value
from dsca.train.outputs import set_cindex, set_loss
from dsca.train.report import fold_report, jsonable
from dsca.train.rundir import NEXT_BEST
from dsca.train.steps import gather_outputs, predict, train_epoch

__all__ = ["FoldFailed", "train_fold", "seed_everything", "finite_weights", "make_self_contained"]

log = logging.getLogger(__name__)


class FoldFailed(Exception):
    """A fold produced no usable model (NaN/inf outputs); the other folds go on."""


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def finite_weights(model: nn.Module) -> bool:
    """No parameter holds a NaN or inf."""
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def train_fold(
    cfg: TrainConfig, data: FoldData, fold_dir: Path, device: torch.device, run_id: str,
    resume: bool = False, shard: Shard = SINGLE,
) -> dict[str, Any]:
    """Train one fold, evaluate its best weights on every split part, write ``fold_dir``.

    Args:
        shard: the ranks that train this fold together (data mode), each with this call;
            the same result on every one of them.

    Returns:
        ``{"fold", "status": "ok", "best_epoch", "epochs_run", "history", "bin_edges",
        "train"/"val"/"test": metrics, "predictions": rows}``, or for a fold whose model
        diverged ``{"fold", "status": "failed", "reason", "history", ...}``.

    Raises:
        CheckpointError: ``last.pt`` (with ``resume``) or ``best.pt`` cannot be used.
    """
    from dsca import build_model

    last_path, best_path = fold_dir / "last.pt", fold_dir / "best.pt"
    next_best = fold_dir / NEXT_BEST
    seed_everything(cfg.seed)
    model = build_model(cfg.model).to(device)
    shard.broadcast_parameters(model)  # the same start on every rank, whatever its platform
    optimizer = build_optimizer(model, cfg.opt, cfg.lr, cfg.weight_decay, cfg.opt_eps, cfg.opt_betas)
    mode = monitor_mode(cfg)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode=mode, factor=cfg.lr_factor, patience=cfg.lr_patience
    )
    stopper = EarlyStop(cfg.es_patience, cfg.es_warmup, cfg.es_start_epoch, mode)
    scaler = grad_scaler(device, cfg.amp)
    history: list[dict[str, float]] = []
    start = 0

    def prepare() -> dict[str, Any] | None:
        """Rank 0: the fold's folder made ready; the state to resume from, or None."""
        fold_dir.mkdir(parents=True, exist_ok=True)
        if resume and last_path.is_file():
            state = load_checkpoint(last_path, kind="last", run_id=run_id, fold=data.fold)
            stopped = EarlyStop.from_state_dict(state["stopper"])
            _settle_next_best(next_best, best_path, stopped.best_epoch, run_id, data.fold)
            return state
        # a fold started afresh (also one that failed before) keeps nothing of an earlier try
        for stale in (last_path, best_path, next_best, fold_dir / "result.json"):
            stale.unlink(missing_ok=True)
        return None

    state = shard.from_main(prepare)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        stopper = EarlyStop.from_state_dict(state["stopper"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        history = state["history"]
        start = state["epoch"] + 1
        set_rng_state(state["rng"])
        log.info("fold %d: resumed after epoch %d", data.fold, start)

    sets = data.datasets
    if len(sets["train"]) < cfg.bp_every_iters:
        log.warning("fold %d: %d training patients, fewer than bp_every_iters = %d: one optimizer "
                    "step per epoch over all of them", data.fold, len(sets["train"]), cfg.bp_every_iters)
    diverged = None
    for epoch in range(start, cfg.epochs):
        if stopper.stop:
            break
        t0 = time.perf_counter()
        desc = f"fold {data.fold} epoch {epoch + 1}/{cfg.epochs}"
        step_loss, train_out = train_epoch(model, sets["train"], optimizer, cfg, device, epoch,
                                           scaler, desc, shard)
        val_out = gather_outputs(shard, predict(model, shard.subset(sets["val"]), cfg, device,
                                                f"fold {data.fold} val"))
        val_loss = set_loss(cfg, val_out)
        val_ci = set_cindex(val_out)
        row = {
            "epoch": epoch + 1,
            # the validation loss's formula on the training patients, so the two compare
            "train_loss": set_loss(cfg, train_out),
            "train_step_loss": step_loss,  # what the optimizer minimised (alpha, per group)
            "train_cindex": set_cindex(train_out),
            "val_loss": val_loss,
            "val_cindex": val_ci,
            "lr": optimizer.param_groups[-1]["lr"],
            "seconds": time.perf_counter() - t0,
        }
        history.append(row)
        monitored = monitored_value(cfg, val_loss, val_ci)
        # (a NaN loss makes NaN gradients and so NaN weights; fp16 overflow steps are skipped)
        if not finite_weights(model):
            diverged = f"training diverged in epoch {epoch + 1} (weights became NaN or inf)"
            log.warning("fold %d: %s; training stopped", data.fold, diverged)
            break  # nothing of this epoch is saved: a resume would diverge again
        improved = stopper.update(epoch, monitored)
        if improved and shard.is_main:
            save_checkpoint(next_best, kind="best", run_id=run_id, fold=data.fold, epoch=epoch,
                            model=model.state_dict())
        scheduler.step(monitored)
        log.info(
            "fold %d epoch %d: train loss %.4f c %.3f | val loss %.4f c %.3f | lr %.2e | %.1fs%s",
            data.fold, epoch + 1, row["train_loss"], row["train_cindex"], val_loss, val_ci,
            row["lr"], row["seconds"], " *" if stopper.best_epoch == epoch else "",
        )
        if shard.is_main:
            _save_last(last_path, run_id, data.fold, epoch, model, optimizer, scheduler, stopper,
                       scaler, history)
            if improved:  # its last.pt is written: the waiting weights are the fold's best now
                next_best.replace(best_path)
        if stopper.stop:
            log.info("fold %d: early stop after epoch %d (best %d)", data.fold, epoch + 1,
                     stopper.best_epoch + 1)
            break

    result: dict[str, Any] = {
        "fold": data.fold,
        "status": "ok",
        "best_epoch": stopper.best_epoch + 1,
        "epochs_run": len(history),
        "history": history,
        "bin_edges": list(data.labels.attrs["bin_edges"]),
        "run_id": run_id,
    }
    try:
        result.update(_evaluate_best(cfg, data, model, best_path, stopper, device, run_id, shard))
    except FoldFailed as err:
        reason = f"{err}" + (f"; {diverged}" if diverged else "")
        log.error("fold %d failed: %s", data.fold, reason)
        result.update(status="failed", reason=reason, best_epoch=0)
    if shard.is_main:
        with atomic_write(fold_dir / "result.json") as f:
            json.dump(jsonable(result), f, indent=1)
    return result


def _settle_next_best(next_best: Path, best_path: Path, best_epoch: int, run_id: str, fold: int) -> None:
    """On resume: make a waiting best checkpoint the fold's best.pt if its epoch is the
    recorded best one (the kill came after its last.pt), else drop it (the kill came before)."""
    if not next_best.is_file():
        return
    state = load_checkpoint(next_best, kind="best", run_id=run_id, fold=fold)
    if state["epoch"] == best_epoch:
        next_best.replace(best_path)
    else:
        next_best.unlink()


def _save_last(
    path: Path, run_id: str, fold: int, epoch: int, model: nn.Module,
    optimizer: torch.optim.Optimizer, scheduler: Any, stopper: EarlyStop,
    scaler: torch.amp.GradScaler | None, history: list[dict[str, float]],
) -> None:
    """The resumable state after ``epoch`` (0-based)."""
    save_checkpoint(
        path, kind="last", run_id=run_id, fold=fold, epoch=epoch, model=model.state_dict(),
        optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
        stopper=stopper.state_dict(), scaler=scaler.state_dict() if scaler is not None else None,
        history=history, rng=rng_state(),
    )


def _evaluate_best(
    cfg: TrainConfig, data: FoldData, model: nn.Module, best_path: Path, stopper: EarlyStop,
    device: torch.device, run_id: str, shard: Shard,
) -> dict[str, Any]:
    """Metrics and prediction rows of the fold's best weights on train, val and test.

    Raises:
        FoldFailed: no epoch had a finite monitored value, or the best weights predict NaN/inf.
        CheckpointError: ``best.pt`` is not the best epoch's.
    """
    if stopper.best_epoch < 0:
        raise FoldFailed(f"no epoch had a finite validation {cfg.monitor_metrics}")

    def load_best() -> dict[str, Any]:
        state = load_checkpoint(best_path, kind="best", run_id=run_id, fold=data.fold)
        if state["epoch"] != stopper.best_epoch:
            raise CheckpointError(f"{best_path}: holds epoch {state['epoch'] + 1}, the best epoch "
                                  f"is {stopper.best_epoch + 1}; delete the fold{data.fold} folder "
                                  f"and train fold {data.fold} again")
        return state

    state = shard.from_main(load_best)
    model.load_state_dict(state["model"])
    outputs = {name: gather_outputs(shard, predict(model, shard.subset(ds), cfg, device,
                                                   f"fold {data.fold} eval {name}"))
               for name, ds in data.datasets.items()}
    for name, out in outputs.items():
        bad = int((~torch.isfinite(out.out)).any(dim=1).sum())
        if bad:
            raise FoldFailed(f"the best weights (epoch {stopper.best_epoch + 1}) predict NaN or "
                             f"inf for {bad} of {len(out.patient_ids)} {name} patients")
    bin_edges = np.asarray(data.labels.attrs["bin_edges"])
    report = fold_report(cfg, outputs, bin_edges, data.fold)
    if shard.is_main:
        make_self_contained(best_path, state, cfg, bin_edges, outputs["train"].risk, run_id,
                            data.fold)
    return report


def make_self_contained(best_path: Path, state: dict[str, Any], cfg: TrainConfig,
                         bin_edges: np.ndarray, train_risk: np.ndarray, run_id: str, fold: int) -> None:
    """Write ``best.pt`` with what applying it needs (its ``inference`` record): a fold's
    evaluated best checkpoint is rewritten, a final model's written once.

    Args:
        state: ``{"epoch", "model": state_dict}`` of the weights (CPU tensors).
    """
    from dsca.store import FeatureStore

    attrs = dict(FeatureStore.open(cfg.store).attrs)
    save_checkpoint(best_path, kind="best", run_id=run_id, fold=fold, epoch=state["epoch"],
                    model=state["model"],
                    inference=inference_record(cfg, bin_edges, train_risk, attrs, len(train_risk)))
