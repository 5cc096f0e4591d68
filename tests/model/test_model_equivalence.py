"""Same weights + same inputs -> same hazards and attention maps as the plain formulation.

The model (channel-last per-tap block conv, folded CAPool through dsca.kernels) is compared
with ``plain_forward`` (tests/model/conftest.py), which reads the same random weights by name
and computes the reference way (zero-padded Conv2d on squares, nn.MultiheadAttention over
stacked [16, M, C] rows with K and V materialized).
"""
from __future__ import annotations

import pytest
import torch

from dsca import build_model
from dsca.model import ModelConfig

from plain_model import plain_forward, randomize_state_dict  # noqa: I001

SMALL = {"dims": "32-16-16-4", "tra_nhead": 2, "dropout": 0.3, "capool_backend": "torch"}

VARIANTS: dict[str, dict] = {
    "default": {},
    "fusion-cat": {"fusion": "cat"},
    "ksize1": {"emb_x20_ksize": 1},
    "ksize1-cat": {"emb_x20_ksize": 1, "fusion": "cat"},
    "no-pe": {"tra_position_emb": False},
    "no-pe-cat-k1": {"tra_position_emb": False, "fusion": "cat", "emb_x20_ksize": 1},
    "dw-conv": {"emb_x20_dw_conv": True},
    "dw-conv-k1": {"emb_x20_dw_conv": True, "emb_x20_ksize": 1},
    "join-pre": {"join": "pre"},
    "join-pre-cat": {"join": "pre", "fusion": "cat"},
    "pool-mean": {"pool": "mean"},
    "pool-max": {"pool": "max"},
    "pool-max-mean": {"pool": "max_mean"},
    "cox": {"dims": "32-16-16-1"},
    "cox-max-mean": {"dims": "32-16-16-1", "pool": "max_mean", "fusion": "cat"},
    "nystromformer": {"tra_backbone": "Nystromformer"},
    "two-layers": {"tra_num_layers": 2},
    "x20-avgpool": {"emb_x20_backbone": "avgpool"},
    "x20-gapool": {"emb_x20_backbone": "gapool", "fusion": "cat"},
    "single-x5": {"magnification": "x5"},
    "single-x20-capool": {"magnification": "x20"},
    "single-x20-avgpool": {"magnification": "x20", "emb_x20_backbone": "avgpool"},
    "single-x20-gapool": {"magnification": "x20", "emb_x20_backbone": "gapool"},
}


def _inputs(B: int, N: int, D: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x20 = torch.randn(B, 16 * N, D, generator=g)
    x5 = torch.randn(B, N, D, generator=g)
    coords = torch.randint(0, 3 * N, (B, N, 2), generator=g) + 7  # min is not 0
    return x20, x5, coords


def _build(overrides: dict, seed: int = 0):
    cfg = ModelConfig.from_dict({**SMALL, **overrides})
    model = build_model(cfg)
    sd = randomize_state_dict(model.state_dict(), seed)
    model.load_state_dict(sd, strict=True)
    return cfg, model.eval(), sd


@pytest.mark.parametrize("name", list(VARIANTS))
def test_model_matches_plain_formulation(name):
    cfg, model, sd = _build(VARIANTS[name])
    x20, x5, coords = _inputs(B=2, N=9, D=32)
    with torch.no_grad():
        hazards, attn = model(x20, x5, coords, return_attention=True)
        ref, ref_attn = plain_forward(cfg, sd, x20, x5, coords)
    assert hazards.shape == (2, cfg.dims[3])
    torch.testing.assert_close(hazards, ref, atol=1e-5, rtol=1e-4)
    if cfg.needs_x20 and cfg.emb_x20_backbone == "capool":
        assert attn["cross"].shape == (2, 9, 4, 16)
        torch.testing.assert_close(attn["cross"], ref_attn["cross"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(
            attn["cross_logits"], ref_attn["cross_logits"], atol=1e-4, rtol=1e-4
        )
        torch.testing.assert_close(attn["cross"].sum(-1), torch.ones(2, 9, 4))
    else:
        assert "cross" not in attn
    assert attn["pool"].shape == (2, 9)
    torch.testing.assert_close(attn["pool"].sum(-1), torch.ones(2), atol=1e-5, rtol=0)
    if cfg.pool == "gap":
        torch.testing.assert_close(attn["pool"], ref_attn["pool"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "name", ["default", "fusion-cat", "dw-conv", "x20-gapool", "cox", "join-pre-cat", "two-layers",
             "single-x20-capool", "nystromformer"]
)
def test_gradients_match_plain_formulation(name):
    """The custom backward of the block conv and the folded CAPool give the plain gradients."""
    cfg, model, sd = _build(VARIANTS[name])
    x20, x5, coords = _inputs(B=1, N=6, D=32, seed=3)
    out = model(x20, x5, coords)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    names = [n for n, _ in model.named_parameters()]

    leaves = {k: v.clone().requires_grad_() for k, v in sd.items()}
    ref, _ = plain_forward(cfg, leaves, x20, x5, coords)
    ref_grads = torch.autograd.grad(
        ref.square().sum(), [leaves[n] for n in names], allow_unused=True
    )
    for n, g, rg in zip(names, grads, ref_grads):
        assert rg is not None, n
        torch.testing.assert_close(g, rg, atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


def test_outputs_without_coords_ignore_position_embedding():
    """coords=None means no PE, which is the same as the model built without PE."""
    cfg_pe, model_pe, sd = _build({})
    x20, x5, coords = _inputs(B=1, N=5, D=32)
    cfg_nope = ModelConfig.from_dict({**SMALL, "tra_position_emb": False})
    model_nope = build_model(cfg_nope).eval()
    model_nope.load_state_dict(sd)
    with torch.no_grad():
        a = model_pe(x20, x5, None)
        b = model_nope(x20, x5, coords)
        c = model_pe(x20, x5, coords)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_batched_bags_equal_single_bags():
    """B bags in one call = each bag alone (PE relative to each bag's own minimum)."""
    _, model, _ = _build({})
    x20, x5, coords = _inputs(B=3, N=7, D=32)
    with torch.no_grad():
        together = model(x20, x5, coords)
        alone = torch.cat([model(x20[i:i + 1], x5[i:i + 1], coords[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=1e-5)


def test_x5_row_order_matters_and_x20_blocks_follow_their_patch():
    """Moving patches together with their 16-row blocks and coordinates only changes the x5
    Conv1d neighbourhoods: with emb_x5_ksize 1 the prediction is unchanged. Moving the blocks
    alone pairs them with other x5 queries and must change it."""
    _, model, _ = _build({"emb_x5_ksize": 1})
    x20, x5, coords = _inputs(B=1, N=8, D=32)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(5))
    x20p = x20.view(1, 8, 16, 32)[:, perm].reshape(1, 128, 32)
    with torch.no_grad():
        a = model(x20, x5, coords)
        b = model(x20p, x5[:, perm], coords[:, perm])
        # moving x20 blocks WITHOUT their x5 patch must change the prediction
        c = model(x20p, x5, coords)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(a, c, atol=1e-4)


def test_training_step_under_bf16_autocast():
    """AMP: the custom autograd pieces run in the autocast dtype and gradients reach every
    parameter in float32."""
    cfg, model, _ = _build({"dropout": 0.0})
    model.pool.fc1[2].p = model.pool.score[2].p = 0.0  # GAPool's own dropout: off for the check
    x20, x5, coords = _inputs(B=1, N=5, D=32)
    with torch.no_grad():
        ref = model(x20, x5, coords)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x20, x5, coords)
    out.float().sum().backward()
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=0)
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name
        # (the bias before the pooling softmax shifts every logit: its gradient is exactly 0)
        assert p.grad.abs().sum() > 0 or name == "pool.fc2.bias", name


def test_fused_norm_attend_in_training_mode_equals_unfused_ops(monkeypatch):
    """Training mode (dropout on, gradients): the fused LayerNorm + ReLU + attend path gives
    the values and gradients of the unfused ops under the same dropout masks, over more
    blocks than one of its chunks."""
    import dsca.kernels.dispatch as dispatch
    from dsca.kernels import fused_cpu

    cfg, model, _ = _build(VARIANTS["default"])
    x20, x5, coords = _inputs(B=1, N=fused_cpu._NORM_CHUNK + 20, D=32, seed=5)
    fused_calls = []
    real_fused = dispatch.norm_relu_attend
    monkeypatch.setattr(dispatch, "norm_relu_attend",
                        lambda norm: fused_calls.append(1) or real_fused(norm))

    def step():
        torch.manual_seed(7)
        out = model.train()(x20, x5, coords)
        return out, torch.autograd.grad(out.square().sum(), list(model.parameters()))

    out_fused, grads_fused = step()
    assert fused_calls, "the fused path did not run"
    monkeypatch.setattr(dispatch, "_fuses_norm", lambda variant, device_type: False)
    fused_calls.clear()
    out_plain, grads_plain = step()
    assert not fused_calls
    with torch.no_grad():
        out_eval = model.eval()(x20, x5, coords)
    assert not torch.allclose(out_fused, out_eval, atol=1e-4)  # dropout was on
    torch.testing.assert_close(out_fused, out_plain, atol=1e-6, rtol=1e-5)
    for (name, _), a, b in zip(model.named_parameters(), grads_fused, grads_plain):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
