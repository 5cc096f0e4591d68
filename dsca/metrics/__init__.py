"""Survival metrics: C-index (with a bootstrap CI), IPCW time-dependent AUC and integrated Brier
score, Kaplan-Meier curves with confidence bands, the log-rank test and the hazard ratio of two
risk groups.

All functions take ``risk`` with the convention of :func:`dsca.losses.risk_score`: a higher
risk means a shorter survival. Every input goes through :mod:`dsca.metrics.inputs` (float64
times, 0/1 events, finite risks).

One concern per module (each tested against an independent implementation, see
``tests/training/test_training_oracles.py``):

- :mod:`~dsca.metrics.concordance` - Harrell's C-index with scikit-survival's tie rules, and
  its percentile bootstrap CI;
- :mod:`~dsca.metrics.kaplan_meier` - Kaplan-Meier with log(-log) Greenwood bands;
- :mod:`~dsca.metrics.ipcw` - ``G``, the Kaplan-Meier of the censoring times on a reference set
  (the training patients in cross-validation), and the evaluation times it can weigh;
- :mod:`~dsca.metrics.auc` - cumulative/dynamic AUC (scikit-survival's
  ``cumulative_dynamic_auc``);
- :mod:`~dsca.metrics.brier_score` - Brier score and its integral (scikit-survival's
  ``brier_score`` / ``integrated_brier_score``), with ``S(t)`` read off the discrete bins;
- :mod:`~dsca.metrics.risk_groups` - the split at the training median, the log-rank test and
  the hazard ratio of the two groups (lifelines' ``logrank_test`` / ``CoxPHFitter``);
- :mod:`~dsca.metrics.evaluate` - every metric of one set of patients.

Everything public is importable from ``dsca.metrics`` itself.

Example:
    >>> import numpy as np
    >>> time, event = np.array([2.0, 4.0, 5.0, 7.0, 9.0]), np.array([1, 1, 0, 1, 0])
    >>> risk = np.array([4.0, 3.0, 1.0, 2.0, 0.0])
    >>> concordance_index(time, event, risk)
    1.0
    >>> round(time_dependent_auc(time, event, risk, [3.0, 6.0]), 3)
    1.0
"""
from __future__ import annotations

from dsca.metrics.auc import time_dependent_auc
from dsca.metrics.brier_score import brier_scores, integrated_brier_score, survival_at
from dsca.metrics.concordance import BootstrapCI, cindex_bootstrap_ci, concordance_index
from dsca.metrics.evaluate import evaluate_predictions
from dsca.metrics.kaplan_meier import KaplanMeier, kaplan_meier
from dsca.metrics.risk_groups import HazardRatio, hazard_ratio, logrank_test, split_at_training_median

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
