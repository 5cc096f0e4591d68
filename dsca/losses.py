"""Survival losses and the risk score that all metrics rank by.

Discrete-time head: the model outputs hazards ``h [B, K]`` (probability of the event in bin k
given survival up to it); survival after bin k is ``S_k = prod_{j<=k} (1 - h_j)``.
Cox head: the model outputs the log relative hazard ``[B, 1]``.

Risk convention (both heads): a HIGHER risk means SHORTER survival. For hazards the risk is
``-sum_k S_k`` (minus the expected number of bins survived, as the reference ranks patients);
for Cox it is the log hazard itself.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torchsurv.loss.cox import neg_partial_log_likelihood

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
    return _reduce(loss, reduction)


def cox_nll(
    log_hazard: torch.Tensor, event: torch.Tensor, time: torch.Tensor, ties: str = "efron"
) -> torch.Tensor:
    """Negative Cox partial log-likelihood (torchsurv) divided by the number of patients.

    Args:
        log_hazard: [B] or [B, 1] log relative hazards.
        event: [B] 1 = event.
        time: [B] follow-up times.
        ties: "efron" or "breslow".

    Returns:
        scalar; 0 (with a gradient path) when the batch has no event.
    """
    if ties not in ("efron", "breslow"):
        raise ValueError(f"ties must be 'efron' or 'breslow', got {ties!r}")
    log_hazard = log_hazard.reshape(-1)
    event = event.reshape(-1).bool()
    if not bool(event.any()):
        # No event: the partial likelihood is constant; keep the graph so callers can backward.
        return log_hazard.sum() * 0.0
    # Sum over events divided by the number of patients, as the reference's loss; torchsurv's
    # own "mean" divides by the number of distinct event times instead.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Ties in `time` detected")  # expected, per step
        total = neg_partial_log_likelihood(
            log_hazard.float(), event, time.reshape(-1).float(), ties_method=ties, reduction="sum"
        )
    return total / len(log_hazard)


def l1_penalty(params: Iterable[torch.Tensor], coef: float) -> torch.Tensor | float:
    """``coef * sum |w|`` over all parameters (0.0 when ``coef`` is negligible)."""
    if coef is None or coef <= 1e-12:
        return 0.0
    return coef * sum(p.abs().sum() for p in params)


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
