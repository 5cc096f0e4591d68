"""CAPool speed and memory: Triton vs the folded PyTorch path vs the plain formulation vs
torch.compile of the folded path, forward and forward+backward, C = 384, 4 heads.

    pytest benchmarks/test_bench_capool.py --benchmark-only                       # CPU cases
    pytest benchmarks/test_bench_capool.py --benchmark-only --benchmark-json=capool.json
    pytest benchmarks/test_bench_capool.py --benchmark-only --benchmark-save=capool   # then
    pytest benchmarks/test_bench_capool.py --benchmark-only --benchmark-compare        # vs saved

CUDA cases (bf16, the issue's goal dtype, and fp32; M in 256..16384) skip without a GPU. CPU
cases time the PyTorch paths only (the Triton interpreter is not a speed measurement) at
M in {256, 1024}, fp32, to stay affordable on a laptop. Each case records in ``extra_info``:
``peak_mib`` (CUDA: peak allocated memory of one call above what was allocated before it) and
``saved_mib`` (any device: bytes autograd keeps for backward, the activation memory).
A ratio table against the plain formulation of the same group is printed at the end.
On a shared or busy CPU, run with OMP_NUM_THREADS=1: oversubscribed intra-op threads make
the CPU timings swing by 10x.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import pytest
import torch
import torch._dynamo
from torch import Tensor

from dsca.kernels import CAPoolWeights, capool, capool_folded, capool_plain

C = 384
HEADS = 4
IMPLS = ("plain", "folded", "compiled", "triton")
CUDA_MS = (1024, 4096, 16384, 65536)
CPU_MS = (256, 1024)

# one compiled graph per (M, dtype, mode): raise dynamo's per-function recompile limit
torch._dynamo.config.cache_size_limit = 64
_COMPILED = torch.compile(capool_folded, dynamic=False)

# group -> impl -> (median seconds, peak MiB, saved MiB), filled by the tests
_RESULTS: dict[str, dict[str, tuple[float, float | None, float]]] = {}


def _triton(x20: Tensor, query: Tensor, w: CAPoolWeights) -> tuple[Tensor, Tensor]:
    return capool(x20, query, w, backend="triton")


def _impl(name: str) -> Callable[..., tuple[Tensor, Tensor]]:
    """The formulation ``name`` as a function of (x20, query, 4 weight tensors, heads)."""
    fn = {"plain": capool_plain, "folded": capool_folded, "compiled": _COMPILED,
          "triton": _triton}[name]

    def call(x20: Tensor, query: Tensor, *weights_and_heads) -> tuple[Tensor, Tensor]:
        return fn(x20, query, CAPoolWeights(*weights_and_heads))

    return call


def _inputs(m: int, device: str, dtype: torch.dtype, grad: bool) -> list[Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    w = C**-0.5
    shapes_scales = [((m, 16, C), 1.0), ((m, C), 1.0), ((3 * C, C), w), ((3 * C,), 0.1),
                     ((C, C), w), ((C,), 0.1)]
    return [
        (torch.randn(s, generator=g, device=device) * sc).to(dtype).requires_grad_(grad)
        for s, sc in shapes_scales
    ]


def _step(
    fn: Callable[..., tuple[Tensor, Tensor]], args: list[Tensor], backward: bool
) -> Callable[[], None]:
    """One CAPool call (and its backward through a loss on the pooled output)."""
    sync = torch.cuda.synchronize if args[0].is_cuda else (lambda: None)

    def run() -> None:
        if backward:
            for a in args:
                a.grad = None
            out, _ = fn(*args, HEADS)
            out.backward(torch.ones_like(out))
        else:
            with torch.no_grad():
                fn(*args, HEADS)
        sync()

    return run


def _saved_mib(fn: Callable[..., tuple[Tensor, Tensor]], args: list[Tensor]) -> float:
    """MiB that autograd saves for backward (distinct storages, inputs excluded)."""
    inputs = {a.untyped_storage().data_ptr() for a in args}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in inputs:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = fn(*args, HEADS)
    del out
    return sum(seen.values()) / 2**20


def _peak_mib(run: Callable[[], None], device: str) -> float | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _cases() -> Iterator:
    for mode in ("fwd", "fwdbwd"):
        for m in CPU_MS:
            for impl in IMPLS[:3]:
                cid = f"cpu-fp32-{mode}-M{m}-{impl}"
                yield pytest.param("cpu", torch.float32, mode, m, impl, id=cid)
        for dtype in (torch.bfloat16, torch.float32):
            tag = "bf16" if dtype == torch.bfloat16 else "fp32"
            for m in CUDA_MS:
                for impl in IMPLS:
                    yield pytest.param(
                        "cuda", dtype, mode, m, impl, id=f"cuda-{tag}-{mode}-M{m}-{impl}",
                        marks=pytest.mark.skipif(
                            not torch.cuda.is_available(), reason="needs CUDA"
                        ),
                    )


@pytest.mark.parametrize(("device", "dtype", "mode", "m", "impl"), list(_cases()))
def test_capool(benchmark, device: str, dtype: torch.dtype, mode: str, m: int, impl: str) -> None:
    if device == "cpu" and impl == "compiled" and m > 256:
        pytest.skip("torch.compile on CPU: one size is enough (each size compiles for ~30 s)")
    backward = mode == "fwdbwd"
    args = _inputs(m, device, dtype, grad=backward)
    fn = _impl(impl)
    run = _step(fn, args, backward)
    run()  # warm-up: compiles, autotunes, fills the caching allocator
    peak = _peak_mib(run, device)
    saved = _saved_mib(fn, args) if backward else 0.0
    tag = str(dtype).removeprefix("torch.")
    group = f"{device}-{tag}-{mode}-M{m}"
    benchmark.group = group
    benchmark.extra_info.update(
        impl=impl, m=m, c=C, heads=HEADS, dtype=tag, peak_mib=peak, saved_mib=saved
    )
    benchmark(run)
    if benchmark.stats is not None:  # None under --benchmark-disable
        _RESULTS.setdefault(group, {})[impl] = (benchmark.stats.stats.median, peak, saved)


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


@pytest.fixture(scope="module", autouse=True)
def _ratio_table(request: pytest.FixtureRequest) -> Iterator[None]:
    """After the module: each impl's speed-up and memory against ``plain`` in its group."""
    yield
    if not _RESULTS:
        return
    lines = ["", "CAPool: speed-up over the plain formulation (median times), memory in MiB",
             f"{'group':<28} {'impl':<9} {'median ms':>10} {'speed-up':>9} {'peak':>9} "
             f"{'saved':>9}"]
    for group, by_impl in _RESULTS.items():
        base = by_impl.get("plain", (math.nan, None, 0.0))[0]
        for impl in IMPLS:
            if impl in by_impl:
                t, peak, saved = by_impl[impl]
                lines.append(f"{group:<28} {impl:<9} {t * 1e3:>10.3f} {base / t:>8.2f}x "
                             f"{_fmt(peak, '9.1f')} {saved:>9.1f}")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # a teardown's output is captured otherwise
            reporter.write_line("\n".join(lines))
