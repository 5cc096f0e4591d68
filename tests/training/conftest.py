"""Fixtures of the training tests: label CSVs and small training configs on the synthetic store."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml


@pytest.fixture
def write_csv(tmp_path: Path):
    """Write rows (list of dicts) as a CSV; returns its path."""
    import pandas as pd

    def write(rows: list[dict[str, Any]], name: str = "labels.csv") -> Path:
        path = tmp_path / name
        pd.DataFrame(rows).to_csv(path, index=False)
        return path

    return write


@pytest.fixture
def small_config(synth_cohort, synth_store, tmp_path: Path):
    """Write a small training YAML on the synthetic store; keyword overrides; returns its path."""

    def make(**overrides: Any) -> Path:
        cfg: dict[str, Any] = {
            "store": str(synth_store),
            "labels": str(synth_cohort.labels_csv),
            "splits": str(synth_cohort.splits[0]).replace("fold0", "fold{}"),
            "dims": "32-16-16-4",
            "tra_nhead": 2,
            "dropout": 0.1,
            "opt": "adam",
            "lr": 1e-3,
            "epochs": 2,
            "bp_every_iters": 4,
            "folds": [0, 1],
            "eval_bootstrap": 20,
            "num_threads": 1,
            "seed": 3,
        }
        cfg.update(overrides)
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    return make


@pytest.fixture(scope="session")
def reference_size_store(tmp_path_factory: pytest.TempPathFactory):
    """A tiny synthetic cohort with the reference's 1024-dim features (10 patients, ~6 patches
    per slide), converted; returns (cohort, store path). The shared `synth_store` has 32-dim
    features, which the reference config's dims (1024-...) cannot read."""
    from dsca.store.convert import convert_cohort
    from dsca.store.synth import SynthSpec, write_synthetic_cohort

    root = tmp_path_factory.mktemp("reference_size")
    cohort = write_synthetic_cohort(root / "cohort", SynthSpec(patients=10, seed=5, dim=1024,
                                                               patches=6, h5_files=False),
                                    progress=False)
    store = root / "cohort.zarr"
    report = convert_cohort(
        x5_features=cohort.x5_features, x20_features=cohort.x20_features,
        x5_coords=cohort.x5_coords, x20_coords=cohort.x20_coords,
        labels=cohort.labels_csv, out=store, progress=False,
    )
    assert report.ok, list(report.lines())
    return cohort, store
