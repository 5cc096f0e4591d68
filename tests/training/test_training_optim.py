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


def test_lookahead_syncs_every_k_steps_from_timm_start():
    """timm's Lookahead (the reference's): the slow copy is taken at the first sync (step k), so
    steps 1 .. 2k-1 follow the inner optimizer and step 2k moves half-way back to step k."""
    fast, look = _model(), _model()
    inner = torch.optim.SGD(fast.parameters(), lr=0.1)
    opt = Lookahead(torch.optim.SGD(look.parameters(), lr=0.1), k=3, alpha=0.5)
    for i in range(6):
        _step(fast, inner, i)
        _step(look, opt, i)
        if i == 2:
            at_first_sync = [p.detach().clone() for p in fast.parameters()]
        if i < 5:  # the first sync (step 3) leaves the weights where the inner optimizer put them
            assert all(torch.equal(a, b) for a, b in zip(fast.parameters(), look.parameters()))
    # after 2k steps: slow (weights at step k) + alpha * (fast - slow)
    for s, f, p in zip(at_first_sync, fast.parameters(), look.parameters()):
        torch.testing.assert_close(p, s + 0.5 * (f - s))


def test_lookahead_state_round_trip_and_scheduler():
    a, b = _model(), _model()
    opt_a = build_optimizer(a, "lookahead_adam", lr=1e-2, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt_a, factor=0.5, patience=0)
    for i in range(7):  # past the first sync (step 6): the slow copies exist and are saved
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
    for i in range(7, 13):  # through the second sync (step 12), which reads them
        _step(a, opt_a, i)
        _step(b, opt_b, i)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_no_weight_decay_on_biases_and_norms():
    model = _model()
    opt = build_optimizer(model, "adam", lr=1e-3, weight_decay=0.1)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model[0].weight), id(model[2].weight)}
