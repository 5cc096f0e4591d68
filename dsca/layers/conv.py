"""Convolutions of the two streams, on channel-last rows.

x20 stream: a k x k 'same' convolution inside each 4x4 block of high-res rows, rows
``[M, 16, D]`` (row ``4 r + c`` of the block's grid) in and out. Its definition is
:func:`block_conv3x3_plain` (``F.conv2d`` on the square view); :func:`block_conv3x3` computes
the same with one GEMM per kernel tap (``_tap_gemm.py``). x5 stream: a Conv1d along the patch
sequence. Parameter names and shapes are the reference's (``conv.weight`` [C_out, C_in, k, k]),
so its state dicts load with ``strict=True``.
"""
from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from dsca.coords import SCALE
from dsca.layers._tap_gemm import per_tap_block_conv3x3

__all__ = [
    "BlockConv2d",
    "Conv1dEmbedding",
    "SeparableBlockConv2d",
    "block_conv3x3",
    "block_conv3x3_plain",
    "make_block_conv",
]


def _to_square(x: Tensor) -> Tensor:
    """Rows [M, 16, D] -> squares [M, D, 4, 4]."""
    return rearrange(x, "m (r c) d -> m d r c", r=SCALE)


def _from_square(sq: Tensor) -> Tensor:
    """Squares [M, C, 4, 4] -> rows [M, 16, C]."""
    return rearrange(sq, "m d r c -> m (r c) d")


def block_conv3x3_plain(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """The definition: ``F.conv2d(padding=1)`` on each block's [D, 4, 4] square.

    Args:
        x: [M, 16, D]; weight: [C, D, 3, 3]; bias: [C] or None.

    Returns:
        [M, 16, C].
    """
    return _from_square(F.conv2d(_to_square(x), weight, bias, padding=1))


def block_conv3x3(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``nn.Conv2d(D, C, 3, padding=1)`` applied to every 4x4 block, in channel-last layout.

    On CUDA this is :func:`block_conv3x3_plain` (one cuDNN convolution). Elsewhere it is
    computed per kernel tap (:func:`~dsca.layers._tap_gemm.per_tap_block_conv3x3`), which skips
    the zero taps and the im2col buffers that make the CPU convolution the slower form (README,
    "The DSCA model"); equal to :func:`block_conv3x3_plain` by
    ``tests/model/test_model_layers.py::test_per_tap_block_conv_equals_conv2d_values_and_gradients``.

    Args:
        x: [M, 16, D] rows of each block in row-major order of its 4x4 grid.
        weight: [C, D, 3, 3] (``nn.Conv2d`` layout).
        bias: [C] or None.

    Returns:
        [M, 16, C]. Under autocast the products run in the autocast dtype.
    """
    if x.is_cuda:
        return block_conv3x3_plain(x, weight, bias)
    return per_tap_block_conv3x3(x, weight, bias)


class BlockConv2d(nn.Conv2d):
    """``nn.Conv2d`` (stride 1, 'same' zero padding, k in {1, 3}) on 4x4 blocks of rows.

    Keeps ``nn.Conv2d``'s parameters and initialisation (checkpoint names ``weight``/``bias``);
    only the forward differs: it takes and returns channel-last rows.
    """

    def __init__(self, in_dim: int, out_dim: int, ksize: int) -> None:
        if ksize not in (1, 3):
            raise ValueError(f"block convolution supports kernel size 1 or 3, got {ksize}")
        super().__init__(in_dim, out_dim, ksize, 1, padding=(ksize - 1) // 2)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """x: [M, 16, D] -> [M, 16, C]."""
        if self.kernel_size[0] == 1:
            return F.linear(x, self.weight.flatten(1), self.bias)
        return block_conv3x3(x, self.weight, self.bias)


class _ConvHolder(nn.Module):
    """Holds an ``nn.Conv2d`` under the name ``conv`` (the reference's 'static same padding'
    wrapper); with stride 1 its padding equals ``(k - 1) // 2`` on every side."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv


class SeparableBlockConv2d(nn.Module):
    """Depthwise k x k (no bias) then pointwise 1x1 (with bias) on 4x4 blocks of rows.

    Parameter names follow the reference: ``depthwise_conv.conv.weight`` [D, 1, k, k],
    ``pointwise_conv.conv.weight`` [C, D, 1, 1], ``pointwise_conv.conv.bias`` [C].
    """

    def __init__(self, in_dim: int, out_dim: int, ksize: int) -> None:
        super().__init__()
        if ksize not in (1, 3):
            raise ValueError(f"block convolution supports kernel size 1 or 3, got {ksize}")
        self.ksize = ksize
        self.depthwise_conv = _ConvHolder(
            nn.Conv2d(in_dim, in_dim, ksize, groups=in_dim, bias=False)
        )
        self.pointwise_conv = _ConvHolder(nn.Conv2d(in_dim, out_dim, 1))

    def forward(self, x: Tensor) -> Tensor:
        """x: [M, 16, D] -> [M, 16, C]."""
        dw = self.depthwise_conv.conv.weight  # [D, 1, k, k]
        if self.ksize == 1:
            x = x * dw.flatten()
        else:
            x = _from_square(F.conv2d(_to_square(x), dw, padding=1, groups=dw.shape[0]))
        pw = self.pointwise_conv.conv
        return F.linear(x, pw.weight.flatten(1), pw.bias)


def make_block_conv(in_dim: int, out_dim: int, ksize: int, dw_conv: bool) -> nn.Module:
    """The x20 stream's block convolution: separable (``dw_conv``) or full."""
    if dw_conv:
        return SeparableBlockConv2d(in_dim, out_dim, ksize)
    return BlockConv2d(in_dim, out_dim, ksize)


class Conv1dEmbedding(nn.Module):
    """Conv1d along the patch sequence (the x5 stream), optional LayerNorm.

    Parameters ``conv.weight`` [C, D, k], ``conv.bias`` [C], ``norm.*`` [C].
    """

    def __init__(self, in_dim: int, out_dim: int, ksize: int, norm: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_dim, out_dim, ksize, 1, padding=(ksize - 1) // 2)
        self.norm = nn.LayerNorm(out_dim) if norm else None

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, N, D] -> [B, N, C]."""
        w = self.conv.weight
        if w.shape[-1] == 1:
            out = F.linear(x, w.squeeze(-1), self.conv.bias)
        else:
            out = self.conv(x.transpose(1, 2)).transpose(1, 2)
        return self.norm(out) if self.norm is not None else out
