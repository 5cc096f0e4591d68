"""Time-dependent (cumulative/dynamic) AUC with inverse probability of censoring weights.

Cumulative cases ``T_i <= t`` with an event, weighted ``1 / G(T_i)``, against dynamic controls
``T_j > t``; the mean over evaluation times is weighted by the evaluated set's Kaplan-Meier
drops (scikit-survival's ``cumulative_dynamic_auc``).
"""
from __future__ import annotations

import logging

import numpy as np

from dsca.metrics.concordance import TIED_RISK_TOL
from dsca.metrics.inputs import validated_time_event_risk
from dsca.metrics.ipcw import censoring_distribution, eval_times_inside_follow_up
from dsca.metrics.kaplan_meier import kaplan_meier
from dsca.metrics.numeric import step_function_at, trapezoid

__all__ = ["time_dependent_auc"]

log = logging.getLogger(__name__)


def time_dependent_auc(
    time: np.ndarray, event: np.ndarray, risk: np.ndarray, eval_times: np.ndarray,
    train_time: np.ndarray | None = None, train_event: np.ndarray | None = None,
) -> float:
    """Mean cumulative/dynamic AUC (IPCW), as scikit-survival's ``cumulative_dynamic_auc``.

    Args:
        time: [N] follow-up times; event: [N] 1 = event; risk: [N] (higher = shorter survival).
        eval_times: [T] times at which the AUC is evaluated (those outside the follow-up are
            left out).
        train_time, train_event: [M] the patients the censoring distribution is fitted on
            (default: the evaluated set).

    Returns:
        the AUC at each time averaged with the evaluated set's Kaplan-Meier drops as weights
        (the plain AUC for one time); NaN where undefined (no time left, a time without cases,
        or a case whose censoring weight is infinite).
    """
    time, event, risk = validated_time_event_risk(time, event, risk)
    times = eval_times_inside_follow_up(eval_times, time, "time-dependent AUC")
    if len(times) == 0 or not event.any():
        return float("nan")
    g = censoring_distribution(time, event, train_time, train_event)
    order = np.argsort(-risk, kind="stable")
    time, event, risk = time[order], event[order], risk[order]
    g_at = g(time)
    case_at_some_time = (event == 1) & (time <= times[-1])
    if (g_at[case_at_some_time] <= 0).any():
        log.debug("time-dependent AUC undefined: censoring survival 0 at a case's time")
        return float("nan")
    weight = np.where(case_at_some_time, 1.0 / np.where(case_at_some_time, g_at, 1.0), 0.0)
    # After sorting by decreasing risk, each run of tied risks is one threshold: keep the
    # cumulative counts at the end of each run.
    run_end = np.append(np.abs(np.diff(risk)) > TIED_RISK_TOL, True)
    scores = np.empty(len(times))
    for k, t in enumerate(times):
        case = (event == 1) & (time <= t)
        control = time > t
        tp = np.cumsum(weight * case)[run_end]
        fp = np.cumsum(control)[run_end]
        if tp[-1] <= 0 or fp[-1] <= 0:
            return float("nan")
        tpr = np.concatenate([[0.0], tp / tp[-1]])
        fpr = np.concatenate([[0.0], fp / fp[-1]])
        scores[k] = trapezoid(tpr, fpr)
    if len(times) == 1:
        return float(scores[0])
    km = kaplan_meier(time, event)
    s = step_function_at(km.time, km.survival, times, before=1.0)
    drops = -np.diff(np.concatenate([[1.0], s]))
    if 1.0 - s[-1] <= 0:
        return float("nan")
    return float((scores * drops).sum() / (1.0 - s[-1]))
