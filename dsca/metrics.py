"""Survival metrics: C-index (continuous and binned, with a bootstrap CI), time-dependent AUC,
integrated Brier score, Kaplan-Meier curves and the log-rank test.

All functions take ``risk`` with the convention of :func:`dsca.losses.risk_score`: a higher
risk means a shorter survival.

The C-index is Harrell's with the tie rules of the reference's evaluation (those of
scikit-survival): a pair (i, j) is comparable when i has an event and ``t_i < t_j``, or
``t_i == t_j`` and j is censored; tied risks count one half. Time-dependent AUC and the
integrated Brier score come from ``torchsurv`` (PyTorch-native, depends on nothing beyond
torch/numpy/scipy, and implements the IPCW estimators that are easy to get subtly wrong).
"""
from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import torch

__all__ = [
    "concordance_index",
    "cindex_bootstrap_ci",
    "time_dependent_auc",
    "integrated_brier_score",
    "evaluate_predictions",
    "kaplan_meier",
    "logrank_test",
]

log = logging.getLogger(__name__)

_TIED_TOL = 1e-8


def _pair_counts(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> tuple[float, float]:
    """(concordant + ties / 2, comparable) over all pairs; O(n^2) memory, fine below ~5k."""
    t_i, t_j = time[:, None], time[None, :]
    comparable = (event[:, None] == 1) & ((t_i < t_j) | ((t_i == t_j) & (event[None, :] == 0)))
    diff = risk[:, None] - risk[None, :]
    tied = np.abs(diff) <= _TIED_TOL
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
    """
    time, event, risk = _as_arrays(time, event, risk)
    num, den = _pair_counts(time, event, risk)
    return num / den if den > 0 else float("nan")


def cindex_bootstrap_ci(
    time: np.ndarray,
    event: np.ndarray,
    risk: np.ndarray,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the C-index (patients resampled).

    Args:
        time, event, risk: [N] as in :func:`concordance_index`.
        n_boot: bootstrap resamples.
        level: coverage.
        seed: resampling seed (fixed so that reports are reproducible).

    Returns:
        (low, high); NaNs when fewer than 2 patients.
    """
    time, event, risk = _as_arrays(time, event, risk)
    n = len(time)
    if n < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        num, den = _pair_counts(time[idx], event[idx], risk[idx])
        if den > 0:
            values.append(num / den)
    if not values:
        return float("nan"), float("nan")
    q = (1.0 - level) / 2.0
    low, high = np.quantile(values, [q, 1.0 - q])
    return float(low), float(high)


def time_dependent_auc(
    time: np.ndarray, event: np.ndarray, risk: np.ndarray, eval_times: np.ndarray
) -> float:
    """Mean cumulative/dynamic AUC (IPCW, torchsurv) over ``eval_times``; NaN if undefined.

    Args:
        time: [N] follow-up times; event: [N] 1 = event; risk: [N] (higher = shorter survival).
        eval_times: [T] times at which the AUC is evaluated (those outside the follow-up are
            dropped).
    """
    from torchsurv.metrics.auc import Auc

    time, event, risk = _as_arrays(time, event, risk)
    eval_times = _inside_follow_up(eval_times, time, event)
    if len(eval_times) == 0:
        return float("nan")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            auc = Auc()(
                torch.as_tensor(risk, dtype=torch.float64),
                torch.as_tensor(event, dtype=torch.bool),
                torch.as_tensor(time, dtype=torch.float64),
                new_time=torch.as_tensor(eval_times, dtype=torch.float64),
            )
    except (ValueError, RuntimeError) as err:
        log.debug("time-dependent AUC undefined: %s", err)
        return float("nan")
    return float(torch.nanmean(auc))


def integrated_brier_score(
    time: np.ndarray, event: np.ndarray, survival: np.ndarray, bin_edges: np.ndarray
) -> float:
    """Integrated Brier score (IPCW, torchsurv) of a discrete-time survival prediction.

    Args:
        time: [N] follow-up times.
        event: [N] 1 = event.
        survival: [N, K] survival after each bin (``S_k``).
        bin_edges: [K + 1] bin edges; ``S(t)`` is the survival after the bins that end at or
            before ``t`` (a step function, 1 in the first bin).

    Returns:
        the Brier score integrated over the observed event times, NaN if undefined.
    """
    from torchsurv.metrics.brier_score import BrierScore

    time, event, _ = _as_arrays(time, event, np.zeros(len(time)))
    eval_times = _inside_follow_up(np.unique(time[event == 1]), time, event)
    if len(eval_times) < 2:
        return float("nan")
    edges = np.asarray(bin_edges, dtype=float)
    # Number of bins fully survived by time t -> index into [1, S_0, ..., S_{K-1}].
    done = np.searchsorted(edges[1:], eval_times, side="right")
    padded = np.concatenate([np.ones((len(survival), 1)), np.asarray(survival, float)], axis=1)
    est = padded[:, np.clip(done, 0, padded.shape[1] - 1)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bs = BrierScore()
            bs(
                torch.as_tensor(est, dtype=torch.float64),
                torch.as_tensor(event, dtype=torch.bool),
                torch.as_tensor(time, dtype=torch.float64),
                new_time=torch.as_tensor(eval_times, dtype=torch.float64),
            )
            return float(bs.integral())
    except (ValueError, RuntimeError) as err:
        log.debug("integrated Brier score undefined: %s", err)
        return float("nan")


def evaluate_predictions(
    time: np.ndarray,
    event: np.ndarray,
    y_t: np.ndarray,
    risk: np.ndarray,
    survival: np.ndarray | None = None,
    bin_edges: np.ndarray | None = None,
    n_boot: int = 1000,
) -> dict[str, float]:
    """All metrics of one set of patients.

    Args:
        time: [N] follow-up times; event: [N] 1 = event; y_t: [N] discrete bins.
        risk: [N] predicted risk (higher = shorter survival).
        survival: [N, K] survival after each bin (discrete head only, for the Brier score).
        bin_edges: [K + 1] edges matching ``survival``.
        n_boot: bootstrap resamples of the C-index CI (0 disables it).

    Returns:
        ``cindex`` (continuous times, primary), ``cindex_ci_low``/``cindex_ci_high`` (95%
        bootstrap), ``cindex_discrete`` (on the bins, the reference's figure), ``td_auc`` (mean
        cumulative AUC at the inner bin edges), ``ibs``, ``n``, ``n_events``.
    """
    time, event, risk = _as_arrays(time, event, risk)
    out: dict[str, float] = {
        "cindex": concordance_index(time, event, risk),
        "cindex_discrete": concordance_index(np.asarray(y_t, float), event, risk),
        "n": int(len(time)),
        "n_events": int(event.sum()),
    }
    if n_boot > 0:
        out["cindex_ci_low"], out["cindex_ci_high"] = cindex_bootstrap_ci(time, event, risk, n_boot)
    if bin_edges is not None:
        out["td_auc"] = time_dependent_auc(time, event, risk, np.asarray(bin_edges)[1:-1])
    if survival is not None and bin_edges is not None:
        out["ibs"] = integrated_brier_score(time, event, survival, bin_edges)
    return out


def kaplan_meier(time: np.ndarray, event: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Kaplan-Meier estimate.

    Args:
        time: [N] follow-up times; event: [N] 1 = event.

    Returns:
        (times [M + 1], survival [M + 1]): step function starting at (0, 1), one step per
        distinct event time.
    """
    time, event, _ = _as_arrays(time, event, np.zeros(len(time)))
    ts = np.unique(time[event == 1])
    at_risk = (time[None, :] >= ts[:, None]).sum(axis=1)
    deaths = ((time[None, :] == ts[:, None]) & (event[None, :] == 1)).sum(axis=1)
    surv = np.cumprod(1.0 - deaths / at_risk)
    return np.concatenate([[0.0], ts]), np.concatenate([[1.0], surv])


def logrank_test(time: np.ndarray, event: np.ndarray, group: np.ndarray) -> tuple[float, float]:
    """Two-group log-rank test.

    Args:
        time: [N]; event: [N] 1 = event; group: [N] bool/0-1 membership.

    Returns:
        (chi-square statistic with 1 degree of freedom, p-value); NaNs if undefined.
    """
    time, event, _ = _as_arrays(time, event, np.zeros(len(time)))
    g = np.asarray(group).astype(bool)
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


def _inside_follow_up(eval_times: np.ndarray, time: np.ndarray, event: np.ndarray) -> np.ndarray:
    """Evaluation times where the IPCW estimators are defined (events before, subjects after)."""
    eval_times = np.asarray(eval_times, dtype=float)
    if not (event == 1).any():
        return eval_times[:0]
    lo, hi = time[event == 1].min(), time.max()
    return eval_times[(eval_times >= lo) & (eval_times < hi)]


def _as_arrays(time, event, risk) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    time = np.asarray(time, dtype=float).reshape(-1)
    event = np.asarray(event).reshape(-1).astype(int)
    risk = np.asarray(risk, dtype=float).reshape(-1)
    if not (len(time) == len(event) == len(risk)):
        raise ValueError(f"length mismatch: time {len(time)}, event {len(event)}, risk {len(risk)}")
    if not np.all(np.isfinite(risk)):
        raise ValueError("risk contains NaN or inf")
    return time, event, risk

