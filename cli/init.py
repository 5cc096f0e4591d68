"""`dsca init`: write a commented starter training config."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "write a commented starter config for dsca train (every key, its default and meaning)"

DESCRIPTION = """\
    Write a training config in YAML with every key that dsca train reads, at its default,
    each with a comment saying what it does. Edit it, then run dsca train --config on it.

    --store, --labels and --splits fill in the three required keys (placeholders otherwise);
    they are written as given, and dsca train reads relative paths against the config's
    folder. An existing file is kept unless --force is given."""

EXAMPLES = """\
    dsca init --out config.yaml
    dsca init --store cohort.zarr --labels labels.csv --splits "splits/labels-seed0-fold{}.npz" --out config.yaml
    """


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, metavar="YAML", help="config file to write")
    parser.add_argument("--store", metavar="DIR",
                        help="feature store (dsca-store convert); default: a placeholder to edit")
    parser.add_argument("--labels", metavar="CSV", help="labels CSV; default: a placeholder to edit")
    parser.add_argument("--splits", metavar="PATTERN",
                        help='split files, e.g. "splits/x-fold{}.npz"; default: a placeholder to edit')
    parser.add_argument("--force", action="store_true", help="replace an existing file")


def run(args: argparse.Namespace) -> int:
    from dsca.atomic import atomic_write
    from dsca.config import starter_config

    if args.out.exists() and not args.force:
        print(f"dsca init: error: {args.out} exists; pass --force to replace it", file=sys.stderr)
        return 2
    if not args.out.parent.is_dir():
        print(f"dsca init: error: {args.out.parent} is not a folder", file=sys.stderr)
        return 2
    with atomic_write(args.out) as f:
        f.write(starter_config(args.store, args.labels, args.splits))
    print(f"wrote {args.out}; edit it, then: dsca train --config {args.out} --out RUN_DIR")
    return 0
