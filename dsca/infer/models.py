"""The trained models of a run folder, ready to apply: weights plus what applying them needs.

A cross-validation run holds one model per finished fold (``fold<k>/best.pt``); a final run
(``dsca train --final``) holds one model trained on every patient (``final/best.pt``). A best
checkpoint evaluated by this version carries its ``inference`` record
(:func:`dsca.train.checkpoint.inference_record`); one written before that record existed is
completed from the run folder itself: ``config.yaml`` (model and time unit), the fold's
``result.json`` (bin edges) and the training rows of ``predictions.csv`` (the training risks).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from dsca.config.model import ModelConfig
from dsca.train.checkpoint import CheckpointError, load_checkpoint, store_fingerprint
from dsca.train.final import FINAL_DIR, FINAL_FOLD
from dsca.train.rundir import RunDir

__all__ = ["RunModel", "ModelLoadError", "load_run_models", "check_store_matches"]

log = logging.getLogger(__name__)


class ModelLoadError(ValueError):
    """A run folder's models cannot be applied; the message names the file and the problem."""


@dataclass
class RunModel:
    """One trained model of a run and what applying it needs.

    Attributes:
        name: ``fold<k>`` or ``final``; ``risk_<name>`` names its column in predictions.
        model: the network in eval mode, on the CPU until moved.
        config: its model configuration.
        head: ``discrete`` (hazards per bin) or ``cox`` (log hazard).
        bin_edges: [K + 1] its time-bin edges (the discrete head's bins).
        time_unit: unit of the label times it was trained on.
        train_risk: [M] its risks of its own training patients.
        fingerprint: feature_dim, extractor, levels of the store it was trained on.
        amp: the run's mixed-precision setting (CUDA only).
        num_threads: the run's CPU thread count (0 = as is): the same count reproduces the
            run's own predictions bit for bit.
    """

    name: str
    model: nn.Module
    config: ModelConfig
    head: str
    bin_edges: np.ndarray
    time_unit: str
    train_risk: np.ndarray
    fingerprint: dict[str, Any]
    amp: str = "auto"
    num_threads: int = 0

    @property
    def risk_mean(self) -> float:
        return float(self.train_risk.mean())

    @property
    def risk_std(self) -> float:
        """Spread of the training risks; 1 when they are all equal (nothing to standardize)."""
        std = float(self.train_risk.std())
        return std if std > 0 and np.isfinite(std) else 1.0

    def standardize(self, risk: np.ndarray) -> np.ndarray:
        """[P] risks on this model's training scale: ``(risk - mean) / std`` of its training risks."""
        return (np.asarray(risk, dtype=np.float64) - self.risk_mean) / self.risk_std

    @property
    def threshold(self) -> float:
        """Its high/low risk-group threshold (the training median), standardized."""
        return float(self.standardize(np.array([np.median(self.train_risk)]))[0])


def load_run_models(run_dir: str | Path, names: Sequence[str] | None = None) -> list[RunModel]:
    """Every usable model of ``run_dir``: the finished folds in fold order, or the final model.

    Folds recorded as failed are skipped with a warning. ``names`` (``fold0``, ``final``, ...)
    keeps only those models, in that order.

    Raises:
        ModelLoadError: not a run folder, no finished model, a damaged checkpoint, or an older
            checkpoint whose run folder lacks what completes it.
    """
    run = Path(run_dir)
    if not (run / "run.json").is_file():
        raise ModelLoadError(f"{run}: not a dsca train output folder (no run.json)")
    run_id = (_read_json(run / "run.json") or {}).get("run_id")
    folds = RunDir(run, str(run_id), resumed=False).folds()
    final = run / FINAL_DIR / "best.pt"
    if final.is_file():
        if folds:
            raise ModelLoadError(f"{run}: holds both fold models (fold{folds[0]}/...) and a final "
                                 f"model ({FINAL_DIR}/); keep cross-validation and final runs in "
                                 "separate folders")
        return _selected(run, [_load(run, final, FINAL_DIR, FINAL_FOLD)], names)
    models = []
    for fold in folds:
        folder = run / f"fold{fold}"
        result = _read_json(folder / "result.json")
        if result is None:
            log.warning("%s: no result.json (the fold did not finish); skipped", folder)
            continue
        if result.get("status") != "ok":
            log.warning("%s: the fold failed (%s); skipped", folder, result.get("reason", "?"))
            continue
        models.append(_load(run, folder / "best.pt", f"fold{fold}", fold, result))
    if not models:
        raise ModelLoadError(f"{run}: no finished fold (fold<k>/result.json with status ok and "
                             f"best.pt) and no {FINAL_DIR}/best.pt; train the run first")
    return _selected(run, models, names)


def _selected(run: Path, models: list[RunModel], names: Sequence[str] | None) -> list[RunModel]:
    if not names:
        return models
    by_name = {m.name: m for m in models}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ModelLoadError(f"{run}: no finished model {', '.join(unknown)} (it has "
                             f"{', '.join(by_name)})")
    return [by_name[n] for n in dict.fromkeys(names)]


def _load(run: Path, path: Path, name: str, fold: int, result: dict[str, Any] | None = None) -> RunModel:
    run_id = (_read_json(run / "run.json") or {}).get("run_id")
    try:
        state = load_checkpoint(path, kind="best", run_id=run_id, fold=fold)
    except CheckpointError as err:
        raise ModelLoadError(str(err)) from None
    info = state.get("inference")
    if info is None:
        info = _completed_from_run(run, path, fold, result)
    config = ModelConfig.from_dict(info["model_config"])
    from dsca import build_model

    model = build_model(config)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise ModelLoadError(f"{path}: its weights do not fit its model configuration ({err})") from None
    model.eval()
    return RunModel(
        name=name, model=model, config=config, head=info["head"],
        bin_edges=np.asarray(info["bin_edges"], dtype=np.float64),
        time_unit=str(info["time_unit"]),
        train_risk=np.asarray(info["train_risk"], dtype=np.float64),
        fingerprint={k: info["store"].get(k) for k in ("feature_dim", "extractor", "levels")},
        amp=str(info.get("amp", "auto")), num_threads=int(info.get("num_threads", 0)),
    )


def _completed_from_run(run: Path, path: Path, fold: int, result: dict[str, Any] | None) -> dict[str, Any]:
    """The inference record of a best checkpoint written before the record existed."""
    import pandas as pd
    import yaml

    from dsca.config import TrainConfig

    what = f"{path}: an older checkpoint without its inference record"
    try:
        raw = yaml.safe_load((run / "config.yaml").read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ModelLoadError(f"{what}, and {run / 'config.yaml'} cannot be read ({err})") from None
    model_keys = raw.get("model", raw) if isinstance(raw, dict) else {}
    config = ModelConfig.from_dict(model_keys)
    preds_path = run / "predictions.csv"
    if result is None or "bin_edges" not in result or not preds_path.is_file():
        raise ModelLoadError(f"{what}, and the run folder lacks fold{fold}/result.json or "
                             "predictions.csv to complete it; retrain the run with this dsca")
    preds = pd.read_csv(preds_path, dtype={"patient_id": str}, float_precision="round_trip")
    train = preds[(preds["fold"] == fold) & (preds["split"] == "train")]
    if not len(train):
        raise ModelLoadError(f"{what}, and {preds_path} has no training rows of fold {fold}")
    store = raw.get("store") if isinstance(raw, dict) else None
    fingerprint: dict[str, Any] = {"feature_dim": config.dims[0], "extractor": None, "levels": None}
    if store:
        from dsca.store import FeatureStore, StoreError

        try:
            fingerprint = store_fingerprint(FeatureStore.open(store).attrs)
        except StoreError:
            pass  # the training store is gone: only the feature size can be checked
    time_unit = raw.get("time_unit", TrainConfig.time_unit) if isinstance(raw, dict) else "days"
    return {"model_config": dataclasses.asdict(config), "head": "cox" if config.cox else "discrete",
            "bin_edges": result["bin_edges"], "time_unit": time_unit,
            "train_risk": train["risk"].to_numpy(float), "store": fingerprint,
            "amp": raw.get("amp", "auto"), "num_threads": raw.get("num_threads", 0)}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def check_store_matches(models: list[RunModel], store_attrs: dict[str, Any], store_name: str,
                        allow_other_extractor: bool = False) -> None:
    """Refuse a store whose features the models cannot read or were not trained on.

    Raises:
        ModelLoadError: another feature size, or (unless ``allow_other_extractor``) features
            recorded as another encoder's, or other pyramid levels.
    """
    here = store_fingerprint(store_attrs)
    trained = models[0].fingerprint
    if here["feature_dim"] != trained["feature_dim"]:
        raise ModelLoadError(f"{store_name}: holds {here['feature_dim']}-dim features, the run's "
                             f"models read {trained['feature_dim']}-dim features (another encoder)")
    if trained.get("levels") and here["levels"] and trained["levels"] != here["levels"]:
        raise ModelLoadError(f"{store_name}: its levels are {here['levels']}, the run was trained "
                             f"on {trained['levels']}")
    if (not allow_other_extractor and trained.get("extractor") and here["extractor"]
            and trained["extractor"] != here["extractor"]):
        raise ModelLoadError(
            f"{store_name}: features recorded as {here['extractor']!r}, the run was trained on "
            f"{trained['extractor']!r}; if both are the same encoder, pass --allow-other-extractor")
