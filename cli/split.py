"""`dsca split`: stratified k-fold patient splits in the reference's .npz format."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "write stratified (event x time bin) k-fold train/val/test splits as .npz files"

DESCRIPTION = """\
    Write stratified k-fold patient splits in the reference study's .npz format.

    Reads a labels CSV (pathology_id, patient_id, t, e; one row per slide). Patients are
    stratified by event and time bin, fold k's test set is the k-th of k disjoint parts (the
    test sets partition the cohort) and a share of the remaining patients is held out for
    validation.

    Writes OUT/<prefix>-fold<k>.npz for k = 0..folds-1, each with train_patients, val_patients
    and test_patients, and prints patients and test events per fold. Give dsca train the
    pattern OUT/<prefix>-fold{}.npz as its splits."""

EXAMPLES = """\
    dsca split --labels labels.csv --out splits
    dsca split --labels labels.csv --out splits --folds 10 --seed 1 --prefix brca
    """


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--labels", required=True, type=Path, metavar="CSV",
                        help="labels CSV (pathology_id, patient_id, t, e)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder to write the .npz files into")
    parser.add_argument("--folds", type=int, default=5, metavar="K", help="number of folds")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (default: %(default)s)")
    parser.add_argument("--val-fraction", type=float, default=0.2, metavar="F",
                        help="share of the non-test patients used for validation")
    parser.add_argument("--bins", type=int, default=4, help="time bins used for stratification")
    parser.add_argument("--prefix", help="file name prefix (default: <labels stem>-seed<seed>)")


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
