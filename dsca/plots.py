"""PNG figures of a training run: training curves and Kaplan-Meier risk groups."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dsca.metrics import kaplan_meier, logrank_test  # noqa: E402

__all__ = ["plot_training_curves", "plot_km"]


def plot_training_curves(
    histories: Sequence[Sequence[dict[str, float]]], folds: Sequence[int], path: str | Path
) -> Path:
    """Loss and C-index per epoch (train solid, validation dashed), one colour per fold."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    colours = plt.get_cmap("tab10")
    for i, (hist, fold) in enumerate(zip(histories, folds)):
        if not hist:
            continue
        ep = [h["epoch"] for h in hist]
        c = colours(i % 10)
        for ax, key in zip(axes, ("loss", "cindex")):
            ax.plot(ep, [h[f"train_{key}"] for h in hist], color=c, label=f"fold {fold} train")
            ax.plot(ep, [h[f"val_{key}"] for h in hist], color=c, ls="--", label=f"fold {fold} val")
    axes[0].set(xlabel="epoch", ylabel="loss", title="loss (train: alpha-weighted NLL)")
    axes[1].set(xlabel="epoch", ylabel="C-index", title="C-index")
    axes[1].axhline(0.5, color="grey", lw=0.8)
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_km(
    time: np.ndarray, event: np.ndarray, risk: np.ndarray, path: str | Path, n_ticks: int = 5
) -> float:
    """Kaplan-Meier curves of the high- and low-risk halves (split at the median risk).

    Args:
        time, event, risk: [N] pooled test predictions (higher risk = shorter survival).
        path: PNG to write.
        n_ticks: time points of the at-risk table.

    Returns:
        the log-rank p-value (NaN if undefined).
    """
    time = np.asarray(time, float)
    event = np.asarray(event, int)
    high = np.asarray(risk, float) > np.median(risk)
    _, p = logrank_test(time, event, high)
    fig, (ax, tab) = plt.subplots(
        2, 1, figsize=(6, 5), gridspec_kw={"height_ratios": [4, 1]}
    )
    ticks = np.linspace(0, time.max(), n_ticks)
    rows = []
    for name, mask, colour in (("low risk", ~high, "tab:blue"), ("high risk", high, "tab:red")):
        if mask.any():
            ts, surv = kaplan_meier(time[mask], event[mask])
            ax.step(np.append(ts, time[mask].max()), np.append(surv, surv[-1]), where="post",
                    color=colour, label=f"{name} (n={mask.sum()})")
            cens = time[mask][event[mask] == 0]
            ax.plot(cens, surv[np.searchsorted(ts, cens, side="right") - 1], "|", color=colour, ms=6)
        rows.append([int((time[mask] >= t).sum()) for t in ticks])
    ax.set(ylabel="survival probability", ylim=(0, 1.05),
           title=f"Kaplan-Meier, median split of predicted risk\nlog-rank p = {p:.2g}")
    ax.legend(loc="upper right")
    tab.axis("off")
    table = tab.table(cellText=rows, rowLabels=["low risk", "high risk"],
                      colLabels=[f"{t:.0f}" for t in ticks], loc="center", cellLoc="center")
    table.scale(1, 1.2)
    tab.set_title("number at risk", fontsize=9)
    ax.set_xlabel("time")
    fig.tight_layout()
    fig.savefig(Path(path), dpi=120)
    plt.close(fig)
    return float(p)
