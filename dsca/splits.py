"""Cross-validation splits: the reference's ``.npz`` files and stratified k-fold generation.

A split file holds ``train_patients``, ``val_patients`` and optionally ``test_patients``
(unicode arrays of patient ids). :func:`make_splits` deals each (event, time-bin) stratum
round-robin over the folds after a seeded shuffle, so every fold's test set has about the same
share of events and of each survival-time quartile; the validation set is taken the same way
from the remaining patients.
"""
from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dsca.atomic import atomic_write
from dsca.labels import LabelError

__all__ = ["Split", "load_split", "resolve_split_paths", "make_splits", "write_splits"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    """Patient ids of one fold (``test`` is None when the file has no test set)."""

    train: list[str]
    val: list[str]
    test: list[str] | None = None

    def parts(self) -> dict[str, list[str]]:
        """``{"train": ..., "val": ..., "test": ...}`` without an absent test set."""
        out = {"train": self.train, "val": self.val}
        if self.test is not None:
            out["test"] = self.test
        return out


def load_split(path: str | Path, known_patients: Collection[str] | None = None) -> Split:
    """Read one split ``.npz`` and check it.

    Args:
        path: file with ``train_patients``, ``val_patients`` and optional ``test_patients``.
        known_patients: when given, every id must be one of them.

    Raises:
        LabelError: missing file or keys, a patient in two parts, or an unknown patient.
    """
    path = Path(path)
    if not path.is_file():
        raise LabelError(f"{path}: split file not found")
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in ("train_patients", "val_patients") if k not in data.files]
        if missing:
            raise LabelError(f"{path}: missing {', '.join(missing)} (has {', '.join(data.files)})")
        parts = {k: [str(p) for p in data[k]] for k in data.files if k.endswith("_patients")}
    split = Split(
        train=parts["train_patients"], val=parts["val_patients"], test=parts.get("test_patients")
    )
    seen: dict[str, str] = {}
    for name, ids in split.parts().items():
        for pid in ids:
            if pid in seen:
                raise LabelError(f"{path}: patient {pid!r} is in both {seen[pid]} and {name}")
            seen[pid] = name
    if known_patients is not None:
        known = set(known_patients)
        unknown = [p for p in seen if p not in known]
        if unknown:
            more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            raise LabelError(
                f"{path}: patient {unknown[0]!r}{more} ({seen[unknown[0]]}) is not in the labels"
            )
    return split


def resolve_split_paths(splits: str | Sequence[str], folds: Sequence[int]) -> list[Path]:
    """Split file of each fold.

    Args:
        splits: a pattern with ``{}`` for the fold number, or one path per fold (indexed by
            fold number).
        folds: fold numbers to run.
    """
    if isinstance(splits, str):
        if "{}" not in splits:
            raise LabelError(f"splits pattern {splits!r} has no '{{}}' for the fold number")
        return [Path(splits.format(k)) for k in folds]
    paths = [Path(p) for p in splits]
    bad = [k for k in folds if k < 0 or k >= len(paths)]
    if bad:
        raise LabelError(f"fold {bad[0]} requested but splits lists only {len(paths)} file(s)")
    return [paths[k] for k in folds]


def make_splits(
    labels: pd.DataFrame, folds: int = 5, seed: int = 0, val_fraction: float = 0.2
) -> list[Split]:
    """Stratified k-fold train/val/test splits at patient level.

    Args:
        labels: output of :func:`dsca.labels.load_labels` (uses ``e`` and ``y_t``).
        folds: number of folds k; fold i's test set is the i-th of k disjoint parts.
        seed: shuffle seed.
        val_fraction: share of the non-test patients held out for validation.

    Returns:
        ``folds`` splits; test sets partition the cohort.
    """
    if folds < 2:
        raise LabelError(f"folds must be >= 2, got {folds}")
    if len(labels) < 2 * folds:
        raise LabelError(f"{len(labels)} patients are too few for {folds} folds")
    rng = np.random.default_rng(seed)
    strata = labels["e"].astype(str) + "_" + labels["y_t"].astype(str)
    fold_of = pd.Series(-1, index=labels.index)
    offset = 0
    # Continue the round-robin across strata so that small strata do not all land in fold 0.
    for _, ids in sorted(strata.groupby(strata).groups.items()):
        ids = list(ids)
        rng.shuffle(ids)
        fold_of[ids] = (np.arange(len(ids)) + offset) % folds
        offset += len(ids)
    out = []
    for k in range(folds):
        test = [p for p in labels.index if fold_of[p] == k]
        rest = labels.index[fold_of != k]
        val_mask = _stratified_take(strata[rest], val_fraction, rng)
        out.append(
            Split(
                train=[p for p, v in zip(rest, val_mask) if not v],
                val=[p for p, v in zip(rest, val_mask) if v],
                test=test,
            )
        )
    return out


def _stratified_take(strata: pd.Series, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """[len(strata)] bool mask holding ``fraction`` of each stratum (rounded, at least 1 overall)."""
    mask = np.zeros(len(strata), dtype=bool)
    pos = pd.Series(np.arange(len(strata)), index=strata.index)
    carry = 0.0
    for _, ids in sorted(strata.groupby(strata).groups.items()):
        idx = pos[list(ids)].to_numpy().copy()
        rng.shuffle(idx)
        # Carry the rounding remainder so that the total matches fraction * n.
        want = fraction * len(idx) + carry
        n = int(np.floor(want + 1e-9))
        carry = want - n
        mask[idx[:n]] = True
    if not mask.any():
        mask[rng.integers(len(mask))] = True
    return mask


def write_splits(splits: Sequence[Split], out_dir: str | Path, prefix: str) -> list[Path]:
    """Write ``<out_dir>/<prefix>-fold<k>.npz`` in the reference format; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, split in enumerate(splits):
        path = out / f"{prefix}-fold{k}.npz"
        arrays = {f"{name}_patients": np.array(ids, dtype=str) for name, ids in split.parts().items()}
        # Through an open file: np.savez appends ".npz" to a path without it, such as the
        # hidden temp name that keeps a half-written split from being read as a fold.
        with atomic_write(path, "wb") as f:
            np.savez(f, **arrays)
        paths.append(path)
    log.info("wrote %d split files to %s", len(paths), out)
    return paths
