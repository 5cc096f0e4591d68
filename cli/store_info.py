"""`dsca-store info`: what a store holds, in a few lines."""
from __future__ import annotations

import argparse

from dsca.cli._common import print_to_stderr
from dsca.cli._store_options import add_storage_arguments, parse_storage_options

HELP = "slides, patches, dims, dtype, bytes on disk, compression"

DESCRIPTION = ("What a store holds: slides (complete / incomplete), patients, patches, "
               "feature dim, dtype and codec in use, bytes on disk against the sources.")

EXAMPLES = """
        dsca-store info cohort.zarr
        dsca-store info s3://bucket/cohort.zarr --storage-option endpoint_url=https://minio.example.org"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", help="the store: a folder or a URL (s3://bucket/cohort.zarr)")
    add_storage_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from dsca.store.reader import StoreError
    from dsca.store.verify import store_info

    try:
        info = store_info(args.store, parse_storage_options(args.storage_option))
    except StoreError as exc:
        print_to_stderr([f"error: {exc}"])
        return 2
    print("\n".join(info.lines()))
    return 0
