"""Readers for TRIDENT's per-slide outputs, and the 4x4 block assembly of its two grids.

TRIDENT (mahmoodlab/TRIDENT) patches at a magnification, not a pyramid level: a run with
``--mag 5 --patch_size 256`` writes ``5x_256px_0px_overlap/patches/<slide>_patches.h5`` (int64
``coords`` [N, 2], level-0 top-left corners, its attributes on the dataset) and
``5x_256px_0px_overlap/features_<enc>/<slide>.h5`` (``features`` [N, D] plus a verbatim copy of
``coords`` and its attributes). A DSCA user runs it twice in one job dir (e.g. 5x and 20x, both
256 px). The two grids start at (0, 0) and are tissue-filtered independently, so a 5x patch may
lack some of its 16 20x tiles and neither file orders its rows like the other:
:func:`assemble_blocks` pairs them by grid cell and keeps the 5x patches whose 4x4 block is
complete, in the block-major order of ``dsca-store/1`` (row ``16*i + 4*r + c`` = sub-tile
(col c, row r) at level-0 offset ``(c, r) * step20``).

Every reader raises :class:`~dsca.store.clam.ClamError` with a one-line reason naming the file.
Every file is read once (the shared reader in `dsca.store._io`), which gives its provenance record.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dsca.store._layout import BLOCK, SCALE
from dsca.store._io import ClamError, check_h5_stored, first_difference, load_pt, plain, read_bytes, short_reason
from dsca.store.clam import CoordsFile, LevelAttrs, check_coords, index_dir
from dsca.store.provenance import SourceRecord

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

log = logging.getLogger(__name__)

#: attributes TRIDENT itself uses to tell its coords from CLAM's (WSI.py, `_load_coords`)
TRIDENT_KEYS = ("patch_size", "level0_magnification", "target_magnification")
#: attributes :func:`trident_level` needs; TRIDENT has written all five since its first release
REQUIRED_KEYS = ("patch_size", "patch_size_level0", "level0_magnification", "target_magnification", "overlap")
LOCK_REASON = "TRIDENT is still writing it (lock file)"
_FEATURES_PREFIX = "features_"
_PATCHES_SUFFIX = "_patches"
_PEEK_FILES = 3  # files looked at by looks_like_trident / the encoder peek


def trident_label(path: Path) -> str:
    """`<cdir>/<folder>/<file>`: both runs of a job have `features_<enc>/<slide>.h5`, so the
    patching folder (`5x_256px_0px_overlap`) is what tells their files apart in a message."""
    path = Path(path)
    return f"{path.parent.parent.name}/{path.parent.name}/{path.name}"


# --- attributes ----------------------------------------------------------------------------
def _attrs(dset: h5py.Dataset) -> dict[str, Any]:
    return {k: plain(v) for k, v in dset.attrs.items()}


def _num(attrs: Mapping[str, Any], key: str, what: str) -> float:
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
    size = _num(attrs, "patch_size", what)
    size_l0 = _num(attrs, "patch_size_level0", what)
    mag0 = _num(attrs, "level0_magnification", what)
    mag = _num(attrs, "target_magnification", what)
    overlap = _num(attrs, "overlap", what)
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
        w, h = _num(attrs, "level0_width", what), _num(attrs, "level0_height", what)
        if not (w >= 1 and h >= 1):
            raise ClamError(f"{what}: level0 size {attrs['level0_width']!r} x {attrs['level0_height']!r} "
                            "is not a size in pixels")
        dim = (math.ceil(w / ds), math.ceil(h / ds))
    return LevelAttrs(int(size), (ds, ds), None, dim)


# --- folders -------------------------------------------------------------------------------
def _peek_coords_attrs(path: Path) -> dict[str, Any] | None:
    """The `coords` attributes of an h5 without reading its data; None when unreadable."""
    try:
        with h5py.File(path, "r") as f:
            return _attrs(f["coords"]) if isinstance(f.get("coords"), h5py.Dataset) else None
    except Exception:  # noqa: BLE001 - a peek; the real read reports the reason
        return None


def _unlocked(files: list[Path]) -> list[Path]:
    return [p for p in files if not p.with_name(p.name + ".lock").exists()]


def _candidate_h5(path: Path) -> list[Path]:
    """Files whose coords attrs tell whether `path` is a TRIDENT folder."""
    found: list[Path] = []
    if (path / "patches").is_dir():
        found += sorted((path / "patches").glob(f"*{_PATCHES_SUFFIX}.h5"))[:_PEEK_FILES]
        for sub in sorted(path.glob(f"{_FEATURES_PREFIX}*")):
            if sub.is_dir():
                found += sorted(sub.glob("*.h5"))[:_PEEK_FILES]
    elif path.name == "patches":
        found += sorted(path.glob(f"*{_PATCHES_SUFFIX}.h5"))[:_PEEK_FILES]
    else:
        found += sorted(path.glob("*.h5"))[:_PEEK_FILES]
        if not found and path.name.startswith(_FEATURES_PREFIX) and (path.parent / "patches").is_dir():
            # a .pt-only features folder: its coords are beside it
            found += sorted((path.parent / "patches").glob(f"*{_PATCHES_SUFFIX}.h5"))[:_PEEK_FILES]
    return _unlocked(found)


def looks_like_trident(path: str | Path) -> bool:
    """Whether `path` holds TRIDENT outputs, judged by content (the folder names may be custom).

    True for a patching folder with `patches/*_patches.h5` or `features_*/*.h5`, a `patches/`
    or `features_<enc>/` folder, whose `coords` attributes pass :func:`is_trident_attrs`.
    Looks at a few files only; unreadable and lock-guarded files do not count.
    """
    path = Path(path)
    if not path.is_dir():
        return False
    for h5 in _candidate_h5(path):
        attrs = _peek_coords_attrs(h5)
        if attrs is not None and is_trident_attrs(attrs):
            return True
    return False


def _index_locks(folder: Path, strip: str = "") -> dict[str, list[Path]]:
    """slide id -> `<output>.lock` files in `folder` (output = `<slide><strip>.h5|.pt`)."""
    locks: dict[str, list[Path]] = {}
    for lock in sorted(folder.glob("*.lock")):
        out = Path(lock.name[: -len(".lock")])
        if out.suffix.lower() not in (".h5", ".pt"):
            continue
        stem = out.stem
        if strip:
            if not stem.endswith(strip):
                continue
            stem = stem[: -len(strip)]
        locks.setdefault(stem, []).append(lock)
    return locks


def _peek_encoder(files: list[Path]) -> str | None:
    for h5 in _unlocked(files)[:_PEEK_FILES]:
        try:
            with h5py.File(h5, "r") as f:
                if isinstance(f.get("features"), h5py.Dataset):
                    return _encoder_attr(f["features"])
        except Exception:  # noqa: BLE001 - a peek; the real read reports the reason
            continue
    return None


def _encoder_attr(dset: h5py.Dataset) -> str | None:
    value = plain(dset.attrs.get("encoder"))
    # TRIDENT writes None as the string 'None' (IO.save_h5)
    return str(value) if value not in (None, "", "None") else None


def _folder_encoder(folder: Path | None) -> str | None:
    if folder is None or not folder.name.startswith(_FEATURES_PREFIX):
        return None
    return folder.name[len(_FEATURES_PREFIX):] or None


@dataclass
class TridentDir:
    """One TRIDENT patching run: `<cdir>/patches/` and one `<cdir>/features_<enc>/`.

    Attributes:
        root: the patching folder (`<mag>x_<ps>px_<ov>px_overlap/` or a custom name).
        features_dir: the `features_<enc>/` folder read, or None (coords only).
        coords: slide id -> `patches/<slide>_patches.h5` files (more than one: `.h5`/`.H5`
            duplicates, reported by :meth:`files`); lock-guarded files are left out.
        features: slide id -> `features_<enc>/<slide>.h5` and `.pt` files; lock-guarded ones
            left out.
        locked: slide id -> the `.lock` files guarding its outputs (still being written, or
            left by a killed run).
        encoder: the features' `encoder` attribute when TRIDENT wrote one, else the folder
            name minus `features_`; None without a features folder.
    """

    root: Path
    features_dir: Path | None
    coords: dict[str, list[Path]]
    features: dict[str, list[Path]]
    locked: dict[str, list[Path]] = field(default_factory=dict)
    encoder: str | None = None

    looks_like_trident = staticmethod(looks_like_trident)

    @classmethod
    def open(cls, path: str | Path, require_features: bool = True) -> TridentDir:
        """Index a patching folder, its `patches/` folder or one of its `features_<enc>/` folders.

        A patching folder with several `features_*` folders is ambiguous: pass the one to use.
        With `require_features` False a folder without features is accepted (coords only).
        """
        path = Path(path)
        if not path.is_dir():
            raise ClamError(f"TRIDENT directory {path} does not exist")
        if (path / "patches").is_dir():
            root, feats = path, None
        elif path.name == "patches":
            root, feats = path.parent, None
        elif path.name.startswith("slide_" + _FEATURES_PREFIX):
            raise ClamError(f"{path} holds TRIDENT slide embeddings; pass the patch features folder "
                            f"({_FEATURES_PREFIX}<enc>/ beside it)")
        elif path.name.startswith(_FEATURES_PREFIX) or any(path.glob("*.h5")) or any(path.glob("*.pt")):
            root, feats = path.parent, path
        else:
            runs = sorted(p.name for p in path.iterdir() if (p / "patches").is_dir())
            if runs:
                raise ClamError(f"{path} is a TRIDENT job dir: pass one of its patching folders "
                                f"({', '.join(runs)}) or their features_<enc>/ folder")
            raise ClamError(f"{path}: not a TRIDENT folder (no patches/ or features_<enc>/ found)")
        if feats is None:
            options = sorted(p for p in root.glob(f"{_FEATURES_PREFIX}*") if p.is_dir())
            if len(options) > 1:
                raise ClamError(f"{root} holds several feature folders ({', '.join(p.name for p in options)}): "
                                f"pass the features_<enc>/ folder to use, e.g. {options[0]}")
            feats = options[0] if options else None
        if feats is None and require_features:
            raise ClamError(f"{root}: no features_<enc>/ folder (run TRIDENT's feat task first)")

        coords: dict[str, list[Path]] = {}
        locked: dict[str, list[Path]] = {}
        patches = root / "patches"
        if patches.is_dir():
            for stem, files in index_dir(patches, ".h5").items():
                if stem.endswith(_PATCHES_SUFFIX) and (kept := _unlocked(files)):
                    coords[stem[: -len(_PATCHES_SUFFIX)]] = kept
            for sid, locks in _index_locks(patches, _PATCHES_SUFFIX).items():
                locked.setdefault(sid, []).extend(locks)
        features: dict[str, list[Path]] = {}
        encoder = None
        if feats is not None:
            for suffix in (".h5", ".pt"):
                for stem, files in index_dir(feats, suffix).items():
                    if kept := _unlocked(files):
                        features.setdefault(stem, []).extend(kept)
            for sid, locks in _index_locks(feats).items():
                locked.setdefault(sid, []).extend(locks)
            h5s = sorted(p for files in features.values() for p in files if p.suffix.lower() == ".h5")
            encoder = _peek_encoder(h5s) or _folder_encoder(feats)
        return cls(root, feats, coords, features, locked, encoder)

    @property
    def slide_ids(self) -> set[str]:
        """Slides with features (coords too without a features folder), incl. locked ones."""
        ids = set(self.features) if self.features_dir is not None else set(self.coords)
        return ids | set(self.locked)

    def coords_file(self, slide_id: str) -> Path | None:
        """`patches/<slide>_patches.h5`, None when absent; ClamError when locked or duplicated."""
        self._check_lock(slide_id)
        files = self.coords.get(slide_id, [])
        if len(files) > 1:
            raise ClamError(f"{len(files)} coords files for one slide ({', '.join(trident_label(p) for p in files)})")
        return files[0] if files else None

    def files(self, slide_id: str) -> tuple[Path, Path | None]:
        """(features file, coords file or None) of a slide, ready for :func:`read_trident_level`.

        Raises ClamError when TRIDENT is still writing one of them (lock file), when there is no
        features file, more than one (`S.h5` and `S.pt`: two runs, remove one), or a `.pt`
        without its coords file.
        """
        self._check_lock(slide_id)
        feats = self.features.get(slide_id, [])
        if not feats:
            where = self.features_dir or self.root
            raise ClamError(f"no features file ({where.name}/{slide_id}.h5)")
        if len(feats) > 1:
            names = ", ".join(trident_label(p) for p in feats)
            raise ClamError(f"{len(feats)} features files for one slide ({names}): remove all but one")
        coords = self.coords_file(slide_id)
        if feats[0].suffix.lower() == ".pt" and coords is None:
            raise ClamError(f"{trident_label(feats[0])} holds no coords and patches/{slide_id}_patches.h5 is missing")
        return feats[0], coords

    def _check_lock(self, slide_id: str) -> None:
        locks = self.locked.get(slide_id)
        if locks:
            out = locks[0].with_name(locks[0].name[: -len(".lock")])
            raise ClamError(f"{trident_label(out)}: {LOCK_REASON}")


# --- one level -----------------------------------------------------------------------------
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


def _h5(path: Path, data: bytes) -> h5py.File:
    try:
        return h5py.File(io.BytesIO(data), "r")
    except (OSError, ValueError, RuntimeError) as exc:
        raise ClamError(f"{trident_label(path)}: unreadable or truncated h5 ({short_reason(exc)})") from None


def _dataset(f: h5py.File, name: str, path: Path, required: bool = True) -> tuple[np.ndarray, dict[str, Any]] | None:
    """(values, attrs) of dataset `name`, checked to hold what it declares; None if optional and absent."""
    dset = f.get(name)
    if not isinstance(dset, h5py.Dataset):
        if required:
            raise ClamError(f"{trident_label(path)}: no '{name}' dataset")
        return None
    check_h5_stored(dset, f"{trident_label(path)} {name}")
    return np.asarray(dset[()]), _attrs(dset)


@contextlib.contextmanager
def _h5_errors(path: Path) -> Iterator[None]:
    """h5py's many exception types for a damaged file -> one ClamError naming it."""
    try:
        yield
    except ClamError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise ClamError(f"{trident_label(path)}: unreadable or truncated h5 ({short_reason(exc)})") from None


def _read_coords_h5(path: Path) -> tuple[np.ndarray, dict[str, Any], SourceRecord]:
    data, source = read_bytes(path, trident_label)
    with _h5_errors(path), _h5(path, data) as f:
        coords, attrs = _dataset(f, "coords", path)
    return coords, attrs, source


def _read_features_h5(path: Path) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any], str | None, SourceRecord]:
    data, source = read_bytes(path, trident_label)
    with _h5_errors(path), _h5(path, data) as f:
        features, _ = _dataset(f, "features", path)
        encoder = _encoder_attr(f["features"])
        coords, attrs = _dataset(f, "coords", path, required=False) or (None, {})
    return features, coords, attrs, encoder, source


def _grid_cells(coords: np.ndarray, step: np.ndarray, what: str) -> np.ndarray:
    """[M, 2] int64 (col, row) of corners on a grid of `step` from (0, 0) (1 px tolerance);
    ClamError for a corner off the grid or two patches in one cell."""
    cells = np.rint(coords / step[None, :]).astype(np.int64)
    off = np.abs(coords - cells * step[None, :])
    bad = (off > 1).any(axis=1)
    if bad.any():
        row = int(np.argmax(bad))
        raise ClamError(f"{what}: patch {row} at {coords[row].tolist()} is not on TRIDENT's grid "
                        f"(multiples of {_px(step)} px from (0, 0))")
    _check_unique(cells, coords, what)
    return cells


def _check_unique(cells: np.ndarray, coords: np.ndarray, what: str) -> None:
    order = np.lexsort((cells[:, 1], cells[:, 0]))
    same = np.all(cells[order[1:]] == cells[order[:-1]], axis=1)
    if same.any():
        k = int(np.argmax(same))
        i, j = sorted((int(order[k]), int(order[k + 1])))
        raise ClamError(f"{what}: patches {i} and {j} are both at {coords[i].tolist()} (duplicate coords)")


def _px(step: np.ndarray) -> str:
    step = np.asarray(step)
    return f"{int(step[0])}" if step[0] == step[1] else f"{int(step[0])}x{int(step[1])}"


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
    encoder = _folder_encoder(features_file.parent)
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
    _grid_cells(coords, level.step, f"{label} coords")
    return TridentLevel(features, coords, level, attrs, encoder, sources, features_file)


# --- the two levels ------------------------------------------------------------------------
@dataclass(frozen=True)
class Blocks:
    """x5 patches and their complete 4x4 blocks of x20 tiles, in `dsca-store/1` order.

    Attributes:
        keep: [N] bool over the x5 source rows: the patches whose 16 sub-tiles all exist.
        x5: [K, D] features of the kept x5 patches, in source order.
        x5_coords: [K, 2] int64 their level-0 corners.
        x20: [16K, D] block-major: row ``16*i + 4*r + c`` is the tile at
            ``x5_coords[i] + (c, r) * step20``.
        x20_coords: [16K, 2] int64 the level-0 corners of those tiles (as the x20 file has them).
        dropped: x5 patches left out (N - K).
        unused: x20 tiles in no kept block.
        level5, level20: the grids of the two levels.
    """

    keep: np.ndarray
    x5: np.ndarray
    x5_coords: np.ndarray
    x20: np.ndarray
    x20_coords: np.ndarray
    dropped: int
    unused: int
    level5: LevelAttrs
    level20: LevelAttrs


def _sub_offsets() -> np.ndarray:
    """[16, 2] (c, r) cell offsets, row-major (r outer, c inner)."""
    r, c = np.meshgrid(np.arange(SCALE), np.arange(SCALE), indexing="ij")
    return np.stack([c.ravel(), r.ravel()], axis=1).astype(np.int64)


def assemble_blocks(low: TridentLevel, high: TridentLevel) -> Blocks:
    """Pair the x5 patches with their 4x4 x20 tiles by grid cell (any order on either side).

    Args:
        low: the x5 level, N patches, step5 = 4 x step20 (1 px tolerance).
        high: the x20 level, M tiles.

    Returns:
        The blocks of the x5 patches whose 16 tiles all exist; the others are dropped
        (counted): each TRIDENT run filters tissue on its own, so edge tiles can be missing.
    """
    what = f"({low.label}, {high.label})"
    s5, s20 = low.step, high.step
    if np.any(np.abs(s5 - SCALE * s20) > 1):
        raise ClamError(f"x5 patches are {_px(s5)} px and x20 {_px(s20)} px at level 0: need exactly {SCALE}x {what}")
    d5, d20 = low.features.shape[1], high.features.shape[1]
    if d5 != d20:
        raise ClamError(f"x5 features have {d5} dims and x20 {d20}: extracted with different encoders? {what}")
    if low.encoder and high.encoder and low.encoder != high.encoder:
        raise ClamError(f"x5 features are from encoder {low.encoder} and x20 from {high.encoder} {what}")
    high_cells = _grid_cells(high.coords, s20, f"x20 {high.label} coords")
    base = np.rint(low.coords / s20[None, :]).astype(np.int64)
    off = np.abs(low.coords - base * s20[None, :]) > 1
    if off.any():
        row = int(np.argmax(off.any(axis=1)))
        raise ClamError(f"x5 and x20 grids do not line up: x5 patch {row} at {low.coords[row].tolist()} is not a "
                        f"multiple of the x20 step {_px(s20)} px {what}")
    sub = base[:, None, :] + _sub_offsets()[None, :, :]  # [N, 16, 2] cells of the wanted tiles
    width = int(max(high_cells[:, 0].max(), sub[..., 0].max())) + 1
    high_keys = high_cells[:, 1] * width + high_cells[:, 0]
    want = sub[..., 1] * width + sub[..., 0]  # [N, 16]
    order = np.argsort(high_keys, kind="stable")
    sorted_keys = high_keys[order]
    pos = np.clip(np.searchsorted(sorted_keys, want), 0, len(sorted_keys) - 1)
    found = sorted_keys[pos] == want
    keep = found.all(axis=1)
    k = int(keep.sum())
    n = len(keep)
    if k == 0:
        raise ClamError(f"none of the {n} x5 patches has all {BLOCK} of its x20 tiles "
                        f"({int(found.sum())} of {BLOCK * n} found) {what}")
    rows = order[pos[keep]].reshape(-1)  # [16K] high rows, block-major
    used = np.zeros(len(high_keys), dtype=bool)
    used[rows] = True
    if n - k:
        log.debug("%s: %d of %d x5 patches lack x20 tiles, dropped", low.label, n - k, n)
    return Blocks(keep=keep, x5=low.features[keep], x5_coords=low.coords[keep], x20=high.features[rows],
                  x20_coords=high.coords[rows], dropped=n - k, unused=int((~used).sum()),
                  level5=low.level, level20=high.level)
