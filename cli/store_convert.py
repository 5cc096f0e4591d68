"""`dsca-store convert`: validate CLAM outputs and pack them into a dsca-store/1 Zarr store."""
from __future__ import annotations

import argparse
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from dsca.cli._common import print_to_stderr
from dsca.cli._store_options import add_storage_arguments, parse_level_attrs_option, parse_storage_options

if TYPE_CHECKING:
    from dsca.store.convert import Shard

HELP = "validate CLAM outputs and pack them into STORE.zarr"

DESCRIPTION = """
        Validate every slide's CLAM files (coords, pt_files/h5_files at both levels, the 4x4
        alignment, values, level attrs) and pack the good ones into a dsca-store/1 Zarr store:
        slides/<slide>/{x5, x20, coords, grid, grid_index}, one file per array, checksummed.
        A bad slide gets one line naming it, its file and the reason; the others are converted
        and the exit status is 1. Rerunning resumes: complete slides whose sources are
        unchanged are skipped, slides whose sources changed are converted again.

        On a cluster, --shard I/N converts a fixed 1/N of the slides (by a hash of the slide id),
        so N jobs (a job array) can write one store at once; run 'dsca-store finalize STORE'
        once all of them are done. A convert without --shard refuses a store while shards write it.

        Labels CSV: one row per slide with pathology_id (slide id, with or without a WSI
        extension such as .svs), patient_id, t (time) and e (1 = event, 0 = censored); other
        names via --labels-map, e.g. CLAM/PORPOISE tables:
        --labels-map slide=slide_id,patient=case_id,time=survival_months,censorship=censorship
        (censorship = 1 - event)."""

EXAMPLES = """
        dsca-store convert --x5-features FEATS/l2 --x20-features FEATS/l1 \\
            --x5-coords CLAM/tiles-l2-s256 --x20-coords CLAM/tiles-l1-s256 \\
            --labels labels.csv --out cohort.zarr --jobs 4
        # resume after a crash or Ctrl-C: the same command again
        # job I of a job array of 8 (SLURM: --shard $SLURM_ARRAY_TASK_ID/8), then once: dsca-store finalize cohort.zarr
        dsca-store convert ... --out cohort.zarr --shard 3/8
        # into S3 (credentials and endpoint from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL)
        dsca-store convert ... --out s3://bucket/cohort.zarr --staging /scratch/$USER"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dsca.store._layout import CODECS, DEFAULT_CODEC

    add = parser.add_argument
    add("--x5-features", required=True, type=Path, help="level-2 features: root, pt_files/ or h5_files/")
    add("--x20-features", required=True, type=Path, help="level-1 features: root, pt_files/ or h5_files/")
    add("--x5-coords", required=True, type=Path, help="level-2 coords dir (CLAM save dir or patches/)")
    add("--x20-coords", type=Path, help="level-1 coords dir; checks the 4x4 alignment (default: only against h5_files coords)")
    add("--out", required=True, help="the store to create or resume: a folder, or a URL (s3://bucket/cohort.zarr)")
    add("--labels", type=Path, help="labels CSV: slide -> patient (see above; default: slides without a patient id)")
    add("--labels-map", metavar="K=COL,...",
        help="label columns: slide=, patient=, time=, event= or censorship= (1 - event) "
             "(default: pathology_id, patient_id, t, e)")
    add("--dtype", choices=("float16", "float32"), default="float16", help="stored feature dtype")
    add("--codec", choices=CODECS, default=DEFAULT_CODEC, help="feature compression (README 'codecs')")
    add("--jobs", type=int, default=1, help="parallel processes")
    add("--overwrite", action="store_true", help="redo slides that are already complete (with --shard: its own)")
    add("--shard", metavar="I/N", type=_shard_option,
        help="convert only shard I of N (0 <= I < N) alongside the other shards; then run finalize "
             "(default: the whole cohort)")
    add("--extractor", help="feature extractor name to record (default: the x5 feature dir's name)")
    add("--x5-attrs", metavar="K=V,...",
        help="patch_size, patch_level, downsample for x5 coords files without them (default: none)")
    add("--x20-attrs", metavar="K=V,...",
        help="the same for x20 coords files (default: none)")
    add_storage_arguments(parser, staging=True)


def _shard_option(text: str) -> Shard:
    """--shard I/N as a Shard; argparse turns a bad value into a usage error naming the option."""
    from dsca.store.convert import Shard

    try:
        return Shard.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _sigterm_as_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SLURM's scancel/time limit and `timeout` stop a job like a Ctrl-C


def run(args: argparse.Namespace) -> int:
    from dsca.store.convert import ConvertError, convert_cohort

    signal.signal(signal.SIGTERM, _sigterm_as_keyboard_interrupt)
    try:
        report = convert_cohort(
            x5_features=args.x5_features, x20_features=args.x20_features, x5_coords=args.x5_coords,
            x20_coords=args.x20_coords, out=args.out, labels=args.labels, dtype=args.dtype,
            codec=args.codec, jobs=args.jobs, overwrite=args.overwrite, progress=not args.quiet,
            extractor=args.extractor, x5_attrs=parse_level_attrs_option(args.x5_attrs, "--x5-attrs"),
            x20_attrs=parse_level_attrs_option(args.x20_attrs, "--x20-attrs"), labels_map=args.labels_map,
            shard=args.shard, storage_options=parse_storage_options(args.storage_option), staging=args.staging,
        )
    except ConvertError as exc:
        print_to_stderr([f"error: {exc}"])
        return 2
    except KeyboardInterrupt:
        # slides finished so far are complete and consolidated; half-written ones were removed
        print_to_stderr([f"interrupted: rerun the same command to resume (complete slides in {args.out} are kept)"])
        return 130
    mb = report.source_bytes / 1e6
    again = f" ({len(report.reconverted)} again: sources changed)" if report.reconverted else ""
    shard = report.shard
    print(f"{f'shard {shard}: ' if shard else ''}"
          f"converted {len(report.converted)}{again}, skipped {len(report.skipped)} (already complete), "
          f"failed {len(report.failures)}, missing {len(report.missing)}; "
          f"{mb:.1f} MB of sources in {report.seconds:.1f} s ({mb / max(report.seconds, 1e-9):.0f} MB/s)"
          + (f"; once all {shard.count} shards are done: dsca-store finalize {args.out}" if shard else ""))
    print_to_stderr(report.lines())
    return 0 if report.ok else 1
