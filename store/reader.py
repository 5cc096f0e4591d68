"""Read API of a `dsca-store/1` store: slides, patients and patch-grid regions.

Metadata comes from zarr (consolidated once per store). Array bytes of the layout `convert`
writes (one shard per array, raw or numcodecs-compressed inner chunks + crc32c, index at the
end) are read by a small direct path: whole chunks are decoded by a thread pool straight into
one preallocated output (casting float16 -> float32 in the same pass), which is several times
faster than zarr's generic pipeline for this access pattern. Any other layout falls back to
zarr itself; tests prove both paths return the same arrays.

The direct path never returns bytes it has not accounted for: the shard index's own crc32c
and every (offset, nbytes) in it are checked on each read (a few dozen bytes), a chunk that
cannot be read or decoded to exactly its size is a `StoreError` naming the slide and array,
and with ``checked=True`` (see `FeatureStore.open`) each chunk's crc32c is verified before it
is decoded, as zarr does. `dsca-store verify` reads every chunk through zarr itself.
"""
from __future__ import annotations

import itertools
import logging
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c
import numcodecs
import numpy as np
import torch
import zarr
import zarr.codecs as zc

from dsca.coords import patient_grid
from dsca.store._layout import BLOCK, DTYPES, FORMAT, SCALE, SLIDES, complete_slides

__all__ = ["FeatureStore", "SlideData", "PatientData", "StoreError", "root_attrs_problem", "slide_attrs_problem"]

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


# Whether FeatureStore.open verifies chunk checksums unless told otherwise: yes, since it
# measured at about +10% of a patient read (FeatureStore.open's docstring has the numbers).
CHECKED_DEFAULT = True


class StoreError(Exception):
    """The store (or a slide in it) cannot be read; the message names it and why."""


MODES = ("r", "r+")  # FeatureStore.open never creates or truncates a store


def _is_int(value: Any, minimum: int) -> bool:
    # JSON gives int or float; a bool is an int to Python but never a count
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def root_attrs_problem(attrs: dict[str, Any], has_slides: bool) -> str | None:
    """Why a store's root attributes cannot be read, or None; `has_slides`: a complete slide exists.

    Checked: `dtype` float16/float32, `feature_dim` a positive int (None only while no slide
    is complete: convert records it before the first one), `scale` the layout's SCALE.
    """
    dtype = attrs.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        what = "missing" if "dtype" not in attrs else f"{dtype!r}"
        return f"root attribute dtype is {what}, expected one of {', '.join(DTYPES)}"
    dim = attrs.get("feature_dim")
    if dim is None:
        if has_slides:
            what = "missing" if "feature_dim" not in attrs else "null"
            return f"root attribute feature_dim is {what}, but the store holds complete slides"
    elif not _is_int(dim, 1):
        return f"root attribute feature_dim is {dim!r}, expected a positive integer"
    scale = attrs.get("scale")
    if not _is_int(scale, 0) or scale != SCALE:
        what = "missing" if "scale" not in attrs else f"{scale!r}"
        return f"root attribute scale is {what}, this reader knows only {SCALE} (4x4 x20 patches per x5 patch)"
    return None


def _count_problem(attrs: dict[str, Any], key: str, minimum: int, required: bool) -> str | None:
    if key not in attrs:
        return f"attribute {key} is missing" if required else None
    value = attrs[key]
    if not _is_int(value, minimum):
        return f"attribute {key} is {value!r}, expected an integer >= {minimum}"
    return None


def slide_attrs_problem(attrs: dict[str, Any]) -> str | None:
    """Why a complete slide's attributes cannot be used, or None.

    Checked: `n_patches` a positive int; where present, `grid_collisions` a count, `step` two
    positive ints, `patient_id` a string, `sources` role -> record with a byte count.
    """
    problem = _count_problem(attrs, "n_patches", 1, required=True) or _count_problem(
        attrs, "grid_collisions", 0, required=False)
    if problem:
        return problem
    if "step" in attrs:
        step = attrs["step"]
        if not (isinstance(step, list) and len(step) == 2 and all(_is_int(v, 1) for v in step)):
            return f"attribute step is {step!r}, expected two positive integers"
    pid = attrs.get("patient_id")
    if pid is not None and not isinstance(pid, str):
        return f"attribute patient_id is {pid!r}, expected a string"
    sources = attrs.get("sources", {})
    if not isinstance(sources, dict) or not all(
            isinstance(rec, dict) and _is_int(rec.get("bytes"), 0) for rec in sources.values()):
        return f"attribute sources is unreadable ({str(sources)[:80]!r}), expected role -> record with bytes"
    return None


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


_MISSING = 2**64 - 1  # zarr's (offset, nbytes) of an inner chunk that was never written
_CRC_BYTES = 4

# shards already reported as absent (old-format slides read them as fill value): one warning
# per process and shard, not one per epoch
_WARNED_ABSENT: set[Path] = set()


@dataclass(frozen=True)
class _Layout:
    """What the direct path needs to know about one array's single shard.

    Attributes:
        where: "<store>: slide <id>: <array>", the start of every error about this array.
        all_chunks: the slide was written with every chunk (slide attr "all_chunks"), so a
            missing chunk or shard is damage; without it, zarr's semantics (fill value) hold.
    """

    where: str
    path: Path
    shape: tuple[int, ...]
    dtype: np.dtype
    chunk_rows: int
    n_chunks: int
    decoder: Any | None  # numcodecs codec, None = raw bytes
    fill_value: Any
    all_chunks: bool

    @property
    def chunk_bytes(self) -> int:
        """Decoded bytes of one (full-size) inner chunk."""
        row_elems = int(np.prod(self.shape[1:], dtype=np.int64))
        return self.chunk_rows * row_elems * self.dtype.itemsize

    def error(self, what: str) -> StoreError:
        return StoreError(f"{self.where}: {what}")


def _is_little_bytes(codec: Any, itemsize: int) -> bool:
    return isinstance(codec, zc.BytesCodec) and (
        itemsize == 1 or codec.endian is None or codec.endian.value == "little")


def _direct_layout(arr: zarr.Array, folder: Path, where: str, all_chunks: bool) -> _Layout | None:
    """The array's layout when it is the one `convert` writes, else None (zarr fallback)."""
    meta = arr.metadata
    try:
        codecs = meta.codecs
        if len(codecs) != 1 or not isinstance(codecs[0], zc.ShardingCodec):
            return None
        shard = codecs[0]
        if shard.index_location != zc.ShardingCodecIndexLocation.end:
            return None
        # the index is parsed here as little-endian uint64 pairs + crc32c (zarr's default)
        index_codecs = list(shard.index_codecs)
        if (len(index_codecs) != 2 or not _is_little_bytes(index_codecs[0], 8)
                or not isinstance(index_codecs[1], zc.Crc32cCodec)):
            return None
        inner = list(shard.codecs)
        if not _is_little_bytes(inner[0], arr.dtype.itemsize) or not isinstance(inner[-1], zc.Crc32cCodec):
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
        return _Layout(where, path, tuple(arr.shape), np.dtype(arr.dtype), chunk_rows, n_chunks, decoder,
                       meta.fill_value, all_chunks)
    except (AttributeError, TypeError, IndexError):
        return None


def _cast_into(out: np.ndarray, block: np.ndarray) -> None:
    """out[...] = block, converting dtype in the same pass."""
    if out.dtype != block.dtype and out.dtype.kind == "f" and block.dtype.kind == "f":
        # torch's half->float conversion is vectorised; numpy's is a scalar loop on many builds
        torch.from_numpy(out).copy_(torch.from_numpy(np.ascontiguousarray(block)))
    else:
        np.copyto(out, block, casting="unsafe")


def _crc_ok(data: Any, stored: bytes) -> bool:
    """crc32c of `data` (a uint8 array) against the 4 little-endian bytes zarr appended."""
    return google_crc32c.value(data) == int.from_bytes(stored, "little")


def _read_index(fd: int, layout: _Layout) -> np.ndarray:
    """The shard's [n_chunks, 2] (offset, nbytes), after checking it can be trusted.

    Checks its crc32c (so any flipped or truncated byte is caught) and then what a checksum
    cannot vouch for: every written chunk lies inside the data part of the file, before the
    index, without overlapping another, and a raw chunk is exactly its size + crc. Only then
    may the offsets drive reads and allocations (a corrupt nbytes once asked for exabytes).
    """
    index_bytes = 16 * layout.n_chunks + _CRC_BYTES
    size = os.fstat(fd).st_size
    if size < index_bytes:
        raise layout.error(f"shard index corrupt (the file has {size} bytes, its index alone "
                           f"needs {index_bytes}: truncated?)")
    raw = os.pread(fd, index_bytes, size - index_bytes)
    if len(raw) != index_bytes:
        raise layout.error(f"shard index corrupt (read {len(raw)} of {index_bytes} bytes)")
    if not _crc_ok(np.frombuffer(raw, dtype=np.uint8, count=index_bytes - _CRC_BYTES), raw[-_CRC_BYTES:]):
        raise layout.error("shard index corrupt (crc32c mismatch: file truncated, overwritten or appended to?)")
    index = np.frombuffer(raw, dtype="<u8", count=2 * layout.n_chunks).reshape(-1, 2)
    data_end = size - index_bytes
    exact = layout.chunk_bytes + _CRC_BYTES if layout.decoder is None else None
    spans: list[tuple[int, int, int]] = []
    for k, (offset, nbytes) in enumerate(index.tolist()):
        if offset == _MISSING and nbytes == _MISSING:
            continue
        if offset == _MISSING or nbytes == _MISSING or offset + nbytes > data_end:
            raise layout.error(f"shard index corrupt (chunk {k} at bytes {offset}+{nbytes}, "
                               f"beyond the {data_end} bytes of chunk data)")
        if exact is not None and nbytes != exact:
            raise layout.error(f"shard index corrupt (chunk {k} has {nbytes} bytes, expected {exact})")
        if nbytes <= _CRC_BYTES:
            raise layout.error(f"shard index corrupt (chunk {k} has {nbytes} bytes: no payload)")
        spans.append((offset, nbytes, k))
    spans.sort()
    for (a_off, a_len, a), (b_off, _, b) in itertools.pairwise(spans):
        if a_off + a_len > b_off:
            raise layout.error(f"shard index corrupt (chunks {a} and {b} overlap)")
    return index


def _read_rows_direct(layout: _Layout, out: np.ndarray, chunks: Sequence[int] | None = None,
                      rows: np.ndarray | None = None, checked: bool = True) -> None:
    """Decode chunks of `layout` into `out`; any damage found is a StoreError naming the array.

    Args:
        out: [N, ...] (all rows) or [len(rows), ...] when `rows` is given.
        chunks: which inner chunks to read (default: all).
        rows: sorted row numbers wanted (default: all rows).
        checked: verify each chunk's crc32c before decoding it.
    """
    n = layout.shape[0]
    chunk_bytes = layout.chunk_bytes
    try:
        fd = os.open(layout.path, os.O_RDONLY)
    except FileNotFoundError:
        if layout.all_chunks:
            raise layout.error("shard file missing: deleted or never written") from None
        # zarr's semantics for a slide from before "all_chunks": a shard never written holds
        # only the fill value (an all-zero array was not stored)
        if layout.path not in _WARNED_ABSENT:
            _WARNED_ABSENT.add(layout.path)
            log.warning("%s: no shard file, read as fill value %r", layout.where, layout.fill_value)
        out[...] = layout.fill_value
        return
    try:
        index = _read_index(fd, layout)
        wanted = list(range(layout.n_chunks) if chunks is None else chunks)
        bad = [k for k in wanted if not 0 <= k < layout.n_chunks]
        if bad:
            raise layout.error(f"chunk {bad[0]} requested, the array has {layout.n_chunks}")

        def one(k: int) -> None:
            lo, hi = k * layout.chunk_rows, min(n, (k + 1) * layout.chunk_rows)
            offset, nbytes = int(index[k, 0]), int(index[k, 1])
            if offset == _MISSING:
                if layout.all_chunks:
                    raise layout.error(f"chunk {k} missing: deleted or never written")
                block = np.full((hi - lo, *layout.shape[1:]), layout.fill_value, dtype=layout.dtype)
            else:
                # writable buffers all the way: torch refuses to wrap read-only memory
                raw = bytearray(nbytes)
                got = os.preadv(fd, [raw], offset)
                if got != nbytes:
                    raise layout.error(f"truncated shard (chunk {k}: read {got} of {nbytes} bytes)")
                if checked and not _crc_ok(np.frombuffer(raw, dtype=np.uint8, count=nbytes - _CRC_BYTES),
                                           raw[-_CRC_BYTES:]):
                    raise layout.error(f"chunk {k} corrupt (crc32c mismatch)")
                payload: Any = memoryview(raw)[:-_CRC_BYTES]
                if layout.decoder is not None:
                    decoded = bytearray(chunk_bytes)
                    payload = layout.decoder.decode(payload, out=decoded)
                if len(payload) != chunk_bytes:
                    raise layout.error(f"chunk {k} decodes to {len(payload)} bytes, expected {chunk_bytes}")
                block = np.frombuffer(payload, dtype=layout.dtype).reshape(layout.chunk_rows, *layout.shape[1:])
                block = block[: hi - lo]
            if rows is None:
                _cast_into(out[lo:hi], block)
            else:
                a, b = np.searchsorted(rows, [lo, hi])
                _cast_into(out[a:b], block[rows[a:b] - lo])

        def guarded(k: int) -> None:
            try:
                one(k)
            except StoreError:
                raise
            except MemoryError:
                raise layout.error(f"chunk {k}: out of memory while decoding it") from None
            except OSError:
                raise  # the caller names the array and the OS error
            except Exception as exc:  # noqa: BLE001 - numcodecs/numpy decode errors come as many types
                raise layout.error(f"chunk {k} cannot be decoded ({type(exc).__name__}: {exc})") from None

        # wait for every chunk before closing fd (one failing must not close it under the others)
        futures = [_pool().submit(guarded, k) for k in wanted]
        wait(futures)
        for future in futures:
            future.result()  # the first failure, in chunk order
    finally:
        os.close(fd)


class FeatureStore:
    """A `dsca-store/1` Zarr store opened for reading (see ARCHITECTURE.md, Store format).

    Every read either returns the stored values or raises `StoreError` naming the store, slide
    and array; `checked` (see `open`) decides whether chunk checksums are part of that.
    """

    def __init__(self, root: zarr.Group, path: Path, checked: bool = CHECKED_DEFAULT) -> None:
        self._root = root
        self.path = path
        self.checked = checked
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
        # checked once here, so that info, verify and every read can rely on them
        problem = root_attrs_problem(self.attrs, bool(self.slide_ids))
        if problem:
            raise StoreError(f"{path}: {problem} (not written by dsca-store convert, or damaged)")

    @classmethod
    def open(cls, path: str | Path, mode: str = "r", checked: bool = CHECKED_DEFAULT) -> FeatureStore:
        """Open an existing store; `mode="r"` (default) or `"r+"`, never one that creates or
        truncates it (anything else is a ValueError, raised before the store is touched).

        Args:
            checked: verify each chunk's crc32c before decoding it, so that a flipped bit on
                disk is a StoreError instead of a wrong feature value. On by default: it
                costs +9% to +12% of a float32 patient read (31.3 vs 28.0 ms for 2 slides x
                1,000 patches, D=1024, 70 MB of float16 on a 2-core machine;
                benchmarks/test_bench_store.py::test_patient_load_checksum_cost), within the
                ~15% that a silent wrong value is worth. Without it the shard index is still
                checked (a corrupt index or a truncated file is always an error), but a
                damaged chunk payload reads as wrong numbers. Stores that fall back to zarr's
                pipeline are always checked by zarr.
        """
        if mode not in MODES:
            raise ValueError(f"FeatureStore.open: mode must be one of {', '.join(map(repr, MODES))}, got {mode!r} "
                             "(a store is written by dsca-store convert only)")
        p = Path(path)
        if not (p / "zarr.json").is_file():
            raise StoreError(f"{p}: no zarr store here (missing zarr.json)")
        try:
            with warnings.catch_warnings():  # consolidated metadata is used knowingly
                warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
                root = zarr.open_group(p, mode=mode)
        except Exception as exc:  # noqa: BLE001 - zarr raises many types for a bad store
            raise StoreError(f"{p}: cannot open store ({exc})") from None
        return cls(root, p, checked=checked)

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
        self._check(slide_id)
        return self._slide_attrs[slide_id]

    def n_patches(self, slide_id: str) -> int:
        problem = _count_problem(self.slide_attrs(slide_id), "n_patches", 1, required=True)
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

    def _check(self, slide_id: str) -> None:
        if slide_id not in self._slide_attrs:
            raise StoreError(f"{self.path}: slide {slide_id!r} is not in the store (or not complete)")

    def _where(self, slide_id: str, name: str) -> str:
        return f"{self.path}: slide {slide_id}: {name}"

    def _node(self, slide_id: str, name: str) -> zarr.Array:
        """The zarr array (its metadata only: nothing read or checked on disk yet)."""
        self._check(slide_id)
        try:
            arr = self._root[f"{SLIDES}/{slide_id}/{name}"]
        except KeyError:
            raise StoreError(f"{self._where(slide_id, name)}: array missing") from None
        if not isinstance(arr, zarr.Array):
            raise StoreError(f"{self._where(slide_id, name)}: not an array")
        return arr

    def _array(self, slide_id: str, name: str) -> tuple[zarr.Array, _Layout | None]:
        key = (slide_id, name)
        if key not in self._arrays:
            where = self._where(slide_id, name)
            arr = self._node(slide_id, name)
            # written by a convert that stores every chunk, even all-zero ones: anything absent
            # on disk was lost, not elided
            all_chunks = self._slide_attrs[slide_id].get("all_chunks") is True
            layout = None
            if isinstance(self._root.store, zarr.storage.LocalStore):
                layout = _direct_layout(arr, self.path / SLIDES / slide_id / name, where, all_chunks)
            if layout is None and all_chunks:
                # zarr itself reads an absent shard or chunk file as fill value; count them
                # (one listing of the array's folder, once per array and open)
                stored, total = arr.nchunks_initialized, arr.nchunks
                if stored < total:
                    raise StoreError(f"{where}: {total - stored} of {total} chunks missing: "
                                     "deleted or never written")
            self._arrays[key] = (arr, layout)
        return self._arrays[key]

    def _shape(self, slide_id: str, name: str) -> tuple[int, ...]:
        cached = self._arrays.get((slide_id, name))
        return tuple((cached[0] if cached else self._node(slide_id, name)).shape)

    def _check_rows(self, slide_id: str, names: Sequence[str] = ("x5", "x20", "coords", "grid")) -> int:
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
        where = self._where(slide_id, name)
        want = arr.shape[0] if rows is None else len(rows)
        if out.shape[:1] != (want,) or tuple(out.shape[1:]) != tuple(arr.shape[1:]):
            # e.g. n_patches in the slide attrs disagreeing with the array: never broadcast
            raise StoreError(f"{where}: stored shape {tuple(arr.shape)} does not fit the slide "
                             f"(reading {tuple(out.shape)})")
        if rows is not None and len(rows) and not 0 <= int(rows[0]) <= int(rows[-1]) < arr.shape[0]:
            raise StoreError(f"{where}: rows {int(rows[0])}..{int(rows[-1])} requested, "
                             f"the array has {arr.shape[0]}")
        try:
            if layout is None:
                data = arr[...] if rows is None else arr.get_orthogonal_selection((rows,))
                np.copyto(out, data, casting="unsafe")
            elif rows is None:
                _read_rows_direct(layout, out, checked=self.checked)
            else:
                chunks = np.unique(rows // layout.chunk_rows).tolist()
                _read_rows_direct(layout, out, chunks, rows, checked=self.checked)
        except StoreError:
            raise
        except OSError as exc:
            raise StoreError(f"{where}: cannot read ({exc})") from None
        except MemoryError:
            raise StoreError(f"{where}: out of memory while decoding it") from None
        except Exception as exc:  # noqa: BLE001 - zarr's pipeline raises many types (checksum: ValueError)
            first = str(exc).splitlines()[0][:200] if str(exc) else ""
            raise StoreError(f"{where}: cannot decode ({type(exc).__name__}: {first})") from None

    def read_array(self, slide_id: str, name: str, dtype: Any = None) -> np.ndarray:
        """One stored array (x5, x20, coords, grid, grid_index) of a slide, whole."""
        arr, _ = self._array(slide_id, name)
        out = np.empty(arr.shape, dtype=dtype or arr.dtype)
        self._read_into(slide_id, name, out)
        return out

    def read_slide(self, slide_id: str, dtype: Any = np.float32) -> SlideData:
        """All rows of one slide in source order; features cast to `dtype`."""
        n, d = self._check_rows(slide_id), self.feature_dim
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
        lengths = [self._check_rows(s, ("x5", "x20", "coords")) for s in slide_ids]
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
        self._check_rows(slide_id)
        shape = tuple(self._array(slide_id, "grid_index")[0].shape)
        if len(shape) != 2:
            raise StoreError(f"{self._where(slide_id, 'grid_index')}: has shape {shape}, expected [rows, cols]")
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
