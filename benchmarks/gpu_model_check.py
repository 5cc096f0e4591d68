"""Whole-model checks and benchmarks on a CUDA machine (run by ``benchmarks/gpu_check.sh``).

    python benchmarks/gpu_model_check.py train-step OUT.json   # plain vs ours, N = 1k/4k/16k
    python benchmarks/gpu_model_check.py compile OUT.json      # torch.compile over bag sizes
    python benchmarks/gpu_model_check.py second-gpu OUT.json   # the model and CAPool on cuda:1
    python benchmarks/gpu_model_check.py smoke OUT.json        # the first two on the CPU, tiny
                                                               # (tests/test_benchmark_scripts.py)

Each writes a JSON with the measurements and a ``goals`` list of {goal, value, met}; the exit
status is 1 when a check fails (a goal not met is reported, not a failure) and 3 when it could
not run here (one GPU for ``second-gpu``).
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_bench_model import PlainDSCA  # noqa: E402  (the plain formulation of the network)

from dsca import build_model  # noqa: E402
from dsca.kernels import capool  # noqa: E402

CONFIG = {"dims": "1024-384-384-4"}  # other keys: the reference's defaults; capool_backend auto
# equalities are checked in exact fp32: cuDNN's default TF32 convolutions would differ at 1e-3
torch.backends.cudnn.allow_tf32 = False


def _inputs(n: int, device: str, seed: int = 0, dim: int = 1024) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16 * n, dim, generator=g).to(device),
            torch.randn(1, n, dim, generator=g).to(device),
            torch.randint(0, 4 * int(n**0.5) + 1, (1, n, 2), generator=g).to(device))


def _step(model: nn.Module, inputs: tuple[Tensor, ...], amp: torch.dtype | None) -> Callable[[], None]:
    device = inputs[0].device.type
    target = torch.tensor([[0.0, 0.0, 1.0, 0.0]], device=device)

    def step() -> None:
        with torch.autocast(device, dtype=amp, enabled=amp is not None):
            hazards = model(*inputs)
        F.binary_cross_entropy(hazards.float(), target).backward()
        model.zero_grad(set_to_none=True)

    return step


def _time_and_peak(step: Callable[[], None], device: str, repeats: int = 5) -> tuple[float, float | None]:
    """Median seconds of ``repeats`` steps and the peak CUDA memory (MiB) above the start."""
    cuda = device == "cuda"
    step()
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None
    return statistics.median(times), peak


def train_step(device: str = "cuda", sizes: tuple[int, ...] = (1000, 4000, 16000),
               config: dict = CONFIG) -> dict:
    torch.manual_seed(0)
    ours = build_model(config).to(device).train()
    plain = PlainDSCA(ours.cfg).to(device).train()
    plain.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        small = _inputs(40, device, dim=ours.cfg.dims[0])
        err = (ours.eval()(*small) - plain.eval()(*small)).abs().max().item()
    ours.train(), plain.train()
    rows, goals = [], []
    for amp in (None, torch.bfloat16):
        for n in sizes:
            inputs = _inputs(n, device, dim=ours.cfg.dims[0])
            t_plain, m_plain = _time_and_peak(_step(plain, inputs, amp), device)
            t_ours, m_ours = _time_and_peak(_step(ours, inputs, amp), device)
            tag = "fp32" if amp is None else "bf16"
            rows.append({"n": n, "amp": tag, "plain_s": t_plain, "ours_s": t_ours,
                         "speedup": t_plain / t_ours, "plain_peak_mib": m_plain,
                         "ours_peak_mib": m_ours,
                         "peak_ratio": m_ours / m_plain if m_plain else None})
            goals.append({"goal": f"train step N={n} {tag}: ours >= 2x plain",
                          "value": t_plain / t_ours, "met": t_plain / t_ours >= 2.0})
            del inputs
            if device == "cuda":
                torch.cuda.empty_cache()
    return {"eval_max_abs_diff_vs_plain": err, "rows": rows, "goals": goals,
            "ok": err < 1e-4}


def compile_check(device: str = "cuda", sizes: tuple[int, ...] = (300, 517, 1024, 1999),
                  config: dict = CONFIG) -> dict:
    """torch.compile (inductor) of the model, dynamic shapes: equal to eager on every bag
    size, no new graphs after the second size."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = build_model(config).to(device).eval()
    compiled = torch.compile(model, dynamic=True)
    counters.clear()
    rows = []
    with torch.no_grad():
        for n in sizes:
            x = _inputs(n, device, seed=n, dim=model.cfg.dims[0])
            diff = (compiled(*x) - model(*x)).abs().max().item()
            rows.append({"n": n, "max_abs_diff": diff, "graphs": counters["stats"]["unique_graphs"]})
    new_graphs = rows[-1]["graphs"] - rows[1]["graphs"]
    ok = all(r["max_abs_diff"] < 1e-4 for r in rows) and new_graphs == 0
    return {"rows": rows, "graphs_after_second_size": new_graphs, "ok": ok}


def second_gpu() -> dict:
    if torch.cuda.device_count() < 2:
        return {"skipped": f"{torch.cuda.device_count()} CUDA device(s)", "ok": True}
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(384, 4)
    x = torch.randn(512, 16, 384)
    q = torch.randn(512, 384)
    ref, _ = capool(x, q, mha, backend="torch")
    mha1 = mha.to("cuda:1")
    with torch.cuda.device(0):  # the current device is another GPU than the tensors'
        got, _ = capool(x.to("cuda:1"), q.to("cuda:1"), mha1, backend="triton")
    capool_err = (got.cpu() - ref).abs().max().item()
    model = build_model(CONFIG)
    inputs = _inputs(200, "cpu")
    with torch.no_grad():
        want = model.eval()(*inputs)
        with torch.cuda.device(0):
            out = model.to("cuda:1")(*(t.to("cuda:1") for t in inputs))
    model_err = (out.cpu() - want).abs().max().item()
    return {"capool_max_abs_diff": capool_err, "model_max_abs_diff": model_err,
            "ok": capool_err < 1e-4 and model_err < 1e-4}


def smoke() -> dict:
    """The train-step and compile checks on the CPU with a tiny network (no goals judged)."""
    tiny = {"dims": "32-16-16-4", "tra_nhead": 2, "capool_backend": "torch"}
    step = train_step("cpu", (6,), tiny)
    compiled = compile_check("cpu", (5, 7, 9), {**tiny, "dropout": 0.0})
    return {"train_step": step, "compile": compiled, "ok": step["ok"] and compiled["ok"]}


def main(argv: list[str]) -> int:
    checks = {"train-step": train_step, "compile": compile_check, "second-gpu": second_gpu,
              "smoke": smoke}
    if len(argv) != 2 or argv[0] not in checks:
        print(__doc__, file=sys.stderr)
        return 2
    result = checks[argv[0]]()
    result["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    Path(argv[1]).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    if result.get("skipped"):
        return 3
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
