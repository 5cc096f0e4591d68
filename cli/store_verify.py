"""`dsca-store verify`: read every chunk of a store and report each problem on one line."""
from __future__ import annotations

import argparse

from dsca.cli._common import print_to_stderr
from dsca.cli._store_options import add_storage_arguments, parse_storage_options

HELP = "read every chunk: checksums, shapes, alignment, completeness"

DESCRIPTION = """
        Read every chunk of every slide (crc32c checked), and check shapes, dtypes, the patch grid,
        missing chunk files and completeness; one line per problem, exit status 1 if any.
        With --sources, also check that each slide's source files are unchanged since convert."""

EXAMPLES = """
        dsca-store verify cohort.zarr
        dsca-store verify --sources cohort.zarr
        dsca-store verify s3://bucket/cohort.zarr"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", help="the store: a folder or a URL (s3://bucket/cohort.zarr)")
    add_storage_arguments(parser)
    parser.add_argument("--sources", action="store_true",
                        help="also report slides whose source files changed or disappeared since convert")


def run(args: argparse.Namespace) -> int:
    from dsca.store.verify import verify_store

    report = verify_store(args.store, progress=not args.quiet, sources=args.sources,
                          storage_options=parse_storage_options(args.storage_option))
    print_to_stderr([f"{sid}: {reason}" for sid, reason in report.problems])
    print(f"verified {report.slides} slides: {'ok' if report.ok else f'{len(report.problems)} problems'}")
    return 0 if report.ok else 1
