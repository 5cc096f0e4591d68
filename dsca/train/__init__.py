"""Cross-validated survival training of DSCA from a `dsca-store` store.

Modules, in the order one fold uses them:

    data        FoldData: a fold's split checked against labels and store, its datasets
                (optionally cached across folds) and one-patient loaders
    steps       per-patient forward/backward, gradient accumulation over an optimizer group,
                one epoch, predictions
    device      device choice, mixed precision (autocast, gradient scaler), CPU threads
    outputs     a set's outputs with its labels; set-level loss and C-index
    early_stop  early stopping and the best epoch (the reference's rules)
    checkpoint  best.pt / last.pt: written atomically, loaded weights-only, tied to their run
    fold        train_fold: the epoch loop, best/last checkpoint promotion, evaluation
    report      per-fold metrics, risk groups, prediction rows, the summary over folds
    rundir      the output folder's rules (new, resume, overwrite)
    logfile     the run's train.log
    crossval    train_cross_validation: every fold of a run, resume, the outputs below
    distributed torchrun ranks: data-parallel groups (gradients summed over the ranks) or
                whole folds per rank; rank 0 writes the outputs; failures stop every rank
    final       train_final: one model on every labelled patient (dsca train --final)
    recompute   a run's report recomputed from its predictions.csv (dsca report)

Everything lands in the output folder:

    metrics.json            summary (mean/std over finished folds, pooled risk groups) +
                            per-fold metrics (MUST format)
    predictions.csv         fold, split, patient_id, t, e, y_t, risk, risk_group, surv_1..K
                            (or log_hazard); unless save_prediction is false
    train.log               the log of the run
    config.yaml, run.json   the parsed configuration; the run's id and the config it started with
    training_curves.png     loss and C-index per epoch and fold
    km_test.png             Kaplan-Meier of the risk groups of the test patients of all folds
    fold<k>/last.pt         resumable state; fold<k>/best.pt best weights (self-contained
                            once evaluated: what dsca predict and dsca heatmap need)
    fold<k>/result.json     the fold's metrics, history and predictions
"""
from __future__ import annotations

from dsca.train.crossval import train_cross_validation
from dsca.train.data import FoldData, build_fold_data
from dsca.train.device import resolve_device
from dsca.train.fold import FoldFailed, train_fold
from dsca.train.steps import accumulate_group

__all__ = ["train_cross_validation", "train_fold", "FoldData", "FoldFailed", "accumulate_group",
           "resolve_device", "build_fold_data"]
