"""How well attention finds what a synthetic cohort planted (``dsca-store synth``).

The synthetic cohort records, per slide, which x20 sub-patches carry the motif
(``<cohort>/tissue/<slide_id>.npz``: ``motif`` [N, 16], ``types`` [N]). The AUROC of a map's
values for telling motif sub-patches from the others measures whether the map points at the
planted signal; the x5 map (each sub-patch given its block's pooling attention) is the
baseline that cannot see inside a block.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from dsca.coords import BLOCK
from dsca.infer.heatmap import SlideAttention
from dsca.store.synth import TISSUE_DIR, TISSUES

__all__ = ["auroc", "motif_auroc"]



def auroc(positive: np.ndarray, value: np.ndarray) -> float:
    """Area under the ROC curve of ``value`` for ``positive`` (ties count one half).

    Args:
        positive: [P] bool; value: [P] scores. NaN when one class is empty.
    """
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return float("nan")
    ranks = pd.Series(np.asarray(value, dtype=np.float64)).rank(method="average").to_numpy()  # ties share
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def motif_auroc(attentions: Iterable[SlideAttention], cohort_root: str | Path) -> dict[str, float]:
    """AUROC of ``score``, ``cross`` and ``pool`` (the x5 baseline) for the motif sub-patches.

    Returns:
        ``{"score", "cross", "pool"}`` over all sub-patches; the same with ``_tumour`` over the
        sub-patches of tumour blocks (where the motif drives risk); ``cross_in_motif_blocks``:
        ``cross`` over the sub-patches of blocks that carry the motif, where only the x20
        attention can tell the rows apart (the x5 map is 0.5 there by construction);
        ``n_slides``, ``n_subpatches``, ``n_motif``.
    """
    values: dict[str, list[np.ndarray]] = {"score": [], "cross": [], "pool": []}
    motif, tumour = [], []
    for att in attentions:
        truth = np.load(Path(cohort_root) / TISSUE_DIR / f"{att.slide_id}.npz")
        if truth["motif"].size != len(att.table):
            raise ValueError(f"{att.slide_id}: {len(att.table)} attention rows, but the cohort's truth "
                             f"has {truth['motif'].size} sub-patches: not the slide the store holds")
        motif.append(truth["motif"].reshape(-1))
        tumour.append(np.repeat(truth["types"] == TISSUES.index("tumour"), truth["motif"].shape[1]))
        for key in values:
            values[key].append(att.table[key].to_numpy())
    is_motif, in_tumour = np.concatenate(motif), np.concatenate(tumour)
    out: dict[str, float] = {}
    for key, parts in values.items():
        v = np.concatenate(parts)
        out[key] = auroc(is_motif, v)
        out[f"{key}_tumour"] = auroc(is_motif[in_tumour], v[in_tumour])
    in_motif_block = np.repeat(is_motif.reshape(-1, BLOCK).any(axis=1), BLOCK)
    out["cross_in_motif_blocks"] = auroc(is_motif[in_motif_block], np.concatenate(values["cross"])[in_motif_block])
    out.update(n_slides=len(motif), n_subpatches=int(is_motif.size), n_motif=int(is_motif.sum()))
    return out
