"""Survival losses and the risk score that all metrics rank by.

Discrete-time head: the model outputs hazards ``h [B, K]`` (probability of the event in bin k
given survival up to it); survival after bin k is ``S_k = prod_{j<=k} (1 - h_j)``.
Cox head: the model outputs the log relative hazard ``[B, 1]``.

Risk convention (both heads): a HIGHER risk means SHORTER survival. For hazards the risk is
``-sum_k S_k`` (minus the expected number of bins survived, as the reference ranks patients);
for Cox it is the log hazard itself.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["discrete_nll", "cox_nll", "l1_penalty", "risk_score", "survival_curve"]


def survival_curve(hazards: torch.Tensor) -> torch.Tensor:
    """Survival after each bin.

    Args:
        hazards: [B, K] discrete hazards in (0, 1).

    Returns:
        [B, K] ``S_k = prod_{j<=k} (1 - h_j)``.
    """
    return torch.cumprod(1.0 - hazards, dim=1)


def risk_score(output: torch.Tensor) -> torch.Tensor:
    """Risk (higher = shorter survival) from the model output.

    Args:
        output: [B, K] hazards (K > 1) or [B, 1] Cox log hazards.

    Returns:
        [B] risk: ``-sum_k S_k`` for hazards, the log hazard for Cox.

    Example:
        >>> risk_score(torch.tensor([[0.5, 0.5], [0.25, 0.25]])).tolist()  # the first dies sooner
        [-0.75, -1.3125]
    """
    if output.shape[1] == 1:
        return output[:, 0]
    return -survival_curve(output).sum(dim=1)


def discrete_nll(
    hazards: torch.Tensor,
    y_t: torch.Tensor,
    y_c: torch.Tensor,
    alpha: float = 0.0,
    eps: float = 1e-7,
    reduction: str = "mean",
) -> torch.Tensor:
    """Negative log-likelihood of discrete-time survival (Zadeh & Schmid), with up-weighting.

    For a patient in bin ``k``: an event contributes ``-log S_{k-1} - log h_k`` (survive the
    earlier bins, then the event); a censored patient ``-log S_k`` (survive bin k). The total is
    ``(1 - alpha) * nll + alpha * nll_uncensored`` as in the reference (alpha 0.1 in training,
    0 for evaluation). Probabilities are clamped at ``eps`` before the log.

    Args:
        hazards: [B, K] hazards.
        y_t: [B] int bin of each patient.
        y_c: [B] 1 = censored, 0 = event.
        alpha: weight of the extra uncensored term.
        eps: clamp of probabilities.
        reduction: "mean", "sum" or "none".

    Returns:
        scalar (or [B] with reduction "none").
    """
    y_t = y_t.reshape(-1, 1).long()
    c = y_c.reshape(-1, 1).to(hazards.dtype)
    s = survival_curve(hazards)
    s_pad = torch.cat([torch.ones_like(c), s], dim=1)  # s_pad[:, k] = S_{k-1}, S_{-1} = 1
    log_before = torch.log(s_pad.gather(1, y_t).clamp(min=eps))
    log_h = torch.log(hazards.gather(1, y_t).clamp(min=eps))
    log_after = torch.log(s_pad.gather(1, y_t + 1).clamp(min=eps))
    uncensored = -(1.0 - c) * (log_before + log_h)
    censored = -c * log_after
    loss = ((1.0 - alpha) * (censored + uncensored) + alpha * uncensored).reshape(-1)
    return _apply_reduction(loss, reduction)


def cox_nll(
    log_hazard: torch.Tensor, event: torch.Tensor, time: torch.Tensor, ties: str = "efron"
) -> torch.Tensor:
    """Negative Cox partial log-likelihood divided by the number of patients.

    With ``eta`` the log hazards, ``D(t)`` the d patients with an event at time t and ``R(t)``
    the risk set ``{j : T_j >= t}`` (censored patients tied with an event stay in it):

        Breslow: log PL = sum_t [ sum_{i in D(t)} eta_i - d log sum_{R(t)} e^eta ]
        Efron:   log PL = sum_t [ sum_{i in D(t)} eta_i
                                  - sum_{l=0}^{d-1} log( sum_{R(t)} e^eta - l/d sum_{D(t)} e^eta ) ]

    Every sum of exponentials is taken as a log-sum-exp, so log hazards of any size give a
    finite loss; Efron's ``R(t) \\ D(t)`` part is summed directly, not as a difference.

    Args:
        log_hazard: [B] or [B, 1] log relative hazards.
        event: [B] 1 = event.
        time: [B] follow-up times.
        ties: "efron" or "breslow".

    Returns:
        scalar ``-log PL / B``; 0 (with a gradient path) when the batch has no event.

    Example:
        >>> eta, event, time = torch.zeros(2), torch.tensor([1, 1]), torch.tensor([1.0, 1.0])
        >>> [round(cox_nll(eta, event, time, ties).item(), 4) for ties in ("breslow", "efron")]
        [0.6931, 0.3466]
    """
    if ties not in ("efron", "breslow"):
        raise ValueError(f"ties must be 'efron' or 'breslow', got {ties!r}")
    eta = log_hazard.reshape(-1)
    n = eta.shape[0]
    is_event = event.reshape(-1).to(eta.device) > 0
    time = time.reshape(-1).to(eta.device)
    if not (n == is_event.shape[0] == time.shape[0]):
        raise ValueError(f"cox_nll: {n} log hazards, {is_event.shape[0]} events, {time.shape[0]} times")
    if n == 0 or not bool(is_event.any()):
        # No event: the partial likelihood is constant; keep the graph so callers can backward.
        return eta.sum() * 0.0
    # Group patients by distinct time (ascending); the risk set of group k is groups >= k.
    uniq, group = torch.unique(time, return_inverse=True)
    n_groups = uniq.shape[0]
    lse_all = _segment_logsumexp(eta, group, torch.ones_like(is_event), n_groups)
    # log sum over groups >= k: a reversed cumulative log-sum-exp
    tail = torch.logcumsumexp(lse_all.flip(0), dim=0).flip(0)
    event_eta = eta[is_event]
    event_group = group[is_event]
    if ties == "breslow":
        log_denominator = tail[event_group]
    else:
        lse_events = _segment_logsumexp(eta, group, is_event, n_groups)
        lse_censored = _segment_logsumexp(eta, group, ~is_event, n_groups)
        after = torch.cat([tail[1:], tail.new_full((1,), _log_zero(eta.dtype))])
        lse_others = torch.logaddexp(after, lse_censored)  # R(t) without D(t)
        # l = 0..d-1 within each tie group, d = its size
        d = torch.bincount(event_group, minlength=n_groups)
        order = torch.argsort(event_group, stable=True)
        group_start = torch.cumsum(d, 0) - d  # position of each group's first event in `order`
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.shape[0], device=order.device) - group_start[event_group[order]]
        keep = 1.0 - rank.to(eta.dtype) / d[event_group].to(eta.dtype)  # 1 - l/d, in (0, 1]
        log_denominator = torch.logaddexp(lse_others[event_group],
                                          torch.log(keep) + lse_events[event_group])
    return -(event_eta - log_denominator).sum() / n


def _segment_logsumexp(
    values: torch.Tensor, group: torch.Tensor, mask: torch.Tensor, n_groups: int
) -> torch.Tensor:
    """[G] log-sum-exp of ``values[mask]`` per group; :func:`_log_zero` for an empty group."""
    zero = _log_zero(values.dtype)
    masked = torch.where(mask, values, torch.full_like(values, zero))
    top = torch.full((n_groups,), zero, dtype=values.dtype, device=values.device)
    top = top.scatter_reduce(0, group, masked.detach(), reduce="amax", include_self=True)
    shift = torch.where(top > zero, top, torch.zeros_like(top))
    sums = torch.zeros_like(top).scatter_add(0, group, torch.exp(masked - shift[group]))
    present = sums > 0
    safe = torch.where(present, sums, torch.ones_like(sums))
    return torch.where(present, torch.log(safe) + shift, torch.full_like(sums, zero))


def _log_zero(dtype: torch.dtype) -> float:
    """A finite stand-in for log(0): with -inf, logaddexp's first and second derivatives
    become NaN (0 * NaN) for terms that should simply not count."""
    return torch.finfo(dtype).min / 4


def l1_penalty(params: Iterable[torch.Tensor], coef: float) -> torch.Tensor | float:
    """``coef * sum |w|`` over all parameters (0.0 when ``coef`` is negligible)."""
    if coef is None or coef <= 1e-12:
        return 0.0
    return coef * sum(p.abs().sum() for p in params)


def _apply_reduction(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """``loss`` [B] reduced as ``reduction`` ("mean", "sum" or "none") asks."""
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
