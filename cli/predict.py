"""`dsca predict`: apply a run's models to the patients of a store."""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported only once a command runs
    from dsca.train.distributed import Distributed

HELP = "apply a trained run (its fold models, or a final model) to every patient of a store"

DESCRIPTION = """\
    Apply a trained run to the patients of a feature store (e.g. an external cohort).

    Reads the run folder of dsca train (every finished fold's fold<k>/best.pt, or final/best.pt
    of dsca train --final) and a store converted with the same encoder. Each patient is read
    once and scored by every model. The ensemble risk is the mean over the models of each
    model's risk standardized by the risks of its own training patients; a patient is high
    risk above the mean of the models' standardized training medians.

    Writes OUT/predictions.csv (patient_id, risk, risk_fold<k> for each model: its raw risk on
    the scale of the run's own predictions.csv, risk_group, surv_1..K: the ensemble survival
    curve for a discrete head) and OUT/predict.json. With --labels (pathology_id, patient_id,
    t, e) also OUT/metrics.json (cindex with 95% bootstrap CI, td_auc, ibs, logrank_p,
    hazard_ratio with CI, n) and OUT/km.png; --labels also fixes each patient's slide order
    to the CSV's, as in training.

    Several processes: launch it with torchrun (torchrun --nproc-per-node=K --no-python -- dsca
    predict ...; the "--" keeps torchrun from taking --run for its own --run-path option).
    Rank r scores the patients at positions r, r+K, ... (nccl on GPUs, rank on cuda:LOCAL_RANK;
    gloo on CPUs) and rank 0 alone writes OUT: the same files as one process. A rank that
    fails stops every rank, its error named, and nothing is written.

    Exit status 0 on success, 2 when an input cannot be used or a rank failed (one line
    naming it)."""

EXAMPLES = """\
    dsca predict --run runs/brca --store external.zarr --out pred/external
    dsca predict --run runs/brca --store external.zarr --labels external.csv --out pred/external
    dsca predict --run runs/brca-final --store cohort.zarr --patients TCGA-A1-A0SB --out pred/one
    torchrun --nproc-per-node=4 --no-python -- dsca predict --run runs/brca --store external.zarr --device cuda --out pred/external
    """

log = logging.getLogger(__name__)


def add_apply_arguments(parser: argparse.ArgumentParser) -> None:
    """The options dsca predict and dsca heatmap share."""
    parser.add_argument("--run", required=True, type=Path, metavar="RUN", help="dsca train output folder")
    # a str, not a Path: FeatureStore.open takes URLs too, which Path would mangle (s3://b -> s3:/b)
    parser.add_argument("--store", required=True, metavar="STORE", help="feature store (dsca-store convert)")
    parser.add_argument("--out", required=True, type=Path, metavar="OUT", help="output folder")
    parser.add_argument("--labels", type=Path, metavar="CSV",
                        help="labels CSV (pathology_id, patient_id, t, e): patients and slide order (default: the "
                             "patients the store records, slides in store order)")
    parser.add_argument("--patients", nargs="+", metavar="ID", help="only these patients (default: all)")
    parser.add_argument("--models", nargs="+", metavar="NAME",
                        help="only these models of the run: fold0 fold3 ..., or final (default: all finished)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--workers", type=int, default=2, metavar="N",
                        help="loader processes reading the next patients")
    parser.add_argument("--allow-other-extractor", action="store_true",
                        help="accept a store whose features are recorded under another encoder name")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_apply_arguments(parser)
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                        help="bootstrap resamples of the C-index CI (with --labels)")


def run_guarded(name: str, work) -> int:
    """Run ``work()``; an input error becomes one line on stderr and exit status 2.

    Input errors are ValueErrors (ModelLoadError, PredictError, LabelError, ConfigError,
    WSIError), StoreError and missing files; anything else is a bug and keeps its traceback.
    """
    from dsca.cli._ranks import one_line
    from dsca.store import StoreError

    try:
        return work()
    except (StoreError, ValueError, FileNotFoundError) as err:
        log.debug("dsca %s failed", name, exc_info=True)
        print(f"dsca {name}: error: {one_line(err)}", file=sys.stderr)
        return 2


def run_ranks(name: str, device: str, work: Callable[[Distributed, str], int]) -> int:
    """Run ``work(ranks, device)`` on this rank of a torchrun launch.

    Errors as in :func:`run_guarded`, the line prefixed with the rank; a rank that fails
    leaves its error where the other ranks (and torchrun's summary) find it, and a rank that
    stops because another one failed (PeerFailed) names that rank and its error.
    """
    from dsca.cli._ranks import one_line, rank_logging, report_failure
    from dsca.store import StoreError
    from dsca.train import distributed

    ranks = distributed.SINGLE_PROCESS
    try:
        ranks, device = distributed.start(None, device)
        rank_logging(ranks)
        status = work(ranks, device)
    except (StoreError, ValueError, FileNotFoundError, distributed.PeerFailed) as err:
        log.debug("dsca %s failed", name, exc_info=True)
        report_failure(name, ranks, err, one_line(err))
        distributed.stop(ranks, failed=True)
        return 2
    except BaseException as err:  # a bug, Ctrl-C: the other ranks must still hear of it
        if ranks.active:
            report_failure(name, ranks, err, f"{type(err).__name__}: {err}")
        raise
    distributed.stop(ranks, failed=False)
    return status


def run(args: argparse.Namespace) -> int:
    from dsca.infer import predict_run
    from dsca.train import distributed

    def work(ranks: Distributed, device: str) -> int:
        found = predict_run(args.run, args.store, args.out, labels_csv=args.labels, patients=args.patients,
                            device=device, allow_other_extractor=args.allow_other_extractor,
                            n_boot=args.bootstrap, num_workers=args.workers, models=args.models,
                            distributed=ranks)
        if not ranks.is_main:  # every rank has the result; rank 0 prints it
            return 0
        line = f"scored {found['n']} patient(s); {args.out / 'predictions.csv'}"
        if "cindex" in found:
            line += (f"\nC-index {found['cindex']:.3f} [{found.get('cindex_ci_low', float('nan')):.3f}, "
                     f"{found.get('cindex_ci_high', float('nan')):.3f}], td-AUC {found.get('td_auc', float('nan')):.3f}, "
                     f"IBS {found.get('ibs', float('nan')):.3f}, log-rank p {found['logrank_p']:.2g}, "
                     f"HR {found['hazard_ratio']:.2f}; {args.out / 'metrics.json'}")
        print(line)
        return 0

    if distributed.launched_by_torchrun():
        return run_ranks("predict", args.device, work)
    return run_guarded("predict", lambda: work(distributed.SINGLE_PROCESS, args.device))
