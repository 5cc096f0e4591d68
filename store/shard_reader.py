"""Direct reads of the arrays `convert` writes: one shard file per array, straight into numpy.

The layout `convert` writes (one shard per array, raw or numcodecs-compressed inner chunks +
crc32c, the shard index at the end) is read without zarr's generic pipeline: whole chunks are
decoded by a thread pool straight into one preallocated output, casting float16 -> float32 in
the same pass (README, Store performance, has the speed-up). :func:`direct_layout` recognises the
layout and returns None for anything else, which the read API then reads through zarr itself;
tests prove both paths return the same arrays.

Nothing is returned that has not been accounted for: the shard index's own crc32c and every
(offset, nbytes) in it are checked on each read, a chunk that cannot be read or decoded to
exactly its size is a `StoreError` naming the slide and array, and with ``checked=True`` each
chunk's crc32c is verified before it is decoded, as zarr does.
"""
from __future__ import annotations

import itertools
import logging
import os
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

from dsca.store.errors import StoreError

__all__ = ["ShardLayout", "direct_layout", "read_rows_direct"]

log = logging.getLogger(__name__)

_POOL = None
_POOL_PID = -1


def _decode_pool() -> ThreadPoolExecutor:
    """The threads that decode chunks; one pool per process (one inherited through fork has no
    threads behind it)."""
    global _POOL, _POOL_PID
    if _POOL is None or _POOL_PID != os.getpid():
        _POOL = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="dsca-store")
        _POOL_PID = os.getpid()
    return _POOL


_MISSING = 2**64 - 1  # zarr's (offset, nbytes) of an inner chunk that was never written
_CRC_BYTES = 4

# shards already reported as absent (old-format slides read them as fill value): one warning
# per process and shard, not one per epoch
_WARNED_ABSENT: set[Path] = set()


@dataclass(frozen=True)
class ShardLayout:
    """What the direct path needs to know about one array's single shard.

    Attributes:
        full_name: "<store>: slide <id>: <array>", the start of every error about this array.
        all_chunks: the slide was written with every chunk (slide attr "all_chunks"), so a
            missing chunk or shard is damage; without it, zarr's semantics (fill value) hold.
    """

    full_name: str
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
        return StoreError(f"{self.full_name}: {what}")


def _is_little_bytes(codec: Any, itemsize: int) -> bool:
    return isinstance(codec, zc.BytesCodec) and (
        itemsize == 1 or codec.endian is None or codec.endian.value == "little")


def direct_layout(arr: zarr.Array, folder: Path, full_name: str, all_chunks: bool) -> ShardLayout | None:
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
        return ShardLayout(full_name, path, tuple(arr.shape), np.dtype(arr.dtype), chunk_rows, n_chunks, decoder,
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


class _Source:
    """The bytes of one shard: an open file (`fd`) or an object fetched whole (`data`)."""

    def __init__(self, fd: int | None = None, data: Any = None) -> None:
        self.fd = fd
        self.data = memoryview(data) if data is not None else None

    @property
    def size(self) -> int:
        return os.fstat(self.fd).st_size if self.data is None else len(self.data)

    def read(self, n: int, offset: int) -> bytes:
        return os.pread(self.fd, n, offset) if self.data is None else bytes(self.data[offset:offset + n])

    def read_into(self, buf: bytearray, offset: int) -> int:
        if self.data is None:
            return os.preadv(self.fd, [buf], offset)
        part = self.data[offset:offset + len(buf)]
        buf[:len(part)] = part
        return len(part)


def _read_index(src: _Source, layout: ShardLayout) -> np.ndarray:
    """The shard's [n_chunks, 2] (offset, nbytes), after checking it can be trusted.

    Checks its crc32c (so any flipped or truncated byte is caught) and then what a checksum
    cannot vouch for: every written chunk lies inside the data part of the file, before the
    index, without overlapping another, and a raw chunk is exactly its size + crc. Only then
    may the offsets drive reads and allocations (a corrupt nbytes once asked for exabytes).
    """
    index_bytes = 16 * layout.n_chunks + _CRC_BYTES
    size = src.size
    if size < index_bytes:
        raise layout.error(f"shard index corrupt (the file has {size} bytes, its index alone "
                           f"needs {index_bytes}: truncated?)")
    raw = src.read(index_bytes, size - index_bytes)
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


_FROM_FILE = object()  # read_rows_direct's default source: the shard file at layout.path


def read_rows_direct(layout: ShardLayout, out: np.ndarray, chunks: Sequence[int] | None = None,
                     rows: np.ndarray | None = None, checked: bool = True, data: Any = _FROM_FILE) -> None:
    """Decode chunks of `layout` into `out`; any damage found is a StoreError naming the array.

    Args:
        out: [N, ...] (all rows) or [len(rows), ...] when `rows` is given.
        chunks: which inner chunks to read (default: all).
        rows: sorted row numbers wanted (default: all rows).
        checked: verify each chunk's crc32c before decoding it.
        data: the shard's bytes, fetched whole (an object store's; None: the object is absent)
            instead of the file at ``layout.path``.
    """
    n = layout.shape[0]
    chunk_bytes = layout.chunk_bytes
    try:
        if data is None:
            raise FileNotFoundError(layout.path)
        fd = os.open(layout.path, os.O_RDONLY) if data is _FROM_FILE else None
    except FileNotFoundError:
        if layout.all_chunks:
            what = "shard file" if data is _FROM_FILE else f"shard object ({layout.path})"
            raise layout.error(f"{what} missing: deleted or never written") from None
        # zarr's semantics for a slide from before "all_chunks": a shard never written holds
        # only the fill value (an all-zero array was not stored)
        if layout.path not in _WARNED_ABSENT:
            _WARNED_ABSENT.add(layout.path)
            log.warning("%s: no shard file, read as fill value %r", layout.full_name, layout.fill_value)
        out[...] = layout.fill_value
        return
    src = _Source(fd=fd) if fd is not None else _Source(data=data)
    try:
        index = _read_index(src, layout)
        wanted = list(range(layout.n_chunks) if chunks is None else chunks)
        bad = [k for k in wanted if not 0 <= k < layout.n_chunks]
        if bad:
            raise layout.error(f"chunk {bad[0]} requested, the array has {layout.n_chunks}")

        def decode_chunk(k: int) -> None:
            """Chunk k -> its rows of `out`."""
            lo, hi = k * layout.chunk_rows, min(n, (k + 1) * layout.chunk_rows)
            offset, nbytes = int(index[k, 0]), int(index[k, 1])
            if offset == _MISSING:
                if layout.all_chunks:
                    raise layout.error(f"chunk {k} missing: deleted or never written")
                block = np.full((hi - lo, *layout.shape[1:]), layout.fill_value, dtype=layout.dtype)
            else:
                # writable buffers all the way: torch refuses to wrap read-only memory
                raw = bytearray(nbytes)
                got = src.read_into(raw, offset)
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

        def decode_chunk_or_store_error(k: int) -> None:
            """decode_chunk, its failures as one StoreError naming the array and chunk."""
            try:
                decode_chunk(k)
            except StoreError:
                raise
            except MemoryError:
                raise layout.error(f"chunk {k}: out of memory while decoding it") from None
            except OSError:
                raise  # the caller names the array and the OS error
            except Exception as exc:  # noqa: BLE001 - numcodecs/numpy decode errors come as many types
                raise layout.error(f"chunk {k} cannot be decoded ({type(exc).__name__}: {exc})") from None

        # wait for every chunk before closing fd (one failing must not close it under the others)
        futures = [_decode_pool().submit(decode_chunk_or_store_error, k) for k in wanted]
        wait(futures)
        for future in futures:
            future.result()  # the first failure, in chunk order
    finally:
        if fd is not None:
            os.close(fd)
