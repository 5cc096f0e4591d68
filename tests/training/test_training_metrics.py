"""C-index, confidence interval, time-dependent metrics, Kaplan-Meier and log-rank."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import stats
from torchsurv.metrics.cindex import ConcordanceIndex

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


def test_cindex_matches_torchsurv_without_ties():
    rng = np.random.default_rng(1)
    t, e, r = rng.exponential(10, 80), rng.integers(0, 2, 80), rng.normal(size=80)
    ref = ConcordanceIndex()(torch.tensor(r), torch.tensor(e).bool(), torch.tensor(t))
    assert concordance_index(t, e, r) == pytest.approx(float(ref))


def test_bootstrap_ci_brackets_estimate_and_narrows():
    rng = np.random.default_rng(2)
    t = rng.exponential(10, 400)
    e = rng.integers(0, 2, 400)
    r = -t + rng.normal(0, 8, 400)
    c = concordance_index(t, e, r)
    lo, hi = cindex_bootstrap_ci(t, e, r, n_boot=200)
    lo_s, hi_s = cindex_bootstrap_ci(t[:60], e[:60], r[:60], n_boot=200)
    assert lo < c < hi and (hi - lo) < (hi_s - lo_s)
    assert cindex_bootstrap_ci(t, e, r, n_boot=200) == (lo, hi)  # seeded


def test_kaplan_meier_by_hand():
    ts, s = kaplan_meier([1, 2, 2, 3, 4], [1, 1, 0, 1, 0])
    assert ts.tolist() == [0, 1, 2, 3]
    assert s == pytest.approx([1, 4 / 5, 4 / 5 * 3 / 4, 4 / 5 * 3 / 4 * 1 / 2])


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
    rng = np.random.default_rng(4)
    n = 300
    true_risk = rng.normal(size=n)
    t = rng.exponential(np.exp(-true_risk) * 100)
    e = (rng.random(n) < 0.7).astype(int)
    edges = np.quantile(t[e == 1], [0, 0.25, 0.5, 0.75, 1.0])
    edges[0], edges[-1] = t.min() - 1e-5, t.max() + 1e-5
    y_t = np.searchsorted(edges, t, side="right") - 1
    hazards = 1 / (1 + np.exp(-(true_risk[:, None] - 1.0)))
    surv = np.cumprod(1 - np.repeat(hazards, 4, axis=1), axis=1)
    good = evaluate_predictions(t, e, y_t, -surv.sum(1), surv, edges, n_boot=50)
    # the same predictions given to the wrong patients
    perm = rng.permutation(n)
    rand = evaluate_predictions(t, e, y_t, -surv[perm].sum(1), surv[perm], edges, n_boot=50)
    assert good["cindex"] > 0.65 and abs(rand["cindex"] - 0.5) < 0.06
    assert good["td_auc"] > 0.65 and good["cindex_ci_low"] < good["cindex"] < good["cindex_ci_high"]
    assert 0 < good["ibs"] < rand["ibs"] < 0.5
    assert good["n"] == n and good["n_events"] == e.sum()
