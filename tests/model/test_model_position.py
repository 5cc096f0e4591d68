"""Patient-level grid coordinates (dsca.coords.patient_grid) follow the reference's layout."""
from __future__ import annotations

import numpy as np

from dsca.coords import discretize, patient_grid


def _reference_layout(slides):
    """The reference's rearrange_coord(discretization=True, offset [1, 0]), restated: each
    slide's ranks relative to their minimum, placed at top + offset, top moving by offset +
    the slide's extent."""
    off = np.array([1, 0])
    top = -off
    out = []
    for coords in slides:
        ranks = np.stack([np.unique(coords[:, a], return_inverse=True)[1] for a in (0, 1)], 1)
        rel = ranks - ranks.min(0)
        out.append(top + off + rel)
        top = top + off + (ranks.max(0) - ranks.min(0))
    return np.concatenate(out)


def test_slides_run_diagonally_by_hand():
    a = np.array([[0, 0], [256, 0], [512, 256]])  # ranks x 0..2, y 0..1
    b = np.array([[3000, 9], [1000, 5], [1000, 7]])  # ranks x 0..1, y 0..2 (unsorted rows)
    c = np.array([[7, 7]])
    grid = patient_grid([a, b, c])
    np.testing.assert_array_equal(grid[:3], [[0, 0], [1, 0], [2, 1]])
    # b starts one column right of a's last column (2 + 1), on a's last row (1)
    np.testing.assert_array_equal(grid[3:6], [[3 + 1, 1 + 2], [3 + 0, 1 + 0], [3 + 0, 1 + 1]])
    # c: one column right of b's last (3 + 1 + 1), on b's last row (1 + 2)
    np.testing.assert_array_equal(grid[6:], [[5, 3]])
    np.testing.assert_array_equal(discretize(b), [[1, 2], [0, 0], [0, 1]])


def test_matches_reference_layout_on_random_slides():
    rng = np.random.default_rng(0)
    slides = [rng.integers(0, 40, (n, 2)) * 512 + rng.integers(0, 3) for n in (5, 17, 1, 30)]
    np.testing.assert_array_equal(patient_grid(slides), _reference_layout(slides))
