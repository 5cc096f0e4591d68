"""``dsca predict``: a run's models on every patient of a store, their ensemble and its metrics.

Ensemble risk: each model's risk standardized by the risks of its own training patients,
``z_k = (r_k - mean_k) / std_k``, averaged over the models. Fold models trained on different
patients put their raw risks on different scales; standardizing puts each on the scale of the
patients it learnt from. Risk group: high when the ensemble risk exceeds the mean of the
models' standardized training medians (for a single model: its training median, as in
training). Discrete heads also give the ensemble survival curve: each model's step curve read
at the mean of the models' bin edges (the edges agree when the bins were cut on all patients),
averaged.

    OUT/predictions.csv   patient_id, risk, risk_<model>..., risk_group, surv_1..K; with labels t, e
    OUT/predict.json      the run, store, models, bin edges, time unit, threshold
    OUT/metrics.json      with labels: cindex (+ 95% CI), cindex_discrete, td_auc, ibs,
                          logrank_p, hazard_ratio (+ CI), n, n_events, per-model C-index
    OUT/km.png            with labels: Kaplan-Meier of the two risk groups

Under torchrun (``torchrun --nproc-per-node=K --no-python -- dsca predict ...``) rank r
scores the patients at positions r, r+K, ... and rank 0 writes the outputs from every rank's
rows: the same files as one process. A rank that fails stops every rank; nothing is written.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import torch

from dsca.atomic import atomic_write
from dsca.infer.apply import apply_models
from dsca.infer.models import RunModel, check_store_matches, load_run_models
from dsca.losses import risk_score, survival_curve
from dsca.train.distributed import SINGLE, SINGLE_PROCESS, Distributed, Shard
from dsca.train.report import jsonable

__all__ = ["PredictError", "Ensemble", "predict_run", "ensemble_metrics", "select_patients",
           "report_predictions", "score_patients", "merge_shares"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class PredictError(ValueError):
    """Inputs of ``dsca predict``/``dsca heatmap`` that cannot be used; names what and why."""


@dataclass
class Ensemble:
    """How a run's models combine (see the module docstring)."""

    models: list[RunModel]

    @property
    def discrete(self) -> bool:
        return all(m.head == "discrete" for m in self.models)

    @property
    def bin_edges(self) -> np.ndarray | None:
        """[K + 1] the mean of the models' bin edges: the times of the ensemble survival curve
        and of the td-AUC (a Cox head's bins are cut as a discrete head's would be); None when
        the models have different numbers of bins."""
        if len({len(m.bin_edges) for m in self.models}) != 1:
            return None
        return np.mean([m.bin_edges for m in self.models], axis=0)

    @property
    def threshold(self) -> float:
        return float(np.mean([m.threshold for m in self.models]))

    def risk(self, raw: np.ndarray) -> np.ndarray:
        """[P, M] raw risks of M models -> [P] ensemble risk."""
        return np.mean([m.standardize(raw[:, i]) for i, m in enumerate(self.models)], axis=0)

    def survival(self, outputs: np.ndarray) -> np.ndarray | None:
        """[P, M, K] hazards -> [P, K] mean survival at the common edges (None for Cox)."""
        edges = self.bin_edges
        if edges is None or not self.discrete:
            return None
        from dsca.metrics import survival_at

        curves = [survival_at(survival_curve(torch.as_tensor(outputs[:, i], dtype=torch.float64)).numpy(),
                              m.bin_edges, edges[1:]) for i, m in enumerate(self.models)]
        return np.mean(curves, axis=0)


def select_patients(store: Any, labels: pd.DataFrame | None, patients: Sequence[str] | None,
                    store_name: str) -> dict[str, list[str]]:
    """Patient id -> slide ids to score.

    With labels: the labelled patients with slides in the store, slides in the labels' order
    (the order training concatenates them in); else every patient the store records, and each
    slide it records no patient for as a patient of its own. Either way restricted to
    ``patients`` when given.

    Raises:
        PredictError: a listed patient is unknown, or nothing is left to score.
    """
    from dsca.labels import patient_slides

    if labels is not None:
        mapping = patient_slides(labels, list(labels.index), set(store.slide_ids),
                                 store_name=store_name, drop_missing=True)
    else:
        mapping = store.patient_slides()
        # a slide converted without labels records no patient: it is its own
        for sid in store.slide_ids:
            if store.slide_attrs(sid).get("patient_id") is None:
                mapping[sid] = [sid]
    if patients:
        unknown = [p for p in patients if p not in mapping]
        if unknown:
            raise PredictError(f"{store_name}: patient(s) {', '.join(unknown[:5])} have no slides "
                               "there" + (" with labels" if labels is not None else ""))
        mapping = {p: mapping[p] for p in patients}
    if not mapping:
        raise PredictError(f"{store_name}: no patient to score" + (
            " (none of the labelled patients has a slide there)" if labels is not None else " (no slides)"))
    return mapping


def check_out_dir(out: str | Path, run: str | Path) -> Path:
    """``out`` as an output folder of predict/heatmap: never the run folder or another run.

    Raises:
        PredictError: ``out`` is a file, the run itself or a folder holding a run.
    """
    dest = Path(out)
    if dest.exists() and not dest.is_dir():
        raise PredictError(f"--out {dest}: exists and is not a folder")
    if dest.resolve() == Path(run).resolve() or (dest / "run.json").is_file():
        raise PredictError(f"--out {dest}: a dsca train run folder; its own files would be "
                           "overwritten (choose another --out)")
    return dest


def resolved_device(name: str) -> torch.device:
    """:func:`dsca.train.device.resolve_device`, its errors as :class:`PredictError`."""
    from dsca.train.device import resolve_device

    try:
        return resolve_device(name)
    except RuntimeError as err:
        raise PredictError(f"--device {name}: {err}") from None


@dataclass
class Inputs:
    """What predict and heatmap check before anything is written."""

    out: Path
    device: torch.device
    models: list[RunModel]
    store: Any  # the opened FeatureStore
    labels: pd.DataFrame | None


def open_inputs(run: str | Path, store: str | Path, out: str | Path, *, device: str,
                models: Sequence[str] | None, labels_csv: str | Path | None,
                allow_other_extractor: bool) -> Inputs:
    """Check the output folder and device, load the run's models, open the store and check it
    against them, read the labels.

    Raises:
        ModelLoadError, PredictError, StoreError, LabelError.
    """
    from dsca.labels import load_labels
    from dsca.store import FeatureStore

    dest = check_out_dir(out, run)
    dev = resolved_device(device)
    run_models = load_run_models(run, models)
    fs = FeatureStore.open(store)
    check_store_matches(run_models, fs.attrs, str(store), allow_other_extractor)
    labels = load_labels(labels_csv, bins=1) if labels_csv is not None else None
    return Inputs(dest, dev, run_models, fs, labels)


def predict_run(run: str | Path, store: str | Path, out: str | Path, *,
                labels_csv: str | Path | None = None, patients: Sequence[str] | None = None,
                device: str = "cpu", allow_other_extractor: bool = False, n_boot: int = 1000,
                num_workers: int = 2, models: Sequence[str] | None = None,
                distributed: Distributed = SINGLE_PROCESS) -> dict[str, Any]:
    """Score the patients of ``store`` with the models of ``run`` (all, or those named in
    ``models``); write ``out`` (see the module).

    Args:
        store: the feature store, as :meth:`dsca.store.FeatureStore.open` takes it (a local
            path or a URL: passed on as given).
        distributed: this rank of a torchrun launch (:func:`dsca.train.distributed.start`):
            every rank scores its share of the patients (:func:`score_patients`), rank 0
            alone writes ``out``; every rank returns the same result.

    Returns:
        metrics.json's content with labels, else ``{"n": patients scored}``.

    Raises:
        ModelLoadError, PredictError, StoreError, LabelError: before anything is written.
        PeerFailed: another rank failed (nothing is written).
    """
    inputs = open_inputs(run, store, out, device=device, models=models, labels_csv=labels_csv,
                         allow_other_extractor=allow_other_extractor)
    mapping = select_patients(inputs.store, inputs.labels, patients, str(store))
    ids, outputs = score_patients(inputs.models, store, mapping, inputs.device,
                                  num_workers=num_workers, shard=distributed.shard)
    meta = {"run": str(Path(run).resolve()), "store": str(store),
            "labels": None if labels_csv is None else str(labels_csv), "n_boot": n_boot}
    return distributed.from_main(
        lambda: _write_predictions(inputs, ids, outputs.numpy().astype(np.float64), meta, Path(run).name))


def score_patients(models: Sequence[RunModel], store: str | Path,
                   mapping: Mapping[str, Sequence[str]], device: torch.device, *,
                   num_workers: int = 2, shard: Shard = SINGLE) -> tuple[list[str], torch.Tensor]:
    """Every model's outputs for every patient of ``mapping``, in its order.

    Under a :class:`~dsca.train.distributed.Shard` of K ranks rank r applies the models to the
    patients at positions r, r+K, ... of ``mapping`` (:meth:`Shard.positions`) and the rows of all
    ranks are gathered back into ``mapping``'s order (:func:`merge_shares`), so every rank
    returns what one process would, bit for bit: each patient is scored alone, on the same
    inputs and thread count wherever it runs.

    Returns:
        the patient ids and their outputs [P, M, K] float32 (M models; K bins, 1 for Cox).

    Raises:
        PredictError: the ranks do not agree on the patients to score.
        PeerFailed: another rank failed.
    """
    order = list(mapping)
    # each rank chose the patients itself: a rank that sees other labels or another store
    # would otherwise fill its positions with other patients' rows
    fingerprint = hashlib.sha256(json.dumps([[p, list(mapping[p])] for p in order]).encode()).hexdigest()
    if len(set(shard.all_gather(fingerprint))) > 1:
        raise PredictError(f"the {shard.size} ranks chose different patients or slides to score; "
                           "every rank must read the same store, labels and --patients")
    mine = [order[i] for i in shard.positions(0, len(order))]
    rows: list[tuple[str, torch.Tensor]] = []
    if mine:  # fewer patients than ranks leaves some ranks none
        todo = {p: mapping[p] for p in mine}
        for res in apply_models(models, store, todo, device, num_workers=num_workers,
                                progress=shard.is_main):
            rows.append((res.patient_id, torch.stack(res.outputs)))  # [M, K]
    merged = merge_shares(shard.all_gather(rows), len(order))
    ids = [pid for pid, _ in merged]
    if ids != [str(p) for p in order]:  # the shares are positions of one list: a mismatch is a bug here
        raise RuntimeError("the gathered predictions are not in the patients' order")
    return ids, torch.stack([out for _, out in merged])


def merge_shares(parts: Sequence[Sequence[T]], n: int) -> list[T]:
    """A list of ``n`` items from the shares of K = ``len(parts)`` ranks: ``parts[r]`` holds
    the items at positions r, r + K, ... (:meth:`Shard.positions`)."""
    size = len(parts)
    expected = [len(range(r, n, size)) for r in range(size)]
    if [len(p) for p in parts] != expected:
        raise RuntimeError(f"ranks returned {[len(p) for p in parts]} rows, expected {expected}")
    merged: list[Any] = [None] * n
    for r, part in enumerate(parts):
        merged[r::size] = part
    return merged


def _write_predictions(inputs: Inputs, ids: list[str], out_arr: np.ndarray, meta: dict[str, Any],
                       run_name: str) -> dict[str, Any]:
    """The ensemble of [P, M, K] outputs ``out_arr`` (float64) -> predictions.csv, with labels
    metrics.json and km.png, and predict.json; returns metrics.json's content or ``{"n": P}``."""
    dest, models, labels = inputs.out, inputs.models, inputs.labels
    ensemble = Ensemble(models)
    raw = np.stack([risk_score(torch.as_tensor(out_arr[:, i])).numpy() for i in range(len(models))], axis=1)
    table = pd.DataFrame({"patient_id": ids, "risk": ensemble.risk(raw)})
    for i, m in enumerate(models):
        table[f"risk_{m.name}"] = raw[:, i]
    high = table["risk"].to_numpy() > ensemble.threshold
    table["risk_group"] = np.where(high, "high", "low")
    surv = ensemble.survival(out_arr)
    if surv is not None:
        for k in range(surv.shape[1]):
            table[f"surv_{k + 1}"] = surv[:, k]

    dest.mkdir(parents=True, exist_ok=True)
    for stale in ("metrics.json", "km.png"):  # of an earlier predict with labels into this folder
        (dest / stale).unlink(missing_ok=True)
    result: dict[str, Any] = {"n": len(table)}
    if labels is not None:
        lab = labels.loc[ids]
        table["t"], table["e"] = lab["t"].to_numpy(float), lab["e"].to_numpy(int)
        result = ensemble_metrics(table, ensemble.bin_edges, models[0].time_unit, meta["n_boot"],
                                  [f"risk_{m.name}" for m in models])
        _plot_km(table, dest / "km.png", models[0].time_unit, run_name, result)
        with atomic_write(dest / "metrics.json") as f:
            json.dump(jsonable(result), f, indent=1)
    with atomic_write(dest / "predictions.csv") as f:
        table.to_csv(f, index=False)
    meta = {"run": meta["run"], "store": meta["store"], "models": [m.name for m in models],
            "head": models[0].head, "time_unit": models[0].time_unit,
            "bin_edges": None if ensemble.bin_edges is None else ensemble.bin_edges.tolist(),
            "threshold": ensemble.threshold, "labels": meta["labels"], "n_boot": meta["n_boot"]}
    with atomic_write(dest / "predict.json") as f:
        json.dump(meta, f, indent=1)
    log.info("scored %d patient(s) with %d model(s); %s", len(table), len(models), dest / "predictions.csv")
    return result


def ensemble_metrics(table: pd.DataFrame, bin_edges: np.ndarray | None, time_unit: str,
                     n_boot: int, model_columns: Sequence[str] = ()) -> dict[str, Any]:
    """Metrics of scored, labelled patients (``dsca predict`` and ``dsca report --predictions``).

    Args:
        table: one row per patient with ``t``, ``e``, ``risk``, ``risk_group`` and, for a
            discrete head, ``surv_1..K`` at ``bin_edges``.
        bin_edges: [K + 1] the survival curve's edges, or None (Cox head).
        n_boot: bootstrap resamples of the C-index CI.
        model_columns: per-model risk columns whose own C-index is reported too.

    The IPCW metrics (td-AUC, IBS) weigh censoring by these patients themselves: an external
    cohort has no training set of its own.
    """
    from dsca.labels.bins import assign_bins
    from dsca.metrics import concordance_index, evaluate_predictions
    from dsca.train.report import risk_group_metrics  # the same risk-group figures as training

    time, event = table["t"].to_numpy(float), table["e"].to_numpy(int)
    risk = table["risk"].to_numpy(float)
    surv_cols = [c for c in table.columns if c.startswith("surv_")]
    survival = table[surv_cols].to_numpy(float) if surv_cols and bin_edges is not None else None
    y_t = assign_bins(time, bin_edges) if bin_edges is not None else np.zeros(len(time))
    found = evaluate_predictions(time, event, y_t, risk, survival=survival, bin_edges=bin_edges,
                                 n_boot=n_boot)
    found.update(risk_group_metrics(time, event, (table["risk_group"] == "high").to_numpy()))
    for key in ("td_auc", "ibs"):  # present even where undefined (no survival curve: Cox)
        found.setdefault(key, float("nan"))
    found["time_unit"] = time_unit
    found["per_model_cindex"] = {c.removeprefix("risk_"): concordance_index(time, event, table[c].to_numpy(float))
                                 for c in model_columns}
    return found


def report_predictions(predictions_csv: str | Path, labels_csv: str | Path, out: str | Path) -> dict[str, Any]:
    """``dsca report --predictions``: the metrics and KM plot of saved predictions, recomputed.

    Reads ``predictions.csv`` of ``dsca predict`` and the ``predict.json`` beside it (bin edges,
    time unit, bootstrap size), takes t and e from ``labels_csv``; writes ``OUT/metrics.json``
    and ``OUT/km.png``.

    Raises:
        PredictError: a missing file or column, or patients without labels.
    """
    from dsca.labels import load_labels

    path = Path(predictions_csv)
    meta_path = path.parent / "predict.json"
    try:
        table = pd.read_csv(path, dtype={"patient_id": str}, float_precision="round_trip")
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise PredictError(f"{getattr(err, 'filename', None) or path}: cannot be read ({err}); "
                           "give the predictions.csv of dsca predict, with its predict.json") from None
    missing = [c for c in ("patient_id", "risk", "risk_group") if c not in table.columns]
    if missing:
        raise PredictError(f"{path}: no column(s) {', '.join(missing)}; not dsca predict's output")
    if "threshold" in meta:
        high = table["risk"].to_numpy(float) > float(meta["threshold"])
        wrong = table["patient_id"][high != (table["risk_group"] == "high").to_numpy()]
        if len(wrong):
            raise PredictError(f"{path}: risk_group disagrees with risk and {meta_path}'s threshold "
                               f"for {len(wrong)} patient(s), e.g. {', '.join(wrong[:3])}")
    labels = load_labels(labels_csv, bins=1)
    unknown = [p for p in table["patient_id"] if p not in labels.index]
    if unknown:
        raise PredictError(f"{labels_csv}: no labels for {len(unknown)} predicted patient(s), e.g. "
                           f"{', '.join(unknown[:3])}")
    lab = labels.loc[table["patient_id"]]
    table = table.drop(columns=[c for c in ("t", "e") if c in table.columns])
    table["t"], table["e"] = lab["t"].to_numpy(float), lab["e"].to_numpy(int)
    edges = None if meta.get("bin_edges") is None else np.asarray(meta["bin_edges"], dtype=float)
    models = [c for c in table.columns if c.startswith("risk_") and c != "risk_group"]
    found = ensemble_metrics(table, edges, meta.get("time_unit", "days"), int(meta.get("n_boot", 1000)), models)
    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    _plot_km(table, dest / "km.png", found["time_unit"], Path(meta.get("run", "run")).name, found)
    with atomic_write(dest / "metrics.json") as f:
        json.dump(jsonable(found), f, indent=1)
    return found


def _plot_km(table: pd.DataFrame, path: Path, time_unit: str, run_name: str, found: dict[str, Any]) -> None:
    from dsca.plots import plot_km

    hr = found["hazard_ratio"]
    plot_km(table["t"].to_numpy(float), table["e"].to_numpy(int), (table["risk_group"] == "high").to_numpy(),
            path, time_unit=time_unit,
            title=f"{run_name} applied to {len(table)} patients, split at the models' training medians",
            annotation=f"log-rank p = {found['logrank_p']:.2g}; HR {hr:.2f} "
                       f"({found['hazard_ratio_ci_low']:.2f}-{found['hazard_ratio_ci_high']:.2f}); "
                       f"C-index {found['cindex']:.3f}")
