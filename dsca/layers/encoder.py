"""The Transformer encoder of both streams: ``nn.TransformerEncoder`` in parameters, names and
eval outputs (``tests/model/test_model_dropout.py::test_encoder_equals_torch_transformer_encoder``),
with cheaper dropout masks and, for CPU training, chunked attention."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from dsca.layers._autocast import apply_autocast
from dsca.layers._chunked_attention import DropoutAttention
from dsca.layers.dropout import Dropout

__all__ = ["TransformerEncoder", "TransformerEncoderLayer", "dropout_attention"]


def dropout_attention(q: Tensor, k: Tensor, v: Tensor, p: float, training: bool) -> Tensor:
    """Scaled dot-product attention with dropout ``p`` on the probabilities when training.

    Args:
        q, k, v: [B, H, N, e].

    Returns:
        [B, H, N, e]. On GPUs, and outside training without gradients, this is
        ``F.scaled_dot_product_attention`` (whose fused GPU kernels already draw dropout
        in-kernel); CPU training runs the chunked ``_chunked_attention.DropoutAttention``.
    """
    if q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p if training else 0.0)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if not training and not needs_grad:
        return F.scaled_dot_product_attention(q, k, v)
    return _chunked_attention(q, k, v, p if training else 0.0)


# eager under torch.compile: the chunk loop over N would pin every bag size (CPU training only)
@torch.compiler.disable
def _chunked_attention(q: Tensor, k: Tensor, v: Tensor, p: float) -> Tensor:
    """[B, H, N, e] -> [B, H, N, e] through :class:`DropoutAttention`."""
    B, H, N, e = q.shape
    flat = (t.reshape(B * H, N, e) for t in (q, k, v))
    return apply_autocast(DropoutAttention.apply, *flat, p).view(B, H, N, e)


class TransformerEncoderLayer(nn.Module):
    """Post-norm encoder layer, ``nn.TransformerEncoderLayer(d, h, dim_feedforward=f,
    dropout=p, activation='relu', batch_first=True)`` in parameters, names and eval outputs.

    Training differs only in how dropout is drawn (:func:`keep_mask`) and in memory: the
    attention keeps a bool mask instead of float probability matrices
    (:func:`dropout_attention`).
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout)
        self.p = dropout

    def _self_attention(self, x: Tensor) -> Tensor:
        """x: [B, N, d] -> [B, N, d]."""
        sa = self.self_attn
        q, k, v = rearrange(
            F.linear(x, sa.in_proj_weight, sa.in_proj_bias),
            "b n (three h e) -> three b h n e", three=3, h=sa.num_heads,
        )
        o = dropout_attention(q, k, v, self.p, self.training)
        return F.linear(rearrange(o, "b h n e -> b n (h e)"), sa.out_proj.weight, sa.out_proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, N, d] -> [B, N, d]."""
        x = self.norm1(x + self.dropout(self._self_attention(x)))
        ff = self.linear2(self.dropout(F.relu(self.linear1(x))))
        return self.norm2(x + self.dropout(ff))


class TransformerEncoder(nn.Module):
    """A stack of :class:`TransformerEncoderLayer` under ``layers.<i>`` (``nn.TransformerEncoder``
    names). Like ``nn.TransformerEncoder``, every layer starts as a copy of the first."""

    def __init__(self, layer: TransformerEncoderLayer, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(num_layers)])

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, N, d] -> [B, N, d]."""
        for layer in self.layers:
            x = layer(x)
        return x
