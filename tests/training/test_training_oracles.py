"""Survival metrics and the Cox loss against independent implementations: scikit-survival (IPCW
Brier score, cumulative/dynamic AUC, C-index), lifelines (Cox fit, hazard ratio, Kaplan-Meier
bands, log-rank) and a direct numpy reference of the partial likelihood (survival_oracles.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dsca.losses import cox_nll
from dsca.metrics import (
    concordance_index,
    hazard_ratio,
    integrated_brier_score,
    kaplan_meier,
    logrank_test,
    time_dependent_auc,
)
from survival_oracles import (
    cox_loglik_grad,
    cox_loglik_stable,
    cox_loglik_textbook,
    cox_nll_reference,
)

TIES = ("breslow", "efron")


def _sksurv():
    metrics = pytest.importorskip("sksurv.metrics")
    from sksurv.util import Surv

    def y(event, time):
        return Surv.from_arrays(np.asarray(event).astype(bool), np.asarray(time, dtype=float))

    return metrics, y


def _lifelines():
    return pytest.importorskip("lifelines")


def _s_at(survival, edges, t):
    """S(t) of the contract: survival after the bins whose right edge is <= t."""
    done = np.searchsorted(np.asarray(edges, float)[1:], np.asarray(t, float), side="right")
    padded = np.concatenate([np.ones((len(survival), 1)), survival], axis=1)
    return padded[:, np.clip(done, 0, survival.shape[1])]


def _discrete_prediction(rng, n, k):
    hazards = rng.uniform(0.02, 0.5, (n, k))
    return np.cumprod(1.0 - hazards, axis=1)


def _inside(times, time):
    times = np.unique(times)
    return times[(times >= time.min()) & (times < time.max())]


def _cohort(rng, n, decimal):
    """Follow-up times with ties (rounded to 0.1, or integers), about 60% events."""
    if decimal:
        time = np.round(rng.exponential(8.0, n), 1) + 0.1
    else:
        time = rng.integers(1, 12, n).astype(float)
    return time, (rng.random(n) < 0.6).astype(int)


def _training_cover(rng, time, last_event):
    """A training set whose follow-up covers ``time`` (its last patient after all of them)."""
    m = 70
    t = np.append(np.round(rng.exponential(8.0, m), 1) + 0.1, time.max() + 1.0)
    e = np.append((rng.random(m) < 0.5).astype(int), int(last_event))
    return t, e


# ---------------------------------------------------------------------------------------------
# integrated Brier score


def test_ibs_matches_sksurv_with_training_reference():
    """IPCW from the training patients, S(t) read off the bins (an eval time equal to a right
    edge sees the survival after that bin), decimal and tied times: scikit-survival's IBS."""
    metrics, y = _sksurv()
    rng = np.random.default_rng(10)
    for trial in range(12):
        n, k = int(rng.integers(15, 60)), int(rng.integers(2, 8))
        time, event = _cohort(rng, n, decimal=trial % 2 == 0)
        train_t, train_e = _training_cover(rng, time, last_event=trial % 3 != 0)
        edges = np.round(np.linspace(0.0, time.max() * 1.05, k + 1), 1)
        surv = _discrete_prediction(rng, n, k)
        grid = np.concatenate([edges[1:-1], rng.choice(time, 4), rng.uniform(time.min(), time.max(), 3)])
        times = _inside(grid, time)
        assert len(times) >= 2
        ours = integrated_brier_score(time, event, surv, edges, times, train_t, train_e)
        ref = metrics.integrated_brier_score(y(train_e, train_t), y(event, time),
                                             _s_at(surv, edges, times), times)
        assert ours == pytest.approx(ref, abs=1e-6), trial


def test_ibs_default_reference_is_the_evaluated_set():
    """Without training patients the censoring Kaplan-Meier is fitted on the evaluated set."""
    metrics, y = _sksurv()
    rng = np.random.default_rng(11)
    time, event = _cohort(rng, 50, decimal=True)
    edges = np.array([0.0, 2.5, 5.0, 10.0, time.max() + 1])
    surv = _discrete_prediction(rng, 50, 4)
    times = _inside(np.append(edges, time[:6]), time)
    ours = integrated_brier_score(time, event, surv, edges, times)
    ref = metrics.integrated_brier_score(y(event, time), y(event, time), _s_at(surv, edges, times), times)
    assert ours == pytest.approx(ref, abs=1e-6)
    train_t, train_e = _training_cover(rng, time, last_event=True)
    other = integrated_brier_score(time, event, surv, edges, times, train_t, train_e)
    assert abs(other - ours) > 1e-6  # the training reference is really used when given


def test_ibs_ties_everywhere_and_all_events():
    """Three distinct times for 30 patients, every one an event (G = 1 throughout)."""
    metrics, y = _sksurv()
    rng = np.random.default_rng(12)
    time = rng.choice([1.0, 2.0, 3.0], 30)
    event = np.ones(30, dtype=int)
    train_t, train_e = rng.choice([1.0, 2.0, 3.0, 4.0], 40), np.ones(40, dtype=int)
    edges = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    surv = _discrete_prediction(rng, 30, 4)
    times = np.array([1.0, 1.5, 2.0])
    ours = integrated_brier_score(time, event, surv, edges, times, train_t, train_e)
    ref = metrics.integrated_brier_score(y(train_e, train_t), y(event, time), _s_at(surv, edges, times), times)
    assert ours == pytest.approx(ref, abs=1e-6)


def test_ibs_all_censored_is_nan():
    """No event (scikit-survival refuses such a test set): NaN rather than an exception, with
    and without eval times."""
    rng = np.random.default_rng(13)
    time = np.round(rng.uniform(1, 20, 25), 1)
    event = np.zeros(25, dtype=int)
    train_t, train_e = _training_cover(rng, time, last_event=True)
    edges = np.array([0.0, 5.0, 10.0, 15.0, 25.0])
    surv = _discrete_prediction(rng, 25, 4)
    times = _inside([3.0, 5.0, 9.5, 12.0], time)
    assert math.isnan(integrated_brier_score(time, event, surv, edges, times, train_t, train_e))
    assert math.isnan(integrated_brier_score(time, event, surv, edges, times))
    assert math.isnan(integrated_brier_score(time, event, surv, edges))


def test_ibs_undefined_is_nan():
    """One patient (empty follow-up) and a single usable eval time give NaN, not an exception."""
    surv = np.array([[0.9, 0.5]])
    edges = np.array([0.0, 1.0, 2.0])
    assert math.isnan(integrated_brier_score(np.array([1.5]), np.array([1]), surv, edges, np.array([1.5])))
    assert math.isnan(integrated_brier_score(np.array([1.5]), np.array([1]), surv, edges))
    time, event = np.array([1.0, 2.0, 3.0]), np.array([1, 0, 1])
    surv3 = np.repeat(surv, 3, axis=0)
    assert math.isnan(integrated_brier_score(time, event, surv3, edges, np.array([1.5])))


def test_ibs_test_time_beyond_training_max():
    """Test patients followed beyond the last training time are controls at every eval time
    (all before that time): their result is scikit-survival's with their times moved back to
    the training maximum (where it refuses nothing)."""
    metrics, y = _sksurv()
    rng = np.random.default_rng(14)
    time, event = _cohort(rng, 40, decimal=True)
    train_t = np.append(np.round(rng.exponential(8.0, 60), 1) + 0.1, time.max() + 1)
    train_e = np.append((rng.random(60) < 0.5).astype(int), 1)
    t_max = train_t.max()
    time = np.append(time, [t_max + 3.7, t_max + 10.0])
    event = np.append(event, [1, 0])
    edges = np.array([0.0, 3.0, 6.0, 12.0, t_max + 20])
    surv = _discrete_prediction(rng, len(time), 4)
    times = _inside(np.append(edges, time[:5]), time[:-2])
    ours = integrated_brier_score(time, event, surv, edges, times, train_t, train_e)
    moved = time.copy()
    moved[-2:] = t_max
    ref = metrics.integrated_brier_score(y(train_e, train_t), y(event, moved), _s_at(surv, edges, times), times)
    assert ours == pytest.approx(ref, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# time-dependent AUC


def test_td_auc_matches_sksurv_with_ties():
    """Integer and decimal times with ties, tied risks, one to four eval times at or between
    event times, training reference: scikit-survival's mean cumulative/dynamic AUC."""
    metrics, y = _sksurv()
    rng = np.random.default_rng(20)
    for trial in range(16):
        n = int(rng.integers(12, 60))
        time, event = _cohort(rng, n, decimal=trial % 2 == 1)
        risk = rng.integers(0, 5, n).astype(float) - 0.1 * time * (trial % 4 == 0)
        train_t, train_e = _training_cover(rng, time, last_event=True)
        ev = _inside(time[event == 1], time)
        ev = ev[ev >= time[event == 1].min()]
        times = np.sort(rng.choice(ev, min(len(ev), int(rng.integers(1, 5))), replace=False))
        if trial % 3 == 0 and len(times) > 1:
            times = np.unique(np.append(times, (times[0] + times[1]) / 2))
        ours = time_dependent_auc(time, event, risk, times, train_t, train_e)
        ref = metrics.cumulative_dynamic_auc(y(train_e, train_t), y(event, time), risk, times)[1]
        assert ours == pytest.approx(ref, abs=1e-6), trial


def test_td_auc_decimal_eval_time_equal_to_patient_time():
    """A patient whose decimal time equals an eval time (0.1 + 0.2) with an event is a case at
    it; at the literal 0.3 (slightly smaller) the same patient is a control. By hand and as
    scikit-survival."""
    metrics, y = _sksurv()
    time = np.array([0.1 + 0.2, 0.2, 12.3, 20.0])
    event = np.array([1, 1, 0, 1])
    risk = np.array([3.0, 1.0, 2.0, 0.0])
    # cases {0.3: risk 3, 0.2: risk 1} vs controls {12.3: risk 2, 20: risk 0}: 3 of 4 ordered
    assert time_dependent_auc(time, event, risk, np.array([0.1 + 0.2])) == pytest.approx(0.75, abs=1e-12)
    # cases {0.2: risk 1} vs controls {risk 3, 2, 0}: 1 of 3
    assert time_dependent_auc(time, event, risk, np.array([0.3])) == pytest.approx(1 / 3, abs=1e-12)
    rng = np.random.default_rng(21)
    pool = np.array([0.1 + 0.2, 12.3, 4.7, 7.1, 2.0, 0.2])
    time = np.append(rng.choice(pool, 40), 30.0)
    event = np.append((rng.random(40) < 0.6).astype(int), 1)
    risk = rng.integers(0, 3, 41).astype(float)
    train_t, train_e = _training_cover(rng, time, last_event=True)
    for times in ([0.1 + 0.2, 12.3], [0.1 + 0.2], [4.7, 7.1, 12.3]):
        times = np.array(times)
        for ref_t, ref_e in ((train_t, train_e), (time, event)):
            ours = time_dependent_auc(time, event, risk, times, ref_t, ref_e)
            ref = metrics.cumulative_dynamic_auc(y(ref_e, ref_t), y(event, time), risk, times)[1]
            assert ours == pytest.approx(ref, abs=1e-6), times


def test_td_auc_default_reference_is_the_evaluated_set():
    """Without training patients the censoring Kaplan-Meier is the evaluated set's."""
    metrics, y = _sksurv()
    rng = np.random.default_rng(22)
    time, event = _cohort(rng, 50, decimal=True)
    time = np.append(time, time.max() + 1)  # a unique last time: G never 0 at a case
    event = np.append(event, 0)
    risk = -time + rng.normal(0, 5, 51)
    times = np.quantile(time[event == 1], [0.2, 0.5, 0.8])
    ours = time_dependent_auc(time, event, risk, times)
    ref = metrics.cumulative_dynamic_auc(y(event, time), y(event, time), risk, times)[1]
    assert ours == pytest.approx(ref, abs=1e-6)


def test_td_auc_all_events_and_sign():
    """All events (G = 1); risk = -time orders perfectly (AUC 1), risk = time reversed (0)."""
    metrics, y = _sksurv()
    rng = np.random.default_rng(23)
    time = rng.permutation(np.arange(1.0, 31.0))
    event = np.ones(30, dtype=int)
    train_t, train_e = np.arange(0.5, 40.0), np.ones(40, dtype=int)
    times = np.array([5.0, 12.5, 20.0])
    assert time_dependent_auc(time, event, -time, times, train_t, train_e) == pytest.approx(1.0)
    assert time_dependent_auc(time, event, time, times, train_t, train_e) == pytest.approx(0.0)
    risk = rng.integers(0, 4, 30).astype(float)
    ours = time_dependent_auc(time, event, risk, times, train_t, train_e)
    ref = metrics.cumulative_dynamic_auc(y(train_e, train_t), y(event, time), risk, times)[1]
    assert ours == pytest.approx(ref, abs=1e-6)


def test_td_auc_test_time_beyond_training_max():
    """Test patients followed beyond the last training time, controls at every eval time: as
    scikit-survival with their times moved back to the training maximum."""
    metrics, y = _sksurv()
    rng = np.random.default_rng(24)
    time, event = _cohort(rng, 40, decimal=False)
    train_t = np.append(rng.integers(1, 12, 60).astype(float), time.max() + 1)
    train_e = np.append((rng.random(60) < 0.5).astype(int), 1)
    t_max = train_t.max()
    time = np.append(time, [t_max + 2.5, t_max + 6.0])
    event = np.append(event, [1, 0])
    risk = rng.normal(size=len(time))
    times = np.array([3.0, 5.0, 8.0])
    ours = time_dependent_auc(time, event, risk, times, train_t, train_e)
    moved = time.copy()
    moved[-2:] = t_max
    ref = metrics.cumulative_dynamic_auc(y(train_e, train_t), y(event, moved), risk, times)[1]
    assert ours == pytest.approx(ref, abs=1e-6)


def test_td_auc_undefined_is_nan():
    """All censored, one patient, and an eval time before the first event (no case; NaN in
    scikit-survival as well) give NaN, not an exception."""
    metrics, y = _sksurv()
    time = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    risk = np.array([0.5, 0.1, 0.9, 0.3, 0.2])
    assert math.isnan(time_dependent_auc(time, np.zeros(5, dtype=int), risk, np.array([2.0, 3.0])))
    assert math.isnan(time_dependent_auc(np.array([2.0]), np.array([1]), np.array([0.3]), np.array([2.0])))
    event = np.array([0, 0, 1, 1, 1])
    with np.errstate(invalid="ignore", divide="ignore"):
        ref = metrics.cumulative_dynamic_auc(y(event, time), y(event, time), risk, np.array([1.5]))[1]
    assert math.isnan(ref)
    assert math.isnan(time_dependent_auc(time, event, risk, np.array([1.5])))


# ---------------------------------------------------------------------------------------------
# C-index


def test_cindex_matches_sksurv_with_ties():
    """Harrell's C-index with ties in time (event/censored pairs) and in risk."""
    metrics, _ = _sksurv()
    rng = np.random.default_rng(30)
    for trial in range(20):
        n = int(rng.integers(2, 50))
        time = rng.integers(1, 8, n).astype(float) + (0.5 if trial % 2 else 0.0)
        event = rng.integers(0, 2, n)
        event[0] = 1
        time[-1] = time.max() + 1  # one comparable pair at least
        risk = rng.integers(0, 4, n).astype(float)
        ref = metrics.concordance_index_censored(event.astype(bool), time, risk)[0]
        assert concordance_index(time, event, risk) == pytest.approx(ref, abs=1e-12), trial


def test_cindex_without_comparable_pairs_is_nan():
    """All censored, or one patient: NaN (scikit-survival raises)."""
    assert math.isnan(concordance_index(np.array([1.0, 2.0, 3.0]), np.array([0, 0, 0]), np.array([1.0, 2.0, 3.0])))
    assert math.isnan(concordance_index(np.array([1.0]), np.array([1]), np.array([1.0])))


# ---------------------------------------------------------------------------------------------
# Cox partial likelihood: the numpy reference itself


def _cox_batch(rng, b):
    pool = np.array([1.0, 2.0, 2.0, 3.0, 12.3, 0.7, 0.1 + 0.2, 5.0])
    time = rng.choice(pool, b)
    p = rng.choice([0.0, 0.3, 0.7, 1.0])
    event = (rng.random(b) < p).astype(int)
    eta = rng.normal(0.0, 2.0, b)
    return eta, event, time


def test_oracle_stable_agrees_with_textbook_and_sksurv():
    """The reference itself: its log-sum-exp form equals the plain formula, and both equal
    scikit-survival's CoxPHOptimizer likelihood (Breslow and Efron) at the same coefficient."""
    rng = np.random.default_rng(40)
    try:
        from sksurv.linear_model.coxph import CoxPHOptimizer
    except ImportError:
        CoxPHOptimizer = None
    for _ in range(60):
        b = int(rng.integers(1, 13))
        x = rng.normal(size=b)
        beta = rng.normal()
        _, event, time = _cox_batch(rng, b)
        for ties in TIES:
            ref = cox_loglik_stable(beta * x, event, time, ties)
            assert ref == pytest.approx(cox_loglik_textbook(beta * x, event, time, ties), abs=1e-10)
            if CoxPHOptimizer is not None and event.any():
                opt = CoxPHOptimizer(x[:, None], event.astype(bool), time, np.zeros(1), ties)
                assert -opt.nlog_likelihood(np.array([beta])) * b == pytest.approx(ref, abs=1e-9)


def test_oracle_gradient_matches_finite_differences():
    """The reference's analytic gradient against central differences of its likelihood."""
    rng = np.random.default_rng(41)
    for _ in range(20):
        eta, event, time = _cox_batch(rng, int(rng.integers(2, 9)))
        for ties in TIES:
            g = cox_loglik_grad(eta, event, time, ties)
            h = 1e-6
            fd = [(cox_loglik_stable(eta + h * e, event, time, ties)
                   - cox_loglik_stable(eta - h * e, event, time, ties)) / (2 * h)
                  for e in np.eye(len(eta))]
            assert np.allclose(g, fd, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# cox_nll against the reference and lifelines


def _t(a, dtype=torch.float64, grad=False):
    return torch.tensor(np.asarray(a), dtype=dtype, requires_grad=grad)


def _loss_and_grad(eta, event, time, ties, dtype=torch.float64):
    e = _t(eta, dtype, grad=True)
    loss = cox_nll(e, torch.as_tensor(np.asarray(event)), _t(time), ties=ties)
    loss.backward()
    return loss.item(), e.grad.detach().double().numpy()


def test_cox_nll_matches_reference_on_random_batches():
    """300 small batches (B 1..12): tied event times, censored patients tied with events, all
    censored, decimal times; loss and gradient, Breslow and Efron."""
    rng = np.random.default_rng(42)
    for trial in range(300):
        b = int(rng.integers(1, 13))
        eta, event, time = _cox_batch(rng, b)
        for ties in TIES:
            loss, grad = _loss_and_grad(eta, event, time, ties)
            assert loss == pytest.approx(cox_nll_reference(eta, event, time, ties), abs=1e-5), (trial, ties)
            assert np.allclose(grad, -cox_loglik_grad(eta, event, time, ties) / b, atol=1e-5), (trial, ties)


def test_cox_nll_float32_input():
    """Float32 log hazards (what a model outputs): the same loss within float32 precision."""
    rng = np.random.default_rng(43)
    for _ in range(20):
        eta, event, time = _cox_batch(rng, 10)
        for ties in TIES:
            loss, _ = _loss_and_grad(eta, event, time, ties, dtype=torch.float32)
            assert loss == pytest.approx(cox_nll_reference(eta, event, time, ties), rel=1e-4, abs=1e-4)


def test_cox_nll_distinct_decimal_times_stay_distinct():
    """0.1 + 0.2 > 0.3 in float64: the patient at 0.3 has the other in its risk set, not the
    reverse (a float32 comparison would tie them)."""
    eta = np.array([0.4, -0.3, 1.1, 0.2])
    time = np.array([0.1 + 0.2, 0.3, 0.3, 1.0])
    event = np.array([1, 1, 0, 1])
    for ties in TIES:
        loss, _ = _loss_and_grad(eta, event, time, ties)
        assert loss == pytest.approx(cox_nll_reference(eta, event, time, ties), abs=1e-9)
    tied = np.array([0.3, 0.3, 0.3, 1.0])
    assert cox_nll_reference(eta, event, tied, "efron") != pytest.approx(
        cox_nll_reference(eta, event, time, "efron"), abs=1e-6)  # the case can fail


def test_cox_nll_single_patient_and_no_events():
    """B = 1 (event or censored) and a batch without events: loss 0 that can backward."""
    for ev in (1, 0):
        for ties in TIES:
            e = _t([0.7], grad=True)
            loss = cox_nll(e, torch.tensor([ev]), _t([3.0]), ties=ties)
            loss.backward()
            assert loss.item() == pytest.approx(0.0, abs=1e-12)
            assert torch.isfinite(e.grad).all() and float(e.grad.abs().max()) < 1e-12
    for ties in TIES:
        e = _t([0.5, -1.0, 2.0], grad=True)
        loss = cox_nll(e, torch.tensor([0, 0, 0]), _t([1.0, 2.0, 2.0]), ties=ties)
        assert loss.requires_grad
        loss.backward()
        assert loss.item() == 0.0 and torch.equal(e.grad, torch.zeros(3, dtype=torch.float64))


def test_cox_nll_gradcheck():
    """Autograd gradients against finite differences (float64), with tied times."""
    time = _t([1.0, 2.0, 2.0, 2.0, 3.0, 3.0])
    event = torch.tensor([1, 1, 1, 0, 1, 0])
    eta = _t([0.3, -0.5, 1.2, 0.1, -0.8, 0.4], grad=True)
    for ties in TIES:
        assert torch.autograd.gradcheck(lambda e: cox_nll(e, event, time, ties=ties), (eta,))


def test_cox_nll_stable_for_large_log_hazards():
    """Log hazards of +-500 (float64 and float32): finite loss and gradient, equal to the
    log-sum-exp reference."""
    eta = np.array([500.0, -500.0, 499.0, 0.0, -499.5, 500.0, 250.0])
    time = np.array([1.0, 1.0, 2.0, 2.0, 2.0, 3.0, 4.0])
    event = np.array([1, 1, 1, 1, 0, 1, 0])
    for ties in TIES:
        loss, grad = _loss_and_grad(eta, event, time, ties)
        assert math.isfinite(loss) and np.isfinite(grad).all()
        assert loss == pytest.approx(cox_nll_reference(eta, event, time, ties), rel=1e-9, abs=1e-5)
        assert np.allclose(grad, -cox_loglik_grad(eta, event, time, ties) / len(eta), atol=1e-5)
        loss32, grad32 = _loss_and_grad(eta, event, time, ties, dtype=torch.float32)
        assert math.isfinite(loss32) and np.isfinite(grad32).all()
        assert loss32 == pytest.approx(loss, rel=1e-4)


def test_cox_nll_invariant_to_shift_and_permutation():
    """Adding a constant to all log hazards or reordering the patients leaves the loss."""
    rng = np.random.default_rng(44)
    for _ in range(30):
        eta, event, time = _cox_batch(rng, int(rng.integers(2, 13)))
        perm = rng.permutation(len(eta))
        for ties in TIES:
            base, _ = _loss_and_grad(eta, event, time, ties)
            for c in (-300.0, 7.5, 300.0):
                assert _loss_and_grad(eta + c, event, time, ties)[0] == pytest.approx(base, abs=1e-8)
            assert _loss_and_grad(eta[perm], event[perm], time[perm], ties)[0] == pytest.approx(base, abs=1e-10)


def test_cox_nll_efron_matches_lifelines_at_its_mle():
    """-B * cox_nll(beta * x) is lifelines' partial log-likelihood at its fitted beta (Efron),
    and the gradient in beta vanishes there."""
    lifelines = _lifelines()
    import pandas as pd

    rng = np.random.default_rng(45)
    for trial in range(3):
        n = 40
        x = rng.normal(size=n)
        base = rng.exponential(np.exp(-0.7 * x) * 5)
        time = np.round(base) + 1.0 if trial != 1 else np.round(base, 1) + 0.1
        event = (rng.random(n) < 0.7).astype(int)
        event[:3] = 1
        time[3] = time[0]  # a censored patient tied with an event
        event[3] = 0
        df = pd.DataFrame({"T": time, "E": event, "x": x})
        # lifelines' default tolerance leaves a score of ~1e-3; fit tightly
        fit = lifelines.CoxPHFitter(penalizer=0.0).fit(
            df, "T", "E", fit_options={"precision": 1e-12, "r_precision": 1e-14})
        beta = _t(float(fit.params_["x"]), grad=True)
        loss = cox_nll(beta * _t(x), torch.as_tensor(event), _t(time), ties="efron")
        loss.backward()
        loss = loss.detach()
        assert -n * float(loss) == pytest.approx(fit.log_likelihood_, abs=1e-5), trial
        assert abs(float(beta.grad)) < 1e-6, trial
        assert -n * float(loss) == pytest.approx(cox_loglik_stable(beta.item() * x, event, time, "efron"), abs=1e-8)


# ---------------------------------------------------------------------------------------------
# hazard ratio, Kaplan-Meier bands, log-rank


def _two_groups(rng, n, decimal=True):
    g = (rng.random(n) < 0.5).astype(int)
    base = rng.exponential(np.where(g == 1, 5.0, 9.0))
    time = np.round(base, 1) + 0.1 if decimal else np.round(base) + 1.0
    event = (rng.random(n) < 0.7).astype(int)
    return time, event, g


def test_hazard_ratio_matches_lifelines():
    """HR of group 1 vs 0 and its Wald 95% interval: lifelines' one-covariate Efron Cox fit;
    swapping the groups inverts it."""
    lifelines = _lifelines()
    import pandas as pd

    rng = np.random.default_rng(50)
    for trial in range(3):
        time, event, g = _two_groups(rng, 60, decimal=trial != 2)
        fit = lifelines.CoxPHFitter().fit(pd.DataFrame({"T": time, "E": event, "g": g}), "T", "E")
        lo_ref, hi_ref = np.exp(fit.confidence_intervals_.loc["g"].to_numpy())
        result = hazard_ratio(time, event, g)
        assert len(result) == 3
        hr, lo, hi = result
        assert hr == pytest.approx(float(fit.hazard_ratios_["g"]), abs=1e-4), trial
        assert lo == pytest.approx(lo_ref, abs=1e-4) and hi == pytest.approx(hi_ref, abs=1e-4), trial
        inv = hazard_ratio(time, event, (1 - g).astype(bool))
        assert inv[0] == pytest.approx(1 / hr, rel=1e-5)
        assert inv[1] == pytest.approx(1 / hi, rel=1e-5) and inv[2] == pytest.approx(1 / lo, rel=1e-5)


def test_hazard_ratio_undefined_is_nan():
    """No event, one group only, one patient, a group without events (MLE at infinity): NaN."""
    time = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    g = np.array([0, 1, 0, 1, 0, 1])
    cases = [
        (time, np.zeros(6, dtype=int), g),
        (time, np.array([1, 0, 1, 1, 0, 1]), np.ones(6, dtype=int)),
        (np.array([2.0]), np.array([1]), np.array([1])),
        (time, np.array([1, 0, 1, 0, 1, 0]), g),
    ]
    for t, e, grp in cases:
        assert all(math.isnan(v) for v in hazard_ratio(t, e, grp)), (e, grp)


def _lifelines_km_rows(lifelines, time, event, level):
    km = lifelines.KaplanMeierFitter(alpha=1 - level).fit(time, event)
    at = np.concatenate([[0.0], np.unique(time[event == 1])])
    sf = km.survival_function_.iloc[:, 0].loc[at].to_numpy()
    ci = km.confidence_interval_.loc[at].to_numpy()
    return at, sf, ci[:, 0], ci[:, 1]


def test_kaplan_meier_matches_lifelines():
    """Steps at 0 and each distinct event time (censoring-only times add none), survival and
    exponential-Greenwood bands: lifelines' table at those times; also at 90% and once the
    survival reaches 0."""
    lifelines = _lifelines()
    rng = np.random.default_rng(51)
    data = []
    for trial in range(4):
        time, event, _ = _two_groups(rng, int(rng.integers(10, 80)), decimal=trial % 2 == 0)
        data.append((time, event))
    data.append((np.array([1.0, 2.0, 2.0, 3.0, 4.0, 4.5]), np.array([1, 1, 0, 1, 0, 1])))  # ends at 0
    data.append((np.array([0.1 + 0.2, 12.3, 12.3, 12.3, 20.0]), np.array([1, 1, 0, 1, 0])))
    for time, event in data:
        for level in (0.95, 0.9):
            km = kaplan_meier(time, event, level=level)
            at, sf, lo, hi = _lifelines_km_rows(lifelines, time, event, level)
            assert np.asarray(km.time) == pytest.approx(at, abs=0)
            assert np.asarray(km.survival) == pytest.approx(sf, abs=1e-6)
            assert np.asarray(km.ci_low) == pytest.approx(lo, abs=1e-6)
            assert np.asarray(km.ci_high) == pytest.approx(hi, abs=1e-6)


def test_kaplan_meier_all_censored_and_one_patient():
    """No event: the curve is the single step (0, 1). One patient with an event: 1 then 0."""
    km = kaplan_meier(np.array([1.0, 2.0, 5.0]), np.array([0, 0, 0]))
    assert list(km.time) == [0.0] and list(km.survival) == [1.0]
    km = kaplan_meier(np.array([2.5]), np.array([1]))
    assert list(km.time) == [0.0, 2.5] and list(km.survival) == [1.0, 0.0]


def test_logrank_matches_lifelines():
    """Two-group log-rank chi-square and p-value, tied times across groups."""
    lifelines = _lifelines()
    from lifelines.statistics import logrank_test as ll_logrank

    rng = np.random.default_rng(52)
    for trial in range(5):
        time, event, g = _two_groups(rng, int(rng.integers(8, 120)), decimal=trial % 2 == 0)
        a = g == 1
        ref = ll_logrank(time[a], time[~a], event[a], event[~a])
        chi2, p = logrank_test(time, event, a if trial % 2 else g)
        assert chi2 == pytest.approx(ref.test_statistic, abs=1e-8), trial
        assert p == pytest.approx(ref.p_value, abs=1e-8), trial
    assert lifelines  # imported for the skip


def test_logrank_undefined_is_nan():
    """No event, one group only, one patient: NaN statistic and p-value, not an exception."""
    time = np.array([1.0, 2.0, 3.0, 4.0])
    for t, e, grp in [
        (time, np.zeros(4, dtype=int), np.array([0, 1, 0, 1])),
        (time, np.array([1, 1, 0, 1]), np.zeros(4, dtype=int)),
        (np.array([1.0]), np.array([1]), np.array([1])),
    ]:
        chi2, p = logrank_test(t, e, grp)
        assert math.isnan(chi2) and math.isnan(p)
