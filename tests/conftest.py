"""Test-wide setup.

Triton reads TRITON_INTERPRET when it is imported, so it is set here, before any test module
imports dsca.kernels; the kernels then run on CPU tensors through the interpreter.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The reference study's inputs in ../shared/reference (skip when absent)."""
    if not REFERENCE_DIR.is_dir():
        pytest.skip("../shared/reference is not present")
    return REFERENCE_DIR


# --- synthetic cohort fixtures (owned by the store; used across the suite) -------------------
@pytest.fixture(scope="session")
def synth_cohort(tmp_path_factory: pytest.TempPathFactory):
    """A tiny CLAM-format cohort on disk (dsca.store.synth): 20 patients, D=32, ~24 patches/slide."""
    from dsca.store.synth import SynthSpec, write_synthetic_cohort

    spec = SynthSpec(patients=20, seed=7, dim=32, patches=24)
    return write_synthetic_cohort(tmp_path_factory.mktemp("synth_cohort"), spec, progress=False)


@pytest.fixture(scope="session")
def synth_store(synth_cohort, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`synth_cohort` converted (float16, with labels) into a dsca-store/1 store; returns its path."""
    from dsca.store.convert import convert_cohort

    out = tmp_path_factory.mktemp("synth_store") / "cohort.zarr"
    report = convert_cohort(
        x5_features=synth_cohort.x5_features, x20_features=synth_cohort.x20_features,
        x5_coords=synth_cohort.x5_coords, x20_coords=synth_cohort.x20_coords,
        labels=synth_cohort.labels_csv, out=out, progress=False,
    )
    assert report.ok, list(report.lines())
    return out
