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
