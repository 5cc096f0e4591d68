"""A bandwidth model of the CAPool kernels, on paper: bytes and FLOPs per block, the time at a
GPU's DRAM bandwidth, and whether a compiled config keeps enough loads in flight to reach half
of that bandwidth. Used by ``python -m dsca.kernels.aot --report``.

Per block (16 rows, H heads, C channels, element size e bytes; p is always fp32):

    forward   reads k [H, C] and x [16, C] (its second pass over x hits L2), writes r [H, C]
              and p [H, 16]; FLOPs 2 * 2 * H * 16 * C (logits, pooling)
    backward  reads g [H, C], k [H, C], x [16, C] (again from L2 in its second pass), p and
              optionally dL/dp [H, 16]; writes dk [H, C], dx [16, C]; FLOPs 4 * 2 * H * 16 * C

Both are far below any GPU's FLOP/byte ridge point, so their time is bytes / bandwidth. To get
there a streaming kernel needs about bandwidth x latency bytes in flight (Little's law); each
resident program has one C chunk of loads outstanding per pipeline stage (one on sm_70, which
has no async copies), and registers,
warps and shared memory bound the programs per SM. The latency is an assumption (loaded DRAM
latency of these GPUs is roughly half a microsecond); the model is a filter for configs that
cannot work, not a prediction to quote.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["GPUS", "annotate", "format_report"]

C = 384  # the study's embedding size
HEADS = 4
M_BLOCKS = 4096  # blocks of one large slide, the benchmarks' reference size
LATENCY_S = 600e-9
_ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


@dataclass(frozen=True)
class GPU:
    name: str
    bandwidth: float  # bytes / s
    sms: int
    shared_per_sm: int  # bytes
    registers_per_sm: int = 65536
    threads_per_sm: int = 2048
    programs_per_sm: int = 32


GPUS: dict[int, tuple[GPU, ...]] = {
    70: (GPU("V100", 900e9, 80, 96 * 1024),),
    80: (GPU("A100-80GB", 2.04e12, 108, 164 * 1024),),
    90: (GPU("H100-SXM", 3.35e12, 132, 228 * 1024), GPU("H200", 4.8e12, 132, 228 * 1024)),
}


def traffic(kernel: str, dtype: str, has_gp: bool) -> tuple[int, int]:
    """(DRAM bytes, FLOPs) of one block at C = 384, 4 heads."""
    e = _ELEMENT_BYTES[dtype]
    hc, jc, hj = HEADS * C, 16 * C, HEADS * 16
    if kernel == "fwd":
        return (2 * hc + jc) * e + 4 * hj, 4 * hj * C
    return (3 * hc + 2 * jc) * e + 4 * hj * (2 if has_gp else 1), 8 * hj * C


def _programs_per_sm(gpu: GPU, registers: int, warps: int, shared: int) -> int:
    threads = 32 * warps
    # registers are allocated per warp, in units of 256
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = gpu.registers_per_sm // max(1, warps * per_warp)
    by_shared = gpu.shared_per_sm // shared if shared else gpu.programs_per_sm
    return max(0, min(gpu.programs_per_sm, gpu.threads_per_sm // threads, by_registers, by_shared))


def annotate(result: dict[str, Any]) -> dict[str, Any]:
    """A compiled job's result (``aot.run_job``) with the model's numbers added."""
    e = _ELEMENT_BYTES[result["dtype"]]
    rows_per_chunk = 16 + (1 if result["kernel"] == "fwd" else 2) * result["block_h"]
    # prefetching stages need async copies (sm_80+); on sm_70 one chunk is in flight
    stages = result["num_stages"] if result["arch"] >= 80 else 1
    in_flight = rows_per_chunk * result["block_c"] * e * stages
    nbytes, flops = traffic(result["kernel"], result["dtype"], result.get("has_gp", False))
    per_gpu = {}
    for gpu in GPUS.get(result["arch"], ()):
        programs = _programs_per_sm(gpu, result["registers"], result["num_warps"],
                                    result["shared_bytes"])
        needed = gpu.bandwidth * LATENCY_S / gpu.sms
        per_gpu[gpu.name] = {
            "predicted_us": M_BLOCKS * nbytes / gpu.bandwidth * 1e6,
            "programs_per_sm": programs,
            "bandwidth_fraction": min(1.0, programs * in_flight / needed),
        }
    fraction = min((g["bandwidth_fraction"] for g in per_gpu.values()), default=1.0)
    spills = result["spill_store_bytes"] + result["spill_load_bytes"]
    return {**result, "bytes_per_block": nbytes, "flops_per_block": flops, "gpus": per_gpu,
            "bandwidth_fraction": fraction, "keeps_bandwidth": spills == 0 and fraction >= 0.5}


def format_report(results: list[dict[str, Any]]) -> str:
    """One line per compiled config: resources, traffic and the model's verdict."""
    lines = [f"bandwidth model: C={C}, {HEADS} heads, M={M_BLOCKS} blocks, latency "
             f"{LATENCY_S * 1e9:.0f} ns (kernels/_roofline.py)",
             "kernel arch dtype  BLOCK_C warps stages BLOCK_H | regs spill smem | B/block "
             "FLOP/B | predicted us @GPU (programs/SM, bandwidth share) | verdict"]
    for r in sorted((r for r in results if r.get("ok")),
                    key=lambda r: (r["kernel"], r["arch"], r["dtype"], r["block_c"],
                                   r["num_warps"], r["num_stages"], r["block_h"], r["has_gp"])):
        if "gpus" not in r:
            continue
        gpus = ", ".join(f"{g['predicted_us']:.1f} @{name} ({g['programs_per_sm']}, "
                         f"{g['bandwidth_fraction']:.0%})" for name, g in r["gpus"].items())
        kernel = r["kernel"] + ("+gp" if r["has_gp"] else "")
        spill = r["spill_store_bytes"] + r["spill_load_bytes"]
        lines.append(
            f"{kernel:6} sm_{r['arch']} {r['dtype']:5} {r['block_c']:7} {r['num_warps']:5} "
            f"{r['num_stages']:6} {r['block_h']:7} | {r['registers']:4} {spill:5} "
            f"{r['shared_bytes']:5} | {r['bytes_per_block']:7} "
            f"{r['flops_per_block'] / r['bytes_per_block']:6.1f} | {gpus} | "
            f"{'ok' if r['keeps_bandwidth'] else 'REWORK: spills or < 50% of bandwidth'}")
    return "\n".join(lines)
