"""Synthetic slide images: the recorded truth, the pyramidal TIFFs through real OpenSlide, and
the reader :mod:`dsca.wsi` that addresses them in CLAM coords."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import openslide
import pandas as pd
import pytest
import tifffile
import torch

from dsca.cli.store_main import main as store_main
from dsca.store.synth import SynthSpec, write_synthetic_cohort
from dsca.store.synth_wsi import write_slide_images
from dsca.wsi import SLIDE_SUFFIXES, SlideImage, WSIError, find_slide_file

# Low noise, so that the features name their tissue and motif rows without doubt. Seed 2 has
# all three tissues and motif blocks in each.
_SPEC = SynthSpec(patients=4, seed=2, dim=16, patches=12, noise=0.25, folds=2, h5_files=False)
_TUMOUR, _STROMA, _OTHER = 0, 1, 2


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    """The same spec written without and with slide images."""
    base = tmp_path_factory.mktemp("synth-wsi")
    plain = write_synthetic_cohort(base / "plain", _SPEC, progress=False)
    with_wsi = write_synthetic_cohort(base / "wsi", _SPEC, progress=False, wsi=True)
    return plain, with_wsi


@pytest.fixture(scope="module")
def cohort(cohorts):
    return cohorts[1]


def _truth(cohort, sid: str) -> dict[str, np.ndarray]:
    with np.load(cohort.root / "tissue" / f"{sid}.npz") as f:
        return {k: f[k] for k in f.files}


def _coords(folder: Path, sid: str) -> tuple[np.ndarray, dict]:
    with h5py.File(folder / "patches" / f"{sid}.h5", "r") as f:
        return f["coords"][()], dict(f["coords"].attrs)


def _tissue_of(rgb: np.ndarray) -> int:
    """H&E-like colour -> tissue, from the median pixel (blind to motif dots): tumour is dark
    purple, stroma pink (red over blue), other pale lilac (blue over red)."""
    r, g, b = np.median(rgb.reshape(-1, 3).astype(np.float64), axis=0)
    if (r + g + b) / 3 < 150:
        return _TUMOUR
    return _STROMA if r > b else _OTHER


def _dark_fraction(rgb: np.ndarray) -> float:
    """Share of blue-black (nuclei-like motif) pixels: red and green both very low."""
    return float(((rgb[..., 0] < 60) & (rgb[..., 1] < 60)).mean())


def test_wsi_option_changes_no_other_file(cohorts):
    plain, with_wsi = cohorts
    files = {p.relative_to(plain.root) for p in plain.root.rglob("*") if p.is_file()}
    wsi_files = {p.relative_to(with_wsi.root) for p in with_wsi.root.rglob("*") if p.is_file()}
    images = {Path("wsi") / f"{sid}.tiff" for sid in with_wsi.slide_ids}
    assert wsi_files == files | images and not files & images
    assert plain.wsi_dir is None and with_wsi.wsi_dir == with_wsi.root / "wsi"
    assert any(f.parts[0] == "tissue" for f in files) and any(f.parts[0] == "splits" for f in files)
    for rel in sorted(files):
        a, b = plain.root / rel, with_wsi.root / rel
        if rel.suffix == ".h5" and rel.parts[0].startswith("tiles-"):
            # coords files record their own folder (save_path); all else must be equal
            (ca, aa), (cb, ab) = _coords(a.parent.parent, a.stem), _coords(b.parent.parent, b.stem)
            np.testing.assert_array_equal(ca, cb)
            aa.pop("save_path"), ab.pop("save_path")
            assert aa.keys() == ab.keys() and all(np.array_equal(aa[k], ab[k]) for k in aa), rel
        else:
            assert a.read_bytes() == b.read_bytes(), rel


def test_tissue_truth_matches_features_and_coords(cohort):
    patterns = np.load(cohort.root / "patterns.npz")
    motif = patterns["motif"] / np.linalg.norm(patterns["motif"])
    n_motif = 0
    for sid in cohort.slide_ids:
        t = _truth(cohort, sid)
        coords, _ = _coords(cohort.x5_coords, sid)
        n = len(coords)
        assert t["types"].dtype == np.int8 and t["types"].shape == (n,)
        assert t["motif"].dtype == np.bool_ and t["motif"].shape == (n, 16)
        assert t["coords"].dtype == np.int64
        np.testing.assert_array_equal(t["coords"], coords)
        x5 = torch.load(cohort.x5_features / "pt_files" / f"{sid}.pt", weights_only=True).numpy()
        x20 = torch.load(cohort.x20_features / "pt_files" / f"{sid}.pt", weights_only=True).numpy()
        np.testing.assert_array_equal(np.argmax(x5 @ patterns["proto_x5"].T, axis=1), t["types"])
        # row 16*i + k of the x20 features is sub-patch k of patch i; the motif adds 3 along it
        np.testing.assert_array_equal((x20 @ motif).reshape(n, 16) > 1.5, t["motif"])
        assert set(t["motif"].sum(axis=1).tolist()) <= {0, _SPEC.motif_rows}
        n_motif += int(t["motif"].any(axis=1).sum())
    assert n_motif > 0


def test_tiff_is_an_openslide_generic_pyramid(cohort):
    for sid in cohort.slide_ids:
        path = cohort.wsi_dir / f"{sid}.tiff"
        _, attrs = _coords(cohort.x5_coords, sid)
        w, h = (int(v) for v in attrs["level_dim"])
        assert openslide.OpenSlide.detect_format(str(path)) == "generic-tiff"
        with openslide.OpenSlide(str(path)) as slide:
            assert slide.level_count == 3 and slide.dimensions == (w, h)
            np.testing.assert_allclose(slide.level_downsamples, [1, 4, 16], rtol=0.02)
            assert slide.properties["openslide.level[0].tile-width"] == "256"
            assert slide.properties["tiff.ImageDescription"].startswith("dsca-synth coords_downsample=")
            assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.25 * attrs["downsample"][0])
        with tifffile.TiffFile(path) as tif:
            for i, page in enumerate(tif.pages):
                assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE and page.tile == (256, 256)
                assert page.photometric == tifffile.PHOTOMETRIC.RGB and page.dtype == np.uint8
                assert page.subfiletype == (0 if i == 0 else 1)
        with SlideImage.open(path) as image:
            assert image.dimensions == (w, h)
            np.testing.assert_allclose(image.coords_downsample, attrs["downsample"], rtol=1e-9)
            np.testing.assert_allclose(image.extent(), np.array([w, h]) * attrs["downsample"])


def _read_sub_patches(image: SlideImage, corners: np.ndarray, sub: np.ndarray) -> list[np.ndarray]:
    """The central half of each sub-patch (corners [M, 2] level-0, side `sub` [2]), at 1 file px
    per output px."""
    half = float(sub.min()) / 2
    return [image.read_region(x + sub[0] / 2 - half / 2, y + sub[1] / 2 - half / 2, half, 32) for x, y in corners]


def test_every_sub_patch_shows_its_tissue_and_motif(cohort):
    """At the x20 coords that `align` wrote, each sub-patch has its tissue colour, and exactly
    the motif rows carry the dots; read at transposed positions (a wrong block order) they do not."""
    swapped_ok = []
    for sid in cohort.slide_ids:
        t = _truth(cohort, sid)
        x20, attrs = _coords(cohort.x20_coords, sid)
        sub = 256 * np.asarray(attrs["downsample"], dtype=np.float64)  # a sub-patch's level-0 side
        with SlideImage.open(cohort.wsi_dir / f"{sid}.tiff") as image:
            reads = _read_sub_patches(image, x20, sub)
            swapped = x20.reshape(-1, 4, 4, 2).transpose(0, 2, 1, 3).reshape(-1, 2)
            swapped_reads = _read_sub_patches(image, swapped, sub)
        tissue = np.array([_tissue_of(a) for a in reads]).reshape(-1, 16)
        dark = np.array([_dark_fraction(a) for a in reads]).reshape(-1, 16)
        np.testing.assert_array_equal(tissue, np.repeat(t["types"][:, None], 16, axis=1))
        assert dark[t["motif"]].min(initial=1.0) > 0.03 and dark[~t["motif"]].max(initial=0.0) == 0.0
        # motif sub-patches are darker than the plain ones of the same tissue
        lum = np.array([a.mean() for a in reads]).reshape(-1, 16)
        for k in range(3):
            m = t["motif"] & (t["types"] == k)[:, None]
            p = ~t["motif"] & (t["types"] == k)[:, None]
            if m.any() and p.any():
                assert lum[m].max() < lum[p].min() - 5
        swapped_dark = np.array([_dark_fraction(a) for a in swapped_reads]).reshape(-1, 16) > 0.03
        swapped_ok.append(np.array_equal(swapped_dark, t["motif"]))
    assert not all(swapped_ok)


def test_thumbnail_scale_maps_patch_centres_to_their_tissue(cohort):
    for sid in cohort.slide_ids:
        t = _truth(cohort, sid)
        _, attrs = _coords(cohort.x5_coords, sid)
        centres = t["coords"] + 128 * np.asarray(attrs["downsample"])
        with SlideImage.open(cohort.wsi_dir / f"{sid}.tiff") as image:
            thumb, scale = image.thumbnail(512)
        assert thumb.dtype == np.uint8 and thumb.ndim == 3 and thumb.shape[2] == 3 and max(thumb.shape) == 512
        np.testing.assert_allclose(scale * np.array(image.extent()), thumb.shape[1::-1], rtol=1e-9)
        px = np.floor(centres * scale).astype(np.int64)
        got = [_tissue_of(thumb[y - 1:y + 2, x - 1:x + 2]) for x, y in px]
        np.testing.assert_array_equal(got, t["types"])
        assert np.all(thumb[0, 0] == 255)  # background


def test_read_region_resamples_and_is_white_outside(cohort):
    sid = cohort.slide_ids[0]
    with SlideImage.open(cohort.wsi_dir / f"{sid}.tiff") as image:
        w, h = image.extent()
        np.testing.assert_array_equal(image.read_region(-5e4, -5e4, 1e4, 8), 255)
        corner = image.read_region(w - 1e3, h - 1e3, 2e3, 16)  # half of it lies past the slide
        assert corner.shape == (16, 16, 3) and np.all(corner[8:, 8:] == 255)
        whole = image.read_region(0, 0, max(w, h), 64)  # from the coarsest level
        assert whole.shape == (64, 64, 3) and whole.min() < 200 and whole.max() == 255
        with pytest.raises(ValueError, match="read_region needs"):
            image.read_region(0, 0, 0, 8)
    with pytest.raises(WSIError, match="closed"):
        image.read_region(0, 0, 100, 8)


def test_plain_tiff_has_coords_downsample_one(tmp_path):
    """A TIFF without the synthetic description is a real slide: coords are its own px."""
    rgb = np.full((300, 400, 3), 200, dtype=np.uint8)
    rgb[100:200, 100:300] = (120, 40, 140)
    path = tmp_path / "real.tif"
    tifffile.imwrite(path, rgb, tile=(256, 256), photometric="rgb", compression="zlib")
    with SlideImage.open(path) as image:
        assert image.coords_downsample == (1.0, 1.0) and image.dimensions == (400, 300)
        assert image.extent() == (400.0, 300.0)
        np.testing.assert_array_equal(image.read_region(150, 120, 50, 10), np.broadcast_to((120, 40, 140), (10, 10, 3)))
        thumb, scale = image.thumbnail(1000)  # never enlarged
        assert thumb.shape == (300, 400, 3) and np.allclose(scale, 1.0)


def test_find_slide_file(tmp_path):
    wsi = tmp_path / "wsi"
    wsi.mkdir()
    assert find_slide_file(wsi, "a") is None
    (wsi / "ab.svs").write_bytes(b"")  # another slide whose id starts with "a"
    (wsi / "a.txt").write_bytes(b"")
    (wsi / "a.svs.bak").write_bytes(b"")
    assert find_slide_file(wsi, "a") is None
    (wsi / "a.SVS").write_bytes(b"")
    assert find_slide_file(wsi, "a") == wsi / "a.SVS"
    assert find_slide_file(wsi, "ab") == wsi / "ab.svs"
    (wsi / "a.tiff").write_bytes(b"")
    with pytest.raises(WSIError, match=r"more than one image of slide 'a' \(a.SVS, a.tiff\)"):
        find_slide_file(wsi, "a")
    (tmp_path / "x.svs").write_bytes(b"")  # outside the folder: never reached
    for bad in ("../x", "..", "sub/x", "sub\\x", ""):
        with pytest.raises(WSIError, match="cannot name a file"):
            find_slide_file(wsi, bad)
    (wsi / "d.tif").mkdir()  # a folder is not a slide file
    assert find_slide_file(wsi, "d") is None
    with pytest.raises(WSIError, match="no such folder"):
        find_slide_file(tmp_path / "missing", "a")
    assert {".svs", ".tiff", ".ndpi", ".mrxs", ".dcm"} <= set(SLIDE_SUFFIXES)


def test_open_refuses_what_openslide_cannot_read(tmp_path):
    notes = tmp_path / "notes.tiff"
    notes.write_text("not an image")
    with pytest.raises(WSIError, match="notes.tiff: OpenSlide cannot open it"):
        SlideImage.open(notes)
    with pytest.raises(WSIError, match="gone.svs: no such slide file"):
        SlideImage.open(tmp_path / "gone.svs")
    bad = tmp_path / "bad.tiff"
    tifffile.imwrite(bad, np.zeros((64, 64, 3), np.uint8), tile=(64, 64), photometric="rgb", metadata=None,
                     description="dsca-synth coords_downsample=0x16")
    with pytest.raises(WSIError, match="bad.tiff: ImageDescription declares coords_downsample=0x16"):
        SlideImage.open(bad)


def test_write_slide_images_subset_and_errors(cohort, tmp_path):
    sid = cohort.slide_ids[-1]
    out = write_slide_images(cohort.root, [sid], progress=False)
    assert out == [cohort.wsi_dir / f"{sid}.tiff"]
    with pytest.raises(ValueError, match="'SYN-9999' is not in the synthetic cohort"):
        write_slide_images(cohort.root, ["SYN-9999"], progress=False)
    with pytest.raises(ValueError, match="cannot paint slide '../x'"):
        write_slide_images(cohort.root, ["../x"], progress=False)
    with pytest.raises(ValueError, match="has no tissue/ folder"):
        write_slide_images(tmp_path, progress=False)


def test_cli_synth_wsi_end_to_end(tmp_path, capsys):
    out = tmp_path / "synth"
    args = ["-q", "synth", "--out", str(out), "--patients", "5", "--dim", "8", "--patches", "8", "--no-h5"]
    assert store_main([*args, "--wsi"]) == 0
    assert f"slide images: {out / 'wsi'}" in capsys.readouterr().out
    slides = pd.read_csv(out / "synth_path_full.csv").pathology_id.tolist()
    assert sorted(p.stem for p in (out / "wsi").glob("*.tiff")) == sorted(slides)
    path = find_slide_file(out / "wsi", slides[0])
    with SlideImage.open(path) as image:
        assert image.coords_downsample[0] == pytest.approx(16.001219)
    # a rewrite without --wsi leaves no images of the previous cohort behind
    assert store_main(args) == 0
    assert not (out / "wsi").exists() and (out / "tissue").is_dir()


def test_import_dsca_wsi_needs_no_openslide():
    code = "import sys, dsca, dsca.wsi; assert 'openslide' not in sys.modules and 'tifffile' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
