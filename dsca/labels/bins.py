"""Discrete time bins (reference semantics): ``bins`` intervals cut at the quantiles of the
uncensored patients' times; the outer edges are moved to ``min(t) - 1e-5`` and
``max(t) + 1e-5`` over all patients so that every patient falls in a bin; intervals are left-closed
``[a_k, a_{k+1})``."""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from dsca.labels.errors import LabelError

__all__ = ["bin_edges", "assign_bins", "rebin"]

#: How far the outer edges sit outside the cohort's time range (the reference's pad): the
#: earliest and the latest patient then fall inside the left-closed first and last bins.
_EDGE_PAD = 1e-5


def bin_edges(
    t: np.ndarray,
    e: np.ndarray,
    bins: int,
    t_all: np.ndarray | None = None,
    source: str = "labels",
) -> np.ndarray:
    """Cut-points of the discrete time bins.

    Args:
        t: [P] times of the patients whose events define the cut-points.
        e: [P] event indicators (1 = event).
        bins: number of bins K.
        t_all: [Q] times whose range the outer edges must cover (default ``t``).
        source: name used in error messages.

    Returns:
        [K + 1] increasing edges: interior edges at the K-quantiles of the event times
        (linear interpolation, as ``pandas.qcut``), outer edges ``min - 1e-5``, ``max + 1e-5``.
    """
    t = np.asarray(t, dtype=float)
    events = t[np.asarray(e) == 1]
    if bins < 1:
        raise LabelError(f"{source}: bins must be >= 1, got {bins}")
    if len(events) == 0:
        raise LabelError(f"{source}: no uncensored patients to place the time bins")
    edges = np.quantile(events, np.linspace(0.0, 1.0, bins + 1))
    span = t if t_all is None else np.asarray(t_all, dtype=float)
    edges[0] = span.min() - _EDGE_PAD
    edges[-1] = span.max() + _EDGE_PAD
    if np.any(np.diff(edges) <= 0):
        raise LabelError(
            f"{source}: {len(np.unique(events))} distinct event time(s) cannot make {bins} "
            f"time bins (edges {np.round(edges, 4).tolist()} are not increasing)"
        )
    return edges


def assign_bins(t: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin index of each time for left-closed bins ``[edges[k], edges[k+1])``.

    Args:
        t: [P] times, inside ``[edges[0], edges[-1])``.
        edges: [K + 1] increasing edges.

    Returns:
        [P] int64 bins in ``[0, K)``.
    """
    t = np.asarray(t, dtype=float)
    k = np.searchsorted(np.asarray(edges), t, side="right") - 1
    return np.clip(k, 0, len(edges) - 2).astype(np.int64)


def rebin(labels: pd.DataFrame, cut_patients: Iterable[str]) -> pd.DataFrame:
    """Recompute ``y_t`` with cut-points from a subset of patients (e.g. a fold's training set).

    The reference places the cut-points on the whole cohort, which lets the test patients'
    times shape the training targets; this variant keeps them out. The outer edges still span
    every patient so that all of them get a bin.

    Args:
        labels: output of :func:`load_labels`.
        cut_patients: ids of the patients whose event times set the interior edges.

    Returns:
        A copy of ``labels`` with new ``y_t`` and ``attrs["bin_edges"]``.
    """
    ids = list(cut_patients)
    unknown = [p for p in ids if p not in labels.index]
    if unknown:
        raise LabelError(f"{labels.attrs.get('source', 'labels')}: unknown patient {unknown[0]!r}")
    bins = len(labels.attrs["bin_edges"]) - 1
    sub = labels.loc[ids]
    edges = bin_edges(
        sub["t"].to_numpy(), sub["e"].to_numpy(), bins, t_all=labels["t"].to_numpy(),
        source=labels.attrs.get("source", "labels"),
    )
    out = labels.copy()
    out["y_t"] = assign_bins(out["t"].to_numpy(), edges)
    out.attrs = {**labels.attrs, "bin_edges": edges.tolist()}
    return out


