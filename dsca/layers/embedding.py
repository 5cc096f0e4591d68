"""Embeddings of the x20 stream: each 4x4 block of high-res rows -> one vector per x5 patch.

All three share block conv -> LayerNorm -> ReLU on rows ``[M, 16, C]`` (``M = B * N`` blocks);
they differ in how a block's 16 rows are pooled: CAPool (DSCA's cross-attention with the x5
patch as query, through :func:`dsca.kernels.capool`), the mean, or gated attention (the
reference's ablations). Also the gated attention pooling over the patches of a bag.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from dsca.coords import BLOCK
from dsca.kernels import as_weights, capool, capool_logits
from dsca.layers.conv import Conv1dEmbedding, make_block_conv
from dsca.layers.dropout import Dropout

__all__ = ["AvgPoolEmbedding", "CAPoolEmbedding", "GAPool", "GAPoolEmbedding"]


class GAPool(nn.Module):
    """Gated global attention pooling over the patches of a bag.

    ``a = softmax_n(fc2(tanh(fc1 x_n) * sigmoid(score x_n)))``, output ``sum_n a_n x_n``;
    dropout after the tanh and the sigmoid branches (0.25 in the reference).
    """

    def __init__(self, in_dim: int, hid_dim: int, dropout: float = 0.25) -> None:
        super().__init__()
        self.fc1 = nn.Sequential(nn.Linear(in_dim, hid_dim), nn.Tanh(), Dropout(dropout))
        self.score = nn.Sequential(nn.Linear(in_dim, hid_dim), nn.Sigmoid(), Dropout(dropout))
        self.fc2 = nn.Linear(hid_dim, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: [B, N, d] -> (pooled [B, d], attention [B, N])."""
        logits = self.fc2(self.fc1(x) * self.score(x)).squeeze(-1)  # [B, N]
        attn = logits.softmax(dim=-1)
        return torch.einsum("bn,bnd->bd", attn, x), attn


class _BlockEmbedding(nn.Module):
    """Shared head of the x20 embeddings: block conv -> LayerNorm -> ReLU, rows stay [M, 16, C]."""

    def __init__(self, in_dim: int, out_dim: int, ksize: int, dw_conv: bool) -> None:
        super().__init__()
        self.conv = make_block_conv(in_dim, out_dim, ksize, dw_conv)
        self.norm = nn.LayerNorm(out_dim)
        self.act = nn.ReLU(inplace=True)

    def conv_rows(self, x20: Tensor) -> Tensor:
        """x20: [B, 16N, D] -> block conv output [B*N, 16, C] (before norm and ReLU)."""
        B, L, D = x20.shape
        return self.conv(x20.reshape(B * (L // BLOCK), BLOCK, D))

    def embed_rows(self, x20: Tensor) -> Tensor:
        """x20: [B, 16N, D] -> [B*N, 16, C]."""
        return self.act(self.norm(self.conv_rows(x20)))


class AvgPoolEmbedding(_BlockEmbedding):
    """x20 embedding ablation: conv + LayerNorm + ReLU, then the mean of each block."""

    def forward(self, x20: Tensor) -> Tensor:
        """x20: [B, 16N, D] -> [B, N, C]."""
        B = x20.shape[0]
        return self.embed_rows(x20).mean(dim=1).view(B, -1, self.norm.normalized_shape[0])


class GAPoolEmbedding(_BlockEmbedding):
    """x20 embedding ablation: conv + LayerNorm + ReLU, then gated attention pooling per block
    (no dropout inside the block pooling, as in the reference)."""

    def __init__(self, in_dim: int, out_dim: int, ksize: int, dw_conv: bool) -> None:
        super().__init__(in_dim, out_dim, ksize, dw_conv)
        self.pool = GAPool(out_dim, out_dim, 0.0)

    def forward(self, x20: Tensor) -> Tensor:
        """x20: [B, 16N, D] -> [B, N, C]."""
        B = x20.shape[0]
        pooled, _ = self.pool(self.embed_rows(x20))
        return pooled.view(B, -1, pooled.shape[-1])


class CAPoolEmbedding(_BlockEmbedding):
    """The x20 embedding of DSCA: block conv + LayerNorm + ReLU, then cross-attention pooling
    of each block of 16 rows with the block's x5 patch (kernel-1 Conv1d, no norm) as query.

    Parameters: ``conv_patch_x5.conv.*``, ``conv.*``, ``norm.*``, ``cross_att_pool.*``
    (an ``nn.MultiheadAttention(C, 4)`` used as the parameter container; its forward is never
    called: :func:`dsca.kernels.capool` computes the same function with folded projections).
    """

    num_heads = 4

    def __init__(
        self, in_dim: int, out_dim: int, ksize: int, dw_conv: bool, backend: str = "auto"
    ) -> None:
        super().__init__(in_dim, out_dim, ksize, dw_conv)
        self.conv_patch_x5 = Conv1dEmbedding(in_dim, out_dim, 1, norm=False)
        self.cross_att_pool = nn.MultiheadAttention(out_dim, self.num_heads)
        self.backend = backend

    def forward(
        self, x20: Tensor, x5: Tensor, need_logits: bool = False
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Pool every 4x4 block guided by its x5 patch.

        Args:
            x20: [B, 16N, D]; x5: [B, N, D].
            need_logits: also return the raw attention logits.

        Returns:
            embedding [B, N, C], attention probabilities [B, N, H, 16],
            raw logits [B, N, H, 16] or None.
        """
        B, N, _ = x5.shape
        query = self.conv_patch_x5(x5).reshape(B * N, -1)  # [M, C]
        if not need_logits:
            # capool applies the norm and the ReLU itself, fused into its core where it can
            pooled, probs = capool(self.conv_rows(x20), query, self.cross_att_pool,
                                   norm=self.norm, backend=self.backend)
            return pooled.view(B, N, -1), probs.view(B, N, self.num_heads, BLOCK), None
        rows = self.embed_rows(x20)  # [M, 16, C]
        pooled, probs = capool(rows, query, self.cross_att_pool, backend=self.backend)
        logits = capool_logits(rows, query, as_weights(self.cross_att_pool))
        return (pooled.view(B, N, -1), probs.view(B, N, self.num_heads, BLOCK),
                logits.view(B, N, self.num_heads, BLOCK))
