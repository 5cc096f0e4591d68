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
    "read_coords",
    "write_coords",
    "find_coords_dir",
    "read_feature_files",
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


def read_coords(path: Path) -> CoordsFile:
    """Read a CLAM coordinates file (`patches/<slide_id>.h5`, dataset `coords`)."""
    try:
        with h5py.File(path, "r") as f:
            if "coords" not in f:
                raise ClamError(f"{path.name}: no 'coords' dataset")
            dset = f["coords"]
            coords = dset[()]
            attrs = _h5_attrs(dset, f)
    except ClamError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise ClamError(f"{path.name}: unreadable or truncated h5 ({_short(exc)})") from None
    return CoordsFile(_check_coords(np.asarray(coords), f"{path.name} coords"), attrs)


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
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


def find_coords_dir(path: Path) -> Path:
    """A coords DIR may be CLAM's save dir (holding `patches/`) or `patches/` itself."""
    path = Path(path)
    if (path / "patches").is_dir():
        return path / "patches"
    if path.is_dir():
        return path
    raise ClamError(f"coords directory {path} does not exist")


def _index_dir(folder: Path, suffix: str) -> tuple[dict[str, Path], list[tuple[str, str]]]:
    """Map slide id -> file; report ids that only differ in case (duplicates on many FS)."""
    files: dict[str, Path] = {}
    seen: dict[str, str] = {}
    duplicates: list[tuple[str, str]] = []
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.suffix.lower() != suffix:
            continue
        sid = p.stem
        key = sid.casefold().strip()
        if key in seen:
            duplicates.append((sid, f"duplicate slide id: {p.name} and {seen[key]} in {folder}"))
            continue
        seen[key] = p.name
        files[sid] = p
    return files, duplicates


@dataclass
class FeatureDir:
    """A CLAM feature-extraction output: `pt_files/` and/or `h5_files/`.

    `root` may be the extraction root or either sub-folder; features come from `.pt` when
    present (faster), the `.h5` copy is used for its coordinates (and features otherwise).
    """

    root: Path
    pt_dir: Path | None
    h5_dir: Path | None
    pt: dict[str, Path]
    h5: dict[str, Path]
    duplicates: list[tuple[str, str]]

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
        pt, dup_pt = _index_dir(pt_dir, ".pt") if pt_dir else ({}, [])
        h5, dup_h5 = _index_dir(h5_dir, ".h5") if h5_dir else ({}, [])
        return cls(root, pt_dir, h5_dir, pt, h5, dup_pt + dup_h5)

    @property
    def slide_ids(self) -> set[str]:
        return set(self.pt) | set(self.h5)

    def sources(self, slide_id: str) -> list[Path]:
        return [p for p in (self.pt.get(slide_id), self.h5.get(slide_id)) if p is not None]

    def peek_dim(self, slide_id: str) -> int | None:
        """Feature dim without reading the data (None when unreadable)."""
        try:
            if slide_id in self.h5:
                with h5py.File(self.h5[slide_id], "r") as f:
                    return int(f["features"].shape[-1])
            t = torch.load(self.pt[slide_id], map_location="cpu", mmap=True, weights_only=True)
            return int(t.shape[-1]) if isinstance(t, torch.Tensor) and t.ndim >= 1 else None
        except Exception:  # noqa: BLE001 - a peek; the real read reports the reason
            return None

    def read(self, slide_id: str) -> tuple[np.ndarray, np.ndarray | None]:
        """Features [N, D] and the h5 copy's coords [N, 2] (None without an h5 copy)."""
        return read_feature_files(self.pt.get(slide_id), self.h5.get(slide_id))


def read_feature_files(pt: Path | None, h5: Path | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Features [N, D] (from `pt` when given, else `h5`) and the h5 copy's coords or None."""
    if pt is None and h5 is None:
        raise ClamError("no feature file")
    h5_features, h5_coords = _read_h5_features(h5, need=pt is None) if h5 is not None else (None, None)
    features = _read_pt(pt) if pt is not None else h5_features
    assert features is not None
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
    if path.stat().st_size == 0:
        raise ClamError(f"{path.name}: empty file (0 bytes)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ClamError(f"{path.name}: unreadable or truncated .pt ({_short(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - pickle errors come in many types
        raise ClamError(f"{path.name}: unreadable .pt ({type(exc).__name__}: {_short(exc)})") from None
    if not isinstance(obj, torch.Tensor):
        raise ClamError(f"{path.name}: holds a {type(obj).__name__}, expected a tensor [N, D]")
    if obj.dtype == torch.bfloat16:
        obj = obj.float()
    return _check_features(obj.numpy(), path.name)


def _read_h5_features(path: Path, need: bool) -> tuple[np.ndarray | None, np.ndarray | None]:
    if path.stat().st_size == 0:
        raise ClamError(f"{path.name}: empty file (0 bytes)")
    try:
        with h5py.File(path, "r") as f:
            coords = f["coords"][()] if "coords" in f else None
            if need and "features" not in f:
                raise ClamError(f"{path.name}: no 'features' dataset")
            features = f["features"][()] if need else None
    except ClamError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise ClamError(f"{path.name}: unreadable or truncated h5 ({_short(exc)})") from None
    if features is not None:
        features = _check_features(np.asarray(features), path.name)
    if coords is not None:
        coords = _check_coords(np.asarray(coords), f"{path.name} coords")
    return features, coords
