"""Direct numpy references of the Cox partial likelihood (Breslow and Efron ties), written from
the textbook formulas, for the oracle tests (`test_training_oracles.py`).

With ``eta`` the log hazards, ``D(t)`` the ``d`` patients with an event at a distinct event
time ``t`` and ``R(t) = {j : T_j >= t}`` its risk set (censored patients with ``T_j == t``
included):

    Breslow: log PL = sum_t [ sum_{i in D(t)} eta_i - d log sum_{j in R(t)} e^eta_j ]
    Efron:   log PL = sum_t [ sum_{i in D(t)} eta_i
                              - sum_{l=0}^{d-1} log( sum_{R(t)} e^eta - (l/d) sum_{D(t)} e^eta ) ]

Three versions: ``cox_loglik_textbook`` (plain loops and plain exponentials, moderate
``eta`` only), ``cox_loglik_stable`` (each log of a weighted sum of exponentials as a weighted
log-sum-exp, any ``eta``) and ``cox_loglik_grad`` (the analytic gradient, as stable).
"""
from __future__ import annotations

import math

import numpy as np
from scipy.special import logsumexp

__all__ = ["cox_loglik_textbook", "cox_loglik_stable", "cox_loglik_grad", "cox_nll_reference"]


def _validated_cox_inputs(eta, event, time, ties):
    """[N] float64 eta, bool events and float64 times; ValueError for an unknown ties rule."""
    if ties not in ("breslow", "efron"):
        raise ValueError(ties)
    eta = np.asarray(eta, dtype=np.float64).reshape(-1)
    event = np.asarray(event).reshape(-1).astype(bool)
    time = np.asarray(time, dtype=np.float64).reshape(-1)
    assert len(eta) == len(event) == len(time)
    return eta, event, time


def _tie_weights(event: np.ndarray, time: np.ndarray, t: float, ties: str):
    """For the distinct event time t: the tied events D, the risk set R, and, for each
    l = 0..d-1, the weight of every patient in the l-th denominator
    (1 in R \\ D; 1 - l/d in D for Efron, 1 for Breslow)."""
    dead = event & (time == t)
    at_risk = time >= t
    d = int(dead.sum())
    rows = []
    for l in range(d):
        w = at_risk.astype(float)
        if ties == "efron":
            w[dead] = 1.0 - l / d
        rows.append(w)
    return dead, rows


def cox_loglik_textbook(eta, event, time, ties: str) -> float:
    """Log partial likelihood with plain loops over patients (overflows for large |eta|)."""
    eta, event, time = _validated_cox_inputs(eta, event, time, ties)
    n = len(eta)
    total = 0.0
    for t in sorted(set(time[event].tolist())):
        dead = [i for i in range(n) if event[i] and time[i] == t]
        risk = [j for j in range(n) if time[j] >= t]
        d = len(dead)
        sum_risk = sum(math.exp(eta[j]) for j in risk)
        sum_dead = sum(math.exp(eta[i]) for i in dead)
        total += sum(eta[i] for i in dead)
        for l in range(d):
            if ties == "breslow":
                total -= math.log(sum_risk)
            else:
                total -= math.log(sum_risk - l / d * sum_dead)
    return total


def cox_loglik_stable(eta, event, time, ties: str) -> float:
    """Log partial likelihood, each denominator a weighted log-sum-exp (finite for any eta)."""
    eta, event, time = _validated_cox_inputs(eta, event, time, ties)
    total = 0.0
    for t in np.unique(time[event]):
        dead, rows = _tie_weights(event, time, t, ties)
        total += eta[dead].sum()
        for w in rows:
            total -= logsumexp(eta, b=w)
    return float(total)


def cox_loglik_grad(eta, event, time, ties: str) -> np.ndarray:
    """d log PL / d eta: ``delta_j - sum_t sum_l w_lj e^eta_j / sum_k w_lk e^eta_k``."""
    eta, event, time = _validated_cox_inputs(eta, event, time, ties)
    grad = event.astype(float).copy()
    for t in np.unique(time[event]):
        _, rows = _tie_weights(event, time, t, ties)
        for w in rows:
            with np.errstate(divide="ignore"):
                log_w = np.log(w)
            grad -= np.exp(eta + log_w - logsumexp(eta, b=w))
    return grad


def cox_nll_reference(eta, event, time, ties: str) -> float:
    """The loss of the contract: ``-log PL / B``."""
    eta = np.asarray(eta, dtype=np.float64).reshape(-1)
    return -cox_loglik_stable(eta, event, time, ties) / len(eta)
