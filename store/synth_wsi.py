"""Small pyramidal TIFFs of the synthetic slides, painted from their recorded truth.

A synthetic slide at full resolution would be ~70k x 70k px; the file's base image is the slide
at CLAM's level 2 instead (file pixel = coords level-0 pixel / downsample, per axis), and the
file says so in its ImageDescription (``dsca-synth coords_downsample=<dx>x<dy>``), which
:class:`dsca.wsi.SlideImage` reads. Levels: downsample 1, 4 and 16 of that base, tiled 256 x 256,
RGB uint8, deflate-compressed; OpenSlide opens the files as "generic-tiff".

What is painted: white background; every x20 sub-patch (64 x 64 base px: the level-0 offset
``block_offsets(256, downsample / 4)`` of sub-patch (c, r) is (c, r) * 64 base px) in an
H&E-like colour by tissue type (tumour dark purple, stroma pink, other pale lilac) with a mild
texture; sub-patches whose x20 row carries the motif get dark blue-black nuclei-like dots.
"""
from __future__ import annotations

import functools
import logging
import os
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dsca.atomic import atomic_path
from dsca.coords import BLOCK, SCALE
from dsca.store._layout import slide_id_problem
from dsca.store.clam import read_coords
from dsca.store.synth import PATCH_SIZE, TISSUE_DIR, WSI_DIR, TISSUES

__all__ = ["write_slide_images"]

log = logging.getLogger(__name__)

_TILE = 256
_SUB = PATCH_SIZE // SCALE  # base px of one x20 sub-patch
_LEVELS = (1, SCALE, SCALE * SCALE)  # file downsamples: x5, then the next two steps down
_VARIANTS = 4  # texture variants per tissue type, so that neighbouring patches differ
# Nominal level-0 resolution of the synthetic slides (a 40x scan), for the resolution tags.
_MPP0 = 0.25
# Deflate level of tissue tiles: 3 packs them ~25% smaller than 1 in the same time; 6 would
# save another third for three times the time.
_ZLEVEL = 3
# Slides painted at once: zlib and numpy release the GIL, so threads overlap the encoding.
_MAX_WORKERS = 4
_X5_COORDS = f"tiles-l2-s{PATCH_SIZE}/patches"

# Light and dark tone of each tissue (RGB), then its nuclei/fibre accent.
_TONES = {
    "tumour": ((150, 80, 172), (104, 46, 132), (84, 36, 122)),
    "stroma": ((246, 172, 204), (224, 132, 176), (206, 108, 160)),
    "other": ((228, 210, 240), (204, 182, 226), (182, 150, 212)),
}
_MOTIF_RGB = (28, 24, 72)  # blue-black: darker than any tissue tone in every channel
# Motif dots (x, y, radius) in a sub-patch; one sits at the centre, where a reader looks first.
_MOTIF_DOTS = ((32, 32, 5.0), (13, 12, 4.0), (50, 13, 4.5), (11, 47, 4.5), (47, 50, 4.0), (30, 55, 3.5),
               (55, 31, 3.5), (20, 30, 3.0))


def write_slide_images(cohort_root: Path, slide_ids: Sequence[str] | None = None,
                       progress: bool = True) -> list[Path]:
    """Write ``<cohort_root>/wsi/<slide_id>.tiff`` for the slides of a synthetic cohort.

    Args:
        cohort_root: a cohort written by :func:`dsca.store.synth.write_synthetic_cohort` (its
            ``tissue/`` truth and level-2 coords files are read).
        slide_ids: the slides to paint; default every slide with a ``tissue/`` file.
        progress: show a progress bar.

    Returns:
        The written files, in the order of `slide_ids`.

    Raises:
        ValueError: no ``tissue/`` folder (a cohort of an earlier version: rewrite it), a slide
            id that is unsafe or not in the cohort, or truth that no longer matches its coords.
    """
    root = Path(cohort_root)
    tissue_dir = root / TISSUE_DIR
    if not tissue_dir.is_dir():
        raise ValueError(f"{root} has no {TISSUE_DIR}/ folder of slide truth: not a synthetic cohort, or one "
                         "written by an earlier version; rewrite it with dsca-store synth")
    if slide_ids is None:
        slide_ids = sorted(p.stem for p in tissue_dir.glob("*.npz") if not p.name.startswith("."))
    for sid in slide_ids:
        problem = slide_id_problem(sid)
        if problem is not None:
            raise ValueError(f"cannot paint slide {sid!r}: {problem}")
        if not (tissue_dir / f"{sid}.npz").is_file():
            raise ValueError(f"slide {sid!r} is not in the synthetic cohort {root} (no {TISSUE_DIR}/{sid}.npz)")
    out_dir = root / WSI_DIR
    out_dir.mkdir(exist_ok=True)
    workers = max(1, min(_MAX_WORKERS, os.cpu_count() or 1, len(slide_ids)))
    _bank()  # built once here, not by racing threads
    with ThreadPoolExecutor(workers) as pool:
        jobs = pool.map(lambda sid: _write_slide(root, sid, out_dir / f"{sid}.tiff"), slide_ids)
        written = list(tqdm(jobs, total=len(slide_ids), desc="wsi", unit="slide",
                            disable=None if progress else True))
    log.info("%s: wrote %d slide images", out_dir, len(written))
    return written


def _write_slide(root: Path, sid: str, path: Path) -> Path:
    """Paint one slide from ``tissue/<sid>.npz`` and the attrs of its level-2 coords file."""
    import tifffile  # lazy: only the images need it

    with np.load(root / TISSUE_DIR / f"{sid}.npz") as truth:
        types, motif, coords = truth["types"].astype(np.int64), truth["motif"], truth["coords"]
    low = read_coords(root / _X5_COORDS / f"{sid}.h5")
    if not np.array_equal(low.coords, coords) or motif.shape != (len(coords), BLOCK):
        raise ValueError(f"{root / TISSUE_DIR / sid}.npz does not match {root / _X5_COORDS / sid}.h5; "
                         "rewrite the cohort with dsca-store synth")
    ds = low.downsample
    dim = low.attrs.get("downsampled_level_dim", low.attrs.get("level_dim"))
    width, height = (int(v) for v in np.asarray(dim, dtype=np.int64))
    corners = coords / ds[None, :]  # [N, 2] base px, fractional
    variants = _variant(coords, PATCH_SIZE * ds)

    # repr: the shortest text that reads back as the same float
    description = f"dsca-synth coords_downsample={float(ds[0])!r}x{float(ds[1])!r}"
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp) as tif:
        for i, f in enumerate(_LEVELS):
            w, h = max(1, round(width / f)), max(1, round(height / f))
            # px per cm at this level: nominal level-0 MPP times the level's total downsample
            res = tuple(1e4 / (_MPP0 * d * f) for d in ds)
            tif.write(
                _level_tiles((w, h), np.rint(corners / f).astype(np.int64), types, variants, motif, i),
                shape=(h, w, 3), dtype=np.uint8, tile=(_TILE, _TILE), compression="zlib",
                photometric="rgb", planarconfig="contig", subfiletype=0 if i == 0 else 1,
                description=description if i == 0 else None, metadata=None,
                resolution=res, resolutionunit="CENTIMETER",
            )
    return path


def _variant(coords: np.ndarray, step: np.ndarray) -> np.ndarray:
    """[N] texture variant per patch from its grid cell, so that it does not depend on order."""
    cell = np.rint(coords / step[None, :]).astype(np.int64)
    return (cell[:, 0] * 3 + cell[:, 1] * 5 + cell[:, 0] * cell[:, 1]) % _VARIANTS


def _level_tiles(size: tuple[int, int], corners: np.ndarray, types: np.ndarray, variants: np.ndarray,
                 motif: np.ndarray, level: int) -> Iterator[bytes]:
    """Deflate-encoded tiles of one level, row by row.

    Args:
        size: (w, h) of the level in px.
        corners: [N, 2] int64 patch corners in this level's px.
        types, variants: [N] tissue index and texture variant per patch.
        motif: [N, 16] bool, row 4*r + c of each block.
        level: index into _LEVELS.
    """
    w, h = size
    bank = _bank()[level]
    side = SCALE * bank.shape[-2]  # a patch's side at this level
    n_x, n_y = -(-w // _TILE), -(-h // _TILE)
    blank = _blank_tile()
    cache: dict[int, np.ndarray] = {}  # images of patches that reach into the next band
    for ty in range(n_y):
        y0 = ty * _TILE
        sel = np.flatnonzero((corners[:, 1] < y0 + _TILE) & (corners[:, 1] + side > y0))
        if sel.size == 0:
            yield from (blank for _ in range(n_x))
            continue
        new = np.array([j for j in sel if j not in cache], dtype=np.int64)
        if new.size:
            cache.update(zip(new.tolist(), _patch_images(bank, types[new], variants[new], motif[new])))
        # the band spans only the tile columns its patches touch: most of a slide is white
        t0 = max(0, int(corners[sel, 0].min()) // _TILE)
        t1 = min(n_x, -(-int(corners[sel, 0].max() + side) // _TILE))
        band = np.full((_TILE, (t1 - t0) * _TILE, 3), 255, dtype=np.uint8)
        touched = np.zeros(n_x, dtype=bool)
        for j in sel.tolist():
            (cx, cy), image = corners[j], cache[j]
            ys, ye = max(cy, y0), min(cy + side, y0 + _TILE)
            xs, xe = max(cx, t0 * _TILE), min(cx + side, t1 * _TILE)
            if xe <= xs:
                continue
            band[ys - y0:ye - y0, xs - t0 * _TILE:xe - t0 * _TILE] = image[ys - cy:ye - cy, xs - cx:xe - cx]
            touched[xs // _TILE:(xe - 1) // _TILE + 1] = True
        for j in [j for j in cache if corners[j, 1] + side <= y0 + _TILE]:
            del cache[j]
        for tx in range(n_x):
            if touched[tx]:
                tile = band[:, (tx - t0) * _TILE:(tx - t0 + 1) * _TILE]
                yield zlib.compress(np.ascontiguousarray(tile), _ZLEVEL)
            else:
                yield blank


def _patch_images(bank: np.ndarray, types: np.ndarray, variants: np.ndarray, motif: np.ndarray) -> np.ndarray:
    """[n, 4s, 4s, 3] uint8 patch images from the sub-patch bank [3, V, 2, s, s, 3]."""
    sub = bank[types[:, None], variants[:, None], motif.astype(np.int64)]  # [n, 16, s, s, 3]
    n, s = len(types), bank.shape[-2]
    # row 4*r + c: r picks the image row band, c the column inside it
    return sub.reshape(n, SCALE, SCALE, s, s, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, SCALE * s, SCALE * s, 3)


@functools.lru_cache(maxsize=1)
def _blank_tile() -> bytes:
    return zlib.compress(np.full((_TILE, _TILE, 3), 255, dtype=np.uint8), 9)


@functools.lru_cache(maxsize=1)
def _bank() -> tuple[np.ndarray, ...]:
    """Per level of _LEVELS: [3 tissues, V variants, 2 (plain, motif), s, s, 3] uint8 sub-patch
    images (s = 64, 16, 4); the reduced levels are box means of the base, as a scanner's are."""
    rng = np.random.default_rng(20240611)  # fixed: every cohort's slides share one texture
    yy, xx = np.mgrid[0:_SUB, 0:_SUB] + 0.5
    dots = np.zeros((_SUB, _SUB), dtype=bool)
    for cx, cy, r in _MOTIF_DOTS:
        dots |= (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    base = np.empty((len(TISSUES), _VARIANTS, 2, _SUB, _SUB, 3), dtype=np.uint8)
    for t, name in enumerate(TISSUES):
        light, dark, accent = (np.asarray(c, dtype=np.float64) for c in _TONES[name])
        for v in range(_VARIANTS):
            tone, accent_mask = _texture(rng, name)
            # few distinct tones: a mild texture that deflate still packs well
            tone = np.round(tone * 5) / 5
            img = light + (dark - light) * tone[..., None]
            img[accent_mask] = accent
            base[t, v, 0] = np.rint(img).astype(np.uint8)
            marked = img.copy()
            marked[dots] = _MOTIF_RGB
            base[t, v, 1] = np.rint(marked).astype(np.uint8)
    levels = []
    for f in _LEVELS:
        s = _SUB // f
        reduced = base.reshape(*base.shape[:3], s, f, s, f, 3).astype(np.float64).mean(axis=(4, 6))
        levels.append(np.rint(reduced).astype(np.uint8))
    return tuple(levels)


def _texture(rng: np.random.Generator, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A [64, 64] tone in [0, 1] and a [64, 64] nuclei mask, periodic so that sub-patches of one
    tissue join without seams."""
    if name == "tumour":  # blotchy cytoplasm, crowded large nuclei
        return _field(rng, 4.0, 4.0), _nuclei(rng, 16, (2.2, 3.4), 1.3)
    if name == "stroma":  # wavy fibres along x, a few spindle nuclei
        return _field(rng, 10.0, 1.2), _nuclei(rng, 4, (1.2, 1.6), 3.0)
    return 0.6 * _field(rng, 8.0, 8.0), _nuclei(rng, 3, (1.5, 2.0), 1.0)  # other: smooth, few cells


def _nuclei(rng: np.random.Generator, count: int, radius: tuple[float, float], elongation: float) -> np.ndarray:
    """[64, 64] bool: `count` ellipses (minor radius in `radius`, axes ratio `elongation`, long
    axis near x), wrapped around the edges."""
    yy, xx = np.mgrid[0:_SUB, 0:_SUB] + 0.5
    mask = np.zeros((_SUB, _SUB), dtype=bool)
    for _ in range(count):
        cx, cy = rng.uniform(0, _SUB, size=2)
        r = rng.uniform(*radius)
        theta = rng.normal(0.0, 0.3)
        dx = (xx - cx + _SUB / 2) % _SUB - _SUB / 2
        dy = (yy - cy + _SUB / 2) % _SUB - _SUB / 2
        u = dx * np.cos(theta) + dy * np.sin(theta)
        v = -dx * np.sin(theta) + dy * np.cos(theta)
        mask |= (u / (r * elongation)) ** 2 + (v / r) ** 2 <= 1.0
    return mask


def _field(rng: np.random.Generator, sx: float, sy: float) -> np.ndarray:
    """[64, 64] periodic Gaussian-smoothed noise (correlation lengths sx, sy px), in [0, 1]."""
    k = np.fft.fftfreq(_SUB)
    gain = np.exp(-2 * np.pi ** 2 * ((k[None, :] * sx) ** 2 + (k[:, None] * sy) ** 2))
    x = np.real(np.fft.ifft2(np.fft.fft2(rng.normal(size=(_SUB, _SUB))) * gain))
    return (x - x.min()) / (np.ptp(x) + 1e-12)
