"""Building blocks of the DSCA network, laid out for checkpoint compatibility.

Every module here keeps the parameter names and shapes of the reference implementation
(``conv.weight`` [C_out, C_in, k, k], ``cross_att_pool.in_proj_weight`` ...), so that reference
state dicts load with ``strict=True``, while the forward passes are written for CPU speed and
memory of a training step (one patient, ~1,000 x5 patches, 16,000 x20 rows):

* the high-res (x20) rows stay channel-last ([M, 16, C]): no square/sequence permutes
  around a 2-D convolution;
* the 3x3 convolution inside each 4x4 block is computed as per-tap GEMMs over the taps that
  hit real rows: 100 of the 144 tap-positions of a block, so 31% fewer multiply-adds than
  ``nn.Conv2d`` with zero padding, and no im2col/padding buffers;
* cross-attention pooling goes through :func:`dsca.kernels.capool` (projection folding: K and V
  of the 16 rows are never formed); where its torch backend would run, the LayerNorm + ReLU
  before it and its attend-and-pool core run fused over chunks of blocks
  (:class:`_NormReluAttend`), so that neither the normalized rows nor their gradient is ever
  held whole: only the conv output is kept for backward;
* the Transformer encoder equals ``nn.TransformerEncoder`` (names, eval outputs) but keeps a
  one-byte dropout mask instead of float [heads, N, N] matrices for backward, and draws its
  dropout masks four per 64 random bits; its [heads, chunk, N] attention temporaries are a
  few buffers reused across chunks and updated in place.

Memory of a training step (issue 3, peak RSS growth): every temporary of more than a few
MiB is either allocated once per call and reused across chunks, or bounded by a chunk size;
many short-lived mid-sized temporaries also fragment glibc's heap, which keeps their pages.

Notation: ``M = B * N`` blocks, 16 rows per block (row ``4 * r + c`` of the 4x4 grid),
``D`` input feature size, ``C`` embedding size, ``H`` heads.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from dsca.kernels import capool, resolve_backend
from dsca.kernels.reference import capool_folded, key_directions, scaled_query

__all__ = [
    "AvgPoolEmbedding",
    "BlockConv2d",
    "CAPoolEmbedding",
    "Conv1dEmbedding",
    "Dropout",
    "GAPool",
    "GAPoolEmbedding",
    "SeparableBlockConv2d",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "block_conv3x3",
    "cross_attention_logits",
    "dropout_attention",
    "keep_mask",
]

SCALE = 4  # each low-res patch owns a SCALE x SCALE block of high-res patches
BLOCK = SCALE * SCALE


def _band_plan() -> list[tuple[int, int, int, int, int]]:
    """GEMMs of the 3x3 block conv in position-major layout, real taps only.

    Positions q = 4 r + c of the 4x4 grid. For tap (kr, kc) = offset (dr, dc), output
    position (r, c) reads input (r + dr, c + dc) when that lies inside the block. In the
    position-major layout [16, M, D] a run of consecutive positions is one contiguous [n M, D]
    matrix, so each tap needs one GEMM if dc = 0 (whole rows) and one per output row otherwise.

    Returns:
        (kr, kc, first output position, first input position, number of positions) per GEMM,
        the centre tap (which covers all 16 positions) excluded.
    """
    plan = []
    for kr in range(3):
        dr = kr - 1
        rows = [r for r in range(SCALE) if 0 <= r + dr < SCALE]
        for kc in range(3):
            dc = kc - 1
            if dr == 0 and dc == 0:
                continue
            if dc == 0:
                plan.append((kr, kc, SCALE * rows[0], SCALE * (rows[0] + dr), SCALE * len(rows)))
                continue
            cols = [c for c in range(SCALE) if 0 <= c + dc < SCALE]
            for r in rows:
                p0 = SCALE * r + cols[0]
                plan.append((kr, kc, p0, p0 + SCALE * dr + dc, len(cols)))
    return plan


_PLAN = _band_plan()  # 22 GEMMs; with the centre tap 100 of the 144 tap-positions of a block


_M_CHUNK = 256  # blocks per pass: bounds the position-major copies at 16 x 256 rows


def _position_major(x: Tensor) -> Tensor:
    """[m, 16, D] -> [16 m, D] (position-major: all blocks' position 0, then position 1, ...)."""
    return rearrange(x, "m p d -> (p m) d").contiguous()


class _BlockConv3x3(torch.autograd.Function):
    """3x3 'same' convolution inside each 4x4 block: one GEMM per tap and run of positions.

    Chunks of blocks are copied into position-major order; every tap then multiplies a
    contiguous [n m, D] slice, accumulating in place into the matching output slice. 23 large
    GEMMs per chunk and pass: few parallel regions, which keeps two threads busy even on a
    loaded machine, and the copies stay a few MiB.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, weight: Tensor, bias: Tensor | None
    ) -> Tensor:
        M = x.shape[0]
        taps = rearrange(weight, "co ci kr kc -> kr kc co ci").contiguous()  # [3, 3, C, D]
        out = x.new_empty(M, BLOCK, weight.shape[0])
        for m0 in range(0, M, _M_CHUNK):
            xp = _position_major(x[m0:m0 + _M_CHUNK])
            m = xp.shape[0] // BLOCK
            # centre tap: all 16 positions, and the bias
            o = xp @ taps[1, 1].t() if bias is None else torch.addmm(bias, xp, taps[1, 1].t())
            for kr, kc, po, pi, n in _PLAN:
                o[po * m:(po + n) * m].addmm_(xp[pi * m:(pi + n) * m], taps[kr, kc].t())
            out[m0:m0 + m] = rearrange(o, "(p m) c -> m p c", p=BLOCK)
        # x is the caller's: backward redoes the position-major copies instead of keeping them
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        M, _, D = x.shape
        C = weight.shape[0]
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = x.new_empty(x.shape) if need_x else None
        gtaps = x.new_zeros(3, 3, C, D) if need_w else None
        taps = rearrange(weight, "co ci kr kc -> kr kc co ci").contiguous() if need_x else None
        for m0 in range(0, M, _M_CHUNK):
            gp = _position_major(grad_out[m0:m0 + _M_CHUNK])  # [16 m, C]
            m = gp.shape[0] // BLOCK
            if gtaps is not None:
                xp = _position_major(x[m0:m0 + m])
                gtaps[1, 1].addmm_(gp.t(), xp)
                for kr, kc, po, pi, n in _PLAN:
                    gtaps[kr, kc].addmm_(gp[po * m:(po + n) * m].t(), xp[pi * m:(pi + n) * m])
                del xp
            if grad_x is not None:
                gx = gp @ taps[1, 1]
                for kr, kc, po, pi, n in _PLAN:
                    gx[pi * m:(pi + n) * m].addmm_(gp[po * m:(po + n) * m], taps[kr, kc])
                grad_x[m0:m0 + m] = rearrange(gx, "(p m) d -> m p d", p=BLOCK)
        grad_w = None
        if gtaps is not None:
            grad_w = rearrange(gtaps, "kr kc co ci -> co ci kr kc").contiguous()
        grad_b = grad_out.sum(dim=(0, 1)) if ctx.has_bias and need_b else None
        return grad_x, grad_w, grad_b


def block_conv3x3(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``nn.Conv2d(D, C, 3, padding=1)`` applied to every 4x4 block, in channel-last layout.

    Args:
        x: [M, 16, D] rows of each block in row-major order of its 4x4 grid.
        weight: [C, D, 3, 3] (``nn.Conv2d`` layout).
        bias: [C] or None.

    Returns:
        [M, 16, C], equal to ``conv2d`` on the [M, D, 4, 4] square view. Under autocast the
        products run in the autocast dtype.
    """
    return _apply_autocast(_BlockConv3x3.apply, x, weight, bias)


def _apply_autocast(fn, *args):
    """Run a custom autograd function under autocast: its in-place/``out=`` products are not
    autocast by torch, so cast the floating inputs to the autocast dtype up front."""
    device = next(a for a in args if isinstance(a, Tensor)).device.type
    if not torch.is_autocast_enabled(device):
        return fn(*args)
    dtype = torch.get_autocast_dtype(device)
    cast = [a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() else a for a in args]
    with torch.autocast(device, enabled=False):
        return fn(*cast)


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
            sq = rearrange(x, "m (r c) d -> m d r c", r=SCALE)
            x = rearrange(
                F.conv2d(sq, dw, padding=1, groups=dw.shape[0]), "m d r c -> m (r c) d"
            )
        pw = self.pointwise_conv.conv
        return F.linear(x, pw.weight.flatten(1), pw.bias)


def _make_block_conv(in_dim: int, out_dim: int, ksize: int, dw_conv: bool) -> nn.Module:
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
        self.conv = _make_block_conv(in_dim, out_dim, ksize, dw_conv)
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


def cross_attention_logits(rows: Tensor, query: Tensor, mha: nn.MultiheadAttention) -> Tensor:
    """Raw (pre-softmax) CAPool logits ``s_hj``, folded: no K for the 16 rows is formed.

    ``s_hj = (W_k,h^T u_h) . x_j + u_h . b_k,h`` with ``u_h = (W_q,h q + b_q,h) / sqrt(d)``;
    the second term, which cancels in the softmax, is added back so these equal the logits
    of ``nn.MultiheadAttention``.

    Args:
        rows: [M, 16, C] embedded x20 rows; query: [M, C]; mha: the ``cross_att_pool`` module.

    Returns:
        [M, H, 16].
    """
    C = query.shape[-1]
    u = scaled_query(query, mha.in_proj_weight, mha.in_proj_bias, mha.num_heads)  # [M, H, d]
    k_dir = key_directions(u, mha.in_proj_weight)  # [M, H, C]
    b_k = rearrange(mha.in_proj_bias[C : 2 * C], "(h d) -> h d", h=mha.num_heads)
    const = torch.einsum("mhd,hd->mh", u, b_k)
    return torch.einsum("mhc,mjc->mhj", k_dir, rows) + const.unsqueeze(-1)


_NORM_CHUNK = 128  # blocks per pass of _NormReluAttend: bounds its temporaries at 16 x 128 rows


class _NormReluAttend(torch.autograd.Function):
    """LayerNorm + ReLU of the conv output, then the CAPool attend-and-pool core
    (:func:`dsca.kernels.reference.attend_pool_torch`) on the normalized rows, in chunks of
    blocks.

    The normalized rows [M, 16, C] are never kept whole: forward makes them one chunk at a
    time, and backward remakes each chunk from the conv output (saved anyway) and the row
    statistics; the gradient of the conv output is written chunk by chunk into one buffer.
    Autograd through the unfused ops would keep the LayerNorm output for backward and form
    the rows' gradient whole (two einsum products and their sum, [M, 16, C] each).

    Shapes: y [M, 16, C], weight/bias [C], k_dir [M, H, C] -> pooled rows [M, H, C],
    probabilities [M, H, 16].
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, y: Tensor, weight: Tensor, bias: Tensor, eps: float, k_dir: Tensor
    ) -> tuple[Tensor, Tensor]:
        M, J, C = y.shape
        H = k_dir.shape[1]
        pooled = y.new_empty(M, H, C)
        probs = y.new_empty(M, H, J)
        mean = y.new_empty(M, J, 1)
        rstd = y.new_empty(M, J, 1)
        for m0 in range(0, M, _NORM_CHUNK):
            m1 = min(m0 + _NORM_CHUNK, M)
            rows, mu, rs = torch.native_layer_norm(y[m0:m1], (C,), weight, bias, eps)
            rows.relu_()
            mean[m0:m1], rstd[m0:m1] = mu, rs
            logits = torch.bmm(k_dir[m0:m1], rows.transpose(1, 2))  # [m, H, 16]
            torch.softmax(logits, dim=-1, out=probs[m0:m1])
            torch.bmm(probs[m0:m1], rows, out=pooled[m0:m1])
        ctx.save_for_backward(y, weight, bias, k_dir, probs, mean, rstd)
        return pooled, probs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_pooled: Tensor | None, g_probs: Tensor | None):  # type: ignore[override]
        y, weight, bias, k_dir, probs, mean, rstd = ctx.saved_tensors
        M, J, C = y.shape
        need_y, need_w, need_b, _, need_k = ctx.needs_input_grad
        grad_y = torch.empty_like(y) if need_y else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None
        grad_k = torch.empty_like(k_dir) if need_k else None
        mask = (need_y, need_w, need_b)
        for m0 in range(0, M, _NORM_CHUNK):
            m1 = min(m0 + _NORM_CHUNK, M)
            # the chunk's rows again: (y - mean) * rstd * weight + bias, then ReLU
            rows = torch.sub(y[m0:m1], mean[m0:m1]).mul_(rstd[m0:m1]).mul_(weight).add_(bias)
            rows.relu_()
            p = probs[m0:m1]
            # d probabilities: from the pooled rows and from the caller
            d_p = torch.zeros_like(p) if g_pooled is None else torch.bmm(
                g_pooled[m0:m1], rows.transpose(1, 2)
            )
            if g_probs is not None:
                d_p.add_(g_probs[m0:m1])
            # softmax backward: d logits = p * (d_p - sum_j d_p_j p_j)
            d_logits = d_p.sub_((d_p * p).sum(dim=-1, keepdim=True)).mul_(p)  # [m, H, 16]
            if grad_k is not None:
                torch.bmm(d_logits, rows, out=grad_k[m0:m1])
            if not any(mask):
                continue
            # d rows = p^T g_pooled + d_logits^T k_dir, then through the ReLU
            d_rows = torch.bmm(d_logits.transpose(1, 2), k_dir[m0:m1])
            if g_pooled is not None:
                d_rows.baddbmm_(p.transpose(1, 2), g_pooled[m0:m1])
            torch.ops.aten.threshold_backward.grad_input(d_rows, rows, 0, grad_input=d_rows)
            del rows
            gy, gw, gb = torch.ops.aten.native_layer_norm_backward(
                d_rows, y[m0:m1], [C], mean[m0:m1], rstd[m0:m1], weight, bias, list(mask)
            )
            if grad_y is not None:
                grad_y[m0:m1] = gy
            if grad_w is not None:
                grad_w += gw
            if grad_b is not None:
                grad_b += gb
        return grad_y, grad_w, grad_b, None, grad_k


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
        if not need_logits and self._fuse_norm_pool(x20):
            pooled, probs = self._norm_pool_fused(self.conv_rows(x20), query)
            return pooled.view(B, N, -1), probs.view(B, N, self.num_heads, BLOCK), None
        rows = self.embed_rows(x20)  # [M, 16, C]
        pooled, probs = self._pool(rows, query)
        logits = None
        if need_logits:
            logits = cross_attention_logits(rows, query, self.cross_att_pool)
            logits = logits.view(B, N, self.num_heads, BLOCK)
        return pooled.view(B, N, -1), probs.view(B, N, self.num_heads, BLOCK), logits

    def _fuse_norm_pool(self, x20: Tensor) -> bool:
        """Whether LayerNorm + ReLU + attend-and-pool run fused (:class:`_NormReluAttend`):
        wherever the torch backend would run them, outside autocast."""
        dev = x20.device.type
        return resolve_backend(self.backend, dev) == "torch" and not torch.is_autocast_enabled(dev)

    def _norm_pool_fused(self, conv_rows: Tensor, query: Tensor) -> tuple[Tensor, Tensor]:
        """conv_rows [M, 16, C] (before the norm), query [M, C] -> pooled [M, C],
        probabilities [M, H, 16]; the same function as ``_pool(act(norm(conv_rows)), query)``
        but the normalized rows exist only a chunk of blocks at a time (also in backward)."""
        mha, norm = self.cross_att_pool, self.norm

        def attend(k_dir: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            return _NormReluAttend.apply(y, norm.weight, norm.bias, norm.eps, k_dir)

        return capool_folded(
            conv_rows,
            query,
            mha.in_proj_weight,
            mha.in_proj_bias,
            mha.out_proj.weight,
            mha.out_proj.bias,
            self.num_heads,
            attend=attend,
        )

    def _pool(self, rows: Tensor, query: Tensor) -> tuple[Tensor, Tensor]:
        """rows [M, 16, C], query [M, C] -> pooled [M, C], probabilities [M, H, 16]."""
        mha = self.cross_att_pool
        return capool(
            rows,
            query,
            mha.in_proj_weight,
            mha.in_proj_bias,
            mha.out_proj.weight,
            mha.out_proj.bias,
            self.num_heads,
            backend=self.backend,
        )


# -- dropout with cheap masks ------------------------------------------------------------------

_LANE_BITS = 15
_LANES = 1 << _LANE_BITS


_DRAW_LANES = 1 << 20  # lanes drawn per piece: bounds the int64 draw buffer at 2 MiB


def _draw_keep(
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

    ``bernoulli_`` draws one random number per element (it was ~13% of a training step on CPU,
    the [heads, N, N] attention dropout dominating); here each int64 from ``random_`` (63
    uniform bits) is split into four 15-bit lanes, each compared with ``round(p * 2^15)``.
    Elements are dropped independently with probability ``round(p * 2^15) / 2^15`` (p
    quantized to 1/32768) and the returned scale is ``1 / (1 - that)``, so the expectation is
    exact.

    Returns:
        uint8 mask of ``shape`` (1 = keep; one byte per element) and the scale of kept
        elements.
    """
    keep, scale = _draw_keep(shape, p, device)
    return keep.view(torch.uint8), scale


class Dropout(nn.Module):
    """``nn.Dropout`` with masks from :func:`keep_mask` (same distribution, cheaper draws)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        """x: any shape -> same shape (identity outside training)."""
        if not self.training or round(self.p * _LANES) == 0:
            return x
        keep, scale = keep_mask(x.shape, self.p, x.device)
        return x * (keep * scale)

    def extra_repr(self) -> str:
        return f"p={self.p}"


# -- Transformer encoder -----------------------------------------------------------------------

_Q_CHUNK = 128  # query rows per attention chunk: bounds the [heads, chunk, N] buffers


class _DropoutAttention(torch.autograd.Function):
    """softmax(q k^T * scale) with dropout, @ v; memory O(heads N^2) bits instead of floats.

    Forward works in chunks of query rows and keeps only the bool keep-mask, the row
    log-sum-exp and the output; backward recomputes each chunk's probabilities (one extra
    q k^T product). All [G, chunk, N] temporaries are buffers allocated once and reused by
    every chunk, updated in place: the probabilities (and in backward their gradient), and a
    float copy of the chunk's mask (a float x bool product would make such a copy anew per
    product). The softmax backward takes its row sums from
    ``sum_e dout * out`` (= ``sum_j dP_j P_j``, dropout included), not from a [G, chunk, N]
    product.
    Shapes: q, k, v [G, N, e] (G = batch x heads) -> [G, N, e].
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, p: float) -> Tensor:  # type: ignore[override]
        # the heads arrive as strided views of the packed projection: one copy here spares
        # BLAS a copy per chunk
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        G, N, e = q.shape
        scale = e**-0.5
        out = torch.empty_like(q)
        lse = torch.empty(G, N, 1, dtype=q.dtype, device=q.device)
        keep, keep_scale = _draw_keep((G, N, N), p, q.device) if p > 0 else (None, 1.0)
        kt = k.transpose(1, 2)
        size = G * min(_Q_CHUNK, N) * N
        buf = q.new_empty(size)
        fmask = q.new_empty(size) if keep is not None else None
        for i in range(0, N, _Q_CHUNK):
            j = min(i + _Q_CHUNK, N)
            n = G * (j - i) * N
            s = torch.bmm(q[:, i:j], kt, out=buf[:n].view(G, j - i, N))
            s.mul_(scale)
            mx = s.amax(dim=-1, keepdim=True)
            prob = s.sub_(mx).exp_()
            total = prob.sum(dim=-1, keepdim=True)
            lse[:, i:j] = total.log().add_(mx)
            if keep is not None:
                m = fmask[:n].view(G, j - i, N).copy_(keep[:, i:j])
                prob.mul_(m).mul_(total.reciprocal_().mul_(keep_scale))
            else:
                prob.div_(total)
            torch.bmm(prob, v, out=out[:, i:j])
        ctx.save_for_backward(q, k, v, out, lse, *(() if keep is None else (keep,)))
        ctx.keep_scale = keep_scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        q, k, v, out, lse, *rest = ctx.saved_tensors
        keep = rest[0] if rest else None
        G, N, e = q.shape
        scale = e**-0.5
        g = grad_out.contiguous()
        # softmax backward: ds = P * (dP - sum_j dP_j P_j), and sum_j dP_j P_j = dout . out
        row_dot = (g * out).sum(dim=-1, keepdim=True)  # [G, N, 1]
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        kt, vt = k.transpose(1, 2), v.transpose(1, 2)
        size = G * min(_Q_CHUNK, N) * N
        pbuf, dbuf = q.new_empty(size), q.new_empty(size)
        fmask = q.new_empty(size) if keep is not None else None
        for i in range(0, N, _Q_CHUNK):
            j = min(i + _Q_CHUNK, N)
            n = G * (j - i) * N
            prob = torch.bmm(q[:, i:j], kt, out=pbuf[:n].view(G, j - i, N))
            prob.mul_(scale).sub_(lse[:, i:j]).exp_()
            dprob = torch.bmm(g[:, i:j], vt, out=dbuf[:n].view(G, j - i, N))  # d(dropped P)
            m = None
            if keep is not None:
                m = fmask[:n].view(G, j - i, N).copy_(keep[:, i:j]).mul_(ctx.keep_scale)
                dprob.mul_(m)  # -> dP
            ds = dprob.sub_(row_dot[:, i:j]).mul_(prob)
            torch.bmm(ds, k, out=dq[:, i:j]).mul_(scale)
            dk.baddbmm_(ds.transpose(1, 2), q[:, i:j], alpha=scale)
            if m is not None:
                prob.mul_(m)  # the dropped P
            dv.baddbmm_(prob.transpose(1, 2), g[:, i:j])
        return dq, dk, dv, None


def dropout_attention(q: Tensor, k: Tensor, v: Tensor, p: float, training: bool) -> Tensor:
    """Scaled dot-product attention with dropout ``p`` on the probabilities when training.

    Args:
        q, k, v: [B, H, N, e].

    Returns:
        [B, H, N, e]. On GPUs, and outside training without gradients, this is
        ``F.scaled_dot_product_attention`` (whose fused GPU kernels already draw dropout
        in-kernel); the chunked function below is for CPU training.
    """
    if q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p if training else 0.0)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if not training and not needs_grad:
        return F.scaled_dot_product_attention(q, k, v)
    B, H, N, e = q.shape
    out = _apply_autocast(
        _DropoutAttention.apply,
        q.reshape(B * H, N, e), k.reshape(B * H, N, e), v.reshape(B * H, N, e),
        p if training else 0.0,
    )
    return out.view(B, H, N, e)


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
