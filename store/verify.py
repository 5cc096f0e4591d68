"""`dsca-store info` and `dsca-store verify`: what a store holds, and whether every byte is sound."""
from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from dsca.coords import BLOCK
from dsca.progress import Progress
from dsca.store._layout import ARRAYS, SLIDES, complete_slides, slide_id_problem
from dsca.store.attr_checks import slide_attrs_problem
from dsca.store.errors import StoreError
from dsca.store.provenance import source_changes
from dsca.store.reader import FeatureStore

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
    not_finalized: str | None = None  # a sharded convert awaiting `dsca-store finalize`

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
        if self.not_finalized:
            yield f"state        {self.not_finalized}"


def store_info(path: str | Path) -> StoreInfo:
    """What `dsca-store info` prints: counts, dims, bytes on disk and against the sources.

    Anything unreadable (root or slide attributes, a folder) is a StoreError naming it.
    """
    fs = FeatureStore.open(path)  # checks the root attrs
    p = Path(path)
    try:
        folders = [c for c in (p / SLIDES).iterdir() if c.is_dir()] if (p / SLIDES).is_dir() else []
    except OSError as exc:
        raise StoreError(f"{p}: cannot list {SLIDES}/ ({exc.strerror or exc})") from None
    patches = feature_bytes = source_bytes = 0
    codecs: Counter[str] = Counter()
    for sid in fs.slide_ids:
        attrs = fs.slide_attrs(sid)
        problem = slide_attrs_problem(attrs)
        if problem:
            raise StoreError(f"{p}: slide {sid}: {problem} (run dsca-store verify)")
        patches += int(attrs["n_patches"])
        # each slide records the codec it was written with; stores of older converts only the root
        codecs[str(attrs.get("codec", fs.attrs.get("codec", "?")))] += 1
        try:
            feature_bytes += _disk_bytes(p / SLIDES / sid / "x5" / "c") + _disk_bytes(p / SLIDES / sid / "x20" / "c")
        except OSError as exc:
            raise StoreError(f"{p}: slide {sid}: cannot size its arrays ({exc.strerror or exc})") from None
        source_bytes += sum(int(s["bytes"]) for s in attrs.get("sources", {}).values())
    dim = fs.attrs.get("feature_dim")
    raw = patches * (BLOCK + 1) * int(dim or 0) * np.dtype(fs.attrs["dtype"]).itemsize
    try:
        disk = _disk_bytes(p)
    except OSError as exc:
        raise StoreError(f"{p}: cannot size the store ({exc.strerror or exc})") from None
    return StoreInfo(p, len(fs.slide_ids), len(folders) - len(fs.slide_ids), len(fs.patient_slides()), patches,
                     dim, str(fs.attrs["dtype"]), _codec_summary(codecs), disk,
                     feature_bytes, raw, source_bytes, fs.not_finalized)


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


def _slide_data_problem(root: zarr.Group, fs: FeatureStore, sid: str, attrs: dict, dim: int, dtype: np.dtype) -> str | None:
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


_ABSENT = object()  # a key or file that is not there


def _shown(value: Any) -> str:
    text = "(absent)" if value is _ABSENT else json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return _ABSENT
    except (OSError, ValueError) as exc:
        return f"(unreadable: {type(exc).__name__})"


def _dict_diffs(prefix: str, mine: Any, theirs: Any, skip: tuple[str, ...] = (), label: str = "") -> list[str]:
    """"<prefix><key> <consolidated> vs <own>" for every key whose values differ."""
    if not isinstance(mine, dict) or not isinstance(theirs, dict):
        return [] if mine == theirs else [f"{label or prefix.strip()} {_shown(mine)} vs {_shown(theirs)}"]
    out = []
    for key in sorted(set(mine) | set(theirs)):
        a, b = mine.get(key, _ABSENT), theirs.get(key, _ABSENT)
        if key not in skip and a != b:
            out.append(f"{prefix}{key} {_shown(a)} vs {_shown(b)}")
    return out


def _consolidated(p: Path) -> dict[str, Any] | None:
    """node path -> metadata document, as the root zarr.json consolidates it (None: no block)."""
    doc = _read_json(p / "zarr.json")
    block = doc.get("consolidated_metadata") if isinstance(doc, dict) else None
    meta = block.get("metadata") if isinstance(block, dict) else None
    return meta if isinstance(meta, dict) else None


def _consolidated_diffs(p: Path, consolidated: dict[str, Any], sid: str) -> list[str]:
    """How the consolidated copy of a slide's metadata (what FeatureStore reads) differs from
    the slide's own zarr.json files (what convert wrote): one phrase per difference, e.g.
    "n_patches 14 vs 13" (consolidated vs own) or "x5 shape [14, 32] vs [13, 32]"."""
    key = f"{SLIDES}/{sid}"
    folder = p / SLIDES / sid
    group, own = consolidated.get(key, _ABSENT), _read_json(folder / "zarr.json")
    diffs = []
    if isinstance(group, dict) and isinstance(own, dict):
        diffs += _dict_diffs("", group.get("attributes", {}), own.get("attributes", {}), label="attributes")
        diffs += _dict_diffs("group ", group, own, skip=("attributes", "consolidated_metadata"))
    else:
        diffs.append(f"group {_shown(group)} vs {_shown(own)}")
    nodes = {k[len(key) + 1:] for k in consolidated if k.startswith(key + "/")}
    nodes |= {name for name in ARRAYS if (folder / name / "zarr.json").exists()}
    for name in sorted(nodes):
        mine, theirs = consolidated.get(f"{key}/{name}", _ABSENT), _read_json(folder / name / "zarr.json")
        if mine is _ABSENT or theirs is _ABSENT:
            only_in = "the consolidated metadata only" if theirs is _ABSENT else "the slide's own metadata only"
            diffs.append(f"{name} is in {only_in}")
            continue
        attrs = ({}, {})
        if isinstance(mine, dict) and isinstance(theirs, dict):
            attrs = (mine.get("attributes", {}), theirs.get("attributes", {}))
        diffs += _dict_diffs(f"{name} ", mine, theirs, skip=("attributes",))
        diffs += _dict_diffs(f"{name} attribute ", *attrs, label=f"{name} attributes")
    return diffs


def verify_store(path: str | Path, progress: bool = True, sources: bool = False) -> VerifyReport:
    """Check completeness, checksums (every chunk read), shapes and grid invariants.

    Reads what is on disk, not the consolidated copy of the metadata, and compares the two:
    every difference between a slide's consolidated metadata (what readers use) and its own
    zarr.json files is a problem. Never raises: whatever cannot be read is a problem line.
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
    if fs.not_finalized:  # sound so far, but slides of unfinished shards may be missing
        report.problems.append(("<store>", fs.not_finalized))
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
    try:
        # the arrays are read through the slides' own metadata; the consolidated copy is compared
        root = zarr.open_group(p, mode="r", use_consolidated=False)
        own = FeatureStore(root, p, checked=True)
    except Exception as exc:  # noqa: BLE001 - zarr raises many types for a bad store
        report.problems.append(("<store>", f"{p}: cannot open store ({type(exc).__name__}: {exc})"))
        return report
    consolidated = _consolidated(p)
    with Progress(len(fs.slide_ids), "verify", "slide", enabled=progress) as bar:
        for sid in fs.slide_ids:
            report.slides += 1
            report.problems += [(sid, reason) for reason in _slide_problems(p, root, own, consolidated, sid,
                                                                            on_disk.get(sid, {}), int(dim), dtype,
                                                                            sources)]
            bar.update()
    return report


def _slide_problems(p: Path, root: zarr.Group, own: FeatureStore, consolidated: dict[str, Any] | None, sid: str,
                    attrs: dict, dim: int, dtype: np.dtype, sources: bool) -> list[str]:
    if not attrs:
        return ["listed in the consolidated metadata but not complete on disk (rerun convert)"]
    problems = []
    if consolidated is not None:
        problems += [f"consolidated metadata differs from the slide's own: {diff}; rerun convert to rebuild it"
                     for diff in _consolidated_diffs(p, consolidated, sid)]
    bad_attrs = slide_attrs_problem(attrs)
    if bad_attrs:
        return [*problems, f"{bad_attrs} (in slides/{sid}/zarr.json; convert it again with --overwrite)"]
    try:
        reason = _slide_data_problem(root, own, sid, attrs, dim, dtype)
        if reason is None and sources:
            recorded = attrs.get("sources", {})
            changes = source_changes(recorded, {role: rec.get("path") for role, rec in recorded.items()})
            if not recorded or any("path" not in rec for rec in recorded.values()):
                changes.append("no source paths recorded (converted by an older dsca-store)")
            reason = ("sources changed: " + "; ".join(changes)) if changes else None
    except Exception as exc:  # noqa: BLE001 - whatever a damaged slide raises is its problem, not a crash
        reason = f"cannot be checked ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"
    return [*problems, reason] if reason else problems
