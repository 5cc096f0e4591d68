"""`dsca train`: cross-validated survival training from a YAML config."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

HELP = "train and evaluate DSCA with k-fold cross-validation (reference YAML + store/labels/splits)"

DESCRIPTION = """\
    Train and evaluate DSCA survival models with k-fold cross-validation.

    Reads a YAML config with the reference study's keys (model, optimiser, epochs, ...) that
    names the feature store (dsca-store convert), the labels CSV (pathology_id, patient_id, t,
    e) and the split files (one .npz per fold: a path pattern with "{}" for the fold number,
    e.g. splits/brca-fold{}.npz, as dsca split writes them, or a list of paths).
    Every fold's inputs are checked before anything is written.

    Writes into the output folder: metrics.json (summary + per-fold metrics), predictions.csv,
    train.log, config.yaml (the parsed config), training_curves.png, km_test.png, and per fold
    fold<k>/best.pt, fold<k>/last.pt (resumable) and fold<k>/result.json.

    Exit status 0 on success, 2 when an input cannot be used (config, labels, splits, or a
    damaged store: one line naming the slide and array)."""

EXAMPLES = """\
    dsca train --config config.yaml --out runs/brca
    dsca train --config config.yaml --out runs/brca --folds 0,1 --device cuda
    dsca train --config config.yaml --out runs/brca --resume    # after an interruption
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
    parser.add_argument("--resume", action="store_true",
                        help="skip finished folds and continue the running fold from its last epoch")


def _one_line(err: BaseException) -> str:
    """The error's own message, on one line.

    A DataLoader worker's exception comes back re-raised as the same type, but its message is
    "Caught X in DataLoader worker process N. Original Traceback ...": the original message is
    the last line of that traceback, after "module.X: ".
    """
    msg = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    if msg.startswith("Caught ") and "Original Traceback" in msg:
        last = [line for line in msg.splitlines() if line.strip()][-1]
        prefix = f"{type(err).__module__}.{type(err).__qualname__}: "
        for head in (prefix, f"{type(err).__qualname__}: "):
            if last.startswith(head):
                last = last[len(head):]
                break
        msg = last
        if isinstance(err, KeyError) and len(msg) >= 2 and msg[0] == msg[-1] and msg[0] in "'\"":
            msg = msg[1:-1]  # a KeyError's str() is its repr
    return " ".join(msg.split())


def run(args: argparse.Namespace) -> int:
    from dsca.config import ConfigError, load_config
    from dsca.store import StoreError
    from dsca.train import train_cross_validation

    try:
        cfg = load_config(args.config)
        folds = [int(k) for k in args.folds.split(",")] if args.folds else None
        out = args.out or cfg.save_path
        if out is None:
            raise ConfigError(f"{args.config}: no output directory: pass --out or set save_path")
        report = train_cross_validation(cfg, out, folds=folds, device=args.device, resume=args.resume)
    # ConfigError and LabelError are ValueErrors; StoreError: a slide that cannot be read (a
    # damaged chunk found mid-run, possibly in a DataLoader worker)
    except (StoreError, ValueError, KeyError, FileNotFoundError, RuntimeError) as err:
        log.debug("dsca train failed", exc_info=True)  # the traceback with -v
        print(f"dsca train: error: {_one_line(err)}", file=sys.stderr)
        return 2
    s = report["summary"]
    print(f"test C-index {s['test_cindex_mean']:.3f} +- {s['test_cindex_std']:.3f} "
          f"over {s['n_folds']} fold(s); outputs in {out}")
    return 0
