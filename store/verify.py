"""`dsca-store info` and `dsca-store verify`: what a store holds, and whether every byte is sound."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from collections import Counter

import numpy as np
import zarr

from dsca.progress import Progress
from dsca.store._layout import ARRAYS, BLOCK, SLIDES, complete_slides, slide_id_problem
from dsca.store.provenance import source_changes
from dsca.store.reader import FeatureStore, StoreError

__all__ = ["StoreInfo", "store_info", "verify_store", "VerifyReport"]

log = logging.getLogger(__name__)


def _disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@dataclass(frozen=True)
class StoreInfo:
    """Summary of a store.

    `feature_bytes` is what x5 + x20 take on disk; `raw_bytes` what they take decoded in the
    stored dtype; `source_bytes` the CLAM files they came from.
    """

    path: Path
    slides: int
    incomplete: int
    patients: int
    patches: int
    feature_dim: int | None
    dtype: str
    codec: str
    disk_bytes: int
    feature_bytes: int
    raw_bytes: int
    source_bytes: int

    @property
    def ratio(self) -> float:
        """Stored feature bytes / decoded bytes (lower is better)."""
        return self.feature_bytes / self.raw_bytes if self.raw_bytes else float("nan")

    def lines(self) -> Iterator[str]:
        mb = 1e6
        yield f"store        {self.path}"
        yield f"slides       {self.slides} complete, {self.incomplete} incomplete; {self.patients} patients"
        yield f"patches      {self.patches} x5 / {self.patches * BLOCK} x20, dim {self.feature_dim}"
        yield f"dtype        {self.dtype} (codec {self.codec} + crc32c)"
        yield f"on disk      {self.disk_bytes / mb:.1f} MB ({self.feature_bytes / mb:.1f} MB features)"
        if self.raw_bytes:
            yield f"compression  {self.ratio:.3f} of decoded {self.dtype} ({self.raw_bytes / mb:.1f} MB)"
        if self.source_bytes:
            yield f"vs sources   {self.disk_bytes / self.source_bytes:.3f} of the CLAM files ({self.source_bytes / mb:.1f} MB)"


def store_info(path: str | Path) -> StoreInfo:
    """What `dsca-store info` prints: counts, dims, bytes on disk and against the sources."""
    fs = FeatureStore.open(path)
    p = Path(path)
    folders = [c for c in (p / SLIDES).iterdir() if c.is_dir()] if (p / SLIDES).is_dir() else []
    patches = feature_bytes = source_bytes = 0
    codecs: Counter[str] = Counter()
    for sid in fs.slide_ids:
        attrs = fs.slide_attrs(sid)
        patches += int(attrs["n_patches"])
        # each slide records the codec it was written with; stores of older converts only the root
        codecs[str(attrs.get("codec", fs.attrs.get("codec", "?")))] += 1
        feature_bytes += _disk_bytes(p / SLIDES / sid / "x5" / "c") + _disk_bytes(p / SLIDES / sid / "x20" / "c")
        source_bytes += sum(int(s["bytes"]) for s in attrs.get("sources", {}).values())
    dim = fs.attrs.get("feature_dim")
    raw = patches * (BLOCK + 1) * int(dim or 0) * np.dtype(fs.attrs["dtype"]).itemsize
    return StoreInfo(p, len(fs.slide_ids), len(folders) - len(fs.slide_ids), len(fs.patient_slides()), patches,
                     dim, str(fs.attrs["dtype"]), _codec_summary(codecs), _disk_bytes(p),
                     feature_bytes, raw, source_bytes)


def _codec_summary(codecs: Counter[str]) -> str:
    if not codecs:
        return "none yet"
    if len(codecs) == 1:
        return next(iter(codecs))
    return ", ".join(f"{name} ({n} slides)" for name, n in codecs.most_common())


@dataclass
class VerifyReport:
    slides: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_slide(root: zarr.Group, fs: FeatureStore, sid: str, attrs: dict, dim: int, dtype: np.dtype) -> str | None:
    """Read every chunk of a slide through zarr (which checks each crc32c) and its invariants.

    zarr reads a chunk that is missing from a shard, or a shard file that is missing, as fill
    values; the store's own reader does not (for slides written with every chunk stored), so
    each array is also read through it.
    """
    if not attrs:
        return "listed in the consolidated metadata but not complete on disk (rerun convert)"
    try:
        group = root[f"{SLIDES}/{sid}"]
        arrays = {name: group[name][...] for name in ARRAYS}
    except KeyError as exc:
        return f"array {exc} is missing"
    except Exception as exc:  # noqa: BLE001 - checksum/decode errors come as many types
        return f"unreadable chunk ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"
    for name in ARRAYS:
        try:
            fs.read_array(sid, name)
        except StoreError as exc:
            return str(exc)
    x5, x20, coords, grid, index = (arrays[k] for k in ("x5", "x20", "coords", "grid", "grid_index"))
    n = int(attrs.get("n_patches", -1))
    shapes = {"x5": (n, dim), "x20": (n, BLOCK, dim), "coords": (n, 2), "grid": (n, 2)}
    for name, shape in shapes.items():
        if arrays[name].shape != shape:
            return f"{name} has shape {arrays[name].shape}, expected {shape}"
    if x5.dtype != dtype or x20.dtype != dtype:
        return f"features are {x5.dtype}/{x20.dtype}, the store says {dtype}"
    if not (np.isfinite(x5).all() and np.isfinite(x20).all()):
        return "features contain NaN/Inf"
    step = np.asarray(attrs.get("step", [1, 1]), dtype=np.int64)
    if not np.array_equal(grid, coords // step):
        return "grid != coords // step"
    if index.shape != (int(grid[:, 1].max()) + 1, int(grid[:, 0].max()) + 1):
        return f"grid_index has shape {index.shape}, not the grid's extent"
    hit = index[grid[:, 1], grid[:, 0]]
    if np.any(hit < 0) or np.any(grid[hit] != grid):
        return "grid_index does not point back at the patches"
    if int(np.count_nonzero(index >= 0)) != n - int(attrs.get("grid_collisions", 0)):
        return "grid_index holds cells without a patch"
    return None


def verify_store(path: str | Path, progress: bool = True, sources: bool = False) -> VerifyReport:
    """Check completeness, checksums (every chunk read), shapes and grid invariants.

    Reads what is on disk, not the consolidated copy of the metadata, and compares the two.
    With `sources`, also checks that each slide's source files are still the ones it was
    converted from (size and mtime; content where those differ).
    """
    p = Path(path)
    report = VerifyReport()
    try:
        fs = FeatureStore.open(p)
    except StoreError as exc:
        report.problems.append(("<store>", str(exc)))
        return report
    if not (p / SLIDES).is_dir():
        report.problems.append(("<store>", f"{p} has no {SLIDES}/ group (not written by dsca-store convert?)"))
        return report
    on_disk = complete_slides(p)
    listed = set(fs.slide_ids)
    for sid in sorted(c.name for c in (p / SLIDES).iterdir() if c.is_dir()):
        if slide_id_problem(sid) is not None:
            report.problems.append((sid, f"not a slide of this store ({slide_id_problem(sid)}); remove it by hand"))
        elif sid not in on_disk:
            report.problems.append((sid, "incomplete slide (interrupted convert?); rerun convert to finish it"))
        elif sid not in listed:
            report.problems.append((sid, "complete on disk but absent from the consolidated metadata (rerun convert)"))
    dim, dtype = fs.attrs.get("feature_dim"), np.dtype(fs.attrs["dtype"])
    if fs.slide_ids and dim is None:
        report.problems.append(("<store>", "the store records no feature_dim"))
        return report
    root = zarr.open_group(p, mode="r", use_consolidated=False)
    with Progress(len(fs.slide_ids), "verify", "slide", enabled=progress) as bar:
        for sid in fs.slide_ids:
            report.slides += 1
            attrs = on_disk.get(sid, {})
            reason = _check_slide(root, fs, sid, attrs, int(dim), dtype)
            if reason is None and sources:
                recorded = attrs.get("sources", {})
                changes = source_changes(recorded, {role: rec.get("path") for role, rec in recorded.items()})
                if not recorded or any("path" not in rec for rec in recorded.values()):
                    changes.append("no source paths recorded (converted by an older dsca-store)")
                reason = ("sources changed: " + "; ".join(changes)) if changes else None
            if reason:
                report.problems.append((sid, reason))
            bar.update()
    return report
