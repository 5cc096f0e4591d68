"""`dsca.store`: CLAM outputs -> a validated, chunked Zarr feature store, and its read API."""
from __future__ import annotations

from dsca.store.dataset import PatientDataset, PatientSample
from dsca.store.reader import FeatureStore, PatientData, SlideData, StoreError

__all__ = ["FeatureStore", "PatientData", "SlideData", "StoreError", "PatientDataset", "PatientSample"]
