"""count_macs agrees with torch's FLOP counter on the operations that actually run."""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dsca import build_model
from dsca.costs import count_macs
from dsca.model import ModelConfig

from plain_model import plain_forward  # noqa: I001

BASE = {"dims": "64-32-32-4", "tra_nhead": 4}


def _measured_macs(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() // 2


@pytest.mark.parametrize(
    "overrides",
    [
        {"emb_x20_ksize": 1},
        {"emb_x20_ksize": 1, "fusion": "cat", "pool": "max_mean", "dims": "64-32-32-1"},
        {"emb_x20_ksize": 1, "join": "pre", "fusion": "cat"},
        {"emb_x20_ksize": 1, "emb_x20_backbone": "gapool"},
        {"emb_x20_ksize": 1, "emb_x20_backbone": "avgpool", "dims": "64-32-32-1"},
        {"magnification": "x5"},
        {"emb_x20_ksize": 1, "tra_backbone": "Nystromformer", "tra_num_layers": 2},
        {"emb_x20_dw_conv": True},  # k=3: a padded grouped conv2d, all 144 tap-positions
    ],
    ids=["default-k1", "cat-maxmean-cox", "pre-cat", "gapool", "avgpool-cox", "x5", "nystrom",
         "dw-k3"],
)
def test_count_macs_matches_flop_counter(overrides):
    """Every GEMM of our forward (torch ops, kernel-1 convs) is counted exactly."""
    cfg = ModelConfig.from_dict({**BASE, **overrides})
    model = build_model(cfg)
    N = 37
    x20, x5 = torch.randn(1, 16 * N, 64), torch.randn(1, N, 64)
    coords = torch.randint(0, 9, (1, N, 2))
    with sdpa_kernel(SDPBackend.MATH):
        measured = _measured_macs(lambda: model(x20, x5, coords))
    assert measured == count_macs(cfg, N)["total"]


@pytest.mark.parametrize("overrides", [{}, {"emb_x20_dw_conv": True}, {"fusion": "cat"}])
def test_plain_macs_match_flop_counter_of_plain_formulation(overrides):
    """The 'plain' count is what the reference's way (zero-padded conv, K/V of all rows) runs."""
    cfg = ModelConfig.from_dict({**BASE, **overrides})
    model = build_model(cfg).eval()
    # leaves that need gradients keep torch's encoder off its fused inference kernel, which the
    # counter does not see
    sd = {k: v.clone().requires_grad_() for k, v in model.state_dict().items()}
    N = 21
    x20, x5 = torch.randn(1, 16 * N, 64), torch.randn(1, N, 64)
    # the math SDPA backend decomposes into products the counter sees (CPU flash attention
    # is not counted)
    with sdpa_kernel(SDPBackend.MATH):
        measured = _measured_macs(lambda: plain_forward(cfg, sd, x20, x5, None, logits=False))
    assert measured == count_macs(cfg, N, formulation="plain")["total"]


def test_default_costs_at_study_size():
    """Real tap-positions: 100 of 144 per 4x4 block; folded CAPool avoids the K/V of 16N rows."""
    cfg = ModelConfig()
    ours, plain = count_macs(cfg, 1000), count_macs(cfg, 1000, formulation="plain")
    assert ours["x20_conv"] * 144 == plain["x20_conv"] * 100
    assert plain["x20_pool"] > 5 * ours["x20_pool"]
    assert ours["total"] < 0.7 * plain["total"]
    with pytest.raises(ValueError, match="formulation"):
        count_macs(cfg, 10, formulation="fast")
