"""`dsca train`: cross-validated survival training from a YAML config."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dsca.cli._ranks import one_line, rank_logging, report_failure

HELP = "train and evaluate DSCA with k-fold cross-validation (reference YAML + store/labels/splits)"

DESCRIPTION = """\
    Train and evaluate DSCA survival models with k-fold cross-validation.

    Reads a YAML config with the reference study's keys (model, optimiser, epochs, ...) that
    names the feature store (dsca-store convert), the labels CSV (pathology_id, patient_id, t,
    e) and the split files (one .npz per fold: a path pattern with "{}" for the fold number,
    e.g. splits/brca-fold{}.npz, as dsca split writes them, or a list of paths).
    Every fold's inputs are checked before anything is written.

    Writes into the output folder: metrics.json (summary + per-fold metrics), predictions.csv,
    train.log, config.yaml (the parsed config), run.json (run id + config), training_curves.png,
    km_test.png (each fold's test patients split at its model's median training risk), and
    per fold fold<k>/best.pt, fold<k>/last.pt (resumable) and fold<k>/result.json.

    --final trains one model on every labelled patient instead (for deployment), for the
    median best epoch of a cross-validation run (--cv-run) or --epochs; it writes
    final/best.pt, which dsca predict and dsca heatmap apply like a run's fold models.

    Several processes: launch it with torchrun (torchrun --nproc-per-node=K [--nnodes ...]
    --no-python dsca train ...); nccl on GPUs (rank on cuda:LOCAL_RANK), gloo on CPUs.
    --parallel data (the default) splits every optimizer step's patients across the ranks
    and sums their gradients: the same model as one process (up to float rounding);
    --parallel folds gives each rank whole folds (small cohorts: 5 folds on 5 GPUs; the
    output folder must then be on a file system every rank sees). Only rank 0 writes the
    run's files; a rank that fails stops every rank, its error named.

    A new run needs an empty --out; --resume continues the run there (the config must be
    the same; running other folds into it adds them, and metrics.json then covers every
    finished fold), --overwrite replaces it. Start from the commented config that
    `dsca init` writes.

    Exit status 0 on success, 1 when a fold failed (its model produced NaN/inf; the other
    folds are still trained and reported), 2 when an input cannot be used (config, labels,
    splits, a checkpoint, the output folder, or a damaged store: one line naming the file)."""

EXAMPLES = """\
    dsca train --config config.yaml --out runs/brca
    dsca train --config config.yaml --out runs/brca --folds 0,1 --device cuda
    dsca train --config config.yaml --out runs/brca --resume    # after an interruption
    dsca train --config config.yaml --out runs/brca --resume --folds 3,4   # add folds
    dsca train --config config.yaml --out runs/brca-final --final --cv-run runs/brca
    torchrun --nproc-per-node=4 --no-python dsca train --config config.yaml --out runs/brca
    torchrun --nproc-per-node=5 --no-python dsca train --config config.yaml --out runs/brca --parallel folds
    dsca init --out config.yaml                                 # a commented starter config
    """

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path, metavar="YAML",
                        help="training config (reference keys); relative paths in it are resolved "
                             "against its folder")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="output folder (default: the config's save_path)")
    parser.add_argument("--folds", metavar="K[,K...]",
                        help="comma-separated fold numbers, e.g. 0,1 (default: the config's folds)")
    parser.add_argument("--device", metavar="DEVICE",
                        help="cpu, cuda, cuda:N or auto (default: the config's device, else auto)")
    parser.add_argument("--parallel", choices=("data", "folds"),
                        help="under torchrun: split each optimizer step's patients across the ranks "
                             "(data, the default) or give each rank whole folds (folds); ignored "
                             "without torchrun")
    final = parser.add_argument_group("final model")
    final.add_argument("--final", action="store_true",
                       help="train one model on all labelled patients (no validation, no early stop)")
    final.add_argument("--cv-run", type=Path, metavar="RUN",
                       help="with --final: train for the median best epoch of this cross-validation run "
                            "(default: none; give it or --epochs)")
    final.add_argument("--epochs", type=int, metavar="N", help="with --final: train for N epochs (default: none; give it or --cv-run)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue the run in --out with the same config: finished folds are "
                           "kept, the running fold continues from its last epoch, other --folds "
                           "are added to the run")
    mode.add_argument("--overwrite", action="store_true",
                      help="replace the run in --out (only the files a run writes are removed)")


def _train_final(args: argparse.Namespace, cfg, out: Path) -> int:
    """--final: the checks of its options, then the training (errors go to :func:`run`)."""
    from dsca.config import ConfigError
    from dsca.train.final import cv_best_epochs, train_final

    if not args.final:
        raise ConfigError("--cv-run and --epochs only apply with --final")
    if args.resume or args.folds is not None:
        raise ConfigError("--final trains one model from the beginning: --resume and --folds do not apply")
    if (args.cv_run is None) == (args.epochs is None):
        raise ConfigError("--final needs exactly one of --cv-run RUN (its median best epoch) or --epochs N")
    if args.cv_run is not None:
        epochs, best = cv_best_epochs(args.cv_run)
        source = f"median best epoch of {args.cv_run} (folds: {', '.join(map(str, best))})"
    else:
        epochs, source = args.epochs, "--epochs"
    from dsca.train import FoldFailed

    try:
        result = train_final(cfg, out, epochs, device=args.device, overwrite=args.overwrite,
                             epochs_from=source)
    except FoldFailed as err:
        print(f"dsca train: error: {err}", file=sys.stderr)
        return 1
    print(f"final model: {result['n_patients']} patients, {epochs} epochs ({source}); training "
          f"C-index {result['train']['cindex']:.3f}; {Path(out) / 'final' / 'best.pt'}")
    return 0


def run(args: argparse.Namespace) -> int:
    from dsca.config import ConfigError, load_config, parse_folds
    from dsca.store import StoreError
    from dsca.train import distributed, train_cross_validation

    ranks = distributed.SINGLE_PROCESS
    try:
        folds = parse_folds(args.folds, "--folds") if args.folds is not None else None
        cfg = load_config(args.config)
        out = args.out or cfg.save_path
        if out is None:
            raise ConfigError(f"{args.config}: no output directory: pass --out or set save_path")
        final = args.final or args.cv_run is not None or args.epochs is not None
        if final and distributed.launched_by_torchrun():
            raise ConfigError("--final trains one model in one process; run it without torchrun")
        if final:
            return _train_final(args, cfg, out)
        ranks, device = distributed.start(args.parallel, args.device or cfg.device)
        if ranks.active:
            rank_logging(ranks)
        report = train_cross_validation(cfg, out, folds=folds, device=device, resume=args.resume,
                                        overwrite=args.overwrite, distributed=ranks)
    # ConfigError and LabelError are ValueErrors; StoreError: a slide that cannot be read (a
    # damaged chunk found mid-run, possibly in a DataLoader worker); PeerFailed: another rank
    except (StoreError, ValueError, KeyError, FileNotFoundError, RuntimeError) as err:
        log.debug("dsca train failed", exc_info=True)  # the traceback with -v
        report_failure("train", ranks, err, one_line(err))
        distributed.stop(ranks, failed=True)
        return 2
    except OSError as err:  # a full disk, no permission, a file where a folder should be
        log.debug("dsca train failed", exc_info=True)
        where = f"{err.filename}: " if err.filename else ""
        report_failure("train", ranks, err, f"{where}{err.strerror or err}")
        distributed.stop(ranks, failed=True)
        return 2
    except BaseException as err:  # a bug, Ctrl-C: the other ranks must still hear of it
        if ranks.active:
            report_failure("train", ranks, err, f"{type(err).__name__}: {err}")
        raise
    distributed.stop(ranks, failed=False)
    s = report["summary"]
    if not ranks.is_main:  # every rank has the report; rank 0 prints it
        return 1 if s["n_folds_failed"] else 0
    mean, std = s["test_cindex_mean"], s["test_cindex_std"]
    print(f"test C-index {mean:.3f} +- {std:.3f} over {s['n_folds']} fold(s); outputs in {out}")
    for failed in s.get("failed_folds", []):
        print(f"dsca train: error: fold {failed['fold']} failed: {failed['reason']}", file=sys.stderr)
    return 1 if s["n_folds_failed"] else 0
