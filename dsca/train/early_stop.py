"""Early stopping and the choice of the best epoch, with the reference's rules."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dsca.config import TrainConfig

__all__ = ["EarlyStop", "monitor_mode", "monitored_value"]


def monitor_mode(cfg: TrainConfig) -> str:
    """"max" when the validation C-index picks the epoch, "min" for the validation loss."""
    return "max" if cfg.monitor_metrics == "ci" else "min"


def monitored_value(cfg: TrainConfig, loss: float, cindex: float) -> float:
    """The validation value that ``monitor_metrics`` names: the C-index or the loss."""
    return cindex if cfg.monitor_metrics == "ci" else loss


@dataclass
class EarlyStop:
    """Early stopping and best-checkpoint choice, with the reference's rules.

    Before ``warmup`` epochs nothing is recorded. An epoch whose value is at least as good as
    the best so far (ties included) becomes the best and resets the count of bad epochs; any
    other epoch (and a NaN) counts as bad. Training stops once ``patience`` bad epochs follow
    the best one, but never at or before epoch ``start_epoch`` (0-based).

    Attributes:
        best, best_epoch: the best value so far and its 0-based epoch (-1: none yet).
        bad_epochs: epochs since the best one that were not as good.
        stop: True once training should end.
    """

    patience: int | None
    warmup: int
    start_epoch: int
    mode: str  # "min" or "max"
    best: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0
    stop: bool = False

    def update(self, epoch: int, value: float) -> bool:
        """Record an epoch's monitored value; True when it is the best so far."""
        if epoch < self.warmup:
            return False
        # (a NaN is never the best: the reference would keep a diverged model's weights)
        worse = value != value or (
            self.best is not None and (value > self.best if self.mode == "min" else value < self.best)
        )
        if not worse:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        if self.patience is not None and self.bad_epochs >= self.patience and epoch > self.start_epoch:
            self.stop = True
        return False

    # last.pt holds this state under the checkpoint format's key names, where the stop flag
    # is "stopped": every last.pt written so far stays resumable.
    def state_dict(self) -> dict[str, Any]:
        """The state as plain values, for ``last.pt``."""
        return {"patience": self.patience, "warmup": self.warmup, "start_epoch": self.start_epoch,
                "mode": self.mode, "best": self.best, "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs, "stopped": self.stop}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> EarlyStop:
        """The inverse of :meth:`state_dict`."""
        fields = dict(state)
        fields["stop"] = fields.pop("stopped")
        return cls(**fields)
