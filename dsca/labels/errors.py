"""The one error type of the survival labels, so callers catch a single class."""
from __future__ import annotations

__all__ = ["LabelError"]


class LabelError(ValueError):
    """A label CSV, split file or store does not fit the survival labels (message names it)."""

