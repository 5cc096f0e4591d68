"""`dsca-store info` and `dsca-store verify`: what a store holds, and whether every byte is sound."""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
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
from dsca.store.remote import RemoteLocation, StorageOptions

__all__ = ["StoreInfo", "store_info", "verify_store", "VerifyReport"]

log = logging.getLogger(__name__)

# slides of a remote store that verify checks at once (latency-bound: threads mostly wait)
_REMOTE_SLIDES_AT_ONCE = 8


def _disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@dataclass(frozen=True)
class StoreInfo:
    """Summary of a store.

    `feature_bytes` is what x5 + x20 take on disk; `raw_bytes` what they take decoded in the
    stored dtype; `source_bytes` the CLAM files they came from.
    """

    path: Path | str  # a local folder, or the store's URL
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


def _remote_sizes(remote: RemoteLocation) -> tuple[dict[str, int], set[str]]:
    """Sizes of a remote store's objects (key -> bytes) and the slide folders among them."""
    try:
        sizes = remote.sizes()
    except Exception as exc:  # noqa: BLE001 - object stores raise many types
        raise StoreError(f"{remote.url}: cannot list the store ({type(exc).__name__}: {exc})") from None
    folders = {key.split("/")[1] for key in sizes if key.startswith(f"{SLIDES}/") and key.count("/") >= 2}
    return sizes, folders


def store_info(path: str | Path, storage_options: StorageOptions | None = None) -> StoreInfo:
    """What `dsca-store info` prints: counts, dims, bytes on disk (in the bucket, for a URL)
    and against the sources.

    Anything unreadable (root or slide attributes, a folder) is a StoreError naming it.
    """
    fs = FeatureStore.open(path, storage_options=storage_options)  # checks the root attrs
    if fs.remote is not None:
        return _info(fs, *_remote_sizes(fs.remote))
    p = Path(fs.path)
    try:
        folders = [c for c in (p / SLIDES).iterdir() if c.is_dir()] if (p / SLIDES).is_dir() else []
    except OSError as exc:
        raise StoreError(f"{p}: cannot list {SLIDES}/ ({exc.strerror or exc})") from None
    return _info(fs, None, {c.name for c in folders})


def _info(fs: FeatureStore, sizes: dict[str, int] | None, folders: set[str]) -> StoreInfo:
    """StoreInfo of an open store; `sizes`: a remote store's object sizes (None: read the disk)."""
    p = fs.path
    chunk_totals: Counter[str] = Counter()  # "slides/<id>/<array>/c/" -> bytes, in one pass
    for key, n in (sizes or {}).items():
        parts = key.split("/", 4)
        if len(parts) == 5 and parts[0] == SLIDES and parts[3] == "c":
            chunk_totals["/".join(parts[:4]) + "/"] += n

    def size(prefix: str) -> int:
        """Bytes under `prefix` ("" = the whole store; else an array's chunk folder)."""
        if sizes is None:
            return _disk_bytes(Path(p) / prefix) if prefix else _disk_bytes(Path(p))
        return chunk_totals[prefix] if prefix else sum(sizes.values())
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
            feature_bytes += size(f"{SLIDES}/{sid}/x5/c/") + size(f"{SLIDES}/{sid}/x20/c/")
        except OSError as exc:
            raise StoreError(f"{p}: slide {sid}: cannot size its arrays ({exc.strerror or exc})") from None
        source_bytes += sum(int(s["bytes"]) for s in attrs.get("sources", {}).values())
    dim = fs.attrs.get("feature_dim")
    raw = patches * (BLOCK + 1) * int(dim or 0) * np.dtype(fs.attrs["dtype"]).itemsize
    try:
        disk = size("")
    except OSError as exc:
        raise StoreError(f"{p}: cannot size the store ({exc.strerror or exc})") from None
    return StoreInfo(p, len(fs.slide_ids), len(folders - set(fs.slide_ids)), len(fs.patient_slides()), patches,
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


def _slide_data_problem(root: zarr.Group, fs: FeatureStore, sid: str, attrs: dict, dim: int, dtype: np.dtype,
                        direct: FeatureStore | None = None) -> str | None:
    """Read every chunk of a slide through zarr (which checks each crc32c) and its invariants.

    zarr reads a chunk that is missing from a shard, or a shard file that is missing, as fill
    values; the store's own reader does not (for slides written with every chunk stored), so
    each array is also read through it.
    """
    if not attrs:
        return "listed in the consolidated metadata but not complete on disk (rerun convert)"
    if fs.remote is not None:
        # every chunk through zarr (`fs` has direct=False: crc32c checked, absent chunk objects
        # noted), then through the store's own reader (which also checks the shard index):
        # all arrays of the slide in flight at once, each read being a round trip to the server
        try:
            arrays = fs.read_arrays(sid, ARRAYS)
            (direct or fs).read_arrays(sid, ARRAYS)
        except StoreError as exc:
            return str(exc)
        return _invariants_problem(arrays, attrs, dim, dtype)
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
    return _invariants_problem(arrays, attrs, dim, dtype)


def _invariants_problem(arrays: dict[str, np.ndarray], attrs: dict, dim: int, dtype: np.dtype) -> str | None:
    """Shapes, dtypes, finiteness and the patch grid of a slide's arrays, read whole."""
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


def _read_docs(where: Path | RemoteLocation, keys: list[str]) -> dict[str, Any]:
    """key -> parsed metadata document (_ABSENT, or "(unreadable: ...)"), of a folder or a
    remote store (fetched concurrently)."""
    if not isinstance(where, RemoteLocation):
        return {key: _read_json(where / key) for key in keys}
    try:
        raw = where.read_many(keys)
    except Exception as exc:  # noqa: BLE001 - object stores raise many types
        return {key: f"(unreadable: {type(exc).__name__})" for key in keys}
    out: dict[str, Any] = {}
    for key, body in raw.items():
        try:
            out[key] = _ABSENT if body is None else json.loads(body)
        except ValueError as exc:
            out[key] = f"(unreadable: {type(exc).__name__})"
    return out


def _consolidated(where: Path | RemoteLocation) -> dict[str, Any] | None:
    """node path -> metadata document, as the root zarr.json consolidates it (None: no block)."""
    doc = _read_docs(where, ["zarr.json"])["zarr.json"]
    block = doc.get("consolidated_metadata") if isinstance(doc, dict) else None
    meta = block.get("metadata") if isinstance(block, dict) else None
    return meta if isinstance(meta, dict) else None


def _consolidated_diffs(where: Path | RemoteLocation, consolidated: dict[str, Any], sid: str) -> list[str]:
    """How the consolidated copy of a slide's metadata (what FeatureStore reads) differs from
    the slide's own zarr.json files (what convert wrote): one phrase per difference, e.g.
    "n_patches 14 vs 13" (consolidated vs own) or "x5 shape [14, 32] vs [13, 32]"."""
    key = f"{SLIDES}/{sid}"
    docs = _read_docs(where, [f"{key}/zarr.json", *(f"{key}/{name}/zarr.json" for name in ARRAYS)])
    group, own = consolidated.get(key, _ABSENT), docs[f"{key}/zarr.json"]
    diffs = []
    if isinstance(group, dict) and isinstance(own, dict):
        diffs += _dict_diffs("", group.get("attributes", {}), own.get("attributes", {}), label="attributes")
        diffs += _dict_diffs("group ", group, own, skip=("attributes", "consolidated_metadata"))
    else:
        diffs.append(f"group {_shown(group)} vs {_shown(own)}")
    nodes = {k[len(key) + 1:] for k in consolidated if k.startswith(key + "/")}
    nodes |= {name for name in ARRAYS if docs[f"{key}/{name}/zarr.json"] is not _ABSENT}
    for name in sorted(nodes):
        doc_key = f"{key}/{name}/zarr.json"
        mine = consolidated.get(f"{key}/{name}", _ABSENT)
        theirs = docs[doc_key] if doc_key in docs else _read_docs(where, [doc_key])[doc_key]
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


def verify_store(path: str | Path, progress: bool = True, sources: bool = False,
                 storage_options: StorageOptions | None = None) -> VerifyReport:
    """Check completeness, checksums (every chunk read), shapes and grid invariants.

    Reads what is on disk, not the consolidated copy of the metadata, and compares the two:
    every difference between a slide's consolidated metadata (what readers use) and its own
    zarr.json files is a problem. Never raises: whatever cannot be read is a problem line.
    With `sources`, also checks that each slide's source files are still the ones it was
    converted from (size and mtime; content where those differ). `path` may be a URL (every
    object is then read from the server, through zarr).
    """
    report = VerifyReport()
    try:
        fs = FeatureStore.open(path, storage_options=storage_options)
    except StoreError as exc:
        report.problems.append(("<store>", str(exc)))
        return report
    p, remote = fs.path, fs.remote
    where: Path | RemoteLocation = remote if remote is not None else Path(p)
    try:
        if remote is not None:
            folders = [c for c in remote.children(SLIDES) if c != "zarr.json"]
            has_slides = bool(folders) or remote.read(f"{SLIDES}/zarr.json") is not None
            on_disk = remote.complete_slides()
        else:
            has_slides = (Path(p) / SLIDES).is_dir()
            folders = [c.name for c in (Path(p) / SLIDES).iterdir() if c.is_dir()] if has_slides else []
            on_disk = complete_slides(Path(p))
    except Exception as exc:  # noqa: BLE001 - OSError locally, many types from object stores
        report.problems.append(("<store>", f"{p}: cannot list {SLIDES}/ ({type(exc).__name__}: {exc})"))
        return report
    if not has_slides:
        report.problems.append(("<store>", f"{p} has no {SLIDES}/ group (not written by dsca-store convert?)"))
        return report
    if fs.not_finalized:  # sound so far, but slides of unfinished shards may be missing
        report.problems.append(("<store>", fs.not_finalized))
    # a remote store's objects are fetched once into a scratch cache that both looks at a slide
    # read (zarr's pass, then the direct reader's) and dropped slide by slide
    scratch = Path(tempfile.mkdtemp(prefix="dsca-verify-")) if remote is not None else None
    try:
        return _verify_slides(report, fs, p, remote, where, on_disk, folders, sources, progress, scratch)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _verify_slides(report: VerifyReport, fs: FeatureStore, p: Path | str, remote: RemoteLocation | None,
                   where: Path | RemoteLocation, on_disk: dict[str, dict], folders: list[str], sources: bool,
                   progress: bool, scratch: Path | None) -> VerifyReport:
    """verify_store once the slide listing is known: each slide's folder, metadata and data."""
    listed = set(fs.slide_ids)
    for sid in sorted(folders):
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
        if remote is not None:
            root = remote.open_group("r", cache=scratch, use_consolidated=False)
        else:
            root = zarr.open_group(p, mode="r", use_consolidated=False)
        own = FeatureStore(root, p, checked=True, remote=remote, direct=remote is None)
        # a remote store's second look: the direct reader, over the same slide list
        twin = FeatureStore(root, p, checked=True, remote=remote) if remote is not None else None
    except Exception as exc:  # noqa: BLE001 - zarr raises many types for a bad store
        report.problems.append(("<store>", f"{p}: cannot open store ({type(exc).__name__}: {exc})"))
        return report
    consolidated = _consolidated(where)

    def check(sid: str) -> list[str]:
        try:
            return _slide_problems(where, root, own, consolidated, sid, on_disk.get(sid, {}), int(dim), dtype,
                                   sources, twin)
        finally:
            if scratch is not None:
                shutil.rmtree(scratch / SLIDES / sid, ignore_errors=True)

    with Progress(len(fs.slide_ids), "verify", "slide", enabled=progress) as bar:
        if remote is None:
            for sid in fs.slide_ids:
                report.slides += 1
                report.problems += [(sid, reason) for reason in check(sid)]
                bar.update()
            return report
        # a remote store: each slide costs a few round trips (metadata, then its arrays), so
        # several slides are checked at once; problems are still reported in slide order
        with ThreadPoolExecutor(max_workers=_REMOTE_SLIDES_AT_ONCE, thread_name_prefix="dsca-verify") as pool:
            futures = [pool.submit(check, sid) for sid in fs.slide_ids]
            for sid, future in zip(fs.slide_ids, futures):
                report.slides += 1
                report.problems += [(sid, reason) for reason in future.result()]
                bar.update()
    return report


def _slide_problems(where: Path | RemoteLocation, root: zarr.Group, own: FeatureStore, consolidated: dict[str, Any] | None, sid: str,
                    attrs: dict, dim: int, dtype: np.dtype, sources: bool,
                    direct: FeatureStore | None = None) -> list[str]:
    if not attrs:
        return ["listed in the consolidated metadata but not complete on disk (rerun convert)"]
    problems = []
    if consolidated is not None:
        problems += [f"consolidated metadata differs from the slide's own: {diff}; rerun convert to rebuild it"
                     for diff in _consolidated_diffs(where, consolidated, sid)]
    bad_attrs = slide_attrs_problem(attrs)
    if bad_attrs:
        return [*problems, f"{bad_attrs} (in slides/{sid}/zarr.json; convert it again with --overwrite)"]
    try:
        reason = _slide_data_problem(root, own, sid, attrs, dim, dtype, direct)
        if reason is None and sources:
            recorded = attrs.get("sources", {})
            changes = source_changes(recorded, {role: rec.get("path") for role, rec in recorded.items()})
            if not recorded or any("path" not in rec for rec in recorded.values()):
                changes.append("no source paths recorded (converted by an older dsca-store)")
            reason = ("sources changed: " + "; ".join(changes)) if changes else None
    except Exception as exc:  # noqa: BLE001 - whatever a damaged slide raises is its problem, not a crash
        reason = f"cannot be checked ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"
    return [*problems, reason] if reason else problems
