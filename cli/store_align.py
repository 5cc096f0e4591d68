"""`dsca-store align`: level-2 coords -> the aligned level-1 coords of DSCA's x20 stream."""
from __future__ import annotations

import argparse
from pathlib import Path

from dsca.cli._common import print_to_stderr
from dsca.cli._store_options import parse_level_attrs_option

HELP = "level-2 coords -> aligned level-1 coords (16 per patch, CLAM layout)"

DESCRIPTION = """
        Write the level-1 coordinates that DSCA's x20 stream needs: for each level-2 (x5) patch
        of CLAM's patching output, its 4x4 block of level-1 patches, 16 rows per x5 patch in
        row-major order, at level-0 offsets (c, r) * patch_size * downsample(level 1).
        Run CLAM's feature extraction on the written folder to get the x20 features.
        Output: DIR_L1/patches/<slide>.h5 (CLAM's layout and attrs) + the process list."""

EXAMPLES = """
        dsca-store align --coords CLAM/tiles-l2-s256 --out CLAM/tiles-l1-s256
        # coords files of another tool that lack CLAM's level attrs:
        dsca-store align --coords tiles/ --out tiles-l1/ --attrs patch_size=256,patch_level=2,downsample=16"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--coords", required=True, type=Path, help="DIR_L2: CLAM save dir (with patches/) or patches/")
    parser.add_argument("--out", required=True, type=Path, help="DIR_L1 to write patches/<slide>.h5 into")
    parser.add_argument("--level", type=int, default=1, help="target pyramid level")
    parser.add_argument("--attrs", metavar="K=V,...",
                        help="patch_size, patch_level, downsample for coords files without them (default: none; never guessed)")


def run(args: argparse.Namespace) -> int:
    from dsca.store.align import align_dir
    from dsca.store.clam import ClamError

    try:
        report = align_dir(args.coords, args.out, level=args.level, progress=not args.quiet,
                           given=parse_level_attrs_option(args.attrs, "--attrs"))
    except ClamError as exc:
        print_to_stderr([f"error: {exc}"])
        return 2
    print(f"aligned {report.written} slides -> {Path(args.out) / 'patches'}")
    print_to_stderr([f"{sid}: {reason}" for sid, reason in report.failures])
    return 0 if report.ok else 1
