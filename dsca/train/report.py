"""What a run reports: per-fold metrics and prediction rows, pooled risk groups, the summary.

Every part (train/val/test) of a fold is split into high/low risk at the median risk of the
fold's training patients (the threshold a deployed model would use); the training patients are
also the censoring reference of the IPCW metrics. The summary averages the per-fold metrics
over the finished folds, except those that a mean would misrepresent (``_NOT_AVERAGED``).

:func:`part_metrics` computes one part's metrics from plain arrays, for training
(:func:`fold_report`) and for ``dsca report`` (:mod:`dsca.train.recompute`, from
predictions.csv) alike. Its ``loss`` is computed in float64 from what predictions.csv keeps
(the survival curve, or the Cox log hazard), so that the recomputation finds the same value;
it therefore differs from the float32 ``val_loss``/``train_loss`` of the epoch history by
float32 rounding (~1e-7 relative).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from dsca.config import TrainConfig
from dsca.losses import cox_nll, discrete_nll, survival_curve
from dsca.metrics import evaluate_predictions, hazard_ratio, logrank_test, split_at_training_median
from dsca.train.outputs import LABEL_E, LABEL_T, LABEL_YT, Outputs

__all__ = ["fold_report", "hazards_from_survival", "jsonable", "part_metrics", "pooled_risk_groups",
           "risk_group_metrics", "summarize"]

# Per-fold values that a mean over folds would misrepresent: counts, and interval bounds (the
# mean of per-fold bounds is no interval of anything).
# p-values and hazard ratios have no meaningful arithmetic mean: they are reported per fold
# and pooled (test_pooled_*).
_NOT_AVERAGED = frozenset({"n", "n_events", "n_high_risk", "cindex_boot_n", "cindex_ci_low",
                           "cindex_ci_high", "hazard_ratio_ci_low", "hazard_ratio_ci_high",
                           "logrank_p", "hazard_ratio"})


def fold_report(cfg: TrainConfig, outputs: dict[str, Outputs], bin_edges: np.ndarray,
                fold: int) -> dict[str, Any]:
    """Metrics of every part and the prediction rows of one fold's best weights.

    Args:
        outputs: part name -> its outputs; ``"train"`` is required.
        bin_edges: [K + 1] the fold's time-bin edges.

    Returns:
        ``{"train_risk_median", <part>: metrics for each part, "predictions": rows}``.
    """
    train = outputs["train"]
    train_lab, train_risk = train.label.numpy(), train.risk
    result: dict[str, Any] = {"train_risk_median": float(np.median(train_risk))}
    rows = []
    for name, out in outputs.items():
        lab, risk = out.label.numpy(), out.risk
        high = split_at_training_median(train_risk, risk)
        result[name] = part_metrics(cfg, lab[:, LABEL_T], lab[:, LABEL_E], lab[:, LABEL_YT], risk,
                                    out.out, bin_edges, train_lab[:, LABEL_T], train_lab[:, LABEL_E],
                                    high)
        rows.extend(_prediction_rows(cfg, fold, name, out, high))
    result["predictions"] = rows
    return result


def part_metrics(
    cfg: TrainConfig, time: np.ndarray, event: np.ndarray, y_t: np.ndarray, risk: np.ndarray,
    out: torch.Tensor | np.ndarray, bin_edges: np.ndarray, train_time: np.ndarray,
    train_event: np.ndarray, high: np.ndarray,
) -> dict[str, float]:
    """All metrics of one part of a fold.

    Args:
        time: [P] follow-up times; event: [P] 1 = event; y_t: [P] time bins.
        risk: [P] float64 risk (higher = shorter survival).
        out: [P, K] hazards (discrete head) or [P, 1] Cox log hazards, tensor or array; the
            survival curve is taken in its dtype (training's float32, as predictions.csv
            keeps it).
        bin_edges: [K + 1] the fold's time-bin edges.
        train_time, train_event: [M] the fold's training patients, the censoring reference of
            the IPCW metrics.
        high: [P] bool, the high-risk group.

    Returns:
        :func:`dsca.metrics.evaluate_predictions`' metrics, :func:`risk_group_metrics` and
        ``loss`` (NLL with alpha = 0, or the Cox loss over the part).
    """
    time = np.asarray(time, dtype=np.float64)
    event = np.asarray(event)
    survival = None if cfg.is_cox else (
        survival_curve(torch.as_tensor(out).detach().cpu()).numpy().astype(np.float64))
    found = evaluate_predictions(
        time, event, np.asarray(y_t), np.asarray(risk, dtype=np.float64),
        survival=survival, bin_edges=np.asarray(bin_edges),
        n_boot=cfg.eval_bootstrap, train_time=train_time, train_event=train_event,
    )
    found.update(risk_group_metrics(time, event, np.asarray(high, dtype=bool)))
    found["loss"] = _eval_loss(cfg, time, event, y_t, out, survival)
    return found


def hazards_from_survival(survival: np.ndarray) -> np.ndarray:
    """Discrete hazards [P, K] back from a survival curve [P, K]: ``h_1 = 1 - S_1``,
    ``h_k = 1 - S_k / S_{k-1}`` (1 after a survival of 0, where nothing is left to lose)."""
    s = np.asarray(survival, dtype=np.float64)
    before = np.concatenate([np.ones((len(s), 1)), s[:, :-1]], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(before > 0, 1.0 - s / before, 1.0)


def _eval_loss(
    cfg: TrainConfig, time: np.ndarray, event: np.ndarray, y_t: np.ndarray,
    out: torch.Tensor | np.ndarray, survival: np.ndarray | None,
) -> float:
    """The part's evaluation loss in float64 from the Cox log hazards [P, 1] or the survival
    curve [P, K]: from the curve rather than the hazards, because predictions.csv keeps the
    curve and float32 hazards cannot be recovered from it exactly."""
    event_t = torch.as_tensor(np.asarray(event, dtype=np.float64))
    if cfg.is_cox:
        log_hazard = torch.as_tensor(out).detach().cpu().to(torch.float64)
        return float(cox_nll(log_hazard, event_t, torch.as_tensor(time), ties=cfg.cox_ties))
    hazards = torch.from_numpy(hazards_from_survival(survival))
    return float(discrete_nll(hazards, torch.as_tensor(np.asarray(y_t)).long(), 1.0 - event_t,
                              alpha=0.0))


def risk_group_metrics(time: np.ndarray, event: np.ndarray, high: np.ndarray) -> dict[str, float]:
    """Log-rank p and hazard ratio (with 95% CI) of high vs low risk; ``high`` [P] bool."""
    _, p = logrank_test(time, event, high)
    hr = hazard_ratio(time, event, high)
    return {"n_high_risk": int(high.sum()), "logrank_p": p, "hazard_ratio": hr.hr,
            "hazard_ratio_ci_low": hr.ci_low, "hazard_ratio_ci_high": hr.ci_high}


def _prediction_rows(
    cfg: TrainConfig, fold: int, part: str, outputs: Outputs, high: np.ndarray
) -> list[dict[str, Any]]:
    """One predictions.csv row per patient: ids, labels, risk, risk group and the survival
    curve ``surv_1..K`` (Cox: ``log_hazard``)."""
    lab = outputs.label.numpy()
    risk = outputs.risk
    extra = outputs.out.numpy() if cfg.is_cox else survival_curve(outputs.out).numpy()
    names = ["log_hazard"] if cfg.is_cox else [f"surv_{k + 1}" for k in range(extra.shape[1])]
    rows = []
    for i, pid in enumerate(outputs.patient_ids):
        row = {"fold": fold, "split": part, "patient_id": pid, "t": float(lab[i, LABEL_T]),
               "e": int(lab[i, LABEL_E]), "y_t": int(lab[i, LABEL_YT]), "risk": float(risk[i]),
               "risk_group": "high" if high[i] else "low"}
        row.update({n: float(v) for n, v in zip(names, extra[i])})
        rows.append(row)
    return rows


def pooled_risk_groups(cfg: TrainConfig, preds: pd.DataFrame, out: Path, n_ok: int,
                       run_name: str | None = None) -> dict[str, Any]:
    """KM plot (``out/km_test.png``), log-rank and hazard ratio of the test patients of all
    folds, each placed in a risk group by its own fold model's training median.

    Args:
        preds: predictions.csv rows (``split``, ``t``, ``e``, ``risk_group``).
        run_name: names the run in the plot title (default: ``out``'s name).
    """
    from dsca.plots import plot_km

    test = preds[preds["split"] == "test"] if len(preds) else preds
    if not len(test):
        return {}
    time, event = test["t"].to_numpy(float), test["e"].to_numpy(int)
    high = (test["risk_group"] == "high").to_numpy()
    found = risk_group_metrics(time, event, high)
    hr = found["hazard_ratio"]
    annotation = f"log-rank p = {found['logrank_p']:.2g}; HR {hr:.2f} " \
                 f"({found['hazard_ratio_ci_low']:.2f}-{found['hazard_ratio_ci_high']:.2f})"
    plot_km(time, event, high, out / "km_test.png", time_unit=cfg.time_unit,
            title=f"{run_name or out.name}: test patients of {n_ok} fold(s), split at each fold model's "
                  "training median risk",
            annotation=annotation)
    return {f"test_pooled_{k}": v for k, v in found.items()}


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """metrics.json content: mean/std over the finished folds of every per-fold metric."""
    ok = [r for r in results if r.get("status") == "ok"]
    failed = [{"fold": r["fold"], "reason": r.get("reason", "")} for r in results
              if r.get("status") != "ok"]
    summary: dict[str, Any] = {"n_folds": len(ok), "n_folds_failed": len(failed),
                               "folds_run": [r["fold"] for r in ok]}
    if failed:
        summary["failed_folds"] = failed
    for part in ("test", "val", "train"):
        have = [r[part] for r in ok if r.get(part)]
        keys = [k for k in (have[0] if have else {}) if k not in _NOT_AVERAGED]
        for key in keys:
            vals = np.array([h[key] for h in have if h.get(key) is not None], dtype=float)
            vals = vals[np.isfinite(vals)]
            if not len(vals):
                continue
            # Population std over folds, as the reference reports it.
            summary[f"{part}_{key}_mean"] = float(vals.mean())
            summary[f"{part}_{key}_std"] = float(vals.std())
    if "test_cindex_mean" not in summary:
        summary["test_cindex_mean"] = summary["test_cindex_std"] = float("nan")
    folds = [{k: v for k, v in r.items() if k != "predictions"} for r in results]
    return {"summary": summary, "folds": folds}


def jsonable(obj: Any) -> Any:
    """``obj`` with numpy scalars as Python numbers and non-finite floats as None (JSON null)."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
