"""Harrell's concordance index and its percentile bootstrap confidence interval.

Pairs follow scikit-survival's tie rules (the reference's evaluation): a pair (i, j) is
comparable when i has an event and ``t_i < t_j``, or ``t_i == t_j`` and j is censored; tied
risks count one half.
"""
from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np

from dsca.metrics.inputs import validated_time_event_risk

__all__ = ["TIED_RISK_TOL", "concordance_index", "BootstrapCI", "cindex_bootstrap_ci"]

log = logging.getLogger(__name__)

#: Risks closer than this are tied (scikit-survival's default tolerance), here and in the
#: thresholds of :func:`dsca.metrics.time_dependent_auc`.
TIED_RISK_TOL = 1e-8


def _concordance_counts(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> tuple[float, float]:
    """(concordant + ties / 2, comparable) over all pairs.

    Builds the [N, N] pair matrices at once: exact and vectorised, at O(N^2) memory, which
    suits one evaluation set (a cohort's test patients) rather than a whole registry.
    """
    t_i, t_j = time[:, None], time[None, :]
    comparable = (event[:, None] == 1) & ((t_i < t_j) | ((t_i == t_j) & (event[None, :] == 0)))
    diff = risk[:, None] - risk[None, :]
    tied = np.abs(diff) <= TIED_RISK_TOL
    score = np.where(tied, 0.5, (diff > 0).astype(float))
    return float((score * comparable).sum()), float(comparable.sum())


def concordance_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C-index.

    Args:
        time: [N] follow-up times (or discrete bins).
        event: [N] 1 = event.
        risk: [N] predicted risk (higher = shorter survival).

    Returns:
        fraction of comparable pairs ordered correctly; NaN without comparable pairs.

    Example:
        >>> concordance_index([1.0, 2.0, 3.0], [1, 1, 0], [3.0, 2.0, 1.0])
        1.0
        >>> concordance_index([1.0, 2.0, 3.0], [1, 0, 1], [2.0, 2.0, 1.0])  # one tied pair
        0.75
    """
    time, event, risk = validated_time_event_risk(time, event, risk)
    num, den = _concordance_counts(time, event, risk)
    return num / den if den > 0 else float("nan")


class BootstrapCI(NamedTuple):
    """Percentile bootstrap interval and how many resamples it rests on."""

    low: float
    high: float
    n_resamples: int  # resamples with at least one comparable pair (the others are undefined)


def cindex_bootstrap_ci(
    time: np.ndarray,
    event: np.ndarray,
    risk: np.ndarray,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> BootstrapCI:
    """Percentile bootstrap confidence interval of the C-index (patients resampled).

    Args:
        time, event, risk: [N] as in :func:`concordance_index`.
        n_boot: bootstrap resamples.
        level: coverage.
        seed: resampling seed (fixed so that reports are reproducible).

    Returns:
        (low, high, n_resamples); NaN bounds when fewer than 2 patients or no resample has a
        comparable pair. Resamples without comparable pairs are left out and counted.
    """
    time, event, risk = validated_time_event_risk(time, event, risk)
    n = len(time)
    if n < 2 or n_boot < 1:
        return BootstrapCI(float("nan"), float("nan"), 0)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        num, den = _concordance_counts(time[idx], event[idx], risk[idx])
        if den > 0:
            values.append(num / den)
    if len(values) < n_boot:
        log.info("C-index bootstrap: %d of %d resamples had no comparable pair and were left out",
                 n_boot - len(values), n_boot)
    if not values:
        return BootstrapCI(float("nan"), float("nan"), 0)
    q = (1.0 - level) / 2.0
    low, high = np.quantile(values, [q, 1.0 - q])
    return BootstrapCI(float(low), float(high), len(values))
