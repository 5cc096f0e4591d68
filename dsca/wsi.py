"""Whole-slide images through OpenSlide, addressed in the coordinates of CLAM's coords files.

CLAM's coords are level-0 pixels of the scanned slide. A real slide file's level 0 is that
frame; the synthetic slides of :mod:`dsca.store.synth_wsi` are small files whose base image is
CLAM's level 2, and say so in their ImageDescription (``dsca-synth coords_downsample=<dx>x<dy>``:
coords level-0 px per file level-0 px). :class:`SlideImage` hides the difference: every
position and size it takes is in coords level-0 px.

openslide-python is imported only when a slide is opened, so that ``import dsca`` works
without it.
"""
from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

__all__ = ["SLIDE_SUFFIXES", "SlideImage", "WSIError", "find_slide_file"]

log = logging.getLogger(__name__)

#: File suffixes of the formats OpenSlide reads (matched case-insensitively).
SLIDE_SUFFIXES: tuple[str, ...] = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide",
                                   ".bif", ".czi", ".dcm")

_SYNTH_TAG = re.compile(r"\bdsca-synth coords_downsample=(\S+?)x(\S+)")
# One read allocates at most this many RGBA px (1 GiB): more means a missing pyramid level.
_MAX_READ_PX = 2**28


class WSIError(ValueError):
    """A slide file that cannot be found or read; the message names the file and the problem."""


def find_slide_file(wsi_dir: Path, slide_id: str) -> Path | None:
    """The slide file ``<wsi_dir>/<slide_id><suffix>`` for a suffix in :data:`SLIDE_SUFFIXES`.

    The suffix is matched case-insensitively, the slide id exactly.

    Returns:
        The file, or None when the folder holds none for this slide.

    Raises:
        WSIError: `wsi_dir` is not a folder, two files match (``a.svs`` and ``a.tiff``), or the
            slide id could leave the folder (path separators, ``.``/``..``).
    """
    folder = Path(wsi_dir)
    seps = {"/", "\\", os.sep, os.altsep or "/"}
    if not slide_id or slide_id in (".", "..") or any(s in slide_id for s in seps) or "\x00" in slide_id:
        raise WSIError(f"slide id {slide_id!r} cannot name a file in {folder} (empty, '.', '..' or a path)")
    if not folder.is_dir():
        raise WSIError(f"{folder}: no such folder of slide images")
    matches = sorted(
        entry.path for entry in os.scandir(folder)
        if entry.name.startswith(slide_id) and entry.name[len(slide_id):].lower() in SLIDE_SUFFIXES
        and entry.is_file()
    )
    if len(matches) > 1:
        raise WSIError(f"{folder}: more than one image of slide {slide_id!r} "
                       f"({', '.join(Path(m).name for m in matches)}); keep one")
    return Path(matches[0]) if matches else None


class SlideImage:
    """An open slide file; positions and sizes in coords level-0 px. Use :meth:`open`.

    Attributes:
        path: the file.
        dimensions: (w, h) of the file's level 0 in its own px.
        coords_downsample: (dx, dy) coords level-0 px per file level-0 px; (1, 1) for real
            slides, the file's declared value for synthetic ones.
    """

    def __init__(self, path: Path, slide: Any, coords_downsample: tuple[float, float]) -> None:
        self.path = path
        self._slide = slide
        w, h = slide.dimensions
        self.dimensions: tuple[int, int] = (int(w), int(h))
        self.coords_downsample: tuple[float, float] = coords_downsample

    @classmethod
    def open(cls, path: Path) -> SlideImage:
        """Open `path` with OpenSlide.

        Raises:
            WSIError: the file is missing, OpenSlide cannot read it, or it declares a bad
                ``coords_downsample``.
        """
        import openslide

        path = Path(path)
        if not path.is_file():
            raise WSIError(f"{path}: no such slide file")
        try:
            slide = openslide.OpenSlide(str(path))
        except (openslide.OpenSlideError, OSError) as exc:  # unsupported format is an OpenSlideError
            raise WSIError(f"{path}: OpenSlide cannot open it as a slide ({exc})") from exc
        try:
            scale = _coords_downsample(path, slide.properties.get("tiff.ImageDescription", ""))
        except WSIError:
            slide.close()
            raise
        log.debug("%s: %s, %d level(s), coords_downsample %s", path, slide.properties.get("openslide.vendor"),
                  slide.level_count, scale)
        return cls(path, slide, scale)

    def extent(self) -> tuple[float, float]:
        """(w, h) of the slide in coords level-0 px."""
        (w, h), (dx, dy) = self.dimensions, self.coords_downsample
        return w * dx, h * dy

    def thumbnail(self, max_size: int) -> tuple[np.ndarray, np.ndarray]:
        """The whole slide, its longer side `max_size` px (never enlarged).

        Returns:
            ([H, W, 3] uint8 RGB, [2] float64 thumbnail px per coords level-0 px, per axis).
        """
        if int(max_size) < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        w, h = self.dimensions
        factor = max(1.0, max(w, h) / int(max_size))
        size = (max(1, round(w / factor)), max(1, round(h / factor)))
        image = self._read(0.0, 0.0, float(w), float(h), size)
        dx, dy = self.coords_downsample
        return image, np.array([size[0] / (w * dx), size[1] / (h * dy)])

    def read_region(self, x: float, y: float, size: float, out_size: int) -> np.ndarray:
        """[out_size, out_size, 3] uint8 RGB of the square of side `size` at corner (x, y).

        All three are in coords level-0 px; the square is read from the pyramid level closest
        above the output resolution and resized. Outside the slide is white.
        """
        values = (x, y, size)
        if not all(math.isfinite(v) for v in values) or size <= 0 or int(out_size) < 1:
            raise ValueError(f"read_region needs finite x, y, size > 0 and out_size >= 1, got "
                             f"{x}, {y}, {size}, {out_size}")
        dx, dy = self.coords_downsample
        return self._read(x / dx, y / dy, size / dx, size / dy, (int(out_size), int(out_size)))

    def close(self) -> None:
        """Release the file (idempotent)."""
        if self._slide is not None:
            self._slide.close()
            self._slide = None

    def __enter__(self) -> SlideImage:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"SlideImage({str(self.path)!r}, dimensions={self.dimensions}, "
                f"coords_downsample={self.coords_downsample})")

    def _read(self, fx: float, fy: float, fw: float, fh: float, out: tuple[int, int]) -> np.ndarray:
        """[out_h, out_w, 3] uint8: the box (fx, fy, fw, fh) in file level-0 px, resized to `out`."""
        from PIL import Image

        if self._slide is None:
            raise WSIError(f"{self.path}: the slide is closed")
        slide = self._slide
        level = slide.get_best_level_for_downsample(max(fw / out[0], fh / out[1]))
        ds = float(slide.level_downsamples[level])
        # the whole level px that cover the box, one more on each side for the resampling filter
        lx0, ly0 = math.floor(fx / ds) - 1, math.floor(fy / ds) - 1
        lw = math.ceil((fx + fw) / ds) + 1 - lx0
        lh = math.ceil((fy + fh) / ds) + 1 - ly0
        if lw * lh > _MAX_READ_PX:
            raise WSIError(f"{self.path}: reading {fw:.0f} x {fh:.0f} px at {out[0]} x {out[1]} needs "
                           f"{lw} x {lh} px of its smallest fitting level {level}; the file has no coarser level")
        # OpenSlide places level px (i, j) at level-0 (i * ds, j * ds); its location is level-0
        x0, y0 = round(lx0 * ds), round(ly0 * ds)
        try:
            rgba = np.asarray(slide.read_region((x0, y0), level, (lw, lh)))
        except Exception as exc:  # openslide.OpenSlideError, but the module is imported lazily
            raise WSIError(f"{self.path}: OpenSlide failed to read level {level} at {x0}, {y0} ({exc})") from exc
        rgb = _over_white(rgba)
        bx, by = fx / ds - x0 / ds, fy / ds - y0 / ds
        box = (bx, by, bx + fw / ds, by + fh / ds)
        resized = Image.fromarray(rgb).resize(out, resample=Image.Resampling.BILINEAR, box=box)
        return np.asarray(resized, dtype=np.uint8)


def _over_white(rgba: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8: [H, W, 4] straight-alpha RGBA composited over white (OpenSlide returns
    alpha 0 outside the slide and in missing tiles)."""
    alpha = rgba[..., 3:4].astype(np.uint16)
    if np.all(alpha == 255):
        return np.ascontiguousarray(rgba[..., :3])
    rgb = (rgba[..., :3].astype(np.uint16) * alpha + 255 * (255 - alpha) + 127) // 255
    return rgb.astype(np.uint8)


def _coords_downsample(path: Path, description: str) -> tuple[float, float]:
    """(dx, dy) a synthetic slide declares in its ImageDescription; (1, 1) for any other slide."""
    match = _SYNTH_TAG.search(description)
    if match is None:
        return 1.0, 1.0
    try:
        dx, dy = float(match.group(1)), float(match.group(2))
    except ValueError:
        dx = dy = math.nan
    if not (math.isfinite(dx) and math.isfinite(dy) and dx > 0 and dy > 0):
        raise WSIError(f"{path}: ImageDescription declares coords_downsample={match.group(1)}x{match.group(2)}; "
                       "expected two positive numbers")
    return dx, dy
