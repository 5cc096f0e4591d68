"""Figures of dsca.plots: real PNGs, at-risk table under the time ticks, awkward inputs."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.colors import to_rgb

from dsca import plots
from dsca.plots import plot_km, plot_training_curves


def _cohort(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    high = rng.random(n) < 0.5
    t_event = rng.exponential(np.where(high, 900.0, 2200.0))
    t_cens = rng.uniform(0, 3000, n)
    return np.minimum(t_event, t_cens).round() + 1, (t_event <= t_cens).astype(int), high


def _history(n_epochs: int = 12, seed: int = 0) -> list[dict[str, float]]:
    rng = np.random.default_rng(seed)
    return [{"epoch": ep, "train_loss": 1.0 / ep + 0.01 * rng.random(),
             "val_loss": 1.2 / ep + 0.3, "train_cindex": 0.5 + 0.02 * ep,
             "val_cindex": 0.55 + 0.01 * ep} for ep in range(1, n_epochs + 1)]


def _read_png(path: Path) -> np.ndarray:
    assert path.is_file() and path.stat().st_size > 1000
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200 and img.shape[2] in (3, 4)
    assert not np.all(img == img[0, 0]), "blank image"
    return img[..., :3]


def _has_colour(img: np.ndarray, colour: str, tol: float = 0.05) -> bool:
    return bool((np.abs(img - np.array(to_rgb(colour))).max(axis=-1) < tol).sum() > 50)


def _table_rows(fig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per row label of the at-risk table: (x positions, counts) of its numbers."""
    _, tab = fig.axes
    labels = {t.get_position()[1]: t.get_text() for t in tab.texts if not t.get_text().isdigit()}
    rows: dict[str, list[tuple[float, int]]] = {name: [] for name in labels.values()}
    for t in tab.texts:
        if t.get_text().isdigit():
            x, y = t.get_position()
            rows[labels[y]].append((x, int(t.get_text())))
    return {k: (np.array([p[0] for p in v]), np.array([p[1] for p in v])) for k, v in rows.items()}


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_km_png_has_both_groups(tmp_path):
    time, event, high = _cohort()
    out = plot_km(time, event, high, tmp_path / "km.png", title="runs/x: test patients",
                  annotation="log-rank p = 0.01")
    assert out == tmp_path / "km.png"
    img = _read_png(out)
    assert _has_colour(img, "tab:blue") and _has_colour(img, "tab:red")


@pytest.mark.parametrize("t_max", [0.6, 1.0, 2.0, 7.3, 45.0, 365.0, 2898.0, 3000.0, 12345.0])
def test_time_ticks_are_round_and_within_follow_up(t_max):
    ticks = plots._time_ticks(t_max)
    assert len(ticks) >= 3 and ticks[0] == 0 and ticks[-1] <= t_max
    step = np.diff(ticks)
    assert np.allclose(step, step[0])
    mantissa = step[0] / 10 ** math.floor(math.log10(step[0]))
    assert any(math.isclose(mantissa, m) for m in (1, 2, 2.5, 5))
    # The ticks cover the follow-up: less than one step is left after the last.
    assert t_max - ticks[-1] < step[0]
    assert all(float(f"{t:.6g}") == t for t in ticks), ticks  # no float noise in the labels


def test_time_ticks_examples():
    assert plots._time_ticks(3000.0).tolist() == [0, 500, 1000, 1500, 2000, 2500, 3000]
    assert plots._time_ticks(0.6).tolist() == [0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]


def test_at_risk_counts_match_direct_count():
    time, _, _ = _cohort(seed=3)
    ticks = plots._time_ticks(time.max())
    got = plots._at_risk_table(time, ticks)
    assert got.tolist() == [int((time >= t).sum()) for t in ticks]
    # At a time equal to a follow-up, that patient is still at risk.
    assert plots._at_risk_table(np.array([5.0, 10.0]), np.array([0.0, 5.0, 10.0, 11.0])).tolist() \
        == [2, 2, 1, 0]


def test_km_table_columns_sit_under_the_major_ticks():
    time, event, high = _cohort(seed=1)
    fig = plots._km_figure(time, event, high, time_unit="months", title="t", annotation="a")
    ax, tab = fig.axes
    assert ax.get_shared_x_axes().joined(ax, tab)
    assert ax.get_xlabel() == "time (months)"
    ticks = ax.get_xticks()
    assert np.array_equal(ticks, plots._time_ticks(time.max()))
    rows = _table_rows(fig)
    assert set(rows) == {"low risk", "high risk"}
    for name, mask in (("low risk", ~high), ("high risk", high)):
        x, counts = rows[name]
        assert np.array_equal(x, ticks)
        assert counts.tolist() == [int((time[mask] >= t).sum()) for t in ticks]
    # Curves and table rows of a group share its colour.
    label_colour = {t.get_text(): t.get_color() for t in tab.texts if not t.get_text().isdigit()}
    for ln in ax.get_lines():
        if ln.get_label().endswith(")"):
            name = ln.get_label().split(" (")[0]
            assert to_rgb(ln.get_color()) == to_rgb(label_colour[name])
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == [f"low risk (n={(~high).sum()})", f"high risk (n={high.sum()})"]


@pytest.mark.parametrize("group", ["none_high", "all_high"])
def test_km_empty_group(tmp_path, group):
    time, event, _ = _cohort(seed=2)
    high = np.full(len(time), group == "all_high")
    fig = plots._km_figure(time, event, high, time_unit="days", title="", annotation="")
    empty = "low risk" if group == "all_high" else "high risk"
    assert _table_rows(fig)[empty][1].tolist() == [0] * len(fig.axes[0].get_xticks())
    assert len(fig.axes[0].get_legend().get_texts()) == 1
    _read_png(plot_km(time, event, high, tmp_path / "km.png"))


def test_km_all_censored_group_is_flat_at_one(tmp_path):
    time, event, high = _cohort(seed=4)
    event = np.where(high, 0, event)
    fig = plots._km_figure(time, event, high, time_unit="days", title="", annotation="")
    red = [ln for ln in fig.axes[0].get_lines()
           if ln.get_label().startswith("high risk")]
    assert len(red) == 1 and np.all(red[0].get_ydata() == 1.0)
    assert red[0].get_xdata()[-1] == time[high].max()
    _read_png(plot_km(time, event, high, tmp_path / "km.png"))


def test_training_curves_png(tmp_path):
    hist = [_history(seed=s) for s in range(5)]
    out = plot_training_curves(hist, [0, 1, 2, 3, 4], [3, 5, 8, 2, 12], tmp_path / "c.png",
                               title="runs/x")
    assert out == tmp_path / "c.png"
    img = _read_png(out)
    assert _has_colour(img, "tab:blue") and _has_colour(img, "tab:purple")


def _stars(ax) -> list[tuple[float, float]]:
    return [(float(ln.get_xdata()[0]), float(ln.get_ydata()[0])) for ln in ax.get_lines()
            if ln.get_marker() == "*" and len(ln.get_xdata())]


def test_training_curves_nan_none_missing_best_and_failed_fold(tmp_path):
    a, b, c, d = (_history(seed=s) for s in range(4))
    a[2]["val_loss"] = float("nan")
    a[3]["val_cindex"] = None
    b[0]["train_loss"] = None
    del b[1]["train_cindex"]
    for row in c:
        row["val_cindex"] = float("nan")
    fig = plots._curves_figure([a, [], b, c, d], [0, 1, 2, 3, 4], [4, 7, None, 6, 0],
                               title="")
    loss_ax, cindex_ax = fig.axes
    # Fold 1 failed (its best epoch is ignored); folds 2 and 4 have none (None, 0).
    # Stars only for folds with a best epoch, at the validation value of that epoch; fold 3's
    # validation C-index is all NaN, so only its loss gets one.
    assert _stars(loss_ax) == [(4.0, a[3]["val_loss"]), (6.0, c[5]["val_loss"])]
    assert _stars(cindex_ax) == []
    for ax in (loss_ax, cindex_ax):
        dotted = [ln for ln in ax.get_lines() if ln.get_linestyle() == ":"]
        assert sorted(float(ln.get_xdata()[0]) for ln in dotted) == [4.0, 6.0]
    for ax in (loss_ax, cindex_ax):
        for ln in ax.get_lines():
            assert np.all(np.isfinite(np.asarray(ln.get_ydata(), float)))
    dashed_val_loss = [ln for ln in loss_ax.get_lines() if ln.get_linestyle() == "--"]
    assert len(dashed_val_loss) == 4 and len(dashed_val_loss[0].get_xdata()) == len(a) - 1
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["fold 0", "fold 2", "fold 3", "fold 4", "train", "validation", "best epoch"]
    _read_png(plot_training_curves([a, [], b, c, d], [0, 1, 2, 3, 4], [4, 7, None, 6, 0],
                                   tmp_path / "c.png"))


def test_training_curves_all_folds_failed(tmp_path):
    _read_png(plot_training_curves([[], []], [0, 1], [0, 0], tmp_path / "c.png"))
