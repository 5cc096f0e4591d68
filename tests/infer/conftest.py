"""Fixtures of the inference tests: a small cross-validation run and a final run on the
shared synthetic store, trained once per session."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml


def write_config(path: Path, synth_cohort, synth_store, **overrides: Any) -> Path:
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
        **overrides,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def cv_run(synth_cohort, synth_store, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two folds of a tiny discrete-head run; returns the run folder."""
    from dsca.config import load_config
    from dsca.train import train_cross_validation

    root = tmp_path_factory.mktemp("cv_run")
    config = write_config(root / "config.yaml", synth_cohort, synth_store)
    train_cross_validation(load_config(config), root / "run")
    return root / "run"


@pytest.fixture(scope="session")
def final_run(synth_cohort, synth_store, cv_run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`dsca train --final --cv-run` of `cv_run`'s config; returns the run folder."""
    from dsca.cli.dsca_main import main

    root = tmp_path_factory.mktemp("final_run")
    config = write_config(root / "config.yaml", synth_cohort, synth_store)
    assert main(["-q", "train", "--config", str(config), "--final", "--cv-run", str(cv_run),
                 "--out", str(root / "run")]) == 0
    return root / "run"


@pytest.fixture
def infer_config(synth_cohort, synth_store, tmp_path: Path):
    """Write a small training config on the synthetic store (keyword overrides); returns its path."""
    def make(name: str = "config.yaml", **overrides: Any) -> Path:
        return write_config(tmp_path / name, synth_cohort, synth_store, **overrides)

    return make
