"""A fold's data: its split checked against labels and store, its datasets, their loaders.

The store is opened once per run (:func:`open_store`) and every fold's split is checked
before anything is trained (:func:`build_fold_data`). With ``cache_features`` the patients'
samples are kept in one dict shared by all folds, so the store is read once per patient.
"""
from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from dsca.config import ConfigError, TrainConfig
from dsca.labels import LABEL_COLUMNS, patient_slides, rebin
from dsca.metrics import concordance_index
from dsca.splits import Split, load_split

__all__ = ["FoldData", "FeatureCache", "build_fold_data", "open_store", "patient_loader",
           "single_patient_loader", "to_model_inputs"]

#: Samples by (patient id, label values): a fold whose bins were cut on its own training
#: patients must not reuse a sample that carries another fold's label.
FeatureCache = dict[tuple[str, tuple[float, ...]], Any]


@dataclass
class FoldData:
    """Datasets of one fold and the labels they were built with."""

    fold: int
    split: Split
    labels: pd.DataFrame
    datasets: dict[str, Dataset]


def open_store(cfg: TrainConfig) -> set[str]:
    """The store's complete slide ids, after checking that its features fit the model.

    Raises:
        ConfigError: the store cannot be opened, or its feature size is not ``dims[0]``.
    """
    from dsca.store import FeatureStore, StoreError

    try:
        store = FeatureStore.open(cfg.store, storage_options=cfg.storage_options)
        feature_dim = store.feature_dim
    except StoreError as err:
        raise ConfigError(f"{cfg.source}: store: {err}") from None
    if feature_dim != cfg.model.dims[0]:
        raise ConfigError(
            f"{cfg.source}: the store {cfg.store} holds {feature_dim}-dim features but dims "
            f"starts with {cfg.model.dims[0]} (dims = input-embedding-hidden-output sizes)"
        )
    return set(store.slide_ids)


class _CachedDataset(Dataset):
    """A dataset whose samples are kept in a :data:`FeatureCache` shared across folds."""

    def __init__(self, base: Dataset, keys: list[tuple[str, tuple[float, ...]]],
                 cache: FeatureCache) -> None:
        self.base = base
        self.cache = cache
        self.keys = keys  # one (patient id, label values) per item of ``base``

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> Any:
        key = self.keys[i]
        if key not in self.cache:
            self.cache[key] = self.base[i]
        return self.cache[key]


def build_fold_data(
    cfg: TrainConfig, labels: pd.DataFrame, fold: int, split_path: Path,
    store_slides: Collection[str], cache: FeatureCache | None = None,
) -> FoldData:
    """Read a fold's split, check it against the labels and the store's complete slides
    (``store_slides``), and build its datasets (cached in ``cache`` when given)."""
    from dsca.store import PatientDataset

    split = load_split(split_path, known_patients=labels.index)
    fold_labels = rebin(labels, split.train) if cfg.bin_cut == "train" else labels
    datasets: dict[str, Dataset] = {}
    for name, ids in split.parts().items():
        if not ids:
            continue
        mapping = patient_slides(fold_labels, ids, store_slides, store_name=str(cfg.store))
        ds: Dataset = PatientDataset(cfg.store, mapping, labels=fold_labels, storage_options=cfg.storage_options)
        if cache is not None:
            lab = fold_labels.loc[list(mapping), list(LABEL_COLUMNS)].to_numpy(float)
            keys = [(p, tuple(row)) for p, row in zip(mapping, lab)]
            ds = _CachedDataset(ds, keys, cache)
        datasets[name] = ds
    if "train" not in datasets or "val" not in datasets:
        raise ValueError(f"{split_path}: fold {fold} needs non-empty train and val patients")
    if cfg.monitor_metrics == "ci":
        val = fold_labels.loc[split.val]
        if np.isnan(concordance_index(val["t"], val["e"], np.zeros(len(val)))):
            raise ValueError(
                f"{split_path}: fold {fold}'s {len(val)} validation patients ({int(val['e'].sum())} "
                "events) have no comparable pair, so monitor_metrics: ci cannot pick an epoch; "
                "use monitor_metrics: loss or a larger validation set")
    return FoldData(fold=fold, split=split, labels=fold_labels, datasets=datasets)


def _unwrap_single(batch: list[Any]) -> Any:
    """The loader's collate function: batches hold one patient, passed on as it is."""
    return batch[0]


def patient_loader(dataset: Dataset, cfg: TrainConfig, **kwargs: Any) -> DataLoader:
    """A loader of one patient per item.

    ``num_workers`` is capped at the CPUs this process may use (more workers than CPUs only
    add processes), and is 0 with ``cache_features``: the cache lives in this process, and
    workers would fill copies of it that die with them at the end of every epoch.
    """
    return single_patient_loader(dataset, 0 if cfg.cache_features else cfg.num_workers, **kwargs)


def single_patient_loader(dataset: Dataset, num_workers: int, **kwargs: Any) -> DataLoader:
    """A loader of one patient per item with at most ``num_workers`` workers (capped at the
    CPUs this process may use)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return DataLoader(dataset, batch_size=1, num_workers=min(num_workers, cpus),
                      collate_fn=_unwrap_single, **kwargs)


def to_model_inputs(sample: Any, device: torch.device, position_emb: bool) -> tuple[torch.Tensor, ...]:
    """PatientSample -> (x20 [1,16N,D], x5 [1,N,D], coords [1,N,2] or None, label [4])."""
    x20 = sample.x20.unsqueeze(0).to(device, non_blocking=True)
    x5 = sample.x5.unsqueeze(0).to(device, non_blocking=True)
    coords = sample.coords.unsqueeze(0).to(device) if position_emb else None
    # float64: decimal times must compare equal to the same times in the labels and metrics
    return x20, x5, coords, torch.as_tensor(sample.label, dtype=torch.float64)
