"""Cross-validation: check every fold's inputs, run the folds, resume a run, write its report.

Under torchrun every rank runs :func:`train_cross_validation`; rank 0 alone opens the output
folder, decides which folds still need training and writes the report, and the other ranks
receive its decisions (:mod:`dsca.train.distributed`). In data mode all ranks train every
fold together; in fold mode each rank trains its share of the folds, and rank 0 writes the
report once every rank is done, from every fold's result.json.
"""
from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from dsca.atomic import atomic_write
from dsca.config import TrainConfig
from dsca.labels import load_labels
from dsca.splits import resolve_split_paths
from dsca.train.data import FeatureCache, build_fold_data, open_store
from dsca.train.device import cpu_threads, resolve_device
from dsca.train.distributed import SINGLE_PROCESS, Distributed
from dsca.train.fold import train_fold
from dsca.train.logfile import log_to_file
from dsca.train.report import jsonable, pooled_risk_groups, summarize
from dsca.train.rundir import RunDir, open_run_dir

__all__ = ["train_cross_validation"]

log = logging.getLogger(__name__)


def train_cross_validation(
    cfg: TrainConfig,
    out_dir: str | Path,
    folds: Sequence[int] | None = None,
    device: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    distributed: Distributed = SINGLE_PROCESS,
) -> dict[str, Any]:
    """Run the folds, write the outputs (see :mod:`dsca.train`) and return the metrics.json content.

    Args:
        cfg: parsed configuration.
        out_dir: output folder: empty or absent for a new run (see :mod:`dsca.train.rundir`).
        folds: fold numbers to run (default ``cfg.folds``).
        device: overrides ``cfg.device``.
        resume: continue the run in ``out_dir``: finished folds are kept, the running fold
            continues from its last epoch, other folds are added; the summary covers them all.
        overwrite: replace the run in ``out_dir``.
        distributed: this rank of a torchrun launch (:func:`dsca.train.distributed.start`);
            every rank returns the same report.

    Raises:
        RunDirError, CheckpointError, ConfigError and the input errors of the labels, splits
        and store, all before anything is trained (a checkpoint error: when its fold starts).
    """
    out = Path(out_dir)
    folds = list(cfg.folds if folds is None else folds)
    dev = resolve_device(device or cfg.device)
    # Check every fold's inputs before writing anything or spending hours on the first fold.
    labels = load_labels(cfg.labels, bins=cfg.bins, columns=cfg.labels_map)
    split_paths = resolve_split_paths(cfg.splits, folds)
    store_slides = open_store(cfg)
    cache: FeatureCache | None = {} if cfg.cache_features else None
    fold_data = [build_fold_data(cfg, labels, k, p, store_slides, cache)
                 for k, p in zip(folds, split_paths)]

    run = distributed.from_main(
        lambda: open_run_dir(out, cfg.to_dict(), resume=resume, overwrite=overwrite))
    logfile = (log_to_file(out / "train.log", append=run.resumed) if distributed.is_main
               else contextlib.nullcontext())
    with logfile, cpu_threads(cfg.num_threads):
        if distributed.is_main:
            with atomic_write(out / "config.yaml") as f:
                yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
            log.info("training fold(s) %s on %s; outputs in %s", ",".join(map(str, folds)), dev, out)
        # fold -> resume its last.pt (else it starts afresh); finished folds are left out
        todo = distributed.from_main(lambda: _folds_to_train(run, folds))
        to_train = [data for data in fold_data if data.fold in todo]
        if distributed.mode == "folds" and distributed.is_main:
            for r in range(distributed.world_size):
                share = to_train[r::distributed.world_size]
                log.info("rank %d trains fold(s) %s", r, ",".join(str(d.fold) for d in share) or "-")
        for data in distributed.own(to_train):
            train_fold(cfg, data, run.fold_dir(data.fold), dev, run.run_id,
                       resume=todo[data.fold], shard=distributed.shard)
        distributed.wait_all("folds")  # (fold mode: the slowest rank's last fold)
        return distributed.from_main(lambda: _write_report(cfg, run))


def _folds_to_train(run: RunDir, folds: Sequence[int]) -> dict[int, bool]:
    """The folds of ``folds`` to train, each with whether it resumes from its last.pt: all
    of a new run; of a resumed one those without a finished result (a failed fold is trained
    again from the beginning)."""
    todo: dict[int, bool] = {}
    for fold in folds:
        done = _read_result(run, fold)
        if done is not None and done.get("status") == "ok":
            log.info("fold %d: finished earlier, skipped", fold)
            continue
        if done is not None:
            log.info("fold %d: failed earlier (%s); trained again", fold, done.get("reason"))
        todo[fold] = run.resumed and done is None
    return todo


def _write_report(cfg: TrainConfig, run: RunDir) -> dict[str, Any]:
    """metrics.json, predictions.csv and the plots from every finished fold's result.json;
    returns metrics.json's content."""
    from dsca.plots import plot_training_curves

    out = run.path
    results = _finished_results(run)
    report = summarize(results)
    preds = pd.DataFrame([r for res in results for r in res.get("predictions", [])])
    if cfg.save_prediction and len(preds):
        with atomic_write(out / "predictions.csv") as f:
            preds.to_csv(f, index=False)
    ok = [res for res in results if res["status"] == "ok"]
    plot_training_curves([res["history"] for res in results], [res["fold"] for res in results],
                         [res["best_epoch"] for res in results], out / "training_curves.png",
                         title=f"{out.name}: training curves")
    report["summary"].update(pooled_risk_groups(cfg, preds, out, len(ok)))
    with atomic_write(out / "metrics.json") as f:
        json.dump(jsonable(report), f, indent=1)
    s = report["summary"]
    log.info("test C-index %.3f +- %.3f over %d fold(s)%s", s["test_cindex_mean"],
             s["test_cindex_std"], s["n_folds"],
             f"; {s['n_folds_failed']} fold(s) failed" if s["n_folds_failed"] else "")
    return report


def _read_result(run: RunDir, fold: int) -> dict[str, Any] | None:
    """The fold's result.json when this run wrote it; None when absent or another run's."""
    path = run.fold_dir(fold) / "result.json"
    try:
        result = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        log.warning("%s: unreadable (%s); the fold is trained again", path, err)
        return None
    if not isinstance(result, dict) or result.get("run_id") != run.run_id or result.get("fold") != fold:
        return None
    return result


def _finished_results(run: RunDir) -> list[dict[str, Any]]:
    """Every fold of this run that has a result, in fold order."""
    found = (_read_result(run, fold) for fold in run.folds())
    return [result for result in found if result is not None]
