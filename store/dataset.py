"""Patient-level torch Dataset over a feature store (safe with DataLoader workers)."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from einops import rearrange
from torch.utils.data import Dataset

from dsca.labels import LABEL_COLUMNS
from dsca.store.reader import CHECKED_DEFAULT, FeatureStore
from dsca.store.remote import StorageOptions, is_url, local_path

# LABEL_COLUMNS is re-exported: the dataset's label tensor holds these columns in this order
__all__ = ["PatientDataset", "PatientSample", "LABEL_COLUMNS"]


class PatientSample(NamedTuple):
    """One patient.

    Attributes:
        patient_id: the id.
        x20: [16N, D] high-res rows, block-major (row 16*i + 4*r + c).
        x5: [N, D] low-res rows.
        coords: [N, 2] int64 patient-level grid (dsca.coords.patient_grid).
        label: [4] float64 (t, e, y_t, y_c): decimal times exactly as in the labels; NaN without labels.
    """

    patient_id: str
    x20: torch.Tensor
    x5: torch.Tensor
    coords: torch.Tensor
    label: torch.Tensor


class PatientDataset(Dataset):
    """All slides of each patient, concatenated in the given order.

    Args:
        store_path: a `dsca-store/1` store: a folder, or a URL (``s3://bucket/cohort.zarr``).
        patient_slides: patient id -> slide ids (the concatenation order).
        labels: optional DataFrame indexed by patient id with float columns t, e, y_t, y_c.
        dtype: torch dtype of the features (decoded straight into it).
        checked: verify each chunk's crc32c while reading (`FeatureStore.open`); a damaged
            chunk then raises StoreError, also out of DataLoader workers.
        storage_options: fsspec options of a store at a URL (`FeatureStore.open`).

    The store is opened lazily in each process (zarr keeps an event-loop thread, so a handle
    must never cross a fork); pickling drops the handle.
    """

    def __init__(self, store_path: str | Path, patient_slides: Mapping[str, Sequence[str]],
                 labels: pd.DataFrame | None = None, dtype: torch.dtype = torch.float32,
                 checked: bool = CHECKED_DEFAULT, storage_options: StorageOptions | None = None) -> None:
        # a URL stays a str: a Path would collapse "s3://b/x" to "s3:/b/x"
        self.store_path: str | Path = str(store_path) if is_url(store_path) else local_path(store_path)
        self.storage_options = dict(storage_options) if storage_options is not None else None
        self.checked = checked
        self.patient_ids = list(patient_slides)
        self.patient_slides = {p: list(s) for p, s in patient_slides.items()}
        self.dtype = dtype
        self._np_dtype = torch.empty((), dtype=dtype).numpy().dtype
        self._labels = np.full((len(self.patient_ids), len(LABEL_COLUMNS)), np.nan, dtype=np.float64)
        if labels is not None:
            absent = [c for c in LABEL_COLUMNS if c not in labels.columns]
            if absent:
                raise ValueError(f"labels lack columns {absent}")
            unknown = [p for p in self.patient_ids if p not in labels.index]
            if unknown:
                raise KeyError(f"patients without labels: {unknown[:5]}")
            self._labels = labels.loc[self.patient_ids, list(LABEL_COLUMNS)].to_numpy(dtype=np.float64)
        self._store: FeatureStore | None = None
        self._pid = -1
        known = set(self.store.slide_ids)
        missing = [(p, s) for p, ss in self.patient_slides.items() for s in ss if s not in known]
        if missing:
            raise KeyError(f"{self.store_path}: slides not in the store: {missing[:5]}")
        self._store = None  # do not carry the parent's handle into workers

    @property
    def store(self) -> FeatureStore:
        if self._store is None or self._pid != os.getpid():
            self._store = FeatureStore.open(self.store_path, checked=self.checked,
                                            storage_options=self.storage_options)
            self._pid = os.getpid()
        return self._store

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_store"] = None
        return state

    def __len__(self) -> int:
        return len(self.patient_ids)

    def __getitem__(self, i: int) -> PatientSample:
        pid = self.patient_ids[i]
        data = self.store.read_patient(self.patient_slides[pid], dtype=self._np_dtype)
        return PatientSample(
            pid,
            torch.from_numpy(rearrange(data.x20, "n k d -> (n k) d")),
            torch.from_numpy(data.x5),
            torch.from_numpy(data.coords.astype(np.int64)),
            torch.from_numpy(self._labels[i].copy()),
        )
