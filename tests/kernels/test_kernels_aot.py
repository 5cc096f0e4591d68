"""Compile every CAPool kernel and autotune config for sm_70, sm_80 and sm_90, fp32/fp16/bf16.

The interpreter accepts code that GPU compilers reject (and runs bf16 wrongly), so the kernels
are also compiled down to cubins for real targets; no GPU is needed. It runs in a subprocess
because TRITON_INTERPRET=1 is set in this one and an interpreted kernel cannot be compiled.
Compiled kernels land in Triton's cache, so a rerun of unchanged kernels is fast.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from dsca.kernels.triton_capool import autotune_configs

ARCHS = (70, 80, 90)
DTYPES = ("fp32", "fp16", "bf16")


def test_every_kernel_config_compiles_for_gpu_targets(tmp_path: Path) -> None:
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "dsca.kernels.aot", "--arch", *map(str, ARCHS), "--dtype", *DTYPES,
           "--block-h", "4", "--quick", "--jobs", "2", "--report", "--json", str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    failures = [line for line in res.stdout.splitlines() if line.startswith(("FAILED", "REWORK"))]
    assert res.returncode == 0 and not failures, "\n".join(failures) or res.stderr[-3000:]
    results = json.loads(out.read_text())
    # fwd + bwd for each config, arch and dtype: nothing silently skipped
    n_configs = len(autotune_configs("fwd")) + len(autotune_configs("bwd"))
    assert len(results) == n_configs * len(ARCHS) * len(DTYPES)
    assert all(r["ok"] for r in results)
    seen = {(r["kernel"], r["arch"], r["dtype"]) for r in results}
    assert seen == {(k, a, d) for k in ("fwd", "bwd") for a in ARCHS for d in DTYPES}
    # --report: ptxas resource usage and the bandwidth model of every config DSCA launches
    assert all(r["registers"] > 0 and r["spill_store_bytes"] == 0 for r in results)
    assert all(r["keeps_bandwidth"] and r["bandwidth_fraction"] >= 0.5 for r in results)
    assert "bandwidth model: C=384" in res.stdout


def test_compile_refuses_interpreter_mode() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-m", "dsca.kernels.aot", "--arch", "90"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "unset TRITON_INTERPRET" in res.stderr


def test_bandwidth_model_counts_bytes_and_flops_by_hand() -> None:
    """Forward, bf16, C = 384, 4 heads: reads k (4*384) and x (16*384) once, writes r (4*384) in
    2 bytes and p (4*16) in 4 bytes; 2 FLOPs per multiply-add in the logits and the pooling."""
    from dsca.kernels._roofline import GPUS, annotate, traffic

    assert traffic("fwd", "bf16", False) == ((2 * 4 * 384 + 16 * 384) * 2 + 4 * 64, 4 * 64 * 384)
    assert traffic("bwd", "fp32", True) == ((3 * 4 * 384 + 2 * 16 * 384) * 4 + 4 * 64 * 2,
                                            8 * 64 * 384)
    h200 = next(g for g in GPUS[90] if g.name == "H200")
    job = {"kernel": "fwd", "arch": 90, "dtype": "bf16", "block_c": 64, "num_warps": 4,
           "num_stages": 2, "block_h": 4, "has_gp": False, "registers": 80,
           "spill_store_bytes": 0, "spill_load_bytes": 0, "shared_bytes": 2048}
    got = annotate(job)
    assert got["gpus"]["H200"]["predicted_us"] == 4096 * 18688 / h200.bandwidth * 1e6
    assert got["gpus"]["H200"]["programs_per_sm"] == 6  # 65536 regs / (80 * 128 threads)
    spilling = annotate({**job, "spill_store_bytes": 8})
    assert not spilling["keeps_bandwidth"]
