"""`dsca-store finalize`: finish a store written by the shards of `convert --shard I/N`."""
from __future__ import annotations

import argparse

from dsca.cli._common import print_to_stderr
from dsca.cli._store_options import add_storage_arguments, parse_storage_options

HELP = "finish a store converted with --shard, once every shard is done"

DESCRIPTION = """
        Finish a store that the shards of 'dsca-store convert --shard I/N' wrote: remove what
        interrupted writes left, record the codec in use and consolidate the metadata, as a
        convert without --shard does at its end. Run it once, after every shard finished (it
        refuses a store that a shard or a convert is still writing); it converts or removes no
        slide, and running it again is harmless. Until then readers list the complete slides
        and verify reports the store as not finalized."""

EXAMPLES = """
        dsca-store finalize cohort.zarr
        dsca-store finalize s3://bucket/cohort.zarr
        # SLURM: after the job array of the shards
        sbatch --dependency=afterok:$ARRAY_JOB_ID --wrap 'dsca-store finalize cohort.zarr'"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", help="the store the shards wrote: a folder or a URL (s3://...)")
    add_storage_arguments(parser, staging=True)


def run(args: argparse.Namespace) -> int:
    from dsca.store.convert import ConvertError, finalize_store

    try:
        report = finalize_store(args.store, parse_storage_options(args.storage_option), args.staging)
    except ConvertError as exc:
        print_to_stderr([f"error: {exc}"])
        return 2
    if report.shards is None:
        print(f"{args.store}: was not waiting for finalize; metadata consolidated again "
              f"({report.slides} complete slides, {report.seconds:.1f} s)")
    else:
        shards = f"{report.shards} shards" if report.shards else "shards"
        print(f"finalized {args.store}: {report.slides} complete slides from {shards} ({report.seconds:.1f} s)")
    return 0
