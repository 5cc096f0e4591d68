"""Readers for CLAM's per-slide outputs (coordinates `.h5`, `pt_files/`, `h5_files/`).

Every reader raises :class:`ClamError` with a one-line, user-facing reason; the caller adds
the slide id. The level attributes of a coords file (patch size, level, downsample) are
:mod:`dsca.store.level_attrs`'s, re-exported here. Slide ids are file stems. Each file is read once into memory: its bytes give the
provenance record (:mod:`dsca.store.provenance`), the zip checksums of a `.pt` and the parsed
arrays, so nothing is read twice and nothing unchecked is packed.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from dsca.atomic import atomic_path
from dsca.store._io import ZIP_MAGIC, h5_dataset, load_pt, plain, read_h5
from dsca.store.errors import ClamError
from dsca.store.level_attrs import LevelAttrs, level_attrs, parse_level_attrs
from dsca.store.provenance import SourceRecord

__all__ = [
    "ClamError",
    "CoordsFile",
    "FeatureDir",
    "FeatureFile",
    "LevelAttrs",
    "index_dir",
    "parse_level_attrs",
    "peek_shape",
    "read_coords",
    "write_coords",
    "find_coords_dir",
    "read_feature_files",
    "file_label",
]

log = logging.getLogger(__name__)

# No scanner writes a level-0 image 2^31 px wide (that is ~50 m at 0.25 um/px); beyond it
# int32 grids overflow, so a larger coordinate is corruption, not a slide.
MAX_COORD = 2**31 - 1


def file_label(path: Path) -> str:
    """`folder/file` of an input file: enough to find it, short enough for a one-line message."""
    return f"{path.parent.name}/{path.name}"



# --- coordinates ---------------------------------------------------------------------------
@dataclass(frozen=True)
class CoordsFile:
    """One CLAM coordinates file.

    Attributes:
        coords: [N, 2] int64 level-0 (x, y) of each patch's top-left corner, validated: finite,
            non-negative, inside the slide when the file records its size.
        attrs: the `coords` dataset's attributes as written.
        level: the validated level attributes.
        source: what was read (None for coordinates not read from a file).
    """

    coords: np.ndarray
    attrs: Mapping[str, Any] = field(default_factory=dict)
    level: LevelAttrs = LevelAttrs(256, (1.0, 1.0))
    source: SourceRecord | None = None

    @property
    def patch_size(self) -> int:
        return self.level.patch_size

    @property
    def patch_level(self) -> int | None:
        return self.level.patch_level

    @property
    def downsample(self) -> np.ndarray:
        """[2] float64 per-axis downsample of the patch level."""
        return np.asarray(self.level.downsample, dtype=np.float64)

    @property
    def step(self) -> np.ndarray:
        return self.level.step


def _h5_attrs(dset: h5py.Dataset, f: h5py.File) -> dict[str, Any]:
    # CLAM puts the attrs on the dataset; some forks put them on the file.
    attrs = {k: plain(v) for k, v in f.attrs.items()}
    attrs.update({k: plain(v) for k, v in dset.attrs.items()})
    return attrs


def check_coords(coords: np.ndarray, what: str, level: LevelAttrs | None = None) -> np.ndarray:
    """[N, 2] level-0 corners as int64, or ClamError naming the first bad patch."""
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ClamError(f"{what} has shape {coords.shape}, expected [N, 2]")
    if coords.shape[0] == 0:
        raise ClamError(f"{what} is empty (0 patches)")
    if not (np.issubdtype(coords.dtype, np.integer) or np.issubdtype(coords.dtype, np.floating)):
        raise ClamError(f"{what} has dtype {coords.dtype}, expected integers")
    values = coords.astype(np.float64)
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        raise ClamError(f"{what} contain NaN/Inf (first at row {int(np.argmax(bad))})")
    for mask, why in ((values < 0, "negative"), (values > MAX_COORD, "beyond 2^31 px")):
        rows = mask.any(axis=1)
        if rows.any():
            row = int(np.argmax(rows))
            raise ClamError(f"{what}: patch {row} at {values[row].tolist()} is {why}")
    extent = level.extent if level is not None else None
    if extent is not None:
        outside = (values >= extent[None, :]).any(axis=1)
        if outside.any():
            row = int(np.argmax(outside))
            raise ClamError(f"{what}: patch {row} at {values[row].astype(np.int64).tolist()} lies outside the "
                            f"slide ({int(extent[0])} x {int(extent[1])} px at level 0, from level_dim x downsample)")
    return np.rint(values).astype(np.int64)


def read_coords(path: Path, given: Mapping[str, Any] | None = None) -> CoordsFile:
    """Read a CLAM coordinates file (`patches/<slide_id>.h5`, dataset `coords`).

    Args:
        path: the file.
        given: level attributes for files that lack them (see :func:`parse_level_attrs`);
            a file's own attributes win, and a conflict with `given` is an error.
    """
    with read_h5(path, file_label) as (f, source):
        dset = h5_dataset(f, "coords", path, file_label)
        coords = np.asarray(dset[()])
        attrs = _h5_attrs(dset, f)
    level = level_attrs(attrs, given or {}, file_label(path))
    return CoordsFile(check_coords(coords, f"{file_label(path)} coords", level), attrs, level, source)


def write_coords(path: Path, coords: np.ndarray, attrs: Mapping[str, Any]) -> None:
    """Write a coordinates file in CLAM's layout (int64 `coords` [N,2] with its attrs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        dset = f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64))
        for key, value in attrs.items():
            dset.attrs[key] = value


# --- directories ---------------------------------------------------------------------------
def find_coords_dir(path: Path) -> Path:
    """A coords DIR may be CLAM's save dir (holding `patches/`) or `patches/` itself."""
    path = Path(path)
    if (path / "patches").is_dir():
        return path / "patches"
    if path.is_dir():
        return path
    raise ClamError(f"coords directory {path} does not exist")


def index_dir(folder: Path, suffix: str) -> dict[str, list[Path]]:
    """slide id (file stem) -> its files in `folder` with `suffix` (any case).

    Every entry counts, also broken links and non-files, so that the reader can say why it
    cannot use them; more than one file per id (`A.pt`, `A.PT`) is a duplicate. macOS's
    AppleDouble shadows (`._A.pt`) are not slides.
    """
    files: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        # `._X.pt`: the AppleDouble shadow that macOS copies next to every file on foreign disks
        if p.suffix.lower() == suffix and not p.name.startswith("._"):
            files.setdefault(p.stem, []).append(p)
    return files


@dataclass
class FeatureDir:
    """A CLAM feature-extraction output: `pt_files/` and/or `h5_files/`.

    `root` may be the extraction root or either sub-folder; features come from `.pt` when
    present (faster), the `.h5` copy is used for its coordinates and compared with the `.pt`.
    """

    root: Path
    pt_dir: Path | None
    h5_dir: Path | None
    pt: dict[str, list[Path]]
    h5: dict[str, list[Path]]

    @classmethod
    def open(cls, path: str | Path) -> FeatureDir:
        root = Path(path)
        if not root.is_dir():
            raise ClamError(f"feature directory {root} does not exist")
        if root.name in ("pt_files", "h5_files"):
            pt_dir = root if root.name == "pt_files" else None
            h5_dir = root if root.name == "h5_files" else None
            sibling = root.parent / ("h5_files" if pt_dir else "pt_files")
            # The sibling is still used when the user pointed at one of the two.
            if sibling.is_dir():
                pt_dir, h5_dir = pt_dir or sibling, h5_dir or sibling
        else:
            pt_dir = root / "pt_files" if (root / "pt_files").is_dir() else None
            h5_dir = root / "h5_files" if (root / "h5_files").is_dir() else None
        if pt_dir is None and h5_dir is None:
            raise ClamError(f"{root}: neither pt_files/ nor h5_files/ found")
        pt = index_dir(pt_dir, ".pt") if pt_dir else {}
        h5 = index_dir(h5_dir, ".h5") if h5_dir else {}
        return cls(root, pt_dir, h5_dir, pt, h5)

    @property
    def slide_ids(self) -> set[str]:
        return set(self.pt) | set(self.h5)

    def files(self, slide_id: str) -> tuple[Path | None, Path | None]:
        """(pt, h5) of a slide; None where absent (the caller reports duplicates first)."""
        pt, h5 = self.pt.get(slide_id), self.h5.get(slide_id)
        return (pt[0] if pt else None), (h5[0] if h5 else None)

    def peek_shape(self, slide_id: str) -> tuple[int, ...] | None:
        """Shape of the features that would be read (see :func:`peek_shape`)."""
        return peek_shape(*self.files(slide_id))


def peek_shape(pt: Path | None, h5: Path | None) -> tuple[int, ...] | None:
    """Shape of the features in `pt` (else `h5`), without reading their values when the format
    allows (zip `.pt`, `.h5`); a legacy `.pt` is loaded whole. None when unreadable (the real
    read then reports why)."""
    try:
        if pt is not None and pt.is_file():  # never open a FIFO or a device: it may block forever
            with open(pt, "rb") as f:
                zipped = f.read(4) == ZIP_MAGIC
            # mmap reads only the header, but exists for the zip format alone
            t = torch.load(pt, map_location="cpu", mmap=zipped, weights_only=True)
            return tuple(t.shape) if isinstance(t, torch.Tensor) else None
        if h5 is not None and h5.is_file():
            with h5py.File(h5, "r") as f:
                return tuple(f["features"].shape)
    except Exception:  # noqa: BLE001 - a peek; the real read reports the reason
        return None
    return None


# --- features ------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureFile:
    """The features of one slide at one level.

    Attributes:
        features: [N, D] floating point, from the `.pt` when there is one, else the `.h5`.
        coords: [N, 2] int64 of the `.h5` copy, or None.
        pt, h5: the source records of the files read.
    """

    features: np.ndarray
    coords: np.ndarray | None
    pt: SourceRecord | None
    h5: SourceRecord | None


def read_feature_files(pt: Path | None, h5: Path | None) -> FeatureFile:
    """Read a slide's features; when both copies exist they must hold the same values.

    CLAM writes `pt_files/` and `h5_files/` from one pass, so copies that differ come from two
    extraction runs (e.g. a re-extraction that replaced one folder only) and neither can be
    trusted to match the coordinates.
    """
    if pt is None and h5 is None:
        raise ClamError("no feature file")
    h5_features = h5_coords = h5_source = pt_source = None
    if h5 is not None:
        h5_features, h5_coords, h5_source = _read_h5_features(h5)
    if pt is None:
        return FeatureFile(h5_features, h5_coords, None, h5_source)
    features, pt_source = _read_pt(pt)
    if h5_features is not None:
        if features.shape != h5_features.shape:
            raise ClamError(f"{file_label(pt)} is {list(features.shape)} but {file_label(h5)} holds features "
                            f"{list(h5_features.shape)}: the two copies differ")
        a, b = (features, h5_features.astype(features.dtype)) if features.dtype.itemsize <= h5_features.dtype.itemsize \
            else (features.astype(h5_features.dtype), h5_features)
        if not np.array_equal(a, b, equal_nan=True):
            row = int(np.argmax(np.any(a != b, axis=1)))
            raise ClamError(f"{file_label(pt)} and {file_label(h5)} hold different feature values (first at "
                            f"row {row}): the two copies differ, re-extract or remove one")
    return FeatureFile(features, h5_coords, pt_source, h5_source)


def _check_feature_array(x: np.ndarray, what: str) -> np.ndarray:
    if x.ndim != 2:
        raise ClamError(f"{what} has shape {tuple(x.shape)}, expected [N, D]")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ClamError(f"{what} is empty (shape {tuple(x.shape)})")
    if not np.issubdtype(x.dtype, np.floating):
        raise ClamError(f"{what} has dtype {x.dtype}, expected floating point")
    return x


def _read_pt(path: Path) -> tuple[np.ndarray, SourceRecord]:
    x, source = load_pt(path, file_label)
    return _check_feature_array(x, file_label(path)), source


def _read_h5_features(path: Path) -> tuple[np.ndarray, np.ndarray | None, SourceRecord]:
    """(features [N, D], coords [N, 2] or None, record) of an `h5_files/` file."""
    with read_h5(path, file_label) as (f, source):
        dset = h5_dataset(f, "features", path, file_label)
        coords_dset = h5_dataset(f, "coords", path, file_label, required=False)
        coords = coords_dset[()] if coords_dset is not None else None
        features = dset[()]
    features = _check_feature_array(np.asarray(features), file_label(path))
    if coords is not None:
        coords = check_coords(np.asarray(coords), f"{file_label(path)} coords")
    return features, coords, source
