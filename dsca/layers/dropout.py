"""Dropout whose masks are drawn four per 64 random bits (same distribution as ``nn.Dropout``
up to p quantized to 1/32768, exact expectation: ``tests/model/test_model_dropout.py``)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Dropout", "draw_keep", "keep_mask"]

_LANE_BITS = 15
_LANES = 1 << _LANE_BITS


# Lanes drawn per piece: bounds the int64 draw buffer.
_DRAW_LANES = 1 << 20


def draw_keep(
    shape: torch.Size | tuple[int, ...], p: float, device: torch.device
) -> tuple[Tensor, float]:
    """:func:`keep_mask` as a bool tensor.

    The words are drawn in pieces of whole words, one after the other from the same
    generator, which gives the same stream as one draw of all the words (so the same mask),
    without the 2-bytes-per-element int64 buffer of a one-shot draw.
    """
    n = math.prod(shape)
    threshold = round(p * _LANES)
    mask = torch.empty(n, dtype=torch.bool, device=device)
    for l0 in range(0, n, _DRAW_LANES):  # a multiple of 4 lanes: pieces are whole words
        l1 = min(l0 + _DRAW_LANES, n)
        words = torch.empty((l1 - l0 + 3) // 4, dtype=torch.int64, device=device).random_()
        lanes = words.view(torch.int16)[: l1 - l0].bitwise_and_(_LANES - 1)
        torch.ge(lanes, threshold, out=mask[l0:l1])
    return mask.view(shape), _LANES / (_LANES - threshold)


def keep_mask(
    shape: torch.Size | tuple[int, ...], p: float, device: torch.device
) -> tuple[Tensor, float]:
    """Bernoulli keep-mask for dropout with probability ``p``, 4 draws per 64 random bits.

    ``bernoulli_`` draws one random number per element, which is a visible share of a CPU
    training step because of the [heads, N, N] attention dropout; here each int64 from
    ``random_`` (63 uniform bits) is split into four 15-bit lanes, each compared with
    ``round(p * 2^15)``.
    Elements are dropped independently with probability ``round(p * 2^15) / 2^15`` (p
    quantized to 1/32768) and the returned scale is ``1 / (1 - that)``, so the expectation is
    exact.

    Returns:
        uint8 mask of ``shape`` (1 = keep; one byte per element) and the scale of kept
        elements.
    """
    keep, scale = draw_keep(shape, p, device)
    return keep.view(torch.uint8), scale


class Dropout(nn.Module):
    """``nn.Dropout`` with masks from :func:`keep_mask` on the CPU (same distribution, cheaper
    draws) and ``F.dropout`` on CUDA; the output keeps the input's dtype."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        """x: any shape -> same shape (identity outside training)."""
        if not self.training or round(self.p * _LANES) == 0:
            return x
        if x.is_cuda:
            # the cheap-mask draw pays where bernoulli_ is a visible cost of a CPU step
            # (README, "The DSCA model"); on GPUs torch's fused dropout is the one to use
            return F.dropout(x, self.p, training=True)
        keep, scale = keep_mask(x.shape, self.p, x.device)
        # uint8 mask and a Python scale: the product stays in x's dtype (bf16 under autocast)
        return x.mul(keep).mul_(scale)

    def extra_repr(self) -> str:
        return f"p={self.p}"
