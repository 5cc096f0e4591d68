"""Low-res (level 2) patches -> their aligned 4x4 blocks of high-res (level 1) patches.

Low-res patch i covers SCALE x SCALE high-res patches of the same pixel size one level down.
Its 16 rows are block-major and row-major inside the block: sub-patch (col c, row r) is row
``16*i + 4*r + c`` at level-0 offset ``(c, r) * patch_size * downsample(level)``. Older tools
used an offset of ``patch_size`` only, i.e. measured in level-1 pixels but applied to level-0
coordinates, so the blocks shrink to a quarter of the low-res patch; :func:`check_alignment` names that
convention when it sees it.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from einops import rearrange

from dsca.coords import SCALE
from dsca.progress import Progress
from dsca.store._layout import slide_id_problem
from dsca.store.clam import ClamError, CoordsFile, find_coords_dir, index_dir, read_coords, write_coords

__all__ = ["block_offsets", "align_coords", "aligned_attrs", "check_alignment", "align_dir", "AlignReport"]

log = logging.getLogger(__name__)


def level_downsample(low: CoordsFile, level: int) -> np.ndarray:
    """[2] per-axis downsample of `level`, from the low-res file's own (SCALE per level)."""
    low_level = low.patch_level if low.patch_level is not None else level + 1
    return low.downsample / float(SCALE) ** (low_level - level)


def block_offsets(patch_size: int, downsample: np.ndarray) -> np.ndarray:
    """[16, 2] int64 level-0 offsets of the sub-patches, row-major (r outer, c inner)."""
    r, c = np.meshgrid(np.arange(SCALE), np.arange(SCALE), indexing="ij")
    cr = np.stack([c.ravel(), r.ravel()], axis=1).astype(np.float64)
    return np.rint(cr * patch_size * np.asarray(downsample, dtype=np.float64)).astype(np.int64)


def align_coords(coords: np.ndarray, patch_size: int, downsample: np.ndarray) -> np.ndarray:
    """Expand low-res patch corners into their block-major high-res corners.

    Args:
        coords: [N, 2] int64 level-0 corners of the low-res patches.
        patch_size: pixel size of a high-res patch at its own level.
        downsample: [2] per-axis downsample of the high-res level.

    Returns:
        [16N, 2] int64 level-0 corners; row ``16*i + 4*r + c`` is sub-patch (c, r) of patch i.
    """
    offsets = block_offsets(patch_size, downsample)
    out = coords[:, None, :].astype(np.int64) + offsets[None, :, :]
    return rearrange(out, "n k xy -> (n k) xy")


def aligned_attrs(low: CoordsFile, level: int) -> dict:
    """CLAM attrs describing the high-res file derived from `low` at `level`."""
    factor = SCALE ** ((low.patch_level if low.patch_level is not None else level + 1) - level)
    attrs = dict(low.attrs)
    attrs["patch_size"] = low.patch_size
    attrs["patch_level"] = level
    attrs["downsample"] = level_downsample(low, level)
    for key in ("downsampled_level_dim", "level_dim"):
        if key in attrs:
            try:
                attrs[key] = np.asarray(attrs[key], dtype=np.int64) * factor
            except (ValueError, TypeError):  # not ours to repair: the aligned file leaves it out
                del attrs[key]
    return attrs


def check_alignment(low: CoordsFile, high: np.ndarray, high_downsample: np.ndarray | None = None) -> str | None:
    """Return None when `high` [16N, 2] is the aligned expansion of `low`, else the reason.

    A 1-pixel tolerance absorbs rounding of non-integer downsamples done differently.
    """
    n = low.coords.shape[0]
    if high.shape != (SCALE * SCALE * n, 2):
        return f"x20 coords have {high.shape[0]} rows, expected {SCALE * SCALE} x {n} = {SCALE * SCALE * n}"
    ds = level_downsample(low, (low.patch_level or 2) - 1) if high_downsample is None else high_downsample
    offsets = rearrange(high, "(n k) xy -> n k xy", k=SCALE * SCALE) - low.coords[:, None, :]
    expected = block_offsets(low.patch_size, ds)
    if np.all(np.abs(offsets - expected[None]) <= 1):
        return None
    naive = block_offsets(low.patch_size, np.ones(2))
    if np.all(offsets == naive[None]):
        step = low.patch_size * ds
        return (
            f"x20 coords are misaligned: sub-patch offsets are patch_size ({low.patch_size} px) instead of "
            f"patch_size x downsample ({step[0]:.1f} px), the old big_to_small_patching convention; "
            "re-create them with `dsca-store align`"
        )
    bad = int(np.argmax(np.any(np.abs(offsets - expected[None]) > 1, axis=(1, 2))))
    return (
        f"x20 coords are not aligned with their x5 patch: block {bad} at {low.coords[bad].tolist()} "
        f"has offsets {offsets[bad, 1].tolist()}.. expected {expected[1].tolist()}.."
    )


@dataclass
class AlignReport:
    written: int
    failures: list[tuple[str, str]]

    @property
    def ok(self) -> bool:
        return not self.failures


def align_dir(coords_dir: str | Path, out_dir: str | Path, level: int = 1, progress: bool = True,
              given: dict | None = None) -> AlignReport:
    """Write aligned level-`level` coords for every `patches/*.h5` under `coords_dir`.

    Output mirrors CLAM's layout: `<out_dir>/patches/<slide_id>.h5` (+ the process list).
    `given` supplies level attributes (patch_size, patch_level, downsample) to files that lack
    them; a file's own attributes win.
    """
    src = find_coords_dir(Path(coords_dir))
    out = Path(out_dir)
    failures: list[tuple[str, str]] = []
    written = 0
    files = [p for ps in index_dir(src, ".h5").values() for p in ps]
    if not files:
        raise ClamError(f"no coordinate files (*.h5) in {src}")
    target = out / "patches"
    if target.resolve() == src.resolve() or out.resolve() == src.resolve():
        # the level-1 files would replace the level-2 ones they are computed from
        raise ClamError(f"--out {out} would overwrite the input coordinates in {src}; choose another folder")
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ClamError(f"cannot create {target} ({exc.strerror or exc})") from None
    with Progress(len(files), "align", "slide", enabled=progress) as bar:
        for path in files:
            try:
                problem = slide_id_problem(path.stem)
                if problem is not None:
                    raise ClamError(problem)
                low = read_coords(path, given)
                if low.patch_level is not None and low.patch_level <= level:
                    raise ClamError(f"patch_level is {low.patch_level}, cannot align to level {level}")
                ds = level_downsample(low, level)
                factor = SCALE ** ((low.patch_level or level + 1) - level)
                if factor != SCALE:
                    raise ClamError(f"level {level} is {factor}x finer than the coords' level; only {SCALE}x is supported")
                high = align_coords(low.coords, low.patch_size, ds)
                write_coords(out / "patches" / path.name, high, aligned_attrs(low, level))
                written += 1
            except ClamError as exc:
                failures.append((path.stem, str(exc)))
            except OSError as exc:  # a full disk or a read-only --out: every later slide fails too
                raise ClamError(f"writing {out / 'patches' / path.name} failed ({exc.strerror or exc})") from None
            bar.update()
    process_list = src.parent / "process_list_autogen.csv"
    if process_list.is_file():
        try:
            shutil.copy(process_list, out / "process_list_autogen.csv")
        except OSError as exc:
            raise ClamError(f"copying {process_list} to {out} failed ({exc.strerror or exc})") from None
    return AlignReport(written, failures)
