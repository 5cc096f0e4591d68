"""Survival metrics: C-index (with a bootstrap CI), IPCW time-dependent AUC and integrated Brier
score, Kaplan-Meier curves with confidence bands, the log-rank test and the hazard ratio of two
risk groups.

All functions take ``risk`` with the convention of :func:`dsca.losses.risk_score`: a higher
risk means a shorter survival. Times are compared in float64 throughout: a patient whose
follow-up equals an evaluation time must be seen as equal, not as a float32 rounding of it.

Definitions (each is tested against an independent implementation, see
``tests/training/test_training_oracles.py``):

- C-index: Harrell's, with scikit-survival's tie rules (the reference's evaluation): a pair
  (i, j) is comparable when i has an event and ``t_i < t_j``, or ``t_i == t_j`` and j is
  censored; tied risks count one half.
- Censoring weights (IPCW): ``G``, the Kaplan-Meier estimate of the censoring distribution on a
  reference set (the training patients in cross-validation), right-continuous. Beyond the
  reference's last time ``G`` keeps its last value (scikit-survival refuses such times).
- Time-dependent AUC: cumulative cases ``T_i <= t`` with an event, weighted ``1 / G(T_i)``,
  against dynamic controls ``T_j > t``; the mean over evaluation times is weighted by the
  evaluated set's Kaplan-Meier drops (scikit-survival's ``cumulative_dynamic_auc``).
- Brier score at t: ``mean(S(t)^2 [T_i <= t, event] / G(T_i) + (1 - S(t))^2 [T_i > t] / G(t))``,
  integrated by the trapezoid rule and divided by the time span (scikit-survival's
  ``integrated_brier_score``).
"""
from __future__ import annotations

import logging
import math
from statistics import NormalDist
from typing import NamedTuple

import numpy as np

__all__ = [
    "concordance_index",
    "cindex_bootstrap_ci",
    "BootstrapCI",
    "time_dependent_auc",
    "brier_scores",
    "integrated_brier_score",
    "survival_at",
    "evaluate_predictions",
    "KaplanMeier",
    "kaplan_meier",
    "logrank_test",
    "hazard_ratio",
    "HazardRatio",
    "split_at_training_median",
]

log = logging.getLogger(__name__)

# Risks closer than this are tied (scikit-survival's default tolerance).
_TIED_TOL = 1e-8


# ---------------------------------------------------------------------------------------------
# concordance


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
    time, event, risk = _as_arrays(time, event, risk)
    n = len(time)
    if n < 2 or n_boot < 1:
        return BootstrapCI(float("nan"), float("nan"), 0)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        num, den = _pair_counts(time[idx], event[idx], risk[idx])
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


# ---------------------------------------------------------------------------------------------
# Kaplan-Meier and the censoring distribution


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


def _counts(time: np.ndarray, event: np.ndarray) -> tuple[np.ndarray, ...]:
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
    """
    time, event = _time_event(time, event)
    uniq, at_risk, deaths, _ = _counts(time, event)
    has = deaths > 0
    ts, n, d = uniq[has], at_risk[has], deaths[has]
    surv = np.cumprod(1.0 - d / n)
    with np.errstate(divide="ignore", invalid="ignore"):
        greenwood = np.cumsum(d / (n * (n - d)))  # Var(log S) / 1; inf once S reaches 0
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


def _step_value(knots: np.ndarray, values: np.ndarray, t: np.ndarray, before: float) -> np.ndarray:
    """Right-continuous step function through ``(knots, values)`` at ``t``; ``before`` left of
    the first knot, the last value right of the last one."""
    idx = np.searchsorted(knots, np.asarray(t, dtype=float), side="right") - 1
    padded = np.concatenate([[before], values])
    return padded[idx + 1]


class _CensoringKM:
    """Kaplan-Meier of the censoring times, ``G(t) = P(C > t)``.

    At a time with both events and censorings the events leave the risk set first (an event
    at t is seen as happening before a censoring at t), as in scikit-survival's
    ``CensoringDistributionEstimator``. Without censored patients G is 1 everywhere.
    """

    def __init__(self, time: np.ndarray, event: np.ndarray) -> None:
        uniq, at_risk, deaths, censored = _counts(time, event)
        with np.errstate(divide="ignore", invalid="ignore"):
            drop = np.where(censored > 0, censored / (at_risk - deaths), 0.0)
        self.knots = uniq
        self.values = np.cumprod(1.0 - drop)

    def __call__(self, t: np.ndarray) -> np.ndarray:
        return _step_value(self.knots, self.values, t, before=1.0)


def _censoring(
    time: np.ndarray, event: np.ndarray, train_time: np.ndarray | None, train_event: np.ndarray | None
) -> _CensoringKM:
    """G fitted on the training patients, or on the evaluated set when none are given."""
    if (train_time is None) != (train_event is None):
        raise ValueError("give both train_time and train_event, or neither")
    if train_time is None:
        return _CensoringKM(time, event)
    return _CensoringKM(*_time_event(train_time, train_event))


def _eval_times_inside(eval_times: np.ndarray, time: np.ndarray, metric: str) -> np.ndarray:
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


# ---------------------------------------------------------------------------------------------
# time-dependent AUC and Brier score


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
    time, event, risk = _as_arrays(time, event, risk)
    times = _eval_times_inside(eval_times, time, "time-dependent AUC")
    if len(times) == 0 or not event.any():
        return float("nan")
    g = _censoring(time, event, train_time, train_event)
    order = np.argsort(-risk, kind="stable")
    time, event, risk = time[order], event[order], risk[order]
    g_at = g(time)
    needed = (event == 1) & (time <= times[-1])  # the patients that are a case at some time
    if (g_at[needed] <= 0).any():
        log.debug("time-dependent AUC undefined: censoring survival 0 at a case's time")
        return float("nan")
    weight = np.where(needed, 1.0 / np.where(needed, g_at, 1.0), 0.0)
    # After sorting by decreasing risk, each run of tied risks is one threshold: keep the
    # cumulative counts at the end of each run.
    run_end = np.append(np.abs(np.diff(risk)) > _TIED_TOL, True)
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
        scores[k] = _trapezoid(tpr, fpr)
    if len(times) == 1:
        return float(scores[0])
    km = kaplan_meier(time, event)
    s = _step_value(km.time, km.survival, times, before=1.0)
    drops = -np.diff(np.concatenate([[1.0], s]))
    if 1.0 - s[-1] <= 0:
        return float("nan")
    return float((scores * drops).sum() / (1.0 - s[-1]))


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
    done = np.searchsorted(edges[1:], np.asarray(times, dtype=float), side="right")
    padded = np.concatenate([np.ones((len(survival), 1)), survival], axis=1)
    return padded[:, np.clip(done, 0, padded.shape[1] - 1)]


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
    time, event = _time_event(time, event)
    g = _censoring(time, event, train_time, train_event)
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
    time, event = _time_event(time, event)
    if not event.any():
        return float("nan")
    grid = np.unique(time[event == 1]) if eval_times is None else eval_times
    times = _eval_times_inside(grid, time, "integrated Brier score")
    if len(times) < 2:
        return float("nan")
    bs = brier_scores(time, event, survival_at(survival, bin_edges, times), times,
                      train_time, train_event)
    return _trapezoid(bs, times) / float(times[-1] - times[0])


# ---------------------------------------------------------------------------------------------
# two risk groups


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
    time, event = _time_event(time, event)
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

    Returns:
        (hr, ci_low, ci_high); NaNs when a group is empty, there is no event, or the estimate
        diverges (a group without events: the maximum lies at infinity).
    """
    import torch

    from dsca.losses import cox_nll

    time, event = _time_event(time, event)
    x = np.asarray(group, dtype=float).reshape(-1)
    nan = HazardRatio(float("nan"), float("nan"), float("nan"))
    if len(x) != len(time) or not event.any() or x.min() == x.max():
        return nan
    xt = torch.as_tensor(x, dtype=torch.float64)
    et = torch.as_tensor(event, dtype=torch.float64)
    tt = torch.as_tensor(time, dtype=torch.float64)

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
            return nan
        step = score(beta) / info
        beta -= max(-5.0, min(5.0, step))
        if abs(step) < 1e-10:
            break
    else:
        return nan
    info = information(beta)
    if abs(beta) > 20 or not info > 0:
        return nan
    se = 1.0 / math.sqrt(info)
    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    return HazardRatio(math.exp(beta), math.exp(beta - z * se), math.exp(beta + z * se))


# ---------------------------------------------------------------------------------------------
# all metrics of one set


def evaluate_predictions(
    time: np.ndarray,
    event: np.ndarray,
    y_t: np.ndarray,
    risk: np.ndarray,
    survival: np.ndarray | None = None,
    bin_edges: np.ndarray | None = None,
    n_boot: int = 1000,
    train_time: np.ndarray | None = None,
    train_event: np.ndarray | None = None,
) -> dict[str, float]:
    """All metrics of one set of patients.

    Args:
        time: [N] follow-up times; event: [N] 1 = event; y_t: [N] discrete bins.
        risk: [N] predicted risk (higher = shorter survival).
        survival: [N, K] survival after each bin (discrete head only, for the Brier score).
        bin_edges: [K + 1] edges matching ``survival``.
        n_boot: bootstrap resamples of the C-index CI (0 disables it).
        train_time, train_event: the model's training patients, the censoring reference of
            the IPCW metrics (default: this set).

    Returns:
        ``cindex`` (continuous times, primary), ``cindex_ci_low``/``cindex_ci_high`` (95%
        bootstrap) and ``cindex_boot_n`` (resamples it rests on), ``cindex_discrete`` (on the
        bins, the reference's figure), ``td_auc`` (mean cumulative AUC at the inner bin edges
        that have cases and controls in this set), ``ibs`` (over this set's event times),
        ``n``, ``n_events``.
    """
    time, event, risk = _as_arrays(time, event, risk)
    out: dict[str, float] = {
        "cindex": concordance_index(time, event, risk),
        "cindex_discrete": concordance_index(np.asarray(y_t, float), event, risk),
        "n": int(len(time)),
        "n_events": int(event.sum()),
    }
    if n_boot > 0:
        ci = cindex_bootstrap_ci(time, event, risk, n_boot)
        out["cindex_ci_low"], out["cindex_ci_high"], out["cindex_boot_n"] = ci
    if bin_edges is not None:
        inner = np.asarray(bin_edges, dtype=float)[1:-1]
        # a time before this set's first event has no case: its AUC is undefined, not 0.5
        usable = inner[[((event == 1) & (time <= t)).any() and (time > t).any() for t in inner]]
        out["td_auc"] = (time_dependent_auc(time, event, risk, usable, train_time, train_event)
                         if len(usable) else float("nan"))
    if survival is not None and bin_edges is not None:
        out["ibs"] = integrated_brier_score(time, event, survival, bin_edges,
                                            train_time=train_time, train_event=train_event)
    return out


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    """Trapezoid-rule integral of y over x (numpy < 2 has no ``np.trapezoid``)."""
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def _time_event(time, event) -> tuple[np.ndarray, np.ndarray]:
    """[N] float64 finite times and [N] int 0/1 events, checked."""
    time = np.asarray(time, dtype=np.float64).reshape(-1)
    raw_event = np.asarray(event).reshape(-1)
    if raw_event.dtype != bool and not np.isin(raw_event, (0, 1)).all():
        raise ValueError(f"event must be 0 (censored) or 1 (event), got {np.unique(raw_event)[:5].tolist()}")
    if len(time) != len(raw_event):
        raise ValueError(f"length mismatch: time {len(time)}, event {len(raw_event)}")
    if not np.all(np.isfinite(time)):
        raise ValueError("time contains NaN or inf")
    return time, raw_event.astype(int)


def _as_arrays(time, event, risk) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_time_event` plus [N] finite float64 risks."""
    time, event = _time_event(time, event)
    risk = np.asarray(risk, dtype=np.float64).reshape(-1)
    if len(risk) != len(time):
        raise ValueError(f"length mismatch: time {len(time)}, risk {len(risk)}")
    if not np.all(np.isfinite(risk)):
        raise ValueError("risk contains NaN or inf")
    return time, event, risk
