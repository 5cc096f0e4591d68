"""Optimizers by the reference config's names: ``adam``, ``adamw``, ``lookahead_adam``.

As the reference (timm's ``create_optimizer``), weight decay is not applied to biases and
normalisation weights (parameters with fewer than 2 dimensions).

Lookahead (Zhang et al., 2019) keeps a slow copy of the weights; every ``k`` steps of the inner
optimizer it moves the slow weights ``alpha`` of the way to the fast ones and restarts the
fast weights from there. Defaults ``k=6, alpha=0.5`` are timm's, which the reference uses.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

__all__ = ["Lookahead", "build_optimizer"]


class Lookahead(Optimizer):
    """Wraps an optimizer; its ``param_groups`` are the inner optimizer's (LR schedulers work).

    Args:
        base: the inner ("fast") optimizer.
        k: inner steps between synchronisations.
        alpha: step size of the slow weights towards the fast ones.
    """

    def __init__(self, base: Optimizer, k: int = 6, alpha: float = 0.5) -> None:
        if k < 1 or not 0.0 < alpha <= 1.0:
            raise ValueError(f"Lookahead needs k >= 1 and 0 < alpha <= 1, got k={k}, alpha={alpha}")
        self.base = base
        self.k = k
        self.alpha = alpha
        self.param_groups = base.param_groups
        self.defaults = base.defaults
        self.state = base.state
        self._steps = 0
        self._slow = [[p.detach().clone() for p in g["params"]] for g in base.param_groups]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = self.base.step(closure)
        self._steps += 1
        if self._steps % self.k == 0:
            for group, slows in zip(self.param_groups, self._slow):
                for p, slow in zip(group["params"], slows):
                    slow.add_(p - slow, alpha=self.alpha)
                    p.copy_(slow)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {
            "base": self.base.state_dict(),
            "steps": self._steps,
            "slow": [[s.clone() for s in slows] for slows in self._slow],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base.load_state_dict(state_dict["base"])
        self._steps = int(state_dict["steps"])
        for slows, saved in zip(self._slow, state_dict["slow"]):
            for slow, s in zip(slows, saved):
                slow.copy_(s)
        self.param_groups = self.base.param_groups
        self.state = self.base.state


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


def build_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    weight_decay: float,
    eps: float | None = None,
    betas: tuple[float, float] | None = None,
) -> Optimizer:
    """Optimizer of the reference config's ``opt`` name for ``model``'s trainable parameters."""
    kwargs: dict[str, Any] = {"lr": lr}
    if eps is not None:
        kwargs["eps"] = eps
    if betas is not None:
        kwargs["betas"] = tuple(betas)
    groups = _param_groups(model, weight_decay)
    if name == "adam":
        return torch.optim.Adam(groups, **kwargs)
    if name == "adamw":
        return torch.optim.AdamW(groups, **kwargs)
    if name == "lookahead_adam":
        return Lookahead(torch.optim.Adam(groups, **kwargs))
    raise ValueError(f"unknown optimizer {name!r}; use adam, adamw or lookahead_adam")
