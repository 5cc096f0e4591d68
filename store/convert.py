"""`dsca-store convert`: validate a cohort's CLAM outputs and pack them into a `dsca-store/1` store.

This module is the run's plan and its report; each step has its own module:

* :mod:`dsca.store.inputs` - index the input folders, match the labels CSV;
* :mod:`dsca.store.validate` - read and check one slide, lay it out as store arrays;
* :mod:`dsca.store.write` - the store's lock, root metadata and slide groups;
* :mod:`dsca.store.parallel` - run the slides in this process and ``--jobs - 1`` workers.

Each slide is validated completely before anything of it is written; its group is written
beside its place and swapped in only once marked ``complete``. Readers ignore incomplete
slides and a rerun redoes them, so a run killed at any point leaves no slide that claims to be
complete and is not (tested with kill -9). A run that stops on its own terms also leaves
nothing half-written: a failed write removes its slide; Ctrl-C lets the slide being written
here finish, kills the workers and removes their unfinished slides. One convert at a time per
store (a lock that dies with its process).

Input problems fail their slide only (one line naming the slide, the file and the reason);
the other slides are converted and the report lists every failure. Nothing outside
``slides/<valid slide id>/`` and the store's own metadata files is ever deleted or written.

Each slide records its sources (path, size, mtime, crc32c); a rerun converts a complete slide
again when its sources changed since (a re-extraction into the same folders), and skips it
otherwise.

Sharded (``--shard I/N``, :class:`Shard`, e.g. one job of a cluster job array): the cohort is
read and checked as a whole, then this run converts only the slides whose id hashes to shard
I (crc32, so the split is the same in every process and independent of listing order) and
reports only their problems. N shards write one store at once: they share its lock, the
first creates the root, none consolidates; :func:`finalize_store` (``dsca-store finalize``)
does that once all are done, under the exclusive lock that a convert without ``--shard``
holds too. Until then readers see the complete slides and that the store is not finalized.
"""
from __future__ import annotations

import logging
import os
import re
import time
import traceback
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from dsca.progress import Progress
from dsca.store._layout import (
    DEFAULT_CODEC,
    DTYPES,
    SHARDED,
    SLIDES,
    TEMP_FILE,
    codec_chain,
    complete_attrs,
    complete_slides,
    slide_folder,
    slide_id_problem,
)
from dsca.store.errors import ClamError, ConvertError, StoreError
from dsca.store.inputs import CohortInputs, LabelSlides, cohort_dim, duplicate_ids, hint_extensions, read_label_slides
from dsca.store.parallel import run_tasks
from dsca.store.provenance import refreshed_sources, source_changes
from dsca.store.remote import RemoteLocation, StorageOptions, is_url, local_path
from dsca.store.remote_write import RemotePublisher
from dsca.store.validate import SlideTask, prepare_slide
from dsca.store.write import (
    NewStore,
    WriteFailed,
    finish_store,
    init_store,
    join_store,
    lock_store,
    remove_if_incomplete,
    remove_temp_files,
    root_attrs,
    update_root,
    update_slides,
    write_slide,
)

# ConvertError, LabelSlides and read_label_slides are re-exported: the CLI and tests import them from here
__all__ = ["ConvertReport", "ConvertError", "FinalizeReport", "LabelSlides", "Shard", "convert_cohort",
           "finalize_store", "read_label_slides"]

log = logging.getLogger(__name__)

_SHARD = re.compile(r"([0-9]+)/([0-9]+)")


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` of a cohort: the slides whose id's crc32 is `index` modulo `count`.

    A hash of the id alone, not a place in a listing: every process assigns a slide to the same
    shard whatever else it sees (a slide added meanwhile moves no other), and Python's own
    `hash` of a string differs between processes.
    """

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index}/{self.count}: expected I/N with N >= 1 and 0 <= I < N")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """`"I/N"` (e.g. ``"$SLURM_ARRAY_TASK_ID/8"``); ValueError with a one-line reason otherwise."""
        match = _SHARD.fullmatch(text)
        if match is None:
            raise ValueError(f"expected I/N (shard I of N, 0 <= I < N), got {text!r}")
        index, count = int(match.group(1)), int(match.group(2))
        if count < 1:
            raise ValueError(f"N must be at least 1, got {text!r}")
        if index >= count:
            raise ValueError(f"I must be below N (shards are numbered 0 to N-1), got {text!r}")
        return cls(index, count)

    def owns(self, slide_id: str) -> bool:
        """Whether this shard converts `slide_id` (ids that are not valid UTF-8 included)."""
        return zlib.crc32(slide_id.encode("utf-8", "surrogateescape")) % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


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
        shard: the shard this run converted (None: the whole cohort); every list above holds
            its slides only.
    """

    out: Path | str  # a local folder, or the store's URL
    converted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    reconverted: list[str] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    source_bytes: int = 0
    seconds: float = 0.0
    shard: Shard | None = None

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
    """A slide id for a one-line message: quoted when it holds unprintable characters."""
    return slide_id if slide_id.isprintable() else repr(slide_id)


@dataclass(frozen=True)
class _Options:
    """How slides are written (validated once in convert_cohort)."""

    dtype: str = "float16"
    codec: str = DEFAULT_CODEC
    overwrite: bool = False
    x5_attrs: dict[str, Any] = field(default_factory=dict)
    x20_attrs: dict[str, Any] = field(default_factory=dict)


def _slide_task(inputs: CohortInputs, sid: str, out: Path, options: _Options, dim: int | None,
                patient_id: str | None) -> SlideTask:
    """What converting one slide needs, for this process or a worker."""
    return SlideTask(sid, str(out), **inputs.slide_files(sid), dtype=options.dtype, codec=options.codec, dim=dim,
                     patient_id=patient_id, x5_attrs=dict(options.x5_attrs), x20_attrs=dict(options.x20_attrs),
                     trident=inputs.trident)


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
    shard: Shard | None = None,
    storage_options: StorageOptions | None = None,
    staging: str | Path | None = None,
) -> ConvertReport:
    """Validate and pack a cohort; see the module docstring. Per-slide problems go to the report.

    `x5_attrs`/`x20_attrs` give level attributes (patch_size, patch_level, downsample) for
    coordinate files that lack them; a file's own attributes always win. `labels_map` names
    the labels CSV's columns (see :func:`dsca.labels.parse_labels_map`). `shard`: convert only
    that shard's slides, alongside the other shards (the store then needs
    :func:`finalize_store`); `overwrite` then redoes this shard's complete slides only.

    `out` may be a URL (``s3://bucket/cohort.zarr``; `storage_options` for fsspec): the run
    then converts into a staging store in `staging` (default: the temp folder) and uploads
    each slide as it is done, in the order of :mod:`dsca.store.remote_write`.
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
    publisher = None
    if is_url(out):
        try:
            publisher = RemotePublisher(RemoteLocation(str(out), storage_options), staging)
        except StoreError as exc:
            raise ConvertError(str(exc)) from None
    try:
        return _convert(x5_features, x20_features, x5_coords, out, x20_coords, labels, dtype, codec, jobs, progress,
                        extractor, labels_map, shard, options, publisher, t0)
    except ConvertError as exc:
        if publisher is None:
            raise
        raise ConvertError(publisher.message(str(exc))) from None
    finally:
        if publisher is not None:
            publisher.close()


def _convert(x5_features: str | Path, x20_features: str | Path, x5_coords: str | Path, out: str | Path,
             x20_coords: str | Path | None, labels: str | Path | None, dtype: str, codec: str, jobs: int,
             progress: bool, extractor: str | None, labels_map: str | None, shard: Shard | None, options: _Options,
             publisher: RemotePublisher | None, t0: float) -> ConvertReport:
    """convert_cohort after its options are checked; `publisher`: `out` is a URL."""
    out = local_path(out) if publisher is None else publisher.store
    inputs = CohortInputs.open(x5_features, x20_features, x5_coords, x20_coords)
    report = ConvertReport(out=out if publisher is None else publisher.remote.url, shard=shard)
    everything = inputs.slide_ids
    if not everything:
        raise ConvertError(f"no slides found: no .h5 in {inputs.c5_dir}, no .pt/.h5 in {inputs.roots[0]} "
                           f"or {inputs.roots[1]}")
    failures = {sid: problem for sid in everything if (problem := slide_id_problem(sid)) is not None}
    failures.update({sid: reason for sid, reason in inputs.locked.items() if sid not in failures})
    everything -= set(failures)
    failures.update(duplicate_ids({what: {s: p for s, p in files.items() if s in everything}
                                    for what, files in inputs.by_kind().items()}))
    patients: dict[str, str] = {}
    if labels is not None:
        table = read_label_slides(labels, everything, labels_map)
        patients = table.patients
        failures.update({sid: reason for sid, reason in table.problems.items() if sid not in failures})
        report.missing = [sid for sid in table.missing if sid not in failures]
        hint_extensions(table.missing, everything)
    # the cohort is checked as a whole (ids that collide across shards, one labels CSV), each
    # shard reports and converts its own slides: the shards' reports add up to one run's
    mine = shard.owns if shard is not None else (lambda sid: True)
    report.missing = [sid for sid in report.missing if mine(sid)]
    unlabelled = sorted(s for s in everything - set(patients) - set(failures) if mine(s)) if labels is not None else []
    if unlabelled:
        more = f" and {len(unlabelled) - 3} more" if len(unlabelled) > 3 else ""
        log.warning("%d slides are not in the labels CSV (%s%s); converted without a patient id",
                    len(unlabelled), ", ".join(unlabelled[:3]), more)

    existed = publisher.mirror() if publisher is not None else out.exists()
    if existed and not out.is_dir():
        raise ConvertError(f"{out} exists and is not a folder; refusing to write into it")
    # temp files: what another convert (or shard) creating this store at the same moment writes first
    if existed and not (out / "zarr.json").exists() and any(not TEMP_FILE.fullmatch(c.name) for c in out.iterdir()):
        raise ConvertError(f"{out} exists and is not a zarr store; refusing to write into it")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConvertError(f"cannot create {out} ({exc.strerror or exc})") from None
    # on failure the folder stays: the convert holding it owns it now
    lock = lock_store(out, shared=shard is not None)
    cohort = sorted(everything - set(failures))
    name = extractor or inputs.encoder or inputs.roots[0].name
    explicit = extractor is not None or inputs.encoder is not None
    try:
        if shard is None:
            attrs, created = init_store(out, existed, dtype, codec, name, explicit_extractor=explicit)
        else:
            # the whole cohort's dim (not this shard's): every shard records the same one
            attrs, _ = join_store(out, dtype, codec, name, explicit, shard.count, lambda: cohort_dim(inputs, cohort))
            created = None  # never removed by a shard: the others may be writing into it
    except BaseException:
        os.close(lock)
        raise
    try:
        slide_ids = [sid for sid in cohort if mine(sid)]
        if shard is not None:
            log.info("shard %s: %d of the cohort's %d slides", shard, len(slide_ids), len(cohort))
        tasks = _plan(report, out, inputs, options, slide_ids, patients if labels is not None else None,
                      attrs.get("feature_dim"), failures, shard)
        if publisher is not None:  # the root without a stale summary, before any slide changes
            publisher.publish_metadata()
            if shard is not None:
                publisher.check_shard_marker()
        _convert_all(tasks, jobs, progress, report, failures, publisher)
        if publisher is not None and shard is not None:
            publisher.check_shard_marker()
    except BaseException:
        # the first error is the one to report; a full disk would fail the clean-up's writes too
        if publisher is not None:
            publisher.match_remote()
        _finish(out, created, shard, quiet=True)
        if publisher is not None and shard is None:
            publisher.finish(quiet=True)
        raise
    else:
        if publisher is not None:
            publisher.match_remote()
        _finish(out, created, shard)
        if publisher is not None and shard is None:
            publisher.finish()
    finally:
        os.close(lock)
    for sid in report.reconverted:
        if sid in failures and complete_attrs(slide_folder(out, sid)) is not None:
            failures[sid] += "; the store keeps the slide as converted from its earlier sources"
    shown = publisher.message if publisher is not None else str
    report.failures = sorted((sid, shown(reason)) for sid, reason in failures.items() if mine(sid))
    report.converted.sort()
    report.seconds = time.perf_counter() - t0
    return report


def _finish(out: Path, created: NewStore | None, shard: Shard | None, quiet: bool = False) -> None:
    """The end of a run: a whole store's (:func:`finish_store`), or only a shard's own leftovers."""
    if shard is None:
        finish_store(out, created, quiet=quiet)
    else:
        remove_temp_files(out, shard.owns)


def _plan(report: ConvertReport, out: Path, inputs: CohortInputs, options: _Options, slide_ids: list[str],
          patients: dict[str, str] | None, dim: int | None, failures: dict[str, str],
          shard: Shard | None = None) -> list[SlideTask]:
    """The slides this run converts: new ones, incomplete ones, and complete ones whose sources
    changed (all with `overwrite`); records the cohort's feature dim in a new store (a shard
    found it recorded by :func:`join_store`). With labels, complete slides take their patient
    ids from them. `shard`: only its slides are looked at or cleaned up."""
    labelled = patients is not None
    patients = patients or {}
    updates: dict[str, dict[str, Any]] = {}  # complete slide -> new attrs (patient id, moved sources)
    remove_temp_files(out, shard.owns if shard is not None else None)
    complete = {sid: a for sid, a in complete_slides(out).items() if shard is None or shard.owns(sid)}
    if dim is None and shard is None:
        dim = cohort_dim(inputs, slide_ids)
        if dim is not None:  # recorded before any slide: a killed run must leave a readable store
            update_root(out, {"feature_dim": int(dim)})
    tasks = []
    for sid in slide_ids:
        if inputs.c20_dir is not None and sid not in inputs.c20:
            failures[sid] = f"missing x20 coords file (no {inputs.coords_name(sid)} in {inputs.c20_dir})"
            continue
        folder = slide_folder(out, sid)
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            failures[sid] = f"{SLIDES}/{sid} in the store is not a slide folder (a link or a file): remove it"
            continue
        task = _slide_task(inputs, sid, out, options, dim, patients.get(sid))
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
    update_slides(out, updates)
    gone = sorted(set(complete) - set(slide_ids) - set(failures))
    if gone:
        more = f" and {len(gone) - 3} more" if len(gone) > 3 else ""
        log.warning("%d complete slides of %s have no source files in this run (%s%s); they stay in the store "
                    "as converted earlier", len(gone), out, ", ".join(gone[:3]), more)
    return tasks


class _Outcome(NamedTuple):
    """What converting one slide gave (sent back from worker processes)."""

    slide_id: str
    reason: str | None = None  # why it failed; None = converted
    source_bytes: int = 0
    traceback: str | None = None  # of an unexpected error, for the debug log (-v)
    notes: tuple[str, ...] = ()  # warnings about a converted slide


def _convert_slide(task: SlideTask) -> _Outcome:
    """Validate + write one slide (in this process or a worker).

    Anything that goes wrong before the write fails this slide only, with one line (an
    unexpected error's traceback goes to the debug log, also from a worker process); a write
    problem raises WriteFailed (every later slide would fail the same way).
    """
    try:
        slide = prepare_slide(task)
    except ClamError as exc:
        return _Outcome(task.slide_id, str(exc))
    except MemoryError:
        return _Outcome(task.slide_id, "out of memory while reading the slide")
    except Exception as exc:  # noqa: BLE001 - one odd input must not stop a 1,000-slide run
        return _Outcome(task.slide_id, f"cannot read its files ({type(exc).__name__}: {exc}; -v for the traceback)",
                        traceback=traceback.format_exc())
    write_slide(task.out, task.slide_id, slide.arrays, slide.attrs)
    return _Outcome(task.slide_id, None, slide.source_bytes, notes=tuple(slide.notes))


def _worker_died(task: SlideTask) -> _Outcome:
    """The outcome of a slide whose worker process died (the OS killed it, most likely)."""
    return _Outcome(task.slide_id, "worker process died while converting this slide (out of memory?)")


def _discard(task: SlideTask) -> None:
    """Remove what an unfinished conversion of `task` left in the store."""
    remove_if_incomplete(task.out, task.slide_id)


# by name: each worker imports its own copy of this module (spawn), this process looks the
# function up for each slide it converts itself
_CONVERT_SLIDE = f"{__name__}:_convert_slide"


def _convert_all(tasks: list[SlideTask], jobs: int, progress: bool, report: ConvertReport,
                 failures: dict[str, str], publisher: RemotePublisher | None = None) -> None:
    """Run the tasks into `report`/`failures`; with `publisher`, upload each converted slide
    (here, in this process, as its outcome arrives: workers only write the staging store)."""
    with Progress(len(tasks), "convert", "slide", enabled=progress) as bar:
        try:
            for outcome in run_tasks(tasks, jobs, _CONVERT_SLIDE, lost=_worker_died, discard=_discard):
                bar.update()
                if outcome.traceback:
                    log.debug("%s: %s", outcome.slide_id, outcome.traceback)
                for note in outcome.notes:
                    log.warning("%s: %s", outcome.slide_id, note)
                if outcome.reason is None and publisher is not None:
                    publisher.publish_slide(outcome.slide_id)  # ConvertError: fatal, as WriteFailed
                if outcome.reason is None:
                    report.converted.append(outcome.slide_id)
                    report.source_bytes += outcome.source_bytes
                else:
                    failures[outcome.slide_id] = outcome.reason
        except WriteFailed as exc:
            raise ConvertError(str(exc)) from exc


@dataclass(frozen=True)
class FinalizeReport:
    """Outcome of :func:`finalize_store`.

    Attributes:
        slides: complete slides in the store.
        shards: N of the sharded convert it finalized (0: its marker was unreadable); None
            when the store was not waiting for finalize (consolidated again all the same).
        seconds: wall time.
    """

    out: Path | str
    slides: int
    shards: int | None
    seconds: float


def finalize_store(out: str | Path, storage_options: StorageOptions | None = None,
                   staging: str | Path | None = None) -> FinalizeReport:
    """Finish a store after the shards of a sharded convert: what a convert without --shard does
    at its end (leftover temp files removed, the codec in use recorded, metadata consolidated),
    and the SHARDED marker removed. Holds the store alone (ConvertError while any shard or
    convert runs); never converts or removes a slide. Safe to run again.

    `out` may be a URL: the remote slide documents are mirrored into a staging store (in
    `staging`), consolidated there and the root uploaded (no lock on object storage: run it
    once every shard is done)."""
    t0 = time.perf_counter()
    if is_url(out):
        return _finalize_remote(str(out), storage_options, staging, t0)
    out = Path(out)
    if not out.is_dir() or not (out / "zarr.json").is_file():
        raise ConvertError(f"{out}: no dsca-store here (missing zarr.json)")
    lock = lock_store(out)
    try:
        marker = root_attrs(out).get(SHARDED)
        finish_store(out, None)
        slides = len(complete_slides(out))
    finally:
        os.close(lock)
    return FinalizeReport(out, slides, _marker_shards(marker), time.perf_counter() - t0)


def _marker_shards(marker: Any) -> int | None:
    """The shard count a SHARDED marker records (None: the store was not sharded)."""
    shards = marker.get("shards") if isinstance(marker, dict) else None
    if marker is not None and not isinstance(shards, int):
        shards = 0  # a damaged marker: it was waiting for finalize all the same
    return shards


def _finalize_remote(url: str, storage_options: StorageOptions | None, staging: str | Path | None,
                     t0: float) -> FinalizeReport:
    """finalize_store of a store at a URL, through a staging copy of its metadata."""
    try:
        publisher = RemotePublisher(RemoteLocation(url, storage_options), staging)
    except StoreError as exc:
        raise ConvertError(str(exc)) from None
    try:
        if not publisher.mirror():
            raise ConvertError(f"{publisher.remote.url}: no dsca-store here ({publisher.remote.absent_reason()})")
        marker = root_attrs(publisher.store).get(SHARDED)
        finish_store(publisher.store, None)
        publisher.finish()
        slides = len(complete_slides(publisher.store))
    except ConvertError as exc:
        raise ConvertError(publisher.message(str(exc))) from None
    finally:
        publisher.close()
    return FinalizeReport(publisher.remote.url, slides, _marker_shards(marker), time.perf_counter() - t0)
