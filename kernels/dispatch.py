"""CAPool, the one entry point: cross-attention pooling of each 4x4 block of x20 rows.

    capool(x20, query, weights, *, norm=None, backend="auto") -> (pooled [M, C], attention [M, H, 16])

Every variant computes the same function; what differs is how (``reference.py`` has the math):

========  ====================================================  ==============================
variant   what runs                                             chosen by
========  ====================================================  ==============================
plain     ``nn.MultiheadAttention``'s math, K and V of all rows  ``backend="plain"`` (baseline)
torch     folded projections, PyTorch attend-and-pool core       ``"torch"``; ``"auto"`` off CUDA
fused     the torch variant with the LayerNorm + ReLU prologue   ``norm`` given, torch variant,
          fused into the core (``fused_cpu.py``)                 autocast off
triton    folded projections, Triton core (``triton_capool.py``) ``"triton"``; ``"auto"`` on CUDA
========  ====================================================  ==============================

The equalities are proved by ``tests/kernels/test_kernels_capool.py`` (each variant against
``nn.MultiheadAttention``, values and gradients) and, inside the model, by
``tests/model/test_model_equivalence.py`` and ``tests/kernels/test_kernels_model.py``.
"""
from __future__ import annotations

import importlib.util
import sys
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsca.coords import BLOCK
from dsca.kernels.fused_cpu import norm_relu_attend
from dsca.kernels.interpreter import interpreter_requested
from dsca.kernels.reference import AttendPool, attend_pool_torch, capool_folded, capool_plain
from dsca.kernels.weights import CAPoolWeights, as_weights

__all__ = ["BACKENDS", "Backend", "capool", "resolve_backend"]

Backend = Literal["auto", "triton", "torch", "plain"]
BACKENDS = ("auto", "triton", "torch", "plain")


def resolve_backend(backend: str, device_type: str) -> str:
    """The backend that runs for a requested one: ``auto`` = Triton on CUDA, else torch."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown CAPool backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        return "triton" if device_type == "cuda" else "torch"
    return backend


def _triton_unavailable_reason(device_type: str) -> str | None:
    """Why the Triton backend cannot run on tensors of ``device_type`` (None when it can)."""
    if importlib.util.find_spec("triton") is None:
        return "the 'triton' package is not installed"
    if device_type == "cuda":
        return None
    loaded = sys.modules.get("dsca.kernels.triton_capool")
    interpreted = loaded.INTERPRETED if loaded is not None else interpreter_requested()
    if interpreted:
        return None
    return (
        f"it needs CUDA tensors, got {device_type} tensors; use backend='torch' or 'auto', or "
        "set TRITON_INTERPRET=1 before importing dsca to run the kernels (slowly) on the CPU"
    )


def _check_shapes(x20: Tensor, query: Tensor, w: CAPoolWeights, norm: nn.LayerNorm | None) -> None:
    if x20.dim() != 3 or x20.shape[1] != BLOCK:
        raise ValueError(f"CAPool: x20 must be [M, {BLOCK}, C], got {list(x20.shape)}")
    M, _, C = x20.shape
    if tuple(query.shape) != (M, C):
        raise ValueError(f"CAPool: query must be [M, C] = {[M, C]}, got {list(query.shape)}")
    if w.num_heads < 1 or C % w.num_heads:
        raise ValueError(f"CAPool: num_heads={w.num_heads} must divide C={C}")
    expected = {"in_proj_weight": (3 * C, C), "in_proj_bias": (3 * C,),
                "out_proj_weight": (C, C), "out_proj_bias": (C,)}
    for name, shape in expected.items():
        got = tuple(getattr(w, name).shape)
        if got != shape:
            raise ValueError(f"CAPool: {name} must be {list(shape)}, got {list(got)}")
    if norm is not None and tuple(norm.normalized_shape) != (C,):
        raise ValueError(f"CAPool: norm must normalize [{C}], got {list(norm.normalized_shape)}")
    if query.device != x20.device:
        raise ValueError(f"CAPool: x20 on {x20.device} but query on {query.device}")


def _fuses_norm(variant: str, device_type: str) -> bool:
    """Whether a LayerNorm prologue runs fused into the attend-and-pool core: on the torch
    variant outside autocast (the fused core computes in the rows' own dtype)."""
    return variant == "torch" and not torch.is_autocast_enabled(device_type)


def _triton_core() -> AttendPool:
    from dsca.kernels.triton_capool import attend_pool_triton

    return attend_pool_triton


def capool(
    x20: Tensor,
    query: Tensor,
    weights: CAPoolWeights | nn.MultiheadAttention,
    *,
    norm: nn.LayerNorm | None = None,
    backend: Backend = "auto",
) -> tuple[Tensor, Tensor]:
    """Cross-attention pooling of each block of 16 rows with its x5 query.

    Args:
        x20: [M, 16, C] embedded high-res rows (block-major); with ``norm``, the rows before
            it: CAPool then pools ``relu(norm(x20))``.
        query: [M, C] x5 embedding per block.
        weights: the ``nn.MultiheadAttention`` holding the projections, or its
            :class:`CAPoolWeights`.
        norm: optional LayerNorm over C applied (with a ReLU) to the rows first.
        backend: "auto" | "triton" | "torch" | "plain"; every backend computes the same function.

    Returns:
        pooled [M, C] and attention probabilities [M, H, 16].

    Raises:
        ValueError: bad shapes or an unknown backend.
        RuntimeError: ``backend="triton"`` where Triton cannot run.

    Example:
        >>> mha = nn.MultiheadAttention(8, 4)
        >>> pooled, attn = capool(torch.randn(3, 16, 8), torch.randn(3, 8), mha)
        >>> pooled.shape, attn.shape
        (torch.Size([3, 8]), torch.Size([3, 4, 16]))
    """
    w = as_weights(weights)
    _check_shapes(x20, query, w, norm)
    device_type = x20.device.type
    variant = resolve_backend(backend, device_type)
    if variant == "triton":
        reason = _triton_unavailable_reason(device_type)
        if reason is not None:
            raise RuntimeError(f"CAPool backend 'triton' cannot run: {reason}")
    if norm is not None:
        if _fuses_norm(variant, device_type):
            return capool_folded(x20, query, w, attend=norm_relu_attend(norm))
        x20 = F.relu(F.layer_norm(x20, norm.normalized_shape, norm.weight, norm.bias, norm.eps),
                     inplace=True)
    if variant == "plain":
        return capool_plain(x20, query, w)
    attend = _triton_core() if variant == "triton" else attend_pool_torch
    return capool_folded(x20, query, w, attend=attend)
