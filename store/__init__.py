"""`dsca.store`: CLAM outputs -> a validated, chunked Zarr feature store, and its read API.

Where things live (docs/ARCHITECTURE.md has the store format):

* reading inputs - :mod:`~dsca.store.clam` (CLAM coords and features),
  :mod:`~dsca.store.level_attrs` (patch size / level / downsample), the TRIDENT modules
  :mod:`~dsca.store.trident` (one level; re-exports the others), ``trident_attrs``,
  ``trident_dirs``, ``trident_blocks``; :mod:`~dsca.store.align` (x5 -> x20 coords);
  ``_io`` (a file read once, checked) and :mod:`~dsca.store.provenance` (source records);
* converting - :mod:`~dsca.store.convert` (the run: plan, report), ``inputs`` (folders,
  labels), ``validate`` (one slide's checks and layout), ``write`` (slide groups, root
  metadata, the lock), ``parallel`` (worker processes), ``_signals`` (Ctrl-C, SIGTERM);
* reading the store - :mod:`~dsca.store.reader` (:class:`FeatureStore`), ``shard_reader``
  (the direct shard path), ``attr_checks`` (metadata checks), :mod:`~dsca.store.dataset`
  (the patient-level torch Dataset), :mod:`~dsca.store.verify` (``info``, ``verify``);
* object storage (``s3://...``, any fsspec URL) - :mod:`~dsca.store.remote` (URLs, reads through
  zarr's FsspecStore, the chunk cache), :mod:`~dsca.store.remote_write` (convert and finalize
  through a local staging store, uploads in a safe order);
* ``_layout`` (format constants, codecs, slide ids), ``errors`` (ClamError, ConvertError,
  StoreError), :mod:`~dsca.store.synth` / ``synth_spec`` (a synthetic CLAM cohort).
"""
from __future__ import annotations

from dsca.store.dataset import PatientDataset, PatientSample
from dsca.store.reader import FeatureStore, PatientData, SlideData, StoreError

__all__ = ["FeatureStore", "PatientData", "SlideData", "StoreError", "PatientDataset", "PatientSample"]
