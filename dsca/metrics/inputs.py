"""Input checks of every metric, in one place: [N] float64 finite times, [N] 0/1 events and,
for the ranking metrics, [N] finite float64 risks.

Times are compared in float64 throughout: a patient whose follow-up equals an evaluation time
must be seen as equal, not as a float32 rounding of it.
"""
from __future__ import annotations

import numpy as np

__all__ = ["validated_time_event", "validated_time_event_risk"]


def validated_time_event(time, event) -> tuple[np.ndarray, np.ndarray]:
    """[N] float64 finite times and [N] int 0/1 events, checked.

    Args:
        time: [N] follow-up times (any array-like, any shape with N elements).
        event: [N] event indicators: bool, or numbers equal to 0 (censored) or 1 (event).

    Raises:
        ValueError: an event other than 0/1, lengths that differ, a NaN or infinite time.
    """
    time = np.asarray(time, dtype=np.float64).reshape(-1)
    raw_event = np.asarray(event).reshape(-1)
    if raw_event.dtype != bool and not np.isin(raw_event, (0, 1)).all():
        raise ValueError(f"event must be 0 (censored) or 1 (event), got {np.unique(raw_event)[:5].tolist()}")
    if len(time) != len(raw_event):
        raise ValueError(f"length mismatch: time {len(time)}, event {len(raw_event)}")
    if not np.all(np.isfinite(time)):
        raise ValueError("time contains NaN or inf")
    return time, raw_event.astype(int)


def validated_time_event_risk(time, event, risk) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`validated_time_event` plus [N] finite float64 risks."""
    time, event = validated_time_event(time, event)
    risk = np.asarray(risk, dtype=np.float64).reshape(-1)
    if len(risk) != len(time):
        raise ValueError(f"length mismatch: time {len(time)}, risk {len(risk)}")
    if not np.all(np.isfinite(risk)):
        raise ValueError("risk contains NaN or inf")
    return time, event, risk
