"""Optimizers by the reference config's names: ``adam``, ``adamw``, ``lookahead_adam``.

As the reference (timm's ``create_optimizer``), weight decay is not applied to biases and
normalisation weights (parameters with fewer than 2 dimensions).

Lookahead (Zhang et al., 2019) keeps a slow copy of the weights; every ``k`` steps of the inner
optimizer it moves the slow weights ``alpha`` of the way to the fast ones and restarts the
fast weights from there. Defaults ``k=6, alpha=0.5`` are timm's, which the reference uses, and
so is timm's start: a parameter's slow copy is taken at its first synchronisation (step k), not
at construction, so the first sync leaves the weights as they are and the slow weights only
start pulling back from the second one (k=6: step 12) on. Parameters without a gradient at a
synchronisation are left alone, as in timm.
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
        # (group index, parameter index) -> slow copy, created at the parameter's first sync
        self._slow: dict[tuple[int, int], torch.Tensor] = {}

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = self.base.step(closure)
        self._steps += 1
        if self._steps % self.k == 0:
            self._sync()
        return loss

    def _sync(self) -> None:
        """Move every slow copy ``alpha`` of the way to its fast weights; restart those from it."""
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                slow = self._slow.get((gi, pi))
                if slow is None:
                    self._slow[(gi, pi)] = p.detach().clone()
                    continue  # slow == fast: a step towards fast and the copy back change nothing
                slow.add_(p - slow, alpha=self.alpha)
                p.copy_(slow)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {
            "base": self.base.state_dict(),
            "steps": self._steps,
            "slow": {f"{gi}.{pi}": s.clone() for (gi, pi), s in self._slow.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base.load_state_dict(state_dict["base"])
        self._steps = int(state_dict["steps"])
        self.param_groups = self.base.param_groups
        self.state = self.base.state
        self._slow = {}
        for key, saved in state_dict["slow"].items():
            gi, pi = map(int, key.split("."))
            p = self.param_groups[gi]["params"][pi]
            self._slow[(gi, pi)] = saved.to(device=p.device, dtype=p.dtype).clone()


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: biases and 1-d weights without decay, the rest with."""
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
