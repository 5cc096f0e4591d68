"""Patient-level labels: one row per patient with its time bin, and each patient's slides
among those of a feature store.

A patient's ``t`` and ``e`` are taken from its first slide row, as in the reference; rows of
one patient that disagree are reported in the log.
"""
from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from pathlib import Path

import pandas as pd

from dsca.labels.bins import assign_bins, bin_edges
from dsca.labels.columns import LabelColumns
from dsca.labels.errors import LabelError
from dsca.labels.ids import match_slide_ids
from dsca.labels.table import read_label_table

__all__ = ["LABEL_COLUMNS", "load_labels", "patient_slides"]

log = logging.getLogger(__name__)

#: Per-patient label columns in the order training and the dataset hold them: time, event,
#: discrete time bin, censoring indicator (1 - event).
LABEL_COLUMNS = ("t", "e", "y_t", "y_c")


def load_labels(csv_path: str | Path, bins: int = 4, columns: LabelColumns | None = None) -> pd.DataFrame:
    """Read a slide-level label CSV into patient-level survival labels.

    Args:
        csv_path: CSV with columns ``pathology_id, patient_id, t, e`` (extra columns allowed),
            or the columns that ``columns`` names.
        bins: number of discrete time bins.
        columns: column mapping (see :func:`read_label_table`); default the canonical names.

    Returns:
        DataFrame indexed by ``patient_id`` (first-appearance order of the CSV) with columns
        ``t`` (float), ``e`` (int, 1 = event), ``y_t`` (int bin in ``[0, bins)``), ``y_c``
        (int, 1 = censored), ``slide_ids`` (list of slide ids in CSV order) and the CSV's extra
        columns (values of the patient's first row). ``df.attrs["bin_edges"]`` holds the
        ``bins + 1`` edges and ``df.attrs["source"]`` the CSV path.

    Raises:
        LabelError: everything :func:`read_label_table` rejects, or too few distinct event
            times for ``bins`` bins.
    """
    path = Path(csv_path)
    raw = read_label_table(path, columns)

    grouped = raw.groupby("patient_id", sort=False)
    first_rows = grouped.head(1).set_index("patient_id")
    n_conflict = int((grouped[["t", "e"]].nunique() > 1).any(axis=1).sum())
    if n_conflict:
        log.warning(
            "%s: %d patient(s) have slides with different t/e; using each patient's first row",
            path, n_conflict,
        )

    df = first_rows.drop(columns=["pathology_id"]).copy()
    df["t"] = df["t"].astype(float)
    df["e"] = df["e"].astype(int)
    df["y_c"] = 1 - df["e"]
    df["slide_ids"] = grouped["pathology_id"].agg(list)
    edges = bin_edges(df["t"].to_numpy(), df["e"].to_numpy(), bins, source=str(path))
    df["y_t"] = assign_bins(df["t"].to_numpy(), edges)
    df.attrs = {"bin_edges": edges.tolist(), "source": str(path)}
    front = [*LABEL_COLUMNS, "slide_ids"]
    return df[front + [c for c in df.columns if c not in front]]


def patient_slides(
    labels: pd.DataFrame,
    patients: Sequence[str],
    available_slides: Collection[str],
    store_name: str = "store",
    drop_missing: bool = False,
) -> dict[str, list[str]]:
    """Map patients to their slides that exist in a feature store.

    Label slide ids are matched to store ids by :func:`match_slide_ids` (exact, else ignoring
    a WSI file extension: ``X.svs`` in the CSV reads the store's ``X``). Slides of a patient
    that are missing from the store, or whose match is ambiguous, are dropped with a warning;
    a patient with none left is an error (training on it would be impossible), unless
    ``drop_missing`` (applying a model to whichever labelled patients the store holds): such
    patients are then left out with one warning.

    Args:
        labels: output of :func:`load_labels`.
        patients: patient ids to look up.
        available_slides: complete slide ids of the store.
        store_name: path of the store, for messages.

    Returns:
        ``{patient_id: [store slide ids in CSV order]}`` in the order of ``patients``.
    """
    for pid in patients:
        if pid not in labels.index:
            raise LabelError(f"{labels.attrs.get('source', 'labels')}: unknown patient {pid!r}")
    match = match_slide_ids((s for pid in patients for s in labels.at[pid, "slide_ids"]),
                            available_slides)
    for line in match.problems():
        log.warning("%s: %s", store_name, line)
    matched_by_key = sum(lab != sid for lab, sid in match.matched.items())
    if matched_by_key:
        log.info("%s: %d label slide id(s) matched to store ids without their file extension",
                 store_name, matched_by_key)
    out: dict[str, list[str]] = {}
    unplaceable: list[str] = []
    dropped = 0
    for pid in patients:
        ids = labels.at[pid, "slide_ids"]
        slides = [match.matched[s] for s in ids if s in match.matched]
        dropped += len(ids) - len(slides)
        if not slides:
            unplaceable.append(pid)
        else:
            out[pid] = slides
    if unplaceable and drop_missing:
        log.warning("%s: %d of %d labelled patient(s) have no slide there; left out (e.g. %s)",
                    store_name, len(unplaceable), len(patients), ", ".join(unplaceable[:3]))
    elif unplaceable:
        more = f" (and {len(unplaceable) - 1} more)" if len(unplaceable) > 1 else ""
        raise LabelError(
            f"{store_name}: patient {unplaceable[0]!r}{more} has no slide in the store "
            f"(expected one of {labels.at[unplaceable[0], 'slide_ids'][:3]})"
        )
    if dropped:
        log.warning("%s: %d labelled slide(s) are not in the store and are skipped", store_name, dropped)
    return out
