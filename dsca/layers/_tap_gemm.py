"""The 3x3 block convolution as one GEMM per kernel tap and run of positions (a faster
equivalent of :func:`dsca.layers.conv.block_conv3x3_plain`).

Inside a 4x4 block with zero padding, a 3x3 kernel's taps hit real rows at only 100 of the
144 tap-positions; computing only those, channel-last, skips the zero products and the
im2col/padding buffers of ``nn.Conv2d``, and backward redoes the cheap position-major copies
instead of keeping them. Equal to ``F.conv2d`` on the square view by
``tests/model/test_model_layers.py::test_per_tap_block_conv_equals_conv2d_values_and_gradients``
(also over several chunks and by gradcheck in the same file).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from einops import rearrange
from torch import Tensor

from dsca.coords import BLOCK, SCALE

__all__ = ["per_tap_block_conv3x3"]


class _TapRun(NamedTuple):
    """One GEMM of the per-tap convolution: kernel tap (kr, kc) applied to a run of
    ``length`` consecutive positions, reading from ``in_start`` and adding into ``out_start``
    (positions q = 4 r + c of the block's grid)."""

    kr: int
    kc: int
    out_start: int
    in_start: int
    length: int


def _tap_runs() -> list[_TapRun]:
    """GEMMs of the 3x3 block conv in position-major layout, real taps only.

    Positions q = 4 r + c of the 4x4 grid. For tap (kr, kc) = offset (dr, dc), output
    position (r, c) reads input (r + dr, c + dc) when that lies inside the block. In the
    position-major layout [16, M, D] a run of consecutive positions is one contiguous [n M, D]
    matrix, so each tap needs one GEMM if dc = 0 (whole rows) and one per output row otherwise.

    Returns:
        One run per GEMM, the centre tap (which covers all 16 positions) excluded.
    """
    runs = []
    for kr in range(3):
        dr = kr - 1
        rows = [r for r in range(SCALE) if 0 <= r + dr < SCALE]
        for kc in range(3):
            dc = kc - 1
            if dr == 0 and dc == 0:
                continue
            if dc == 0:
                runs.append(_TapRun(kr, kc, SCALE * rows[0], SCALE * (rows[0] + dr), SCALE * len(rows)))
                continue
            cols = [c for c in range(SCALE) if 0 <= c + dc < SCALE]
            for r in rows:
                p0 = SCALE * r + cols[0]
                runs.append(_TapRun(kr, kc, p0, p0 + SCALE * dr + dc, len(cols)))
    return runs


# Only taps that land inside the block: zero padding would multiply zeros.
_TAP_RUNS = _tap_runs()


# Blocks per pass: bounds the position-major copies at a chunk of rows.
_M_CHUNK = 256


def _taps(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """[C, D, 3, 3] -> [3, 3, C, D] in ``dtype``: each tap's matrix contiguous."""
    return rearrange(weight.to(dtype), "co ci kr kc -> kr kc co ci").contiguous()


def _accumulate(total: Tensor, a: Tensor, b: Tensor) -> None:
    """total += a @ b. When total is wider than the product (fp32 weight gradient of a bf16 or
    fp16 pass) each chunk's product is added in total's precision, so the sum over chunks is
    not rounded to the half type at every step (each chunk's product is rounded once)."""
    if total.dtype == a.dtype:
        total.addmm_(a, b)
    else:
        total.add_(a @ b)


def _rows(start: int, length: int, m: int) -> slice:
    """The rows of positions ``start .. start + length - 1`` in a position-major [16 m, .]
    matrix of m blocks."""
    return slice(start * m, (start + length) * m)


def _position_major(x: Tensor) -> Tensor:
    """[m, 16, D] -> [16 m, D] (position-major: all blocks' position 0, then position 1, ...)."""
    return rearrange(x, "m p d -> (p m) d").contiguous()


class _BlockConv3x3(torch.autograd.Function):
    """3x3 'same' convolution inside each 4x4 block: one GEMM per tap and run of positions.

    Chunks of blocks are copied into position-major order; every tap then multiplies a
    contiguous [n m, D] slice, accumulating in place into the matching output slice: a few
    large GEMMs per chunk and pass rather than many small ones, and no im2col or padded
    copies.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, weight: Tensor, bias: Tensor | None
    ) -> Tensor:
        # the products run in x's dtype; weight and bias keep theirs (fp32 master weights under
        # autocast), so their gradients are accumulated and returned in it
        M = x.shape[0]
        taps = _taps(weight, x.dtype)  # [3, 3, C, D]
        bias_dtype = None if bias is None else bias.dtype
        if bias is not None:
            bias = bias.to(x.dtype)
        out = x.new_empty(M, BLOCK, weight.shape[0])
        for m0 in range(0, M, _M_CHUNK):
            xp = _position_major(x[m0:m0 + _M_CHUNK])
            m = xp.shape[0] // BLOCK
            # centre tap: all 16 positions, and the bias
            o = xp @ taps[1, 1].t() if bias is None else torch.addmm(bias, xp, taps[1, 1].t())
            for t in _TAP_RUNS:
                o[_rows(t.out_start, t.length, m)].addmm_(
                    xp[_rows(t.in_start, t.length, m)], taps[t.kr, t.kc].t())
            out[m0:m0 + m] = rearrange(o, "(p m) c -> m p c", p=BLOCK)
        # x is the caller's: backward redoes the position-major copies instead of keeping them
        ctx.save_for_backward(x, weight)
        ctx.bias_dtype = bias_dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        M, _, D = x.shape
        C = weight.shape[0]
        wants_x, wants_w, wants_b = ctx.needs_input_grad
        grad_x = x.new_empty(x.shape) if wants_x else None
        gtaps = weight.new_zeros(3, 3, C, D) if wants_w else None
        taps = _taps(weight, x.dtype) if wants_x else None
        for m0 in range(0, M, _M_CHUNK):
            gp = _position_major(grad_out[m0:m0 + _M_CHUNK])  # [16 m, C]
            m = gp.shape[0] // BLOCK
            if gtaps is not None:
                xp = _position_major(x[m0:m0 + m])
                _accumulate(gtaps[1, 1], gp.t(), xp)
                for t in _TAP_RUNS:
                    _accumulate(gtaps[t.kr, t.kc], gp[_rows(t.out_start, t.length, m)].t(),
                                xp[_rows(t.in_start, t.length, m)])
                del xp
            if grad_x is not None:
                gx = gp @ taps[1, 1]
                for t in _TAP_RUNS:
                    gx[_rows(t.in_start, t.length, m)].addmm_(
                        gp[_rows(t.out_start, t.length, m)], taps[t.kr, t.kc])
                grad_x[m0:m0 + m] = rearrange(gx, "(p m) d -> m p d", p=BLOCK)
        grad_w = None
        if gtaps is not None:
            grad_w = rearrange(gtaps, "kr kc co ci -> co ci kr kc").contiguous()
        grad_b = None
        if ctx.bias_dtype is not None and wants_b:
            grad_b = grad_out.sum(dim=(0, 1), dtype=ctx.bias_dtype)
        return grad_x, grad_w, grad_b


# The chunk loop depends on M: traced by torch.compile it would pin every bag size. The CPU form
# runs eagerly between compiled graphs instead (on CUDA the model uses conv2d, which compiles).
@torch.compiler.disable
def per_tap_block_conv3x3(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """:func:`dsca.layers.conv.block_conv3x3` as per-tap GEMMs over the real taps only.

    Args:
        x: [M, 16, D] rows of each block in row-major order of its 4x4 grid.
        weight: [C, D, 3, 3] (``nn.Conv2d`` layout).
        bias: [C] or None.

    Returns:
        [M, 16, C], equal to ``conv2d`` on the [M, D, 4, 4] square view. Under autocast the
        products run in the autocast dtype; the weight and bias gradients are accumulated in
        their own (fp32) dtype.
    """
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return _BlockConv3x3.apply(x, weight, bias)
    # in-place/out= products are not autocast by torch: run in the autocast dtype explicitly,
    # keeping the fp32 weight (its gradient is accumulated in fp32)
    with torch.autocast(device, enabled=False):
        return _BlockConv3x3.apply(x.to(torch.get_autocast_dtype(device)), weight, bias)
