"""CAPool kernels: square pooling + cross-attention over 4x4 high-res blocks.

Public API: :func:`capool` (dispatching) and the PyTorch references.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from typing import Literal

from torch import Tensor

from dsca.kernels.reference import AttendPool, attend_pool_torch, capool_folded, capool_plain

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


def _triton_unavailable_reason(device_type: str) -> str | None:
    """Why the Triton backend cannot run on tensors of ``device_type`` (None when it can)."""
    if importlib.util.find_spec("triton") is None:
        return "the 'triton' package is not installed"
    if device_type == "cuda":
        return None
    # the interpreter mode is fixed when the kernels are decorated (module import)
    if sys.modules.get("dsca.kernels.triton_capool") is not None:
        from dsca.kernels.triton_capool import INTERPRETED

        interpreted = INTERPRETED
    else:
        interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if interpreted:
        return None
    return (
        f"it needs CUDA tensors, got {device_type} tensors; use backend='torch' or 'auto', or "
        "set TRITON_INTERPRET=1 before importing dsca to run the kernels (slowly) on the CPU"
    )


def _check_shapes(x20: Tensor, query: Tensor, in_proj_weight: Tensor, num_heads: int) -> None:
    if x20.dim() != 3 or x20.shape[1] != 16:
        raise ValueError(f"CAPool: x20 must be [M, 16, C], got {list(x20.shape)}")
    M, _, C = x20.shape
    if tuple(query.shape) != (M, C):
        raise ValueError(f"CAPool: query must be [M, C] = {[M, C]}, got {list(query.shape)}")
    if num_heads < 1 or C % num_heads:
        raise ValueError(f"CAPool: num_heads={num_heads} must divide C={C}")
    if tuple(in_proj_weight.shape) != (3 * C, C):
        raise ValueError(
            f"CAPool: in_proj_weight must be [3C, C] = {[3 * C, C]}, "
            f"got {list(in_proj_weight.shape)}"
        )
    if query.device != x20.device:
        raise ValueError(f"CAPool: x20 on {x20.device} but query on {query.device}")


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

    Raises:
        ValueError: bad shapes or an unknown backend.
        RuntimeError: ``backend="triton"`` where Triton cannot run.
    """
    _check_shapes(x20, query, in_proj_weight, num_heads)
    chosen = resolve_backend(backend, x20.device.type)
    attend: AttendPool = attend_pool_torch
    if chosen == "triton":
        reason = _triton_unavailable_reason(x20.device.type)
        if reason is not None:
            raise RuntimeError(f"CAPool backend 'triton' cannot run: {reason}")
        from dsca.kernels.triton_capool import attend_pool_triton

        attend = attend_pool_triton
    return capool_folded(
        x20, query, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, num_heads,
        attend=attend,
    )
