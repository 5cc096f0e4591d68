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

Folding (exact in real arithmetic, see ARCHITECTURE.md):
    s_hj = (W_k,h^T u_h) . x_j + const_h      -> the const cancels in the softmax
    o_h  = W_v,h (sum_j p_hj x_j) + b_v,h     -> because sum_j p_hj = 1
so K and V for the 16 rows are never formed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

__all__ = ["capool_folded", "capool_plain"]


def capool_folded(
    x20: Tensor,
    query: Tensor,
    in_proj_weight: Tensor,
    in_proj_bias: Tensor,
    out_proj_weight: Tensor,
    out_proj_bias: Tensor,
    num_heads: int,
) -> tuple[Tensor, Tensor]:
    """CAPool with folded projections.

    Args:
        x20: [M, 16, C] embedded high-res rows, block-major.
        query: [M, C] x5 embedding of each block.
        in_proj_weight: [3C, C] stacked W_q, W_k, W_v (nn.MultiheadAttention layout).
        in_proj_bias: [3C] stacked b_q, b_k, b_v.
        out_proj_weight: [C, C], out_proj_bias: [C].
        num_heads: H, must divide C.

    Returns:
        pooled [M, C] and attention probabilities [M, H, 16].
    """
    C = query.shape[-1]
    d = C // num_heads
    w_q, w_k, w_v = in_proj_weight.chunk(3)
    b_q, _, b_v = in_proj_bias.chunk(3)  # b_k cancels in the softmax
    u = F.linear(query, w_q, b_q) * (1.0 / math.sqrt(d))  # [M, C]
    u = rearrange(u, "m (h d) -> m h d", h=num_heads)
    # W_k,h^T u_h: one key direction per head and block
    k_dir = torch.einsum("mhd,hdc->mhc", u, rearrange(w_k, "(h d) c -> h d c", h=num_heads))
    logits = torch.einsum("mhc,mjc->mhj", k_dir, x20)  # [M, H, 16]
    attn = logits.softmax(dim=-1)
    pooled_rows = torch.einsum("mhj,mjc->mhc", attn, x20)  # [M, H, C]
    heads = torch.einsum(
        "mhc,hdc->mhd", pooled_rows, rearrange(w_v, "(h d) c -> h d c", h=num_heads)
    ) + rearrange(b_v, "(h d) -> h d", h=num_heads)
    out = F.linear(rearrange(heads, "m h d -> m (h d)"), out_proj_weight, out_proj_bias)
    return out, attn


def capool_plain(
    x20: Tensor,
    query: Tensor,
    in_proj_weight: Tensor,
    in_proj_bias: Tensor,
    out_proj_weight: Tensor,
    out_proj_bias: Tensor,
    num_heads: int,
) -> tuple[Tensor, Tensor]:
    """CAPool the way the reference computes it: K and V for all 16M rows.

    Same arguments and returns as :func:`capool_folded`. Kept as the baseline of tests and
    benchmarks; the model never calls it.
    """
    out, attn = F.multi_head_attention_forward(
        query.unsqueeze(0),  # [1, M, C]: one query per block
        x20.transpose(0, 1),  # [16, M, C]
        x20.transpose(0, 1),
        query.shape[-1],
        num_heads,
        in_proj_weight,
        in_proj_bias,
        None,
        None,
        False,
        0.0,
        out_proj_weight,
        out_proj_bias,
        training=False,
        need_weights=True,
        average_attn_weights=False,
    )
    return out.squeeze(0), attn.squeeze(2)
