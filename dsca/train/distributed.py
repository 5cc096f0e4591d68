"""Training on several processes launched by ``torchrun`` (``torch.distributed``).

``torchrun --nproc-per-node=K [--nnodes ...] --no-python dsca train --config ...`` starts K
ranks per node; each one runs the whole ``dsca train`` program, and :func:`start` finds them
from torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``. Two ways to share the work:

- ``data`` (the default): every rank trains every fold. An optimizer group of G patients is
  split across the ranks (rank r takes the group's patients r, r+K, ...), each patient's
  backward is scaled by ``1 / G`` as in one process, and the gradients are summed over the
  ranks (:meth:`Shard.reduce_gradients`) before every rank takes the same optimizer step,
  so the weights stay identical on all ranks and equal those of one process (up to the order
  of float additions). Evaluation is split the same way and gathered. Backend: nccl on CUDA
  (rank on ``cuda:LOCAL_RANK``), gloo on the CPU. Only rank 0 reads or writes the output
  folder: what it loads (a resumed ``last.pt``, ``best.pt``) reaches the others by broadcast.
- ``folds``: rank r trains the folds r, r+K, ... of those to train, each alone as one
  process would; ranks only meet at the start and end (gloo, no tensors on GPUs are
  exchanged), so the output folder must be on a file system that every rank sees.

Only rank 0 writes the run's shared files (run.json, config.yaml, train.log, metrics.json,
predictions.csv, plots; in data mode also the checkpoints and result.json).

Failures: a rank whose command fails notes its error in torchrun's key-value store
(:meth:`Distributed.note_failure`) and exits with it. A rank waiting for it in a collective
then gets a backend error (gloo: the closed connection) or torchrun's SIGTERM, whichever comes
first; collectives here translate the backend error into :class:`PeerFailed` naming the rank
that failed and its message. Waits that can be long (fold mode waits for the slowest rank's
folds) poll the store instead of a collective, so they have no timeout and see a failure
note at once.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Subset

from dsca.config import ConfigError

__all__ = ["Distributed", "Mode", "PeerFailed", "SINGLE", "SINGLE_PROCESS", "Shard",
           "launched_by_torchrun", "start", "stop"]

log = logging.getLogger(__name__)

Mode = Literal["data", "folds"]
T = TypeVar("T")

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# collectives wait this long for a slow peer; a dead one is seen sooner (see the module doc)
_TIMEOUT = datetime.timedelta(minutes=30)
_POLL_S = 0.2


class PeerFailed(RuntimeError):
    """Another rank failed; the message names it and its error."""


def launched_by_torchrun() -> bool:
    """The process is a worker that torchrun started (its rank variables are set)."""
    return all(name in os.environ for name in _TORCHRUN_ENV)


@dataclass(frozen=True)
class Shard:
    """The ranks that share one fold's patients: rank ``rank`` of ``size`` (data mode), or
    one process alone (:data:`SINGLE`), for which every method below is a local no-op."""

    rank: int = 0
    size: int = 1
    store: Any = field(default=None, repr=False, compare=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def positions(self, start: int, count: int) -> range:
        """This rank's positions among ``count`` patients from position ``start`` on."""
        return range(start + self.rank, start + count, self.size)

    def subset(self, dataset: Dataset) -> Dataset:
        """This rank's items of ``dataset``: r, r+K, ...; :meth:`interleave` undoes it."""
        if self.size == 1:
            return dataset
        return Subset(dataset, range(self.rank, len(dataset), self.size))  # type: ignore[arg-type]

    def all_gather(self, obj: T) -> list[T]:
        """Every rank's ``obj`` (picklable), by rank."""
        if self.size == 1:
            return [obj]
        gathered: list[Any] = [None] * self.size
        with _collective(self.store, self.size):
            dist.all_gather_object(gathered, obj)
        return gathered

    def interleave(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """The rows of every rank's part of a :meth:`subset`/:meth:`positions` split, back in
        their order: row i is row ``i // K`` of rank ``i % K``'s part ([n_r, ...] -> [n, ...])."""
        if self.size == 1:
            return parts[0]
        out = parts[0].new_empty((sum(len(p) for p in parts), *parts[0].shape[1:]))
        for r, part in enumerate(parts):
            out[r::self.size] = part
        return out

    def from_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` run on rank 0 only, its result (or its error, as :class:`PeerFailed`)
        broadcast to the other ranks."""
        return _from_main(fn, self.rank, self.size, self.store)

    def broadcast_parameters(self, model: nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank (in place)."""
        if self.size == 1:
            return
        with _collective(self.store, self.size), torch.no_grad():
            for tensor in model.state_dict().values():
                dist.broadcast(tensor, src=0)

    def reduce_gradients(self, params: Sequence[nn.Parameter], loss_share: float) -> float:
        """Sum every parameter's ``.grad`` and ``loss_share`` over the ranks, in place.

        A parameter without a gradient on a rank counts as zero there; one without a gradient
        on every rank keeps ``grad = None`` (Adam and Lookahead skip such a parameter, and
        must do so on every rank alike).

        Args:
            params: the model's parameters, in the same order on every rank.
            loss_share: this rank's share of the group loss.

        Returns:
            the group loss (the sum of the shares).
        """
        if self.size == 1:
            return loss_share
        device = params[0].device
        # float64: the loss is reported; the flags count the ranks that hold a gradient
        head = torch.tensor([loss_share] + [float(p.grad is not None) for p in params],
                            dtype=torch.float64, device=device)
        flat = _flat_buffer(sum(p.numel() for p in params), params[0].dtype, device)
        offset = 0
        for p in params:
            part = flat[offset:offset + p.numel()]
            if p.grad is not None:
                part.copy_(p.grad.reshape(-1))
            else:
                part.zero_()
            offset += p.numel()
        with _collective(self.store, self.size):
            dist.all_reduce(head)
            dist.all_reduce(flat)
        offset = 0
        for p, held in zip(params, head[1:].tolist()):
            n = p.numel()
            if held == 0:
                p.grad = None
            elif p.grad is not None:
                p.grad.copy_(flat[offset:offset + n].view_as(p))
            else:
                p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n
        return float(head[0])


#: One process: the whole fold's patients on this rank.
SINGLE = Shard()

# One flat gradient buffer per (size, dtype, device), reused at every step: a fresh one (34 MB
# for the default model) cost 2.5-4x the all-reduce itself on CPU ranks.
_FLAT: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def _flat_buffer(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (numel, dtype, device)
    if key not in _FLAT:
        _FLAT.clear()  # another model or device: the old buffer is not needed any more
        _FLAT[key] = torch.empty(numel, dtype=dtype, device=device)
    return _FLAT[key]


@dataclass(frozen=True)
class Distributed:
    """How this process takes part in a run: rank ``rank`` of ``world_size`` in ``mode``
    (one process: :data:`SINGLE_PROCESS`)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mode: Mode = "data"
    store: Any = field(default=None, repr=False, compare=False)

    @property
    def active(self) -> bool:
        """Launched by torchrun, with a process group to talk through."""
        return self.store is not None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes the run's shared files."""
        return self.rank == 0

    @property
    def shard(self) -> Shard:
        """The ranks that share a fold: all of them in data mode, this one alone otherwise."""
        if self.mode == "data" and self.active:
            return Shard(self.rank, self.world_size, self.store)
        return SINGLE

    def own(self, items: Sequence[T]) -> list[T]:
        """This rank's items of a list of folds: r, r+K, ... in fold mode, all in data mode."""
        if self.mode == "folds":
            return list(items[self.rank::self.world_size])
        return list(items)

    def from_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` run on rank 0 only, its result (or its error) sent to every rank."""
        return _from_main(fn, self.rank, self.world_size, self.store)

    def wait_all(self, name: str) -> None:
        """Wait until every rank got here, however long that takes (a store barrier: no
        collective timeout); raises :class:`PeerFailed` as soon as another rank failed."""
        if not self.active:
            return
        key = f"wait/{name}"
        self.store.add(key, 1)
        while self.store.add(key, 0) < self.world_size:
            failure = _peer_failure(self.store, self.world_size)
            if failure:
                raise PeerFailed(failure)
            time.sleep(_POLL_S)

    def note_failure(self, message: str) -> None:
        """Leave this rank's error where the other ranks look when their collectives fail."""
        if not self.active:
            return
        try:
            self.store.set(f"failed/{self.rank}", message)
        except (RuntimeError, OSError) as err:  # the store's host is gone: nothing to tell
            log.debug("rank %d: cannot note the failure (%s)", self.rank, err)


#: Not launched by torchrun: one process does everything.
SINGLE_PROCESS = Distributed()


def start(mode: Mode | None, device: str) -> tuple[Distributed, str]:
    """Join torchrun's process group when launched by it; returns (this rank, its device).

    Args:
        mode: ``--parallel``; None = data. Ignored, with a warning, without torchrun.
        device: the device setting (``auto``, ``cpu``, ``cuda``); under torchrun a CUDA rank
            runs on ``cuda:LOCAL_RANK``.

    Raises:
        ConfigError: a CUDA device with an index under torchrun.
    """
    if not launched_by_torchrun():
        if mode is not None:
            log.warning("--parallel %s ignored: not launched by torchrun (one process trains)", mode)
        return SINGLE_PROCESS, device
    from dsca.train.device import resolve_device

    rank, world, local = (int(os.environ[name]) for name in _TORCHRUN_ENV)
    mode = mode or "data"
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if ":" in device:
            raise ConfigError(f"under torchrun each rank runs on cuda:LOCAL_RANK; pass --device "
                              f"cuda (or auto), not {device}")
        device = f"cuda:{local}"
        resolve_device(device)  # checks the index, makes it the current device (nccl needs it)
    # fold mode exchanges only Python objects: gloo, whatever the device
    backend = "nccl" if cuda and mode == "data" else "gloo"
    store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=_TIMEOUT))
    store.set_timeout(_TIMEOUT)
    dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), rank=rank,
                            world_size=world, timeout=_TIMEOUT)
    ranks = Distributed(rank, world, local, mode, dist.PrefixStore("dsca", store))
    log.debug("rank %d of %d (%s, %s) on %s", rank, world, mode, backend, device)
    return ranks, device


def stop(ranks: Distributed, failed: bool) -> None:
    """Leave the process group. A failed rank only exits: a peer may be inside a collective
    that would never end, and the process's end is what tells it."""
    if ranks.active and not failed and dist.is_initialized():
        dist.destroy_process_group()


def _from_main(fn: Callable[[], T], rank: int, size: int, store: Any) -> T:
    if size == 1 or store is None:
        return fn()
    box: list[Any] = [None]
    error: BaseException | None = None
    if rank == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as err:  # the others stop with it named; rank 0 raises it itself
            box[0] = ("error", f"{type(err).__name__}: {' '.join(str(err).split())}")
            error = err
    with _collective(store, size):
        dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    status, value = box[0]
    if status == "error":
        raise PeerFailed(f"rank 0 failed: {value}")
    return value


def _peer_failure(store: Any, size: int) -> str | None:
    """The first noted failure of another rank, as "rank r failed: message", or None."""
    for r in range(size):
        key = f"failed/{r}"
        try:
            if store.check([key]):
                return f"rank {r} failed: {store.get(key).decode(errors='replace')}"
        except (RuntimeError, OSError):
            return None  # the store's host is gone
    return None


@contextlib.contextmanager
def _collective(store: Any, size: int) -> Iterator[None]:
    """A collective that fails because a peer stopped raises :class:`PeerFailed` naming it."""
    try:
        yield
    except PeerFailed:
        raise
    except RuntimeError as err:  # DistBackendError, DistNetworkError, gloo's closed connection
        # the failed rank notes its error before it exits, and its exit is what broke the
        # collective; a moment's grace covers a note still on its way
        deadline = time.monotonic() + 2.0
        while (failure := _peer_failure(store, size)) is None and time.monotonic() < deadline:
            time.sleep(_POLL_S)
        if failure is None:
            failure = f"a collective with the other ranks failed ({' '.join(str(err).split())})"
        raise PeerFailed(failure) from None
