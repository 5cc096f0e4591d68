"""Per-module cost of one forward+backward pass of the DSCA model (``dsca profile``).

For each top-level module of the network (and the whole model) it reports:
wall time of forward and backward (module hooks, CUDA-synchronized, median of repeats),
FLOPs (torch.utils.flop_counter, forward + backward; the Triton CAPool ops carry their own
formula), achieved FLOP/s, the forward multiply-accumulates of the model's analytic count
(:func:`dsca.costs.count_macs`, the formulation that runs), activation memory saved for
backward, and on CUDA the peak memory allocated while the module ran.
"""
from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from dsca._probe import FlopSlicer, Probe
from dsca.costs import macs_per_module

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

    def step(probe: Probe | None = None) -> None:
        model.zero_grad(set_to_none=True)
        loss = _loss(model(*batch))
        if probe is not None:
            probe.mark("start")
        loss.backward()
        if probe is not None:
            probe.mark("end")

    step()  # warm-up: autotunes / compiles kernels, fills the caching allocator
    runs: list[Probe] = []
    total_peak: float | None = None
    for _ in range(repeats):
        probe = Probe(top, dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            base_mem = torch.cuda.memory_allocated()
        t0 = probe.now()
        with probe.attached():
            step(probe)
        probe.slice_backward()
        fwd_in_modules = sum(probe.fwd.values())
        bwd_start = next(t for t, kind, _ in probe._events if kind == "start")
        probe.fwd[Probe.OTHER] = max(0.0, (bwd_start - t0) - fwd_in_modules)
        runs.append(probe)
    if dev.type == "cuda":
        # the per-module resets clear the global peak: measure the step's peak in its own pass
        torch.cuda.synchronize()
        base_mem = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        total_peak = (torch.cuda.max_memory_allocated() - base_mem) / 2**20

    flop_probe = Probe(top, dev)
    with flop_probe.attached(), FlopSlicer(flop_probe):
        step(flop_probe)

    report = ProfileReport(n_patches, dev.type, backend, cfg.dims, repeats)
    macs, total_macs = macs_per_module(cfg, n_patches)
    named = [*top.items(), (Probe.OTHER, None)]
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
        "fwd MAC = analytic multiply-accumulates of the forward (dsca.costs.count_macs); "
        "FLOP = counted, fwd + bwd; FLOP/s = FLOP / (fwd + bwd time); saved = activations kept "
        "for backward; peak = CUDA memory above the module's start"
    )
    return "\n".join(lines)
