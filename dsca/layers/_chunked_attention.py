"""Self-attention with dropout for CPU training, in chunks of query rows (a leaner equivalent of
``softmax(q k^T / sqrt(e))`` -> dropout -> ``@ v``).

Autograd through the plain ops keeps float [heads, N, N] probability and dropout matrices for
backward; this keeps a one-byte mask and the row log-sum-exp and recomputes the rest. Equal to
the plain formulation with the same mask by
``tests/model/test_model_dropout.py::test_dropout_attention_equals_plain_attention_with_the_same_mask``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from dsca.layers.dropout import draw_keep

__all__ = ["DropoutAttention"]


# Query rows per pass: bounds the [heads, chunk, N] buffers.
_Q_CHUNK = 128


class DropoutAttention(torch.autograd.Function):
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
        keep, keep_scale = draw_keep((G, N, N), p, q.device) if p > 0 else (None, 1.0)
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
