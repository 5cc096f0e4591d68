"""Numeric helpers shared by the curve-based metrics: a right-continuous step function read at
given times, and the trapezoid rule."""
from __future__ import annotations

import numpy as np

__all__ = ["step_function_at", "trapezoid"]


def step_function_at(knots: np.ndarray, values: np.ndarray, t: np.ndarray, before: float) -> np.ndarray:
    """Right-continuous step function through ``(knots, values)`` at ``t``; ``before`` left of
    the first knot, the last value right of the last one."""
    idx = np.searchsorted(knots, np.asarray(t, dtype=float), side="right") - 1
    padded = np.concatenate([[before], values])
    return padded[idx + 1]


def trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    """Trapezoid-rule integral of y over x (numpy < 2 has no ``np.trapezoid``)."""
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))
