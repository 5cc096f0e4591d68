"""IPCW Brier score of a discrete-time survival prediction, and its integral over time.

Brier score at t: ``mean(S(t)^2 [T_i <= t, event] / G(T_i) + (1 - S(t))^2 [T_i > t] / G(t))``,
integrated by the trapezoid rule and divided by the time span (scikit-survival's
``integrated_brier_score``).
"""
from __future__ import annotations

import numpy as np

from dsca.metrics.inputs import validated_time_event
from dsca.metrics.ipcw import censoring_distribution, eval_times_inside_follow_up
from dsca.metrics.numeric import trapezoid

__all__ = ["survival_at", "brier_scores", "integrated_brier_score"]


def survival_at(survival: np.ndarray, bin_edges: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Survival of a discrete-time prediction at given times.

    Args:
        survival: [N, K] survival after each bin (``S_k``).
        bin_edges: [K + 1] bin edges.
        times: [T] times.

    Returns:
        [N, T]: survival after the bins that end at or before each time (1 in the first bin).
    """
    edges = np.asarray(bin_edges, dtype=float)
    survival = np.asarray(survival, dtype=float)
    bins_done = np.searchsorted(edges[1:], np.asarray(times, dtype=float), side="right")
    padded = np.concatenate([np.ones((len(survival), 1)), survival], axis=1)
    return padded[:, np.clip(bins_done, 0, padded.shape[1] - 1)]


def brier_scores(
    time: np.ndarray, event: np.ndarray, survival_at_times: np.ndarray, eval_times: np.ndarray,
    train_time: np.ndarray | None = None, train_event: np.ndarray | None = None,
) -> np.ndarray:
    """IPCW Brier score at each time, as scikit-survival's ``brier_score``.

    Args:
        time: [N]; event: [N] 1 = event.
        survival_at_times: [N, T] predicted survival at each of ``eval_times`` (sorted, inside
            the follow-up).
        eval_times: [T].
        train_time, train_event: [M] censoring reference (default: the evaluated set).

    Returns:
        [T] Brier scores. A weight whose censoring survival is 0 counts as 0 (as there).
    """
    time, event = validated_time_event(time, event)
    g = censoring_distribution(time, event, train_time, train_event)
    with np.errstate(divide="ignore"):
        inv_g_own = np.where(g(time) > 0, 1.0 / g(time), 0.0)
        inv_g_t = np.where(g(eval_times) > 0, 1.0 / g(eval_times), 0.0)
    est = np.asarray(survival_at_times, dtype=float)
    case = (event[:, None] == 1) & (time[:, None] <= eval_times[None, :])
    control = time[:, None] > eval_times[None, :]
    terms = est**2 * case * inv_g_own[:, None] + (1.0 - est) ** 2 * control * inv_g_t[None, :]
    return terms.mean(axis=0)


def integrated_brier_score(
    time: np.ndarray, event: np.ndarray, survival: np.ndarray, bin_edges: np.ndarray,
    eval_times: np.ndarray | None = None,
    train_time: np.ndarray | None = None, train_event: np.ndarray | None = None,
) -> float:
    """Integrated IPCW Brier score of a discrete-time survival prediction.

    Args:
        time: [N] follow-up times; event: [N] 1 = event.
        survival: [N, K] survival after each bin (``S_k``).
        bin_edges: [K + 1] bin edges; ``S(t)`` as in :func:`survival_at`.
        eval_times: [T] integration grid (default: the evaluated set's distinct event times);
            times outside the follow-up are left out.
        train_time, train_event: [M] censoring reference (default: the evaluated set).

    Returns:
        ``trapezoid(BS(t), t) / (t_last - t_first)``; NaN with fewer than 2 usable times or
        without an event (scikit-survival refuses such a set: the score would only grade
        the survival of the censored).
    """
    time, event = validated_time_event(time, event)
    if not event.any():
        return float("nan")
    grid = np.unique(time[event == 1]) if eval_times is None else eval_times
    times = eval_times_inside_follow_up(grid, time, "integrated Brier score")
    if len(times) < 2:
        return float("nan")
    bs = brier_scores(time, event, survival_at(survival, bin_edges, times), times,
                      train_time, train_event)
    return trapezoid(bs, times) / float(times[-1] - times[0])
