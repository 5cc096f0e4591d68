"""`dsca heatmap`: the two-scale attention map, checked against the store, the aligned x20
coordinates CLAM-style files hold, and the models' own attention."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from dsca.cli.dsca_main import main


def _csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, float_precision="round_trip")


@pytest.fixture(scope="module")
def multi_slide_patient(synth_store) -> tuple[str, list[str]]:
    from dsca.store import FeatureStore

    slides = FeatureStore.open(synth_store).patient_slides()
    pid = next(p for p, s in slides.items() if len(s) > 1)
    return pid, slides[pid]


@pytest.fixture(scope="module")
def heat(cv_run, synth_store, multi_slide_patient, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("heat")
    pid, _ = multi_slide_patient
    assert main(["-q", "heatmap", "--run", str(cv_run), "--store", str(synth_store), "--out", str(out),
                 "--patients", pid, "--top-k", "5", "--workers", "0"]) == 0
    return out


def test_rows_map_back_to_the_stores_coords_and_the_aligned_x20_files(heat, synth_store, synth_cohort,
                                                                      multi_slide_patient):
    from dsca.store import FeatureStore

    fs = FeatureStore.open(synth_store)
    for sid in multi_slide_patient[1]:
        table = _csv(heat / sid / "attention.csv")
        assert list(table.columns) == ["x", "y", "block", "sub", "pool", "cross", "score"]
        n = fs.n_patches(sid)
        assert len(table) == 16 * n
        np.testing.assert_array_equal(table["block"], np.repeat(np.arange(n), 16))
        np.testing.assert_array_equal(table["sub"], np.tile(np.arange(16), n))
        # the top-left sub-patch of each block is the x5 patch's own corner
        first = table[table["sub"] == 0]
        np.testing.assert_array_equal(first[["x", "y"]].to_numpy(), fs.read_slide(sid).coords)
        # every row is the x20 patch dsca-store align wrote for that block and position
        with h5py.File(synth_cohort.x20_coords / "patches" / f"{sid}.h5") as f:
            np.testing.assert_array_equal(table[["x", "y"]].to_numpy(), f["coords"][()])


def test_values_are_the_models_own_attention_averaged(heat, cv_run, synth_store, multi_slide_patient):
    from dsca.infer import load_run_models
    from dsca.store import FeatureStore, PatientDataset

    pid, slides = multi_slide_patient
    sample = PatientDataset(synth_store, {pid: slides})[0]
    pools, crosses, scores = [], [], []
    with torch.no_grad():
        for m in load_run_models(cv_run):
            _, attn = m.model(sample.x20[None], sample.x5[None], sample.coords[None], return_attention=True)
            pool, cross = attn["pool"][0].double(), attn["cross"][0].double().mean(dim=1)  # [N], [N, 16]
            pools.append(pool)
            crosses.append(cross)
            scores.append(pool[:, None] * cross)
    fs = FeatureStore.open(synth_store)
    lengths = [fs.n_patches(s) for s in slides]
    tables = [_csv(heat / s / "attention.csv") for s in slides]
    joined = pd.concat(tables, ignore_index=True)
    np.testing.assert_allclose(joined["pool"], np.repeat(torch.stack(pools).mean(0).numpy(), 16), rtol=1e-5)
    np.testing.assert_allclose(joined["cross"], torch.stack(crosses).mean(0).numpy().ravel(), rtol=1e-5)
    np.testing.assert_allclose(joined["score"], torch.stack(scores).mean(0).numpy().ravel(), rtol=1e-5)
    # scored together: the pooling attention sums to 1 over the patient's slides, not per slide
    assert joined["pool"].to_numpy().reshape(-1, 16)[:, 0].sum() == pytest.approx(1.0, abs=1e-5)
    assert all(t["score"].sum() < 0.999 for t in tables) and len(tables) == len(lengths) > 1
    for t in tables:
        np.testing.assert_allclose(t.groupby("block")["cross"].sum(), 1.0, atol=1e-5)


def test_geojson_topk_and_the_picture(heat, multi_slide_patient):
    sid = multi_slide_patient[1][0]
    table = _csv(heat / sid / "attention.csv")
    geo = json.loads((heat / sid / "attention.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) == len(table)
    feat, row = geo["features"][17], table.iloc[17]
    ring = np.asarray(feat["geometry"]["coordinates"][0])
    assert ring[0].tolist() == [row["x"], row["y"]] and ring[0].tolist() == ring[-1].tolist()
    side = ring[2] - ring[0]
    assert np.allclose(side, 256 * np.array([16.001219, 16.000924]) / 4, atol=0.5)  # one x20 patch
    assert feat["properties"]["measurements"] == pytest.approx(
        {"pool": row["pool"], "cross": row["cross"], "score": row["score"]})
    top = pd.read_csv(heat / sid / "topk.csv")
    assert len(top) == 5 and top["rank"].tolist() == [1, 2, 3, 4, 5]
    assert top["score"].is_monotonic_decreasing and top["score"].iloc[0] == pytest.approx(table["score"].max())
    assert top["tile"].isna().all()  # no --wsi: nothing cut
    assert (heat / sid / "heatmap.png").read_bytes()[:4] == b"\x89PNG"


def test_a_single_model_score_is_pool_times_cross(final_run, synth_store, tmp_path):
    from dsca.store import FeatureStore

    sid = FeatureStore.open(synth_store).slide_ids[0]
    assert main(["-q", "heatmap", "--run", str(final_run), "--store", str(synth_store), "--out",
                 str(tmp_path), "--slides", sid, "--workers", "0"]) == 0
    table = _csv(tmp_path / sid / "attention.csv")
    np.testing.assert_allclose(table["score"], table["pool"] * table["cross"], rtol=1e-12)
    assert sorted(p.name for p in tmp_path.iterdir()) == [sid]  # only the asked slide is drawn


def test_unknown_slides_and_models_without_capool_are_named(cv_run, synth_store, infer_config,
                                                            tmp_path, capsys):
    assert main(["-q", "heatmap", "--run", str(cv_run), "--store", str(synth_store), "--out",
                 str(tmp_path / "h"), "--slides", "NOT-A-SLIDE"]) == 2
    err = capsys.readouterr().err
    assert "NOT-A-SLIDE" in err and str(synth_store) in err
    assert not (tmp_path / "h").exists()
    from dsca.config import load_config
    from dsca.train import train_cross_validation

    cfg = infer_config("avg.yaml", emb_x20_backbone="avgpool", epochs=1, folds=[0])
    train_cross_validation(load_config(cfg), tmp_path / "avg")
    assert main(["-q", "heatmap", "--run", str(tmp_path / "avg"), "--store", str(synth_store), "--out",
                 str(tmp_path / "h"), "--patients", "SYN-0001", "--workers", "0"]) == 2
    assert "no CAPool attention" in capsys.readouterr().err


_TISSUE_RGB = np.array([(127, 63, 152), (235, 152, 190), (216, 196, 233)])  # tumour, stroma, other
_MOTIF_DARK = 180  # channel sum of the darkest pixel: the motif's dots are darker than any tissue


def test_with_slide_files_rows_land_on_their_tissue_and_motif_in_the_wsi(
        cv_run, synth_store, synth_cohort, multi_slide_patient, tmp_path):
    """attention.csv's level-0 corners, read through OpenSlide from the synthetic slide files,
    show each block's tissue type and exactly its motif sub-patches."""
    import shutil

    from dsca.store.synth_wsi import write_slide_images
    from dsca.wsi import SlideImage

    root = tmp_path / "cohort"  # a copy: the session's cohort stays as other tests expect it
    for part in ("tissue", "tiles-l2-s256"):
        shutil.copytree(synth_cohort.root / part, root / part)
    pid, slides = multi_slide_patient
    write_slide_images(root, slides, progress=False)
    out = tmp_path / "heat"
    assert main(["-q", "heatmap", "--run", str(cv_run), "--store", str(synth_store), "--out", str(out),
                 "--patients", pid, "--wsi", str(root / "wsi"), "--top-k", "3", "--workers", "0"]) == 0
    for sid in slides:
        table = _csv(out / sid / "attention.csv")
        truth = np.load(root / "tissue" / f"{sid}.npz")
        side = 256 * 16.001219 / 4
        with SlideImage.open(root / "wsi" / f"{sid}.tiff") as slide:
            for row in table.itertuples(index=False):
                tile = slide.read_region(row.x, row.y, side, 64).reshape(-1, 3).astype(int)
                tissue = np.argmin(np.abs(_TISSUE_RGB - np.median(tile, axis=0)).sum(axis=1))
                assert tissue == truth["types"][row.block], (sid, row.block, row.sub)
                assert (tile.sum(axis=1).min() < _MOTIF_DARK) == truth["motif"][row.block, row.sub]
        assert (out / sid / "overlay.png").read_bytes()[:4] == b"\x89PNG"
        top = pd.read_csv(out / sid / "topk.csv")
        for tile_name in top["tile"]:
            from PIL import Image

            assert Image.open(out / sid / tile_name).size == (256, 256)
