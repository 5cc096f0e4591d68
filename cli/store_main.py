"""`dsca-store`: pack CLAM outputs into a validated Zarr feature store, and look after it."""
from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from dsca.cli._common import add_verbosity, setup_logging

log = logging.getLogger("dsca.store")


def _fail(lines: list[str]) -> None:
    for line in lines:
        print(line, file=sys.stderr)


def _align(args: argparse.Namespace) -> int:
    from dsca.store.align import align_dir
    from dsca.store.clam import ClamError

    try:
        report = align_dir(args.coords, args.out, level=args.level, progress=not args.quiet)
    except ClamError as exc:
        _fail([f"error: {exc}"])
        return 2
    print(f"aligned {report.written} slides -> {Path(args.out) / 'patches'}")
    _fail([f"{sid}: {reason}" for sid, reason in report.failures])
    return 0 if report.ok else 1


def _convert(args: argparse.Namespace) -> int:
    from dsca.store.convert import ConvertError, convert_cohort

    try:
        report = convert_cohort(
            x5_features=args.x5_features, x20_features=args.x20_features, x5_coords=args.x5_coords,
            x20_coords=args.x20_coords, out=args.out, labels=args.labels, dtype=args.dtype,
            codec=args.codec, jobs=args.jobs, overwrite=args.overwrite, progress=not args.quiet,
            extractor=args.extractor,
        )
    except ConvertError as exc:
        _fail([f"error: {exc}"])
        return 2
    except KeyboardInterrupt:
        # slides finished so far are complete and consolidated; half-written ones were removed
        _fail([f"interrupted: rerun the same command to resume (complete slides in {args.out} are kept)"])
        return 130
    mb = report.source_bytes / 1e6
    print(f"converted {len(report.converted)}, skipped {len(report.skipped)} (already complete), "
          f"failed {len(report.failures)}, missing {len(report.missing)}; "
          f"{mb:.1f} MB of sources in {report.seconds:.1f} s ({mb / max(report.seconds, 1e-9):.0f} MB/s)")
    _fail(list(report.lines()))
    return 0 if report.ok else 1


def _info(args: argparse.Namespace) -> int:
    from dsca.store.reader import StoreError
    from dsca.store.verify import store_info

    try:
        info = store_info(args.store)
    except StoreError as exc:
        _fail([f"error: {exc}"])
        return 2
    print("\n".join(info.lines()))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from dsca.store.verify import verify_store

    report = verify_store(args.store, progress=not args.quiet)
    _fail([f"{sid}: {reason}" for sid, reason in report.problems])
    print(f"verified {report.slides} slides: {'ok' if report.ok else f'{len(report.problems)} problems'}")
    return 0 if report.ok else 1


def _synth(args: argparse.Namespace) -> int:
    from dsca.store.synth import SynthSpec, write_synthetic_cohort

    spec = SynthSpec(patients=args.patients, seed=args.seed, dim=args.dim, patches=args.patches,
                     signal=args.signal, censoring=args.censoring, h5_files=not args.no_h5)
    try:
        cohort = write_synthetic_cohort(args.out, spec, progress=not args.quiet)
    except ValueError as exc:
        _fail([f"error: {exc}"])
        return 2
    print(f"wrote {len(cohort.slide_ids)} slides of {spec.patients} patients to {cohort.root}")
    print(f"next: dsca-store convert --x5-features {cohort.x5_features} --x20-features {cohort.x20_features} "
          f"--x5-coords {cohort.x5_coords} --x20-coords {cohort.x20_coords} --labels {cohort.labels_csv} "
          f"--out {cohort.root / 'cohort.zarr'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from dsca.store._layout import CODECS, DEFAULT_CODEC

    parser = argparse.ArgumentParser(prog="dsca-store", description=__doc__.splitlines()[0])
    add_verbosity(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("align", help="level-2 coords -> aligned level-1 coords (16 per patch, CLAM layout)")
    p.add_argument("--coords", required=True, type=Path, help="DIR_L2: CLAM save dir (with patches/) or patches/")
    p.add_argument("--out", required=True, type=Path, help="DIR_L1 to write patches/<slide>.h5 into")
    p.add_argument("--level", type=int, default=1, help="target level (default 1)")
    p.set_defaults(_run=_align)

    p = sub.add_parser("convert", help="validate CLAM outputs and pack them into STORE.zarr")
    p.add_argument("--x5-features", required=True, type=Path, help="level-2 features: root, pt_files/ or h5_files/")
    p.add_argument("--x20-features", required=True, type=Path, help="level-1 features: root, pt_files/ or h5_files/")
    p.add_argument("--x5-coords", required=True, type=Path, help="level-2 coords dir (CLAM save dir or patches/)")
    p.add_argument("--x20-coords", type=Path, help="level-1 coords dir; checks the 4x4 alignment")
    p.add_argument("--out", required=True, type=Path, help="the store to create or resume")
    p.add_argument("--labels", type=Path, help="labels CSV (pathology_id, patient_id, ...)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--codec", choices=CODECS, default=DEFAULT_CODEC,
                   help=f"feature compression (default {DEFAULT_CODEC}, see README 'codecs')")
    p.add_argument("--jobs", type=int, default=1, help="parallel processes")
    p.add_argument("--overwrite", action="store_true", help="redo slides that are already complete")
    p.add_argument("--extractor", help="feature extractor name to record (default: the x5 feature dir's name)")
    p.set_defaults(_run=_convert)

    p = sub.add_parser("info", help="slides, patches, dims, dtype, bytes on disk, compression")
    p.add_argument("store", type=Path)
    p.set_defaults(_run=_info)

    p = sub.add_parser("verify", help="read every chunk: checksums, shapes, alignment, completeness")
    p.add_argument("store", type=Path)
    p.set_defaults(_run=_verify)

    p = sub.add_parser("synth", help="write a CLAM-format synthetic cohort with a planted signal")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--patients", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--patches", type=int, default=90, help="mean low-res patches per slide")
    p.add_argument("--signal", type=float, default=1.5, help="log-hazard ratio per SD of the tumour-motif rate")
    p.add_argument("--censoring", type=float, default=0.35, help="target censored fraction")
    p.add_argument("--no-h5", action="store_true", help="write pt_files/ only")
    p.set_defaults(_run=_synth)
    for action in sub.choices.values():
        add_verbosity(action, subcommand=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args)
    # zarr warns on every consolidated-metadata use; the store relies on it knowingly
    warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
