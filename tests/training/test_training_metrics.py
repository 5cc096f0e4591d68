"""C-index, confidence interval, time-dependent metrics, Kaplan-Meier and log-rank."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats

from dsca.metrics import (
    cindex_bootstrap_ci,
    concordance_index,
    evaluate_predictions,
    kaplan_meier,
    logrank_test,
)


def _brute_cindex(t, e, r):
    num = den = 0.0
    for i, j in itertools.permutations(range(len(t)), 2):
        if e[i] and (t[i] < t[j] or (t[i] == t[j] and not e[j])):
            den += 1
            num += 1.0 if r[i] > r[j] else 0.5 if r[i] == r[j] else 0.0
    return num / den


def test_cindex_matches_pair_counting_with_ties():
    rng = np.random.default_rng(0)
    t = rng.integers(0, 6, 40).astype(float)  # many tied times
    e = rng.integers(0, 2, 40)
    r = rng.integers(0, 4, 40).astype(float)  # many tied risks
    assert concordance_index(t, e, r) == pytest.approx(_brute_cindex(t, e, r))


def test_bootstrap_ci_brackets_estimate_and_narrows():
    rng = np.random.default_rng(2)
    t = rng.exponential(10, 400)
    e = rng.integers(0, 2, 400)
    r = -t + rng.normal(0, 8, 400)
    c = concordance_index(t, e, r)
    lo, hi, used = cindex_bootstrap_ci(t, e, r, n_boot=200)
    lo_s, hi_s, _ = cindex_bootstrap_ci(t[:60], e[:60], r[:60], n_boot=200)
    assert lo < c < hi and (hi - lo) < (hi_s - lo_s) and used == 200
    assert cindex_bootstrap_ci(t, e, r, n_boot=200) == (lo, hi, used)  # seeded


def test_bootstrap_counts_resamples_without_comparable_pairs():
    """Two patients, one event: about half the resamples hold no comparable pair; they are
    left out of the interval and counted, not silently dropped."""
    low, high, used = cindex_bootstrap_ci([1.0, 2.0], [1, 0], [2.0, 1.0], n_boot=400)
    assert 100 < used < 300 and low == high == 1.0
    assert cindex_bootstrap_ci([1.0, 2.0], [0, 0], [2.0, 1.0], n_boot=50) == (
        pytest.approx(float("nan"), nan_ok=True), pytest.approx(float("nan"), nan_ok=True), 0)


def test_kaplan_meier_by_hand():
    km = kaplan_meier([1, 2, 2, 3, 4], [1, 1, 0, 1, 0])
    assert km.time.tolist() == [0, 1, 2, 3]
    assert km.survival == pytest.approx([1, 4 / 5, 4 / 5 * 3 / 4, 4 / 5 * 3 / 4 * 1 / 2])
    assert (km.ci_low <= km.survival).all() and (km.survival <= km.ci_high).all()


def test_logrank_matches_scipy():
    rng = np.random.default_rng(3)
    t = np.round(rng.exponential(10, 120), 1)
    e = rng.integers(0, 2, 120)
    g = rng.random(120) < 0.5
    t[g] *= 0.6
    chi2, p = logrank_test(t, e, g)
    ref = stats.logrank(
        stats.CensoredData(uncensored=t[g & (e == 1)], right=t[g & (e == 0)]),
        stats.CensoredData(uncensored=t[~g & (e == 1)], right=t[~g & (e == 0)]),
    )
    assert chi2 == pytest.approx(ref.statistic**2, rel=1e-6)
    assert p == pytest.approx(ref.pvalue, rel=1e-6)


def test_evaluate_predictions_informative_vs_random():
    """The wiring of evaluate_predictions: its td-AUC and IBS are scikit-survival's with the
    training patients as the censoring reference, at the inner bin edges and at this set's
    event times; informative predictions beat the same predictions given to the wrong
    patients."""
    sksurv_metrics = pytest.importorskip("sksurv.metrics")
    from sksurv.util import Surv

    from dsca.metrics import survival_at

    rng = np.random.default_rng(4)
    n = 300
    true_risk = rng.normal(size=n)
    t = np.round(rng.exponential(np.exp(-true_risk) * 100), 1) + 0.1
    e = (rng.random(n) < 0.7).astype(int)
    train_t = np.append(rng.exponential(100, 200), t.max() + 1)
    train_e = np.append((rng.random(200) < 0.6).astype(int), 0)
    edges = np.quantile(t[e == 1], [0, 0.25, 0.5, 0.75, 1.0])
    edges[0], edges[-1] = t.min() - 1e-5, t.max() + 1e-5
    y_t = np.searchsorted(edges, t, side="right") - 1
    hazards = 1 / (1 + np.exp(-(true_risk[:, None] - 1.0)))
    surv = np.cumprod(1 - np.repeat(hazards, 4, axis=1), axis=1)
    good = evaluate_predictions(t, e, y_t, -surv.sum(1), surv, edges, n_boot=50,
                                train_time=train_t, train_event=train_e)
    y_train, y_test = Surv.from_arrays(train_e == 1, train_t), Surv.from_arrays(e == 1, t)
    auc = sksurv_metrics.cumulative_dynamic_auc(y_train, y_test, -surv.sum(1), edges[1:-1])[1]
    times = np.unique(t[e == 1])
    times = times[times < t.max()]
    ibs = sksurv_metrics.integrated_brier_score(y_train, y_test, survival_at(surv, edges, times), times)
    assert good["td_auc"] == pytest.approx(auc, abs=1e-9)
    assert good["ibs"] == pytest.approx(ibs, abs=1e-9)
    # the same predictions given to the wrong patients
    perm = rng.permutation(n)
    rand = evaluate_predictions(t, e, y_t, -surv[perm].sum(1), surv[perm], edges, n_boot=50,
                                train_time=train_t, train_event=train_e)
    assert good["cindex"] > 0.65 and abs(rand["cindex"] - 0.5) < 0.06
    assert good["td_auc"] > 0.65 and good["cindex_ci_low"] < good["cindex"] < good["cindex_ci_high"]
    assert good["ibs"] < rand["ibs"]
    assert good["n"] == n and good["n_events"] == e.sum() and good["cindex_boot_n"] == 50


def test_survival_at_reads_the_bins_that_ended_by_hand():
    """S(t) is the survival after the bins whose right edge is at or before t."""
    from dsca.metrics import survival_at

    got = survival_at(np.array([[0.9, 0.5]]), np.array([0.0, 1.0, 2.0]), [0.5, 0.999, 1.0, 1.5, 2.0, 9.0])
    assert got.tolist() == [[1.0, 1.0, 0.9, 0.9, 0.5, 0.5]]


def test_event_must_be_zero_or_one():
    with pytest.raises(ValueError, match="event must be 0"):
        concordance_index([1.0, 2.0], [0.5, 1], [0.0, 1.0])
