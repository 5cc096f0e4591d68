"""Triton CAPool: the attend-and-pool core of each 4x4 block, forward and backward.

Layout of this file (Triton-tutorial style): kernels, then their launchers, then the
``torch.library`` operators, then the ``torch.autograd.Function`` and :func:`attend_pool_triton`,
the core that :func:`dsca.kernels.capool` plugs between the folded projections.

With the projections folded (``reference.py``), what remains per block b is, for each head h,
with k_h = W_k,h^T u_h [C] and the block's raw rows x_j [C], j = 0..15:

    s_hj = k_h . x_j                      (logits; b_k cancels in the softmax)
    p_hj = softmax_j(s_hj)
    r_h  = sum_j p_hj x_j                 (pooled rows; W_v and W_o are applied after)

One program handles one block: 16 rows, all heads, a loop over C in BLOCK_C chunks. Both
reductions are over tiny axes (16 rows, C chunk), so they are broadcast multiplies and
``tl.sum`` on fp32 registers, with no ``tl.dot``: this compiles for sm_70 in every dtype and is
exact in fp32 (no TF32). The kernel is memory bound: it reads x20 twice per block (the second
read hits L2, 16*C elements per block) and writes r and p; K and V for the 16M rows never exist.
Half-precision inputs are accumulated in fp32; p is kept in fp32 for the backward pass.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.autograd.function import FunctionCtx
from torch.utils.flop_counter import register_flop_formula

from dsca.coords import BLOCK
from dsca.kernels.interpreter import interpreter_requested

__all__ = ["INTERPRETED", "attend_pool_triton", "autotune_configs"]

# triton.jit reads TRITON_INTERPRET when a kernel is decorated, i.e. when this module is
# imported; it cannot be switched later in the same process.
INTERPRETED: bool = interpreter_requested()


# (BLOCK_C, warps, stages): each pair keeps about 8-32 fp32 values of the [H, 16, BLOCK_C] tile
# per thread; stages > 1 lets the C loop prefetch the next chunk.
_FWD_CONFIGS = ((32, 2, 1), (32, 4, 1), (64, 4, 1), (64, 4, 2), (128, 4, 2), (128, 8, 2))
# The backward streams g, k and x in each chunk: without prefetching (one stage) it cannot keep
# enough loads in flight to reach half of an H100/H200's bandwidth by the model in
# kernels/_roofline.py (`python -m dsca.kernels.aot --report`), so its configs all prefetch.
_BWD_CONFIGS = ((64, 4, 2), (128, 4, 2), (128, 8, 2))


def autotune_configs(kernel: str = "fwd") -> list[triton.Config]:
    """Every config the GPU autotuner may pick for ``kernel`` ("fwd" or "bwd"); the tests also
    compile each ahead of time."""
    table = {"fwd": _FWD_CONFIGS, "bwd": _BWD_CONFIGS}[kernel]
    return [triton.Config({"BLOCK_C": bc}, num_warps=w, num_stages=s) for bc, w, s in table]


def _configs(kernel: str) -> list[triton.Config]:
    # The interpreter would "benchmark" every config on the CPU: give it one.
    if INTERPRETED:
        return [triton.Config({"BLOCK_C": 32}, num_warps=4, num_stages=1)]
    return autotune_configs(kernel)


def _m_bucket(m: int) -> int:
    """Autotune key for M: its power-of-two bucket, so slides of varied sizes reuse a tuning
    (keying on M itself would re-tune for every slide).

    While ``torch.compile`` traces the op, M is symbolic and ``int(M)`` would guard on its value
    (a recompile for every new slide size): one fixed bucket is used there instead, so compiled
    graphs share one tuning per C.
    """
    if isinstance(m, torch.SymInt):
        return 0
    return max(int(m), 1).bit_length()


def _on_device(t: Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensors' one (``cuda:1``).

    Only for a real launch: while tracing (fake tensors, torch.compile) nothing is launched,
    and the compiled graph's own device guard covers the launch it generates.
    """
    if not t.is_cuda or is_fake(t):
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _head_row_dots(a_base, stride_ac, x_base, stride_xc, C, mask_h,
                   BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr):
    """out_hj = sum_c a_hc x_jc over the whole C axis, one BLOCK_C chunk at a time, in fp32:
    the logits k . x_j in forward and dL/dp = g . x_j in backward. Returns [BLOCK_H, 16]."""
    offs_c = tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_H, 16], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + offs_c
        mask_c = cc < C
        a = tl.load(a_base + cc[None, :] * stride_ac, mask=mask_h[:, None] & mask_c[None, :], other=0.0)
        x = tl.load(x_base + cc[None, :] * stride_xc, mask=mask_c[None, :], other=0.0)
        acc += tl.sum(a.to(tl.float32)[:, None, :] * x.to(tl.float32)[None, :, :], axis=2)
    return acc


@triton.jit
def _capool_fwd_kernel(
    k_ptr, x_ptr, r_ptr, p_ptr,
    H, C, M_BUCKET,
    stride_km, stride_kh, stride_kc,
    stride_xm, stride_xj, stride_xc,
    stride_rm, stride_rh, stride_rc,
    BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Block m: s = k x^T [H,16]; p = softmax_j(s); r = p x [H,C]. Grid (M,)."""
    m = tl.program_id(0).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_j = tl.arange(0, 16)
    mask_h = offs_h < H
    k_base = k_ptr + m * stride_km + offs_h[:, None] * stride_kh
    x_base = x_ptr + m * stride_xm + offs_j[:, None] * stride_xj

    # pass 1: s_hj = sum_c k_hc x_jc
    s = _head_row_dots(k_base, stride_kc, x_base, stride_xc, C, mask_h, BLOCK_H, BLOCK_C)

    # softmax over the 16 rows (padded heads see s = 0: finite, never stored)
    s_max = tl.max(s, axis=1)
    e = tl.exp(s - s_max[:, None])
    p = e / tl.sum(e, axis=1)[:, None]
    p_offs = m * H * 16 + offs_h[:, None] * 16 + offs_j[None, :]
    tl.store(p_ptr + p_offs, p, mask=mask_h[:, None])

    # pass 2: r_hc = sum_j p_hj x_jc (the block's rows are back from L2)
    r_base = r_ptr + m * stride_rm + offs_h[:, None] * stride_rh
    offs_c = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + offs_c
        mask_c = cc < C
        x = tl.load(x_base + cc[None, :] * stride_xc, mask=mask_c[None, :], other=0.0)
        r = tl.sum(p[:, :, None] * x.to(tl.float32)[None, :, :], axis=1)
        tl.store(
            r_base + cc[None, :] * stride_rc,
            r.to(r_ptr.dtype.element_ty),
            mask=mask_h[:, None] & mask_c[None, :],
        )


@triton.jit
def _capool_bwd_kernel(
    gr_ptr, gp_ptr, k_ptr, x_ptr, p_ptr, dk_ptr, dx_ptr,
    H, C, M_BUCKET,
    stride_gm, stride_gh, stride_gc,
    stride_km, stride_kh, stride_kc,
    stride_xm, stride_xj, stride_xc,
    HAS_GP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Block m, given g = dL/dr [H,C] and dL/dp [H,16] (optional):

        dp_hj  = sum_c g_hc x_jc (+ dL/dp_hj)
        ds_hj  = p_hj (dp_hj - sum_j' p_hj' dp_hj')      (softmax backward)
        dk_hc  = sum_j ds_hj x_jc
        dx_jc  = sum_h p_hj g_hc + ds_hj k_hc            (through the pool and the logits)

    dk and dx are contiguous [M,H,C] / [M,16,C]. Grid (M,).
    """
    m = tl.program_id(0).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_j = tl.arange(0, 16)
    hj_offs = m * H * 16 + offs_h[:, None] * 16 + offs_j[None, :]  # this block's [H, 16] tiles
    mask_h = offs_h < H
    g_base = gr_ptr + m * stride_gm + offs_h[:, None] * stride_gh
    k_base = k_ptr + m * stride_km + offs_h[:, None] * stride_kh
    x_base = x_ptr + m * stride_xm + offs_j[:, None] * stride_xj

    p = tl.load(p_ptr + hj_offs, mask=mask_h[:, None], other=0.0)
    dp = _head_row_dots(g_base, stride_gc, x_base, stride_xc, C, mask_h, BLOCK_H, BLOCK_C)
    if HAS_GP:
        dp += tl.load(gp_ptr + hj_offs, mask=mask_h[:, None], other=0.0).to(tl.float32)
    # padded heads: p = 0 there, so ds = 0 and they add nothing to dx
    ds = p * (dp - tl.sum(p * dp, axis=1)[:, None])

    dk_base = dk_ptr + m * H * C + offs_h[:, None] * C
    dx_base = dx_ptr + m * 16 * C + offs_j[:, None] * C
    offs_c = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + offs_c
        mask_c = cc < C
        mask_hc = mask_h[:, None] & mask_c[None, :]
        g = tl.load(g_base + cc[None, :] * stride_gc, mask=mask_hc, other=0.0).to(tl.float32)
        k = tl.load(k_base + cc[None, :] * stride_kc, mask=mask_hc, other=0.0).to(tl.float32)
        x = tl.load(x_base + cc[None, :] * stride_xc, mask=mask_c[None, :], other=0.0)
        x = x.to(tl.float32)
        dk = tl.sum(ds[:, :, None] * x[None, :, :], axis=1)
        dx = tl.sum(p[:, :, None] * g[:, None, :] + ds[:, :, None] * k[:, None, :], axis=0)
        tl.store(dk_base + cc[None, :], dk.to(dk_ptr.dtype.element_ty), mask=mask_hc)
        tl.store(dx_base + cc[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask_c[None, :])


_capool_fwd = triton.autotune(configs=_configs("fwd"), key=["C", "M_BUCKET"])(_capool_fwd_kernel)
# dk/dx are written whole by every config, so re-running configs while tuning is harmless.
_capool_bwd = triton.autotune(configs=_configs("bwd"), key=["C", "M_BUCKET"])(_capool_bwd_kernel)


# --------------------------------------------------------------------------------------------
# Launchers. ``wrap`` is torch.library.wrap_triton under triton_op (CUDA), identity otherwise.
# --------------------------------------------------------------------------------------------
_Wrap = Callable[[Any], Any]  # kernel -> launchable kernel


def _identity(kernel: Any) -> Any:
    return kernel


def _launch_fwd(k_dir: Tensor, x20: Tensor, wrap: _Wrap = _identity) -> tuple[Tensor, Tensor]:
    """r [M,H,C] (input dtype) and p [M,H,16] (fp32) from k_dir [M,H,C] and x20 [M,16,C]."""
    M, H, C = k_dir.shape
    r = torch.empty((M, H, C), dtype=k_dir.dtype, device=k_dir.device)
    p = torch.empty((M, H, BLOCK), dtype=torch.float32, device=k_dir.device)
    if M == 0:
        return r, p
    with _on_device(k_dir):
        wrap(_capool_fwd)[(M,)](
            k_dir, x20, r, p,
            H, C, _m_bucket(M),
            *k_dir.stride(), *x20.stride(), *r.stride(),
            BLOCK_H=triton.next_power_of_2(H),
        )
    return r, p


def _launch_bwd(
    grad_r: Tensor,
    grad_p: Tensor | None,
    k_dir: Tensor,
    x20: Tensor,
    p: Tensor,
    wrap: _Wrap = _identity,
) -> tuple[Tensor, Tensor]:
    """dk [M,H,C] and dx [M,16,C] (dtypes of k_dir and x20); p is the forward's fp32 output."""
    M, H, C = k_dir.shape
    dk = torch.empty((M, H, C), dtype=k_dir.dtype, device=k_dir.device)
    dx = torch.empty((M, BLOCK, C), dtype=x20.dtype, device=x20.device)
    if M == 0:
        return dk, dx
    has_gp = grad_p is not None
    gp = grad_p.contiguous() if has_gp else p  # p stands in as an unread placeholder
    with _on_device(k_dir):
        wrap(_capool_bwd)[(M,)](
            grad_r, gp, k_dir, x20, p.contiguous(), dk, dx,
            H, C, _m_bucket(M),
            *grad_r.stride(), *k_dir.stride(), *x20.stride(),
            HAS_GP=has_gp, BLOCK_H=triton.next_power_of_2(H),
        )
    return dk, dx


# --------------------------------------------------------------------------------------------
# torch.library operators: opaque custom ops for the interpreter, triton_op on GPUs (which lets
# torch.compile see the kernels). Either way torch.compile and FakeTensor tracing work.
# --------------------------------------------------------------------------------------------
if INTERPRETED:

    @torch.library.custom_op("dsca::capool_attend_pool", mutates_args=())
    def _attend_pool_op(k_dir: Tensor, x20: Tensor) -> tuple[Tensor, Tensor]:
        return _launch_fwd(k_dir, x20)

    @_attend_pool_op.register_fake
    def _(k_dir: Tensor, x20: Tensor) -> tuple[Tensor, Tensor]:
        M, H, C = k_dir.shape
        return k_dir.new_empty((M, H, C)), k_dir.new_empty((M, H, BLOCK), dtype=torch.float32)

    @torch.library.custom_op("dsca::capool_attend_pool_backward", mutates_args=())
    def _attend_pool_bwd_op(
        grad_r: Tensor, grad_p: Tensor | None, k_dir: Tensor, x20: Tensor, p: Tensor
    ) -> tuple[Tensor, Tensor]:
        return _launch_bwd(grad_r, grad_p, k_dir, x20, p)

    @_attend_pool_bwd_op.register_fake
    def _(
        grad_r: Tensor, grad_p: Tensor | None, k_dir: Tensor, x20: Tensor, p: Tensor
    ) -> tuple[Tensor, Tensor]:
        M, H, C = k_dir.shape
        return k_dir.new_empty((M, H, C)), x20.new_empty((M, BLOCK, C))

else:

    @torch.library.triton_op("dsca::capool_attend_pool", mutates_args=())
    def _attend_pool_op(k_dir: Tensor, x20: Tensor) -> tuple[Tensor, Tensor]:
        return _launch_fwd(k_dir, x20, torch.library.wrap_triton)

    @torch.library.triton_op("dsca::capool_attend_pool_backward", mutates_args=())
    def _attend_pool_bwd_op(
        grad_r: Tensor, grad_p: Tensor | None, k_dir: Tensor, x20: Tensor, p: Tensor
    ) -> tuple[Tensor, Tensor]:
        return _launch_bwd(grad_r, grad_p, k_dir, x20, p, torch.library.wrap_triton)


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------
class _AttendPool(torch.autograd.Function):
    """(k_dir [M,H,C], x20 [M,16,C]) -> (r [M,H,C], p [M,H,16] fp32), gradients for both inputs.

    custom_fwd/custom_bwd run the backward under the forward's autocast state; the inputs
    are already in one dtype (see :func:`attend_pool_triton`).
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx: FunctionCtx, k_dir: Tensor, x20: Tensor) -> tuple[Tensor, Tensor]:
        r, p = torch.ops.dsca.capool_attend_pool(k_dir, x20)
        ctx.save_for_backward(k_dir, x20, p)
        return r, p

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(
        ctx: FunctionCtx, grad_r: Tensor | None, grad_p: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        k_dir, x20, p = ctx.saved_tensors
        if grad_r is None:  # only the attention map was used
            grad_r = torch.zeros_like(k_dir)
        dk, dx = torch.ops.dsca.capool_attend_pool_backward(grad_r, grad_p, k_dir, x20, p)
        return dk, dx


def attend_pool_triton(k_dir: Tensor, x20: Tensor) -> tuple[Tensor, Tensor]:
    """Triton attend-and-pool core (same contract as ``attend_pool_torch``).

    Args:
        k_dir: [M, H, C]; x20: [M, 16, C]; any strides.

    Returns:
        pooled rows [M, H, C] and probabilities [M, H, 16], both in the common dtype (the
        autocast dtype when autocast is on); accumulation is fp32.
    """
    device_type = x20.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(k_dir.dtype, x20.dtype)
    r, p = _AttendPool.apply(k_dir.to(dtype), x20.to(dtype))
    return r, p.to(dtype)


# --------------------------------------------------------------------------------------------
# FLOP counts for torch.utils.flop_counter (`dsca profile`): the same multiply-adds that the
# PyTorch path's einsums are counted with, 2 FLOPs each.
# --------------------------------------------------------------------------------------------
@register_flop_formula(torch.ops.dsca.capool_attend_pool)
def _attend_pool_flops(k_shape: torch.Size, x_shape: torch.Size, *_: Any, **__: Any) -> int:
    M, H, C = k_shape
    return 2 * 2 * M * H * BLOCK * C  # logits + pooling


@register_flop_formula(torch.ops.dsca.capool_attend_pool_backward)
def _attend_pool_bwd_flops(
    gr_shape: torch.Size, gp_shape: torch.Size | None, k_shape: torch.Size, *_: Any, **__: Any
) -> int:
    M, H, C = k_shape
    return 4 * 2 * M * H * BLOCK * C  # dp, dk, and dx through the pool and the logits
