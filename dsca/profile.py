"""Per-module cost of one forward+backward pass of the DSCA model (``dsca profile``).

For each top-level module of the network (and the whole model) it reports:
wall time of forward and backward (module hooks, CUDA-synchronized, median of repeats),
FLOPs (torch.utils.flop_counter, forward + backward; the Triton CAPool ops carry their own
formula), achieved FLOP/s, the forward multiply-accumulates of the model's analytic count
(:func:`dsca.model.count_macs`, the formulation that runs), activation memory saved for
backward, and on CUDA the peak memory allocated while the module ran.
"""
from __future__ import annotations

import logging
import math
import statistics
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

__all__ = ["ModuleCost", "ProfileReport", "format_table", "profile_model", "synthetic_bag"]

log = logging.getLogger(__name__)


@dataclass
class ModuleCost:
    """Cost of one module in one forward+backward pass (times are medians over repeats)."""

    name: str
    params: int
    fwd_ms: float = 0.0
    bwd_ms: float = 0.0
    flops: int = 0
    saved_mib: float = 0.0
    peak_mib: float | None = None
    fwd_macs: int | None = None

    @property
    def total_ms(self) -> float:
        return self.fwd_ms + self.bwd_ms

    @property
    def tflops_per_s(self) -> float:
        """Achieved TFLOP/s over the module's forward+backward time."""
        return self.flops / (self.total_ms * 1e-3) / 1e12 if self.total_ms > 0 else math.nan


@dataclass
class ProfileReport:
    """What :func:`profile_model` measured."""

    n_patches: int
    device: str
    backend: str
    dims: tuple[int, ...]
    repeats: int
    modules: list[ModuleCost] = field(default_factory=list)
    total: ModuleCost | None = None


def synthetic_bag(
    n_patches: int, in_dim: int, device: torch.device | str, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Random features of one patient with ``n_patches`` low-res patches on a square-ish grid.

    Returns:
        x20 [1, 16N, D], x5 [1, N, D], coords [1, N, 2] (grid col, row).
    """
    g = torch.Generator().manual_seed(seed)
    x5 = torch.randn(1, n_patches, in_dim, generator=g)
    x20 = torch.randn(1, 16 * n_patches, in_dim, generator=g)
    width = max(1, math.isqrt(n_patches))
    idx = torch.arange(n_patches)
    coords = torch.stack([idx % width, idx // width], dim=-1)[None]
    return x20.to(device), x5.to(device), coords.to(device)


class _Probe:
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
        """Called by :class:`_FlopSlicer` for every counted op."""
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


class _FlopSlicer(TorchDispatchMode):
    """Counts each op's FLOPs with torch.utils.flop_counter's formulas into a :class:`_Probe`.

    (FlopCounterMode's own per-module split attributes backward ops to whichever modules its
    tracker still holds open, which over-counts the embedding layers here; and it does not
    count in-place GEMMs, see :func:`_flop_formula`.)
    """

    def __init__(self, probe: _Probe) -> None:
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


def _module_macs(cfg: Any, n_patches: int) -> tuple[dict[str, int], int]:
    """Forward MACs of :func:`dsca.model.count_macs` per top-level module name, and the total.

    Args:
        cfg: a ``dsca.model.ModelConfig``.
    """
    from dsca.model import count_macs

    macs = count_macs(cfg, n_patches)
    embed_x20 = macs.get("x20_conv", 0) + macs.get("x20_pool", 0)
    enc = macs["encoders"]
    if cfg.dual:
        out = {"patchx20_embedding_layer": embed_x20,
               "patchx5_embedding_layer": macs["x5_embedding"]}
        if cfg.join == "post":  # two encoders of the same size
            out["patch_encoder_layer"] = out["patch_encoder_layer_parallel"] = enc // 2
        else:
            out["patch_encoder_layer"] = enc
    else:
        out = {"patch_embedding_layer": embed_x20 + macs.get("x5_embedding", 0),
               "patch_encoder_layer": enc}
    out["pool"], out["out_layer"] = macs["pool"], macs["head"]
    return out, macs["total"]


def _loss(hazards: Tensor) -> Tensor:
    # a discrete-time survival NLL for an uncensored patient in bin 1: what training runs
    return -(torch.log1p(-hazards[:, :1]).sum() + torch.log(hazards[:, 1]).sum())


def profile_model(
    model_cfg: Mapping[str, Any] | Any,
    n_patches: int,
    device: str = "cpu",
    repeats: int = 3,
    seed: int = 0,
) -> ProfileReport:
    """Profile one forward+backward of ``build_model(model_cfg)`` on a synthetic patient.

    Args:
        model_cfg: a ``dsca.model.ModelConfig`` or reference-style model keys (``dims``,
            ``capool_backend``, ...).
        n_patches: N low-res patches (16N high-res rows).
        device: "cpu" or "cuda".
        repeats: timed passes after one warm-up pass (the warm-up compiles/autotunes kernels).

    Raises:
        ValueError: bad config or arguments; RuntimeError: the CAPool backend cannot run here.
    """
    from dsca import build_model
    from dsca.model import ModelConfig

    if n_patches < 1:
        raise ValueError(f"--n-patches must be >= 1, got {n_patches}")
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA device")
    cfg = model_cfg if isinstance(model_cfg, ModelConfig) else ModelConfig.from_dict(model_cfg)
    torch.manual_seed(seed)
    model = build_model(cfg).to(dev)
    model.train()
    backend = cfg.capool_backend
    if backend == "triton" or (backend == "auto" and dev.type == "cuda"):
        # registers the Triton ops' FLOP formulas
        import dsca.kernels.triton_capool  # noqa: F401 - imported for its registrations
    in_dim = cfg.dims[0]
    batch = synthetic_bag(n_patches, in_dim, dev, seed)
    top = dict(model.named_children())

    def step(probe: _Probe | None = None) -> None:
        model.zero_grad(set_to_none=True)
        loss = _loss(model(*batch))
        if probe is not None:
            probe.mark("start")
        loss.backward()
        if probe is not None:
            probe.mark("end")

    step()  # warm-up: autotunes / compiles kernels, fills the caching allocator
    runs: list[_Probe] = []
    total_peak: float | None = None
    for _ in range(repeats):
        probe = _Probe(top, dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            base_mem = torch.cuda.memory_allocated()
        t0 = probe.now()
        with probe.attached():
            step(probe)
        probe.slice_backward()
        fwd_in_modules = sum(probe.fwd.values())
        bwd_start = next(t for t, kind, _ in probe._events if kind == "start")
        probe.fwd[_Probe.OTHER] = max(0.0, (bwd_start - t0) - fwd_in_modules)
        runs.append(probe)
    if dev.type == "cuda":
        # the per-module resets clear the global peak: measure the step's peak in its own pass
        torch.cuda.synchronize()
        base_mem = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        total_peak = (torch.cuda.max_memory_allocated() - base_mem) / 2**20

    flop_probe = _Probe(top, dev)
    with flop_probe.attached(), _FlopSlicer(flop_probe):
        step(flop_probe)

    report = ProfileReport(n_patches, dev.type, backend, cfg.dims, repeats)
    macs, total_macs = _module_macs(cfg, n_patches)
    named = [*top.items(), (_Probe.OTHER, None)]
    for name, mod in named:
        report.modules.append(
            ModuleCost(
                name=name,
                params=sum(p.numel() for p in mod.parameters()) if mod is not None else 0,
                fwd_ms=statistics.median(r.fwd[name] for r in runs) * 1e3,
                bwd_ms=statistics.median(r.bwd[name] for r in runs) * 1e3,
                flops=flop_probe.flops[name],
                saved_mib=runs[-1].saved[name] / 2**20,
                peak_mib=runs[-1].peak[name] if dev.type == "cuda" and mod is not None else None,
                fwd_macs=macs.get(name, 0) if mod is not None else 0,
            )
        )
    report.total = ModuleCost(
        name="total",
        params=sum(p.numel() for p in model.parameters()),
        fwd_ms=statistics.median(sum(r.fwd.values()) for r in runs) * 1e3,
        bwd_ms=statistics.median(sum(r.bwd.values()) for r in runs) * 1e3,
        flops=sum(flop_probe.flops.values()),
        saved_mib=sum(runs[-1].saved.values()) / 2**20,
        peak_mib=total_peak,
        fwd_macs=total_macs,
    )
    return report


def _si(x: float, unit: str) -> str:
    if math.isnan(x):
        return "-"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.0f} {unit}"


def format_table(report: ProfileReport) -> str:
    """The report as a fixed-width text table; the rows add up to the total."""
    head = (
        f"DSCA forward+backward: N={report.n_patches} patches ({16 * report.n_patches} x20 rows), "
        f"dims={'-'.join(map(str, report.dims))}, device={report.device}, "
        f"capool_backend={report.backend}, median of {report.repeats}"
    )
    cols = (
        f"{'module':<30} {'params':>9} {'fwd ms':>9} {'bwd ms':>9} {'fwd MAC':>10} {'FLOP':>11} "
        f"{'FLOP/s':>12} {'saved MiB':>10} {'peak MiB':>9}"
    )
    lines = [head, cols, "-" * len(cols)]
    rows = [*report.modules, *([report.total] if report.total else [])]
    for i, m in enumerate(rows):
        if report.total is not None and i == len(rows) - 1:
            lines.append("-" * len(cols))
        peak = "-" if m.peak_mib is None else f"{m.peak_mib:9.1f}"
        macs = "-" if m.fwd_macs is None else _si(m.fwd_macs, "")
        lines.append(
            f"{m.name:<30} {m.params:>9} {m.fwd_ms:>9.2f} {m.bwd_ms:>9.2f} {macs:>10} "
            f"{_si(m.flops, 'F'):>11} {_si(m.tflops_per_s * 1e12, 'F/s'):>12} "
            f"{m.saved_mib:>10.2f} {peak:>9}"
        )
    lines.append(
        "fwd MAC = analytic multiply-accumulates of the forward (dsca.model.count_macs); "
        "FLOP = counted, fwd + bwd; FLOP/s = FLOP / (fwd + bwd time); saved = activations kept "
        "for backward; peak = CUDA memory above the module's start"
    )
    return "\n".join(lines)
