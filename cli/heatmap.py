"""`dsca heatmap`: DSCA's two-scale attention map per slide, on the slide."""
from __future__ import annotations

import argparse
from pathlib import Path

from dsca.cli.predict import add_apply_arguments, run_guarded

HELP = "two-scale attention maps per slide (x5 pooling x x20 CAPool), overlays, top-k tiles, GeoJSON"

DESCRIPTION = """\
    Attention heatmaps of a trained run at the x20 level's resolution.

    For every x5 patch, the global pooling attention (pool) times the CAPool attention of each
    of its 16 x20 sub-patches (cross, mean over heads) gives score, a map 4x finer than a
    heatmap of the x5 patches; each is averaged over the run's models. A patient's slides are
    scored together, as in training, then split back per slide.

    Writes per slide OUT/<slide_id>/: attention.csv (x, y: level-0 top-left corner of the
    sub-patch; block: row of its x5 patch in the slide; sub: 0..15 = 4*r + c; pool, cross,
    score), heatmap.png (x5 map beside the two-scale map), attention.geojson (sub-patch squares
    with the values as measurements, for QuPath) and topk.csv. With --wsi DIR, for a slide file
    DIR/<slide_id>.<ext> that OpenSlide reads: overlay.png (the map on the slide thumbnail) and
    the top-k sub-patches cut from the slide under topk/.

    Default: every slide of the store (a slide the store records no patient for is scored on
    its own), or of --patients, or of the patients in --labels. Exit status 0 on success, 2
    when an input cannot be used (before anything is written); a slide file OpenSlide cannot
    read only loses that slide's overlay and tiles (a warning)."""

EXAMPLES = """\
    dsca heatmap --run runs/brca --store cohort.zarr --out heat --slides TCGA-A1-A0SB-01Z-00-DX1
    dsca heatmap --run runs/brca --store cohort.zarr --out heat --patients TCGA-A1-A0SB --wsi slides/
    dsca heatmap --run runs/brca --store cohort.zarr --out heat --wsi slides/ --top-k 16
    """


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_apply_arguments(parser)
    parser.add_argument("--slides", nargs="+", metavar="ID", help="only these slides; their patients are scored (default: all slides)")
    parser.add_argument("--wsi", type=Path, metavar="DIR", help="folder of the slide files, any OpenSlide format (default: no overlays or tiles)")
    parser.add_argument("--top-k", type=int, default=8, metavar="K", help="highest-scoring sub-patches listed and cut")


def run(args: argparse.Namespace) -> int:
    from dsca.infer.heatmap import heatmap_run
    from dsca.train.distributed import launched_by_torchrun

    def work() -> int:
        if launched_by_torchrun():  # every rank would draw and write the same slides
            raise ValueError("dsca heatmap runs in one process; run it without torchrun")
        folders = heatmap_run(args.run, args.store, args.out, slides=args.slides, patients=args.patients,
                              labels_csv=args.labels, wsi_dir=args.wsi, top_k=args.top_k,
                              device=args.device, allow_other_extractor=args.allow_other_extractor,
                              num_workers=args.workers, models=args.models)
        print(f"{len(folders)} slide(s); {args.out}")
        return 0

    return run_guarded("heatmap", work)
