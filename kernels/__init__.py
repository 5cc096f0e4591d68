"""CAPool kernels: square pooling + cross-attention over 4x4 high-res blocks.

Public API: :func:`capool` (dispatching) and the PyTorch references.
"""
from __future__ import annotations

from typing import Literal

from torch import Tensor

from dsca.kernels.reference import capool_folded, capool_plain

__all__ = ["Backend", "capool", "capool_folded", "capool_plain", "resolve_backend"]

Backend = Literal["auto", "triton", "torch"]
_BACKENDS = ("auto", "triton", "torch")


def resolve_backend(backend: str, device_type: str) -> str:
    """Map a requested backend to the one that runs: ``auto`` = Triton on CUDA, else torch."""
    if backend not in _BACKENDS:
        raise ValueError(f"unknown CAPool backend {backend!r}; choose one of {_BACKENDS}")
    if backend == "auto":
        return "triton" if device_type == "cuda" else "torch"
    return backend


def capool(
    x20: Tensor,
    query: Tensor,
    in_proj_weight: Tensor,
    in_proj_bias: Tensor,
    out_proj_weight: Tensor,
    out_proj_bias: Tensor,
    num_heads: int,
    backend: Backend = "auto",
) -> tuple[Tensor, Tensor]:
    """Cross-attention pooling of each block of 16 rows with its x5 query.

    Args:
        x20: [M, 16, C] embedded high-res rows (block-major).
        query: [M, C] x5 embedding per block.
        in_proj_weight, in_proj_bias: [3C, C], [3C] (nn.MultiheadAttention layout).
        out_proj_weight, out_proj_bias: [C, C], [C].
        num_heads: number of heads H (divides C).
        backend: "auto" | "triton" | "torch"; every backend computes the same function.

    Returns:
        pooled [M, C] and attention probabilities [M, H, 16].
    """
    chosen = resolve_backend(backend, x20.device.type)
    if chosen == "triton":
        from dsca.kernels.triton_capool import capool_triton

        return capool_triton(
            x20, query, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, num_heads
        )
    return capool_folded(
        x20, query, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, num_heads
    )
