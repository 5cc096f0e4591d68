"""`dsca-store convert`: validate a cohort's CLAM outputs and pack them into a `dsca-store/1` store.

Each slide is validated completely before anything of it is written; its group is written
array by array (each in one go: a partial write of a shard rewrites the whole shard) and only
then marked ``complete``. Readers ignore incomplete slides and a rerun redoes them, so a run
killed at any point leaves no slide that claims to be complete and is not (tested with kill -9).
A run that stops on its own terms also leaves nothing half-written: a failed write removes its
slide; Ctrl-C lets the slide being written here finish, kills the workers and removes their
unfinished slides.
One convert at a time per store (a lock that dies with its process).

Input problems fail their slide only (one line naming the slide, the file and the reason);
the other slides are converted and the report lists every failure. Nothing outside
``slides/<valid slide id>/`` and the store's own metadata files is ever deleted or written.

Each slide records its sources (path, size, mtime, crc32c); a rerun converts a complete slide
again when its sources changed since (a re-extraction into the same folders), and skips it
otherwise.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import multiprocessing
import os
import shutil
import signal
import threading
import time
import traceback
import unicodedata
import uuid
import warnings
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as mp_wait
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
import pandas as pd
import torch
import zarr

import dsca
from dsca.atomic import atomic_write
from dsca.labels import LabelError, check_header, check_label_columns, match_slide_ids, missing_id, parse_labels_map
from dsca.progress import Progress
from dsca.store._layout import (
    BLOCK,
    DEFAULT_CODEC,
    DTYPES,
    FORMAT,
    LEVELS,
    SCALE,
    SLIDES,
    TEMP_FILE,
    codec_chain,
    complete_attrs,
    complete_slides,
    rows_per_chunk,
    slide_folder,
    slide_id_problem,
)
from dsca.store.align import check_alignment
from dsca.store.clam import (
    ClamError,
    CoordsFile,
    FeatureDir,
    file_label,
    find_coords_dir,
    index_dir,
    peek_shape,
    read_coords,
    read_feature_files,
)
from dsca.store._io import first_difference
from dsca.store.provenance import refreshed_sources, source_changes
from dsca.store.trident import (
    LOCK_REASON,
    TridentDir,
    assemble_blocks,
    looks_like_trident,
    read_trident_level,
    trident_label,
)

__all__ = ["ConvertReport", "ConvertError", "LabelSlides", "convert_cohort", "read_label_slides"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")


class ConvertError(Exception):
    """The run as a whole cannot go on (bad directories, incompatible store, a failed write)."""


@dataclass
class ConvertReport:
    """Outcome of one convert run.

    Attributes:
        converted: slides written by this run.
        skipped: slides already complete in the store (resume), their sources unchanged.
        reconverted: complete slides whose sources changed since; converted again (also in
            `converted` when that succeeded).
        failures: (slide_id, one-line reason) of every slide that was not converted.
        missing: slides listed in the labels CSV without any feature file.
        source_bytes: bytes of the source files read for the converted slides.
        seconds: wall time of the run.
    """

    out: Path
    converted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    reconverted: list[str] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    source_bytes: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures and not self.missing

    def lines(self) -> Iterator[str]:
        """One line per problem (slide id first, quoted when it holds unprintable characters)."""
        for sid, reason in self.failures:
            yield f"{_shown(sid)}: {reason}"
        for sid in self.missing:
            yield f"{_shown(sid)}: listed in the labels CSV but has no feature files (missing)"


def _shown(slide_id: str) -> str:
    return slide_id if slide_id.isprintable() else repr(slide_id)


@dataclass(frozen=True)
class _SlideTask:
    """Everything one converter needs for one slide (picklable: sent to worker processes)."""

    slide_id: str
    out: str
    x5_coords: str | None
    x20_coords: str | None
    x5_pt: str | None
    x5_h5: str | None
    x20_pt: str | None
    x20_h5: str | None
    dtype: str
    codec: str
    dim: int | None
    patient_id: str | None
    x5_attrs: dict[str, Any] = field(default_factory=dict)
    x20_attrs: dict[str, Any] = field(default_factory=dict)
    trident: bool = False  # TRIDENT outputs: two independent grids, x20 blocks assembled by cell

    def given_attrs(self) -> dict[str, dict[str, Any]]:
        """Level attributes from the command line (recorded: a rerun with others redoes the slide)."""
        return {"x5": self.x5_attrs, "x20": self.x20_attrs}

    def source_files(self) -> dict[str, str | None]:
        """role -> the file this slide is read from (the keys of its `sources` attribute)."""
        if self.trident:  # one features file per level, its coords beside it
            return {"x5_coords": self.x5_coords, "x20_coords": self.x20_coords,
                    "x5_features": self.x5_pt or self.x5_h5, "x20_features": self.x20_pt or self.x20_h5}
        both5, both20 = self.x5_pt is not None and self.x5_h5 is not None, self.x20_pt is not None and self.x20_h5 is not None
        return {
            "x5_coords": self.x5_coords,
            "x20_coords": self.x20_coords,
            "x5_features": self.x5_pt or self.x5_h5,
            "x5_features_h5": self.x5_h5 if both5 else None,
            "x20_features": self.x20_pt or self.x20_h5,
            "x20_features_h5": self.x20_h5 if both20 else None,
        }


@dataclass
class LabelSlides:
    """What a labels CSV says about the cohort's slides.

    Attributes:
        patients: feature slide id -> patient id, for the slides the CSV lists.
        problems: slide id -> reason, for rows that cannot be used (the slide is not converted).
        missing: label slide ids that match no feature file.
    """

    patients: dict[str, str] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)


def read_label_slides(labels: str | Path, slide_ids: Collection[str], labels_map: str | None = None) -> LabelSlides:
    """Slide -> patient from a labels CSV, matched to the cohort's feature slide ids.

    Columns are the canonical ones or named by `labels_map` (:func:`dsca.labels.parse_labels_map`),
    never guessed. Ids stay strings exactly as written (NLST's are numbers); a label id matches a
    feature file with or without a WSI extension (``A.svs`` -> ``A.pt``). A slide listed with
    two patients, or without a patient id, is unusable: a blank id read as NaN would otherwise
    pool unrelated slides into one patient "nan".
    """
    path = Path(labels)
    try:
        columns = parse_labels_map(labels_map)
        header = check_header(path)  # duplicate names, which pandas would silently rename
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
        check_label_columns(header, columns, path)
    except LabelError as exc:
        raise ConvertError(str(exc)) from None
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise ConvertError(f"{path}: cannot read labels CSV ({exc})") from None
    by_label: dict[str, str] = {}
    first_row: dict[str, int] = {}
    out = LabelSlides()
    for row, (sid, pid) in enumerate(zip(df[columns.slide], df[columns.patient]), start=2):
        sid, pid = str(sid).strip(), str(pid).strip()
        if missing_id(sid):
            continue
        if missing_id(pid):  # blank, or R's NA: read as an id it would pool unrelated slides
            out.problems[sid] = f"no patient_id in {path.name} (line {row}: {pid!r})"
        elif sid in by_label:  # training refuses a repeated slide too, whatever its patient
            out.problems[sid] = (f"duplicate slide id in {path.name} (lines {first_row[sid]} and {row}): "
                                 f"patients {by_label[sid]} and {pid}")
        by_label.setdefault(sid, pid)
        first_row.setdefault(sid, row)
    match = match_slide_ids(by_label, slide_ids)
    for label_id, sid in match.matched.items():
        if label_id in out.problems:  # reported under the feature file's id, which is what is skipped
            out.problems[sid] = out.problems.pop(label_id)
        else:
            out.patients[sid] = by_label[label_id]
    for label_id, ids in match.ambiguous.items():
        out.problems[label_id] = (f"label slide {label_id!r} in {path.name} could be any of the feature files' "
                                  f"slides {', '.join(ids)}; rename the label or the files")
    for sid, label_ids in match.clashes.items():
        out.problems[sid] = f"listed {len(label_ids)} times in {path.name}, as {', '.join(map(repr, label_ids))}"
    out.missing = sorted(s for s in match.unmatched if s not in out.problems)
    return out


def _hint_extensions(missing: list[str], slide_ids: Collection[str]) -> None:
    """One warning when labels and feature files spell the slide ids differently throughout."""
    if missing and len(missing) >= 0.5 * max(1, len(slide_ids)):
        log.warning("%d of the labels' slides match no feature file (e.g. %r; feature files are named like %r): "
                    "check that the label slide ids are the feature files' names", len(missing), missing[0],
                    next(iter(sorted(slide_ids)), "?"))


def _read(what: str, fn: Callable[..., _T], *args: Any) -> _T:
    """Call a CLAM reader; its ClamError gets `what` (level and kind) in front."""
    try:
        return fn(*args)
    except ClamError as exc:
        raise ClamError(f"{what}: {exc}") from None


def _check_range(x: np.ndarray, what: str, dtype: np.dtype) -> None:
    """NaN/Inf in the source, or values the stored dtype cannot hold (float16 tops out at 65504).

    Two reductions (NaN propagates through min/max) instead of an isfinite mask: the common,
    clean case costs one read of the array.
    """
    lo, hi = float(x.min()), float(x.max())
    limit = float(np.finfo(dtype).max)
    if -limit <= lo and hi <= limit:  # False for NaN
        # all values below the dtype's normal range: stored, they would lose most of their
        # precision or become zeros
        if 0 < max(-lo, hi) < float(np.finfo(dtype).tiny):
            raise ClamError(f"{what} are all below {max(-lo, hi):.3g}, under {np.dtype(dtype).name}'s normal range "
                            f"(+-{float(np.finfo(dtype).tiny):.3g}); convert with --dtype float32")
        return
    finite = np.isfinite(x)
    if not finite.all():
        row = int(np.argmin(finite.all(axis=1)))
        raise ClamError(f"{what} contain {int(np.count_nonzero(~finite))} NaN/Inf values (first at row {row})")
    raise ClamError(f"{what} reach {max(-lo, hi):.4g}, beyond {np.dtype(dtype).name}'s range "
                    f"(+-{limit:.6g}); convert with --dtype float32")


def _check_rows(n: int, x5_rows: int, x20_rows: int) -> None:
    """Row counts of the two levels against the x5 coords; names a swap of x5/x20 folders."""
    if x5_rows == BLOCK * x20_rows:
        raise ClamError(f"x5 and x20 look swapped: x5 features have {x5_rows} rows, x20 {x20_rows} "
                        f"(x20 should have {BLOCK}x the x5 rows); check --x5-features/--x20-features")
    if n == BLOCK * x5_rows and x20_rows == n:
        raise ClamError(f"x5 and x20 coords look swapped: the x5 coords file has {n} rows = {BLOCK}x the "
                        f"{x5_rows} x5 feature rows; check --x5-coords/--x20-coords")
    if x5_rows != n:
        raise ClamError(f"x5 features have {x5_rows} rows but the coords file has {n}")
    if x20_rows != BLOCK * x5_rows:
        raise ClamError(f"x20 features have {x20_rows} rows, expected {BLOCK} x {n} x5 rows = {BLOCK * n}")


@dataclass
class _Slide:
    """One validated slide, ready to be written."""

    x5: np.ndarray
    x20: np.ndarray
    low: CoordsFile
    sources: dict[str, dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # warnings for the log (workers have none)


def _check_features(task: _SlideTask, x5: np.ndarray, x20: np.ndarray) -> None:
    if x5.shape[1] != x20.shape[1]:
        raise ClamError(f"feature dims differ between levels: x5 {x5.shape[1]}, x20 {x20.shape[1]}")
    if task.dim is not None and x5.shape[1] != task.dim:
        raise ClamError(f"feature dim {x5.shape[1]} differs from the cohort's {task.dim}")
    dtype = np.dtype(task.dtype)
    _check_range(x5, "x5 features", dtype)
    _check_range(x20, "x20 features", dtype)


# TRIDENT filters each run against tissue on its own: blocks at the tissue's edge lose a few
# tiles. More than this fraction of dropped x5 patches is worth a warning.
_MAX_DROPPED = 0.1


def _check_levels(low: CoordsFile, high: CoordsFile) -> None:
    """The x5 level must be SCALE^k times coarser than the x20 level, by its attributes too.

    A wrong downsample given for x5 (--x5-attrs) would not show in the 4x4 offsets, which
    come from the x20 file, but would put patches in the wrong grid cells.
    """
    if low.patch_level is None or high.patch_level is None:
        return
    k = low.patch_level - high.patch_level
    expected = high.downsample * float(SCALE) ** k
    if k < 1 or not np.allclose(low.downsample, expected, rtol=0.02):
        raise ClamError(f"x5 level {low.patch_level} (downsample {low.downsample.round(4).tolist()}) is not "
                        f"{SCALE}^k x the x20 level {high.patch_level} (downsample {high.downsample.round(4).tolist()}): "
                        "check the level attributes")


def _path(p: str | None) -> Path | None:
    return Path(p) if p else None


def _validate_trident(task: _SlideTask) -> _Slide:
    """Read one slide's two TRIDENT runs and assemble each x5 patch's 4x4 block of x20 tiles."""
    f5, f20 = task.x5_pt or task.x5_h5, task.x20_pt or task.x20_h5
    if f5 is None or f20 is None:
        raise ClamError(f"missing {'x5' if f5 is None else 'x20'} features (no features_<enc>/<slide>.h5)")
    low = _read("x5", read_trident_level, Path(f5), _path(task.x5_coords))
    high = _read("x20", read_trident_level, Path(f20), _path(task.x20_coords))
    blocks = assemble_blocks(low, high)
    _check_features(task, blocks.x5, blocks.x20)
    roles = {}
    for level, name in ((low, "x5"), (high, "x20")):
        for rec in level.sources:
            kind = "features" if Path(rec.path).name == Path(level.path).name else "coords"
            roles[f"{name}_{kind}"] = rec.to_attrs()
    coords = CoordsFile(blocks.x5_coords, low.attrs, blocks.level5)
    notes = []
    total = blocks.dropped + len(blocks.x5)
    if blocks.dropped > _MAX_DROPPED * total:
        notes.append(f"{blocks.dropped} of {total} x5 patches left out: not all 16 of their x20 tiles were "
                     "extracted (did the 20x run use another tissue segmentation?)")
    extra = {"format": "trident", "encoder": low.encoder, "dropped_x5_patches": blocks.dropped}
    return _Slide(blocks.x5, blocks.x20, coords, roles, extra, notes)


def _validate(task: _SlideTask) -> _Slide:
    """Read and check one slide; raises ClamError with the reason."""
    if task.trident:
        return _validate_trident(task)
    if task.x5_coords is None:
        raise ClamError("missing x5 coords file (no patches/<slide>.h5)")
    if task.x5_pt is None and task.x5_h5 is None:
        raise ClamError("missing x5 features (no .pt/.h5 in the x5 feature dir)")
    if task.x20_pt is None and task.x20_h5 is None:
        raise ClamError("missing x20 features (no .pt/.h5 in the x20 feature dir)")

    low = _read("x5 coords", read_coords, Path(task.x5_coords), task.x5_attrs)
    f5 = _read("x5 features", read_feature_files, _path(task.x5_pt), _path(task.x5_h5))
    f20 = _read("x20 features", read_feature_files, _path(task.x20_pt), _path(task.x20_h5))
    x5, x20 = f5.features, f20.features
    n = low.coords.shape[0]
    _check_rows(n, x5.shape[0], x20.shape[0])
    _check_features(task, x5, x20)
    if f5.coords is not None and not np.array_equal(f5.coords, low.coords):
        raise ClamError(f"x5 {file_label(Path(task.x5_h5))} coords disagree with the x5 coords file "
                        f"{file_label(Path(task.x5_coords))} ({first_difference(f5.coords, low.coords)})")
    sources = {"x5_coords": low.source, "x5_features": f5.pt or f5.h5,
               "x5_features_h5": f5.h5 if f5.pt else None,
               "x20_features": f20.pt or f20.h5, "x20_features_h5": f20.h5 if f20.pt else None}
    high, high_ds = f20.coords, None
    if task.x20_coords is not None:
        high_file = _read("x20 coords", read_coords, Path(task.x20_coords), task.x20_attrs)
        sources["x20_coords"] = high_file.source
        if f20.coords is not None and not np.array_equal(f20.coords, high_file.coords):
            raise ClamError(f"x20 {file_label(Path(task.x20_h5))} coords disagree with the x20 coords file "
                            f"{file_label(Path(task.x20_coords))} ({first_difference(f20.coords, high_file.coords)})")
        high, high_ds = high_file.coords, high_file.downsample
        _check_levels(low, high_file)
    if high is not None:
        reason = check_alignment(low, high, high_ds)
        if reason:
            raise ClamError(reason)
    records = {role: rec.to_attrs() for role, rec in sources.items() if rec is not None}
    return _Slide(x5, x20, low, records)


# A slide's patch grid spans its tissue's bounding box; tissue pieces far apart leave it mostly
# empty, but no real slide has more than this many empty cells per patch. A stray far-away
# patch (a corrupted coordinate) would otherwise inflate grid_index to gigabytes.
_MAX_CELLS_PER_PATCH = 256
_MIN_CELLS = 1 << 16


def _grid(low: CoordsFile) -> tuple[np.ndarray, np.ndarray, int]:
    """grid [N,2] int32 = coords // step, grid_index [H,W] int32 (-1 = none), #collisions."""
    grid64 = low.coords // low.step[None, :]
    h, w = int(grid64[:, 1].max()) + 1, int(grid64[:, 0].max()) + 1
    n = len(grid64)
    if h * w > max(_MIN_CELLS, _MAX_CELLS_PER_PATCH * n):
        centre = np.median(grid64, axis=0)
        far = int(np.argmax(np.abs(grid64 - centre).max(axis=1)))
        raise ClamError(f"patch grid spans {w} x {h} cells for {n} patches: patch {far} "
                        f"at {low.coords[far].tolist()} lies far from the others (a stray or corrupted coordinate?)")
    grid = grid64.astype(np.int32)
    index = np.full((h, w), -1, dtype=np.int32)
    rows = np.arange(n, dtype=np.int32)
    # reversed so that, where two patches share a cell, the first one in source order wins
    index[grid[::-1, 1], grid[::-1, 0]] = rows[::-1]
    collisions = n - int(np.count_nonzero(index >= 0))
    return grid, index, collisions


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

    zarr's public sync API, one call per step. (The whole group as one coroutine through zarr's
    private `zarr.core.sync.sync` measured the same: median 28 vs 27 ms for a 50-patch D=64
    slide, 206 vs 214 ms for 1,000 patches D=1024, on this 2-core machine.)
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


def _cast(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    # torch's float32 -> float16 conversion is vectorised, numpy's a scalar loop (~5x slower);
    # both round to nearest even, so the bytes are the same
    if x.dtype == dtype:
        return x
    return torch.from_numpy(np.ascontiguousarray(x)).to(getattr(torch, dtype.name)).numpy()


class _WriteFailed(Exception):
    """Writing to the store failed (disk full, permissions): fatal for the run, not the slide."""


def _prepare(task: _SlideTask) -> tuple[dict[str, tuple[np.ndarray, str]], dict[str, Any], int, list[str]]:
    """Read, validate and lay out one slide: (arrays to write, slide attrs, source bytes, notes)."""
    slide = _validate(task)
    dtype = np.dtype(task.dtype)
    grid, grid_index, collisions = _grid(slide.low)
    if collisions:
        slide.notes.append(f"{collisions} of {len(grid)} patches share a grid cell with an earlier one (step "
                           f"{slide.low.step.tolist()} px): are patch_size and downsample right?")
    arrays = {
        "x5": (_cast(slide.x5, dtype), task.codec),
        "x20": (_cast(slide.x20, dtype).reshape(-1, BLOCK, slide.x20.shape[1]), task.codec),
        "coords": (slide.low.coords.astype(np.int64), "none"),
        "grid": (grid, "none"),
        "grid_index": (grid_index, "none"),
    }
    attrs = {
        "patient_id": task.patient_id,
        "n_patches": int(slide.low.coords.shape[0]),
        "patch_size": slide.low.patch_size,
        "patch_level": slide.low.patch_level,
        "downsample": slide.low.downsample.tolist(),
        "step": slide.low.step.tolist(),
        "grid_collisions": collisions,
        "codec": task.codec,
        "all_chunks": True,
        "sources": slide.sources,
        **slide.extra,
    }
    if task.x5_attrs or task.x20_attrs:
        attrs["given_attrs"] = task.given_attrs()
    return arrays, attrs, sum(int(src["bytes"]) for src in slide.sources.values()), slide.notes


class _Outcome(NamedTuple):
    """What converting one slide gave (sent back from worker processes)."""

    slide_id: str
    reason: str | None = None  # why it failed; None = converted
    source_bytes: int = 0
    traceback: str | None = None  # of an unexpected error, for the debug log (-v)
    notes: tuple[str, ...] = ()  # warnings about a converted slide


def _convert_slide(task: _SlideTask) -> _Outcome:
    """Validate + write one slide.

    Anything that goes wrong before the write fails this slide only, with one line (an
    unexpected error's traceback goes to the debug log, also from a worker process); a write
    problem raises _WriteFailed (every later slide would fail the same way).
    """
    try:
        arrays, attrs, nbytes, notes = _prepare(task)
    except ClamError as exc:
        return _Outcome(task.slide_id, str(exc))
    except MemoryError:
        return _Outcome(task.slide_id, "out of memory while reading the slide")
    except Exception as exc:  # noqa: BLE001 - one odd input must not stop a 1,000-slide run
        return _Outcome(task.slide_id, f"cannot read its files ({type(exc).__name__}: {exc}; -v for the traceback)",
                        traceback=traceback.format_exc())
    folder = slide_folder(task.out, task.slide_id)
    new = _temp_sibling(folder)
    try:
        with _ctrl_c_deferred():
            # written beside the slide and swapped in when complete: a failed write (full
            # disk, a killed worker) leaves the complete slide it was to replace
            _write_group(new, arrays, attrs)
            _swap_in(new, folder)
    except Exception as exc:
        shutil.rmtree(new, ignore_errors=True)
        raise _WriteFailed(f"{task.slide_id}: writing to {task.out} failed ({type(exc).__name__}: {exc})") from exc
    return _Outcome(task.slide_id, None, nbytes, notes=tuple(notes))


def _temp_sibling(folder: Path) -> Path:
    """A hidden, unique folder beside `folder` (never a slide id: those cannot start with '.')."""
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


# Ctrl-C, and SIGTERM as SLURM and `timeout` send it (the CLI turns SIGTERM into a KeyboardInterrupt)
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _ctrl_c_deferred() -> Iterator[None]:
    """Let a slide's write finish before a Ctrl-C takes effect.

    zarr writes on its own IO thread: a KeyboardInterrupt in this thread would not stop it, so
    removing the half-written slide here would race with writes still landing. Finishing the
    slide (a second at most) and stopping after it leaves it complete instead.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield  # a worker: it ignores Ctrl-C, the parent stops it
        return
    interrupted: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: interrupted.append(signum)) for sig in _STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if interrupted:
        raise KeyboardInterrupt


def _remove_if_incomplete(task: _SlideTask) -> None:
    """Drop what an interrupted writer left of `task`'s slide (a finished slide stays)."""
    folder = slide_folder(task.out, task.slide_id)
    if complete_attrs(folder) is None:
        shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True)
class _NewStore:
    """A store this run created; `folder`: the run also created its folder."""

    folder: bool


def _init_store(out: Path, existed: bool, dtype: str, codec: str, extractor: str,
                explicit_extractor: bool) -> tuple[dict, _NewStore | None]:
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
        "created_by": f"dsca {dsca.__version__}",
    }
    try:
        root = zarr.create_group(store=str(out), attributes=attrs, zarr_format=3)
        root.create_group(SLIDES)
    except Exception as exc:
        _remove_new_store(out, existed)
        raise ConvertError(f"{out}: cannot create the store ({type(exc).__name__}: {exc})") from None
    return attrs, _NewStore(folder=not existed)


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


def _remove_temp_files(out: Path) -> None:
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


def _update_root(out: Path, updates: dict[str, Any]) -> None:
    """Set root attributes (one atomic zarr.json write); a failure is a ConvertError."""
    try:
        zarr.open_group(out, mode="r+", use_consolidated=False).attrs.update(updates)
    except Exception as exc:  # noqa: BLE001
        raise ConvertError(f"{out}: cannot update the store's metadata ({type(exc).__name__}: {exc})") from None


@dataclass(frozen=True)
class _Inputs:
    """The indexed input folders of one run: slide id -> its files, per level and kind."""

    c5: dict[str, list[Path]]
    c20: dict[str, list[Path]]
    pt5: dict[str, list[Path]]
    h5_5: dict[str, list[Path]]
    pt20: dict[str, list[Path]]
    h5_20: dict[str, list[Path]]
    c5_dir: Path
    c20_dir: Path | None
    roots: tuple[Path, Path]  # the x5 and x20 feature folders
    trident: bool = False
    encoder: str | None = None
    locked: dict[str, str] = field(default_factory=dict)  # slide id -> reason (TRIDENT lock files)

    @classmethod
    def open(cls, x5_features: str | Path, x20_features: str | Path, x5_coords: str | Path,
             x20_coords: str | Path | None) -> _Inputs:
        try:
            if looks_like_trident(x5_features) or looks_like_trident(x5_coords):
                return cls._open_trident(x5_features, x20_features, x5_coords, x20_coords)
            f5, f20 = FeatureDir.open(x5_features), FeatureDir.open(x20_features)
            c5_dir = find_coords_dir(Path(x5_coords))
            c20_dir = find_coords_dir(Path(x20_coords)) if x20_coords is not None else None
        except ClamError as exc:
            raise ConvertError(str(exc)) from None
        if c20_dir is None and f20.h5_dir is None:
            log.warning("x20 alignment is not checked: give --x20-coords (or h5_files with coords)")
        return cls(index_dir(c5_dir, ".h5"), index_dir(c20_dir, ".h5") if c20_dir else {}, f5.pt, f5.h5, f20.pt,
                   f20.h5, c5_dir, c20_dir, (f5.root, f20.root))

    @classmethod
    def _open_trident(cls, x5_features: str | Path, x20_features: str | Path, x5_coords: str | Path,
                      x20_coords: str | Path | None) -> _Inputs:
        t5, t20 = TridentDir.open(x5_features), TridentDir.open(x20_features)
        c5 = TridentDir.open(x5_coords, require_features=False)
        c20 = TridentDir.open(x20_coords, require_features=False) if x20_coords is not None else t20
        if t5.root == t20.root:
            raise ClamError(f"--x5-features and --x20-features are the same TRIDENT run ({t5.root}); "
                            "pass the 5x and the 20x patching folders")

        def split(files: dict[str, list[Path]], suffix: str) -> dict[str, list[Path]]:
            return {s: [p for p in ps if p.suffix.lower() == suffix] for s, ps in files.items()
                    if any(p.suffix.lower() == suffix for p in ps)}

        locked = {sid: f"{level}: {trident_label(locks[0].with_suffix(''))}: {LOCK_REASON}"
                  for level, tdir in (("x20", c20), ("x20", t20), ("x5", c5), ("x5", t5))
                  for sid, locks in tdir.locked.items()}
        for level, tdir in (("x20", t20), ("x5", t5)):  # S.h5 and S.pt: two runs, neither is the one
            for sid, files in tdir.features.items():
                if len(files) > 1:
                    locked.setdefault(sid, f"{level}: {len(files)} features files for one slide "
                                           f"({', '.join(trident_label(p) for p in files)}): remove all but one")
        return cls(c5.coords, c20.coords, split(t5.features, ".pt"), split(t5.features, ".h5"),
                   split(t20.features, ".pt"), split(t20.features, ".h5"), c5.root / "patches",
                   c20.root / "patches", (t5.features_dir or t5.root, t20.features_dir or t20.root),
                   trident=True, encoder=t5.encoder, locked=locked)

    @property
    def slide_ids(self) -> set[str]:
        return set(self.c5) | set(self.pt5) | set(self.h5_5) | set(self.pt20) | set(self.h5_20) | set(self.locked)

    def by_kind(self) -> dict[str, dict[str, list[Path]]]:
        kinds = ("x5 coords", "x20 coords", "x5 pt_files", "x5 h5_files", "x20 pt_files", "x20 h5_files")
        return dict(zip(kinds, (self.c5, self.c20, self.pt5, self.h5_5, self.pt20, self.h5_20)))

    def coords_name(self, sid: str) -> str:
        return f"{sid}_patches.h5" if self.trident else f"{sid}.h5"

    def task(self, sid: str, out: Path, options: _Options, dim: int | None, patient_id: str | None) -> _SlideTask:
        def first(files: dict[str, list[Path]]) -> str | None:
            return str(files[sid][0]) if sid in files else None

        return _SlideTask(sid, str(out), first(self.c5), first(self.c20), first(self.pt5), first(self.h5_5),
                          first(self.pt20), first(self.h5_20), options.dtype, options.codec, dim, patient_id,
                          dict(options.x5_attrs), dict(options.x20_attrs), trident=self.trident)


@dataclass(frozen=True)
class _Options:
    """How slides are written (validated once in convert_cohort)."""

    dtype: str = "float16"
    codec: str = DEFAULT_CODEC
    overwrite: bool = False
    x5_attrs: dict[str, Any] = field(default_factory=dict)
    x20_attrs: dict[str, Any] = field(default_factory=dict)


def convert_cohort(
    *,
    x5_features: str | Path,
    x20_features: str | Path,
    x5_coords: str | Path,
    out: str | Path,
    x20_coords: str | Path | None = None,
    labels: str | Path | None = None,
    dtype: str = "float16",
    codec: str = DEFAULT_CODEC,
    jobs: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    extractor: str | None = None,
    x5_attrs: dict[str, Any] | None = None,
    x20_attrs: dict[str, Any] | None = None,
    labels_map: str | None = None,
) -> ConvertReport:
    """Validate and pack a cohort; see the module docstring. Per-slide problems go to the report.

    `x5_attrs`/`x20_attrs` give level attributes (patch_size, patch_level, downsample) for
    coordinate files that lack them; a file's own attributes always win. `labels_map` names
    the labels CSV's columns (see :func:`dsca.labels.parse_labels_map`).
    """
    t0 = time.perf_counter()
    if dtype not in DTYPES:
        raise ConvertError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    codec_chain(codec)  # validates the name
    if jobs < 1:
        raise ConvertError(f"--jobs must be at least 1, got {jobs}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if jobs > cores:
        # each worker imports torch and holds a slide in memory: more than the cores only thrash
        log.warning("--jobs %d is more than the %d CPU cores available; using %d", jobs, cores, cores)
        jobs = cores
    options = _Options(dtype, codec, overwrite, dict(x5_attrs or {}), dict(x20_attrs or {}))
    out = Path(out)
    inputs = _Inputs.open(x5_features, x20_features, x5_coords, x20_coords)
    report = ConvertReport(out=out)
    everything = inputs.slide_ids
    if not everything:
        raise ConvertError(f"no slides found: no .h5 in {inputs.c5_dir}, no .pt/.h5 in {inputs.roots[0]} "
                           f"or {inputs.roots[1]}")
    failures = {sid: problem for sid in everything if (problem := slide_id_problem(sid)) is not None}
    failures.update({sid: reason for sid, reason in inputs.locked.items() if sid not in failures})
    everything -= set(failures)
    failures.update(_duplicate_ids({what: {s: p for s, p in files.items() if s in everything}
                                    for what, files in inputs.by_kind().items()}))
    patients: dict[str, str] = {}
    if labels is not None:
        table = read_label_slides(labels, everything, labels_map)
        patients = table.patients
        failures.update({sid: reason for sid, reason in table.problems.items() if sid not in failures})
        report.missing = [sid for sid in table.missing if sid not in failures]
        _hint_extensions(table.missing, everything)
    unlabelled = sorted(everything - set(patients) - set(failures)) if labels is not None else []
    if unlabelled:
        more = f" and {len(unlabelled) - 3} more" if len(unlabelled) > 3 else ""
        log.warning("%d slides are not in the labels CSV (%s%s); converted without a patient id",
                    len(unlabelled), ", ".join(unlabelled[:3]), more)

    existed = out.exists()
    if existed and not out.is_dir():
        raise ConvertError(f"{out} exists and is not a folder; refusing to write into it")
    if existed and not (out / "zarr.json").exists() and any(out.iterdir()):
        raise ConvertError(f"{out} exists and is not a zarr store; refusing to write into it")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConvertError(f"cannot create {out} ({exc.strerror or exc})") from None
    lock = _lock(out)  # on failure the folder stays: the convert holding it owns it now
    try:
        attrs, created = _init_store(out, existed, dtype, codec, extractor or inputs.encoder or inputs.roots[0].name,
                                     explicit_extractor=extractor is not None or inputs.encoder is not None)
    except BaseException:
        os.close(lock)
        raise
    try:
        slide_ids = sorted(everything - set(failures))
        tasks = _plan(report, out, inputs, options, slide_ids, patients if labels is not None else None,
                      attrs.get("feature_dim"), failures)
        _convert_all(tasks, jobs, progress, report, failures)
    except BaseException:
        # the first error is the one to report; a full disk would fail the clean-up's writes too
        _finish_store(out, created, quiet=True)
        raise
    else:
        _finish_store(out, created)
    finally:
        os.close(lock)
    for sid in report.reconverted:
        if sid in failures and complete_attrs(slide_folder(out, sid)) is not None:
            failures[sid] += "; the store keeps the slide as converted from its earlier sources"
    report.failures = sorted(failures.items())
    report.converted.sort()
    report.seconds = time.perf_counter() - t0
    return report


def _plan(report: ConvertReport, out: Path, inputs: _Inputs, options: _Options, slide_ids: list[str],
          patients: dict[str, str] | None, dim: int | None, failures: dict[str, str]) -> list[_SlideTask]:
    """The slides this run converts: new ones, incomplete ones, and complete ones whose sources
    changed (all with `overwrite`); records the cohort's feature dim in a new store. With
    labels, complete slides take their patient ids from them."""
    labelled = patients is not None
    patients = patients or {}
    updates: dict[str, dict[str, Any]] = {}  # complete slide -> new attrs (patient id, moved sources)
    _remove_temp_files(out)
    complete = complete_slides(out)
    if dim is None:
        dim = _cohort_dim(inputs, slide_ids)
        if dim is not None:  # recorded before any slide: a killed run must leave a readable store
            _update_root(out, {"feature_dim": int(dim)})
    tasks = []
    for sid in slide_ids:
        if inputs.c20_dir is not None and sid not in inputs.c20:
            failures[sid] = f"missing x20 coords file (no {inputs.coords_name(sid)} in {inputs.c20_dir})"
            continue
        folder = slide_folder(out, sid)
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            failures[sid] = f"{SLIDES}/{sid} in the store is not a slide folder (a link or a file): remove it"
            continue
        task = inputs.task(sid, out, options, dim, patients.get(sid))
        if sid in complete and not options.overwrite:
            changes = source_changes(complete[sid].get("sources", {}), task.source_files())
            if complete[sid].get("given_attrs", {"x5": {}, "x20": {}}) != task.given_attrs():
                changes.append("the level attributes given on the command line changed")
            if not changes:
                report.skipped.append(sid)
                update: dict[str, Any] = {}
                if labelled and complete[sid].get("patient_id") != task.patient_id:
                    update["patient_id"] = task.patient_id
                moved = refreshed_sources(complete[sid].get("sources", {}), task.source_files())
                if moved is not None:
                    update["sources"] = moved
                if update:
                    updates[sid] = update
                continue
            log.warning("%s: sources changed since it was converted (%s); converting it again",
                        sid, "; ".join(changes))
            report.reconverted.append(sid)
        tasks.append(task)
    if report.skipped:
        log.info("resuming: %d slides already complete, %d to convert", len(report.skipped), len(tasks))
    _update_slides(out, updates)
    gone = sorted(set(complete) - set(slide_ids) - set(failures))
    if gone:
        more = f" and {len(gone) - 3} more" if len(gone) > 3 else ""
        log.warning("%d complete slides of %s have no source files in this run (%s%s); they stay in the store "
                    "as converted earlier", len(gone), out, ", ".join(gone[:3]), more)
    return tasks


def _update_slides(out: Path, updates: dict[str, dict[str, Any]]) -> None:
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


def _cohort_dim(inputs: _Inputs, slide_ids: list[str]) -> int | None:
    """The feature dim most slides have (every readable file counts, legacy `.pt` included)."""
    dims: Counter[int] = Counter()

    def first(files: dict[str, list[Path]], sid: str) -> Path | None:
        return files[sid][0] if sid in files else None

    for sid in slide_ids:
        for shape in (peek_shape(first(inputs.pt5, sid), first(inputs.h5_5, sid)),
                      peek_shape(first(inputs.pt20, sid), first(inputs.h5_20, sid))):
            if shape is not None and len(shape) == 2 and shape[1] > 0:
                dims[int(shape[1])] += 1
    if len(dims) > 1:
        log.info("feature dims differ between slides (%s); the cohort's is taken to be %d",
                    ", ".join(f"{d}: {n} files" for d, n in dims.most_common()), dims.most_common(1)[0][0])
    return dims.most_common(1)[0][0] if dims else None


def _finish_store(out: Path, created: _NewStore | None, quiet: bool = False) -> None:
    """Make the store consistent however the run ends: temp files gone, codecs in use recorded,
    metadata consolidated; a store this run created that holds no complete slide is removed.
    `quiet`: a failure here is not raised (another error is already on its way)."""
    _remove_temp_files(out)
    complete = complete_slides(out)
    if created is not None and not complete:
        _remove_new_store(out, existed=not created.folder)
        return
    codecs = sorted({str(a.get("codec", "?")) for a in complete.values()})
    try:
        if codecs:
            _update_root(out, {"codec": codecs[0] if len(codecs) == 1 else "mixed: " + ", ".join(codecs)})
        # also after an error or Ctrl-C: readers then see every slide completed so far at once
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            zarr.consolidate_metadata(str(out))
    except Exception as exc:  # noqa: BLE001 - e.g. a full disk: the slides are complete, readers
        # fall back to listing them one by one; the next run consolidates
        _remove_temp_files(out)
        if quiet:
            return
        raise ConvertError(f"{out}: the converted slides are complete, but writing the store's summary "
                           f"metadata failed ({type(exc).__name__}: {exc}); rerun to finish it") from None


def _duplicate_ids(sources: dict[str, dict[str, list[Path]]]) -> dict[str, str]:
    """slide id -> reason, for ids with two files in one folder or that differ only in case.

    Case-only differences (`TCGA-XX` vs `tcga-xx`) are one slide on case-insensitive file
    systems and almost surely a stray copy elsewhere; which copy is right is unknowable, so
    every id of such a group is skipped and named.
    """
    groups: dict[str, dict[str, dict[str, list[Path]]]] = {}  # casefold -> id -> source -> files
    for what, files in sources.items():
        for sid, paths in files.items():
            # NFC: an accented id typed on macOS (decomposed) and on Linux (composed) is one slide
            groups.setdefault(unicodedata.normalize("NFC", sid).casefold(), {}).setdefault(sid, {})[what] = paths
    failures: dict[str, str] = {}
    for ids in groups.values():
        doubled = [f"{what} has {' and '.join(p.name for p in paths)}"
                   for by_source in ids.values() for what, paths in by_source.items() if len(paths) > 1]
        if len(ids) == 1 and not doubled:
            continue
        if len(ids) > 1:
            where_ = "; ".join(f"{sid!r} in {', '.join(by_source)}" for sid, by_source in sorted(ids.items()))
            reason = f"duplicate slide id, differing only in case or unicode form: {where_}"
        else:
            reason = f"duplicate slide id: {'; '.join(doubled)}"
        for sid in ids:
            failures[sid] = reason + " (remove or rename the copies)"
    return failures


def _lock(out: Path) -> int:
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


def _convert_all(tasks: list[_SlideTask], jobs: int, progress: bool, report: ConvertReport,
                 failures: dict[str, str]) -> None:
    """Run the tasks into `report`/`failures`."""
    with Progress(len(tasks), "convert", "slide", enabled=progress) as bar:
        try:
            for outcome in _run(tasks, jobs):
                bar.update()
                if outcome.traceback:
                    log.debug("%s: %s", outcome.slide_id, outcome.traceback)
                for note in outcome.notes:
                    log.warning("%s: %s", outcome.slide_id, note)
                if outcome.reason is None:
                    report.converted.append(outcome.slide_id)
                    report.source_bytes += outcome.source_bytes
                else:
                    failures[outcome.slide_id] = outcome.reason
        except _WriteFailed as exc:
            raise ConvertError(str(exc)) from exc


def _worker(conn: Connection) -> None:
    """Worker process: announce readiness, then convert slides until told to stop."""
    # Ctrl-C and scancel go to the whole process group: the parent alone decides how to stop
    # (already ignored when started from the main thread, see _start_without_sigint)
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    try:
        conn.send(None)
        while (task := conn.recv()) is not None:
            try:
                result: object = _convert_slide(task)
            except _WriteFailed as exc:
                result = exc
            conn.send(result)
    except (EOFError, BrokenPipeError):
        pass  # the parent is gone (killed): nothing to report to


def _start_without_sigint(proc: multiprocessing.process.BaseProcess) -> None:
    """Start a worker that ignores Ctrl-C and SIGTERM from its first instruction.

    An ignored signal survives exec and Python keeps it ignored, so a Ctrl-C while the worker
    is still importing torch prints no traceback; the parent stops its workers itself.
    """
    if threading.current_thread() is not threading.main_thread():
        proc.start()  # signal handlers can only be changed from the main thread
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in _STOP_SIGNALS}
    try:
        proc.start()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(tasks: list[_SlideTask], jobs: int) -> Iterator[_Outcome]:
    """Convert `tasks` with `jobs` converters: this process plus jobs - 1 worker processes.

    Workers pull one slide at a time once they are up, so their start-up (seconds: they import
    torch) overlaps with this process converting; whatever no worker has claimed when this
    process runs out of work, it does itself. Raises _WriteFailed from any converter.
    """
    pending = deque(tasks)
    if jobs <= 1 or len(tasks) <= 1:
        while pending:
            yield _convert_slide(pending.popleft())
        return
    # spawn, not fork: zarr runs an event-loop thread and torch a thread pool, neither survives fork
    ctx = multiprocessing.get_context("spawn")
    conns: dict[Connection, multiprocessing.process.BaseProcess] = {}
    for _ in range(min(jobs, len(tasks)) - 1):
        here, there = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(there,), daemon=True)
        _start_without_sigint(proc)
        there.close()
        conns[here] = proc
    inflight: dict[Connection, _SlideTask] = {}
    try:
        while pending or inflight:
            for conn in mp_wait(list(conns), timeout=0 if pending else 1.0):
                task = inflight.pop(conn, None)
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    conns.pop(conn).join(timeout=1)
                    if task is not None:
                        _remove_if_incomplete(task)
                        yield _Outcome(task.slide_id, "worker process died while converting this slide (out of memory?)")
                    continue
                if isinstance(msg, _WriteFailed):
                    raise msg
                if msg is not None:
                    yield msg
                if pending:
                    inflight[conn] = pending.popleft()
                    conn.send(inflight[conn])
            if pending:
                yield _convert_slide(pending.popleft())
    finally:
        # normally no worker holds a slide here; on an error or Ctrl-C the ones still writing
        # are killed and what they left half-written is removed
        for conn, proc in conns.items():
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=5)
            conn.close()
        for task in inflight.values():
            _remove_if_incomplete(task)
