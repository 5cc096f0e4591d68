"""Model outputs of a set of patients, and the set-level loss and C-index computed from them.

A label row holds :data:`dsca.labels.LABEL_COLUMNS` in that order; the ``LABEL_*`` indices
below name its columns.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dsca.config import TrainConfig
from dsca.labels import LABEL_COLUMNS
from dsca.losses import cox_nll, discrete_nll, risk_score
from dsca.metrics import concordance_index

__all__ = ["Outputs", "LABEL_T", "LABEL_E", "LABEL_YT", "LABEL_YC", "set_loss", "set_cindex"]

LABEL_T = LABEL_COLUMNS.index("t")
LABEL_E = LABEL_COLUMNS.index("e")
LABEL_YT = LABEL_COLUMNS.index("y_t")
LABEL_YC = LABEL_COLUMNS.index("y_c")


@dataclass
class Outputs:
    """Model outputs of a set of patients.

    Attributes:
        patient_ids: [P] ids, in the order of the rows below.
        out: [P, K] hazards, or [P, 1] Cox log hazards.
        label: [P, 4] label rows (``LABEL_COLUMNS``), float64.
    """

    patient_ids: list[str]
    out: torch.Tensor
    label: torch.Tensor

    @property
    def risk(self) -> np.ndarray:
        """[P] risk score (higher = shorter survival), float64 so that every threshold and
        rank computed from it agrees."""
        return risk_score(self.out.double()).numpy()


def set_loss(cfg: TrainConfig, outputs: Outputs) -> float:
    """Evaluation loss of a whole set: NLL with alpha = 0, or the Cox loss over the set."""
    lab = outputs.label
    if cfg.is_cox:
        return float(cox_nll(outputs.out, lab[:, LABEL_E], lab[:, LABEL_T], ties=cfg.cox_ties))
    return float(discrete_nll(outputs.out, lab[:, LABEL_YT], lab[:, LABEL_YC], alpha=0.0))


def set_cindex(outputs: Outputs) -> float:
    """C-index of a set; NaN when an output is not finite (a diverging model)."""
    if not bool(torch.isfinite(outputs.out).all()):
        return float("nan")
    lab = outputs.label.numpy()
    return concordance_index(lab[:, LABEL_T], lab[:, LABEL_E], outputs.risk)
