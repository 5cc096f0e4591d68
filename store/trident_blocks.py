"""Pairing TRIDENT's two runs: each x5 patch with the 4x4 block of x20 tiles it covers.

The two grids start at (0, 0) and are tissue-filtered independently, so a 5x patch may lack
some of its 16 20x tiles and neither file orders its rows like the other:
:func:`assemble_blocks` pairs them by grid cell and keeps the 5x patches whose 4x4 block is
complete, in the block-major order of ``dsca-store/1`` (row ``16*i + 4*r + c`` = sub-tile
(col c, row r) at level-0 offset ``(c, r) * step20``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from dsca.coords import BLOCK, SCALE
from dsca.store.errors import ClamError
from dsca.store.level_attrs import LevelAttrs
from dsca.store.trident_attrs import grid_cells, step_px

if TYPE_CHECKING:  # the reader re-exports this module's names, so it cannot be imported here
    from dsca.store.trident import TridentLevel

__all__ = ["Blocks", "assemble_blocks"]

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Blocks:
    """x5 patches and their complete 4x4 blocks of x20 tiles, in `dsca-store/1` order.

    Attributes:
        keep: [N] bool over the x5 source rows: the patches whose 16 sub-tiles all exist.
        x5: [K, D] features of the kept x5 patches, in source order.
        x5_coords: [K, 2] int64 their level-0 corners.
        x20: [16K, D] block-major: row ``16*i + 4*r + c`` is the tile at
            ``x5_coords[i] + (c, r) * step20``.
        x20_coords: [16K, 2] int64 the level-0 corners of those tiles (as the x20 file has them).
        dropped: x5 patches left out (N - K).
        unused: x20 tiles in no kept block.
        level5, level20: the grids of the two levels.
    """

    keep: np.ndarray
    x5: np.ndarray
    x5_coords: np.ndarray
    x20: np.ndarray
    x20_coords: np.ndarray
    dropped: int
    unused: int
    level5: LevelAttrs
    level20: LevelAttrs


def _sub_offsets() -> np.ndarray:
    """[16, 2] (c, r) cell offsets, row-major (r outer, c inner)."""
    r, c = np.meshgrid(np.arange(SCALE), np.arange(SCALE), indexing="ij")
    return np.stack([c.ravel(), r.ravel()], axis=1).astype(np.int64)


def assemble_blocks(low: TridentLevel, high: TridentLevel) -> Blocks:
    """Pair the x5 patches with their 4x4 x20 tiles by grid cell (any order on either side).

    Args:
        low: the x5 level, N patches, step5 = 4 x step20 (1 px tolerance).
        high: the x20 level, M tiles.

    Returns:
        The blocks of the x5 patches whose 16 tiles all exist; the others are dropped
        (counted): each TRIDENT run filters tissue on its own, so edge tiles can be missing.
    """
    what = f"({low.label}, {high.label})"
    s5, s20 = low.step, high.step
    if np.any(np.abs(s5 - SCALE * s20) > 1):
        raise ClamError(f"x5 patches are {step_px(s5)} px and x20 {step_px(s20)} px at level 0: need exactly {SCALE}x {what}")
    d5, d20 = low.features.shape[1], high.features.shape[1]
    if d5 != d20:
        raise ClamError(f"x5 features have {d5} dims and x20 {d20}: extracted with different encoders? {what}")
    if low.encoder and high.encoder and low.encoder != high.encoder:
        raise ClamError(f"x5 features are from encoder {low.encoder} and x20 from {high.encoder} {what}")
    high_cells = grid_cells(high.coords, s20, f"x20 {high.label} coords")
    base = np.rint(low.coords / s20[None, :]).astype(np.int64)
    off = np.abs(low.coords - base * s20[None, :]) > 1
    if off.any():
        row = int(np.argmax(off.any(axis=1)))
        raise ClamError(f"x5 and x20 grids do not line up: x5 patch {row} at {low.coords[row].tolist()} is not a "
                        f"multiple of the x20 step {step_px(s20)} px {what}")
    sub = base[:, None, :] + _sub_offsets()[None, :, :]  # [N, 16, 2] cells of the wanted tiles
    width = int(max(high_cells[:, 0].max(), sub[..., 0].max())) + 1
    high_keys = high_cells[:, 1] * width + high_cells[:, 0]
    want = sub[..., 1] * width + sub[..., 0]  # [N, 16]
    order = np.argsort(high_keys, kind="stable")
    sorted_keys = high_keys[order]
    pos = np.clip(np.searchsorted(sorted_keys, want), 0, len(sorted_keys) - 1)
    found = sorted_keys[pos] == want
    keep = found.all(axis=1)
    k = int(keep.sum())
    n = len(keep)
    if k == 0:
        raise ClamError(f"none of the {n} x5 patches has all {BLOCK} of its x20 tiles "
                        f"({int(found.sum())} of {BLOCK * n} found) {what}")
    rows = order[pos[keep]].reshape(-1)  # [16K] high rows, block-major
    used = np.zeros(len(high_keys), dtype=bool)
    used[rows] = True
    if n - k:
        log.debug("%s: %d of %d x5 patches lack x20 tiles, dropped", low.label, n - k, n)
    return Blocks(keep=keep, x5=low.features[keep], x5_coords=low.coords[keep], x20=high.features[rows],
                  x20_coords=high.coords[rows], dropped=n - k, unused=int((~used).sum()),
                  level5=low.level, level20=high.level)
