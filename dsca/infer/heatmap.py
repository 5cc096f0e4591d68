"""``dsca heatmap``: DSCA's two-scale attention on the slide.

For x5 patch (block) ``i`` and its x20 sub-patch ``j`` (``j = 4 r + c`` inside the 4x4 block):

    pool_i     the global pooling attention of the block (the x5 map)
    cross_ij   the CAPool attention of the block's x5 query on sub-patch j, mean over heads
    score_ij = pool_i * cross_ij          (sums to 1 over a patient's sub-patches for gap pooling)

each averaged over the run's models. The score map has the x20 level's resolution: 4x finer
than a heatmap of the x5 patches. A patient's slides are scored together, as in training (the
pooling runs over all of them), and split back per slide.

    OUT/<slide_id>/attention.csv      x, y (level-0 top-left corner of the x20 sub-patch), block,
                                      sub, pool, cross, score: one row per sub-patch
    OUT/<slide_id>/heatmap.png        the x5 map and the two-scale map on the patch grid
    OUT/<slide_id>/attention.geojson  sub-patch squares with the three values as measurements
                                      (QuPath: File > Import objects)
    OUT/<slide_id>/topk.csv           the K highest-scoring sub-patches
    with --wsi, for a slide file found by slide id:
    OUT/<slide_id>/overlay.png        the score map on the slide's thumbnail (OpenSlide)
    OUT/<slide_id>/topk/<rank>.png    the top-K sub-patches cut from the slide
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from dsca.atomic import atomic_path, atomic_write
from dsca.coords import BLOCK, SCALE
from dsca.infer.apply import apply_models
from dsca.infer.models import RunModel
from dsca.infer.predict import PredictError, open_inputs

__all__ = ["ATTENTION_COLUMNS", "SlideAttention", "slide_attention", "heatmap_run", "slide_patients"]

log = logging.getLogger(__name__)

#: Columns of attention.csv, in order.
ATTENTION_COLUMNS = ("x", "y", "block", "sub", "pool", "cross", "score")
_THUMBNAIL = 1600  # px, longest side of the overlay's thumbnail
_TILE_PX = 256


@dataclass
class SlideAttention:
    """One slide's attention (see the module docstring).

    Attributes:
        slide_id: the slide.
        table: one row per sub-patch, :data:`ATTENTION_COLUMNS`; row ``16 i + j``.
        grid: [N, 2] the blocks' (col, row) on the slide's level-0 patch lattice (gaps kept,
            unlike the store's rank-compressed grid).
        sub_size: [2] level-0 size of one sub-patch.
    """

    slide_id: str
    table: pd.DataFrame
    grid: np.ndarray
    sub_size: np.ndarray


def slide_patients(store: Any, slide_ids: Sequence[str] | None, patients: Sequence[str] | None,
                   labels: pd.DataFrame | None, store_name: str) -> tuple[dict[str, list[str]], list[str]]:
    """(patient id -> every slide of the patient, the slides to draw).

    A slide the store records no patient for is its own patient.

    Raises:
        PredictError: an unknown slide or patient.
    """
    from dsca.infer.predict import select_patients

    if slide_ids:
        unknown = [s for s in slide_ids if s not in set(store.slide_ids)]
        if unknown:
            raise PredictError(f"{store_name}: no complete slide {', '.join(map(repr, unknown[:5]))}")
        owners = {s: store.slide_attrs(s).get("patient_id") for s in slide_ids}
        wanted_patients = sorted({str(p) for p in owners.values() if p is not None})
        mapping = select_patients(store, labels, wanted_patients, store_name) if wanted_patients else {}
        for s, pid in owners.items():
            if pid is None:
                mapping[s] = [s]
        _check_all_scored(mapping, slide_ids, labels.attrs.get("source", "labels") if labels is not None else store_name)
        return mapping, list(slide_ids)
    mapping = select_patients(store, labels, patients, store_name)
    return mapping, [s for slides in mapping.values() for s in slides]


def _check_all_scored(mapping: Mapping[str, Sequence[str]], slides: Sequence[str], labels_source: str) -> None:
    scored = {s for ss in mapping.values() for s in ss}
    left = [s for s in slides if s not in scored]
    if left:
        raise PredictError(f"{labels_source}: slide(s) {', '.join(left[:5])} are not among their "
                           "patients' slides there; leave out --labels or add them")


def slide_attention(models: Sequence[RunModel], store: str | Path, mapping: Mapping[str, Sequence[str]],
                    slides: Sequence[str], device: torch.device, num_workers: int = 2) -> Iterator[SlideAttention]:
    """Yield the attention of each of ``slides``, scoring each patient of ``mapping`` once."""
    from dsca.store import FeatureStore
    from dsca.store.align import block_offsets

    fs = FeatureStore.open(store)
    wanted = set(slides)
    todo = {p: s for p, s in mapping.items() if wanted & set(s)}
    for res in apply_models(models, store, todo, device, attention=True, num_workers=num_workers,
                            desc="heatmap"):
        if any("cross" not in a for a in res.attention or []):
            raise PredictError("the run's models have no CAPool attention (emb_x20_backbone: capool "
                               "with x20 features is needed for the two-scale map)")
        pool = torch.stack([a["pool"] for a in res.attention]).double()           # [M, N]
        cross = torch.stack([a["cross"].mean(dim=1) for a in res.attention]).double()  # [M, N, 16]
        score = (pool[:, :, None] * cross).mean(0)
        pool, cross = pool.mean(0), cross.mean(0)
        start = 0
        for sid, n in zip(res.slide_ids, res.lengths):
            rows = slice(start, start + n)
            start += n
            if sid not in wanted:
                continue
            attrs = fs.slide_attrs(sid)
            corners = fs.read_array(sid, "coords").astype(np.int64)                  # [n, 2]
            # the sub-patch corners exactly as dsca-store align places the x20 patches
            sub_ds = np.asarray(attrs["downsample"], dtype=np.float64) / SCALE
            offsets = block_offsets(int(attrs["patch_size"]), sub_ds)                # [16, 2]
            xy = corners[:, None, :] + offsets[None, :, :]
            table = pd.DataFrame({
                "x": xy[..., 0].ravel(), "y": xy[..., 1].ravel(),
                "block": np.repeat(np.arange(n), BLOCK), "sub": np.tile(np.arange(BLOCK), n),
                "pool": np.repeat(pool[rows].numpy(), BLOCK),
                "cross": cross[rows].numpy().ravel(), "score": score[rows].numpy().ravel(),
            }, columns=list(ATTENTION_COLUMNS))
            step = np.asarray(attrs["step"], dtype=np.int64)
            yield SlideAttention(sid, table, (corners - corners.min(axis=0)) // step,
                                 np.rint(int(attrs["patch_size"]) * sub_ds))


def heatmap_run(run: str | Path, store: str | Path, out: str | Path, *,
                slides: Sequence[str] | None = None, patients: Sequence[str] | None = None,
                labels_csv: str | Path | None = None, wsi_dir: str | Path | None = None,
                top_k: int = 8, device: str = "cpu", allow_other_extractor: bool = False,
                num_workers: int = 2, models: Sequence[str] | None = None) -> list[Path]:
    """Write every output of the module docstring for the chosen slides with the models of
    ``run`` (all, or those named in ``models``); returns the slides' folders.

    A slide file OpenSlide cannot read costs that slide its overlay and tiles (a warning), not
    the run.

    Raises:
        ModelLoadError, PredictError, StoreError, LabelError, WSIError (two files for one
        slide): before anything is written.
    """
    if top_k < 0:
        raise PredictError(f"--top-k must be >= 0, got {top_k}")
    if wsi_dir is not None and not Path(wsi_dir).is_dir():
        raise PredictError(f"--wsi {wsi_dir}: not a folder")
    inputs = open_inputs(run, store, out, device=device, models=models, labels_csv=labels_csv,
                         allow_other_extractor=allow_other_extractor)
    dest, dev, run_models = inputs.out, inputs.device, inputs.models
    mapping, chosen = slide_patients(inputs.store, slides, patients, inputs.labels, str(store))
    files = {sid: _slide_file(wsi_dir, sid) for sid in chosen}
    no_file = [sid for sid, f in files.items() if wsi_dir is not None and f is None]
    written = []
    for att in slide_attention(run_models, store, mapping, chosen, dev, num_workers):
        folder = dest / att.slide_id
        folder.mkdir(parents=True, exist_ok=True)
        _remove_own_images(folder)
        with atomic_write(folder / "attention.csv") as f:
            att.table.to_csv(f, index=False)
        _write_geojson(folder / "attention.geojson", att)
        top = att.table.sort_values("score", ascending=False, kind="stable").head(top_k)
        tiles = [""] * len(top)
        if files[att.slide_id] is not None:
            from dsca.wsi import WSIError

            try:
                tiles = _write_overlay_and_tiles(folder, att, top, files[att.slide_id])
            except WSIError as err:
                log.warning("%s: no overlay or tiles: %s", att.slide_id, err)
        topk = top.assign(rank=np.arange(1, len(top) + 1), tile=tiles)
        with atomic_write(folder / "topk.csv") as f:
            topk[["rank", *ATTENTION_COLUMNS, "tile"]].to_csv(f, index=False)
        from dsca.plots import plot_attention_maps

        plot_attention_maps(att.grid, att.table["pool"].to_numpy().reshape(-1, BLOCK)[:, 0],
                            att.table["score"].to_numpy().reshape(-1, BLOCK), folder / "heatmap.png",
                            title=f"{att.slide_id}: attention of {len(run_models)} model(s) of {Path(run).name}")
        written.append(folder)
    if no_file:
        log.warning("%s: no slide file for %d slide(s) (%s); their overlays and tiles are skipped",
                    wsi_dir, len(no_file), ", ".join(no_file[:5]))
    return written


def _slide_file(wsi_dir: str | Path | None, slide_id: str) -> Path | None:
    if wsi_dir is None:
        return None
    from dsca.wsi import find_slide_file

    return find_slide_file(Path(wsi_dir), slide_id)


def _remove_own_images(folder: Path) -> None:
    """Drop the overlay and tiles of an earlier heatmap of this slide (a rerun without --wsi
    or with another --top-k must not leave them beside the new table)."""
    import re

    (folder / "overlay.png").unlink(missing_ok=True)
    tiles = folder / "topk"
    if tiles.is_dir() and not tiles.is_symlink():
        for tile in tiles.iterdir():
            if re.fullmatch(r"\d{3}_x-?\d+_y-?\d+\.png", tile.name) and tile.is_file():
                tile.unlink()


def _write_geojson(path: Path, att: SlideAttention) -> None:
    """Sub-patch squares in level-0 pixels, their values as QuPath measurements."""
    w, h = (float(v) for v in att.sub_size)
    features = []
    for row in att.table.itertuples(index=False):
        x, y = float(row.x), float(row.y)
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon",
                         "coordinates": [[[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]]},
            "properties": {"objectType": "tile", "name": f"block {row.block} sub {row.sub}",
                           "measurements": {"pool": row.pool, "cross": row.cross, "score": row.score}},
        })
    with atomic_write(path) as f:
        json.dump({"type": "FeatureCollection", "features": features}, f)


def _write_overlay_and_tiles(folder: Path, att: SlideAttention, top: pd.DataFrame, slide_file: Path) -> list[str]:
    """overlay.png and the top-k tiles from the slide file; returns the tiles' relative paths."""
    from PIL import Image

    from dsca.plots import plot_overlay
    from dsca.wsi import SlideImage

    with SlideImage.open(slide_file) as slide:
        thumb, scale = slide.thumbnail(_THUMBNAIL)
        plot_overlay(thumb, scale, att.table[["x", "y"]].to_numpy(float), att.sub_size,
                     att.table["score"].to_numpy(), folder / "overlay.png",
                     title=f"{att.slide_id}: two-scale attention on {slide_file.name}")
        (folder / "topk").mkdir(exist_ok=True)
        tiles = []
        for rank, row in enumerate(top.itertuples(index=False), start=1):
            tile = slide.read_region(float(row.x), float(row.y), float(att.sub_size[0]), _TILE_PX)
            name = f"topk/{rank:03d}_x{int(row.x)}_y{int(row.y)}.png"
            with atomic_path(folder / name) as tmp:
                Image.fromarray(tile).save(tmp, format="PNG")
            tiles.append(name)
    return tiles
