"""Survival labels: slide-level CSV -> one row per patient with discrete time bins.

The CSV format is the reference study's: one row per slide with ``pathology_id`` (slide id),
``patient_id``, ``t`` (follow-up time) and ``e`` (1 = event observed, 0 = censored); extra
columns are kept. A patient's ``t`` and ``e`` are taken from its first slide row, as in the
reference; rows of one patient that disagree are reported in the log.

Discretization (reference semantics): ``bins`` intervals cut at the quantiles of the uncensored
patients' times; the outer edges are moved to ``min(t) - 1e-5`` and ``max(t) + 1e-5`` over all
patients so that every patient falls in a bin; intervals are left-closed ``[a_k, a_{k+1})``.
"""
from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "LabelError",
    "load_labels",
    "bin_edges",
    "assign_bins",
    "rebin",
    "patient_slides",
]

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("pathology_id", "patient_id", "t", "e")
_EDGE_PAD = 1e-5


class LabelError(ValueError):
    """A label CSV, split file or store does not fit the survival labels (message names it)."""


def load_labels(csv_path: str | Path, bins: int = 4) -> pd.DataFrame:
    """Read a slide-level label CSV into patient-level survival labels.

    Args:
        csv_path: CSV with columns ``pathology_id, patient_id, t, e`` (extra columns allowed).
        bins: number of discrete time bins.

    Returns:
        DataFrame indexed by ``patient_id`` (first-appearance order of the CSV) with columns
        ``t`` (float), ``e`` (int, 1 = event), ``y_t`` (int bin in ``[0, bins)``), ``y_c``
        (int, 1 = censored), ``slide_ids`` (list of slide ids in CSV order) and the CSV's extra
        columns (values of the patient's first row). ``df.attrs["bin_edges"]`` holds the
        ``bins + 1`` edges and ``df.attrs["source"]`` the CSV path.

    Raises:
        LabelError: missing file or columns, NaN/negative times, ``e`` not 0/1, empty CSV,
            a slide listed twice, or too few distinct event times for ``bins`` bins.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise LabelError(f"{path}: label file not found")
    raw = pd.read_csv(path, dtype={"patient_id": str, "pathology_id": str})
    missing = [c for c in REQUIRED_COLUMNS if c not in raw.columns]
    if missing:
        raise LabelError(
            f"{path}: missing column(s) {', '.join(missing)} (need {', '.join(REQUIRED_COLUMNS)})"
        )
    if raw.empty:
        raise LabelError(f"{path}: no rows")
    _check_values(raw, path)

    dup = raw["pathology_id"][raw["pathology_id"].duplicated()]
    if len(dup):
        raise LabelError(f"{path}: slide {dup.iloc[0]!r} is listed more than once")

    grouped = raw.groupby("patient_id", sort=False)
    first = grouped.head(1).set_index("patient_id")
    n_conflict = int((grouped[["t", "e"]].nunique() > 1).any(axis=1).sum())
    if n_conflict:
        log.warning(
            "%s: %d patient(s) have slides with different t/e; using each patient's first row",
            path, n_conflict,
        )

    df = first.drop(columns=["pathology_id"]).copy()
    df["t"] = df["t"].astype(float)
    df["e"] = df["e"].astype(int)
    df["y_c"] = 1 - df["e"]
    df["slide_ids"] = grouped["pathology_id"].agg(list)
    edges = bin_edges(df["t"].to_numpy(), df["e"].to_numpy(), bins, source=str(path))
    df["y_t"] = assign_bins(df["t"].to_numpy(), edges)
    df.attrs["bin_edges"] = edges.tolist()
    df.attrs["source"] = str(path)
    front = ["t", "e", "y_t", "y_c", "slide_ids"]
    return df[front + [c for c in df.columns if c not in front]]


def _check_values(raw: pd.DataFrame, path: Path) -> None:
    t = pd.to_numeric(raw["t"], errors="coerce")
    bad_t = raw.index[t.isna() | (t < 0)]
    if len(bad_t):
        row = raw.loc[bad_t[0]]
        raise LabelError(
            f"{path}: slide {row['pathology_id']!r} (patient {row['patient_id']!r}) has "
            f"time t={row['t']!r}; times must be non-negative numbers"
        )
    e = pd.to_numeric(raw["e"], errors="coerce")
    bad_e = raw.index[~e.isin([0, 1])]
    if len(bad_e):
        row = raw.loc[bad_e[0]]
        raise LabelError(
            f"{path}: slide {row['pathology_id']!r} (patient {row['patient_id']!r}) has "
            f"event e={row['e']!r}; e must be 0 (censored) or 1 (event)"
        )
    raw["t"] = t
    raw["e"] = e.astype(int)
    for col in ("patient_id", "pathology_id"):
        if raw[col].isna().any():
            raise LabelError(f"{path}: empty {col} in row {int(raw.index[raw[col].isna()][0]) + 2}")


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


def patient_slides(
    labels: pd.DataFrame,
    patients: Sequence[str],
    available_slides: Collection[str],
    store_name: str = "store",
) -> dict[str, list[str]]:
    """Map patients to their slides that exist in a feature store.

    Slides of a patient that are missing from the store are dropped with a warning; a patient
    with none left is an error (training on it would be impossible).

    Args:
        labels: output of :func:`load_labels`.
        patients: patient ids to look up.
        available_slides: complete slide ids of the store.
        store_name: path of the store, for messages.

    Returns:
        ``{patient_id: [slide ids in CSV order]}`` in the order of ``patients``.
    """
    available = set(available_slides)
    out: dict[str, list[str]] = {}
    without: list[str] = []
    dropped = 0
    for pid in patients:
        if pid not in labels.index:
            raise LabelError(f"{labels.attrs.get('source', 'labels')}: unknown patient {pid!r}")
        slides = [s for s in labels.at[pid, "slide_ids"] if s in available]
        dropped += len(labels.at[pid, "slide_ids"]) - len(slides)
        if not slides:
            without.append(pid)
        out[pid] = slides
    if without:
        more = f" (and {len(without) - 1} more)" if len(without) > 1 else ""
        raise LabelError(
            f"{store_name}: patient {without[0]!r}{more} has no slide in the store "
            f"(expected one of {labels.at[without[0], 'slide_ids'][:3]})"
        )
    if dropped:
        log.warning("%s: %d labelled slide(s) are not in the store and are skipped", store_name, dropped)
    return out

