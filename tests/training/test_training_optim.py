"""Optimizers of the reference's names, Lookahead semantics (dsca.optim)."""
from __future__ import annotations

import io

import torch
from torch import nn

from dsca.optim import Lookahead, build_optimizer


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 1))


def _step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 4, generator=g)
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()


def test_lookahead_syncs_every_k_steps():
    fast, look = _model(), _model()
    inner = torch.optim.SGD(fast.parameters(), lr=0.1)
    opt = Lookahead(torch.optim.SGD(look.parameters(), lr=0.1), k=3, alpha=0.5)
    start = [p.detach().clone() for p in look.parameters()]
    for i in range(3):
        _step(fast, inner, i)
        _step(look, opt, i)
        if i < 2:  # between syncs Lookahead follows the inner optimizer exactly
            assert all(torch.equal(a, b) for a, b in zip(fast.parameters(), look.parameters()))
    # after k steps: slow + alpha * (fast - slow)
    for s, f, p in zip(start, fast.parameters(), look.parameters()):
        assert torch.allclose(p, s + 0.5 * (f - s))


def test_lookahead_state_round_trip_and_scheduler():
    a, b = _model(), _model()
    opt_a = build_optimizer(a, "lookahead_adam", lr=1e-2, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt_a, factor=0.5, patience=0)
    for i in range(4):
        _step(a, opt_a, i)
        sched.step(1.0)  # no improvement: the LR halves every step after the first
    assert opt_a.param_groups[0]["lr"] < 1e-2
    opt_b = build_optimizer(b, "lookahead_adam", lr=1e-2, weight_decay=1e-3)
    # through bytes, as a checkpoint (in memory, loaded state tensors would be shared with opt_a)
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf)
    b.load_state_dict(state["model"])
    opt_b.load_state_dict(state["opt"])
    for i in range(4, 9):
        _step(a, opt_a, i)
        _step(b, opt_b, i)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_no_weight_decay_on_biases_and_norms():
    model = _model()
    opt = build_optimizer(model, "adam", lr=1e-3, weight_decay=0.1)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model[0].weight), id(model[2].weight)}
