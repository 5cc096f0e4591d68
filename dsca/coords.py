"""Patch coordinates -> the discretized patient-level grid used by the position embedding.

Reference semantics (kept so that reference checkpoints see the same positions):

* each slide's x and y are ranked separately: sorted unique values -> 0..R;
* slides of one patient are laid out diagonally: slide k is shifted by (ox_k, oy_k) with
  ox_0 = oy_0 = 0, ox_k = ox_{k-1} + Rx_{k-1} + 1, oy_k = oy_{k-1} + Ry_{k-1}, i.e. each slide
  starts one column right of the previous slide's last column, on its last row.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["BLOCK", "SCALE", "discretize", "patient_grid"]

#: Each x5 (level-2) patch covers a SCALE x SCALE square of x20 (level-1) patches: the 4x
#: downsample between the two CLAM levels.
SCALE = 4
#: x20 rows per x5 patch, row ``SCALE * r + c`` of the block's grid.
BLOCK = SCALE * SCALE


def discretize(coords: np.ndarray) -> np.ndarray:
    """Rank each axis of one slide's coordinates.

    Args:
        coords: [N, 2] level-0 (x, y) of each patch.

    Returns:
        [N, 2] int64 ranks: column j holds the index of ``coords[:, j]`` among the sorted
        unique values of that column.
    """
    coords = np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords must be [N, 2], got shape {coords.shape}")
    out = np.empty(coords.shape, dtype=np.int64)
    for axis in range(2):
        _, out[:, axis] = np.unique(coords[:, axis], return_inverse=True)
    return out


def patient_grid(slide_coords: Sequence[np.ndarray]) -> np.ndarray:
    """Discretize and lay out the coordinates of all slides of one patient.

    Args:
        slide_coords: one [N_k, 2] array of (x, y) per slide, in the order the slides'
            features are concatenated.

    Returns:
        [sum N_k, 2] int64 patient-level grid coordinates.
    """
    parts = []
    ox = oy = 0
    for coords in slide_coords:
        ranks = discretize(coords)
        if len(ranks) == 0:
            parts.append(ranks)
            continue
        parts.append(ranks + np.array([ox, oy], dtype=np.int64))
        rx, ry = ranks.max(axis=0)
        ox, oy = ox + int(rx) + 1, oy + int(ry)
    if not parts:
        return np.zeros((0, 2), dtype=np.int64)
    return np.concatenate(parts, axis=0)
