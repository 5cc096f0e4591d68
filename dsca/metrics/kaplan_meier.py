"""Kaplan-Meier estimate of survival with pointwise log(-log) Greenwood confidence bands, and
the risk-set counts it shares with the censoring distribution of :mod:`dsca.metrics.ipcw`."""
from __future__ import annotations

from statistics import NormalDist
from typing import NamedTuple

import numpy as np

from dsca.metrics.inputs import validated_time_event

__all__ = ["KaplanMeier", "kaplan_meier", "risk_set_counts"]


class KaplanMeier(NamedTuple):
    """A Kaplan-Meier step function: ``survival[k]`` holds on ``[time[k], time[k + 1])``.

    ``time[0] = 0`` with survival 1; then one step per distinct event time. ``ci_low`` and
    ``ci_high`` are the pointwise log(-log) Greenwood bands (NaN-free: 1 at the start, 0 once
    the survival reaches 0).
    """

    time: np.ndarray
    survival: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray


def risk_set_counts(time: np.ndarray, event: np.ndarray) -> tuple[np.ndarray, ...]:
    """Distinct times [U] and, at each, (at risk, events, censored) counts."""
    uniq, inv = np.unique(time, return_inverse=True)
    n_events = np.bincount(inv, weights=event, minlength=len(uniq))
    n_total = np.bincount(inv, minlength=len(uniq)).astype(float)
    at_risk = n_total[::-1].cumsum()[::-1]
    return uniq, at_risk, n_events, n_total - n_events


def kaplan_meier(time: np.ndarray, event: np.ndarray, level: float = 0.95) -> KaplanMeier:
    """Kaplan-Meier estimate of survival with pointwise confidence bands.

    Args:
        time: [N] follow-up times; event: [N] 1 = event.
        level: coverage of the bands (exponential Greenwood, i.e. on log(-log S)).

    Returns:
        :class:`KaplanMeier` with arrays of length M + 1 for M distinct event times.

    Example:
        >>> km = kaplan_meier([1.0, 2.0, 2.0, 3.0], [1, 1, 0, 1])
        >>> km.time.tolist(), km.survival.round(3).tolist()
        ([0.0, 1.0, 2.0, 3.0], [1.0, 0.75, 0.5, 0.0])
    """
    time, event = validated_time_event(time, event)
    uniq, at_risk, deaths, _ = risk_set_counts(time, event)
    with_events = deaths > 0
    ts, n, d = uniq[with_events], at_risk[with_events], deaths[with_events]
    surv = np.cumprod(1.0 - d / n)
    with np.errstate(divide="ignore", invalid="ignore"):
        greenwood = np.cumsum(d / (n * (n - d)))  # Greenwood: Var(log S); inf once S reaches 0
        log_s = np.log(surv)
        z = NormalDist().inv_cdf(0.5 + level / 2.0)
        half = z * np.sqrt(greenwood) / np.abs(log_s)
        centre = np.log(-log_s)
        low = np.exp(-np.exp(centre + half))
        high = np.exp(-np.exp(centre - half))
    gone = surv <= 0
    low[gone], high[gone] = 0.0, 0.0
    return KaplanMeier(
        np.concatenate([[0.0], ts]), np.concatenate([[1.0], surv]),
        np.concatenate([[1.0], low]), np.concatenate([[1.0], high]),
    )
