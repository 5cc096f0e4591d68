"""Scoring attention against a synthetic cohort's planted motif."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dsca.infer.heatmap import ATTENTION_COLUMNS, SlideAttention
from dsca.infer.truth import auroc, motif_auroc


@pytest.mark.parametrize("seed", range(4))
def test_auroc_equals_scikit_learn_with_ties(seed):
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    positive = rng.uniform(size=300) < 0.2
    value = rng.integers(0, 6, size=300).astype(float) + positive  # many ties
    assert auroc(positive, value) == pytest.approx(roc_auc_score(positive, value), abs=1e-12)
    assert np.isnan(auroc(np.zeros(5, bool), np.arange(5.0)))


def test_motif_auroc_reads_the_truth_in_the_attention_rows_order(synth_cohort):
    slides = synth_cohort.slide_ids[:3]
    attentions = []
    for sid in slides:
        truth = np.load(synth_cohort.root / "tissue" / f"{sid}.npz")
        n = len(truth["types"])
        motif = truth["motif"].astype(float)
        table = pd.DataFrame({"x": 0, "y": 0, "block": np.repeat(np.arange(n), 16),
                              "sub": np.tile(np.arange(16), n),
                              "pool": np.repeat(np.linspace(0, 1, n), 16),  # blind to the motif
                              "cross": motif.ravel(), "score": motif.ravel() * 2},
                             columns=list(ATTENTION_COLUMNS))
        attentions.append(SlideAttention(sid, table, np.zeros((n, 2), int), np.array([1024.0, 1024.0])))
    found = motif_auroc(attentions, synth_cohort.root)
    assert found["cross"] == found["score"] == found["cross_in_motif_blocks"] == 1.0
    assert found["n_slides"] == 3 and found["n_motif"] > 0
    # shifted by one row, the same map no longer finds the motif
    for att in attentions:
        att.table["cross"] = np.roll(att.table["cross"].to_numpy(), 1)
    assert motif_auroc(attentions, synth_cohort.root)["cross"] < 0.9
