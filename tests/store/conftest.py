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
