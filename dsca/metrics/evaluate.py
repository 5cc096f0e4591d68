"""All metrics of one set of patients, as training and ``dsca predict`` report them."""
from __future__ import annotations

import numpy as np

from dsca.metrics.auc import time_dependent_auc
from dsca.metrics.brier_score import integrated_brier_score
from dsca.metrics.concordance import cindex_bootstrap_ci, concordance_index
from dsca.metrics.inputs import validated_time_event_risk

__all__ = ["evaluate_predictions"]


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
    time, event, risk = validated_time_event_risk(time, event, risk)
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
