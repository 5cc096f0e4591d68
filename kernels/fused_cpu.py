"""CAPool's attend-and-pool core with the LayerNorm + ReLU before it as a fused prologue (PyTorch).

The x20 embedding is ``relu(layer_norm(conv rows))`` followed by CAPool. Through autograd the
normalized rows [M, 16, C] would be kept whole for backward and their gradient formed whole;
here they exist a chunk of blocks at a time, in forward and in backward, and only the conv
output (which the convolution's backward keeps anyway) and the row statistics are saved.
This is the CPU training path of :func:`dsca.kernels.capool`; on GPUs the Triton kernels run.
Equal to the unfused ops by ``tests/kernels/test_kernels_capool.py::test_norm_prologue_equals_unfused_ops``
and, in a whole training step with dropout, by
``tests/model/test_model_equivalence.py::test_fused_norm_attend_in_training_mode_equals_unfused_ops``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["norm_relu_attend"]


# Blocks per pass: bounds every temporary at a chunk of rows instead of [M, 16, C].
_NORM_CHUNK = 128


class _NormReluAttend(torch.autograd.Function):
    """LayerNorm + ReLU of the conv output, then the CAPool attend-and-pool core
    (:func:`~dsca.kernels.reference.attend_pool_torch`) on the normalized rows, in chunks of
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


def norm_relu_attend(norm: nn.LayerNorm):
    """The attend-and-pool core (``reference.AttendPool``) that first applies ``relu(norm(.))``
    to its rows: (k_dir [M, H, C], conv rows [M, 16, C]) -> (pooled rows [M, H, C],
    probabilities [M, H, 16])."""

    # eager under torch.compile: its chunk loop would pin every bag size (a CPU-only form)
    @torch.compiler.disable
    def attend(k_dir: Tensor, conv_rows: Tensor) -> tuple[Tensor, Tensor]:
        return _NormReluAttend.apply(conv_rows, norm.weight, norm.bias, norm.eps, k_dir)

    return attend
