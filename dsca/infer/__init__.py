"""Applying trained runs: predictions on a store, attention heatmaps on the slides.

    models     a run folder's models with what applying them needs (self-contained checkpoints,
               older ones completed from the run folder); the store check
    apply      each patient read once, every model applied to it
    predict    ``dsca predict``: per-model and ensemble risks, risk groups, survival, metrics
    heatmap    ``dsca heatmap``: the two-scale attention map per slide, plots, overlays, tiles
"""
from __future__ import annotations

from dsca.infer.models import ModelLoadError, RunModel, load_run_models
from dsca.infer.predict import PredictError, predict_run

__all__ = ["ModelLoadError", "PredictError", "RunModel", "load_run_models", "predict_run"]
