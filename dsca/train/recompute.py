"""``dsca report``: a run's metrics and plots recomputed from its saved predictions.

Reads a ``dsca train`` output folder (see :mod:`dsca.train`):

    config.yaml          the parsed configuration (head, bootstrap resamples, time unit)
    predictions.csv      fold, split, patient_id, t, e, y_t, risk, risk_group, surv_1..K | log_hazard
    fold<k>/result.json  bin_edges, status, best_epoch, history (and the fold's own metrics,
                         which are not used)

and rebuilds the content of ``metrics.json`` with the functions training used
(:func:`dsca.train.report.part_metrics`, :func:`~dsca.train.report.summarize`,
:func:`~dsca.train.report.pooled_risk_groups`): the hazards of a discrete head come back from
the saved survival curve, each part's risk groups from ``risk`` at the median of its fold's
training rows (checked against the saved ``risk_group``), and the training rows are the
censoring reference of the IPCW metrics. :func:`compare_reports` lists where two such reports
disagree.

Writes ``OUT/metrics.json``, ``OUT/km_test.png`` and ``OUT/training_curves.png``, each
atomically (OUT defaults to ``RUN/report``).
"""
from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from dsca.atomic import atomic_write
from dsca.config import ConfigError, TrainConfig, parse_config
from dsca.metrics import split_at_training_median
from dsca.train.report import (
    hazards_from_survival,
    jsonable,
    part_metrics,
    pooled_risk_groups,
    summarize,
)

__all__ = ["ReportError", "recompute_report", "compare_reports", "compared_keys", "REPORT_DIR"]

log = logging.getLogger(__name__)

#: Default output folder, inside the run folder.
REPORT_DIR = "report"

_BASE_COLUMNS = ("fold", "split", "patient_id", "t", "e", "y_t", "risk", "risk_group")
_FOLD_DIR = re.compile(r"fold(0|[1-9]\d*)")
# Per-fold keys copied from result.json: what the run did, not what its predictions score.
_RECOMPUTED = frozenset({"train_risk_median", "predictions"})
_PARTS = ("train", "val", "test")
# Keys that are no metric of the predictions (copied inputs, ids, timings): not compared.
_NOT_COMPARED = frozenset({"fold", "status", "reason", "best_epoch", "epochs_run", "history",
                           "bin_edges", "run_id", "seconds", "folds_run", "failed_folds"})


class ReportError(ValueError):
    """The run folder cannot be reported (message names the file and the problem)."""


def recompute_report(run_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Recompute a run's metrics.json content and plots from its saved predictions.

    Args:
        run_dir: a ``dsca train`` output folder, finished or partly finished.
        out_dir: where metrics.json, km_test.png and training_curves.png go (default
            ``run_dir/report``); never the run folder itself.

    Returns:
        the metrics.json content as written (JSON types, NaN as None): ``{"summary",
        "folds"}``, folds in fold order.

    Raises:
        ReportError: no predictions.csv, missing columns, a fold in predictions.csv without
            its result.json, a risk group that disagrees with the risks, an unreadable file.
    """
    from dsca.plots import plot_training_curves

    run = Path(run_dir)
    out = run / REPORT_DIR if out_dir is None else Path(out_dir)
    if not run.is_dir():
        raise ReportError(f"{run}: not a folder")
    if out.resolve() == run.resolve():
        raise ReportError(f"{out}: is the run folder itself; its metrics.json and plots would be "
                          "overwritten (choose another --out)")
    if (run / "final" / "best.pt").is_file():
        raise ReportError(f"{run}: a final run (dsca train --final): one model trained on every "
                          "patient, with no folds to report on; its metrics.json holds its "
                          "training-set metrics")
    cfg = _load_run_config(run / "config.yaml")
    preds_path = run / "predictions.csv"
    preds = _read_predictions(preds_path, cfg)
    results = _read_results(run, preds_path, set(preds["fold"].unique()))

    folds: list[dict[str, Any]] = []
    rows: list[pd.DataFrame] = []
    for res in results:
        if res.get("status") != "ok":
            folds.append({k: v for k, v in res.items() if k != "predictions"})
            continue
        fold_rows = preds[preds["fold"] == res["fold"]]
        folds.append(_recomputed_fold(cfg, res, fold_rows, preds_path))
        rows.append(fold_rows)
    report = summarize(folds)
    n_ok = sum(r.get("status") == "ok" for r in results)
    out.mkdir(parents=True, exist_ok=True)
    plot_training_curves([r.get("history", []) for r in results], [r["fold"] for r in results],
                         [r.get("best_epoch", 0) for r in results], out / "training_curves.png",
                         title=f"{run.name}: training curves")
    pooled = pd.concat(rows) if rows else preds.iloc[:0]
    report["summary"].update(pooled_risk_groups(cfg, pooled, out, n_ok, run_name=run.name))
    report = jsonable(report)
    with atomic_write(out / "metrics.json") as f:
        json.dump(report, f, indent=1)
    log.info("%s: %d fold(s) recomputed from %s; outputs in %s", run, n_ok, preds_path, out)
    return report


def compare_reports(saved: dict[str, Any], recomputed: dict[str, Any],
                    rel_tol: float = 1e-9) -> list[str]:
    """Every metric on which two metrics.json contents disagree.

    Walks ``summary`` and each fold (matched by its ``fold`` number) recursively and compares
    every number, skipping what is no metric of the predictions (history and timings, bin
    edges, ids, fold status; see ``_NOT_COMPARED``). A missing key or a null on one side only
    counts as a difference.

    Returns:
        one line per difference, ``"<key>: saved <a>, recomputed <b>"``, with keys such as
        ``summary.test_cindex_mean`` or ``fold0.test.cindex``; empty when they agree.
    """
    found: list[str] = []
    _compare(saved.get("summary", {}), recomputed.get("summary", {}), "summary", rel_tol, found)
    saved_folds = {f.get("fold"): f for f in saved.get("folds", [])}
    new_folds = {f.get("fold"): f for f in recomputed.get("folds", [])}
    for fold in sorted(set(saved_folds) | set(new_folds), key=str):
        if fold not in new_folds or fold not in saved_folds:
            side = "recomputed" if fold not in new_folds else "saved"
            found.append(f"fold{fold}: missing in the {side} report")
            continue
        _compare(saved_folds[fold], new_folds[fold], f"fold{fold}", rel_tol, found)
    return found


def compared_keys(report: dict[str, Any]) -> list[str]:
    """The keys :func:`compare_reports` compares in ``report`` (for tests and messages)."""
    keys: list[str] = []
    _walk(report.get("summary", {}), "summary", keys)
    for f in report.get("folds", []):
        _walk(f, f"fold{f.get('fold')}", keys)
    return keys


def _walk(node: dict[str, Any], prefix: str, keys: list[str]) -> None:
    for key, value in node.items():
        if key in _NOT_COMPARED:
            continue
        if isinstance(value, dict):
            _walk(value, f"{prefix}.{key}", keys)
        elif value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            keys.append(f"{prefix}.{key}")


def _compare(a: Any, b: Any, key: str, rel_tol: float, found: list[str]) -> None:
    """Append the differences between ``a`` and ``b`` (at ``key``) to ``found``."""
    if isinstance(a, dict) or isinstance(b, dict):
        if not (isinstance(a, dict) and isinstance(b, dict)):
            found.append(f"{key}: saved {_short(a)}, recomputed {_short(b)}")
            return
        for k in list(a) + [k for k in b if k not in a]:
            if k in _NOT_COMPARED:
                continue
            if k not in a or k not in b:
                present = a[k] if k in a else b[k]
                if _is_number(present) or isinstance(present, dict):
                    side = "recomputed" if k not in b else "saved"
                    found.append(f"{key}.{k}: missing in the {side} report")
                continue
            _compare(a[k], b[k], f"{key}.{k}", rel_tol, found)
        return
    if not (_is_number(a) or _is_number(b)):
        return  # text, lists: no metric
    if a is None and b is None:
        return
    if a is None or b is None or not _is_number(a) or not _is_number(b) \
            or not math.isclose(float(a), float(b), rel_tol=rel_tol, abs_tol=0.0):
        found.append(f"{key}: saved {_short(a)}, recomputed {_short(b)}")


def _is_number(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _short(v: Any) -> str:
    return repr(v) if not isinstance(v, (dict, list)) else type(v).__name__


def _load_run_config(path: Path) -> TrainConfig:
    """The run's parsed configuration from its config.yaml (``TrainConfig.to_dict()``, whose
    ``model`` section :func:`dsca.config.parse_config` reads)."""
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ReportError(f"{path}: not found; is {path.parent} a dsca train output folder?") from None
    except (OSError, yaml.YAMLError) as err:
        # YAML's messages span lines; the CLI reports one
        raise ReportError(f"{path}: unreadable ({' '.join(str(err).split())})") from None
    if not isinstance(raw, dict):
        raise ReportError(f"{path}: expected a mapping of keys, got {type(raw).__name__}")
    try:
        # no base_dir: the paths were resolved when the run started and are kept as written
        return parse_config(raw, source=str(path))
    except ConfigError as err:
        raise ReportError(str(err)) from None


def _read_predictions(path: Path, cfg: TrainConfig) -> pd.DataFrame:
    """predictions.csv with its columns checked; floats parsed exactly (pandas' default
    parser can be 1 ulp off, which would move risks across their fold's median)."""
    if not path.is_file():
        hint = ("config.yaml has save_prediction: false, so the run wrote none"
                if not cfg.save_prediction else "the run has not finished a fold yet, or the file was removed")
        raise ReportError(f"{path}: not found ({hint}); nothing to recompute from")
    try:
        preds = pd.read_csv(path, dtype={"patient_id": str, "split": str, "risk_group": str},
                            float_precision="round_trip")
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise ReportError(f"{path}: unreadable ({err})") from None
    missing = [c for c in _BASE_COLUMNS if c not in preds.columns]
    if cfg.is_cox and "log_hazard" not in preds.columns:
        missing.append("log_hazard")
    if not cfg.is_cox and "surv_1" not in preds.columns:
        missing.append("surv_1..K")
    if missing:
        raise ReportError(f"{path}: missing column(s) {', '.join(missing)}")
    if not len(preds):
        raise ReportError(f"{path}: no rows")
    for col in ("fold", "e", "y_t"):
        if not pd.api.types.is_integer_dtype(preds[col]):
            raise ReportError(f"{path}: column {col} must hold integers")
    bad = sorted({str(v) for v in preds["risk_group"]} - {"high", "low"})
    if bad:
        raise ReportError(f"{path}: risk_group must be high or low, found {', '.join(bad)}")
    for col in ("t", "risk"):
        values = pd.to_numeric(preds[col], errors="coerce").to_numpy(np.float64)
        if not np.isfinite(values).all():
            raise ReportError(f"{path}: column {col} holds {int((~np.isfinite(values)).sum())} "
                              "empty, non-numeric or infinite value(s)")
    return preds


def _read_results(run: Path, preds_path: Path, pred_folds: set[int]) -> list[dict[str, Any]]:
    """Every fold's result.json of this run, in fold order; like training, results written by
    another run (another run_id than run.json's) are ignored.

    Raises:
        ReportError: a fold of predictions.csv has no (usable) result.json; one is unreadable.
    """
    run_id = None
    if (run / "run.json").is_file():
        try:
            run_id = json.loads((run / "run.json").read_text()).get("run_id")
        except (OSError, ValueError, AttributeError) as err:
            raise ReportError(f"{run / 'run.json'}: unreadable ({err})") from None
    folds = sorted(int(m.group(1)) for p in run.iterdir()
                   if (m := _FOLD_DIR.fullmatch(p.name)) and p.is_dir())
    results = []
    for fold in folds:
        path = run / f"fold{fold}" / "result.json"
        if not path.is_file():
            continue
        try:
            res = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ReportError(f"{path}: unreadable ({err})") from None
        if not isinstance(res, dict) or res.get("fold") != fold:
            raise ReportError(f"{path}: not a result of fold {fold}")
        if run_id is not None and res.get("run_id") != run_id:
            log.warning("%s: written by another run than %s; ignored", path, run / "run.json")
            continue
        if res.get("status") == "ok":
            if fold not in pred_folds:
                # a later invocation finished it but stopped before rewriting predictions.csv
                # (and metrics.json): the saved report does not cover it either
                log.warning("%s: fold %d has no rows in %s; left out", path, fold, preds_path)
                continue
            if "bin_edges" not in res:
                raise ReportError(f"{path}: has no bin_edges")
        results.append(res)
    ok = {r["fold"] for r in results if r.get("status") == "ok"}
    for fold in sorted(pred_folds - ok):
        path = run / f"fold{fold}" / "result.json"
        why = "not found" if not path.is_file() else "not a finished fold of this run"
        raise ReportError(f"{path}: {why}, but {preds_path} has rows of fold {fold}")
    return results


def _recomputed_fold(cfg: TrainConfig, result: dict[str, Any], rows: pd.DataFrame,
                     preds_path: Path) -> dict[str, Any]:
    """One finished fold's metrics.json entry: result.json's account of the run (history,
    best epoch, ...) with every metric recomputed from the fold's prediction rows."""
    fold = result["fold"]
    edges = np.asarray(result["bin_edges"], dtype=float)
    train = rows[rows["split"] == "train"]
    if not len(train):
        raise ReportError(f"{preds_path}: fold {fold} has no train rows (its risk median and "
                          "censoring reference)")
    train_risk = train["risk"].to_numpy(np.float64)
    parts = list(pd.unique(rows["split"]))
    # result.json's own metrics of any part are dropped, so that none is passed off as recomputed
    entry = {k: v for k, v in result.items()
             if k not in _RECOMPUTED and k not in _PARTS and k not in parts}
    entry["train_risk_median"] = float(np.median(train_risk))
    for part in parts:
        sub = rows[rows["split"] == part]
        risk = sub["risk"].to_numpy(np.float64)
        high = split_at_training_median(train_risk, risk)
        saved_high = (sub["risk_group"] == "high").to_numpy()
        if (high != saved_high).any():
            wrong = sub["patient_id"].to_numpy()[high != saved_high]
            raise ReportError(
                f"{preds_path}: fold {fold} {part}: risk_group of {len(wrong)} patient(s) "
                f"({', '.join(map(str, wrong[:3]))}{', ...' if len(wrong) > 3 else ''}) disagrees "
                f"with their risk split at the fold's training median {entry['train_risk_median']!r}")
        try:
            entry[part] = part_metrics(
                cfg, sub["t"].to_numpy(np.float64), sub["e"].to_numpy(), sub["y_t"].to_numpy(),
                risk, _model_output(cfg, sub, edges, preds_path, fold), edges,
                train["t"].to_numpy(np.float64), train["e"].to_numpy(), high)
        except ValueError as err:
            raise ReportError(f"{preds_path}: fold {fold} {part}: {err}") from None
    return entry


def _model_output(cfg: TrainConfig, rows: pd.DataFrame, edges: np.ndarray, preds_path: Path,
                  fold: int) -> np.ndarray:
    """The model output of ``rows`` as training had it: [P, 1] Cox log hazards, or [P, K]
    hazards recovered from the saved survival curve ``surv_1..K``."""
    if cfg.is_cox:
        return rows[["log_hazard"]].to_numpy(np.float64)
    k = len(edges) - 1
    names = [f"surv_{j + 1}" for j in range(k)]
    missing = [n for n in names if n not in rows.columns]
    if missing:
        raise ReportError(f"{preds_path}: fold {fold} has {k} time bins but the column(s) "
                          f"{', '.join(missing)} are missing")
    survival = rows[names].to_numpy(np.float64)
    if np.isnan(survival).any():
        raise ReportError(f"{preds_path}: fold {fold}: empty survival values in {', '.join(names)}")
    return hazards_from_survival(survival)
