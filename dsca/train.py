"""Cross-validated survival training of DSCA from a `dsca-store` store.

One patient per forward pass; the optimizer steps every ``bp_every_iters`` patients. For the
discrete NLL the group loss is a mean of per-patient terms, so each patient's term is
back-propagated at once, scaled by ``1 / group size``: the summed gradients equal those of the
group's mean loss while only one patient's autograd graph is alive. The Cox partial likelihood
couples the patients of a group through the risk set, so its outputs are held until the group
is complete. When the training set is not a multiple of the group size, the last, incomplete
group of an epoch is by default only forwarded (its outputs count for the training C-index) and
never back-propagated, as in the reference (``last_group: drop``; the shuffle puts different
patients there every epoch); ``last_group: step`` steps it too, its loss the mean over its own
patients.

Per epoch: train, evaluate the validation set, ReduceLROnPlateau and early stopping on the
validation loss (alpha = 0), keep the best weights. After training the best weights are
evaluated on train/val/test; the training patients are the censoring reference of the IPCW
metrics, and their median risk splits every part into high/low risk groups (the threshold a
deployed model would use). A fold whose model diverges (NaN/inf weights or predictions) is
recorded as failed with its reason; the other folds go on. Everything lands in the output
folder (its rules: ``dsca.rundir``):

    metrics.json            summary (mean/std over finished folds, pooled risk groups) +
                            per-fold metrics (MUST format)
    predictions.csv         fold, split, patient_id, t, e, y_t, risk, risk_group, surv_1..K
                            (or log_hazard); unless save_prediction is false
    train.log               the log of the run
    config.yaml, run.json   the parsed configuration; the run's id and the config it started with
    training_curves.png     loss and C-index per epoch and fold
    km_test.png             Kaplan-Meier of the risk groups of the test patients of all folds
    fold<k>/last.pt         resumable state; fold<k>/best.pt best weights (``dsca.checkpoint``);
    fold<k>/result.json     the fold's metrics, history and predictions
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import os
import random
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dsca.atomic import atomic_write
from dsca.checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from dsca.config import ConfigError, TrainConfig
from dsca.labels import load_labels, patient_slides, rebin
from dsca.losses import cox_nll, discrete_nll, l1_penalty, risk_score, survival_curve
from dsca.metrics import (
    concordance_index,
    evaluate_predictions,
    hazard_ratio,
    logrank_test,
    split_at_training_median,
)
from dsca.optim import build_optimizer
from dsca.rundir import NEXT_BEST, RunDir, open_run_dir
from dsca.splits import Split, load_split, resolve_split_paths

__all__ = ["train_cross_validation", "train_fold", "FoldData", "FoldFailed", "accumulate_group"]

log = logging.getLogger(__name__)

_LABEL_T, _LABEL_E, _LABEL_YT, _LABEL_YC = 0, 1, 2, 3


@dataclass
class FoldData:
    """Datasets of one fold and the labels they were built with."""

    fold: int
    split: Split
    labels: pd.DataFrame
    datasets: dict[str, Dataset]


@dataclass
class _Outputs:
    """Model outputs of a set of patients. ``out`` [P, K] hazards or [P, 1] Cox log hazards."""

    patient_ids: list[str]
    out: torch.Tensor
    label: torch.Tensor  # [P, 4] (t, e, y_t, y_c)

    @property
    def risk(self) -> np.ndarray:
        """[P] risk score (higher = shorter survival), float64 so that every threshold and
        rank computed from it agrees."""
        return risk_score(self.out.double()).numpy()


@dataclass
class _EarlyStop:
    """Early stopping and best-checkpoint choice, with the reference's rules.

    Before ``warmup`` epochs nothing is recorded. An epoch whose value is at least as good as
    the best so far (ties included) becomes the best and resets the count of bad epochs; any
    other epoch (and a NaN) counts as bad. Training stops once ``patience`` bad epochs follow the best
    one, but never at or before epoch ``start_epoch`` (0-based).
    """

    patience: int | None
    warmup: int
    start_epoch: int
    mode: str  # "min" or "max"
    best: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0
    stopped: bool = False

    def update(self, epoch: int, value: float) -> bool:
        """Record an epoch's monitored value; True when it is the best so far."""
        if epoch < self.warmup:
            return False
        # (a NaN is never the best: the reference would keep a diverged model's weights)
        worse = value != value or (
            self.best is not None and (value > self.best if self.mode == "min" else value < self.best)
        )
        if not worse:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        if self.patience is not None and self.bad_epochs >= self.patience and epoch > self.start_epoch:
            self.stopped = True
        return False

    @property
    def stop(self) -> bool:
        return self.stopped


# ---------------------------------------------------------------------------------------------
# data


def _collate_one(batch: list[Any]) -> Any:
    return batch[0]


def _loader(dataset: Dataset, cfg: TrainConfig, **kwargs: Any) -> DataLoader:
    """One patient per item; ``num_workers`` capped at the CPUs this process may use (the
    reference config asks for 8, which on a small machine only adds processes), and 0 with
    ``cache_features`` (the cache lives in this process: workers would fill copies of it that
    die with them at the end of every epoch)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = 0 if cfg.cache_features else min(cfg.num_workers, cpus)
    return DataLoader(dataset, batch_size=1, num_workers=workers, collate_fn=_collate_one, **kwargs)


def _to_inputs(sample: Any, device: torch.device, position_emb: bool) -> tuple[torch.Tensor, ...]:
    """PatientSample -> (x20 [1,16N,D], x5 [1,N,D], coords [1,N,2] or None, label [4])."""
    x20 = sample.x20.unsqueeze(0).to(device, non_blocking=True)
    x5 = sample.x5.unsqueeze(0).to(device, non_blocking=True)
    coords = sample.coords.unsqueeze(0).to(device) if position_emb else None
    # float64: decimal times must compare equal to the same times in the labels and metrics
    return x20, x5, coords, torch.as_tensor(sample.label, dtype=torch.float64)


class _CachedDataset(Dataset):
    """Keeps samples in a dict shared across folds (the store is read once per patient)."""

    def __init__(
        self, base: Dataset, keys: list[tuple[str, tuple[float, ...]]],
        cache: dict[tuple[str, tuple[float, ...]], Any],
    ) -> None:
        self.base = base
        self.cache = cache
        self.keys = keys  # (patient id, label): a rebinned fold must not reuse another's label

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> Any:
        key = self.keys[i]
        if key not in self.cache:
            self.cache[key] = self.base[i]
        return self.cache[key]


def build_fold_data(
    cfg: TrainConfig, labels: pd.DataFrame, fold: int, split_path: Path,
    store_slides: Collection[str],
    cache: dict[tuple[str, tuple[float, ...]], Any] | None = None,
) -> FoldData:
    """Read a fold's split, check it against the labels and the store's complete slides
    (``store_slides``), and build its datasets."""
    from dsca.store import PatientDataset

    split = load_split(split_path, known_patients=labels.index)
    fold_labels = rebin(labels, split.train) if cfg.bin_cut == "train" else labels
    datasets: dict[str, Dataset] = {}
    for name, ids in split.parts().items():
        if not ids:
            continue
        mapping = patient_slides(fold_labels, ids, store_slides, store_name=str(cfg.store))
        ds: Dataset = PatientDataset(cfg.store, mapping, labels=fold_labels)
        if cache is not None:
            lab = fold_labels.loc[list(mapping), ["t", "e", "y_t", "y_c"]].to_numpy(float)
            keys = [(p, tuple(row)) for p, row in zip(mapping, lab)]
            ds = _CachedDataset(ds, keys, cache)
        datasets[name] = ds
    if "train" not in datasets or "val" not in datasets:
        raise ValueError(f"{split_path}: fold {fold} needs non-empty train and val patients")
    if cfg.monitor_metrics == "ci":
        val = fold_labels.loc[split.val]
        if np.isnan(concordance_index(val["t"], val["e"], np.zeros(len(val)))):
            raise ValueError(
                f"{split_path}: fold {fold}'s {len(val)} validation patients ({int(val['e'].sum())} "
                "events) have no comparable pair, so monitor_metrics: ci cannot pick an epoch; "
                "use monitor_metrics: loss or a larger validation set")
    return FoldData(fold=fold, split=split, labels=fold_labels, datasets=datasets)


# ---------------------------------------------------------------------------------------------
# steps


def _autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    if device.type != "cuda" or amp == "off":
        return contextlib.nullcontext()
    if amp == "auto":
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def accumulate_group(
    model: nn.Module,
    inputs: Iterable[tuple[torch.Tensor, ...]],
    group_size: int,
    cfg: TrainConfig,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[float | None, torch.Tensor, torch.Tensor]:
    """Forward/backward one optimizer group of patients into ``.grad`` (no optimizer step).

    Discrete head: each patient's loss, divided by ``group_size``, is back-propagated right
    after its forward pass, so one autograd graph is alive at a time and the summed gradients
    are those of the group's mean loss. Cox head: the group's log hazards are held and the
    partial likelihood is back-propagated once; a group without an event contributes no
    gradient (as the reference). The L1 penalty is added once per group.

    Args:
        model: the network (train mode set by the caller).
        inputs: ``group_size`` items ``(x20 [1,16N,D], x5 [1,N,D], coords [1,N,2] | None,
            label [4])``; may be a lazy iterator (patients are loaded one at a time).
        group_size: number of patients in the group.
        cfg: training configuration (loss, alpha, reg_l1, cox_ties).
        autocast: factory of the mixed-precision context.
        scaler: fp16 gradient scaler, or None.

    Returns:
        (group loss without the L1 term, None for a skipped Cox group; detached outputs
        [G, K] on CPU; labels [G, 4]).
    """
    scale = scaler.scale if scaler is not None else (lambda loss: loss)
    outs: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    total = 0.0
    for x20, x5, coords, label in inputs:
        with autocast():
            out = model(x20, x5, coords)
        out = out.float()
        labels.append(label)
        if cfg.is_cox:
            outs.append(out)
            continue
        label = label.to(out.device)
        loss = discrete_nll(out, label[None, _LABEL_YT], label[None, _LABEL_YC], alpha=cfg.alpha)
        scale(loss / group_size).backward()
        total += float(loss.detach()) / group_size
        outs.append(out.detach())
    lab = torch.stack(labels)
    detached = torch.cat([o.detach() for o in outs]).cpu()
    if cfg.is_cox:
        if lab[:, _LABEL_E].sum() == 0:
            return None, detached, lab
        out = torch.cat(outs)
        dev_lab = lab.to(out.device)
        loss = cox_nll(out, dev_lab[:, _LABEL_E], dev_lab[:, _LABEL_T], ties=cfg.cox_ties)
        scale(loss).backward()
        total = float(loss.detach())
    penalty = l1_penalty(model.parameters(), cfg.reg_l1)
    if isinstance(penalty, torch.Tensor):
        scale(penalty).backward()
    return total, detached, lab


@torch.no_grad()
def _forward_only(
    model: nn.Module,
    inputs: Iterable[tuple[torch.Tensor, ...]],
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-mode outputs of patients that are not back-propagated (a dropped last group).

    Args:
        inputs: items ``(x20 [1,16N,D], x5 [1,N,D], coords [1,N,2] | None, label [4])``.

    Returns:
        outputs [G, K] on CPU and labels [G, 4].
    """
    outs, labels = [], []
    for x20, x5, coords, label in inputs:
        with autocast():
            outs.append(model(x20, x5, coords).float().cpu())
        labels.append(label)
    return torch.cat(outs), torch.stack(labels)


def _set_loss(cfg: TrainConfig, outputs: _Outputs) -> float:
    """Evaluation loss of a whole set: NLL with alpha = 0, or the Cox loss over the set."""
    lab = outputs.label
    if cfg.is_cox:
        return float(cox_nll(outputs.out, lab[:, _LABEL_E], lab[:, _LABEL_T], ties=cfg.cox_ties))
    return float(discrete_nll(outputs.out, lab[:, _LABEL_YT], lab[:, _LABEL_YC], alpha=0.0))


@torch.no_grad()
def _predict(
    model: nn.Module, dataset: Dataset, cfg: TrainConfig, device: torch.device, desc: str
) -> _Outputs:
    model.eval()
    loader = _loader(dataset, cfg)
    ids, outs, labels = [], [], []
    for sample in tqdm(loader, desc=desc, leave=False, disable=None):
        x20, x5, coords, label = _to_inputs(sample, device, cfg.position_emb)
        with _autocast(device, cfg.amp):
            out = model(x20, x5, coords)
        ids.append(str(sample.patient_id))
        outs.append(out.float().cpu())
        labels.append(label)
    return _Outputs(ids, torch.cat(outs), torch.stack(labels))


def _groups(n: int, size: int) -> list[int]:
    """Group size of each of ``n`` patients' groups: [size, size, ..., remainder]."""
    return [min(size, n - start) for start in range(0, n, size)]


def _train_epoch(
    model: nn.Module,
    dataset: Dataset,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    device: torch.device,
    epoch: int,
    scaler: torch.amp.GradScaler | None,
    desc: str,
) -> tuple[float, _Outputs]:
    """One epoch; returns (mean group loss, the training outputs collected on the way)."""
    model.train()
    # Shuffle order depends on (seed, epoch) only, so a resumed run sees the same order.
    generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    loader = _loader(dataset, cfg, shuffle=True, generator=generator)
    bar = tqdm(total=len(dataset), desc=desc, leave=False, disable=None)
    ids: list[str] = []

    def lazy(it: Iterator[Any], n: int) -> Iterator[tuple[torch.Tensor, ...]]:
        for sample in itertools.islice(it, n):
            ids.append(str(sample.patient_id))
            bar.update(1)
            yield _to_inputs(sample, device, cfg.position_emb)

    autocast = functools.partial(_autocast, device, cfg.amp)
    samples = iter(loader)
    losses, outs, labels = [], [], []
    optimizer.zero_grad(set_to_none=True)
    for size in _groups(len(dataset), cfg.bp_every_iters):
        # (a training set smaller than one group is stepped: there would be no step otherwise)
        if size < cfg.bp_every_iters and cfg.last_group == "drop" and len(dataset) > size:
            out, lab = _forward_only(model, lazy(samples, size), autocast)
            outs.append(out)
            labels.append(lab)
            continue
        loss, out, lab = accumulate_group(model, lazy(samples, size), size, cfg, autocast, scaler)
        outs.append(out)
        labels.append(lab)
        if loss is None:
            log.debug("%s: group without events skipped (Cox)", desc)
            optimizer.zero_grad(set_to_none=True)
            continue
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss)
        bar.set_postfix(loss=f"{loss:.4f}")
    bar.close()
    avg = float(np.mean(losses)) if losses else float("nan")
    return avg, _Outputs(ids, torch.cat(outs), torch.cat(labels))


# ---------------------------------------------------------------------------------------------
# one fold


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; errors clearly when cuda is asked but absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return device


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _monitored(cfg: TrainConfig, loss: float, cindex: float) -> float:
    return cindex if cfg.monitor_metrics == "ci" else loss


class FoldFailed(Exception):
    """A fold produced no usable model (NaN/inf outputs); the other folds go on."""


def _finite_weights(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def train_fold(
    cfg: TrainConfig, data: FoldData, fold_dir: Path, device: torch.device, run_id: str,
    resume: bool = False,
) -> dict[str, Any]:
    """Train one fold, evaluate its best weights on every split part, write ``fold_dir``.

    Returns:
        ``{"fold", "status": "ok", "best_epoch", "epochs_run", "history", "bin_edges",
        "train"/"val"/"test": metrics, "predictions": rows}``, or for a fold whose model
        diverged ``{"fold", "status": "failed", "reason", "history", ...}``.

    Raises:
        CheckpointError: ``last.pt`` (with ``resume``) or ``best.pt`` cannot be used.
    """
    from dsca import build_model

    fold_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path = fold_dir / "last.pt", fold_dir / "best.pt"
    # A new best epoch's weights wait here until that epoch's last.pt is written: a kill in
    # between must not leave best.pt one epoch ahead of the state a resume continues from.
    next_best = fold_dir / NEXT_BEST
    _seed_everything(cfg.seed)
    model = build_model(cfg.model).to(device)
    optimizer = build_optimizer(model, cfg.opt, cfg.lr, cfg.weight_decay, cfg.opt_eps, cfg.opt_betas)
    mode = "max" if cfg.monitor_metrics == "ci" else "min"
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode=mode, factor=cfg.lr_factor, patience=cfg.lr_patience
    )
    stopper = _EarlyStop(cfg.es_patience, cfg.es_warmup, cfg.es_start_epoch, mode)
    use_fp16 = device.type == "cuda" and (
        cfg.amp == "fp16" or (cfg.amp == "auto" and not torch.cuda.is_bf16_supported())
    )
    scaler = torch.amp.GradScaler("cuda") if use_fp16 else None
    history: list[dict[str, float]] = []
    start = 0
    if resume and last_path.is_file():
        state = load_checkpoint(last_path, kind="last", run_id=run_id, fold=data.fold)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        stopper = _EarlyStop(**state["stopper"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        history = state["history"]
        start = state["epoch"] + 1
        set_rng_state(state["rng"])
        _settle_best(next_best, best_path, stopper.best_epoch, run_id, data.fold)
        log.info("fold %d: resumed after epoch %d", data.fold, start)
    else:
        # a fold started afresh (also one that failed before) keeps nothing of an earlier try
        for stale in (last_path, best_path, next_best, fold_dir / "result.json"):
            stale.unlink(missing_ok=True)

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
        step_loss, train_out = _train_epoch(model, sets["train"], optimizer, cfg, device, epoch, scaler, desc)
        val_out = _predict(model, sets["val"], cfg, device, f"fold {data.fold} val")
        val_loss = _set_loss(cfg, val_out)
        val_ci = _cindex(val_out)
        row = {
            "epoch": epoch + 1,
            # the validation loss's formula on the training patients, so the two compare
            "train_loss": _set_loss(cfg, train_out),
            "train_step_loss": step_loss,  # what the optimizer minimised (alpha, per group)
            "train_cindex": _cindex(train_out),
            "val_loss": val_loss,
            "val_cindex": val_ci,
            "lr": optimizer.param_groups[-1]["lr"],
            "seconds": time.perf_counter() - t0,
        }
        history.append(row)
        monitored = _monitored(cfg, val_loss, val_ci)
        # (a NaN loss makes NaN gradients and so NaN weights; fp16 overflow steps are skipped)
        if not _finite_weights(model):
            diverged = f"training diverged in epoch {epoch + 1} (weights became NaN or inf)"
            log.warning("fold %d: %s; training stopped", data.fold, diverged)
            break  # nothing of this epoch is saved: a resume would diverge again
        improved = stopper.update(epoch, monitored)
        if improved:
            save_checkpoint(next_best, kind="best", run_id=run_id, fold=data.fold, epoch=epoch,
                            model=model.state_dict())
        scheduler.step(monitored)
        log.info(
            "fold %d epoch %d: train loss %.4f c %.3f | val loss %.4f c %.3f | lr %.2e | %.1fs%s",
            data.fold, epoch + 1, row["train_loss"], row["train_cindex"], val_loss, val_ci,
            row["lr"], row["seconds"], " *" if stopper.best_epoch == epoch else "",
        )
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
        result.update(_evaluate_best(cfg, data, model, best_path, stopper, device, run_id))
    except FoldFailed as err:
        reason = f"{err}" + (f"; {diverged}" if diverged else "")
        log.error("fold %d failed: %s", data.fold, reason)
        result.update(status="failed", reason=reason, best_epoch=0)
    with atomic_write(fold_dir / "result.json") as f:
        json.dump(_jsonable(result), f, indent=1)
    return result


def _settle_best(next_best: Path, best_path: Path, best_epoch: int, run_id: str, fold: int) -> None:
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
    optimizer: torch.optim.Optimizer, scheduler: Any, stopper: _EarlyStop,
    scaler: torch.amp.GradScaler | None, history: list[dict[str, float]],
) -> None:
    """The resumable state after ``epoch`` (0-based)."""
    save_checkpoint(
        path, kind="last", run_id=run_id, fold=fold, epoch=epoch, model=model.state_dict(),
        optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
        stopper=vars(stopper).copy(), scaler=scaler.state_dict() if scaler is not None else None,
        history=history, rng=rng_state(),
    )


def _evaluate_best(
    cfg: TrainConfig, data: FoldData, model: nn.Module, best_path: Path, stopper: _EarlyStop,
    device: torch.device, run_id: str,
) -> dict[str, Any]:
    """Metrics and prediction rows of the fold's best weights on train, val and test.

    The training patients' outputs come first: they are the censoring reference of the IPCW
    metrics and give the median risk that splits every part into risk groups.

    Raises:
        FoldFailed: no epoch had a finite monitored value, or the best weights predict NaN/inf.
    """
    if stopper.best_epoch < 0:
        raise FoldFailed(f"no epoch had a finite validation {cfg.monitor_metrics}")
    state = load_checkpoint(best_path, kind="best", run_id=run_id, fold=data.fold)
    if state["epoch"] != stopper.best_epoch:
        raise CheckpointError(f"{best_path}: holds epoch {state['epoch'] + 1}, the best epoch is "
                              f"{stopper.best_epoch + 1}; delete the fold{data.fold} folder and "
                              f"train fold {data.fold} again")
    model.load_state_dict(state["model"])
    outputs = {name: _predict(model, ds, cfg, device, f"fold {data.fold} eval {name}")
               for name, ds in data.datasets.items()}
    for name, out in outputs.items():
        bad = int((~torch.isfinite(out.out)).any(dim=1).sum())
        if bad:
            raise FoldFailed(f"the best weights (epoch {stopper.best_epoch + 1}) predict NaN or "
                             f"inf for {bad} of {len(out.patient_ids)} {name} patients")
    train = outputs["train"]
    train_lab = train.label.numpy()
    result: dict[str, Any] = {"train_risk_median": float(np.median(train.risk))}
    rows = []
    for name, out in outputs.items():
        high = split_at_training_median(train.risk, out.risk)
        result[name] = _metrics(cfg, out, data.labels, train_lab, high)
        rows.extend(_prediction_rows(cfg, data.fold, name, out, high))
    result["predictions"] = rows
    return result


def _cindex(outputs: _Outputs) -> float:
    """C-index of a set; NaN when an output is not finite (a diverging model)."""
    if not bool(torch.isfinite(outputs.out).all()):
        return float("nan")
    lab = outputs.label.numpy()
    return concordance_index(lab[:, _LABEL_T], lab[:, _LABEL_E], outputs.risk)


def _metrics(
    cfg: TrainConfig, outputs: _Outputs, labels: pd.DataFrame, train_label: np.ndarray,
    high: np.ndarray,
) -> dict[str, float]:
    """All metrics of one part; the training patients [M, 4] are the censoring reference;
    ``high`` [P] the high-risk group."""
    lab = outputs.label.numpy()
    survival = None if cfg.is_cox else survival_curve(outputs.out).numpy()
    time, event = lab[:, _LABEL_T], lab[:, _LABEL_E]
    out = evaluate_predictions(
        time, event, lab[:, _LABEL_YT], outputs.risk,
        survival=survival, bin_edges=np.asarray(labels.attrs["bin_edges"]),
        n_boot=cfg.eval_bootstrap,
        train_time=train_label[:, _LABEL_T], train_event=train_label[:, _LABEL_E],
    )
    out.update(_risk_group_metrics(time, event, high))
    out["loss"] = _set_loss(cfg, outputs)
    return out


def _risk_group_metrics(time: np.ndarray, event: np.ndarray, high: np.ndarray) -> dict[str, float]:
    """Log-rank p and hazard ratio (with 95% CI) of high vs low risk."""
    _, p = logrank_test(time, event, high)
    hr = hazard_ratio(time, event, high)
    return {"n_high_risk": int(high.sum()), "logrank_p": p, "hazard_ratio": hr.hr,
            "hazard_ratio_ci_low": hr.ci_low, "hazard_ratio_ci_high": hr.ci_high}


def _prediction_rows(
    cfg: TrainConfig, fold: int, part: str, outputs: _Outputs, high: np.ndarray
) -> list[dict[str, Any]]:
    lab = outputs.label.numpy()
    risk = outputs.risk
    extra = outputs.out.numpy() if cfg.is_cox else survival_curve(outputs.out).numpy()
    names = ["log_hazard"] if cfg.is_cox else [f"surv_{k + 1}" for k in range(extra.shape[1])]
    rows = []
    for i, pid in enumerate(outputs.patient_ids):
        row = {"fold": fold, "split": part, "patient_id": pid, "t": float(lab[i, _LABEL_T]),
               "e": int(lab[i, _LABEL_E]), "y_t": int(lab[i, _LABEL_YT]), "risk": float(risk[i]),
               "risk_group": "high" if high[i] else "low"}
        row.update({n: float(v) for n, v in zip(names, extra[i])})
        rows.append(row)
    return rows


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


# ---------------------------------------------------------------------------------------------
# cross-validation


def train_cross_validation(
    cfg: TrainConfig,
    out_dir: str | Path,
    folds: Sequence[int] | None = None,
    device: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run the folds, write the outputs (module docstring) and return the metrics.json content.

    Args:
        cfg: parsed configuration.
        out_dir: output folder: empty or absent for a new run (see :mod:`dsca.rundir`).
        folds: fold numbers to run (default ``cfg.folds``).
        device: overrides ``cfg.device``.
        resume: continue the run in ``out_dir``: finished folds are kept, the running fold
            continues from its last epoch, other folds are added; the summary covers them all.
        overwrite: replace the run in ``out_dir``.

    Raises:
        RunDirError, CheckpointError, ConfigError and the input errors of the labels, splits
        and store, all before anything is trained (a checkpoint error: when its fold starts).
    """
    from dsca.plots import plot_training_curves

    out = Path(out_dir)
    folds = list(cfg.folds if folds is None else folds)
    dev = resolve_device(device or cfg.device)
    # Check every fold's inputs before writing anything or spending hours on the first fold.
    labels = load_labels(cfg.labels, bins=cfg.bins, columns=cfg.labels_map)
    split_paths = resolve_split_paths(cfg.splits, folds)
    store_slides = _open_store(cfg)
    cache: dict[tuple[str, tuple[float, ...]], Any] | None = {} if cfg.cache_features else None
    fold_data = [build_fold_data(cfg, labels, k, p, store_slides, cache)
                 for k, p in zip(folds, split_paths)]

    run = open_run_dir(out, cfg.to_dict(), resume=resume, overwrite=overwrite)
    with _log_to_file(out / "train.log", append=run.resumed), _threads(cfg.num_threads):
        with atomic_write(out / "config.yaml") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
        log.info("training fold(s) %s on %s; outputs in %s", ",".join(map(str, folds)), dev, out)
        for data in fold_data:
            done = _read_result(run, data.fold)
            if done is not None and done.get("status") == "ok":
                log.info("fold %d: finished earlier, skipped", data.fold)
                continue
            if done is not None:
                log.info("fold %d: failed earlier (%s); trained again", data.fold, done.get("reason"))
            train_fold(cfg, data, run.fold_dir(data.fold), dev, run.run_id,
                       resume=run.resumed and done is None)
        results = _finished_results(run)
        report = _report(results)
        preds = pd.DataFrame([r for res in results for r in res.get("predictions", [])])
        if cfg.save_prediction and len(preds):
            with atomic_write(out / "predictions.csv") as f:
                preds.to_csv(f, index=False)
        ok = [res for res in results if res["status"] == "ok"]
        plot_training_curves([res["history"] for res in results], [res["fold"] for res in results],
                             [res["best_epoch"] for res in results], out / "training_curves.png",
                             title=f"{out.name}: training curves")
        report["summary"].update(_pooled_risk_groups(cfg, preds, out, len(ok)))
        with atomic_write(out / "metrics.json") as f:
            json.dump(_jsonable(report), f, indent=1)
        s = report["summary"]
        log.info("test C-index %.3f +- %.3f over %d fold(s)%s", s["test_cindex_mean"],
                 s["test_cindex_std"], s["n_folds"],
                 f"; {s['n_folds_failed']} fold(s) failed" if s["n_folds_failed"] else "")
        return report


def _read_result(run: RunDir, fold: int) -> dict[str, Any] | None:
    """The fold's result.json when this run wrote it; None when absent or another run's."""
    path = run.fold_dir(fold) / "result.json"
    try:
        result = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        log.warning("%s: unreadable (%s); the fold is trained again", path, err)
        return None
    if not isinstance(result, dict) or result.get("run_id") != run.run_id or result.get("fold") != fold:
        return None
    return result


def _finished_results(run: RunDir) -> list[dict[str, Any]]:
    """Every fold of this run that has a result, in fold order."""
    found = (_read_result(run, fold) for fold in run.folds())
    return [result for result in found if result is not None]


def _pooled_risk_groups(cfg: TrainConfig, preds: pd.DataFrame, out: Path, n_ok: int) -> dict[str, Any]:
    """KM plot, log-rank and hazard ratio of the test patients of all folds, each placed in a
    risk group by its own fold model's training median."""
    from dsca.plots import plot_km

    test = preds[preds["split"] == "test"] if len(preds) else preds
    if not len(test):
        return {}
    time, event = test["t"].to_numpy(float), test["e"].to_numpy(int)
    high = (test["risk_group"] == "high").to_numpy()
    found = _risk_group_metrics(time, event, high)
    hr = found["hazard_ratio"]
    annotation = f"log-rank p = {found['logrank_p']:.2g}; HR {hr:.2f} " \
                 f"({found['hazard_ratio_ci_low']:.2f}-{found['hazard_ratio_ci_high']:.2f})"
    plot_km(time, event, high, out / "km_test.png", time_unit=cfg.time_unit,
            title=f"{out.name}: test patients of {n_ok} fold(s), split at each fold model's "
                  "training median risk",
            annotation=annotation)
    return {f"test_pooled_{k}": v for k, v in found.items()}


def _open_store(cfg: TrainConfig) -> set[str]:
    """The store's complete slide ids, after checking that its features fit the model.

    Raises:
        ConfigError: the store cannot be opened, or its feature size is not ``dims[0]``.
    """
    from dsca.store import FeatureStore, StoreError

    try:
        store = FeatureStore.open(cfg.store)
        feature_dim = store.feature_dim
    except StoreError as err:
        raise ConfigError(f"{cfg.source}: store: {err}") from None
    if feature_dim != cfg.model.dims[0]:
        raise ConfigError(
            f"{cfg.source}: the store {cfg.store} holds {feature_dim}-dim features but dims "
            f"starts with {cfg.model.dims[0]} (dims = input-embedding-hidden-output sizes)"
        )
    return set(store.slide_ids)


@contextlib.contextmanager
def _log_to_file(path: Path, append: bool) -> Iterator[None]:
    """Copy the package's INFO log into ``path`` without making the console chattier."""
    handler = logging.FileHandler(path, mode="a" if append else "w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    dsca_log = logging.getLogger("dsca")
    old_level = dsca_log.level
    console_level = dsca_log.getEffectiveLevel()
    raised = []
    if console_level > logging.INFO:
        # Records now pass the logger at INFO: keep the console handlers at their old level.
        for h in logging.getLogger().handlers:
            if h.level < console_level:
                raised.append((h, h.level))
                h.setLevel(console_level)
        dsca_log.setLevel(logging.INFO)
    dsca_log.addHandler(handler)
    try:
        yield
    finally:
        dsca_log.removeHandler(handler)
        handler.close()
        dsca_log.setLevel(old_level)
        for h, level in raised:
            h.setLevel(level)


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """Run with ``n`` torch CPU threads (0 = leave as is), restoring the count afterwards."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# Per-fold values that a mean over folds would misrepresent: counts, and interval bounds (the
# mean of per-fold bounds is no interval of anything).
# p-values and hazard ratios have no meaningful arithmetic mean: they are reported per fold
# and pooled (test_pooled_*).
_NOT_AVERAGED = frozenset({"n", "n_events", "n_high_risk", "cindex_boot_n", "cindex_ci_low",
                           "cindex_ci_high", "hazard_ratio_ci_low", "hazard_ratio_ci_high",
                           "logrank_p", "hazard_ratio"})


def _report(results: list[dict[str, Any]]) -> dict[str, Any]:
    """metrics.json content: mean/std over the finished folds of every per-fold metric."""
    ok = [r for r in results if r.get("status") == "ok"]
    failed = [{"fold": r["fold"], "reason": r.get("reason", "")} for r in results
              if r.get("status") != "ok"]
    summary: dict[str, Any] = {"n_folds": len(ok), "n_folds_failed": len(failed),
                               "folds_run": [r["fold"] for r in ok]}
    if failed:
        summary["failed_folds"] = failed
    for part in ("test", "val", "train"):
        have = [r[part] for r in ok if r.get(part)]
        keys = [k for k in (have[0] if have else {}) if k not in _NOT_AVERAGED]
        for key in keys:
            vals = np.array([h[key] for h in have if h.get(key) is not None], dtype=float)
            vals = vals[np.isfinite(vals)]
            if not len(vals):
                continue
            # Population std over folds, as the reference reports it.
            summary[f"{part}_{key}_mean"] = float(vals.mean())
            summary[f"{part}_{key}_std"] = float(vals.std())
    if "test_cindex_mean" not in summary:
        summary["test_cindex_mean"] = summary["test_cindex_std"] = float("nan")
    folds = [{k: v for k, v in r.items() if k != "predictions"} for r in results]
    return {"summary": summary, "folds": folds}
