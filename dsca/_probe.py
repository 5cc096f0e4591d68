"""Module hooks behind `dsca profile`: per-module time, saved activations, peak memory and FLOPs
of one forward+backward pass."""
from __future__ import annotations

import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

__all__ = ["FlopSlicer", "Probe"]


class Probe:
    """Hooks that time the watched modules and attribute saved activations to them.

    Forward: pre/post forward hooks. Backward has no "module done" signal when a module's
    inputs need no gradient (the first layers), so backward time is sliced along a timeline
    of events: a module's backward starts when the gradient of its output arrives (backward
    pre-hook) and each interval that ends in one of its parameters' gradient accumulations
    (or its full backward hook) is its work; intervals ending anywhere else are glue between
    modules (the loss, reshapes, the position embedding...).
    """

    OTHER = "(outside the modules)"

    def __init__(self, modules: Mapping[str, nn.Module], device: torch.device) -> None:
        self.modules = modules
        self.cuda = device.type == "cuda"
        self.fwd: dict[str, float] = defaultdict(float)
        self.bwd: dict[str, float] = defaultdict(float)
        self.saved: dict[str, int] = defaultdict(int)
        self.peak: dict[str, float] = defaultdict(float)
        self._fwd_start: dict[str, float] = {}
        self._mem_start: dict[str, int] = {}
        self._events: list[tuple[float, str, str]] = []  # (time, kind, module) in backward
        self.flops: dict[str, int] = defaultdict(int)
        self._pending_flops = 0  # backward FLOPs since the last timeline event
        self._in_backward = False
        self._active: list[str] = []
        self._handles: list[Any] = []

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _pre(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            self._active.append(name)
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
                self._mem_start[name] = torch.cuda.memory_allocated()
            self._fwd_start[name] = self.now()

        return hook

    def _post(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.fwd[name] += self.now() - self._fwd_start[name]
            if self.cuda:
                used = torch.cuda.max_memory_allocated() - self._mem_start[name]
                self.peak[name] = max(self.peak[name], used / 2**20)
            self._active.pop()

        return hook

    def _event(self, kind: str, name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            self._record(kind, name)

        return hook

    def _record(self, kind: str, name: str) -> None:
        self._events.append((self.now(), kind, name))
        # FLOPs are sliced by the same rule as time (see slice_backward)
        self.flops[name if kind in ("param", "exit") else self.OTHER] += self._pending_flops
        self._pending_flops = 0

    def add_flops(self, n: int) -> None:
        """Called by :class:`FlopSlicer` for every counted op."""
        if self._in_backward:
            self._pending_flops += n
        else:
            self.flops[self._active[-1] if self._active else self.OTHER] += n

    def _pack(self, t: Tensor) -> Tensor:
        if self._active:
            self.saved[self._active[-1]] += t.untyped_storage().nbytes()
        return t

    def mark(self, kind: str) -> None:
        """Timeline marks around ``backward()``: kind "start" or "end"."""
        self._in_backward = kind == "start"
        self._record(kind, self.OTHER)

    def slice_backward(self) -> None:
        """Attribute each interval of the backward timeline to the module whose event ends it."""
        events = sorted(self._events)
        for (t0, _, _), (t1, kind, name) in zip(events, events[1:]):
            owner = name if kind in ("param", "exit") else self.OTHER
            self.bwd[owner] += t1 - t0

    @contextmanager
    def attached(self) -> Iterator[None]:
        for name, mod in self.modules.items():
            self._handles += [
                mod.register_forward_pre_hook(self._pre(name)),
                mod.register_forward_hook(self._post(name)),
                mod.register_full_backward_pre_hook(self._event("enter", name)),
                mod.register_full_backward_hook(self._event("exit", name)),
            ]
            self._handles += [
                p.register_post_accumulate_grad_hook(self._event("param", name))
                for p in mod.parameters()
                if p.requires_grad
            ]
        try:
            with warnings.catch_warnings():
                # "full backward hook is firing ... no inputs require gradients": expected for
                # the embedding layers; the parameter hooks time them instead
                warnings.filterwarnings("ignore", message="Full backward hook")
                with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                    yield
        finally:
            for h in self._handles:
                h.remove()
            self._handles.clear()


def _flop_formula(packet: Any) -> Callable[..., int] | None:
    """torch.utils.flop_counter's formula of an op; in-place variants (``addmm_``,
    ``baddbmm_``: the block convolution's per-tap GEMMs and the encoder's chunked attention
    backward) use their out-of-place formula, which torch's counter leaves out."""
    formula = flop_registry.get(packet)
    name = packet.__name__
    if formula is None and name.endswith("_"):
        base = getattr(torch.ops.aten, name[:-1], None)
        formula = flop_registry.get(base) if base is not None else None
    return formula


class FlopSlicer(TorchDispatchMode):
    """Counts each op's FLOPs with torch.utils.flop_counter's formulas into a :class:`Probe`.

    (FlopCounterMode's own per-module split attributes backward ops to whichever modules its
    tracker still holds open, which over-counts the embedding layers here; and it does not
    count in-place GEMMs, see :func:`_flop_formula`.)
    """

    def __init__(self, probe: Probe) -> None:
        super().__init__()
        self.probe = probe

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = _flop_formula(func._overloadpacket)
        if formula is not None:
            self.probe.add_flops(int(formula(*args, **kwargs, out_val=out)))
        return out
