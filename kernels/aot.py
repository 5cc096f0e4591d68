"""Ahead-of-time compilation of every CAPool kernel and autotune config for real GPU targets.

The interpreter (TRITON_INTERPRET=1) is lenient where GPU compilers are not, so the tests
also compile each (kernel, config, dtype, arch) down to a cubin here, on a machine without a
GPU. Run it in a process where TRITON_INTERPRET is unset: interpreted kernels cannot compile.

    python -m dsca.kernels.aot --arch 70 80 90 --dtype fp32 fp16 bf16
    python -m dsca.kernels.aot --report            # + registers, spills, shared memory, and the
                                                   # bandwidth model of each config (below)

Resource usage comes from Triton's bundled ``ptxas -v`` on each kernel's PTX. The bandwidth
model (``kernels/_roofline.py``) gives each kernel's bytes and FLOPs per block, its time at
the GPU's DRAM bandwidth, and whether a config keeps enough loads in flight to reach half of it.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from dsca.kernels.interpreter import interpreter_requested

__all__ = ["CompileJob", "compile_jobs", "run_job"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompileJob:
    """One kernel specialization to compile."""

    kernel: str  # "fwd" | "bwd"
    arch: int
    dtype: str  # Triton pointer dtype of the data tensors: fp32 | fp16 | bf16
    block_c: int
    num_warps: int
    num_stages: int
    block_h: int
    has_gp: bool = False


def compile_jobs(
    archs: list[int],
    dtypes: list[str],
    block_h: tuple[int, ...] = (4, 8),
    has_gp: tuple[bool, ...] = (False, True),
) -> list[CompileJob]:
    """Every (kernel, config, dtype, arch) the autotuner can launch, for the given head tiles.

    ``has_gp=(True,)`` compiles only the backward variant that also reads dL/dattention (a
    superset of the other's code), which halves the work for quick checks.
    """
    from dsca.kernels.triton_capool import autotune_configs

    jobs = []
    for arch in archs:
        for dtype in dtypes:
            for bh in block_h:
                for kernel in ("fwd", "bwd"):
                    for cfg in autotune_configs(kernel):
                        common = (arch, dtype, cfg.kwargs["BLOCK_C"], cfg.num_warps,
                                  cfg.num_stages, bh)
                        if kernel == "fwd":
                            jobs.append(CompileJob("fwd", *common))
                        else:
                            jobs.extend(CompileJob("bwd", *common, has_gp=gp) for gp in has_gp)
    return jobs


def run_job(job: CompileJob, with_usage: bool = False) -> dict:
    """Compile one job to a cubin; returns the job with ``ok``, ``error`` and register count."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dsca.kernels import triton_capool as tc

    fn = tc._capool_fwd_kernel if job.kernel == "fwd" else tc._capool_bwd_kernel
    data = f"*{job.dtype}"
    if job.kernel == "fwd":
        ptrs = {"k_ptr": data, "x_ptr": data, "r_ptr": data, "p_ptr": "*fp32"}
        constexprs = {"BLOCK_H": job.block_h, "BLOCK_C": job.block_c}
    else:
        ptrs = {"gr_ptr": data, "gp_ptr": "*fp32", "k_ptr": data, "x_ptr": data,
                "p_ptr": "*fp32", "dk_ptr": data, "dx_ptr": data}
        constexprs = {"HAS_GP": job.has_gp, "BLOCK_H": job.block_h, "BLOCK_C": job.block_c}
    signature = {
        name: ptrs.get(name, "constexpr" if name in constexprs else "i32") for name in fn.arg_names
    }
    result = asdict(job)
    try:
        compiled = triton.compile(
            ASTSource(fn=fn, signature=signature, constexprs=constexprs),
            target=GPUTarget("cuda", job.arch, 32),
            options={"num_warps": job.num_warps, "num_stages": job.num_stages},
        )
        result.update(ok="cubin" in compiled.asm and len(compiled.asm["cubin"]) > 0, error="")
        result["shared_bytes"] = int(compiled.metadata.shared)
        if with_usage:
            try:
                result.update(ptxas_usage(compiled.asm["ptx"]), usage_error="")
            except Exception as exc:  # noqa: BLE001 - reported, not a compile failure
                result["usage_error"] = f"{type(exc).__name__}: {exc}"[:300]
    except Exception as exc:  # noqa: BLE001 - every compiler failure is a finding to report
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        result.update(ok=False, error=f"{type(exc).__name__}: {first_line}")
    return result


_USAGE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_store_bytes": re.compile(r"(\d+) bytes spill stores"),
    "spill_load_bytes": re.compile(r"(\d+) bytes spill loads"),
    "stack_bytes": re.compile(r"(\d+) bytes stack frame"),
}


def ptxas_usage(ptx: str) -> dict[str, int]:
    """Registers, spills and stack of a kernel from ``ptxas -v`` (the ptxas Triton bundles), for
    the target the PTX names."""
    from triton.backends.nvidia.compiler import get_ptxas

    target = re.search(r"^\.target\s+(\S+)", ptx, re.MULTILINE)
    if target is None:
        raise ValueError("the PTX names no .target")
    # the ptxas Triton itself assembles this target with (sm_90+ uses a newer one)
    ptxas = get_ptxas(int(re.sub(r"\D", "", target.group(1)))).path
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        res = subprocess.run([str(ptxas), "-v", f"--gpu-name={target.group(1)}", str(src),
                              "-o", str(Path(tmp) / "kernel.cubin")],
                             capture_output=True, text=True, check=True)
    text = res.stdout + res.stderr
    return {key: int(m.group(1)) if (m := rx.search(text)) else 0 for key, rx in _USAGE.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[70, 80, 90])
    parser.add_argument("--dtype", nargs="+", default=["fp32", "fp16", "bf16"])
    parser.add_argument("--block-h", type=int, nargs="+", default=[4, 8], help="head tiles")
    parser.add_argument("--quick", action="store_true", help="backward only with dL/dattention")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--json", help="write every result here")
    parser.add_argument("--report", action="store_true",
                        help="print resource usage and the bandwidth model of every config")
    args = parser.parse_args(argv)
    if interpreter_requested():
        print("error: unset TRITON_INTERPRET to compile for GPU targets", file=sys.stderr)
        return 2
    jobs = compile_jobs(
        args.arch, args.dtype, tuple(args.block_h), (True,) if args.quick else (False, True)
    )
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(functools.partial(run_job, with_usage=args.report), jobs))
    failed = [r for r in results if not r["ok"]]
    for r in failed:
        print(
            f"FAILED {r['kernel']} sm_{r['arch']} {r['dtype']} BLOCK_C={r['block_c']} "
            f"warps={r['num_warps']} stages={r['num_stages']} BLOCK_H={r['block_h']} "
            f"HAS_GP={r['has_gp']}: {r['error']}"
        )
    print(f"compiled {len(results) - len(failed)}/{len(results)} kernel specializations")
    if args.report:
        from dsca.kernels._roofline import annotate, format_report

        results = [annotate(r) if r["ok"] and not r.get("usage_error") else r for r in results]
        for r in results:
            if r.get("usage_error"):
                print(f"NO USAGE {r['kernel']} sm_{r['arch']} {r['dtype']}: {r['usage_error']}")
        print(format_report(results))
        # the verdict binds the head tile DSCA launches (4 heads); others are for information
        rework = [r for r in results
                  if r["ok"] and not r.get("keeps_bandwidth", False) and r["block_h"] == 4]
        for r in rework:
            print(f"REWORK {r['kernel']} sm_{r['arch']} {r['dtype']} BLOCK_C={r['block_c']} "
                  f"warps={r['num_warps']} stages={r['num_stages']}: spills or < 50% of bandwidth")
        failed += rework
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
