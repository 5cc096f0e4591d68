"""The per-patient steps: one optimizer group's gradients, one training epoch, predictions.

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
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from dsca.config import TrainConfig
from dsca.losses import cox_nll, discrete_nll, l1_penalty
from dsca.train.data import patient_loader, to_model_inputs
from dsca.train.device import autocast_context
from dsca.train.outputs import LABEL_E, LABEL_T, LABEL_YC, LABEL_YT, Outputs

__all__ = ["ModelInputs", "accumulate_group", "forward_only", "group_sizes", "predict", "train_epoch"]

log = logging.getLogger(__name__)

#: Item of a group: ``(x20 [1,16N,D], x5 [1,N,D], coords [1,N,2] | None, label [4])``.
ModelInputs = tuple[torch.Tensor, ...]


def accumulate_group(
    model: nn.Module,
    inputs: Iterable[ModelInputs],
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
            label [4])``; may be an iterator that loads the patients one at a time.
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
        loss = discrete_nll(out, label[None, LABEL_YT], label[None, LABEL_YC], alpha=cfg.alpha)
        scale(loss / group_size).backward()
        total += float(loss.detach()) / group_size
        outs.append(out.detach())
    lab = torch.stack(labels)
    detached = torch.cat([o.detach() for o in outs]).cpu()
    if cfg.is_cox:
        if lab[:, LABEL_E].sum() == 0:
            return None, detached, lab
        out = torch.cat(outs)
        dev_lab = lab.to(out.device)
        loss = cox_nll(out, dev_lab[:, LABEL_E], dev_lab[:, LABEL_T], ties=cfg.cox_ties)
        scale(loss).backward()
        total = float(loss.detach())
    penalty = l1_penalty(model.parameters(), cfg.reg_l1)
    if isinstance(penalty, torch.Tensor):
        scale(penalty).backward()
    return total, detached, lab


@torch.no_grad()
def forward_only(
    model: nn.Module,
    inputs: Iterable[ModelInputs],
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


@torch.no_grad()
def predict(
    model: nn.Module, dataset: Dataset, cfg: TrainConfig, device: torch.device, desc: str
) -> Outputs:
    """Eval-mode outputs of every patient of ``dataset``, in its order (``desc`` labels the bar)."""
    model.eval()
    loader = patient_loader(dataset, cfg)
    ids, outs, labels = [], [], []
    for sample in tqdm(loader, desc=desc, leave=False, disable=None):
        x20, x5, coords, label = to_model_inputs(sample, device, cfg.position_emb)
        with autocast_context(device, cfg.amp):
            out = model(x20, x5, coords)
        ids.append(str(sample.patient_id))
        outs.append(out.float().cpu())
        labels.append(label)
    return Outputs(ids, torch.cat(outs), torch.stack(labels))


def group_sizes(n: int, size: int) -> list[int]:
    """Group size of each of ``n`` patients' groups: [size, size, ..., remainder]."""
    return [min(size, n - start) for start in range(0, n, size)]


def train_epoch(
    model: nn.Module,
    dataset: Dataset,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    device: torch.device,
    epoch: int,
    scaler: torch.amp.GradScaler | None,
    desc: str,
) -> tuple[float, Outputs]:
    """One epoch; returns (mean group loss, the training outputs collected on the way)."""
    model.train()
    # Shuffle order depends on (seed, epoch) only, so a resumed run sees the same order.
    generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    loader = patient_loader(dataset, cfg, shuffle=True, generator=generator)
    bar = tqdm(total=len(dataset), desc=desc, leave=False, disable=None)
    ids: list[str] = []
    samples = iter(loader)

    def next_patients(n: int) -> Iterator[ModelInputs]:
        """The loader's next ``n`` patients as model inputs, read only when the step asks for
        them; records their ids and advances the bar."""
        for sample in itertools.islice(samples, n):
            ids.append(str(sample.patient_id))
            bar.update(1)
            yield to_model_inputs(sample, device, cfg.position_emb)

    autocast = functools.partial(autocast_context, device, cfg.amp)
    losses, outs, labels = [], [], []
    optimizer.zero_grad(set_to_none=True)
    for size in group_sizes(len(dataset), cfg.bp_every_iters):
        # (a training set smaller than one group is stepped: there would be no step otherwise)
        if size < cfg.bp_every_iters and cfg.last_group == "drop" and len(dataset) > size:
            out, lab = forward_only(model, next_patients(size), autocast)
            outs.append(out)
            labels.append(lab)
            continue
        loss, out, lab = accumulate_group(model, next_patients(size), size, cfg, autocast, scaler)
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
    return avg, Outputs(ids, torch.cat(outs), torch.cat(labels))

