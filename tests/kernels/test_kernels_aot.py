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
           "--block-h", "4", "--quick", "--jobs", "2", "--json", str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    failures = [line for line in res.stdout.splitlines() if line.startswith("FAILED")]
    assert res.returncode == 0 and not failures, "\n".join(failures) or res.stderr[-3000:]
    results = json.loads(out.read_text())
    # fwd + bwd for each config, arch and dtype: nothing silently skipped
    assert len(results) == 2 * len(autotune_configs()) * len(ARCHS) * len(DTYPES)
    assert all(r["ok"] for r in results)
    seen = {(r["kernel"], r["arch"], r["dtype"]) for r in results}
    assert seen == {(k, a, d) for k in ("fwd", "bwd") for a in ARCHS for d in DTYPES}


def test_compile_refuses_interpreter_mode() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-m", "dsca.kernels.aot", "--arch", "90"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "unset TRITON_INTERPRET" in res.stderr
