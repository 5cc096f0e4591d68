"""Losses and the risk sign (dsca.losses)."""
from __future__ import annotations

import math

import torch

from dsca.losses import cox_nll, discrete_nll, l1_penalty, risk_score, survival_curve
from dsca.metrics import concordance_index


def test_discrete_nll_by_hand():
    h = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    s = [0.9, 0.9 * 0.8, 0.9 * 0.8 * 0.7]
    # event in bin 2: survive bins 0 and 1, then the event
    ev = discrete_nll(h, torch.tensor([2]), torch.tensor([0]))
    assert torch.isclose(ev, torch.tensor(-(math.log(s[1]) + math.log(0.3))))
    # censored in bin 2: survives bin 2
    ce = discrete_nll(h, torch.tensor([2]), torch.tensor([1]))
    assert torch.isclose(ce, torch.tensor(-math.log(s[2])))
    # event in bin 0: only the hazard term
    assert torch.isclose(discrete_nll(h, torch.tensor([0]), torch.tensor([0])), torch.tensor(-math.log(0.1)))


def test_alpha_upweights_uncensored_only():
    h = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.3, 0.3, 0.3, 0.3]])
    y_t, y_c = torch.tensor([1, 2]), torch.tensor([0, 1])
    per = discrete_nll(h, y_t, y_c, reduction="none")
    mixed = discrete_nll(h, y_t, y_c, alpha=0.4, reduction="none")
    # uncensored: (1 - a) l + a l = l ; censored: (1 - a) l
    assert torch.allclose(mixed, torch.stack([per[0], 0.6 * per[1]]))
    assert torch.isclose(discrete_nll(h, y_t, y_c), per.mean())


def test_cox_breslow_and_efron_by_hand():
    # times 1, 2, 2, 3; events at 1 and both 2s (a tie); patient 3 censored
    eta = torch.tensor([0.5, -0.2, 0.3, 0.1], dtype=torch.float64)
    event = torch.tensor([1, 1, 1, 0])
    time = torch.tensor([1.0, 2.0, 2.0, 3.0])
    r = eta.exp()
    first = eta[0] - torch.log(r.sum())
    tied_sum = r[1:].sum()
    breslow = first + eta[1] + eta[2] - 2 * torch.log(tied_sum)
    mean_tied = (r[1] + r[2]) / 2
    efron = first + eta[1] + eta[2] - torch.log(tied_sum) - torch.log(tied_sum - mean_tied)
    n = 4
    assert torch.isclose(cox_nll(eta, event, time, ties="breslow").double(), -breslow / n, atol=1e-6)
    assert torch.isclose(cox_nll(eta, event, time, ties="efron").double(), -efron / n, atol=1e-6)


def test_cox_without_events_is_zero_with_graph():
    eta = torch.tensor([0.5, 0.1], requires_grad=True)
    loss = cox_nll(eta, torch.tensor([0, 0]), torch.tensor([1.0, 2.0]))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(eta.grad, torch.zeros(2))


def test_risk_sign_on_known_ordering():
    """Higher hazards -> higher risk -> shorter survival: C-index 1 on a known ordering."""
    base = torch.tensor([0.05, 0.1, 0.2, 0.4, 0.8])
    hazards = base[:, None].expand(5, 4).contiguous()  # patient 4 has the highest hazard
    times = [50.0, 40.0, 30.0, 20.0, 10.0]  # ... and dies first
    events = [1, 1, 1, 1, 1]
    risk = risk_score(hazards)
    assert torch.all(risk[1:] > risk[:-1])
    assert concordance_index(times, events, risk.numpy()) == 1.0
    assert torch.allclose(risk, -survival_curve(hazards).sum(1))
    log_hz = torch.log(base)[:, None]  # Cox head: the log hazard is the risk
    assert concordance_index(times, events, risk_score(log_hz).numpy()) == 1.0
    # the Cox loss prefers the right ordering over the reversed one
    e, t = torch.tensor(events), torch.tensor(times)
    assert cox_nll(log_hz[:, 0], e, t) < cox_nll(-log_hz[:, 0], e, t)


def test_l1_penalty():
    params = [torch.tensor([1.0, -2.0]), torch.tensor([[3.0]])]
    assert torch.isclose(l1_penalty(params, 0.5), torch.tensor(3.0))
    assert l1_penalty(params, 0.0) == 0.0
