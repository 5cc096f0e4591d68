"""Helpers for the store tests: mutable copies of the session cohort, source readers."""
from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture
def cohort_copy(synth_cohort, tmp_path: Path):
    """A private copy of `synth_cohort` that a test may damage."""
    root = tmp_path / "cohort"
    shutil.copytree(synth_cohort.root, root)

    def move(p: Path) -> Path:
        return root / p.relative_to(synth_cohort.root)

    return replace(
        synth_cohort, root=root, x5_coords=move(synth_cohort.x5_coords), x20_coords=move(synth_cohort.x20_coords),
        x5_features=move(synth_cohort.x5_features), x20_features=move(synth_cohort.x20_features),
        labels_csv=move(synth_cohort.labels_csv), truth_csv=move(synth_cohort.truth_csv),
        splits=[move(p) for p in synth_cohort.splits],
    )


def _source_arrays(cohort, sid: str) -> tuple[np.ndarray, np.ndarray]:
    x5 = torch.load(cohort.x5_features / "pt_files" / f"{sid}.pt", weights_only=True).numpy()
    x20 = torch.load(cohort.x20_features / "pt_files" / f"{sid}.pt", weights_only=True).numpy()
    return x5, x20


@pytest.fixture(scope="session")
def source_arrays():
    """f(cohort, slide_id) -> (x5 [N, D], x20 [16N, D]) float32 straight from the CLAM .pt files."""
    return _source_arrays


def _assert_same_store(a, b) -> None:
    """Root attrs, slide list, every slide's attrs and every stored array equal, read back
    (either store a folder or a URL)."""
    from dsca.store import FeatureStore
    from dsca.store._layout import ARRAYS

    fa, fb = FeatureStore.open(a), FeatureStore.open(b)
    assert fa.attrs == fb.attrs
    assert fa.slide_ids == fb.slide_ids
    for sid in fa.slide_ids:
        assert fa.slide_attrs(sid) == fb.slide_attrs(sid), sid
        for name in ARRAYS:
            x, y = fa.read_array(sid, name), fb.read_array(sid, name)
            assert x.dtype == y.dtype and np.array_equal(x, y), (sid, name)


@pytest.fixture(scope="session")
def assert_same_store():
    """``assert_same_store(a, b)``: two stores hold the same slides, attrs and arrays."""
    return _assert_same_store
