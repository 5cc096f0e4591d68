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
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import uuid
import warnings
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

__all__ = ["NewStore", "WriteFailed", "finish_store", "init_store", "lock_store", "remove_if_incomplete",
           "remove_temp_files", "update_root", "update_slides", "write_slide"]

log = logging.getLogger(__name__)


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
        try:
            if not (out / SLIDES / "zarr.json").is_file():
                root.create_group(SLIDES)
            _drop_consolidated(out)
        except OSError as exc:
            raise ConvertError(f"{out}: cannot update the store ({exc.strerror or exc})") from None
        return attrs, None
    attrs = {
        "format": FORMAT,
        "feature_dim": None,
        "scale": SCALE,
        "dtype": dtype,
        "codec": codec,
        "levels": LEVELS,
        "extractor": extractor,
        "created_by": f"dsca {__version__}",
    }
    try:
        root = zarr.create_group(store=str(out), attributes=attrs, zarr_format=3)
        root.create_group(SLIDES)
    except Exception as exc:
        _remove_new_store(out, existed)
        raise ConvertError(f"{out}: cannot create the store ({type(exc).__name__}: {exc})") from None
    return attrs, NewStore(folder=not existed)


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


def remove_temp_files(out: Path) -> None:
    """What interrupted writes left: temp files of metadata writes (zarr's `*.partial`, ours
    `.*.tmp`) and half-written slide folders (`slides/.<id>.<hex>.tmp/`)."""
    for folder in (out, out / SLIDES):
        for stale in folder.iterdir() if folder.is_dir() else ():
            if not TEMP_FILE.fullmatch(stale.name) or stale.is_symlink():
                continue
            if stale.is_file():
                stale.unlink()
            elif stale.is_dir() and folder.name == SLIDES:
                shutil.rmtree(stale, ignore_errors=True)


def update_root(out: Path, updates: dict[str, Any]) -> None:
    """Set root attributes (one atomic zarr.json write); a failure is a ConvertError."""
    try:
        zarr.open_group(out, mode="r+", use_consolidated=False).attrs.update(updates)
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
        if codecs:
            update_root(out, {"codec": codecs[0] if len(codecs) == 1 else "mixed: " + ", ".join(codecs)})
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


def lock_store(out: Path) -> int:
    """Hold an exclusive lock on the store's folder for this run, taken before anything is written.

    Two converts writing one store would delete each other's half-written slides (or, both
    creating it, one would remove the other's new store). flock on the folder itself leaves no
    file for zarr to trip over and dies with its process (also on kill -9): a crashed run never
    leaves a stale lock.
    """
    try:
        fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise ConvertError(f"{out}: cannot open it ({exc.strerror or exc})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ConvertError(f"{out} is being written by another convert; wait for it to finish") from None
    return fd
