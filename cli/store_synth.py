"""`dsca-store synth`: a synthetic cohort in CLAM's layout, for trying the pipeline and for tests."""
from __future__ import annotations

import argparse
from pathlib import Path

from dsca.cli._common import print_to_stderr

HELP = "write a CLAM-format synthetic cohort with a planted signal"

DESCRIPTION = """
        Write a synthetic cohort in CLAM's layout (coords at levels 2 and 1, pt_files/h5_files,
        labels CSV, 5-fold splits) whose risk depends on a motif that only both streams together
        recover; for trying the pipeline and for tests. The truth per slide (tissue type of each
        x5 patch, motif of each x20 row) goes to OUT/tissue/; with --wsi each slide is also drawn as
        a small pyramidal TIFF that OpenSlide and slide viewers open."""

EXAMPLES = """
        dsca-store synth --out synth --patients 100
        dsca-store synth --out synth-small --patients 20 --dim 32 --patches 24 --no-h5
        dsca-store synth --out synth-wsi --patients 20 --dim 32 --wsi"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--out", required=True, type=Path, help="folder to write the cohort into")
    add("--patients", type=int, default=100, help="number of patients")
    add("--seed", type=int, default=0, help="random seed (everything is deterministic)")
    add("--dim", type=int, default=128, help="feature dimension")
    add("--patches", type=int, default=90, help="mean low-res patches per slide")
    add("--signal", type=float, default=1.5, help="log-hazard ratio per SD of the tumour-motif rate")
    add("--censoring", type=float, default=0.35, help="target censored fraction")
    add("--no-h5", action="store_true", help="write pt_files/ only")
    add("--wsi", action="store_true",
        help="also write a small pyramidal TIFF per slide under OUT/wsi/ (OpenSlide-readable)")


def run(args: argparse.Namespace) -> int:
    from dsca.store.synth import SynthSpec, write_synthetic_cohort

    spec = SynthSpec(patients=args.patients, seed=args.seed, dim=args.dim, patches=args.patches,
                     signal=args.signal, censoring=args.censoring, h5_files=not args.no_h5)
    try:
        cohort = write_synthetic_cohort(args.out, spec, progress=not args.quiet, wsi=args.wsi)
    except ValueError as exc:
        print_to_stderr([f"error: {exc}"])
        return 2
    print(f"wrote {len(cohort.slide_ids)} slides of {spec.patients} patients to {cohort.root}")
    if cohort.wsi_dir is not None:
        print(f"slide images: {cohort.wsi_dir}")
    print(f"next: dsca-store convert --x5-features {cohort.x5_features} --x20-features {cohort.x20_features} "
          f"--x5-coords {cohort.x5_coords} --x20-coords {cohort.x20_coords} --labels {cohort.labels_csv} "
          f"--out {cohort.root / 'cohort.zarr'}")
    return 0
