"""Test-wide setup.

Triton reads TRITON_INTERPRET when it is imported, so it is set here, before any test module
imports dsca.kernels; the kernels then run on CPU tensors through the interpreter.
"""
from __future__ import annotations

import math
import os
from typing import Any

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


def _assert_json_close(a: Any, b: Any, tol: float, where: str = "") -> None:
    """Equal structure and values of two parsed JSON documents, floats within ``tol`` (NaN
    equals NaN; an int may stand for an equal float)."""
    assert type(a) is type(b) or {type(a), type(b)} <= {int, float}, where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_json_close(a[k], b[k], tol, f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)):
            _assert_json_close(u, v, tol, f"{where}[{i}]")
    elif isinstance(a, float):
        assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol, (where, a, b)
    else:
        assert a == b, where


@pytest.fixture(scope="session")
def assert_json_close():
    """``assert_json_close(a, b, tol)``: two runs' metrics.json (or any JSON) agree."""
    return _assert_json_close
