"""What TRIDENT's files say about themselves: coords attributes -> level-0 grid, encoder, labels.

TRIDENT (mahmoodlab/TRIDENT) patches at a magnification, not a pyramid level, and records it
in the `coords` dataset's attributes (`patch_size`, `patch_size_level0`,
`level0_magnification`, `target_magnification`, `overlap`). :func:`trident_level` turns them
into the :class:`~dsca.store.level_attrs.LevelAttrs` that CLAM files carry, and
:func:`grid_cells` checks that a run's corners lie on its grid. Shared by the folder discovery
(:mod:`dsca.store.trident_dirs`), the level reader (:mod:`dsca.store.trident`) and the block
assembly (:mod:`dsca.store.trident_blocks`).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dsca.store._io import plain
from dsca.store.errors import ClamError
from dsca.store.level_attrs import LevelAttrs

__all__ = [
    "FEATURES_PREFIX",
    "PATCHES_SUFFIX",
    "REQUIRED_KEYS",
    "TRIDENT_KEYS",
    "coords_attrs",
    "encoder_attr",
    "folder_encoder",
    "grid_cells",
    "is_trident_attrs",
    "step_px",
    "trident_label",
    "trident_level",
]

#: attributes TRIDENT itself uses to tell its coords from CLAM's (WSI.py, `_load_coords`)
TRIDENT_KEYS = ("patch_size", "level0_magnification", "target_magnification")
#: attributes :func:`trident_level` needs; TRIDENT has written all five since its first release
REQUIRED_KEYS = ("patch_size", "patch_size_level0", "level0_magnification", "target_magnification", "overlap")
FEATURES_PREFIX = "features_"
PATCHES_SUFFIX = "_patches"


def trident_label(path: Path) -> str:
    """`<cdir>/<folder>/<file>`: both runs of a job have `features_<enc>/<slide>.h5`, so the
    patching folder (`5x_256px_0px_overlap`) is what tells their files apart in a message."""
    path = Path(path)
    return f"{path.parent.parent.name}/{path.parent.name}/{path.name}"


# --- attributes ----------------------------------------------------------------------------
def coords_attrs(dset: h5py.Dataset) -> dict[str, Any]:
    """A dataset's attributes as Python values (TRIDENT puts them all on `coords`)."""
    return {k: plain(v) for k, v in dset.attrs.items()}


def attr_number(attrs: Mapping[str, Any], key: str, what: str) -> float:
    """A finite number from an attribute that may be int, float64, a numpy scalar, bytes or str."""
    value = plain(attrs[key])
    try:
        if isinstance(value, (list, tuple)):
            if len(value) != 1:
                raise ValueError
            value = plain(value[0])
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ClamError(f"{what}: {key} {attrs[key]!r} is not a number") from None
    if not math.isfinite(number):
        raise ClamError(f"{what}: {key} {attrs[key]!r} is not finite")
    return number


def is_trident_attrs(attrs: Mapping[str, Any]) -> bool:
    """True for a TRIDENT coords attribute set: `patch_size`, `level0_magnification` and
    `target_magnification`, and no CLAM `patch_level` (TRIDENT's own test, WSI.py)."""
    return all(k in attrs for k in TRIDENT_KEYS) and "patch_level" not in attrs


def _patch_size_src(patch_size: float, level0_mag: float, target_mag: float) -> int:
    """Level-0 side of a patch exactly as TRIDENT's patcher computes it (WSIPatcher:
    ``round(patch_size * (10 / target) / (10 / level0))``, Python's round)."""
    return int(round(patch_size * ((10 / target_mag) / (10 / level0_mag))))


def trident_level(attrs: Mapping[str, Any], what: str) -> LevelAttrs:
    """Level attributes of a TRIDENT coords attribute set.

    Args:
        attrs: the `coords` dataset's attributes (coords file, or the features file's copy).
        what: the file, for messages.

    Returns:
        `patch_size` = the attribute (pixels at the target magnification); `downsample` =
        level-0 pixels per target pixel on both axes, such that ``LevelAttrs.step`` is the
        grid's level-0 step; `patch_level` None (TRIDENT records no pyramid level);
        `level_dim` = ceil(level0_width/height / downsample) when recorded, so that
        ``LevelAttrs.extent`` covers the level-0 slide.

    The step is the patcher's ``round(patch_size * level0_mag / target_mag)``: the
    `patch_size_level0` attribute is floor-divided and may be 1 px smaller (e.g. 100 px at 6x of
    a 40x slide: attribute 666, grid step 667); it must agree within 1 px.
    """
    missing = [k for k in REQUIRED_KEYS if k not in attrs]
    if missing:
        hint = " (CLAM coords: patch_level is set)" if "patch_level" in attrs else ""
        raise ClamError(f"{what} has no {', '.join(missing)} attribute{'s' if len(missing) > 1 else ''} on "
                        f"'coords'{hint}: not a TRIDENT coords file")
    size = attr_number(attrs, "patch_size", what)
    size_l0 = attr_number(attrs, "patch_size_level0", what)
    mag0 = attr_number(attrs, "level0_magnification", what)
    mag = attr_number(attrs, "target_magnification", what)
    overlap = attr_number(attrs, "overlap", what)
    if not (size == int(size) and 1 <= size <= 1 << 16):
        raise ClamError(f"{what}: patch_size {attrs['patch_size']!r} is not a whole number of pixels in 1..65536")
    for key, value in (("level0_magnification", mag0), ("target_magnification", mag)):
        if not 0 < value <= 1000:
            raise ClamError(f"{what}: {key} {attrs[key]!r} is not a magnification (0..1000]")
    if overlap != 0:
        raise ClamError(f"{what}: overlap is {attrs['overlap']!r} px; DSCA needs a non-overlapping grid "
                        "(patch with --overlap 0)")
    step = _patch_size_src(size, mag0, mag)
    if not 1 <= step <= 1 << 24:
        raise ClamError(f"{what}: a {int(size)} px patch at {mag:g}x of a {mag0:g}x slide is {step} px at level 0")
    if not (size_l0 > 0 and abs(size_l0 - step) <= 1):
        raise ClamError(f"{what}: patch_size_level0 {attrs['patch_size_level0']!r} disagrees with patch_size x "
                        f"level0_magnification / target_magnification = {int(size)} x {mag0:g} / {mag:g} = {step}")
    ds = step / size
    # LevelAttrs.step truncates size * ds: make sure float rounding cannot make it step - 1
    while int(size * ds) < step:
        ds = float(np.nextafter(ds, math.inf))
    dim = None
    if "level0_width" in attrs and "level0_height" in attrs:
        w, h = attr_number(attrs, "level0_width", what), attr_number(attrs, "level0_height", what)
        if not (w >= 1 and h >= 1):
            raise ClamError(f"{what}: level0 size {attrs['level0_width']!r} x {attrs['level0_height']!r} "
                            "is not a size in pixels")
        dim = (math.ceil(w / ds), math.ceil(h / ds))
    return LevelAttrs(int(size), (ds, ds), None, dim)


# --- the encoder ---------------------------------------------------------------------------
def encoder_attr(dset: h5py.Dataset) -> str | None:
    """The patch encoder a features dataset names in its `encoder` attribute, or None."""
    value = plain(dset.attrs.get("encoder"))
    # TRIDENT writes None as the string 'None' (IO.save_h5)
    return str(value) if value not in (None, "", "None") else None


def folder_encoder(folder: Path | None) -> str | None:
    """The encoder a `features_<enc>/` folder is named after, or None."""
    if folder is None or not folder.name.startswith(FEATURES_PREFIX):
        return None
    return folder.name[len(FEATURES_PREFIX):] or None


# --- the grid ------------------------------------------------------------------------------
def grid_cells(coords: np.ndarray, step: np.ndarray, what: str) -> np.ndarray:
    """[M, 2] int64 (col, row) of corners on a grid of `step` from (0, 0) (1 px tolerance);
    ClamError for a corner off the grid or two patches in one cell."""
    cells = np.rint(coords / step[None, :]).astype(np.int64)
    off = np.abs(coords - cells * step[None, :])
    bad = (off > 1).any(axis=1)
    if bad.any():
        row = int(np.argmax(bad))
        raise ClamError(f"{what}: patch {row} at {coords[row].tolist()} is not on TRIDENT's grid "
                        f"(multiples of {step_px(step)} px from (0, 0))")
    _check_unique_cells(cells, coords, what)
    return cells


def _check_unique_cells(cells: np.ndarray, coords: np.ndarray, what: str) -> None:
    """ClamError naming the first two patches that share a grid cell."""
    order = np.lexsort((cells[:, 1], cells[:, 0]))
    same = np.all(cells[order[1:]] == cells[order[:-1]], axis=1)
    if same.any():
        k = int(np.argmax(same))
        i, j = sorted((int(order[k]), int(order[k + 1])))
        raise ClamError(f"{what}: patches {i} and {j} are both at {coords[i].tolist()} (duplicate coords)")


def step_px(step: np.ndarray) -> str:
    """A [2] grid step for a message: `512`, or `512x513` when the axes differ."""
    step = np.asarray(step)
    return f"{int(step[0])}" if step[0] == step[1] else f"{int(step[0])}x{int(step[1])}"
