"""From one slide's input files to the validated arrays and attributes of its store group.

:func:`prepare_slide` reads a slide's CLAM (or TRIDENT) files, checks them against each other
and against the store's dtype, and lays them out as `dsca-store/1` arrays. Every check raises
:class:`~dsca.store.errors.ClamError` with a one-line reason; nothing is written here, so a
slide is validated completely before anything of it reaches the store (:mod:`dsca.store.write`).

Checks, in the order they run: the files exist and are readable (the readers in
:mod:`dsca.store.clam` / :mod:`dsca.store.trident`); the two levels' row counts agree with the
x5 coords, naming a swap of the x5/x20 folders (:func:`check_level_rows`); both levels have
the cohort's feature dim and values the stored dtype can hold (:func:`check_feature_arrays`);
an `.h5` copy's coords equal the coords file's; the x20 coords are the 4x4 blocks of the x5
ones (:func:`dsca.store.align.check_alignment`) at a level SCALE^k finer
(:func:`check_level_ratio`); the patch grid is not inflated by a stray coordinate
(:func:`slide_grid`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch

from dsca.coords import BLOCK, SCALE
from dsca.store._io import first_difference
from dsca.store.align import check_alignment
from dsca.store.clam import CoordsFile, file_label, read_coords, read_feature_files
from dsca.store.errors import ClamError
from dsca.store.trident import assemble_blocks, read_trident_level

__all__ = ["PreparedSlide", "SlideTask", "ValidSlide", "check_feature_arrays", "check_level_ratio",
           "check_level_rows", "check_value_range", "prepare_slide", "slide_grid", "validate_slide"]

_T = TypeVar("_T")


@dataclass(frozen=True)
class SlideTask:
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


def _labelled_read(what: str, fn: Callable[..., _T], *args: Any) -> _T:
    """Call a CLAM reader; its ClamError gets `what` (level and kind) in front."""
    try:
        return fn(*args)
    except ClamError as exc:
        raise ClamError(f"{what}: {exc}") from None


def check_value_range(x: np.ndarray, what: str, dtype: np.dtype) -> None:
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


def check_level_rows(n: int, x5_rows: int, x20_rows: int) -> None:
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
class ValidSlide:
    """One validated slide, ready to be written."""

    x5: np.ndarray
    x20: np.ndarray
    low: CoordsFile
    sources: dict[str, dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # warnings for the log (workers have none)


def check_feature_arrays(task: SlideTask, x5: np.ndarray, x20: np.ndarray) -> None:
    """Both levels' features [*, D]: one dim, the cohort's, values the stored dtype can hold."""
    if x5.shape[1] != x20.shape[1]:
        raise ClamError(f"feature dims differ between levels: x5 {x5.shape[1]}, x20 {x20.shape[1]}")
    if task.dim is not None and x5.shape[1] != task.dim:
        raise ClamError(f"feature dim {x5.shape[1]} differs from the cohort's {task.dim}")
    dtype = np.dtype(task.dtype)
    check_value_range(x5, "x5 features", dtype)
    check_value_range(x20, "x20 features", dtype)


# TRIDENT filters each run against tissue on its own: blocks at the tissue's edge lose a few
# tiles. More than this fraction of dropped x5 patches is worth a warning.
_MAX_DROPPED = 0.1


def check_level_ratio(low: CoordsFile, high: CoordsFile) -> None:
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


def _optional_path(p: str | None) -> Path | None:
    """A task's file name as a Path, None for a file the slide does not have."""
    return Path(p) if p else None


def _validate_trident(task: SlideTask) -> ValidSlide:
    """Read one slide's two TRIDENT runs and assemble each x5 patch's 4x4 block of x20 tiles."""
    f5, f20 = task.x5_pt or task.x5_h5, task.x20_pt or task.x20_h5
    if f5 is None or f20 is None:
        raise ClamError(f"missing {'x5' if f5 is None else 'x20'} features (no features_<enc>/<slide>.h5)")
    low = _labelled_read("x5", read_trident_level, Path(f5), _optional_path(task.x5_coords))
    high = _labelled_read("x20", read_trident_level, Path(f20), _optional_path(task.x20_coords))
    blocks = assemble_blocks(low, high)
    check_feature_arrays(task, blocks.x5, blocks.x20)
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
    return ValidSlide(blocks.x5, blocks.x20, coords, roles, extra, notes)


def validate_slide(task: SlideTask) -> ValidSlide:
    """Read and check one slide; raises ClamError with the reason."""
    if task.trident:
        return _validate_trident(task)
    if task.x5_coords is None:
        raise ClamError("missing x5 coords file (no patches/<slide>.h5)")
    if task.x5_pt is None and task.x5_h5 is None:
        raise ClamError("missing x5 features (no .pt/.h5 in the x5 feature dir)")
    if task.x20_pt is None and task.x20_h5 is None:
        raise ClamError("missing x20 features (no .pt/.h5 in the x20 feature dir)")

    low = _labelled_read("x5 coords", read_coords, Path(task.x5_coords), task.x5_attrs)
    f5 = _labelled_read("x5 features", read_feature_files, _optional_path(task.x5_pt), _optional_path(task.x5_h5))
    f20 = _labelled_read("x20 features", read_feature_files, _optional_path(task.x20_pt), _optional_path(task.x20_h5))
    x5, x20 = f5.features, f20.features
    n = low.coords.shape[0]
    check_level_rows(n, x5.shape[0], x20.shape[0])
    check_feature_arrays(task, x5, x20)
    if f5.coords is not None and not np.array_equal(f5.coords, low.coords):
        raise ClamError(f"x5 {file_label(Path(task.x5_h5))} coords disagree with the x5 coords file "
                        f"{file_label(Path(task.x5_coords))} ({first_difference(f5.coords, low.coords)})")
    sources = {"x5_coords": low.source, "x5_features": f5.pt or f5.h5,
               "x5_features_h5": f5.h5 if f5.pt else None,
               "x20_features": f20.pt or f20.h5, "x20_features_h5": f20.h5 if f20.pt else None}
    high, high_ds = f20.coords, None
    if task.x20_coords is not None:
        high_file = _labelled_read("x20 coords", read_coords, Path(task.x20_coords), task.x20_attrs)
        sources["x20_coords"] = high_file.source
        if f20.coords is not None and not np.array_equal(f20.coords, high_file.coords):
            raise ClamError(f"x20 {file_label(Path(task.x20_h5))} coords disagree with the x20 coords file "
                            f"{file_label(Path(task.x20_coords))} ({first_difference(f20.coords, high_file.coords)})")
        high, high_ds = high_file.coords, high_file.downsample
        check_level_ratio(low, high_file)
    if high is not None:
        reason = check_alignment(low, high, high_ds)
        if reason:
            raise ClamError(reason)
    records = {role: rec.to_attrs() for role, rec in sources.items() if rec is not None}
    return ValidSlide(x5, x20, low, records)


# A slide's patch grid spans its tissue's bounding box; tissue pieces far apart leave it mostly
# empty, but no real slide has more than this many empty cells per patch. A stray far-away
# patch (a corrupted coordinate) would otherwise inflate grid_index to gigabytes.
_MAX_CELLS_PER_PATCH = 256
_MIN_CELLS = 1 << 16


def slide_grid(low: CoordsFile) -> tuple[np.ndarray, np.ndarray, int]:
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


def cast_features(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`x` in the stored dtype.

    Through torch: its float32 -> float16 conversion is vectorised, numpy's a scalar loop;
    both round to nearest even, so the bytes are the same.
    """
    if x.dtype == dtype:
        return x
    return torch.from_numpy(np.ascontiguousarray(x)).to(getattr(torch, dtype.name)).numpy()


class PreparedSlide(NamedTuple):
    """One slide laid out for its store group.

    Attributes:
        arrays: name -> (data, codec preset): x5 [N, D], x20 [N, 16, D] in the store's dtype,
            coords [N, 2] int64, grid [N, 2] int32, grid_index [H, W] int32.
        attrs: the slide group's attributes (without `complete`).
        source_bytes: bytes of the source files read.
        notes: warnings for the log.
    """

    arrays: dict[str, tuple[np.ndarray, str]]
    attrs: dict[str, Any]
    source_bytes: int
    notes: list[str]


def prepare_slide(task: SlideTask) -> PreparedSlide:
    """Read, validate and lay out one slide; raises ClamError with the reason."""
    slide = validate_slide(task)
    dtype = np.dtype(task.dtype)
    grid, grid_index, collisions = slide_grid(slide.low)
    if collisions:
        slide.notes.append(f"{collisions} of {len(grid)} patches share a grid cell with an earlier one (step "
                           f"{slide.low.step.tolist()} px): are patch_size and downsample right?")
    arrays = {
        "x5": (cast_features(slide.x5, dtype), task.codec),
        "x20": (cast_features(slide.x20, dtype).reshape(-1, BLOCK, slide.x20.shape[1]), task.codec),
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
    return PreparedSlide(arrays, attrs, sum(int(src["bytes"]) for src in slide.sources.values()), slide.notes)
