"""Cheap dropout masks and the low-memory attention: same math as the plain formulation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsca.layers import (
    Dropout,
    TransformerEncoder,
    TransformerEncoderLayer,
    dropout_attention,
    keep_mask,
)


@pytest.mark.parametrize("p", [0.25, 0.6])
def test_keep_mask_is_bernoulli_with_exact_expectation(p):
    torch.manual_seed(0)
    keep, scale = keep_mask((1000, 1001), p, torch.device("cpu"))
    assert keep.dtype == torch.uint8 and keep.shape == (1000, 1001)
    assert set(keep.unique().tolist()) == {0, 1}
    rate = keep.float().mean().item()
    assert abs(rate - (1 - p)) < 3e-3  # ~8 standard deviations at 1e6 draws
    assert abs(scale * (1 - p) - 1) < 1e-4  # p quantized to 1/32768
    # neighbours come from the same 64-bit word: they must still be independent
    k = keep.flatten().float()
    corr = torch.corrcoef(torch.stack([k[:-1], k[1:]]))[0, 1].item()
    assert abs(corr) < 5e-3
    # two draws differ, a re-seeded draw repeats
    torch.manual_seed(0)
    again, _ = keep_mask((1000, 1001), p, torch.device("cpu"))
    assert torch.equal(keep, again)
    assert not torch.equal(keep, keep_mask((1000, 1001), p, torch.device("cpu"))[0])


def test_dropout_module_train_and_eval():
    drop = Dropout(0.5)
    x = torch.ones(200, 300)
    torch.testing.assert_close(drop.eval()(x), x)
    y = drop.train()(x)
    assert set(y.unique().tolist()) == {0.0, 2.0}
    assert abs(y.mean().item() - 1) < 0.02
    with pytest.raises(ValueError, match="probability"):
        Dropout(1.0)


@pytest.mark.parametrize("p", [0.0, 0.6])
def test_dropout_attention_equals_plain_attention_with_the_same_mask(p):
    """Values and gradients, over more query rows than one chunk (300 > 256)."""
    g = torch.Generator().manual_seed(0)
    B, H, N, e = 2, 3, 300, 8
    q, k, v = (torch.randn(B, H, N, e, generator=g, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    torch.manual_seed(7)
    out = dropout_attention(q, k, v, p, training=True)
    gout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), gout)

    torch.manual_seed(7)
    prob = torch.softmax(q @ k.transpose(-1, -2) / e**0.5, dim=-1)
    if p > 0:
        keep, scale = keep_mask((B * H, N, N), p, q.device)
        prob = prob * keep.view(B, H, N, N) * scale
    ref = prob @ v
    ref_grads = torch.autograd.grad(ref, (q, k, v), gout)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_dropout_attention_outside_training_is_sdpa():
    q, k, v = (torch.randn(1, 2, 10, 4) for _ in range(3))
    torch.testing.assert_close(
        dropout_attention(q, k, v, 0.6, training=False), F.scaled_dot_product_attention(q, k, v)
    )


@pytest.mark.parametrize("train", [False, True])
def test_encoder_equals_torch_transformer_encoder(train):
    """Same parameter names and, without dropout, same outputs and gradients as
    nn.TransformerEncoder(post-norm, ReLU, feed-forward = d_model, batch_first)."""
    torch.manual_seed(0)
    d, h = 16, 4
    ours = TransformerEncoder(TransformerEncoderLayer(d, h, d, dropout=0.0), 2)
    ref = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(d, h, dim_feedforward=d, dropout=0.0, batch_first=True),
        2, enable_nested_tensor=False,
    )
    assert set(ours.state_dict()) == set(ref.state_dict())
    for t in ours.parameters():
        t.data.normal_(0, 0.3)
    ref.load_state_dict(ours.state_dict(), strict=True)
    ours.train(train)
    ref.train(train)
    x = torch.randn(2, 37, d)
    a, b = ours(x), ref(x)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    ga = torch.autograd.grad(a.square().sum(), list(ours.parameters()))
    gb = torch.autograd.grad(b.square().sum(), list(ref.parameters()))
    for x1, x2 in zip(ga, gb):
        torch.testing.assert_close(x1, x2, atol=1e-4, rtol=1e-4)


def test_encoder_layers_start_as_copies_like_torch():
    enc = TransformerEncoder(TransformerEncoderLayer(8, 2, 8, dropout=0.1), 3)
    w = [layer.linear1.weight for layer in enc.layers]
    assert torch.equal(w[0], w[2]) and w[0] is not w[2]
