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

Dropout draws its masks from the global generators (CPU masks, ``F.dropout`` and fused
attention on CUDA, ``nn.Dropout`` of the Nystromformer alike). Each training forward runs
with them forked and seeded from (seed, epoch, the patient's position in the epoch's order)
(:func:`patient_rng`), so a patient's masks do not depend on which patients came before it
or on which rank runs it: K ranks that split a group (:mod:`dsca.train.distributed`) draw
the masks one process draws.
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
from dsca.train.distributed import SINGLE, Shard
from dsca.train.outputs import LABEL_E, LABEL_T, LABEL_YC, LABEL_YT, Outputs

__all__ = ["ModelInputs", "accumulate_group", "epoch_order", "forward_only", "gather_outputs",
           "group_sizes", "patient_rng", "patient_seed", "predict", "train_epoch"]

log = logging.getLogger(__name__)

#: Item of a group: ``(x20 [1,16N,D], x5 [1,N,D], coords [1,N,2] | None, label [4])``.
ModelInputs = tuple[torch.Tensor, ...]


def patient_seed(seed: int, epoch: int, position: int) -> int:
    """The seed of the dropout masks of the patient at ``position`` of ``epoch``'s order."""
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1, np.uint64)[0] >> 1)


@contextlib.contextmanager
def patient_rng(seed: int | None, device: torch.device) -> Iterator[None]:
    """Run with the CPU generator and ``device``'s CUDA generator seeded with ``seed``, and
    restore them afterwards (None: the global streams as they are).

    Only forward draws: backward reuses the masks that forward saved (CUDA's fused attention
    keeps its philox seed and offset), so the seeded region is the forward pass alone.
    """
    if seed is None:
        yield
        return
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.default_generators[cuda[0]].manual_seed(seed)
        yield


def accumulate_group(
    model: nn.Module,
    inputs: Iterable[ModelInputs],
    group_size: int,
    cfg: TrainConfig,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    scaler: torch.amp.GradScaler | None = None,
    *,
    seeds: Iterable[int] | None = None,
    shard: Shard = SINGLE,
) -> tuple[float | None, torch.Tensor, torch.Tensor]:
    """Forward/backward this rank's patients of one optimizer group into ``.grad`` (no
    optimizer step, no reduction over the ranks: :meth:`Shard.reduce_gradients` sums both
    the gradients and the returned loss shares).

    Discrete head: each patient's loss, divided by ``group_size``, is back-propagated right
    after its forward pass, so one autograd graph is alive at a time and the summed gradients
    are those of the group's mean loss. Cox head: the partial likelihood couples the group's
    patients, so the group's log hazards [G, 1] are gathered from the ranks (detached), the
    loss and its gradient with respect to them are computed on every rank, and each rank
    back-propagates its own patients' slice of that gradient through their held graphs: the
    chain rule, so the summed gradients are those of the loss. A group without an event
    contributes no gradient (as the reference). The L1 penalty is the group's, not a
    patient's: the shard's first rank adds it.

    Args:
        model: the network (train mode set by the caller).
        inputs: this rank's items of the group (``shard.positions``), ``(x20 [1,16N,D],
            x5 [1,N,D], coords [1,N,2] | None, label [4])``; may be an iterator that loads the
            patients one at a time; may be empty on a rank when the group is smaller than the
            shard.
        group_size: number of patients in the whole group (all ranks).
        cfg: training configuration (loss, alpha, reg_l1, cox_ties).
        autocast: factory of the mixed-precision context.
        scaler: fp16 gradient scaler, or None.
        seeds: one dropout seed per item (:func:`patient_seed`), or None: the global streams.
        shard: the ranks that share the group (:data:`SINGLE`: this process has it all).

    Returns:
        (this rank's share of the group loss without the L1 term, None on every rank for a
        skipped Cox group; this rank's detached outputs [g, K] on CPU; its labels [g, 4]).
    """
    scale = scaler.scale if scaler is not None else (lambda loss: loss)
    outs: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    total = 0.0
    items = zip(inputs, seeds) if seeds is not None else ((item, None) for item in inputs)
    for (x20, x5, coords, label), seed in items:
        with patient_rng(seed, x20.device), autocast():
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
    lab = _stack_labels(labels)
    detached = _cat_outputs([o.detach() for o in outs], cfg)
    if cfg.is_cox:
        parts = shard.all_gather((detached, lab))
        group_out = shard.interleave([p[0] for p in parts])
        group_lab = shard.interleave([p[1] for p in parts])
        if group_lab[:, LABEL_E].sum() == 0:
            return None, detached, lab
        device = outs[0].device if outs else next(model.parameters()).device
        eta = group_out.to(device, copy=True).requires_grad_()  # a leaf: not the outputs returned
        dev_lab = group_lab.to(device)
        loss = cox_nll(eta, dev_lab[:, LABEL_E], dev_lab[:, LABEL_T], ties=cfg.cox_ties)
        scale(loss).backward()  # -> d loss / d eta [G, 1], scaled as the loss
        if outs:
            mine = eta.grad[list(shard.positions(0, group_size))]
            torch.autograd.backward(outs, list(mine.split(1)))
        total = float(loss.detach()) if shard.is_main else 0.0
    if shard.is_main:
        penalty = l1_penalty(model.parameters(), cfg.reg_l1)
        if isinstance(penalty, torch.Tensor):
            scale(penalty).backward()
    return total, detached, lab


def _stack_labels(labels: list[torch.Tensor]) -> torch.Tensor:
    """[g] label rows [4] -> [g, 4] (g may be 0 on a rank without patients in a group)."""
    return torch.stack(labels) if labels else torch.empty(0, 4, dtype=torch.float64)


def _cat_outputs(outs: list[torch.Tensor], cfg: TrainConfig) -> torch.Tensor:
    """[g] outputs [1, K] -> [g, K] on the CPU (g may be 0)."""
    return torch.cat(outs).cpu() if outs else torch.empty(0, cfg.model.dims[-1])


@torch.no_grad()
def forward_only(
    model: nn.Module,
    inputs: Iterable[ModelInputs],
    autocast: Callable[[], contextlib.AbstractContextManager],
    cfg: TrainConfig,
    seeds: Iterable[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-mode outputs of patients that are not back-propagated (a dropped last group).

    Args:
        inputs: items ``(x20 [1,16N,D], x5 [1,N,D], coords [1,N,2] | None, label [4])``.
        seeds: one dropout seed per item (:func:`patient_seed`), or None.

    Returns:
        outputs [g, K] on CPU and labels [g, 4].
    """
    outs, labels = [], []
    items = zip(inputs, seeds) if seeds is not None else ((item, None) for item in inputs)
    for (x20, x5, coords, label), seed in items:
        with patient_rng(seed, x20.device), autocast():
            outs.append(model(x20, x5, coords).float().cpu())
        labels.append(label)
    return _cat_outputs(outs, cfg), _stack_labels(labels)


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
    return Outputs(ids, _cat_outputs(outs, cfg), _stack_labels(labels))


def group_sizes(n: int, size: int) -> list[int]:
    """Group size of each of ``n`` patients' groups: [size, size, ..., remainder]."""
    return [min(size, n - start) for start in range(0, n, size)]


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The dataset indices of an epoch's patients, in training order.

    Depends on (seed, epoch) only, so a resumed run sees the same order and every rank the
    same one.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def train_epoch(
    model: nn.Module,
    dataset: Dataset,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    device: torch.device,
    epoch: int,
    scaler: torch.amp.GradScaler | None,
    desc: str,
    shard: Shard = SINGLE,
) -> tuple[float, Outputs]:
    """One epoch; returns (mean group loss, the training outputs collected on the way, in
    the epoch's order, of every rank's patients).

    With a shard of K ranks each one loads and runs only its patients of every group
    (:meth:`Shard.positions`); the gradients are summed over the ranks before each step.
    """
    model.train()
    n = len(dataset)
    order = epoch_order(n, cfg.seed, epoch)
    groups = [(start, size) for start, size in zip(range(0, n, cfg.bp_every_iters),
                                                    group_sizes(n, cfg.bp_every_iters))]
    mine = [pos for start, size in groups for pos in shard.positions(start, size)]
    loader = patient_loader(dataset, cfg, sampler=[order[pos] for pos in mine],
                            generator=torch.Generator().manual_seed(cfg.seed))
    bar = tqdm(total=len(mine), desc=desc, leave=False, disable=None if shard.is_main else True)
    ids: list[str] = []
    samples = iter(loader)

    def next_patients(count: int) -> Iterator[ModelInputs]:
        """The loader's next ``count`` patients as model inputs, read only when the step asks
        for them; records their ids and advances the bar."""
        for sample in itertools.islice(samples, count):
            ids.append(str(sample.patient_id))
            bar.update(1)
            yield to_model_inputs(sample, device, cfg.position_emb)

    autocast = functools.partial(autocast_context, device, cfg.amp)
    params = list(model.parameters())
    losses, outs, labels = [], [], []
    optimizer.zero_grad(set_to_none=True)
    for start, size in groups:
        own = shard.positions(start, size)
        seeds = [patient_seed(cfg.seed, epoch, pos) for pos in own]
        # (a training set smaller than one group is stepped: there would be no step otherwise)
        if size < cfg.bp_every_iters and cfg.last_group == "drop" and n > size:
            out, lab = forward_only(model, next_patients(len(own)), autocast, cfg, seeds)
            outs.append(out)
            labels.append(lab)
            continue
        share, out, lab = accumulate_group(model, next_patients(len(own)), size, cfg, autocast,
                                           scaler, seeds=seeds, shard=shard)
        outs.append(out)
        labels.append(lab)
        if share is None:
            log.debug("%s: group without events skipped (Cox)", desc)
            optimizer.zero_grad(set_to_none=True)
            continue
        loss = shard.reduce_gradients(params, share)
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
    return avg, _epoch_outputs(shard, mine, ids, torch.cat(outs), torch.cat(labels))


def _epoch_outputs(shard: Shard, positions: list[int], ids: list[str], out: torch.Tensor,
                   label: torch.Tensor) -> Outputs:
    """Every rank's training outputs (this rank's: ``out`` [g, K], ``label`` [g, 4] at
    ``positions``) in the epoch's order."""
    if shard.size == 1:
        return Outputs(ids, out, label)
    parts = shard.all_gather((positions, ids, out, label))
    by_position = torch.tensor([p for part in parts for p in part[0]]).argsort().tolist()
    all_ids = [i for part in parts for i in part[1]]
    all_out = torch.cat([part[2] for part in parts])
    all_lab = torch.cat([part[3] for part in parts])
    return Outputs([all_ids[i] for i in by_position], all_out[by_position], all_lab[by_position])


def gather_outputs(shard: Shard, part: Outputs) -> Outputs:
    """Every rank's :func:`predict` outputs of its ``shard.subset(dataset)``, in the
    dataset's order (on every rank)."""
    if shard.size == 1:
        return part
    parts = shard.all_gather(part)
    ids: list[str] = [""] * sum(len(p.patient_ids) for p in parts)
    for r, p in enumerate(parts):
        ids[r::shard.size] = p.patient_ids
    return Outputs(ids, shard.interleave([p.out for p in parts]),
                   shard.interleave([p.label for p in parts]))
