"""Reading TRIDENT's per-slide outputs: one slide's features and coords at one magnification.

TRIDENT (mahmoodlab/TRIDENT) patches at a magnification, not a pyramid level: a run with
``--mag 5 --patch_size 256`` writes ``5x_256px_0px_overlap/patches/<slide>_patches.h5`` (int64
``coords`` [N, 2], level-0 top-left corners, its attributes on the dataset) and
``5x_256px_0px_overlap/features_<enc>/<slide>.h5`` (``features`` [N, D] plus a verbatim copy of
``coords`` and its attributes). A DSCA user runs it twice in one job dir (e.g. 5x and 20x, both
256 px).

The TRIDENT support is four modules, all importable from here:

* :mod:`dsca.store.trident_attrs` - the coords attributes -> level-0 grid, encoder, file labels;
* :mod:`dsca.store.trident_dirs` - folder discovery (:class:`TridentDir`, :func:`looks_like_trident`);
* this module - :func:`read_trident_level`, one slide at one magnification;
* :mod:`dsca.store.trident_blocks` - :func:`assemble_blocks`, the 4x4 block of x20 tiles of
  each x5 patch.

Every reader raises :class:`~dsca.store.errors.ClamError` with a one-line reason naming the
file. Every file is read once (the shared reader in `dsca.store._io`), which gives its
provenance record.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dsca.store._io import first_difference, h5_dataset, load_pt, read_h5
from dsca.store.clam import CoordsFile, check_coords
from dsca.store.errors import ClamError
from dsca.store.level_attrs import LevelAttrs
from dsca.store.provenance import SourceRecord
from dsca.store.trident_attrs import (
    coords_attrs,
    encoder_attr,
    folder_encoder,
    grid_cells,
    is_trident_attrs,
    trident_label,
    trident_level,
)
from dsca.store.trident_blocks import Blocks, assemble_blocks
from dsca.store.trident_dirs import TridentDir, looks_like_trident

__all__ = [
    "Blocks",
    "TridentDir",
    "TridentLevel",
    "assemble_blocks",
    "is_trident_attrs",
    "looks_like_trident",
    "read_trident_level",
    "trident_label",
    "trident_level",
]


@dataclass(frozen=True)
class TridentLevel:
    """One slide's patches at one magnification.

    Attributes:
        features: [M, D] floating point (float16 widened to float32), rows in `coords` order.
        coords: [M, 2] int64 level-0 (x, y) top-left corners, validated against `level` and
            on TRIDENT's grid (multiples of `level.step` from (0, 0)), no two alike.
        level: the grid (patch size at the target magnification, level-0 downsample, extent).
        attrs: the `coords` attributes the level was derived from.
        encoder: the patch encoder (features attribute, else folder name), or None.
        sources: provenance of the files read, features file first.
        path: the features file, for messages.
    """

    features: np.ndarray
    coords: np.ndarray
    level: LevelAttrs
    attrs: Mapping[str, Any]
    encoder: str | None
    sources: list[SourceRecord]
    path: Path

    @property
    def label(self) -> str:
        return trident_label(self.path)

    @property
    def step(self) -> np.ndarray:
        """[2] int64 level-0 grid step."""
        return self.level.step

    def coords_file(self) -> CoordsFile:
        """The coords as a :class:`~dsca.store.clam.CoordsFile` (for code written for CLAM)."""
        return CoordsFile(self.coords, dict(self.attrs), self.level, self.sources[-1] if self.sources else None)


def _read_coords_h5(path: Path) -> tuple[np.ndarray, dict[str, Any], SourceRecord]:
    """(coords [M, 2], their attributes, record) of a `patches/<slide>_patches.h5`."""
    with read_h5(path, trident_label) as (f, source):
        dset = h5_dataset(f, "coords", path, trident_label)
        return np.asarray(dset[()]), coords_attrs(dset), source


def _read_features_h5(path: Path) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any], str | None, SourceRecord]:
    """(features [M, D], coords copy or None, its attributes, encoder, record) of a features `.h5`."""
    with read_h5(path, trident_label) as (f, source):
        dset = h5_dataset(f, "features", path, trident_label)
        features, encoder = np.asarray(dset[()]), encoder_attr(dset)
        coords_dset = h5_dataset(f, "coords", path, trident_label, required=False)
        if coords_dset is None:
            return features, None, {}, encoder, source
        return features, np.asarray(coords_dset[()]), coords_attrs(coords_dset), encoder, source


def read_trident_level(features_file: Path, coords_file: Path | None = None) -> TridentLevel:
    """Read one slide's TRIDENT features at one magnification.

    Args:
        features_file: `features_<enc>/<slide>.h5` (datasets `features` [M, D] and `coords`
            [M, 2] with a copy of the coords attributes) or `.pt` (an array [M, D], no coords).
        coords_file: `patches/<slide>_patches.h5`; required for a `.pt`. With an `.h5` its coords
            must equal the features file's copy (same rows, same order, same grid).

    Returns:
        The level; coords and attributes from the features file when it has them.
    """
    features_file = Path(features_file)
    label = trident_label(features_file)
    sources: list[SourceRecord] = []
    encoder = folder_encoder(features_file.parent)
    if features_file.suffix.lower() == ".pt":
        if coords_file is None:
            raise ClamError(f"{label} holds no coords: its patches/<slide>_patches.h5 is needed")
        features, source = load_pt(features_file, trident_label)
        coords, attrs = None, {}
    else:
        features, coords, attrs, enc_attr, source = _read_features_h5(features_file)
        encoder = enc_attr or encoder
    sources.append(source)
    if features.shape[0] == 0 or features.size == 0 or (coords is not None and coords.size == 0):
        raise ClamError(f"{label}: no patches (TRIDENT found no tissue patch; shape {tuple(features.shape)})")
    if features.ndim != 2:
        raise ClamError(f"{label}: features have shape {tuple(features.shape)}, expected [N, D]")
    if not np.issubdtype(features.dtype, np.floating):
        raise ClamError(f"{label}: features have dtype {features.dtype}, expected floating point")
    if features.dtype == np.float16:
        features = features.astype(np.float32)

    if coords_file is not None:
        coords_file = Path(coords_file)
        file_coords, file_attrs, file_source = _read_coords_h5(coords_file)
        sources.append(file_source)
        if file_coords.size == 0:
            raise ClamError(f"{trident_label(coords_file)}: no patches (TRIDENT found no tissue patch)")
        if coords is None:
            coords, attrs = file_coords, file_attrs
        else:
            a, b = np.asarray(coords), np.asarray(file_coords)
            if a.shape != b.shape or not np.array_equal(a, b):
                raise ClamError(f"{label} coords disagree with {trident_label(coords_file)} "
                                f"({first_difference(a, b, 'patch')}): the coords were re-made after the features")
            if not is_trident_attrs(attrs):
                attrs = file_attrs  # a features file without the attrs copy: the coords file has them
            elif is_trident_attrs(file_attrs) and trident_level(attrs, label) != trident_level(
                    file_attrs, trident_label(coords_file)):
                raise ClamError(f"{label} and {trident_label(coords_file)} describe different grids "
                                "(patch_size / magnification attributes differ)")
    if coords is None:
        raise ClamError(f"{label} has no 'coords' dataset and no coords file was given")
    if not is_trident_attrs(attrs) and "patch_level" in attrs:
        raise ClamError(f"{label}: coords carry CLAM attributes (patch_level): these features were "
                        "extracted on CLAM coords, read them as CLAM")
    level = trident_level(attrs, label)
    coords = check_coords(np.asarray(coords), f"{label} coords", level)
    if coords.shape[0] != features.shape[0]:
        raise ClamError(f"{label} has {features.shape[0]} feature rows but {coords.shape[0]} coords")
    grid_cells(coords, level.step, f"{label} coords")
    return TridentLevel(features, coords, level, attrs, encoder, sources, features_file)

