"""Two risk groups: the split at the training median, the log-rank test between the groups and
their hazard ratio from a one-covariate Cox model."""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import NamedTuple

import numpy as np

from dsca.metrics.inputs import validated_time_event

__all__ = ["split_at_training_median", "logrank_test", "HazardRatio", "hazard_ratio"]


def split_at_training_median(train_risk: np.ndarray, risk: np.ndarray) -> np.ndarray:
    """High-risk membership [N]: risk above the median risk of the model's training patients,
    the threshold a deployed model would use."""
    return np.asarray(risk, dtype=float) > float(np.median(np.asarray(train_risk, dtype=float)))


def logrank_test(time: np.ndarray, event: np.ndarray, group: np.ndarray) -> tuple[float, float]:
    """Two-group log-rank test.

    Args:
        time: [N]; event: [N] 1 = event; group: [N] bool/0-1 membership.

    Returns:
        (chi-square statistic with 1 degree of freedom, p-value); NaNs if undefined.
    """
    time, event = validated_time_event(time, event)
    g = np.asarray(group).astype(bool).reshape(-1)
    ts = np.unique(time[event == 1])
    if len(ts) == 0 or g.all() or not g.any():
        return float("nan"), float("nan")
    at_risk = time[None, :] >= ts[:, None]
    died = (time[None, :] == ts[:, None]) & (event[None, :] == 1)
    n, n1 = at_risk.sum(1).astype(float), (at_risk & g).sum(1).astype(float)
    d, d1 = died.sum(1).astype(float), (died & g).sum(1).astype(float)
    expected = d * n1 / n
    with np.errstate(invalid="ignore", divide="ignore"):
        var = np.where(n > 1, d * (n1 / n) * (1 - n1 / n) * (n - d) / (n - 1), 0.0)
    v = var.sum()
    if v <= 0:
        return float("nan"), float("nan")
    chi2 = float((d1.sum() - expected.sum()) ** 2 / v)
    # chi-square survival function with 1 degree of freedom
    return chi2, math.erfc(math.sqrt(chi2 / 2.0))


class HazardRatio(NamedTuple):
    """Hazard ratio of a binary group with its Wald confidence interval."""

    hr: float
    ci_low: float
    ci_high: float


def hazard_ratio(
    time: np.ndarray, event: np.ndarray, group: np.ndarray, level: float = 0.95
) -> HazardRatio:
    """Hazard ratio of ``group == 1`` vs 0 from a one-covariate Cox model (Efron ties).

    The coefficient maximises the partial likelihood of :func:`dsca.losses.cox_nll` (Newton's
    method in float64); the interval is ``exp(beta +- z * se)`` with ``se`` from its curvature.

    Args:
        time: [N] follow-up times; event: [N] 1 = event; group: [N] bool/0-1 membership.
        level: coverage of the Wald interval.

    Returns:
        (hr, ci_low, ci_high); NaNs when a group is empty, there is no event, or the estimate
        diverges (a group without events: the maximum lies at infinity).
    """
    # Imported here: the other metrics are numpy only, and importing dsca.metrics should not
    # pull in torch for them.
    import torch

    from dsca.losses import cox_nll

    time, event = validated_time_event(time, event)
    x = np.asarray(group, dtype=float).reshape(-1)
    undefined = HazardRatio(float("nan"), float("nan"), float("nan"))
    if len(x) != len(time) or not event.any() or x.min() == x.max():
        return undefined
    # copies: the validated arrays may be read-only views (of a DataFrame's column, say),
    # which torch warns about when it shares their memory
    xt, et, tt = (torch.tensor(a, dtype=torch.float64) for a in (x, event, time))

    def score(beta: float) -> float:
        """d(-log PL)/d(beta)."""
        b = torch.tensor(beta, dtype=torch.float64, requires_grad=True)
        (grad,) = torch.autograd.grad(cox_nll(b * xt, et, tt, ties="efron") * len(x), b)
        return float(grad)

    def information(beta: float, h: float = 1e-5) -> float:
        # central difference of the score: logcumsumexp has no usable second derivative
        return (score(beta + h) - score(beta - h)) / (2 * h)

    beta = 0.0
    for _ in range(50):
        info = information(beta)
        if not info > 0:
            return undefined
        step = score(beta) / info
        beta -= max(-5.0, min(5.0, step))
        if abs(step) < 1e-10:
            break
    else:
        return undefined
    info = information(beta)
    if abs(beta) > 20 or not info > 0:
        return undefined
    se = 1.0 / math.sqrt(info)
    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    return HazardRatio(math.exp(beta), math.exp(beta - z * se), math.exp(beta + z * se))
