"""CAPool kernels: square pooling + cross-attention over 4x4 high-res blocks.

Public API: :func:`capool` (the one entry point, dispatching between variants), its weights
type :class:`CAPoolWeights`, and the PyTorch formulations it is tested against.

Layout: ``dispatch.py`` (dispatcher and shape check), ``reference.py`` (the math: plain and
folded), ``fused_cpu.py`` (LayerNorm + ReLU fused into the core), ``triton_capool.py`` (Triton
kernels, launcher, autograd), ``aot.py`` (ahead-of-time compile check for GPU targets).
"""
from __future__ import annotations

from dsca.kernels.dispatch import BACKENDS, Backend, capool, resolve_backend
from dsca.kernels.reference import capool_folded, capool_logits, capool_plain
from dsca.kernels.weights import CAPoolWeights, as_weights

__all__ = [
    "BACKENDS",
    "Backend",
    "CAPoolWeights",
    "as_weights",
    "capool",
    "capool_folded",
    "capool_logits",
    "capool_plain",
    "resolve_backend",
]
