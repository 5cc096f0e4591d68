"""Writing a `dsca-store/1` store: slide groups, the root's metadata, the lock of a run.

A slide group is written into a hidden temp folder beside its place, array by array (each in
one go: a partial write of a shard rewrites the whole shard), marked ``complete`` in one
atomic metadata write after all its data, and only then swapped in (:func:`write_slide`). A
kill at any point therefore leaves either the previous version of the slide or none, never a
group that claims to be complete and is not; readers ignore incomplete slides and the next run
removes what a killed one left (:func:`remove_temp_files`).

The store's life in one run: :func:`lock_store` (one convert at a time, a lock that dies with
its process), :func:`init_store` (create the root or check an existing one),
:func:`update_root` / :func:`update_slides` (metadata only), :func:`finish_store`
(consolidated metadata, or the removal of a new store left without any complete slide).
Nothing outside ``slides/<valid slide id>/`` and the store's own metadata files is ever
deleted or written.

A sharded convert (``convert --shard I/N``) runs N of these at once on one store: each shard
holds the lock shared (:func:`lock_store` ``shared=True``) and writes only its own slides;
:func:`join_store` creates the root exactly once and brings it, from every shard, to the same
state (no consolidated metadata, the feature dim, the :data:`~dsca.store._layout.SHARDED`
marker); nothing else of the root is written until ``dsca-store finalize`` (or a convert
without ``--shard``) runs :func:`finish_store` under the exclusive lock.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from dsca import __version__
from dsca.atomic import atomic_write
from dsca.coords import SCALE
from dsca.store._layout import (
    FORMAT,
    LEVELS,
    SHARDED,
    SLIDES,
    TEMP_FILE,
    codec_chain,
    complete_attrs,
    complete_slides,
    rows_per_chunk,
    slide_folder,
    slide_id_problem,
)
from dsca.store._signals import stop_signals_deferred
from dsca.store.errors import ConvertError

__all__ = ["NewStore", "WriteFailed", "finish_store", "init_store", "join_store", "lock_store",
           "remove_if_incomplete", "remove_temp_files", "root_attrs", "update_root", "update_slides", "write_slide"]

log = logging.getLogger(__name__)

# a slide's half-written folder, as _temp_sibling names it: `.<slide id>.<12 hex>.tmp`
_TEMP_SLIDE = re.compile(r"\.(.+)\.[0-9a-f]{12}\.tmp")
# how long a shard waits for a root zarr.json that another shard is still writing (only on
# file systems without hard links, where the root is created by an exclusive open + write)
_ROOT_WAIT_SECONDS = 10.0


def _array_spec(data: np.ndarray, codec: str) -> dict:
    """create_array keywords for one slide array: ~CHUNK_BYTES inner chunks in one shard."""
    rows = rows_per_chunk(int(np.prod(data.shape[1:])) * data.dtype.itemsize)
    rows = min(rows, data.shape[0])
    # equal chunks: inner chunks are stored full-size, so a ragged last chunk would be padding
    n_chunks = -(-data.shape[0] // rows)
    rows = -(-data.shape[0] // n_chunks)
    return {
        "shape": data.shape,
        "dtype": data.dtype,
        "chunks": (rows, *data.shape[1:]),
        # one shard spanning the array: a slide array is one file
        "shards": (n_chunks * rows, *data.shape[1:]),
        "compressors": codec_chain(codec) if data.dtype.kind == "f" else codec_chain("none"),
        "fill_value": 0,
        # every chunk stored, also an all-zero one: a chunk missing from the shard index (or a
        # missing shard file) is then damage that readers and verify report, never zeros
        "config": {"write_empty_chunks": True},
    }


def _write_group(folder: Path, arrays: dict[str, tuple[np.ndarray, str]], attrs: dict) -> None:
    """Write a slide's group: marked incomplete, each array in one go, then marked complete.

    zarr's public sync API, one call per step: writing the whole group as one coroutine
    through zarr's private sync helper was measured and is no faster.
    """
    # a store rooted at the slide's folder: zarr then has no parent groups to "ensure", which it
    # does by writing temp files into the root and slides/ folders on every create (a kill
    # would strand them there); everything this writes stays inside the slide's own folder
    group = zarr.create_group(store=str(folder), attributes={"complete": False}, zarr_format=3)
    for name, (data, codec) in arrays.items():
        group.create_array(name, **_array_spec(data, codec))[...] = data
    # one metadata write (atomic: zarr writes a temp file and renames it), after all the data:
    # the slide only counts once all of it is on disk
    group.update_attributes({**attrs, "complete": True})


def _temp_sibling(folder: Path) -> Path:
    """A hidden, unique folder beside `folder` (never a slide id: those cannot start with '.').

    Named like :func:`dsca.atomic.atomic_path`'s temp files (``.<name>.<hex>.tmp``), so that
    :data:`~dsca.store._layout.TEMP_FILE` matches both and a later run removes either.
    """
    return folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:12]}.tmp")


def _swap_in(new: Path, folder: Path) -> None:
    """Replace `folder` (if any) by `new`: two renames, then the old copy is deleted."""
    if folder.is_dir() and not folder.is_symlink():
        old = _temp_sibling(folder)
        folder.rename(old)
        new.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(folder)


class WriteFailed(Exception):
    """Writing to the store failed (disk full, permissions): fatal for the run, not the slide."""


def write_slide(out: str | Path, slide_id: str, arrays: dict[str, tuple[np.ndarray, str]],
                attrs: dict[str, Any]) -> None:
    """Write (or rewrite) one slide's group; a failure is a WriteFailed and leaves the store as it was.

    Args:
        arrays: name -> (data, codec preset), as :func:`dsca.store.validate.prepare_slide` lays them out.
        attrs: the group's attributes; ``complete: True`` is added with the last write.
    """
    folder = slide_folder(out, slide_id)
    new = _temp_sibling(folder)
    try:
        with stop_signals_deferred():
            # written beside the slide and swapped in when complete: a failed write (full
            # disk, a killed worker) leaves the complete slide it was to replace
            _write_group(new, arrays, attrs)
            _swap_in(new, folder)
    except Exception as exc:
        shutil.rmtree(new, ignore_errors=True)
        raise WriteFailed(f"{slide_id}: writing to {out} failed ({type(exc).__name__}: {exc})") from exc


def remove_if_incomplete(out: str | Path, slide_id: str) -> None:
    """Drop what an interrupted writer left of a slide (a finished slide stays)."""
    folder = slide_folder(out, slide_id)
    if complete_attrs(folder) is None:
        shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True)
class NewStore:
    """A store this run created; `folder`: the run also created its folder."""

    folder: bool


def init_store(out: Path, existed: bool, dtype: str, codec: str, extractor: str,
                explicit_extractor: bool) -> tuple[dict, NewStore | None]:
    """Create the root group or check an existing one; drop stale consolidated metadata.

    Returns (root attrs, what this call created or None). A failed creation (full disk,
    permissions) removes what it wrote: no half-initialised store is left behind.
    """
    if (out / "zarr.json").exists():
        try:
            root = zarr.open_group(out, mode="r+", use_consolidated=False)
            attrs = dict(root.attrs)
        except Exception as exc:  # noqa: BLE001 - zarr raises many types for a damaged store
            raise ConvertError(f"{out}: cannot open the existing store ({type(exc).__name__}: {exc})") from None
        _check_root(out, attrs, dtype, extractor, explicit_extractor)
        if SHARDED in attrs:
            log.warning("%s: the sharded convert writing it was not finalized; this convert (without --shard) "
                        "finishes it", out)
        try:
            if not (out / SLIDES / "zarr.json").is_file():
                root.create_group(SLIDES)
            _drop_consolidated(out)
        except OSError as exc:
            raise ConvertError(f"{out}: cannot update the store ({exc.strerror or exc})") from None
        return attrs, None
    attrs = _new_root_attrs(dtype, codec, extractor, None)
    try:
        root = zarr.create_group(store=str(out), attributes=attrs, zarr_format=3)
        root.create_group(SLIDES)
    except Exception as exc:
        _remove_new_store(out, existed)
        raise ConvertError(f"{out}: cannot create the store ({type(exc).__name__}: {exc})") from None
    return attrs, NewStore(folder=not existed)


def _new_root_attrs(dtype: str, codec: str, extractor: str, dim: int | None) -> dict[str, Any]:
    """The root attributes of a new store."""
    return {
        "format": FORMAT,
        "feature_dim": dim,
        "scale": SCALE,
        "dtype": dtype,
        "codec": codec,
        "levels": LEVELS,
        "extractor": extractor,
        "created_by": f"dsca {__version__}",
    }


def _check_root(out: Path, attrs: dict[str, Any], dtype: str, extractor: str, explicit_extractor: bool) -> None:
    """ConvertError unless an existing store's root attrs take this run's slides."""
    if attrs.get("format") != FORMAT:
        raise ConvertError(f"{out} exists but is not a {FORMAT} store (format={attrs.get('format')!r})")
    if attrs.get("dtype") != dtype:
        # even with --overwrite: slides that fail or are not redone would keep the old dtype
        raise ConvertError(f"{out} holds {attrs.get('dtype')} features, asked for {dtype}; "
                           "convert into a new --out")
    if attrs.get("extractor") != extractor:
        if explicit_extractor:  # features of two encoders in one store would train as one
            raise ConvertError(f"{out} holds features of {attrs.get('extractor')!r}, these are {extractor!r}; "
                               "convert into a new --out")
        log.warning("%s holds features recorded as %r; this run's feature folder is %r (pass --extractor "
                    "to make sure they are the same encoder)", out, attrs.get("extractor"), extractor)


def root_attrs(out: Path) -> dict[str, Any]:
    """The root attributes of the `dsca-store/1` store `out`, read from its own zarr.json
    (ConvertError if it has none, it is unreadable or not such a store)."""
    doc = _read_root_doc(out, wait=False)
    attrs = doc.get("attributes", {})
    if attrs.get("format") != FORMAT:
        raise ConvertError(f"{out} is not a {FORMAT} store (format={attrs.get('format')!r})")
    return attrs


def _read_root_doc(out: Path, wait: bool = True) -> dict[str, Any]:
    """The root's zarr.json as a dict; with `wait`, unparseable content is read again for a few
    seconds (another shard may be writing it). ConvertError when it stays unreadable."""
    deadline = time.monotonic() + (_ROOT_WAIT_SECONDS if wait else 0.0)
    while True:
        try:
            doc = json.loads((out / "zarr.json").read_text())
        except FileNotFoundError:
            raise ConvertError(f"{out}: no zarr store here (missing zarr.json)") from None
        except OSError as exc:
            raise ConvertError(f"{out}/zarr.json: cannot read it ({exc.strerror or exc})") from None
        except ValueError as exc:
            if time.monotonic() >= deadline:
                raise ConvertError(f"{out}/zarr.json: not valid JSON ({exc}); not a zarr store, or damaged") from None
            time.sleep(0.1)
            continue
        if not isinstance(doc, dict) or not isinstance(doc.get("attributes", {}), dict):
            raise ConvertError(f"{out}/zarr.json: not a zarr group's metadata")
        return doc


def _group_documents(attrs: dict[str, Any]) -> tuple[bytes, bytes]:
    """zarr.json of a new root group with `attrs`, and of its empty `slides` group, as zarr writes
    them (made in a scratch folder: the store itself only ever sees complete files)."""
    with tempfile.TemporaryDirectory(prefix="dsca-store-") as scratch:
        zarr.create_group(store=scratch, attributes=attrs, zarr_format=3).create_group(SLIDES)
        return (Path(scratch) / "zarr.json").read_bytes(), (Path(scratch) / SLIDES / "zarr.json").read_bytes()


def _create_exclusive(path: Path, body: bytes) -> bool:
    """Create `path` holding `body` unless it exists; True when this call created it.

    A hard link of a complete temp file: of several processes, exactly one succeeds, and the
    others never see a half-written file. Where the file system has no hard links, an exclusive
    open is the fallback (the others may then read it half-written: :func:`_read_root_doc` waits).
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _marker_problem(out: Path, found: Any, mine: dict[str, Any]) -> str | None:
    """Why a store's SHARDED marker `found` (None: absent) rules out a shard with marker `mine`."""
    if found is None or found == mine:
        return None
    fix = f"give every shard the same options, or run 'dsca-store finalize {out}' first"
    if not isinstance(found, dict):
        return f"{out}: root attribute {SHARDED} is unreadable ({found!r}); run 'dsca-store finalize {out}'"
    if found.get("shards") != mine["shards"]:
        return (f"{out} is being converted in {found.get('shards')} shards (not finalized yet); this shard is one of "
                f"{mine['shards']}: {fix}")
    diffs = "; ".join(f"{key} {found.get(key)!r} there, {value!r} here" for key, value in mine.items()
                      if found.get(key) != value)
    return f"{out} is being converted in shards with other settings ({diffs}): {fix}"


def join_store(out: Path, dtype: str, codec: str, extractor: str, explicit_extractor: bool, shards: int,
               cohort_dim: Callable[[], int | None]) -> tuple[dict[str, Any], bool]:
    """Create or join the store of a sharded convert (one of `shards` at once); call under the shared lock.

    Exactly one of the shards that start together creates the root (:func:`_create_exclusive`);
    each then checks it (format, dtype, extractor as :func:`init_store`; a marker of shards with
    another N, dtype, codec or extractor is a ConvertError) and writes the one root every shard
    computes alike: no consolidated metadata, `feature_dim` if none yet, the SHARDED marker. Any
    order of these writes ends in the same root. `cohort_dim` gives the dim of the whole cohort
    (the same in every shard); it is only called when the store records none.

    Returns (root attrs, whether this call created the root). A shard never removes a store:
    other shards may be writing into it.
    """
    marker = {"shards": shards, "dtype": dtype, "codec": codec, "extractor": extractor}
    dim_of = functools.cache(cohort_dim)
    created = False
    try:
        if not (out / "zarr.json").exists():
            root, _ = _group_documents({**_new_root_attrs(dtype, codec, extractor, dim_of()), SHARDED: marker})
            created = _create_exclusive(out / "zarr.json", root)
        doc = _read_root_doc(out)
        attrs = doc.get("attributes", {})
        _check_root(out, attrs, dtype, extractor, explicit_extractor)
        problem = _marker_problem(out, attrs.get(SHARDED), marker)
        if problem:
            raise ConvertError(problem)
        new = {key: value for key, value in doc.items() if key != "consolidated_metadata"}
        new["attributes"] = {**attrs, SHARDED: marker}
        if new["attributes"].get("feature_dim") is None and (dim := dim_of()) is not None:
            new["attributes"]["feature_dim"] = int(dim)
        if new != doc:
            with atomic_write(out / "zarr.json") as f:
                f.write(json.dumps(new, indent=2))
        if not (out / SLIDES / "zarr.json").is_file():
            (out / SLIDES).mkdir(exist_ok=True)
            with atomic_write(out / SLIDES / "zarr.json", "wb") as f:  # the same bytes from every shard
                f.write(_group_documents({})[1])
        final = _read_root_doc(out)["attributes"]
    except OSError as exc:
        raise ConvertError(f"{out}: cannot create or update the store ({exc.strerror or exc})") from None
    # shards with other settings that read the root before this one's write: the last write
    # wins, and the shards it overwrote stop here
    if final.get(SHARDED) != marker:
        raise ConvertError(_marker_problem(out, final.get(SHARDED), marker)
                           or f"{out}: another run removed this sharded convert's marker; run the shard again")
    return final, created


def _remove_new_store(out: Path, existed: bool) -> None:
    """Remove a store this run created and left without any complete slide.

    Only the names this module writes are removed, and an existing (empty) folder stays.
    """
    with contextlib.suppress(OSError):  # a read-only or vanished folder: nothing to undo
        (out / "zarr.json").unlink(missing_ok=True)
        for tmp in out.iterdir() if out.is_dir() else ():
            if TEMP_FILE.fullmatch(tmp.name) and tmp.is_file():
                tmp.unlink()
        slides = out / SLIDES
        if slides.is_dir():
            (slides / "zarr.json").unlink(missing_ok=True)
            for child in slides.iterdir():
                if slide_id_problem(child.name) is None and child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
            slides.rmdir()
        if not existed:
            out.rmdir()


def _drop_consolidated(out: Path) -> None:
    # a stale consolidated view would hide slides this run rewrites; it is rebuilt at the end
    meta = out / "zarr.json"
    doc = json.loads(meta.read_text())
    if doc.pop("consolidated_metadata", None) is not None:
        with atomic_write(meta) as f:
            f.write(json.dumps(doc, indent=2))


def remove_temp_files(out: Path, owns: Callable[[str], bool] | None = None) -> None:
    """What interrupted writes left: temp files of metadata writes (zarr's `*.partial`, ours
    `.*.tmp`) and half-written slide folders (`slides/.<id>.<hex>.tmp/`).

    `owns`: a shard of a sharded convert; only the half-written folders of the slides it owns
    are removed (the other shards' may be in the making), metadata temp files are left to
    finalize.
    """
    for folder, in_slides in ((out, False), (out / SLIDES, True)):
        for stale in folder.iterdir() if folder.is_dir() else ():
            if not TEMP_FILE.fullmatch(stale.name) or stale.is_symlink():
                continue
            if owns is not None:
                slide = _TEMP_SLIDE.fullmatch(stale.name)
                if not in_slides or slide is None or not stale.is_dir() or not owns(slide.group(1)):
                    continue
            if stale.is_file():
                stale.unlink()
            elif stale.is_dir() and in_slides:
                shutil.rmtree(stale, ignore_errors=True)


def update_root(out: Path, updates: dict[str, Any], drop: tuple[str, ...] = ()) -> None:
    """Set root attributes and remove those named in `drop` (one atomic zarr.json write, none
    when nothing changes); a failure is a ConvertError."""
    try:
        root = zarr.open_group(out, mode="r+", use_consolidated=False)
        old = dict(root.attrs)
        new = {key: value for key, value in {**old, **updates}.items() if key not in drop}
        if new != old:
            root.attrs.put(new)
    except Exception as exc:  # noqa: BLE001
        raise ConvertError(f"{out}: cannot update the store's metadata ({type(exc).__name__}: {exc})") from None


def update_slides(out: Path, updates: dict[str, dict[str, Any]]) -> None:
    """New attributes of complete slides: patient ids from changed labels, the new paths of
    moved (unchanged) sources.

    One atomic metadata write per slide; the data is untouched (readers group slides into
    patients by `patient_id`, so a stale one would train slides as the wrong patient).
    """
    relabelled = 0
    for sid, update in sorted(updates.items()):
        group = zarr.open_group(str(slide_folder(out, sid)), mode="r+", use_consolidated=False)
        if "patient_id" in update:
            relabelled += 1
            log.info("%s: patient id %r -> %r (from the labels CSV)", sid, group.attrs.get("patient_id"),
                     update["patient_id"])
        group.update_attributes(update)
    if relabelled:
        log.warning("%d complete slides got their patient id from this run's labels CSV", relabelled)


def finish_store(out: Path, created: NewStore | None, quiet: bool = False) -> None:
    """Make the store consistent however the run ends: temp files gone, codecs in use recorded,
    metadata consolidated; a store this run created that holds no complete slide is removed.
    `quiet`: a failure here is not raised (another error is already on its way)."""
    remove_temp_files(out)
    complete = complete_slides(out)
    if created is not None and not complete:
        _remove_new_store(out, existed=not created.folder)
        return
    codecs = sorted({str(a.get("codec", "?")) for a in complete.values()})
    try:
        # the marker of a sharded convert goes: this run (finalize, or a convert without
        # --shard) held the store alone, so no shard is writing and this consolidation is final
        update_root(out, {"codec": codecs[0] if len(codecs) == 1 else "mixed: " + ", ".join(codecs)} if codecs else {},
                    drop=(SHARDED,))
        # also after an error or Ctrl-C: readers then see every slide completed so far at once
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            zarr.consolidate_metadata(str(out))
    except Exception as exc:  # noqa: BLE001 - e.g. a full disk: the slides are complete, readers
        # fall back to listing them one by one; the next run consolidates
        remove_temp_files(out)
        if quiet:
            return
        raise ConvertError(f"{out}: the converted slides are complete, but writing the store's summary "
                           f"metadata failed ({type(exc).__name__}: {exc}); rerun to finish it") from None


def lock_store(out: Path, shared: bool = False) -> int:
    """Hold a lock on the store's folder for this run, taken before anything is written; returns its fd.

    Exclusive by default: two converts writing one store would delete each other's half-written
    slides (or, both creating it, one would remove the other's new store). `shared`: a shard of
    a sharded convert; shards hold it together (each writes only its own slides and removes only
    its own leftovers), a convert without --shard and finalize exclude them. flock on the folder
    itself leaves no file for zarr to trip over and dies with its process (also on kill -9): a
    crashed run never leaves a stale lock. Never waits: a busy store is a ConvertError.
    """
    try:
        fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise ConvertError(f"{out}: cannot open it ({exc.strerror or exc})") from None
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise ConvertError(f"{out}: cannot lock it ({exc.strerror or exc}); its file system may not "
                               "support flock") from None
        holder = ("another convert (one without --shard) or by finalize" if shared
                  else "another convert (maybe the shards of a sharded one) or by finalize")
        raise ConvertError(f"{out} is being written by {holder}; wait for it to finish") from None
    return fd
