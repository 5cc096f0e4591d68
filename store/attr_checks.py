"""Which root and slide attributes of a store a reader can rely on, checked once at open.

Each check returns the reason an attribute set cannot be used, or None; the read API
(:mod:`dsca.store.reader`) and `dsca-store verify` (:mod:`dsca.store.verify`) turn a reason
into their own error or report line.
"""
from __future__ import annotations

from typing import Any

from dsca.coords import SCALE
from dsca.store._layout import DTYPES

__all__ = ["count_problem", "root_attrs_problem", "slide_attrs_problem"]


def _int_at_least(value: Any, minimum: int) -> bool:
    # JSON gives int or float; a bool is an int to Python but never a count
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def root_attrs_problem(attrs: dict[str, Any], has_slides: bool) -> str | None:
    """Why a store's root attributes cannot be read, or None; `has_slides`: a complete slide exists.

    Checked: `dtype` float16/float32, `feature_dim` a positive int (None only while no slide
    is complete: convert records it before the first one), `scale` the layout's SCALE.
    """
    dtype = attrs.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        what = "missing" if "dtype" not in attrs else f"{dtype!r}"
        return f"root attribute dtype is {what}, expected one of {', '.join(DTYPES)}"
    dim = attrs.get("feature_dim")
    if dim is None:
        if has_slides:
            what = "missing" if "feature_dim" not in attrs else "null"
            return f"root attribute feature_dim is {what}, but the store holds complete slides"
    elif not _int_at_least(dim, 1):
        return f"root attribute feature_dim is {dim!r}, expected a positive integer"
    scale = attrs.get("scale")
    if not _int_at_least(scale, 0) or scale != SCALE:
        what = "missing" if "scale" not in attrs else f"{scale!r}"
        return f"root attribute scale is {what}, this reader knows only {SCALE} (4x4 x20 patches per x5 patch)"
    return None


def count_problem(attrs: dict[str, Any], key: str, minimum: int, required: bool) -> str | None:
    """Why attribute `key` is not an integer >= `minimum` (or missing while `required`), or None."""
    if key not in attrs:
        return f"attribute {key} is missing" if required else None
    value = attrs[key]
    if not _int_at_least(value, minimum):
        return f"attribute {key} is {value!r}, expected an integer >= {minimum}"
    return None


def slide_attrs_problem(attrs: dict[str, Any]) -> str | None:
    """Why a complete slide's attributes cannot be used, or None.

    Checked: `n_patches` a positive int; where present, `grid_collisions` a count, `step` two
    positive ints, `patient_id` a string, `sources` role -> record with a byte count.
    """
    problem = count_problem(attrs, "n_patches", 1, required=True) or count_problem(
        attrs, "grid_collisions", 0, required=False)
    if problem:
        return problem
    if "step" in attrs:
        step = attrs["step"]
        if not (isinstance(step, list) and len(step) == 2 and all(_int_at_least(v, 1) for v in step)):
            return f"attribute step is {step!r}, expected two positive integers"
    pid = attrs.get("patient_id")
    if pid is not None and not isinstance(pid, str):
        return f"attribute patient_id is {pid!r}, expected a string"
    sources = attrs.get("sources", {})
    if not isinstance(sources, dict) or not all(
            isinstance(rec, dict) and _int_at_least(rec.get("bytes"), 0) for rec in sources.values()):
        return f"attribute sources is unreadable ({str(sources)[:80]!r}), expected role -> record with bytes"
    return None
