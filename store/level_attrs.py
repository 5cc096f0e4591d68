"""How one coordinates file's patches sit on the slide's level 0: the level attributes.

CLAM writes `patch_size`, `patch_level` and `downsample` on each `coords` dataset; files of
other tools may lack them, and the user then gives them on the command line
(``--x5-attrs patch_size=256,patch_level=2,downsample=16``). :func:`level_attrs` merges the
two, never guessing a missing value, and checks that the result describes a real pyramid level.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from dsca.store.errors import ClamError

__all__ = ["LevelAttrs", "level_attrs", "parse_level_attrs"]


@dataclass(frozen=True)
class LevelAttrs:
    """How one coordinates file's patches sit on the slide's level 0.

    Attributes:
        patch_size: patch width in pixels of the level it was cut at.
        downsample: [2] level-0 pixels per pixel of that level (per axis, may be non-integer).
        patch_level: pyramid level the patches were cut at (None when unknown).
        level_dim: (width, height) of that level in its own pixels, when the file records it;
            bounds the coordinates.
    """

    patch_size: int
    downsample: tuple[float, float]
    patch_level: int | None = None
    level_dim: tuple[int, int] | None = None

    @property
    def step(self) -> np.ndarray:
        """[2] int64 level-0 size of one patch, as CLAM steps its grid (int(size * ds))."""
        return (self.patch_size * np.asarray(self.downsample)).astype(np.int64)

    @property
    def extent(self) -> np.ndarray | None:
        """[2] level-0 (width, height) of the slide, when known."""
        if self.level_dim is None:
            return None
        return np.ceil(np.asarray(self.level_dim, dtype=np.float64) * np.asarray(self.downsample))


_LEVEL_KEYS = ("patch_size", "patch_level", "downsample")


def parse_level_attrs(text: str | None) -> dict[str, Any]:
    """`"patch_size=256,patch_level=2,downsample=16"` -> {key: value}, for files that lack them.

    `downsample` may be one number or two joined by `x` (`16.0012x16.0009`).
    """
    if not text:
        return {}
    out: dict[str, Any] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not value:
            raise ClamError(f"level attrs {text!r}: expected key=value pairs, got {part!r}")
        if key not in _LEVEL_KEYS:
            raise ClamError(f"level attrs {text!r}: unknown key {key!r} (use {', '.join(_LEVEL_KEYS)})")
        if key in out:
            raise ClamError(f"level attrs {text!r}: {key} given twice")
        try:
            out[key] = [float(v) for v in value.split("x")] if key == "downsample" else int(value)
        except ValueError:
            raise ClamError(f"level attrs {text!r}: {key} must be a number, got {value!r}") from None
    if "downsample" in out and len(out["downsample"]) > 2:
        raise ClamError(f"level attrs {text!r}: downsample is one number or two joined by 'x'")
    # checked as a file's own attributes would be, once here rather than once per slide
    level_attrs({}, {"patch_size": 256, "patch_level": 0, "downsample": 1.0, **out}, f"level attrs {text!r}")
    return out


def _single_number(value: Any) -> float:
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.size != 1:
        raise ValueError(f"expected one number, got {arr.size}")
    return float(arr[0])


def level_attrs(attrs: Mapping[str, Any], given: Mapping[str, Any], what: str) -> LevelAttrs:
    """Validated level attributes: the file's own, or `given` (the command line) where absent.

    Never guessed: CLAM always writes patch_size, patch_level and downsample, so a file without
    them was written by another tool, whose conventions cannot be assumed.
    """
    merged: dict[str, Any] = {}
    for key in _LEVEL_KEYS:
        if key in attrs and key in given:
            same = np.allclose(np.asarray(attrs[key], dtype=np.float64).reshape(-1),
                               np.asarray(given[key], dtype=np.float64).reshape(-1), rtol=1e-6)
            if not same:
                raise ClamError(f"{what} has {key}={attrs[key]!r} but the command line gives {given[key]!r}")
        if key in attrs:
            merged[key] = attrs[key]
        elif key in given:
            merged[key] = given[key]
    absent = [k for k in _LEVEL_KEYS if k not in merged]
    if absent:
        raise ClamError(f"{what} has no {', '.join(absent)} attribute{'s' if len(absent) > 1 else ''} "
                        "(CLAM writes patch_size, patch_level and downsample on 'coords'); pass them "
                        "with --x5-attrs/--x20-attrs, e.g. patch_size=256,patch_level=2,downsample=16")
    try:
        size, level = _single_number(merged["patch_size"]), _single_number(merged["patch_level"])
        ds = np.broadcast_to(np.asarray(merged["downsample"], dtype=np.float64).reshape(-1), (2,))
    except (ValueError, TypeError):
        raise ClamError(f"{what}: patch_size/patch_level/downsample are not numbers "
                        f"({merged['patch_size']!r}, {merged['patch_level']!r}, {merged['downsample']!r})") from None
    if not (math.isfinite(size) and size == int(size) and 1 <= size <= 1 << 16):
        raise ClamError(f"{what}: patch_size {merged['patch_size']!r} is not a whole number of pixels in 1..65536")
    if not (math.isfinite(level) and level == int(level) and 0 <= level <= 32):
        raise ClamError(f"{what}: patch_level {merged['patch_level']!r} is not a pyramid level (0..32)")
    if not (np.all(np.isfinite(ds)) and np.all(ds >= 1.0) and np.all(ds <= 1e5)):
        raise ClamError(f"{what}: downsample {ds.tolist()} is not a finite factor in 1..1e5")
    dim = None
    if "level_dim" in attrs:
        try:
            raw = np.asarray(attrs["level_dim"], dtype=np.float64).reshape(-1)
        except (ValueError, TypeError):
            raw = np.array([np.nan])
        if raw.size != 2 or not np.all(np.isfinite(raw)) or np.any(raw < 1):
            raise ClamError(f"{what}: level_dim {attrs['level_dim']!r} is not a (width, height) in pixels")
        dim = (int(raw[0]), int(raw[1]))
    return LevelAttrs(int(size), (float(ds[0]), float(ds[1])), int(level), dim)
