"""`dsca train`: cross-validated survival training from a YAML config."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

HELP = "train and evaluate DSCA with k-fold cross-validation (reference YAML + store/labels/splits)"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path, help="YAML config (reference keys)")
    parser.add_argument("--out", type=Path, help="output directory (default: the config's save_path)")
    parser.add_argument("--folds", help="comma-separated fold numbers, e.g. 0,1 (default: config)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: config, auto)")
    parser.add_argument("--resume", action="store_true",
                        help="skip finished folds and continue the running fold from its last epoch")


def run(args: argparse.Namespace) -> int:
    from dsca.config import ConfigError, load_config
    from dsca.train import train_cross_validation

    try:
        cfg = load_config(args.config)
        folds = [int(k) for k in args.folds.split(",")] if args.folds else None
        out = args.out or cfg.save_path
        if out is None:
            raise ConfigError(f"{args.config}: no output directory: pass --out or set save_path")
        report = train_cross_validation(cfg, out, folds=folds, device=args.device, resume=args.resume)
    # ConfigError and LabelError are ValueErrors; a KeyError's message is its first argument
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"dsca train: error: {msg}", file=sys.stderr)
        return 2
    s = report["summary"]
    print(f"test C-index {s['test_cindex_mean']:.3f} +- {s['test_cindex_std']:.3f} "
          f"over {s['n_folds']} fold(s); outputs in {out}")
    return 0
