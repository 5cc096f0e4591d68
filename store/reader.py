"""Read API of a `dsca-store/1` store: slides, patients and patch-grid regions.

Metadata comes from zarr (consolidated once per store) and is checked once at open
(:mod:`dsca.store.attr_checks`). Array bytes of the layout `convert` writes are read by the
direct path of :mod:`dsca.store.shard_reader`; any other layout falls back to zarr itself
(tests prove both paths return the same arrays). `dsca-store verify` reads every chunk
through zarr itself.

A store at a URL (``s3://bucket/cohort.zarr``, :mod:`dsca.store.remote`) is opened through
zarr's FsspecStore; its shard objects are fetched whole, all of a patient's at once, and decoded
by the same direct path (from the optional chunk cache's files, when cached).

Every read either returns the stored values or raises :class:`StoreError` naming the store,
slide and array.

A store that the shards of a sharded convert are still writing (or that nobody finalized
since) opens like any other, listing its complete slides; `not_finalized` says why more may
come, and :meth:`FeatureStore.open` logs it as a warning.
"""
from __future__ import annotations

import asyncio
import logging
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync as zarr_sync

from dsca.coords import BLOCK, patient_grid
from dsca.store._layout import FORMAT, SHARDED, SLIDES, complete_slides
from dsca.store.attr_checks import count_problem, root_attrs_problem, slide_attrs_problem
from dsca.store.errors import StoreError
from dsca.store.remote import ChunkStore, RemoteLocation, StorageOptions, is_url, local_path
from dsca.store.shard_reader import ShardLayout, direct_layout, read_rows_direct

__all__ = ["FeatureStore", "SlideData", "PatientData", "StoreError", "root_attrs_problem", "slide_attrs_problem"]

# Whether FeatureStore.open verifies chunk checksums unless told otherwise: yes, for the small
# share of a patient read it costs (FeatureStore.open's docstring says where the numbers are).
CHECKED_DEFAULT = True

MODES = ("r", "r+")  # FeatureStore.open never creates or truncates a store

log = logging.getLogger(__name__)

_COLLAPSED_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:/[^/]")


@dataclass(frozen=True)
class SlideData:
    """One slide (or a region of it). Arrays are numpy.

    Attributes:
        x5: [N, D] low-res features.
        x20: [N, 16, D] high-res blocks (row 4*r + c of a block is sub-patch (c, r)).
        coords: [N, 2] int64 level-0 corners of the low-res patches.
        grid: [N, 2] int32 patch-grid (col, row).
        rows: [N] int64 row numbers in the slide (source order).
    """

    slide_id: str
    x5: np.ndarray
    x20: np.ndarray
    coords: np.ndarray
    grid: np.ndarray
    rows: np.ndarray


@dataclass(frozen=True)
class PatientData:
    """All slides of one patient, concatenated in the given slide order.

    Attributes:
        x5: [sum N, D]; x20: [sum N, 16, D]
        coords: [sum N, 2] int64 patient-level grid (dsca.coords.patient_grid).
        slide_ids: the slides, in concatenation order; lengths: their N.
    """

    x5: np.ndarray
    x20: np.ndarray
    coords: np.ndarray
    slide_ids: list[str]
    lengths: list[int]


class FeatureStore:
    """A `dsca-store/1` Zarr store opened for reading (see docs/ARCHITECTURE.md, Store format).

    Every read either returns the stored values or raises `StoreError` naming the store, slide
    and array; `checked` (see `open`) decides whether chunk checksums are part of that.
    """

    def __init__(self, root: zarr.Group, path: Path | str, checked: bool = CHECKED_DEFAULT,
                 remote: RemoteLocation | None = None, direct: bool = True) -> None:
        self._root = root
        # where the store lives, for messages: a local folder, or the URL as a str (a URL put
        # through Path would lose a slash)
        self.path = path
        self.remote = remote
        # False: every read goes through zarr's own pipeline (verify's second look)
        self.direct = direct
        # a remote store's chunk cache folder (None: no cache)
        self._cache = root.store.cache if isinstance(root.store, ChunkStore) else None
        self.checked = checked
        self.attrs: dict[str, Any] = dict(root.attrs)
        if self.attrs.get("format") != FORMAT:
            raise StoreError(f"{path}: not a {FORMAT} store (format={self.attrs.get('format')!r})")
        self._arrays: dict[tuple[str, str], tuple[zarr.Array, ShardLayout | None]] = {}
        # a slide is only read once convert finished it (attrs "complete")
        if root.metadata.consolidated_metadata is not None:
            # what convert consolidated at its end: no file read per slide
            self._slide_attrs = {sid: dict(g.attrs) for sid, g in root[SLIDES].groups()
                                 if g.attrs.get("complete") is True}
        else:
            # a convert is running or was killed: zarr's listing would fail on a half-written
            # group, so list the complete ones from their own zarr.json
            self._slide_attrs = self._list_complete_slides()
        self.slide_ids: list[str] = sorted(self._slide_attrs)
        # why slides may still be missing (a sharded convert not finalized yet), or None
        self.not_finalized: str | None = None
        if SHARDED in self.attrs:
            marker = self.attrs[SHARDED]
            shards = marker.get("shards", "?") if isinstance(marker, dict) else "?"
            self.not_finalized = (f"not finalized: converted in {shards} shards, some may still be running or "
                                  f"pending ({len(self.slide_ids)} slides complete so far); run "
                                  f"'dsca-store finalize {path}' once every shard is done")
        # checked once here, so that info, verify and every read can rely on them
        problem = root_attrs_problem(self.attrs, bool(self.slide_ids))
        if problem:
            raise StoreError(f"{path}: {problem} (not written by dsca-store convert, or damaged)")

    def _list_complete_slides(self) -> dict[str, dict[str, Any]]:
        """slide id -> attrs of each complete slide, from every slide's own zarr.json."""
        if self.remote is None:
            return complete_slides(Path(self.path))
        try:
            return self.remote.complete_slides()
        except Exception as exc:  # noqa: BLE001 - no permission, no network: many types
            raise StoreError(f"{self.path}: cannot list the slides ({type(exc).__name__}: {_first_line(exc)})") from None

    @classmethod
    def open(cls, path: str | Path, mode: str = "r", checked: bool = CHECKED_DEFAULT,
             storage_options: StorageOptions | None = None, cache_dir: str | Path | None = None) -> FeatureStore:
        """Open an existing store; `mode="r"` (default) or `"r+"`, never one that creates or
        truncates it (anything else is a ValueError, raised before the store is touched).

        `path`: a local folder, or a URL (``s3://bucket/cohort.zarr``, any fsspec scheme; a str
        with ``://``, ``file://`` counting as local) read through zarr's FsspecStore.

        Args:
            storage_options: fsspec options for a URL (credentials, ``endpoint_url``, ...);
                by default s3fs/botocore read AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and
                AWS_ENDPOINT_URL from the environment. The key ``cache_dir`` means `cache_dir`.
            cache_dir: for a URL, a local folder that keeps every chunk read (a read-through
                cache; metadata is always read from the server, and a store changed by a
                convert since is cached afresh: :meth:`RemoteLocation.cache_folder`).
            checked: verify each chunk's crc32c before decoding it, so that a flipped bit on
                disk is a StoreError instead of a wrong feature value. On by default: it costs
                a small share of a patient read (README, Store performance, and
                benchmarks/test_bench_store.py::test_patient_load_checksum_cost), less than a
                silent wrong value is worth. Without it the shard index is still
                checked (a corrupt index or a truncated file is always an error), but a
                damaged chunk payload reads as wrong numbers. Stores that fall back to zarr's
                pipeline are always checked by zarr.
        """
        if mode not in MODES:
            raise ValueError(f"FeatureStore.open: mode must be one of {', '.join(map(repr, MODES))}, got {mode!r} "
                             "(a store is written by dsca-store convert only)")
        if is_url(path):
            return cls._open_remote(str(path), mode, checked, storage_options, cache_dir)
        p = local_path(path)
        if not (p / "zarr.json").is_file():
            if _COLLAPSED_URL.match(str(p)):  # Path("s3://b/x") is Path("s3:/b/x")
                raise StoreError(f"{p}: no zarr store here; if it is a URL, pass it as a str (a Path "
                                 "turns 's3://' into 's3:/')")
            raise StoreError(f"{p}: no zarr store here (missing zarr.json)")
        try:
            with warnings.catch_warnings():  # consolidated metadata is used knowingly
                warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
                root = zarr.open_group(p, mode=mode)
        except Exception as exc:  # noqa: BLE001 - zarr raises many types for a bad store
            raise StoreError(f"{p}: cannot open store ({exc})") from None
        store = cls(root, p, checked=checked)
        if store.not_finalized:  # training on it would silently leave out the slides still to come
            log.warning("%s: %s", p, store.not_finalized)
        return store

    @classmethod
    def _open_remote(cls, url: str, mode: str, checked: bool, storage_options: StorageOptions | None,
                     cache_dir: str | Path | None) -> FeatureStore:
        location = RemoteLocation(url, storage_options, cache_dir)
        url = location.url
        try:
            root_doc = location.read("zarr.json")
        except Exception as exc:  # noqa: BLE001 - no bucket, no credentials, no server: many types
            raise StoreError(f"{url}: cannot reach the store ({type(exc).__name__}: {_first_line(exc)})") from None
        if root_doc is None:
            raise StoreError(f"{url}: {location.absent_reason()}")
        try:
            with warnings.catch_warnings():  # consolidated metadata is used knowingly
                warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
                root = location.open_group(mode, cache=location.cache_folder(root_doc))
        except Exception as exc:  # noqa: BLE001 - zarr raises many types for a bad store
            raise StoreError(f"{url}: cannot open store ({type(exc).__name__}: {_first_line(exc)})") from None
        store = cls(root, url, checked=checked, remote=location)
        if store.not_finalized:
            log.warning("%s: %s", url, store.not_finalized)
        return store

    # --- metadata ---------------------------------------------------------------------------
    @property
    def feature_dim(self) -> int:
        dim = self.attrs.get("feature_dim")
        if dim is None:
            raise StoreError(f"{self.path}: the store records no feature_dim yet (no slide converted)")
        return int(dim)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.attrs["dtype"])

    def slide_attrs(self, slide_id: str) -> dict[str, Any]:
        self._require_slide(slide_id)
        return self._slide_attrs[slide_id]

    def n_patches(self, slide_id: str) -> int:
        problem = count_problem(self.slide_attrs(slide_id), "n_patches", 1, required=True)
        if problem:
            raise StoreError(f"{self.path}: slide {slide_id}: {problem} (damaged metadata; run dsca-store verify)")
        return int(self._slide_attrs[slide_id]["n_patches"])

    def patient_slides(self) -> dict[str, list[str]]:
        """patient id -> its slides (sorted), for slides converted with labels."""
        out: dict[str, list[str]] = {}
        for sid in self.slide_ids:
            pid = self._slide_attrs[sid].get("patient_id")
            if pid is not None:
                out.setdefault(str(pid), []).append(sid)
        return out

    def _require_slide(self, slide_id: str) -> None:
        """StoreError unless `slide_id` is a complete slide of the store."""
        if slide_id not in self._slide_attrs:
            raise StoreError(f"{self.path}: slide {slide_id!r} is not in the store (or not complete)")

    def _full_name(self, slide_id: str, name: str) -> str:
        """"<store>: slide <id>: <array>", how every error about one array starts."""
        return f"{self.path}: slide {slide_id}: {name}"

    def _node(self, slide_id: str, name: str) -> zarr.Array:
        """The zarr array (its metadata only: nothing read or checked on disk yet)."""
        self._require_slide(slide_id)
        try:
            arr = self._root[f"{SLIDES}/{slide_id}/{name}"]
        except KeyError:
            raise StoreError(f"{self._full_name(slide_id, name)}: array missing") from None
        except Exception as exc:  # noqa: BLE001 - a remote store fetches the metadata here: many types
            raise StoreError(f"{self._full_name(slide_id, name)}: cannot open "
                             f"({type(exc).__name__}: {_first_line(exc)})") from None
        if not isinstance(arr, zarr.Array):
            raise StoreError(f"{self._full_name(slide_id, name)}: not an array")
        return arr

    def _array(self, slide_id: str, name: str) -> tuple[zarr.Array, ShardLayout | None]:
        key = (slide_id, name)
        if key not in self._arrays:
            full_name = self._full_name(slide_id, name)
            arr = self._node(slide_id, name)
            # written by a convert that stores every chunk, even all-zero ones: anything absent
            # on disk was lost, not elided
            all_chunks = self._slide_attrs[slide_id].get("all_chunks") is True
            layout = None
            if self.direct and isinstance(self._root.store, zarr.storage.LocalStore):
                layout = direct_layout(arr, Path(self.path) / SLIDES / slide_id / name, full_name, all_chunks)
            elif self.direct and self.remote is not None:
                # the same decoder, fed with the shard object fetched whole: `path` is its key
                layout = direct_layout(arr, PurePosixPath(SLIDES, slide_id, name), full_name, all_chunks)
            # a remote store's ChunkStore notes absent chunks while reading: no listing needed
            if layout is None and all_chunks and not isinstance(self._root.store, ChunkStore):
                # zarr itself reads an absent shard or chunk file as fill value; count them
                # (one listing of the array's folder, once per array and open)
                stored, total = arr.nchunks_initialized, arr.nchunks
                if stored < total:
                    raise StoreError(f"{full_name}: {total - stored} of {total} chunks missing: "
                                     "deleted or never written")
            self._arrays[key] = (arr, layout)
        return self._arrays[key]

    def _shape(self, slide_id: str, name: str) -> tuple[int, ...]:
        cached = self._arrays.get((slide_id, name))
        return tuple((cached[0] if cached else self._node(slide_id, name)).shape)

    def _checked_n_patches(self, slide_id: str, names: Sequence[str] = ("x5", "x20", "coords", "grid")) -> int:
        """n_patches of the slide, after checking that the arrays read agree with it and the dim.

        Each array's shape comes from its own metadata (the consolidated copy, usually); one that
        disagrees would otherwise read as rows that do not belong together. Returns n_patches.
        """
        n, d = self.n_patches(slide_id), self.feature_dim
        expected = {"x5": (n, d), "x20": (n, BLOCK, d), "coords": (n, 2), "grid": (n, 2)}
        shapes = {name: self._shape(slide_id, name) for name in names}
        bad = [name for name in names if shapes[name] != expected[name]]
        if bad:
            found = ", ".join(f"{name} {shapes[name]}" for name in names)
            raise StoreError(f"{self.path}: slide {slide_id}: {', '.join(bad)}: shapes disagree with n_patches "
                             f"{n} and feature_dim {d} (found {found}): damaged metadata, run dsca-store verify")
        return n

    # --- array reads ------------------------------------------------------------------------
    def _read_into(self, slide_id: str, name: str, out: np.ndarray, rows: np.ndarray | None = None) -> None:
        arr, layout = self._array(slide_id, name)
        full_name = self._full_name(slide_id, name)
        want = arr.shape[0] if rows is None else len(rows)
        if out.shape[:1] != (want,) or tuple(out.shape[1:]) != tuple(arr.shape[1:]):
            # e.g. n_patches in the slide attrs disagreeing with the array: never broadcast
            raise StoreError(f"{full_name}: stored shape {tuple(arr.shape)} does not fit the slide "
                             f"(reading {tuple(out.shape)})")
        if rows is not None and len(rows) and not 0 <= int(rows[0]) <= int(rows[-1]) < arr.shape[0]:
            raise StoreError(f"{full_name}: rows {int(rows[0])}..{int(rows[-1])} requested, "
                             f"the array has {arr.shape[0]}")
        self._forget_missing([(slide_id, name)])
        try:
            if layout is None:
                data = arr[...] if rows is None else arr.get_orthogonal_selection((rows,))
                np.copyto(out, data, casting="unsafe")
            elif self.remote is not None:
                self._read_direct_remote([(layout, out, rows)])
            elif rows is None:
                read_rows_direct(layout, out, checked=self.checked)
            else:
                chunks = np.unique(rows // layout.chunk_rows).tolist()
                read_rows_direct(layout, out, chunks, rows, checked=self.checked)
        except Exception as exc:  # noqa: BLE001 - mapped to one StoreError naming the array
            raise _read_error(full_name, exc) from None
        self._check_missing(slide_id, name)

    def _read_direct_remote(self, reads: Sequence[tuple[ShardLayout, np.ndarray, np.ndarray | None]]) -> None:
        """Shards of a remote store (`layout.path`: the object's key) into their outputs (rows:
        None = all): the objects not in the cache fetched whole, all at once, and decoded by the
        direct path; cached ones decoded straight from their cache files, as local shards are."""
        assert self.remote is not None
        keys = [str(layout.path) for layout, _, _ in reads]
        cached = {key: self._cache / key for key in keys if self._cache is not None and (self._cache / key).is_file()}
        try:
            blobs = self.remote.fetch([key for key in keys if key not in cached], self._cache)
        except Exception as exc:  # noqa: BLE001 - object stores raise many types
            names = ", ".join(layout.full_name.removeprefix(f"{self.path}: ") for layout, _, _ in reads)
            raise StoreError(f"{self.path}: cannot fetch {names} ({type(exc).__name__}: {_first_line(exc)})") from None
        for (layout, out, rows), key in zip(reads, keys):
            if key in cached:
                layout, source = replace(layout, path=cached[key]), {}
            else:
                source = {"data": blobs[key]}
            chunks = None if rows is None else np.unique(rows // layout.chunk_rows).tolist()
            try:
                read_rows_direct(layout, out, chunks, rows, checked=self.checked, **source)
            except Exception as exc:  # noqa: BLE001 - mapped to one StoreError naming the array
                raise _read_error(layout.full_name, exc) from None

    def _forget_missing(self, keys: Sequence[tuple[str, str]]) -> None:
        """Before a remote read: drop absent chunks noted for these arrays by earlier reads."""
        store = self._root.store
        if isinstance(store, ChunkStore) and store.missing:
            prefixes = tuple(f"{SLIDES}/{sid}/{name}/" for sid, name in keys)
            # a snapshot: zarr's event-loop thread may add keys meanwhile
            store.missing.difference_update([k for k in tuple(store.missing) if k.startswith(prefixes)])

    def _check_missing(self, slide_id: str, name: str) -> None:
        """After a remote read: StoreError if a chunk of the array was absent and the slide was
        written with every chunk stored (zarr has read it as fill value)."""
        store = self._root.store
        if not isinstance(store, ChunkStore) or self._slide_attrs[slide_id].get("all_chunks") is not True:
            return
        prefix = f"{SLIDES}/{slide_id}/{name}/"
        absent = sorted(k for k in tuple(store.missing) if k.startswith(prefix))
        if absent:
            raise StoreError(f"{self._full_name(slide_id, name)}: {len(absent)} chunk object(s) missing "
                             f"({absent[0]}): deleted or never written")

    def _read_remote(self, jobs: Sequence[tuple[str, str, np.ndarray]]) -> None:
        """Whole arrays of a remote store into their outputs, all requests in flight at once.

        One gather over zarr's async API: a patient's slides and arrays are fetched
        concurrently, so that a read costs about one round trip, not one per array.
        """
        arrays, direct = [], []
        for sid, name, out in jobs:
            arr, layout = self._array(sid, name)
            if tuple(out.shape) != tuple(arr.shape):
                raise StoreError(f"{self._full_name(sid, name)}: stored shape {tuple(arr.shape)} does not fit "
                                 f"the slide (reading {tuple(out.shape)})")
            if layout is None:
                arrays.append(arr)
            else:
                direct.append((layout, out))
        if direct:
            # convert's layout: each array one shard object, fetched whole (all of them at once)
            # and decoded by the direct path, as a local store's files are
            self._read_direct_remote([(layout, out, None) for layout, out in direct])
        jobs = [(sid, name, out) for sid, name, out in jobs if self._arrays[(sid, name)][1] is None]
        self._forget_missing([(sid, name) for sid, name, _ in jobs])

        async def read_all() -> list[Any]:
            return await asyncio.gather(*(arr._async_array.getitem(...) for arr in arrays), return_exceptions=True)

        results = zarr_sync(read_all())
        for (sid, name, out), data in zip(jobs, results):
            if isinstance(data, BaseException):
                raise _read_error(self._full_name(sid, name), data)
            self._check_missing(sid, name)
            np.copyto(out, np.asarray(data), casting="unsafe")

    def read_array(self, slide_id: str, name: str, dtype: Any = None) -> np.ndarray:
        """One stored array (x5, x20, coords, grid, grid_index) of a slide, whole."""
        arr, _ = self._array(slide_id, name)
        out = np.empty(arr.shape, dtype=dtype or arr.dtype)
        self._read_into(slide_id, name, out)
        return out

    def read_arrays(self, slide_id: str, names: Sequence[str]) -> dict[str, np.ndarray]:
        """Several stored arrays of a slide, whole (a remote store's fetched concurrently)."""
        if self.remote is None:
            return {name: self.read_array(slide_id, name) for name in names}
        out = {}
        for name in names:
            arr, _ = self._array(slide_id, name)
            out[name] = np.empty(arr.shape, dtype=arr.dtype)
        self._read_remote([(slide_id, name, out[name]) for name in names])
        return out

    def read_slide(self, slide_id: str, dtype: Any = np.float32) -> SlideData:
        """All rows of one slide in source order; features cast to `dtype`."""
        n, d = self._checked_n_patches(slide_id), self.feature_dim
        x5 = np.empty((n, d), dtype=dtype)
        x20 = np.empty((n, BLOCK, d), dtype=dtype)
        if self.remote is not None:
            coords = np.empty((n, 2), dtype=self._array(slide_id, "coords")[0].dtype)
            grid = np.empty((n, 2), dtype=self._array(slide_id, "grid")[0].dtype)
            self._read_remote([(slide_id, "x5", x5), (slide_id, "x20", x20), (slide_id, "coords", coords),
                               (slide_id, "grid", grid)])
            return SlideData(slide_id, x5, x20, coords, grid, np.arange(n, dtype=np.int64))
        self._read_into(slide_id, "x5", x5)
        self._read_into(slide_id, "x20", x20)
        return SlideData(slide_id, x5, x20, self.read_array(slide_id, "coords"),
                         self.read_array(slide_id, "grid"), np.arange(n, dtype=np.int64))

    def read_patient(self, slide_ids: Sequence[str], dtype: Any = np.float32) -> PatientData:
        """Slides concatenated in the given order, decoded straight into one output per array."""
        if not slide_ids:
            raise StoreError("read_patient needs at least one slide id")
        lengths = [self._checked_n_patches(s, ("x5", "x20", "coords")) for s in slide_ids]
        total, d = sum(lengths), self.feature_dim
        x5 = np.empty((total, d), dtype=dtype)
        x20 = np.empty((total, BLOCK, d), dtype=dtype)
        coords = []
        start = 0
        if self.remote is not None:
            jobs = []
            for sid, n in zip(slide_ids, lengths):
                coords.append(np.empty((n, 2), dtype=self._array(sid, "coords")[0].dtype))
                jobs += [(sid, "x5", x5[start : start + n]), (sid, "x20", x20[start : start + n]),
                         (sid, "coords", coords[-1])]
                start += n
            self._read_remote(jobs)
            return PatientData(x5, x20, patient_grid(coords), list(slide_ids), lengths)
        for sid, n in zip(slide_ids, lengths):
            self._read_into(sid, "x5", x5[start : start + n])
            self._read_into(sid, "x20", x20[start : start + n])
            coords.append(self.read_array(sid, "coords"))
            start += n
        return PatientData(x5, x20, patient_grid(coords), list(slide_ids), lengths)

    def read_region(self, slide_id: str, cols: slice, rows: slice, dtype: Any = np.float32) -> SlideData:
        """Patches whose grid cell lies in `cols` x `rows` (patch-grid units, half-open).

        Looks the rows up in `grid_index` and decodes only the chunks holding them; the result
        keeps source order (`.rows` gives each patch's row in the slide).
        """
        self._checked_n_patches(slide_id)
        shape = tuple(self._array(slide_id, "grid_index")[0].shape)
        if len(shape) != 2:
            raise StoreError(f"{self._full_name(slide_id, 'grid_index')}: has shape {shape}, expected [rows, cols]")
        index = self.read_array(slide_id, "grid_index")
        sel = index[rows, cols]
        picked = np.sort(sel[sel >= 0].astype(np.int64))
        d = self.feature_dim
        x5 = np.empty((len(picked), d), dtype=dtype)
        x20 = np.empty((len(picked), BLOCK, d), dtype=dtype)
        coords = np.empty((len(picked), 2), dtype=np.int64)
        grid = np.empty((len(picked), 2), dtype=np.int32)
        if len(picked):
            for name, out in (("x5", x5), ("x20", x20), ("coords", coords), ("grid", grid)):
                self._read_into(slide_id, name, out, picked)
        return SlideData(slide_id, x5, x20, coords, grid, picked)

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, slides={len(self.slide_ids)}, dtype={self.attrs.get('dtype')})"


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else ""


def _read_error(full_name: str, exc: BaseException) -> StoreError:
    """The StoreError for a failed read of one array (a StoreError passes unchanged)."""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, MemoryError):
        return StoreError(f"{full_name}: out of memory while decoding it")
    if isinstance(exc, OSError):
        return StoreError(f"{full_name}: cannot read ({exc})")
    # zarr's pipeline raises many types (checksum: ValueError)
    return StoreError(f"{full_name}: cannot decode ({type(exc).__name__}: {_first_line(exc)})")
