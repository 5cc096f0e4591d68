"""Finding TRIDENT outputs: which folders hold a run, and which files belong to which slide.

A DSCA user runs TRIDENT twice in one job dir (e.g. 5x and 20x); each patching run writes
``<run>/patches/<slide>_patches.h5`` and ``<run>/features_<enc>/<slide>.h5`` (or `.pt`).
:func:`looks_like_trident` tells TRIDENT folders from CLAM ones by content (the names may be
custom) and :class:`TridentDir` indexes one run, leaving out the files TRIDENT is still writing
(``<output>.lock``) and naming them instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py

from dsca.store.clam import index_dir
from dsca.store.errors import ClamError
from dsca.store.trident_attrs import (
    FEATURES_PREFIX,
    PATCHES_SUFFIX,
    coords_attrs,
    encoder_attr,
    folder_encoder,
    is_trident_attrs,
    trident_label,
)

__all__ = ["LOCK_REASON", "TridentDir", "looks_like_trident"]

LOCK_REASON = "TRIDENT is still writing it (lock file)"
_PEEK_FILES = 3  # files looked at by looks_like_trident / the encoder peek


def _peek_coords_attrs(path: Path) -> dict[str, Any] | None:
    """The `coords` attributes of an h5 without reading its data; None when unreadable."""
    try:
        with h5py.File(path, "r") as f:
            return coords_attrs(f["coords"]) if isinstance(f.get("coords"), h5py.Dataset) else None
    except Exception:  # noqa: BLE001 - a peek; the real read reports the reason
        return None


def _unlocked_files(files: list[Path]) -> list[Path]:
    return [p for p in files if not p.with_name(p.name + ".lock").exists()]


def _candidate_h5(path: Path) -> list[Path]:
    """Files whose coords attrs tell whether `path` is a TRIDENT folder."""
    found: list[Path] = []
    if (path / "patches").is_dir():
        found += sorted((path / "patches").glob(f"*{PATCHES_SUFFIX}.h5"))[:_PEEK_FILES]
        for sub in sorted(path.glob(f"{FEATURES_PREFIX}*")):
            if sub.is_dir():
                found += sorted(sub.glob("*.h5"))[:_PEEK_FILES]
    elif path.name == "patches":
        found += sorted(path.glob(f"*{PATCHES_SUFFIX}.h5"))[:_PEEK_FILES]
    else:
        found += sorted(path.glob("*.h5"))[:_PEEK_FILES]
        if not found and path.name.startswith(FEATURES_PREFIX) and (path.parent / "patches").is_dir():
            # a .pt-only features folder: its coords are beside it
            found += sorted((path.parent / "patches").glob(f"*{PATCHES_SUFFIX}.h5"))[:_PEEK_FILES]
    return _unlocked_files(found)


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
    for h5 in _unlocked_files(files)[:_PEEK_FILES]:
        try:
            with h5py.File(h5, "r") as f:
                if isinstance(f.get("features"), h5py.Dataset):
                    return encoder_attr(f["features"])
        except Exception:  # noqa: BLE001 - a peek; the real read reports the reason
            continue
    return None



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
        elif path.name.startswith("slide_" + FEATURES_PREFIX):
            raise ClamError(f"{path} holds TRIDENT slide embeddings; pass the patch features folder "
                            f"({FEATURES_PREFIX}<enc>/ beside it)")
        elif path.name.startswith(FEATURES_PREFIX) or any(path.glob("*.h5")) or any(path.glob("*.pt")):
            root, feats = path.parent, path
        else:
            runs = sorted(p.name for p in path.iterdir() if (p / "patches").is_dir())
            if runs:
                raise ClamError(f"{path} is a TRIDENT job dir: pass one of its patching folders "
                                f"({', '.join(runs)}) or their features_<enc>/ folder")
            raise ClamError(f"{path}: not a TRIDENT folder (no patches/ or features_<enc>/ found)")
        if feats is None:
            options = sorted(p for p in root.glob(f"{FEATURES_PREFIX}*") if p.is_dir())
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
                if stem.endswith(PATCHES_SUFFIX) and (kept := _unlocked_files(files)):
                    coords[stem[: -len(PATCHES_SUFFIX)]] = kept
            for sid, locks in _index_locks(patches, PATCHES_SUFFIX).items():
                locked.setdefault(sid, []).extend(locks)
        features: dict[str, list[Path]] = {}
        encoder = None
        if feats is not None:
            for suffix in (".h5", ".pt"):
                for stem, files in index_dir(feats, suffix).items():
                    if kept := _unlocked_files(files):
                        features.setdefault(stem, []).extend(kept)
            for sid, locks in _index_locks(feats).items():
                locked.setdefault(sid, []).extend(locks)
            h5s = sorted(p for files in features.values() for p in files if p.suffix.lower() == ".h5")
            encoder = _peek_encoder(h5s) or folder_encoder(feats)
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
            folder = self.features_dir or self.root
            raise ClamError(f"no features file ({folder.name}/{slide_id}.h5)")
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
