"""The fast building blocks equal their plain PyTorch counterparts (values and gradients)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsca.kernels import as_weights, capool_logits
from dsca.layers import BlockConv2d, SeparableBlockConv2d, block_conv3x3
from dsca.layers._tap_gemm import _M_CHUNK
from dsca.model import sincos_position_embedding


def _squares(x):  # [M, 16, D] -> [M, D, 4, 4]
    return x.view(x.shape[0], 4, 4, x.shape[2]).permute(0, 3, 1, 2)


def _rows(y):  # [M, C, 4, 4] -> [M, 16, C]
    return y.flatten(2).transpose(1, 2)


@pytest.mark.parametrize("bias", [True, False])
def test_per_tap_block_conv_equals_conv2d_values_and_gradients(bias):
    g = torch.Generator().manual_seed(0)
    M, D, C = 7, 5, 6
    x = torch.randn(M, 16, D, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(C, D, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(C, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    ours = block_conv3x3(x, w, b)
    ref = _rows(F.conv2d(_squares(x), w, b, padding=1))
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    gout = torch.randn(ours.shape, generator=g, dtype=torch.float64)
    leaves = [t for t in (x, w, b) if t is not None]
    ours_g, ref_g = torch.autograd.grad(ours, leaves, gout), torch.autograd.grad(ref, leaves, gout)
    for a, r in zip(ours_g, ref_g):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def test_block_conv_over_several_chunks_of_blocks():
    """More blocks than one pass handles (_M_CHUNK): chunk seams must not show."""
    g = torch.Generator().manual_seed(2)
    M = _M_CHUNK + 3
    x = torch.randn(M, 16, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    ours, ref = block_conv3x3(x, w, None), _rows(F.conv2d(_squares(x), w, None, padding=1))
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    gout = torch.randn(ours.shape, generator=g, dtype=torch.float64)
    ours_g, ref_g = torch.autograd.grad(ours, (x, w), gout), torch.autograd.grad(ref, (x, w), gout)
    for a, r in zip(ours_g, ref_g):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def test_block_conv_passes_gradcheck():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block_conv3x3, (x, w, b))


def test_block_conv_keeps_blocks_separate():
    """A 3x3 conv inside each 4x4 block: no leakage from one block into its neighbour."""
    x = torch.zeros(3, 16, 2)
    x[1] = torch.randn(16, 2)
    out = block_conv3x3(x, torch.randn(4, 2, 3, 3), None)
    assert out[0].abs().max() == 0 and out[2].abs().max() == 0
    assert out[1].abs().max() > 0


@pytest.mark.parametrize("ksize", [1, 3])
def test_block_conv2d_module_is_a_conv2d(ksize):
    torch.manual_seed(0)
    conv = BlockConv2d(8, 6, ksize)
    plain = nn.Conv2d(8, 6, ksize, padding=(ksize - 1) // 2)
    plain.load_state_dict(conv.state_dict(), strict=True)
    x = torch.randn(4, 16, 8)
    torch.testing.assert_close(conv(x), _rows(plain(_squares(x))), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="kernel size 1 or 3"):
        BlockConv2d(8, 6, 5)


@pytest.mark.parametrize("ksize", [1, 3])
def test_separable_block_conv_equals_depthwise_then_pointwise(ksize):
    torch.manual_seed(0)
    sep = SeparableBlockConv2d(8, 6, ksize)
    x = torch.randn(3, 16, 8)
    sq = F.pad(_squares(x), [(ksize - 1) // 2] * 4)
    ref = F.conv2d(sq, sep.depthwise_conv.conv.weight, None, groups=8)
    ref = F.conv2d(ref, sep.pointwise_conv.conv.weight, sep.pointwise_conv.conv.bias)
    torch.testing.assert_close(sep(x), _rows(ref), atol=1e-6, rtol=1e-5)
    assert sep.depthwise_conv.conv.bias is None


def test_cross_attention_logits_add_back_the_cancelled_key_bias():
    torch.manual_seed(0)
    M, C = 5, 16
    mha = nn.MultiheadAttention(C, 4)
    nn.init.normal_(mha.in_proj_bias)
    rows, query = torch.randn(M, 16, C), torch.randn(M, C)
    logits = capool_logits(rows, query, as_weights(mha))
    w_q, w_k, _ = mha.in_proj_weight.chunk(3)
    b_q, b_k, _ = mha.in_proj_bias.chunk(3)
    q = F.linear(query, w_q, b_q).view(M, 4, 4) / math.sqrt(4)
    k = F.linear(rows, w_k, b_k).view(M, 16, 4, 4)
    torch.testing.assert_close(logits, torch.einsum("mhd,mjhd->mhj", q, k), atol=1e-5, rtol=1e-5)
    _, probs = mha(query[None], rows.transpose(0, 1), rows.transpose(0, 1),
                   average_attn_weights=False)
    torch.testing.assert_close(logits.softmax(-1), probs.squeeze(2), atol=1e-6, rtol=1e-5)


def test_sincos_position_embedding_by_hand():
    """dim 8: frequencies 1 and 1/10000; coordinates taken relative to the bag's minimum."""
    coords = torch.tensor([[[3, 5], [4, 7]]])
    pe = sincos_position_embedding(coords, 8, torch.float32)
    w = torch.tensor([1.0, 1e-4])
    for i, (x, y) in enumerate([(0, 0), (1, 2)]):
        expect = torch.cat([torch.sin(x * w), torch.cos(x * w), torch.sin(y * w), torch.cos(y * w)])
        torch.testing.assert_close(pe[0, i], expect)
