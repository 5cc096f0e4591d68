"""DSCA training step on CPU: our model vs the same network written the plain way.

One patient, N = 1,000 low-res patches (16,000 high-res rows), dims 1024-384-384-4, the
reference config, training mode (dropout on), forward + backward, 2 threads.

* plain: the reference's formulation -- rows reshaped to [M, D, 4, 4] squares and back around a
  zero-padded ``nn.Conv2d``, ``nn.MultiheadAttention`` over the stacked [16, M, C] rows (K and V
  of every row materialized);
* ours: ``dsca.build_model`` -- channel-last per-tap block conv (100 of 144 tap-positions),
  folded CAPool through ``dsca.kernels.capool``.

Both load the same weights. Goals (issue 3): >= 1.5x faster and <= 0.6x the working memory
(peak RSS growth during one step, each measured in a fresh subprocess).

Run:  pytest benchmarks/test_bench_model.py -s
      python benchmarks/test_bench_model.py memory ours|plain   (one memory measurement)
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsca import build_model
from dsca.costs import count_macs
from dsca.model import ModelConfig, count_parameters

N_PATCHES = 1000
THREADS = 2
CONFIG = {"dims": "1024-384-384-4", "capool_backend": "torch"}  # other keys: reference defaults


class _PlainGAPool(nn.Module):
    def __init__(self, dim: int, dropout: float = 0.25) -> None:
        super().__init__()
        self.fc1 = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Dropout(dropout))
        self.score = nn.Sequential(nn.Linear(dim, dim), nn.Sigmoid(), nn.Dropout(dropout))
        self.fc2 = nn.Linear(dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.fc2(self.fc1(x).mul(self.score(x))).transpose(2, 1)
        return torch.matmul(F.softmax(a, dim=2), x).squeeze(1)


class _PlainX5(nn.Module):
    def __init__(self, d: int, c: int, k: int, norm: bool) -> None:
        super().__init__()
        self.conv = nn.Conv1d(d, c, k, 1, padding=(k - 1) // 2)
        self.norm = nn.LayerNorm(c) if norm else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x.transpose(2, 1)).transpose(2, 1)
        return self.norm(x) if self.norm is not None else x


class _PlainCAPool(nn.Module):
    def __init__(self, d: int, c: int) -> None:
        super().__init__()
        self.conv_patch_x5 = _PlainX5(d, c, 1, norm=False)
        self.conv = nn.Conv2d(d, c, 3, 1, padding=1)
        self.norm = nn.LayerNorm(c)
        self.act = nn.ReLU(inplace=True)
        self.cross_att_pool = nn.MultiheadAttention(c, 4)

    def forward(self, x20: Tensor, x5: Tensor) -> Tensor:
        B, L, D = x20.shape
        q = self.conv_patch_x5(x5)
        sq = x20.view(-1, 4, 4, D).permute(0, 3, 1, 2)  # [M, D, 4, 4]
        y = self.conv(sq)
        y = y.view(y.shape[0], y.shape[1], -1).transpose(2, 1).reshape(B, L, -1)
        y = self.act(self.norm(y))
        kv = y.view(-1, 16, y.shape[2]).transpose(0, 1)  # [16, M, C]
        out, _ = self.cross_att_pool(q.view(-1, 1, q.shape[2]).transpose(0, 1), kv, kv)
        return out.squeeze(0).view(B, -1, y.shape[2])


class PlainDSCA(nn.Module):
    """The default DSCA written the plain way (same parameter names as ours)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, c = cfg.dims[0], cfg.dims[1]
        self.patchx20_embedding_layer = _PlainCAPool(d, c)
        self.patchx5_embedding_layer = _PlainX5(d, c, cfg.emb_x5_ksize, norm=True)

        def encoder() -> nn.Module:
            layer = nn.TransformerEncoderLayer(c, cfg.tra_nhead, dim_feedforward=c,
                                               dropout=cfg.dropout, batch_first=True)
            return nn.TransformerEncoder(layer, cfg.tra_num_layers, enable_nested_tensor=False)

        self.patch_encoder_layer = encoder()
        self.patch_encoder_layer_parallel = encoder()
        self.pool = _PlainGAPool(c)
        self.out_layer = nn.Sequential(nn.Linear(c, cfg.dims[3]), nn.Sigmoid())
        self.dim = c

    def forward(self, x20: Tensor, x5: Tensor, coords: Tensor) -> Tensor:
        e20 = self.patchx20_embedding_layer(x20, x5)
        e5 = self.patchx5_embedding_layer(x5)
        c = (coords[0] - coords[0].min(dim=0).values).float()
        omega = 1.0 / 10000 ** (torch.arange(self.dim // 4, device=c.device) / (self.dim // 4 - 1))
        x, y = c[:, :1] * omega, c[:, 1:] * omega
        pe = torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)[None]
        f = self.patch_encoder_layer_parallel(e20 + pe) + self.patch_encoder_layer(e5 + pe)
        return self.out_layer(self.pool(f))


def make_models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    ours = build_model(CONFIG)
    plain = PlainDSCA(ours.cfg)
    plain.load_state_dict(ours.state_dict(), strict=True)
    return {"plain": plain.train(), "ours": ours.train()}


def make_inputs(n: int = N_PATCHES) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    x20 = torch.randn(1, 16 * n, 1024, generator=g)
    x5 = torch.randn(1, n, 1024, generator=g)
    coords = torch.randint(0, 40, (1, n, 2), generator=g)
    return x20, x5, coords


def make_step(model: nn.Module, inputs: tuple[Tensor, Tensor, Tensor]) -> Callable[[], None]:
    target = torch.tensor([[0.0, 0.0, 1.0, 0.0]])

    def step() -> None:
        hazards = model(*inputs)
        F.binary_cross_entropy(hazards, target).backward()
        model.zero_grad(set_to_none=True)

    return step


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory(impl: str) -> int:
    """Peak RSS growth (bytes) of one training step, in this (fresh) process.

    The peak is the kernel's high-water mark of this process's memory (VmHWM), reset just
    before the step through /proc/self/clear_refs. (getrusage's ru_maxrss would not do: Linux
    carries it over from the parent across fork/exec, so under pytest it reports pytest's RSS.)
    """
    torch.set_num_threads(THREADS)
    models = make_models()
    model = models[impl]
    del models
    step = make_step(model, make_inputs())
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - before) * 1024


def _memory_in_subprocess(impl: str, fixed_mmap_threshold: bool = False) -> int:
    """Peak RSS growth of one step in a fresh interpreter.

    With ``fixed_mmap_threshold`` glibc's mmap threshold is pinned at 128 KiB (its default
    before it adapts): large blocks then go back to the system when freed, so RSS follows the
    tensors' working set instead of the allocator's heap retention, which adds ~100 MiB of
    run-to-run noise to both implementations.
    """
    env = dict(os.environ)
    if fixed_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "memory", impl],
        check=True, capture_output=True, text=True, env=env,
    )
    return int(json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_growth"])


# -- pytest-benchmark -------------------------------------------------------------------------

GROUP = f"DSCA train step, N={N_PATCHES}, {THREADS} threads"


def _setup() -> tuple[dict[str, nn.Module], tuple[Tensor, Tensor, Tensor]]:
    torch.set_num_threads(THREADS)
    return make_models(), make_inputs()


def test_bench_train_step_plain(benchmark, bench_report):
    models, inputs = _setup()
    benchmark.group = GROUP
    benchmark.pedantic(make_step(models["plain"], inputs), rounds=5, warmup_rounds=1)
    bench_report.record("model/plain", benchmark)


def test_bench_train_step_ours(benchmark, bench_report):
    models, inputs = _setup()
    benchmark.group = GROUP
    benchmark.pedantic(make_step(models["ours"], inputs), rounds=5, warmup_rounds=1)
    bench_report.record("model/ours", benchmark)


def test_bench_model_ratios(bench_report):
    """Speed-up from interleaved steps (robust to a shared machine), memory in subprocesses."""
    models, inputs = _setup()
    with torch.no_grad():  # same weights -> same hazards (eval, small bag)
        small = make_inputs(40)
        torch.testing.assert_close(
            models["ours"].eval()(*small), models["plain"].eval()(*small), atol=1e-5, rtol=1e-4
        )
    steps = {k: make_step(m.train(), inputs) for k, m in models.items()}
    for s in steps.values():
        s()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(5):
        for k, s in steps.items():
            t0 = time.perf_counter()
            s()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    mem = {k: _memory_in_subprocess(k) for k in steps}
    mem_fixed = {k: _memory_in_subprocess(k, fixed_mmap_threshold=True) for k in steps}
    cfg = models["ours"].cfg
    macs, plain_macs = count_macs(cfg, N_PATCHES), count_macs(cfg, N_PATCHES, "plain")
    lines = [
        f"{GROUP}: parameters {count_parameters(models['ours']):,}; forward GMAC plain "
        f"{plain_macs['total'] / 1e9:.1f}, ours {macs['total'] / 1e9:.1f}",
        f"{GROUP}: step time (median of 5 interleaved) plain {med['plain']:.2f} s, ours "
        f"{med['ours']:.2f} s -> speed-up {med['plain'] / med['ours']:.2f}x (goal >= 1.5x); "
        f"best of 5: plain {best['plain']:.2f} s, ours {best['ours']:.2f} s -> "
        f"{best['plain'] / best['ours']:.2f}x",
        f"{GROUP}: peak RSS growth plain {mem['plain'] / 2**20:.0f} MiB, ours "
        f"{mem['ours'] / 2**20:.0f} MiB -> ratio {mem['ours'] / mem['plain']:.2f} (goal <= 0.6)",
        f"{GROUP}: same, glibc mmap threshold pinned: plain {mem_fixed['plain'] / 2**20:.0f} MiB, "
        f"ours {mem_fixed['ours'] / 2**20:.0f} MiB -> ratio "
        f"{mem_fixed['ours'] / mem_fixed['plain']:.2f}",
    ]
    for line in lines:
        bench_report.add(line)
        print(line)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "memory" and sys.argv[2] in ("ours", "plain"):
        print(json.dumps({"impl": sys.argv[2], "peak_rss_growth": measure_memory(sys.argv[2])}))
    else:
        sys.exit("usage: test_bench_model.py memory ours|plain")
