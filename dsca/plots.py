"""PNG figures of a training run and of applying it.

- :func:`plot_km`: Kaplan-Meier survival of the low- and high-risk test patients, with 95%
  confidence bands, censoring ticks and a "number at risk" table whose columns sit under the
  time axis' major ticks.
- :func:`plot_training_curves`: loss and C-index per epoch, train (solid) against validation
  (dashed), one colour per fold, each fold's best epoch marked.
- :func:`plot_attention_maps`: a slide's x5 attention map beside its two-scale map.
- :func:`plot_overlay`: the two-scale map over the slide's thumbnail.
"""
from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, MaxNLocator

from dsca.atomic import atomic_path
from dsca.metrics import kaplan_meier

matplotlib.use("Agg")  # files only; never needs a display (pyplot picks its backend lazily)

__all__ = ["plot_km", "plot_training_curves", "plot_attention_maps", "plot_overlay"]

_GROUPS = (("low risk", "tab:blue"), ("high risk", "tab:red"))
_TITLE_WIDTH = 80  # characters; run names make long titles, wrapped rather than clipped


def _time_ticks(t_max: float) -> np.ndarray:
    """Round tick positions within ``[0, t_max]`` (e.g. 0, 500, ..., 3000 days)."""
    t_max = float(t_max) if t_max > 0 else 1.0
    ticks = MaxNLocator(nbins=6, integer=True, min_n_ticks=4,
                        steps=[1, 2, 2.5, 5, 10]).tick_values(0.0, t_max)
    # The locator's multiples carry float noise (0.6000000000000001); round to the step's digits.
    digits = max(0, 2 - math.floor(math.log10(ticks[1] - ticks[0])))
    ticks = np.round(ticks, digits)
    return ticks[(ticks >= 0) & (ticks <= t_max)]


def _at_risk_table(time: np.ndarray, ticks: np.ndarray) -> np.ndarray:
    """Patients still followed at each tick: ``[len(ticks)]`` counts of ``time >= tick``."""
    time = np.asarray(time, dtype=float).reshape(-1)
    return (time[:, None] >= np.asarray(ticks, dtype=float)[None, :]).sum(axis=0)


def _km_figure(time: np.ndarray, event: np.ndarray, high: np.ndarray, *, time_unit: str,
               title: str, annotation: str) -> Figure:
    """The figure of :func:`plot_km`, not saved (tests read its axes)."""
    time = np.asarray(time, dtype=float).reshape(-1)
    event = np.asarray(event).reshape(-1).astype(int)
    high = np.asarray(high, dtype=bool).reshape(-1)
    t_max = float(time.max()) if len(time) and time.max() > 0 else 1.0
    ticks = _time_ticks(t_max)

    fig = plt.figure(figsize=(7.5, 6.2), layout="constrained")
    grid = fig.add_gridspec(2, 1, height_ratios=[5, 1.1])
    ax = fig.add_subplot(grid[0])
    # The table shares x with the curves, so a count drawn at x = tick sits under that tick.
    tab = fig.add_subplot(grid[1], sharex=ax)
    for row, ((name, colour), mask) in enumerate(zip(_GROUPS, (~high, high))):
        t, e = time[mask], event[mask]
        if len(t):
            km = kaplan_meier(t, e, level=0.95)
            # Extend the last step to the group's last follow-up, censored or not.
            end = max(float(t.max()), float(km.time[-1]))
            x = np.append(km.time, end)
            s, lo, hi = (np.append(v, v[-1]) for v in (km.survival, km.ci_low, km.ci_high))
            ax.step(x, s, where="post", color=colour, lw=1.8, label=f"{name} (n={len(t)})")
            ax.fill_between(x, lo, hi, step="post", color=colour, alpha=0.2, lw=0)
            cens = t[e == 0]
            at = np.searchsorted(km.time, cens, side="right") - 1  # right-continuous S(c)
            ax.plot(cens, km.survival[at], "|", color=colour, ms=8, mew=1.2)
        y = 0.7 - 0.45 * row  # rows in axes coordinates of the table
        for tick, n in zip(ticks, _at_risk_table(t, ticks)):
            tab.text(tick, y, str(n), transform=tab.get_xaxis_transform(), ha="center",
                     va="center", fontsize=9, color=colour)
        # left of the axis by more than half a count's width: the count at t = 0 is centred on it
        tab.text(-0.06, y, name, transform=tab.transAxes, ha="right", va="center",
                 fontsize=9, color=colour, fontweight="bold")

    # 2% room on the right, so marks at the last follow-up are not cut in half.
    ax.set_xlim(0, 1.02 * t_max)
    # A fixed locator: the curves' ticks and the table's columns are the same numbers.
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.set_ylim(0, 1.05)
    ax.set_xlabel(f"time ({time_unit})")
    ax.set_ylabel("survival probability")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower left", frameon=True, fontsize=9)
    ax.set_title(annotation, fontsize=9)
    fig.suptitle(textwrap.fill(title, _TITLE_WIDTH), fontsize=11)
    tab.set_title("number at risk", fontsize=9, loc="left")
    tab.tick_params(axis="both", which="both", bottom=False, left=False,
                    labelbottom=False, labelleft=False)
    for spine in tab.spines.values():
        spine.set_visible(False)
    return fig


def plot_km(time: np.ndarray, event: np.ndarray, high: np.ndarray, path: str | Path, *,
            time_unit: str = "days", title: str = "", annotation: str = "") -> Path:
    """Kaplan-Meier curves of the low- and high-risk groups, with a number-at-risk table.

    Args:
        time: [N] follow-up times; event: [N] 1 = event, 0 = censored.
        high: [N] bool, the high-risk group (decided by the caller).
        path: PNG to write.
        time_unit: unit of ``time``, for the axis label.
        title: first title line (run and split rule); annotation: smaller second line
            (e.g. log-rank p and hazard ratio).

    Returns:
        ``path``. An empty group is left out of the curves (its table row is zeros).
    """
    fig = _km_figure(time, event, high, time_unit=time_unit, title=title, annotation=annotation)
    return _save(fig, path)


def _finite(rows: Sequence[dict[str, float]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(epochs, values) of the rows where ``key`` is a finite number (None/NaN skipped)."""
    pairs = [(r.get("epoch"), r.get(key)) for r in rows]
    pairs = [(float(e), float(v)) for e, v in pairs
             if e is not None and v is not None and math.isfinite(float(v))]
    return (np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs]))


def plot_training_curves(histories: Sequence[Sequence[dict[str, float]]], folds: Sequence[int],
                         best_epochs: Sequence[int], path: str | Path, *, title: str = "") -> Path:
    """Loss (left) and C-index (right) per epoch, per fold; train solid, validation dashed.

    Args:
        histories: per fold, its rows with ``epoch`` (1-based), ``train_loss``, ``val_loss``,
            ``train_cindex``, ``val_cindex``; missing/None/NaN values are skipped, empty
            histories (failed folds) left out.
        folds: [F] fold numbers, parallel to ``histories``.
        best_epochs: [F] each fold's best epoch (1-based; 0 or None: none), marked with a star
            on the validation curves and a dotted vertical line.
        path: PNG to write; title: figure title.

    Returns:
        ``path``.
    """
    fig = _curves_figure(histories, folds, best_epochs, title=title)
    return _save(fig, path)


def _curves_figure(histories: Sequence[Sequence[dict[str, float]]], folds: Sequence[int],
                   best_epochs: Sequence[int], *, title: str) -> Figure:
    """The figure of :func:`plot_training_curves`, not saved (tests read its axes)."""
    fig, axes = plt.subplots(1, 2, sharex=True, figsize=(11, 4.4), layout="constrained")
    colours = plt.get_cmap("tab10")
    fold_handles = []
    for i, (rows, fold) in enumerate(zip(histories, folds)):
        if not rows:
            continue
        colour = colours(i % 10)
        best = best_epochs[i] if i < len(best_epochs) else None
        best = float(best) if best is not None and best > 0 else None  # 0/None/NaN: no best
        for ax, key in zip(axes, ("loss", "cindex")):
            for split, style in (("train", "-"), ("val", "--")):
                x, y = _finite(rows, f"{split}_{key}")
                ax.plot(x, y, ls=style, color=colour, lw=1.4)
            if best is not None:
                ax.axvline(best, color=colour, ls=":", lw=0.9)
                x, y = _finite(rows, f"val_{key}")
                hit = x == best
                ax.plot(x[hit], y[hit], "*", color=colour, ms=12, mec="black", mew=0.5, zorder=5)
        fold_handles.append(Line2D([], [], color=colour, lw=2, label=f"fold {fold}"))

    axes[0].set(title="loss", xlabel="epoch", ylabel="loss (same formula for train and val)")
    axes[1].set(title="C-index", xlabel="epoch", ylabel="C-index")
    axes[1].axhline(0.5, color="grey", lw=0.9, zorder=0)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.grid(alpha=0.3)
    style_handles = [
        Line2D([], [], color="black", ls="-", label="train"),
        Line2D([], [], color="black", ls="--", label="validation"),
        Line2D([], [], color="black", ls=":", marker="*", ms=10, label="best epoch"),
    ]
    # Outside the panels: curves of many folds leave no free corner inside.
    fig.legend(handles=fold_handles + style_handles, loc="outside right upper", fontsize=9)
    if title:
        fig.suptitle(textwrap.fill(title, 2 * _TITLE_WIDTH), fontsize=11)
    return fig


def _robust_limits(values: np.ndarray) -> tuple[float, float]:
    """1st-99th percentile of the finite values: a few hot patches must not flatten the rest."""
    finite = values[np.isfinite(values)]
    if not finite.size:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [1, 99])
    return float(lo), float(hi if hi > lo else lo + 1e-12)


def plot_attention_maps(grid: np.ndarray, pool: np.ndarray, score: np.ndarray, path: str | Path, *,
                        title: str = "") -> Path:
    """The x5 map (one cell per x5 patch) beside the two-scale map (4x4 cells per patch).

    Args:
        grid: [N, 2] patch-grid (col, row) of the x5 patches.
        pool: [N] the pooling attention of each patch.
        score: [N, 16] pool x cross of each sub-patch (row ``4 r + c`` of its block).
        path: PNG to write.
    """
    g = grid - grid.min(axis=0)
    cols, rows = int(g[:, 0].max()) + 1, int(g[:, 1].max()) + 1
    coarse = np.full((rows, cols), np.nan)
    coarse[g[:, 1], g[:, 0]] = pool
    fine = np.full((rows * 4, cols * 4), np.nan)
    r, c = np.divmod(np.arange(16), 4)
    fine[(4 * g[:, 1])[:, None] + r[None, :], (4 * g[:, 0])[:, None] + c[None, :]] = score
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2))
    panels = ((coarse, "x5 map: pooling attention per patch"),
              (fine, "two-scale map: pooling x CAPool attention per x20 sub-patch"))
    for ax, (image, name) in zip(axes, panels):
        vmin, vmax = _robust_limits(image)
        shown = ax.imshow(image, cmap="magma", vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.03, label="attention (1st-99th percentile)")
    if title:
        fig.suptitle(textwrap.fill(title, _TITLE_WIDTH), fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_overlay(thumbnail: np.ndarray, scale: np.ndarray, corners: np.ndarray, sub_size: np.ndarray,
                 score: np.ndarray, path: str | Path, *, title: str = "") -> Path:
    """The two-scale map over a slide thumbnail, beside the plain thumbnail, cropped to the
    scored tissue.

    The map is drawn over a greyscale copy of the slide: a colour map over H&E colours reads
    as neither.

    Args:
        thumbnail: [H, W, 3] uint8 RGB.
        scale: [2] thumbnail pixels per level-0 pixel (x, y).
        corners: [P, 2] level-0 top-left corners of the sub-patches; sub_size: [2] their size.
        score: [P] their scores.
    """
    h, w = thumbnail.shape[:2]
    heat = np.full((h, w), np.nan)
    x0 = np.floor(corners[:, 0] * scale[0]).astype(int)
    y0 = np.floor(corners[:, 1] * scale[1]).astype(int)
    x1 = np.maximum(x0 + 1, np.ceil((corners[:, 0] + sub_size[0]) * scale[0]).astype(int))
    y1 = np.maximum(y0 + 1, np.ceil((corners[:, 1] + sub_size[1]) * scale[1]).astype(int))
    for a, b, c, d, v in zip(x0, x1, y0, y1, score):
        heat[max(c, 0):min(d, h), max(a, 0):min(b, w)] = v
    pad = int(0.05 * max(x1.max() - x0.min(), y1.max() - y0.min())) + 1
    crop = (slice(max(y0.min() - pad, 0), min(y1.max() + pad, h)),
            slice(max(x0.min() - pad, 0), min(x1.max() + pad, w)))
    rgb, heat = thumbnail[crop], heat[crop]
    grey = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    vmin, vmax = _robust_limits(heat)
    aspect = rgb.shape[0] / max(rgb.shape[1], 1)
    fig, axes = plt.subplots(1, 2, figsize=(12, min(max(3.0, 5.6 * aspect), 12.0) + 0.9),
                             layout="constrained")
    axes[0].imshow(rgb)
    axes[0].set_title("slide", fontsize=9)
    axes[1].imshow(grey, cmap="gray", vmin=0, vmax=255)
    shown = axes[1].imshow(heat, cmap="turbo", vmin=vmin, vmax=vmax, alpha=0.65, interpolation="nearest")
    axes[1].set_title("two-scale attention (pool x cross per x20 sub-patch)", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(shown, ax=list(axes), shrink=0.8, label="score (1st-99th percentile)")
    if title:
        fig.suptitle(textwrap.fill(title, _TITLE_WIDTH), fontsize=10)
    return _save(fig, path)


def _save(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` through :func:`dsca.atomic.atomic_path` and close it.

    The temp file's name ends in ``.tmp``, so the format comes from ``path``'s suffix (PNG
    when it has none), as it would for ``savefig(path)``.
    """
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".").lower() or "png")
    finally:
        plt.close(fig)
    return path
