"""TRIDENT outputs: attributes, folder discovery, reading one level, 4x4 block assembly.

The files are written the way TRIDENT writes them (trident/IO.py `save_h5` / `coords_to_h5`,
WSI.py `extract_patch_features`): datasets chunked (1, ...) with maxshape (None, ...), every
attribute on the dataset, `patch_size_level0 = patch_size * level0_mag // target_mag` (a float64
when the CLI passes the magnification as a float), the features file carrying a verbatim copy of
the coords and their attributes. The slide is "40x": a 256 px tile at 20x is 512 level-0 px and a
256 px patch at 5x is 2048.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from dsca.store.clam import ClamError
from dsca.store.trident import (
    TridentDir,
    assemble_blocks,
    is_trident_attrs,
    looks_like_trident,
    read_trident_level,
    trident_level,
)

D = 8
W, H = 4 * 2048 + 300, 3 * 2048 + 77  # level-0 slide size: a 5x grid of 5 cols x 4 rows
# tissue: the 5x patches (col, row) TRIDENT kept, in its row-major scan order
X5_CELLS = [(1, 0), (2, 0), (0, 1), (1, 1), (2, 1), (3, 2)]


def save_h5(path: Path, assets: dict[str, np.ndarray], attributes: dict[str, dict]) -> None:
    """trident/IO.py save_h5, mode 'w'."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for key, val in assets.items():
            dset = f.create_dataset(key, shape=val.shape, maxshape=(None,) + val.shape[1:],
                                    chunks=(1,) + val.shape[1:], dtype=val.dtype)
            dset[:] = val
            for k, v in attributes.get(key, {}).items():
                dset.attrs[k] = json.dumps(v) if isinstance(v, dict) else ("None" if v is None else v)


def coords_attrs(mag: float, patch_size: int = 256, overlap: int = 0, src_mag: int = 40,
                 savetodir: str = "job/run") -> dict:
    """trident/IO.py coords_to_h5, as run_batch_of_slides calls it (--mag type=float)."""
    return {"patch_size": patch_size, "patch_size_level0": patch_size * src_mag // mag,
            "level0_magnification": src_mag, "target_magnification": mag, "overlap": overlap,
            "name": "S", "savetodir": savetodir, "level0_width": W, "level0_height": H}


def feature_of(xy: np.ndarray, level: int) -> np.ndarray:
    """[M, D] float32 features that identify a tile by its corner (and its level)."""
    x, y = xy[:, 0:1].astype(np.float32), xy[:, 1:2].astype(np.float32)
    k = np.arange(D, dtype=np.float32)[None, :]
    return (level * 1e6 + x * (k + 1) + y * (k + 2) * 1e-3).astype(np.float32)


def write_run(job: Path, mag: float, coords: np.ndarray, *, patch_size: int = 256, enc: str = "uni_v1",
              encoder_attr: str | None = "uni_v1", attrs: dict | None = None, slide: str = "S",
              features: np.ndarray | None = None, feature_coords: np.ndarray | None = None) -> Path:
    """One TRIDENT run (coords task + feat task) of slide `slide`: returns its patching folder."""
    cdir = job / f"{mag:g}x_{patch_size}px_0px_overlap"
    attrs = coords_attrs(mag, patch_size, savetodir=str(cdir)) if attrs is None else attrs
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    save_h5(cdir / "patches" / f"{slide}_patches.h5", {"coords": coords}, {"coords": attrs})
    feats = feature_of(coords, 5 if mag == 5 else 20) if features is None else features
    fattrs = {"name": slide, "savetodir": str(cdir / f"features_{enc}")}
    if encoder_attr is not None:
        fattrs["encoder"] = encoder_attr
    save_h5(cdir / f"features_{enc}" / f"{slide}.h5",
            {"features": feats, "coords": coords if feature_coords is None else feature_coords},
            {"features": fattrs, "coords": dict(attrs)})
    return cdir


def x5_coords(cells=X5_CELLS) -> np.ndarray:
    return np.array(cells, dtype=np.int64) * 2048


def x20_coords(low: np.ndarray, missing: set[tuple[int, int]] = frozenset(), extra=()) -> np.ndarray:
    """Row-major scan of the 20x grid restricted to the tiles under `low` (minus `missing`)."""
    cells = {(x // 512 + c, y // 512 + r) for x, y in low for r in range(4) for c in range(4)}
    cells = (cells - set(missing)) | set(extra)
    return np.array(sorted(cells, key=lambda cr: (cr[1], cr[0])), dtype=np.int64) * 512


@pytest.fixture
def job(tmp_path: Path) -> Path:
    low = x5_coords()
    write_run(tmp_path, 5.0, low)
    write_run(tmp_path, 20.0, x20_coords(low))
    return tmp_path


def levels(job: Path, slide: str = "S"):
    d5, d20 = TridentDir.open(job / "5x_256px_0px_overlap"), TridentDir.open(job / "20x_256px_0px_overlap")
    return read_trident_level(*d5.files(slide)), read_trident_level(*d20.files(slide))


# --- attributes ----------------------------------------------------------------------------
def test_level_from_trident_attrs():
    attrs = coords_attrs(5.0)
    assert isinstance(attrs["patch_size_level0"], float) and attrs["patch_size_level0"] == 2048.0
    assert is_trident_attrs(attrs) and not is_trident_attrs({**attrs, "patch_level": 2})
    assert not is_trident_attrs({"patch_size": 256, "patch_level": 2, "downsample": [16.0, 16.0]})
    lv = trident_level(attrs, "f.h5")
    assert lv.patch_size == 256 and lv.downsample == (8.0, 8.0) and lv.patch_level is None
    np.testing.assert_array_equal(lv.step, [2048, 2048])
    assert np.all(lv.extent >= [W, H]) and np.all(lv.extent < np.array([W, H]) + 8)
    # numpy scalars, bytes and str as h5py versions hand them back
    odd = {**attrs, "patch_size": np.int64(256), "target_magnification": np.float64(5.0),
           "patch_size_level0": b"2048.0", "level0_magnification": "40", "overlap": np.array([0])}
    assert trident_level(odd, "f.h5") == lv
    # 20x of a 40x slide: step 512; without the level-0 size the extent is unknown
    lv20 = trident_level({k: v for k, v in coords_attrs(20.0).items() if not k.startswith("level0_w")}, "f.h5")
    np.testing.assert_array_equal(lv20.step, [512, 512])
    assert lv20.extent is None


def test_step_is_the_patchers_round_not_the_floor_attr():
    # 100 px at 6x of a 40x slide: the patcher steps round(666.67) = 667, the attr says 666.0
    attrs = coords_attrs(6.0, patch_size=100)
    assert attrs["patch_size_level0"] == 666.0
    np.testing.assert_array_equal(trident_level(attrs, "f.h5").step, [667, 667])
    # fractional magnification (2.5x) and odd sizes: step exact for all
    for ps in range(1, 600, 7):
        for mag in (2.5, 5.0, 6.0, 10.0, 20.0, 40.0):
            lv = trident_level(coords_attrs(mag, patch_size=ps), "f.h5")
            assert int(lv.step[0]) == round(ps * ((10 / mag) / (10 / 40)))


@pytest.mark.parametrize("change, text", [
    ({"overlap": 32}, "non-overlapping grid"),
    ({"patch_size_level0": 2000.0}, "patch_size_level0 2000.0 disagrees"),
    ({"target_magnification": float("nan")}, "not finite"),
    ({"target_magnification": 0.0}, "not a magnification"),
    ({"patch_size": 25.5}, "not a whole number"),
    ({"level0_magnification": "forty"}, "is not a number"),
    ({"level0_width": -5}, "is not a size"),
])
def test_bad_attrs_are_named(change, text):
    with pytest.raises(ClamError, match=text) as err:
        trident_level({**coords_attrs(5.0), **change}, "5x/patches/S_patches.h5")
    assert str(err.value).startswith("5x/patches/S_patches.h5") and "\n" not in str(err.value)


def test_missing_attrs_are_listed():
    attrs = coords_attrs(5.0)
    del attrs["target_magnification"], attrs["overlap"]
    with pytest.raises(ClamError, match="no target_magnification, overlap attributes"):
        trident_level(attrs, "f.h5")
    with pytest.raises(ClamError, match=r"patch_level is set"):
        trident_level({"patch_size": 256, "patch_level": 2, "downsample": [16, 16]}, "f.h5")


# --- blocks --------------------------------------------------------------------------------
def check_blocks(blocks, low_cells) -> None:
    corners = np.array(low_cells, dtype=np.int64) * 2048
    np.testing.assert_array_equal(blocks.x5_coords, corners)
    np.testing.assert_array_equal(blocks.x5, feature_of(corners, 5))
    assert blocks.x20.shape == (16 * len(corners), D) and blocks.x20_coords.shape == (16 * len(corners), 2)
    for i, corner in enumerate(corners):
        for r in range(4):
            for c in range(4):
                tile = corner + np.array([c, r]) * 512
                np.testing.assert_array_equal(blocks.x20_coords[16 * i + 4 * r + c], tile)
                np.testing.assert_array_equal(blocks.x20[16 * i + 4 * r + c], feature_of(tile[None], 20)[0])


def test_blocks_assembled_exactly(job):
    low, high = levels(job)
    assert low.features.shape == (len(X5_CELLS), D) and high.features.shape == (16 * len(X5_CELLS), D)
    assert low.encoder == high.encoder == "uni_v1"
    np.testing.assert_array_equal(low.step, [2048, 2048])
    np.testing.assert_array_equal(high.step, [512, 512])
    # every file read once and recorded: features file, then coords file
    assert [Path(s.path).name for s in low.sources] == ["S.h5", "S_patches.h5"]
    assert all(s.bytes > 0 for s in low.sources + high.sources)
    blocks = assemble_blocks(low, high)
    assert blocks.dropped == 0 and blocks.unused == 0 and blocks.keep.all()
    check_blocks(blocks, X5_CELLS)
    assert blocks.level5 == low.level and blocks.level20 == high.level


def test_missing_x20_tile_drops_its_x5_patch(tmp_path):
    low = x5_coords()
    # the last sub-tile of patch 1 (col 2, row 0) and a tile far from the x5 patches (unused)
    write_run(tmp_path, 5.0, low)
    write_run(tmp_path, 20.0, x20_coords(low, missing={(2 * 4 + 3, 0 * 4 + 3)}, extra={(16, 8)}))
    blocks = assemble_blocks(*levels(tmp_path))
    assert blocks.dropped == 1 and blocks.keep.tolist() == [True, False, True, True, True, True]
    # the 15 tiles of the dropped block and the stray one are in no kept block
    assert blocks.unused == 15 + 1
    check_blocks(blocks, [cell for i, cell in enumerate(X5_CELLS) if i != 1])


def test_shuffled_order_gives_the_same_blocks(job, tmp_path):
    ref = assemble_blocks(*levels(job))
    other = tmp_path / "shuffled"
    low = x5_coords()
    high = x20_coords(low)
    rng = np.random.default_rng(0)
    write_run(other, 5.0, low)
    write_run(other, 20.0, high[rng.permutation(len(high))])  # e.g. a column-major (pre-0.2.5) scan
    got = assemble_blocks(*levels(other))
    for name in ("keep", "x5", "x5_coords", "x20", "x20_coords"):
        np.testing.assert_array_equal(getattr(got, name), getattr(ref, name))
    # the x5 rows keep their source order (the Conv1d runs along it), whatever it is
    perm = rng.permutation(len(low))
    third = tmp_path / "x5_shuffled"
    write_run(third, 5.0, low[perm])
    write_run(third, 20.0, high)
    got = assemble_blocks(*levels(third))
    check_blocks(got, [X5_CELLS[i] for i in perm])


def test_mismatched_steps(tmp_path):
    low = x5_coords()
    write_run(tmp_path, 5.0, low)
    # a 10x run: 1024 px tiles at level 0
    write_run(tmp_path, 10.0, np.array([[x + c * 1024, y + r * 1024] for x, y in low for r in range(2)
                                        for c in range(2)]))
    d5, d10 = TridentDir.open(tmp_path / "5x_256px_0px_overlap"), TridentDir.open(tmp_path / "10x_256px_0px_overlap")
    with pytest.raises(ClamError, match="x5 patches are 2048 px and x20 1024 px at level 0: need exactly 4x"):
        assemble_blocks(read_trident_level(*d5.files("S")), read_trident_level(*d10.files("S")))


def test_grids_that_do_not_line_up(tmp_path):
    # the 5x run at 1024 px, 20x at 256 px: steps 8192 and 512 (16x)
    write_run(tmp_path, 5.0, np.array([[0, 0]]), patch_size=1024)
    write_run(tmp_path, 20.0, x20_coords(x5_coords()))
    d5 = TridentDir.open(tmp_path / "5x_1024px_0px_overlap")
    d20 = TridentDir.open(tmp_path / "20x_256px_0px_overlap")
    with pytest.raises(ClamError, match="x5 patches are 8192 px and x20 512 px"):
        assemble_blocks(read_trident_level(*d5.files("S")), read_trident_level(*d20.files("S")))
    # 256 px at 6x and 24x of a 40x slide: steps round(1706.67) = 1707 and round(426.67) = 427,
    # within 1 px of 4x, but the x5 corners drift off the x20 grid by 1 px per column
    drift = tmp_path / "drift"
    write_run(drift, 6.0, np.array([[0, 0], [1707, 0], [2 * 1707, 0]]))
    write_run(drift, 24.0, np.array([[c * 427, r * 427] for r in range(4) for c in range(12)]))
    d6, d24 = TridentDir.open(drift / "6x_256px_0px_overlap"), TridentDir.open(drift / "24x_256px_0px_overlap")
    low, high = read_trident_level(*d6.files("S")), read_trident_level(*d24.files("S"))
    np.testing.assert_array_equal(low.step, [1707, 1707])
    np.testing.assert_array_equal(high.step, [427, 427])
    with pytest.raises(ClamError, match=r"x5 and x20 grids do not line up: x5 patch 2 at \[3414, 0\]"):
        assemble_blocks(low, high)
    # one column less: the 1 px of patch 1 is rounding, it pairs with the tiles at 1708..
    blocks = assemble_blocks(replace(low, features=low.features[:2], coords=low.coords[:2]), high)
    assert blocks.dropped == 0
    np.testing.assert_array_equal(blocks.x20_coords[16], [4 * 427, 0])


def write_job(job: Path) -> Path:
    low = x5_coords()
    write_run(job, 5.0, low)
    write_run(job, 20.0, x20_coords(low))
    return job


def test_every_patch_dropped_and_other_level_checks(tmp_path):
    low = x5_coords([(0, 0)])
    write_run(tmp_path, 5.0, low)
    write_run(tmp_path, 20.0, x20_coords(low, missing={(3, 3)}))
    with pytest.raises(ClamError, match=r"none of the 1 x5 patches has all 16 of its x20 tiles \(15 of 16 found\)"):
        assemble_blocks(*levels(tmp_path))
    other = tmp_path / "dims"
    write_run(other, 5.0, low)
    high = x20_coords(low)
    write_run(other, 20.0, high, features=np.zeros((len(high), D + 1), np.float32))
    with pytest.raises(ClamError, match="x5 features have 8 dims and x20 9"):
        assemble_blocks(*levels(other))
    enc = tmp_path / "enc"
    write_run(enc, 5.0, low)
    write_run(enc, 20.0, high, enc="conch_v15", encoder_attr="conch_v15")
    d5, d20 = TridentDir.open(enc / "5x_256px_0px_overlap"), TridentDir.open(enc / "20x_256px_0px_overlap")
    with pytest.raises(ClamError, match="x5 features are from encoder uni_v1 and x20 from conch_v15"):
        assemble_blocks(read_trident_level(*d5.files("S")), read_trident_level(*d20.files("S")))


def test_assembly_of_a_big_shuffled_slide(tmp_path):
    # 20,000 x5 patches (320,000 x20 tiles, shuffled); its speed is a benchmark's business
    from dsca.store.trident import TridentLevel

    cols, rows = np.meshgrid(np.arange(200), np.arange(100))
    low_c = np.stack([cols.ravel(), rows.ravel()], 1) * 2048
    lv5, lv20 = trident_level(coords_attrs(5.0), "a"), trident_level(coords_attrs(20.0), "b")
    high_c = (low_c[:, None, :] + np.stack(np.meshgrid(np.arange(4), np.arange(4)), -1).reshape(1, 16, 2)
              * 512).reshape(-1, 2)
    high_c = high_c[np.random.default_rng(1).permutation(len(high_c))]
    low = TridentLevel(np.zeros((len(low_c), 4), np.float32), low_c, lv5, {}, None, [], tmp_path / "a" / "b" / "x.h5")
    high = TridentLevel(high_c[:, :1].astype(np.float32).repeat(4, 1), high_c, lv20, {}, None, [],
                        tmp_path / "c" / "d" / "y.h5")
    blocks = assemble_blocks(low, high)
    assert blocks.dropped == 0
    np.testing.assert_array_equal(blocks.x20[:, 0], blocks.x20_coords[:, 0])
    np.testing.assert_array_equal(blocks.x20_coords[1::16] - blocks.x20_coords[0::16], np.broadcast_to([512, 0],
                                                                                                       (len(low_c), 2)))


# --- reading one level ---------------------------------------------------------------------
def test_coords_disagreeing_with_the_coords_file(tmp_path):
    low = x5_coords()
    wrong = low.copy()
    wrong[2] = [4 * 2048, 0]
    cdir = write_run(tmp_path, 5.0, low, feature_coords=wrong)
    d = TridentDir.open(cdir)
    with pytest.raises(ClamError, match=r"5x_256px_0px_overlap/features_uni_v1/S.h5 coords disagree with "
                                        r"5x_256px_0px_overlap/patches/S_patches.h5 \(first at patch 2:"):
        read_trident_level(*d.files("S"))
    # without the coords file the features file's own coords are used
    assert read_trident_level(d.files("S")[0]).coords.tolist() == wrong.tolist()


def test_features_file_alone_and_pt_features(tmp_path):
    cdir = write_run(tmp_path, 5.0, x5_coords())
    h5 = cdir / "features_uni_v1" / "S.h5"
    alone = read_trident_level(h5)
    assert len(alone.sources) == 1 and alone.level.patch_size == 256
    # the Python API's saveas='pt': torch.save(ndarray), no coords, rows as in the coords file
    with h5py.File(h5, "r") as f:
        feats = f["features"][()]
    h5.unlink()
    pt = cdir / "features_uni_v1" / "S.pt"
    torch.save(feats, pt)
    d = TridentDir.open(cdir)
    assert d.features == {"S": [pt]} and d.encoder == "uni_v1"
    lv = read_trident_level(*d.files("S"))
    np.testing.assert_array_equal(lv.features, feats)
    np.testing.assert_array_equal(lv.coords, x5_coords())
    assert lv.encoder == "uni_v1" and [Path(s.path).name for s in lv.sources] == ["S.pt", "S_patches.h5"]
    with pytest.raises(ClamError, match="holds no coords"):
        read_trident_level(pt)
    torch.save(torch.from_numpy(feats).bfloat16(), pt)  # a tensor (saved by other code) is fine too
    half = read_trident_level(*d.files("S"))
    assert half.features.dtype == np.float32
    np.testing.assert_allclose(half.features, feats, rtol=1e-2)
    (cdir / "patches" / "S_patches.h5").unlink()
    with pytest.raises(ClamError, match="holds no coords and patches/S_patches.h5 is missing"):
        TridentDir.open(cdir).files("S")
    # a pickle that is not a plain float array is refused without running it
    torch.save(np.array(["import os"], dtype=object), pt)
    with pytest.raises(ClamError, match="S.pt: unreadable .pt"):
        read_trident_level(pt, cdir / "patches" / "none.h5")
    torch.save({"features": feats}, pt)
    with pytest.raises(ClamError, match="S.pt: holds a dict, expected a tensor or array"):
        read_trident_level(pt, cdir / "patches" / "none.h5")


def test_empty_slide_and_bad_rows(tmp_path):
    cdir = write_run(tmp_path, 5.0, np.zeros((0, 2)), features=np.zeros((0, D), np.float32))
    with pytest.raises(ClamError, match="features_uni_v1/S.h5: no patches"):
        read_trident_level(*TridentDir.open(cdir).files("S"))
    other = tmp_path / "b"
    cdir = write_run(other, 5.0, x5_coords(), features=np.zeros((3, D), np.float32))
    with pytest.raises(ClamError, match="has 3 feature rows but 6 coords"):
        read_trident_level(*TridentDir.open(cdir).files("S"))
    off = tmp_path / "c"
    cdir = write_run(off, 5.0, x5_coords() + [[100, 0]])
    with pytest.raises(ClamError, match=r"patch 0 at \[2148, 0\] is not on TRIDENT's grid \(multiples of 2048 px"):
        read_trident_level(*TridentDir.open(cdir).files("S"))
    out = tmp_path / "d"
    cdir = write_run(out, 5.0, np.array([[0, 0], [5 * 2048, 0]]))
    with pytest.raises(ClamError, match="outside the slide"):
        read_trident_level(*TridentDir.open(cdir).files("S"))


def test_float16_features_and_clam_coords_copy(tmp_path):
    low = x5_coords()
    cdir = write_run(tmp_path, 5.0, low, features=np.full((len(low), D), 0.5, np.float16))
    lv = read_trident_level(*TridentDir.open(cdir).files("S"))
    assert lv.features.dtype == np.float32
    # features extracted on legacy CLAM coords (--coords_dir): the copied attrs are CLAM's
    clam = tmp_path / "clam"
    cdir = write_run(clam, 5.0, low, attrs={"patch_size": 256, "patch_level": 2, "downsample": [16.0, 16.0]})
    with pytest.raises(ClamError, match=r"coords carry CLAM attributes \(patch_level\)"):
        read_trident_level(cdir / "features_uni_v1" / "S.h5")


# --- folders -------------------------------------------------------------------------------
def test_lock_file_reports_the_slide(job):
    feats = job / "20x_256px_0px_overlap" / "features_uni_v1"
    (feats / "S.h5.lock").write_text(json.dumps({"pid": 1, "hostname": "h", "created_at": "now"}))
    d = TridentDir.open(feats.parent)
    assert "S" in d.slide_ids and "S" not in d.features and d.locked["S"] == [feats / "S.h5.lock"]
    with pytest.raises(ClamError, match=r"features_uni_v1/S.h5: TRIDENT is still writing it \(lock file\)"):
        d.files("S")
    # a lock on the coords file counts too (the coords task is re-running on that slide)
    (feats / "S.h5.lock").unlink()
    patches = job / "5x_256px_0px_overlap" / "patches"
    (patches / "S_patches.h5.lock").write_text("{}")
    d = TridentDir.open(patches.parent)
    assert "S" not in d.coords and "S" in d.slide_ids
    with pytest.raises(ClamError, match=r"patches/S_patches.h5: TRIDENT is still writing it \(lock file\)"):
        d.files("S")


def test_detection_on_both_folder_kinds(job, tmp_path):
    cdir = job / "5x_256px_0px_overlap"
    for path in (cdir, cdir / "features_uni_v1", cdir / "patches"):
        assert looks_like_trident(path) and TridentDir.looks_like_trident(path)
    assert not looks_like_trident(job / "missing")
    # a CLAM save dir: patches/<slide>.h5 with patch_level
    clam = tmp_path / "clam"
    save_h5(clam / "patches" / "S.h5", {"coords": np.zeros((1, 2), np.int64)},
            {"coords": {"patch_size": 256, "patch_level": 2, "downsample": np.array([16.0, 16.0])}})
    assert not looks_like_trident(clam) and not looks_like_trident(clam / "patches")
    # content, not names: a custom --coords_dir name is still TRIDENT
    custom = write_run(tmp_path / "job2", 5.0, x5_coords())
    renamed = custom.with_name("my_coords")
    custom.rename(renamed)
    assert looks_like_trident(renamed)
    # a features folder holding only .pt files: its sibling patches/ decide
    h5 = renamed / "features_uni_v1" / "S.h5"
    torch.save(np.zeros((6, D), np.float32), h5.with_suffix(".pt"))
    h5.unlink()
    assert looks_like_trident(renamed / "features_uni_v1")
    # a lock-guarded file does not count (it may be half-written)
    lonely = write_run(tmp_path / "job3", 5.0, x5_coords())
    (lonely / "patches" / "S_patches.h5.lock").write_text("{}")
    (lonely / "features_uni_v1" / "S.h5.lock").write_text("{}")
    assert not looks_like_trident(lonely)


def test_open_either_folder_and_encoder_names(job):
    cdir = job / "20x_256px_0px_overlap"
    a, b = TridentDir.open(cdir), TridentDir.open(cdir / "features_uni_v1")
    for d in (a, b):
        assert d.root == cdir and d.features_dir == cdir / "features_uni_v1"
        assert d.coords == {"S": [cdir / "patches" / "S_patches.h5"]}
        assert d.features == {"S": [cdir / "features_uni_v1" / "S.h5"]}
        assert d.slide_ids == {"S"} and d.encoder == "uni_v1"
    # a second encoder run: the patching folder is ambiguous, the features folder is not
    low = x5_coords()
    write_run(job, 20.0, x20_coords(low), enc="conch_v15", encoder_attr="conch_v1_5")
    with pytest.raises(ClamError, match=r"several feature folders \(features_conch_v15, features_uni_v1\)"):
        TridentDir.open(cdir)
    d = TridentDir.open(cdir / "features_conch_v15")
    assert d.encoder == "conch_v1_5"  # the attribute wins over the folder name
    assert read_trident_level(*d.files("S")).encoder == "conch_v1_5"
    # before v0.2.2 there was no encoder attribute; 'None' is how TRIDENT writes a missing name
    for attr in (None, "None"):
        write_run(job, 5.0, low, enc="kaiko-vitb8", encoder_attr=attr)
        d = TridentDir.open(job / "5x_256px_0px_overlap" / "features_kaiko-vitb8")
        assert d.encoder == "kaiko-vitb8" and read_trident_level(*d.files("S")).encoder == "kaiko-vitb8"


def test_open_errors(job, tmp_path):
    with pytest.raises(ClamError, match="TRIDENT job dir: pass one of its patching folders "
                                        r"\(20x_256px_0px_overlap, 5x_256px_0px_overlap\)"):
        TridentDir.open(job)
    with pytest.raises(ClamError, match="does not exist"):
        TridentDir.open(tmp_path / "nope")
    coords_only = tmp_path / "c" / "20x_256px_0px_overlap"
    save_h5(coords_only / "patches" / "S_patches.h5", {"coords": np.zeros((1, 2), np.int64)},
            {"coords": coords_attrs(20.0)})
    with pytest.raises(ClamError, match="no features_<enc>/ folder"):
        TridentDir.open(coords_only)
    d = TridentDir.open(coords_only, require_features=False)
    assert d.features_dir is None and d.encoder is None and d.slide_ids == {"S"}
    assert d.coords_file("S") == coords_only / "patches" / "S_patches.h5"
    # a slide with both S.h5 and S.pt (two runs): neither is picked silently
    feats = job / "5x_256px_0px_overlap" / "features_uni_v1"
    torch.save(np.zeros((6, D), np.float32), feats / "S.pt")
    with pytest.raises(ClamError, match="2 features files for one slide"):
        TridentDir.open(feats).files("S")
    with pytest.raises(ClamError, match="no features file"):
        TridentDir.open(feats).files("T")
    slide_feats = feats.parent / "slide_features_titan"
    slide_feats.mkdir()
    with pytest.raises(ClamError, match="slide embeddings"):
        TridentDir.open(slide_feats)


# --- end to end: dsca-store convert on two TRIDENT runs --------------------------------------
def test_convert_two_trident_runs_into_a_store(tmp_path):
    import subprocess
    import sys

    from dsca.store import FeatureStore
    from dsca.store.verify import verify_store

    low = x5_coords()
    job = tmp_path / "job"
    for slide, missing in (("S", set()), ("T", {(5, 1)})):  # T lacks one 20x tile of patch (1, 0)
        write_run(job, 5.0, low, slide=slide)
        write_run(job, 20.0, x20_coords(low, missing), slide=slide)
    write_run(job, 5.0, low[:2], slide="U")  # U: only the 5x run, its 20x features were never made
    run5, run20 = job / "5x_256px_0px_overlap", job / "20x_256px_0px_overlap"
    out = tmp_path / "store.zarr"
    cmd = [sys.executable, "-m", "dsca.cli.store_main", "-q", "convert", "--x5-features", str(run5 / "features_uni_v1"),
           "--x20-features", str(run20 / "features_uni_v1"), "--x5-coords", str(run5), "--x20-coords", str(run20),
           "--out", str(out), "--dtype", "float32"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines[-1] == f"U: missing x20 coords file (no U_patches.h5 in {run20 / 'patches'})", res.stderr
    # 1 of T's 6 patches lost: more than 10%, worth a warning even with -q
    assert len(lines) == 2 and lines[0].endswith("T: 1 of 6 x5 patches left out: not all 16 of their x20 tiles "
                                                 "were extracted (did the 20x run use another tissue segmentation?)")
    fs = FeatureStore.open(out)
    assert fs.slide_ids == ["S", "T"] and fs.attrs["extractor"] == "uni_v1"
    s = fs.read_slide("S")
    np.testing.assert_array_equal(s.coords, low)
    np.testing.assert_array_equal(s.x5, feature_of(low, 5))
    sub = low[:, None, :] + 512 * np.stack(np.meshgrid(np.arange(4), np.arange(4)), -1).reshape(1, 16, 2)
    np.testing.assert_array_equal(s.x20, feature_of(sub.reshape(-1, 2), 20).reshape(len(low), 16, D))
    t = fs.read_slide("T")
    assert len(t.x5) == len(low) - 1 and fs.slide_attrs("T")["dropped_x5_patches"] == 1
    attrs = fs.slide_attrs("S")
    assert attrs["format"] == "trident" and attrs["encoder"] == "uni_v1"
    assert set(attrs["sources"]) == {"x5_features", "x5_coords", "x20_features", "x20_coords"}
    assert verify_store(out, progress=False, sources=True).ok


def test_a_trident_slide_with_two_features_files_fails_alone(tmp_path):
    from dsca.store.convert import convert_cohort

    low = x5_coords()
    job = tmp_path / "job"
    for slide in ("S", "T"):
        write_run(job, 5.0, low, slide=slide)
        write_run(job, 20.0, x20_coords(low), slide=slide)
    run5, run20 = job / "5x_256px_0px_overlap", job / "20x_256px_0px_overlap"
    torch.save(torch.from_numpy(feature_of(low, 5)), run5 / "features_uni_v1" / "S.pt")  # a second run's copy
    kw = dict(x5_features=run5 / "features_uni_v1", x20_features=run20 / "features_uni_v1", x5_coords=run5,
              x20_coords=run20, out=tmp_path / "s.zarr", dtype="float32", progress=False)
    report = convert_cohort(**kw)
    assert report.converted == ["T"] and [sid for sid, _ in report.failures] == ["S"]
    assert "2 features files for one slide" in report.failures[0][1]
    again = convert_cohort(**kw)  # T's sources are what they were: nothing to redo
    assert again.skipped == ["T"] and not again.converted
