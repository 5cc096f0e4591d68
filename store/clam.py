"""Readers for CLAM's per-slide outputs (coordinates `.h5`, `pt_files/`, `h5_files/`).

Every reader raises :class:`ClamError` with a one-line, user-facing reason; the caller adds
the slide id. Slide ids are file stems.
"""
from __future__ import annotations

import logging
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

__all__ = [
    "ClamError",
    "CoordsFile",
    "FeatureDir",
    "index_dir",
    "read_coords",
    "write_coords",
    "find_coords_dir",
    "read_feature_files",
    "where",
]

log = logging.getLogger(__name__)


class ClamError(Exception):
    """A CLAM input file that cannot be used; the message is the one-line reason."""


@dataclass(frozen=True)
class CoordsFile:
    """One CLAM coordinates file.

    Attributes:
        coords: [N, 2] int64 level-0 (x, y) of each patch's top-left corner.
        attrs: the `coords` dataset's attributes (patch_size, patch_level, downsample, ...).
    """

    coords: np.ndarray
    attrs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def patch_size(self) -> int:
        return int(np.asarray(self.attrs.get("patch_size", 256)).reshape(-1)[0])

    @property
    def patch_level(self) -> int | None:
        level = self.attrs.get("patch_level")
        return None if level is None else int(level)

    @property
    def downsample(self) -> np.ndarray:
        """[2] float64 per-axis downsample of the patch level (1, 1 when unknown)."""
        ds = np.asarray(self.attrs.get("downsample", (1.0, 1.0)), dtype=np.float64).reshape(-1)
        return np.broadcast_to(ds, (2,)).copy() if ds.size in (1, 2) else np.ones(2)

    @property
    def step(self) -> np.ndarray:
        """[2] int64 level-0 size of one patch, as CLAM steps its grid (int(size * ds))."""
        return (self.patch_size * self.downsample).astype(np.int64)


def _h5_attrs(dset: h5py.Dataset, f: h5py.File) -> dict[str, Any]:
    # CLAM puts the attrs on the dataset; some forks put them on the file.
    attrs = {k: _plain(v) for k, v in f.attrs.items()}
    attrs.update({k: _plain(v) for k, v in dset.attrs.items()})
    return attrs


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def _check_coords(coords: np.ndarray, what: str) -> np.ndarray:
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ClamError(f"{what} has shape {coords.shape}, expected [N, 2]")
    if coords.shape[0] == 0:
        raise ClamError(f"{what} is empty (0 patches)")
    if not np.issubdtype(coords.dtype, np.integer):
        if not np.all(np.isfinite(coords)):
            raise ClamError(f"{what} contains NaN/Inf")
        coords = np.rint(coords)
    return coords.astype(np.int64)


def where(path: Path) -> str:
    """`folder/file` of a CLAM file: enough to find it, short enough for a one-line message."""
    return f"{path.parent.name}/{path.name}"


def _check_file(path: Path) -> None:
    # a dangling link (cohort moved) or a folder named like a slide must be reported, not skipped
    if not path.is_file():
        kind = "broken symbolic link" if path.is_symlink() else "not a regular file"
        raise ClamError(f"{where(path)}: unreadable ({kind})")
    if path.stat().st_size == 0:
        raise ClamError(f"{where(path)}: empty file (0 bytes)")


def read_coords(path: Path) -> CoordsFile:
    """Read a CLAM coordinates file (`patches/<slide_id>.h5`, dataset `coords`)."""
    _check_file(path)
    try:
        with h5py.File(path, "r") as f:
            if "coords" not in f:
                raise ClamError(f"{where(path)}: no 'coords' dataset")
            dset = f["coords"]
            coords = dset[()]
            attrs = _h5_attrs(dset, f)
    except ClamError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise ClamError(f"{where(path)}: unreadable or truncated h5 ({_short(exc)})") from None
    return CoordsFile(_check_coords(np.asarray(coords), f"{where(path)} coords"), attrs)


def write_coords(path: Path, coords: np.ndarray, attrs: Mapping[str, Any]) -> None:
    """Write a coordinates file in CLAM's layout (int64 `coords` [N,2] with its attrs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        dset = f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64))
        for key, value in attrs.items():
            dset.attrs[key] = value
    tmp.replace(path)


def _short(exc: BaseException) -> str:
    """First sentence of an exception message: torch and h5py append paragraphs of advice."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    text = text.split(". ")[0].rstrip(".")
    return text if len(text) <= 120 else text[:117] + "..."


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
    cannot use them; more than one file per id (`A.pt`, `A.PT`) is a duplicate.
    """
    files: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() == suffix:
            files.setdefault(p.stem, []).append(p)
    return files


@dataclass
class FeatureDir:
    """A CLAM feature-extraction output: `pt_files/` and/or `h5_files/`.

    `root` may be the extraction root or either sub-folder; features come from `.pt` when
    present (faster), the `.h5` copy is used for its coordinates (and features otherwise).
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

    def peek_dim(self, slide_id: str) -> int | None:
        """Feature dim without reading the data (None when unreadable)."""
        pt, h5 = self.files(slide_id)
        try:
            if pt is not None:  # the copy that is read; mmap reads only the header
                t = torch.load(pt, map_location="cpu", mmap=True, weights_only=True)
                return int(t.shape[-1]) if isinstance(t, torch.Tensor) and t.ndim >= 1 else None
            with h5py.File(h5, "r") as f:
                return int(f["features"].shape[-1])
        except Exception:  # noqa: BLE001 - a peek; the real read reports the reason
            return None


def read_feature_files(pt: Path | None, h5: Path | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Features [N, D] (from `pt` when given, else `h5`) and the h5 copy's coords or None."""
    if pt is None and h5 is None:
        raise ClamError("no feature file")
    if h5 is None:
        return _read_pt(pt), None
    h5_features, h5_shape, h5_coords = _read_h5_features(h5, need=pt is None)
    if pt is None:
        return h5_features, h5_coords
    features = _read_pt(pt)
    # CLAM writes both copies from one pass; differing shapes mean they come from different runs
    if tuple(features.shape) != h5_shape:
        raise ClamError(f"{where(pt)} is {list(features.shape)} but {where(h5)} holds features "
                        f"{list(h5_shape)}: the two copies differ")
    return features, h5_coords


def _check_features(x: np.ndarray, what: str) -> np.ndarray:
    if x.ndim != 2:
        raise ClamError(f"{what} has shape {tuple(x.shape)}, expected [N, D]")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ClamError(f"{what} is empty (shape {tuple(x.shape)})")
    if not np.issubdtype(x.dtype, np.floating):
        raise ClamError(f"{what} has dtype {x.dtype}, expected floating point")
    return x


def _read_pt(path: Path) -> np.ndarray:
    _check_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ClamError(f"{where(path)}: unreadable or truncated .pt ({_short(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - pickle errors come in many types
        raise ClamError(f"{where(path)}: unreadable .pt ({type(exc).__name__}: {_short(exc)})") from None
    if not isinstance(obj, torch.Tensor):
        raise ClamError(f"{where(path)}: holds a {type(obj).__name__}, expected a tensor [N, D]")
    if obj.dtype == torch.bfloat16:
        obj = obj.float()
    return _check_features(obj.numpy(), where(path))


def _read_h5_features(path: Path, need: bool) -> tuple[np.ndarray | None, tuple[int, ...], np.ndarray | None]:
    """(features if `need`, the features' shape, coords or None) of an `h5_files/` file."""
    _check_file(path)
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f:
                raise ClamError(f"{where(path)}: no 'features' dataset")
            coords = f["coords"][()] if "coords" in f else None
            shape = tuple(f["features"].shape)
            features = f["features"][()] if need else None
    except ClamError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise ClamError(f"{where(path)}: unreadable or truncated h5 ({_short(exc)})") from None
    if features is not None:
        features = _check_features(np.asarray(features), where(path))
    if coords is not None:
        coords = _check_coords(np.asarray(coords), f"{where(path)} coords")
    return features, shape, coords
