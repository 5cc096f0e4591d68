"""Stores on object storage: `s3://bucket/cohort.zarr` and any other fsspec URL.

A store location is either a local folder (a :class:`~pathlib.Path`, or a str without a
scheme, or ``file://...``) or a URL (``<scheme>://...``). A URL is never put through
:class:`~pathlib.Path` (which would collapse ``s3://b/x`` to ``s3:/b/x``): it stays a str in
every message.

:class:`RemoteLocation` is the one place that talks to the object store outside zarr: listing
``slides/``, reading metadata documents, uploading and deleting objects (convert, see
:mod:`dsca.store.remote_write`). zarr itself reads through :class:`ChunkStore`, a thin wrapper
of zarr's ``FsspecStore`` that

* records chunk objects that are absent (zarr reads them as fill value; for a slide written
  with every chunk stored, that is damage the reader reports, without a listing per array), and
* with a cache folder, keeps every chunk object it fetched on local disk (read-through cache).

Credentials and the endpoint come from the standard environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``: botocore, under s3fs, reads them itself) or
from ``storage_options``, the keyword arguments of the fsspec file system.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import zarr
from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import FsspecStore, WrapperStore

from dsca.store._layout import SLIDES, slide_id_problem
from dsca.store.errors import StoreError

__all__ = ["ChunkStore", "RemoteLocation", "StorageOptions", "is_url", "local_path",
           "storage_options_problem"]

log = logging.getLogger(__name__)

StorageOptions = Mapping[str, Any]

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# storage_options key that asks for the read-through cache (also FeatureStore.open(cache_dir=))
CACHE_KEY = "cache_dir"


def is_url(location: str | Path) -> bool:
    """Whether `location` is a URL (``s3://...``, ``gs://...``; ``file://`` counts as local)."""
    return (isinstance(location, str) and _SCHEME.match(location) is not None
            and not location.lower().startswith("file://"))


def local_path(location: str | Path) -> Path:
    """The folder of a local location (``file://`` stripped)."""
    if isinstance(location, str) and location.lower().startswith("file://"):
        return Path(location[len("file://"):])
    return Path(location)


def storage_options_problem(options: Any) -> str | None:
    """Why `options` cannot be fsspec storage options (a mapping with str keys), or None."""
    if options is None:
        return None
    if not isinstance(options, Mapping):
        return f"storage_options must be a mapping of fsspec options, got {type(options).__name__}"
    bad = [k for k in options if not isinstance(k, str)]
    if bad:
        return f"storage_options keys must be strings, got {bad[0]!r}"
    return None


def _chunk_key(key: str) -> bool:
    return not key.endswith("zarr.json")


def _slice(data: bytes, byte_range: ByteRequest | None) -> bytes:
    """The part of a whole object that a zarr byte request asks for."""
    if byte_range is None:
        return data
    if isinstance(byte_range, RangeByteRequest):
        return data[byte_range.start:byte_range.end]
    if isinstance(byte_range, OffsetByteRequest):
        return data[byte_range.offset:]
    if isinstance(byte_range, SuffixByteRequest):
        return data[-byte_range.suffix:] if byte_range.suffix else b""
    raise ValueError(f"unexpected byte range {byte_range!r}")


class ChunkStore(WrapperStore):
    """zarr's FsspecStore, recording absent chunk objects and (with `cache`) caching chunks on disk.

    `cache`: a folder; each chunk object is fetched whole the first time any part of it is asked
    for and served from the folder afterwards (one GET per shard, then none). Metadata
    documents are never cached here (see :meth:`RemoteLocation.cache_folder`).
    """

    missing: set[str]
    cache: Path | None

    def __init__(self, store: Any, cache: Path | None = None) -> None:
        super().__init__(store)
        self.missing = set()
        self.cache = cache

    def _with_store(self, store: Any) -> ChunkStore:
        twin = type(self)(store, self.cache)
        twin.missing = self.missing
        return twin

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        if not _chunk_key(key):
            return await self._store.get(key, prototype, byte_range)
        if self.cache is None:
            value = await self._store.get(key, prototype, byte_range)
            if value is None:
                self.missing.add(key)
            return value
        data = await asyncio.to_thread(cache_read, self.cache, key)
        if data is None:
            whole = await self._store.get(key, prototype)
            if whole is None:
                self.missing.add(key)
                return None
            data = whole.to_bytes()
            await asyncio.to_thread(cache_write, self.cache, key, data)
        return prototype.buffer.from_bytes(_slice(data, byte_range))

    async def get_partial_values(self, prototype: BufferPrototype,
                                 key_ranges: Iterable[tuple[str, ByteRequest | None]]) -> list[Buffer | None]:
        return list(await asyncio.gather(*(self.get(key, prototype, rng) for key, rng in key_ranges)))



def cache_read(cache: Path, key: str) -> bytes | None:
    """A cached object, None when it is not cached."""
    try:
        return (cache / key).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None


def cache_write(cache: Path, key: str, data: bytes) -> None:
    """Keep a fetched object in the cache (a complete file or none: temp file + rename)."""
    path = cache / key
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:  # a full cache disk must not fail the read itself
        log.warning("%s: cannot cache %s (%s)", cache, key, exc.strerror or exc)


class RemoteLocation:
    """A store at a URL: its fsspec file system, and the object operations the store needs.

    Args:
        url: ``<scheme>://...`` (no trailing slash needed).
        storage_options: fsspec options (``key``, ``secret``, ``endpoint_url``,
            ``client_kwargs``, ...); the key ``cache_dir`` is taken out and means `cache_dir`.
        cache_dir: a local folder for the read-through chunk cache (None: no cache).
    """

    def __init__(self, url: str, storage_options: StorageOptions | None = None,
                 cache_dir: str | Path | None = None) -> None:
        import fsspec

        problem = storage_options_problem(storage_options)
        if problem:
            raise StoreError(f"{url}: {problem}")
        self.url = url.rstrip("/")
        options = dict(storage_options or {})
        cache = options.pop(CACHE_KEY, None)
        self.cache_dir = Path(cache_dir or cache) if (cache_dir or cache) else None
        self.options = options
        try:
            self.fs, self.root = fsspec.url_to_fs(self.url, **options)
        except (ImportError, ValueError, TypeError) as exc:
            # an unknown scheme, or its package missing (s3:// needs s3fs: pip install dsca[s3])
            raise StoreError(f"{self.url}: cannot open this URL ({type(exc).__name__}: {exc})") from None
        self.root = self.root.rstrip("/")

    def __str__(self) -> str:
        return self.url

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    # --- reads ------------------------------------------------------------------------------
    def read(self, key: str) -> bytes | None:
        """The object `key` (relative to the store), None when it does not exist."""
        try:
            return self.fs.cat_file(self._path(key))
        except FileNotFoundError:
            return None

    def read_many(self, keys: Iterable[str]) -> dict[str, bytes | None]:
        """key -> object bytes (None: absent), fetched concurrently."""
        keys = list(keys)
        if not keys:
            return {}
        got = self.fs.cat([self._path(k) for k in keys], on_error="return")
        out: dict[str, bytes | None] = {}
        for key in keys:
            value = got.get(self._path(key))
            if isinstance(value, FileNotFoundError) or value is None:
                out[key] = None
            elif isinstance(value, BaseException):
                raise value
            else:
                out[key] = value
        return out

    def fetch(self, keys: Iterable[str], cache: Path | None = None) -> dict[str, bytes | None]:
        """Whole objects (None: absent), fetched concurrently; each one fetched is kept in
        `cache` (the caller has looked there first)."""
        fetched = self.read_many(keys)
        if cache is not None:
            for key, data in fetched.items():
                if data is not None:
                    cache_write(cache, key, data)
        return fetched

    def read_json(self, key: str) -> Any:
        """A metadata document as parsed JSON (None: absent); ValueError when it is no JSON."""
        data = self.read(key)
        return None if data is None else json.loads(data)

    def children(self, key: str) -> list[str]:
        """Names directly under `key` ("folders" and objects), fresh from the server."""
        path = self._path(key)
        self.fs.invalidate_cache(path)
        try:
            found = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        # an object named like the prefix itself lists as its own only entry
        return sorted({str(p).rstrip("/").rsplit("/", 1)[-1] for p in found if str(p).rstrip("/") != path})

    def sizes(self) -> dict[str, int]:
        """key -> size of every object of the store (one recursive listing)."""
        self.fs.invalidate_cache(self.root)
        try:
            found = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            return {}
        cut = len(self.root) + 1
        return {str(p)[cut:]: int(info.get("size") or 0) for p, info in found.items()}

    def slide_documents(self) -> dict[str, bytes | None]:
        """slide id -> its group zarr.json (None: the slide's folder has objects but no document)."""
        ids = [c for c in self.children(SLIDES) if slide_id_problem(c) is None]
        docs = self.read_many(f"{SLIDES}/{sid}/zarr.json" for sid in ids)
        return {sid: docs[f"{SLIDES}/{sid}/zarr.json"] for sid in ids}

    def complete_slides(self) -> dict[str, dict[str, Any]]:
        """slide id -> attrs of every slide whose own zarr.json marks it complete (as
        :func:`dsca.store._layout.complete_slides` does for a folder)."""
        out = {}
        for sid, body in self.slide_documents().items():
            try:
                attrs = json.loads(body).get("attributes", {}) if body is not None else None
            except (ValueError, AttributeError):
                attrs = None
            if isinstance(attrs, dict) and attrs.get("complete") is True:
                out[sid] = attrs
        return out

    def absent_reason(self) -> str:
        """Why the store's root document is absent: no such bucket (first path component), or
        no store at this path."""
        top = self.root.split("/", 1)[0]
        try:
            bucket_there = top == self.root or self.fs.exists(top)
        except Exception:  # noqa: BLE001 - e.g. no permission to look at the bucket itself
            bucket_there = True
        if not bucket_there:
            return f"bucket {top!r} does not exist (or these credentials cannot see it)"
        return "no zarr store here (missing zarr.json)"

    # --- writes -----------------------------------------------------------------------------
    def put(self, files: Mapping[str, Path]) -> None:
        """Upload local files: key -> file (concurrently; an object is complete or absent)."""
        if files:
            keys = list(files)
            self.fs.put([str(files[k]) for k in keys], [self._path(k) for k in keys])

    def write(self, key: str, body: bytes) -> None:
        self.fs.pipe_file(self._path(key), body)

    def delete(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        if keys:
            try:
                self.fs.rm([self._path(k) for k in keys])
            except FileNotFoundError:
                pass

    def keys_under(self, prefix: str) -> list[str]:
        """Every object key under `prefix/` (relative to the store)."""
        path = self._path(prefix)
        self.fs.invalidate_cache(path)
        try:
            found = self.fs.find(path)
        except FileNotFoundError:
            return []
        cut = len(self.root) + 1
        return sorted(str(p)[cut:] for p in found)

    # --- zarr -------------------------------------------------------------------------------
    def cache_folder(self, root_doc: bytes) -> Path | None:
        """The cache folder for the store as `root_doc` (its root zarr.json) describes it.

        Chunk keys are reused when a slide is converted again, so cached bytes are only valid
        for one version of the store: the folder is named by the store's URL and a hash of its
        consolidated root document, which changes with every convert that changes a slide.
        A store without consolidated metadata (a convert is writing it) is not cached.
        """
        if self.cache_dir is None:
            return None
        try:
            consolidated = json.loads(root_doc).get("consolidated_metadata")
        except (ValueError, AttributeError):
            consolidated = None
        if not consolidated:
            log.warning("%s: no consolidated metadata (a convert may be writing it): reading without the cache",
                        self.url)
            return None
        name = hashlib.sha256(self.url.encode()).hexdigest()[:16]
        version = hashlib.sha256(root_doc).hexdigest()[:16]
        return self.cache_dir / name / version

    def zarr_store(self, read_only: bool = True, cache: Path | None = None) -> ChunkStore:
        """zarr's store for this location (a :class:`ChunkStore` over zarr's FsspecStore)."""
        try:
            store = FsspecStore.from_url(self.url, storage_options=self.options, read_only=read_only)
        except (ImportError, ValueError, TypeError) as exc:
            raise StoreError(f"{self.url}: cannot open this URL ({type(exc).__name__}: {exc})") from None
        return ChunkStore(store, cache)

    def open_group(self, mode: str = "r", cache: Path | None = None, use_consolidated: bool | None = None) -> zarr.Group:
        return zarr.open_group(store=self.zarr_store(read_only=mode == "r", cache=cache), mode=mode,
                               use_consolidated=use_consolidated)
