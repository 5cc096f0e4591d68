"""Inverse probability of censoring weights (IPCW): ``G``, the Kaplan-Meier estimate of the
censoring distribution on a reference set (the training patients in cross-validation),
right-continuous; beyond the reference's last time ``G`` keeps its last value (scikit-survival
refuses such times). Also the evaluation times the IPCW metrics can use."""
from __future__ import annotations

import logging

import numpy as np

from dsca.metrics.inputs import validated_time_event
from dsca.metrics.kaplan_meier import risk_set_counts
from dsca.metrics.numeric import step_function_at

__all__ = ["CensoringKM", "censoring_distribution", "eval_times_inside_follow_up"]

log = logging.getLogger(__name__)


class CensoringKM:
    """Kaplan-Meier of the censoring times, ``G(t) = P(C > t)``.

    At a time with both events and censorings the events leave the risk set first (an event
    at t is seen as happening before a censoring at t), as in scikit-survival's
    ``CensoringDistributionEstimator``. Without censored patients G is 1 everywhere.
    """

    def __init__(self, time: np.ndarray, event: np.ndarray) -> None:
        uniq, at_risk, deaths, censored = risk_set_counts(time, event)
        with np.errstate(divide="ignore", invalid="ignore"):
            drop = np.where(censored > 0, censored / (at_risk - deaths), 0.0)
        self.knots = uniq
        self.values = np.cumprod(1.0 - drop)

    def __call__(self, t: np.ndarray) -> np.ndarray:
        return step_function_at(self.knots, self.values, t, before=1.0)


def censoring_distribution(
    time: np.ndarray, event: np.ndarray, train_time: np.ndarray | None, train_event: np.ndarray | None
) -> CensoringKM:
    """G fitted on the training patients, or on the evaluated set when none are given.

    Args:
        time, event: [N] the evaluated set (already checked).
        train_time, train_event: [M] the censoring reference, both or neither.
    """
    if (train_time is None) != (train_event is None):
        raise ValueError("give both train_time and train_event, or neither")
    if train_time is None:
        return CensoringKM(time, event)
    return CensoringKM(*validated_time_event(train_time, train_event))


def eval_times_inside_follow_up(eval_times: np.ndarray, time: np.ndarray, metric: str) -> np.ndarray:
    """Sorted distinct evaluation times within the follow-up ``[min time, max time)``.

    Outside it the estimators are undefined (scikit-survival raises); such times are left out
    and logged, so a fold whose test patients end early still gets a value.
    """
    eval_times = np.unique(np.asarray(eval_times, dtype=float).reshape(-1))
    if len(time) == 0:
        return eval_times[:0]
    inside = (eval_times >= time.min()) & (eval_times < time.max())
    if not inside.all():
        log.debug("%s: evaluation times %s are outside the follow-up [%g, %g) and left out",
                  metric, eval_times[~inside].tolist(), time.min(), time.max())
    return eval_times[inside]
