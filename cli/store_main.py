"""`dsca-store`: pack CLAM outputs into a validated Zarr feature store, and look after it."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import warnings
from pathlib import Path

from dsca.cli._common import HelpFormatter, add_subcommand, add_verbosity, setup_logging

log = logging.getLogger("dsca.store")


def _fail(lines: list[str]) -> None:
    for line in lines:
        print(line, file=sys.stderr)


def _level_attrs(text: str | None, option: str) -> dict | None:
    from dsca.store.clam import ClamError, parse_level_attrs

    try:
        return parse_level_attrs(text)
    except ClamError as exc:  # a usage error: exit 2, as argparse's own
        print(f"dsca-store: error: {option}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _align(args: argparse.Namespace) -> int:
    from dsca.store.align import align_dir
    from dsca.store.clam import ClamError

    try:
        report = align_dir(args.coords, args.out, level=args.level, progress=not args.quiet,
                           given=_level_attrs(args.attrs, "--attrs"))
    except ClamError as exc:
        _fail([f"error: {exc}"])
        return 2
    print(f"aligned {report.written} slides -> {Path(args.out) / 'patches'}")
    _fail([f"{sid}: {reason}" for sid, reason in report.failures])
    return 0 if report.ok else 1


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SLURM's scancel/time limit and `timeout` stop a job like a Ctrl-C


def _convert(args: argparse.Namespace) -> int:
    from dsca.store.convert import ConvertError, convert_cohort

    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        report = convert_cohort(
            x5_features=args.x5_features, x20_features=args.x20_features, x5_coords=args.x5_coords,
            x20_coords=args.x20_coords, out=args.out, labels=args.labels, dtype=args.dtype,
            codec=args.codec, jobs=args.jobs, overwrite=args.overwrite, progress=not args.quiet,
            extractor=args.extractor, x5_attrs=_level_attrs(args.x5_attrs, "--x5-attrs"),
            x20_attrs=_level_attrs(args.x20_attrs, "--x20-attrs"), labels_map=args.labels_map,
        )
    except ConvertError as exc:
        _fail([f"error: {exc}"])
        return 2
    except KeyboardInterrupt:
        # slides finished so far are complete and consolidated; half-written ones were removed
        _fail([f"interrupted: rerun the same command to resume (complete slides in {args.out} are kept)"])
        return 130
    mb = report.source_bytes / 1e6
    again = f" ({len(report.reconverted)} again: sources changed)" if report.reconverted else ""
    print(f"converted {len(report.converted)}{again}, skipped {len(report.skipped)} (already complete), "
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

    report = verify_store(args.store, progress=not args.quiet, sources=args.sources)
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

    parser = argparse.ArgumentParser(
        prog="dsca-store", description=__doc__.splitlines()[0], formatter_class=HelpFormatter,
        epilog="typical run: synth or CLAM -> align -> (CLAM feature extraction) -> convert -> verify -> info; "
               "'dsca-store COMMAND --help' shows each step with an example")
    add_verbosity(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = add_subcommand(sub, "align", help="level-2 coords -> aligned level-1 coords (16 per patch, CLAM layout)",
                       description="""
        Write the level-1 coordinates that DSCA's x20 stream needs: for each level-2 (x5) patch
        of CLAM's patching output, its 4x4 block of level-1 patches, 16 rows per x5 patch in
        row-major order, at level-0 offsets (c, r) * patch_size * downsample(level 1).
        Run CLAM's feature extraction on the written folder to get the x20 features.
        Output: DIR_L1/patches/<slide>.h5 (CLAM's layout and attrs) + the process list.""",
                       examples="""
        dsca-store align --coords CLAM/tiles-l2-s256 --out CLAM/tiles-l1-s256
        # coords files of another tool that lack CLAM's level attrs:
        dsca-store align --coords tiles/ --out tiles-l1/ --attrs patch_size=256,patch_level=2,downsample=16""")
    p.add_argument("--coords", required=True, type=Path, help="DIR_L2: CLAM save dir (with patches/) or patches/")
    p.add_argument("--out", required=True, type=Path, help="DIR_L1 to write patches/<slide>.h5 into")
    p.add_argument("--level", type=int, default=1, help="target pyramid level")
    p.add_argument("--attrs", metavar="K=V,...",
                   help="patch_size, patch_level, downsample for coords files without them (default: none; never guessed)")
    p.set_defaults(_run=_align)

    p = add_subcommand(sub, "convert", help="validate CLAM outputs and pack them into STORE.zarr",
                       description="""
        Validate every slide's CLAM files (coords, pt_files/h5_files at both levels, the 4x4
        alignment, values, level attrs) and pack the good ones into a dsca-store/1 Zarr store:
        slides/<slide>/{x5, x20, coords, grid, grid_index}, one file per array, checksummed.
        A bad slide gets one line naming it, its file and the reason; the others are converted
        and the exit status is 1. Rerunning resumes: complete slides whose sources are
        unchanged are skipped, slides whose sources changed are converted again.

        Labels CSV: one row per slide with pathology_id (slide id, with or without a WSI
        extension such as .svs), patient_id, t (time) and e (1 = event, 0 = censored); other
        names via --labels-map, e.g. CLAM/PORPOISE tables:
        --labels-map slide=slide_id,patient=case_id,time=survival_months,censorship=censorship
        (censorship = 1 - event).""",
                       examples="""
        dsca-store convert --x5-features FEATS/l2 --x20-features FEATS/l1 \\
            --x5-coords CLAM/tiles-l2-s256 --x20-coords CLAM/tiles-l1-s256 \\
            --labels labels.csv --out cohort.zarr --jobs 4
        # resume after a crash or Ctrl-C: the same command again""")
    p.add_argument("--x5-features", required=True, type=Path, help="level-2 features: root, pt_files/ or h5_files/")
    p.add_argument("--x20-features", required=True, type=Path, help="level-1 features: root, pt_files/ or h5_files/")
    p.add_argument("--x5-coords", required=True, type=Path, help="level-2 coords dir (CLAM save dir or patches/)")
    p.add_argument("--x20-coords", type=Path, help="level-1 coords dir; checks the 4x4 alignment (default: only against h5_files coords)")
    p.add_argument("--out", required=True, type=Path, help="the store to create or resume")
    p.add_argument("--labels", type=Path, help="labels CSV: slide -> patient (see above; default: slides without a patient id)")
    p.add_argument("--labels-map", metavar="K=COL,...",
                   help="label columns: slide=, patient=, time=, event= or censorship= (1 - event) "
                        "(default: pathology_id, patient_id, t, e)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="stored feature dtype")
    p.add_argument("--codec", choices=CODECS, default=DEFAULT_CODEC, help="feature compression (README 'codecs')")
    p.add_argument("--jobs", type=int, default=1, help="parallel processes")
    p.add_argument("--overwrite", action="store_true", help="redo slides that are already complete")
    p.add_argument("--extractor", help="feature extractor name to record (default: the x5 feature dir's name)")
    p.add_argument("--x5-attrs", metavar="K=V,...",
                   help="patch_size, patch_level, downsample for x5 coords files without them (default: none)")
    p.add_argument("--x20-attrs", metavar="K=V,...",
                   help="the same for x20 coords files (default: none)")
    p.set_defaults(_run=_convert)

    p = add_subcommand(sub, "info", help="slides, patches, dims, dtype, bytes on disk, compression",
                       description="What a store holds: slides (complete / incomplete), patients, patches, "
                                   "feature dim, dtype and codec in use, bytes on disk against the sources.",
                       examples="dsca-store info cohort.zarr")
    p.add_argument("store", type=Path, help="the store")
    p.set_defaults(_run=_info)

    p = add_subcommand(sub, "verify", help="read every chunk: checksums, shapes, alignment, completeness",
                       description="""
        Read every chunk of every slide (crc32c checked), and check shapes, dtypes, the patch grid,
        missing chunk files and completeness; one line per problem, exit status 1 if any.
        With --sources, also check that each slide's source files are unchanged since convert.""",
                       examples="""
        dsca-store verify cohort.zarr
        dsca-store verify --sources cohort.zarr""")
    p.add_argument("store", type=Path, help="the store")
    p.add_argument("--sources", action="store_true",
                   help="also report slides whose source files changed or disappeared since convert")
    p.set_defaults(_run=_verify)

    p = add_subcommand(sub, "synth", help="write a CLAM-format synthetic cohort with a planted signal",
                       description="""
        Write a synthetic cohort in CLAM's layout (coords at levels 2 and 1, pt_files/h5_files,
        labels CSV, 5-fold splits) whose risk depends on a motif that only both streams together
        recover; for trying the pipeline and for tests.""",
                       examples="""
        dsca-store synth --out synth --patients 100
        dsca-store synth --out synth-small --patients 20 --dim 32 --patches 24 --no-h5""")
    p.add_argument("--out", required=True, type=Path, help="folder to write the cohort into")
    p.add_argument("--patients", type=int, default=100, help="number of patients")
    p.add_argument("--seed", type=int, default=0, help="random seed (everything is deterministic)")
    p.add_argument("--dim", type=int, default=128, help="feature dimension")
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
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:  # e.g. while the first command still imports torch
        _fail(["interrupted"])
        return 130


if __name__ == "__main__":
    sys.exit(main())
