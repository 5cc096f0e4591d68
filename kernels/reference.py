"""PyTorch implementations of CAPool: the plain formulation and the folded one.

CAPool pools each 4x4 block of embedded high-res rows into one vector with multi-head
cross-attention whose single query is the block's low-res (x5) embedding.

Notation (per block b, head h, head size d = C / H):
    q_b  [C]      x5 query embedding
    X_b  [16, C]  embedded x20 rows of the block
    u_h  = (W_q,h q_b + b_q,h) / sqrt(d)                    [d]
    s_hj = u_h . (W_k,h x_j + b_k,h)                       logits over the 16 rows
    p_h  = softmax_j(s_hj)                                 [16]
    o_h  = sum_j p_hj (W_v,h x_j + b_v,h)                  [d]
    out  = W_o concat_h(o_h) + b_o                         [C]

Folding (exact in real arithmetic, see docs/ARCHITECTURE.md):
    s_hj = (W_k,h^T u_h) . x_j + const_h      -> the const cancels in the softmax
    o_h  = W_v,h (sum_j p_hj x_j) + b_v,h     -> because sum_j p_hj = 1
so K and V for the 16 rows are never formed.

The folded computation splits into three stages that every backend shares:
    1. :func:`fold_query`   GEMMs: query -> key direction k_h = W_k,h^T u_h   [M, H, C]
    2. attend-and-pool      the per-block core: logits, softmax, pooled rows  [M, H, C]
    3. :func:`project_out`  GEMMs: W_v per head, b_v, out-projection          [M, C]
Only stage 2 differs between variants (:func:`attend_pool_torch` here, the fused LayerNorm
prologue in ``fused_cpu.py``, the Triton kernels in ``triton_capool.py``), so stages 1 and 3
stay on cuBLAS / the CPU BLAS for every variant. :func:`dsca.kernels.capool` picks one.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from dsca.kernels.weights import CAPoolWeights

__all__ = [
    "AttendPool",
    "attend_pool_torch",
    "capool_folded",
    "capool_logits",
    "capool_plain",
    "fold_query",
    "key_directions",
    "project_out",
    "scaled_query",
]


def scaled_query(query: Tensor, w: CAPoolWeights) -> Tensor:
    """Each head's scaled query u_h = (W_q,h q + b_q,h) / sqrt(d).

    Args:
        query: [M, C].

    Returns:
        [M, H, d] with d = C / H.
    """
    C = query.shape[-1]
    u = F.linear(query, w.in_proj_weight[:C], w.in_proj_bias[:C]) * (1.0 / math.sqrt(C // w.num_heads))
    return rearrange(u, "m (h d) -> m h d", h=w.num_heads)


def key_directions(u: Tensor, w: CAPoolWeights) -> Tensor:
    """k_h = W_k,h^T u_h: u [M, H, d] from :func:`scaled_query` -> [M, H, C]."""
    C = w.in_proj_weight.shape[1]
    w_k = rearrange(w.in_proj_weight[C : 2 * C], "(h d) c -> h d c", h=u.shape[1])
    return torch.einsum("mhd,hdc->mhc", u, w_k)


def fold_query(query: Tensor, w: CAPoolWeights) -> Tensor:
    """Key direction of each head, k_h = W_k,h^T u_h: query [M, C] -> [M, H, C].

    Its dot product with a raw x20 row is that row's logit up to the per-head constant
    u_h . b_k,h, which cancels in the softmax.
    """
    return key_directions(scaled_query(query, w), w)


def attend_pool_torch(k_dir: Tensor, x20: Tensor) -> tuple[Tensor, Tensor]:
    """Attend-and-pool core in PyTorch.

    Args:
        k_dir: [M, H, C] key directions from :func:`fold_query`.
        x20: [M, 16, C] raw embedded rows.

    Returns:
        pooled rows r_h = sum_j p_hj x_j [M, H, C] and probabilities p [M, H, 16].
    """
    logits = torch.einsum("mhc,mjc->mhj", k_dir, x20)
    attn = logits.softmax(dim=-1)
    return torch.einsum("mhj,mjc->mhc", attn, x20), attn


def project_out(pooled_rows: Tensor, w: CAPoolWeights) -> Tensor:
    """Value projection after pooling, then the out-projection.

    Args:
        pooled_rows: [M, H, C].

    Returns:
        [M, C]: W_o concat_h(W_v,h r_h + b_v,h) + b_o.
    """
    num_heads, C = pooled_rows.shape[-2:]
    w_v = rearrange(w.in_proj_weight[2 * C :], "(h d) c -> h d c", h=num_heads)
    b_v = rearrange(w.in_proj_bias[2 * C :], "(h d) -> h d", h=num_heads)
    heads = torch.einsum("mhc,hdc->mhd", pooled_rows, w_v) + b_v
    return F.linear(rearrange(heads, "m h d -> m (h d)"), w.out_proj_weight, w.out_proj_bias)


#: The attend-and-pool core: (k_dir [M,H,C], x20 [M,16,C]) -> (pooled rows [M,H,C],
#: probabilities [M,H,16]).
AttendPool = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def capool_folded(
    x20: Tensor, query: Tensor, w: CAPoolWeights, attend: AttendPool = attend_pool_torch
) -> tuple[Tensor, Tensor]:
    """CAPool with folded projections.

    Args:
        x20: [M, 16, C] embedded high-res rows, block-major.
        query: [M, C] x5 embedding of each block.
        w: the attention weights.
        attend: the attend-and-pool core (:func:`attend_pool_torch`, the fused or the Triton
            one).

    Returns:
        pooled [M, C] and attention probabilities [M, H, 16].
    """
    pooled_rows, attn = attend(fold_query(query, w), x20)
    return project_out(pooled_rows, w), attn


def capool_plain(x20: Tensor, query: Tensor, w: CAPoolWeights) -> tuple[Tensor, Tensor]:
    """CAPool the way ``nn.MultiheadAttention`` computes it: K and V for all 16M rows.

    Same arguments and returns as :func:`capool_folded`; the baseline of tests and benchmarks.
    """
    out, attn = F.multi_head_attention_forward(
        query.unsqueeze(0),  # [1, M, C]: one query per block
        x20.transpose(0, 1),  # [16, M, C]
        x20.transpose(0, 1),
        query.shape[-1],
        w.num_heads,
        w.in_proj_weight,
        w.in_proj_bias,
        None,
        None,
        False,
        0.0,
        w.out_proj_weight,
        w.out_proj_bias,
        training=False,
        need_weights=True,
        average_attn_weights=False,
    )
    return out.squeeze(0), attn.squeeze(2)


def capool_logits(x20: Tensor, query: Tensor, w: CAPoolWeights) -> Tensor:
    """Raw (pre-softmax) CAPool logits s_hj, folded: no K for the 16 rows is formed.

    s_hj = (W_k,h^T u_h) . x_j + u_h . b_k,h; the second term cancels in the softmax and is
    added back here, so these equal ``nn.MultiheadAttention``'s logits.

    Args:
        x20: [M, 16, C] embedded rows; query: [M, C].

    Returns:
        [M, H, 16].
    """
    C = query.shape[-1]
    u = scaled_query(query, w)  # [M, H, d]
    b_k = rearrange(w.in_proj_bias[C : 2 * C], "(h d) -> h d", h=w.num_heads)
    const = torch.einsum("mhd,hd->mh", u, b_k)
    return torch.einsum("mhc,mjc->mhj", key_directions(u, w), x20) + const.unsqueeze(-1)
