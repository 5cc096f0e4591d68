"""Read API of a `dsca-store/1` store: slides, patients and patch-grid regions.

Metadata comes from zarr (consolidated once per store). Array bytes of the layout `convert`
writes (one shard per array, raw or numcodecs-compressed inner chunks + crc32c, index at the
end) are read by a small direct path: whole chunks are decoded by a thread pool straight into
one preallocated output (casting float16 -> float32 in the same pass), which is several times
faster than zarr's generic pipeline for this access pattern. Any other layout falls back to
zarr itself; tests prove both paths return the same arrays.

The direct path does not recompute the crc32c of each chunk (that would cost about as much as
the read itself); `dsca-store verify` reads every chunk through zarr, which does.
"""
from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import torch
import zarr
import zarr.codecs as zc

from dsca.coords import patient_grid
from dsca.store._layout import FORMAT, SLIDES, complete_slides

__all__ = ["FeatureStore", "SlideData", "PatientData", "StoreError"]

log = logging.getLogger(__name__)

_POOL = None
_POOL_PID = -1


def _pool() -> ThreadPoolExecutor:
    # per process: a pool inherited through fork has no threads behind it
    global _POOL, _POOL_PID
    if _POOL is None or _POOL_PID != os.getpid():
        _POOL = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="dsca-store")
        _POOL_PID = os.getpid()
    return _POOL


class StoreError(Exception):
    """The store (or a slide in it) cannot be read; the message names it and why."""


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


@dataclass(frozen=True)
class _Layout:
    """What the direct path needs to know about one array's single shard."""

    path: Path
    shape: tuple[int, ...]
    dtype: np.dtype
    chunk_rows: int
    n_chunks: int
    decoder: Any | None  # numcodecs codec, None = raw bytes


def _direct_layout(arr: zarr.Array, folder: Path) -> _Layout | None:
    """The array's layout when it is the one `convert` writes, else None (zarr fallback)."""
    meta = arr.metadata
    try:
        codecs = meta.codecs
        if len(codecs) != 1 or not isinstance(codecs[0], zc.ShardingCodec):
            return None
        shard = codecs[0]
        if shard.index_location != zc.ShardingCodecIndexLocation.end:
            return None
        inner = list(shard.codecs)
        if not isinstance(inner[0], zc.BytesCodec) or not isinstance(inner[-1], zc.Crc32cCodec):
            return None
        if arr.dtype.itemsize > 1 and inner[0].endian is not None and inner[0].endian.value != "little":
            return None
        middle = inner[1:-1]
        decoder = None
        if len(middle) == 1 and isinstance(middle[0], zc.ZstdCodec):
            decoder = numcodecs.Zstd()
        elif len(middle) == 1 and isinstance(middle[0], zc.BloscCodec):
            decoder = numcodecs.Blosc()
        elif middle:
            return None
        if list(meta.chunk_grid.chunk_shape)[0] < arr.shape[0]:
            return None  # more than one shard
        if tuple(shard.chunk_shape[1:]) != tuple(arr.shape[1:]):
            return None
        chunk_rows = int(shard.chunk_shape[0])
        n_chunks = int(meta.chunk_grid.chunk_shape[0]) // chunk_rows
        path = folder / "c" / "/".join("0" for _ in arr.shape)
        return _Layout(path, tuple(arr.shape), np.dtype(arr.dtype), chunk_rows, n_chunks, decoder)
    except (AttributeError, TypeError, IndexError):
        return None


def _cast_into(out: np.ndarray, block: np.ndarray) -> None:
    """out[...] = block, converting dtype in the same pass."""
    if out.dtype != block.dtype and out.dtype.kind == "f" and block.dtype.kind == "f":
        # torch's half->float conversion is vectorised; numpy's is a scalar loop on many builds
        torch.from_numpy(out).copy_(torch.from_numpy(np.ascontiguousarray(block)))
    else:
        np.copyto(out, block, casting="unsafe")


def _read_rows_direct(layout: _Layout, out: np.ndarray, chunks: Sequence[int] | None = None,
                      rows: np.ndarray | None = None) -> None:
    """Decode chunks of `layout` into `out`.

    Args:
        out: [N, ...] (all rows) or [len(rows), ...] when `rows` is given.
        chunks: which inner chunks to read (default: all).
        rows: sorted row numbers wanted (default: all rows).
    """
    n = layout.shape[0]
    row_elems = int(np.prod(layout.shape[1:], dtype=np.int64))
    chunk_bytes = layout.chunk_rows * row_elems * layout.dtype.itemsize
    fd = os.open(layout.path, os.O_RDONLY)
    try:
        index_bytes = 16 * layout.n_chunks + 4
        size = os.fstat(fd).st_size
        index = np.frombuffer(os.pread(fd, index_bytes, size - index_bytes)[:-4], dtype="<u8").reshape(-1, 2)
        wanted = range(layout.n_chunks) if chunks is None else chunks

        def one(k: int) -> None:
            lo, hi = k * layout.chunk_rows, min(n, (k + 1) * layout.chunk_rows)
            offset, nbytes = int(index[k, 0]), int(index[k, 1])
            if offset == 2**64 - 1:  # chunk never written: fill value
                block = np.zeros((hi - lo, *layout.shape[1:]), dtype=layout.dtype)
            else:
                # writable buffers all the way: torch refuses to wrap read-only memory
                raw = bytearray(nbytes)
                if os.preadv(fd, [raw], offset) != nbytes:
                    raise StoreError(f"{layout.path}: truncated shard (chunk {k})")
                payload: Any = memoryview(raw)[:-4]
                if layout.decoder is not None:
                    decoded = bytearray(chunk_bytes)
                    payload = layout.decoder.decode(payload, out=decoded)
                if len(payload) != chunk_bytes:
                    raise StoreError(f"{layout.path}: chunk {k} decodes to {len(payload)} bytes, expected {chunk_bytes}")
                block = np.frombuffer(payload, dtype=layout.dtype).reshape(layout.chunk_rows, *layout.shape[1:])
                block = block[: hi - lo]
            if rows is None:
                _cast_into(out[lo:hi], block)
            else:
                a, b = np.searchsorted(rows, [lo, hi])
                _cast_into(out[a:b], block[rows[a:b] - lo])

        list(_pool().map(one, wanted))
    finally:
        os.close(fd)


class FeatureStore:
    """A `dsca-store/1` Zarr store opened for reading (see ARCHITECTURE.md, Store format)."""

    def __init__(self, root: zarr.Group, path: Path) -> None:
        self._root = root
        self.path = path
        self.attrs: dict[str, Any] = dict(root.attrs)
        if self.attrs.get("format") != FORMAT:
            raise StoreError(f"{path}: not a {FORMAT} store (format={self.attrs.get('format')!r})")
        self._arrays: dict[tuple[str, str], tuple[zarr.Array, _Layout | None]] = {}
        # a slide is only read once convert finished it (attrs "complete")
        if root.metadata.consolidated_metadata is not None:
            # what convert consolidated at its end: no file read per slide
            self._slide_attrs = {sid: dict(g.attrs) for sid, g in root[SLIDES].groups()
                                 if g.attrs.get("complete") is True}
        else:
            # a convert is running or was killed: zarr's listing would fail on a half-written
            # group, so list the complete ones from their own zarr.json
            self._slide_attrs = complete_slides(path)
        self.slide_ids: list[str] = sorted(self._slide_attrs)

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> FeatureStore:
        """Open a store; `mode="r"` (default) or `"r+"`."""
        p = Path(path)
        if not (p / "zarr.json").is_file():
            raise StoreError(f"{p}: no zarr store here (missing zarr.json)")
        try:
            with warnings.catch_warnings():  # consolidated metadata is used knowingly
                warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
                root = zarr.open_group(p, mode=mode)
        except Exception as exc:  # noqa: BLE001 - zarr raises many types for a bad store
            raise StoreError(f"{p}: cannot open store ({exc})") from None
        return cls(root, p)

    # --- metadata ---------------------------------------------------------------------------
    @property
    def feature_dim(self) -> int:
        return int(self.attrs["feature_dim"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.attrs["dtype"])

    def slide_attrs(self, slide_id: str) -> dict[str, Any]:
        self._check(slide_id)
        return self._slide_attrs[slide_id]

    def n_patches(self, slide_id: str) -> int:
        return int(self.slide_attrs(slide_id)["n_patches"])

    def patient_slides(self) -> dict[str, list[str]]:
        """patient id -> its slides (sorted), for slides converted with labels."""
        out: dict[str, list[str]] = {}
        for sid in self.slide_ids:
            pid = self._slide_attrs[sid].get("patient_id")
            if pid is not None:
                out.setdefault(str(pid), []).append(sid)
        return out

    def _check(self, slide_id: str) -> None:
        if slide_id not in self._slide_attrs:
            raise StoreError(f"{self.path}: slide {slide_id!r} is not in the store (or not complete)")

    def _array(self, slide_id: str, name: str) -> tuple[zarr.Array, _Layout | None]:
        key = (slide_id, name)
        if key not in self._arrays:
            self._check(slide_id)
            arr = self._root[f"{SLIDES}/{slide_id}/{name}"]
            layout = None
            if isinstance(self._root.store, zarr.storage.LocalStore):
                layout = _direct_layout(arr, self.path / SLIDES / slide_id / name)
            self._arrays[key] = (arr, layout)
        return self._arrays[key]

    # --- array reads ------------------------------------------------------------------------
    def _read_into(self, slide_id: str, name: str, out: np.ndarray, rows: np.ndarray | None = None) -> None:
        arr, layout = self._array(slide_id, name)
        try:
            if layout is None:
                data = arr[...] if rows is None else arr.get_orthogonal_selection((rows,))
                np.copyto(out, data, casting="unsafe")
            elif rows is None:
                _read_rows_direct(layout, out)
            else:
                chunks = np.unique(rows // layout.chunk_rows).tolist()
                _read_rows_direct(layout, out, chunks, rows)
        except OSError as exc:
            raise StoreError(f"{self.path}: slide {slide_id}: cannot read {name} ({exc})") from None

    def read_array(self, slide_id: str, name: str, dtype: Any = None) -> np.ndarray:
        """One stored array (x5, x20, coords, grid, grid_index) of a slide, whole."""
        arr, _ = self._array(slide_id, name)
        out = np.empty(arr.shape, dtype=dtype or arr.dtype)
        self._read_into(slide_id, name, out)
        return out

    def read_slide(self, slide_id: str, dtype: Any = np.float32) -> SlideData:
        """All rows of one slide in source order; features cast to `dtype`."""
        n, d = self.n_patches(slide_id), self.feature_dim
        x5 = np.empty((n, d), dtype=dtype)
        x20 = np.empty((n, 16, d), dtype=dtype)
        self._read_into(slide_id, "x5", x5)
        self._read_into(slide_id, "x20", x20)
        return SlideData(slide_id, x5, x20, self.read_array(slide_id, "coords"),
                         self.read_array(slide_id, "grid"), np.arange(n, dtype=np.int64))

    def read_patient(self, slide_ids: Sequence[str], dtype: Any = np.float32) -> PatientData:
        """Slides concatenated in the given order, decoded straight into one output per array."""
        if not slide_ids:
            raise StoreError("read_patient needs at least one slide id")
        lengths = [self.n_patches(s) for s in slide_ids]
        total, d = sum(lengths), self.feature_dim
        x5 = np.empty((total, d), dtype=dtype)
        x20 = np.empty((total, 16, d), dtype=dtype)
        coords = []
        start = 0
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
        index = self.read_array(slide_id, "grid_index")
        sel = index[rows, cols]
        picked = np.sort(sel[sel >= 0].astype(np.int64))
        d = self.feature_dim
        x5 = np.empty((len(picked), d), dtype=dtype)
        x20 = np.empty((len(picked), 16, d), dtype=dtype)
        coords = np.empty((len(picked), 2), dtype=np.int64)
        grid = np.empty((len(picked), 2), dtype=np.int32)
        if len(picked):
            for name, out in (("x5", x5), ("x20", x20), ("coords", coords), ("grid", grid)):
                self._read_into(slide_id, name, out, picked)
        return SlideData(slide_id, x5, x20, coords, grid, picked)

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, slides={len(self.slide_ids)}, dtype={self.attrs.get('dtype')})"
