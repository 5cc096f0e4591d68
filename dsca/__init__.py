"""DSCA: dual-stream network with cross-attention for survival on WSI pyramids.

`x5` is the low-resolution stream (CLAM level 2, 16x downsampled), `x20` the high-resolution
stream (level 1, 4x); every x5 patch owns a 4x4 block of 16 x20 patches.

The heavy model code is imported lazily so that light modules (`dsca.coords`, `dsca.labels`)
and `dsca.store` can be used without building the network.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["build_model", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from dsca.model import build_model


def __getattr__(name: str) -> Any:
    if name == "build_model":
        from dsca.model import build_model

        return build_model
    raise AttributeError(f"module 'dsca' has no attribute {name!r}")
