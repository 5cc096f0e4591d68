"""`dsca split`: stratified k-fold patient splits in the reference's .npz format."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "write stratified (event x time bin) k-fold train/val/test splits as .npz files"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--labels", required=True, type=Path, help="label CSV (pathology_id, patient_id, t, e)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="share of the non-test patients used for validation (default 0.2)")
    parser.add_argument("--bins", type=int, default=4, help="time bins used for stratification")
    parser.add_argument("--prefix", help="file prefix (default: <labels stem>-seed<S>)")


def run(args: argparse.Namespace) -> int:
    from dsca.labels import LabelError, load_labels
    from dsca.splits import make_splits, write_splits

    try:
        labels = load_labels(args.labels, bins=args.bins)
        splits = make_splits(labels, folds=args.folds, seed=args.seed, val_fraction=args.val_fraction)
        prefix = args.prefix or f"{args.labels.stem}-seed{args.seed}"
        paths = write_splits(splits, args.out, prefix)
    except LabelError as err:
        print(f"dsca split: error: {err}", file=sys.stderr)
        return 2
    print(f"{'fold':>4} {'train':>6} {'val':>5} {'test':>5} {'test events':>11}  file")
    for k, (split, path) in enumerate(zip(splits, paths)):
        n_ev = int(labels.loc[split.test, "e"].sum())
        print(f"{k:>4} {len(split.train):>6} {len(split.val):>5} {len(split.test):>5} {n_ev:>11}  {path}")
    return 0
