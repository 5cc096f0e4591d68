"""`dsca-store info`: what a store holds, in a few lines."""
from __future__ import annotations

import argparse
from pathlib import Path

from dsca.cli._common import print_to_stderr

HELP = "slides, patches, dims, dtype, bytes on disk, compression"

DESCRIPTION = ("What a store holds: slides (complete / incomplete), patients, patches, "
               "feature dim, dtype and codec in use, bytes on disk against the sources.")

EXAMPLES = "dsca-store info cohort.zarr"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", type=Path, help="the store")


def run(args: argparse.Namespace) -> int:
    from dsca.store.reader import StoreError
    from dsca.store.verify import store_info

    try:
        info = store_info(args.store)
    except StoreError as exc:
        print_to_stderr([f"error: {exc}"])
        return 2
    print("\n".join(info.lines()))
    return 0
