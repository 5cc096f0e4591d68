"""Fixtures of the kernel tests."""
from __future__ import annotations

import pytest
from kernels_cases import make_inputs


@pytest.fixture
def capool_inputs():
    """Factory: ``capool_inputs(m, c, heads, seed=0)`` -> ``kernels_cases.CAPoolInputs``."""
    return make_inputs
