"""Every validation case of `dsca-store convert`, built in CLAM's real layout.

One damaged copy of the synthetic cohort carries each defect in a different slide; a single
real CLI run must name each bad slide with its reason, convert all the good ones and exit 1.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from dsca.store import FeatureStore
from dsca.store.align import align_coords
from dsca.store.clam import read_coords


def _pt(path: Path) -> np.ndarray:
    return torch.load(path, weights_only=True).numpy()


def _save_pt(path: Path, x: np.ndarray) -> None:
    torch.save(torch.from_numpy(np.ascontiguousarray(x)), path)


def _set_h5(path: Path, name: str, data: np.ndarray) -> None:
    with h5py.File(path, "r+") as f:
        attrs = dict(f[name].attrs)
        del f[name]
        f.create_dataset(name, data=data).attrs.update(attrs)


def _set_attrs(path: Path, drop: tuple[str, ...] = (), **values) -> None:
    with h5py.File(path, "r+") as f:
        for key in drop:
            del f["coords"].attrs[key]
        f["coords"].attrs.update(values)


def _set_coords(c5: Path, c20: Path, f5: Path, f20: Path, s: str, coords: np.ndarray) -> None:
    """New x5 coords for slide `s`, with x20 coords realigned to them everywhere they appear."""
    low = read_coords(c5 / f"{s}.h5")
    high = align_coords(coords, 256, low.downsample / 4)
    for path, data in ((c5 / f"{s}.h5", coords), (f5 / "h5_files" / f"{s}.h5", coords),
                       (c20 / f"{s}.h5", high), (f20 / "h5_files" / f"{s}.h5", high)):
        _set_h5(path, "coords", data)


# defect name -> a fragment of the expected message (the slide id starts the line)
EXPECTED = {
    "x20_rows": "x20 features have",
    "coord_rows": "x5 features have",
    "level_dims": "feature dims differ between levels",
    "slide_dims": "differs from the cohort's 32",
    "nan": "x5 features contain 1 NaN/Inf values (first at row 3)",
    "h5_coords": "x5 h5_files/{s}.h5 coords disagree with the x5 coords file patches/{s}.h5",
    "x20_h5_coords": "x20 h5_files/{s}.h5 coords disagree with the x20 coords file patches/{s}.h5 (first at row 5",
    "naive_offsets": "old big_to_small_patching convention",
    "truncated_pt": "x20 features: pt_files/{s}.pt: unreadable or truncated .pt",
    "corrupt_h5": "x5 coords: patches/{s}.h5: unreadable or truncated h5",
    "empty_pt": "x5 features: pt_files/{s}.pt: empty file (0 bytes)",
    "empty_coords": "x20 coords: patches/{s}.h5: empty file (0 bytes)",
    "broken_link": "x5 features: pt_files/{s}.pt: unreadable (broken symbolic link)",
    "copies_differ": "the two copies differ",
    "float16_overflow": "x20 features reach 1e+06, beyond float16's range",
    "label_duplicate": "duplicate slide id in synth_path_full.csv",
    "label_no_patient": "no patient_id in synth_path_full.csv (line",
    "case_duplicate": "duplicate slide id, differing only in case",
    "missing_x20": "missing x20 features",
    # issue 7
    "legacy_dim": "feature dim 16 differs from the cohort's 32",
    "flipped_pt": "x20 features: pt_files/{s}.pt: corrupt .pt (checksum mismatch in data/0)",
    "copies_values": "x5 features: pt_files/{s}.pt and h5_files/{s}.h5 hold different feature values (first at row 2)",
    "huge_coords": "x5 coords: patches/{s}.h5 coords: patch 4 at [1099511",
    "nan_downsample": "x5 coords: patches/{s}.h5: downsample [nan, nan] is not a finite factor",
    "negative_coords": "x5 coords: patches/{s}.h5 coords: patch 0 at [-4096.0, ",
    "stray_patch": "lies far from the others (a stray or corrupted coordinate?)",
    "no_level_attrs": "x5 coords: patches/{s}.h5 has no patch_level, downsample attributes",
    "swapped": "x5 and x20 look swapped: x5 features have",
    "underflow": "x20 features are all below 1e-09, under float16's normal range",
    "x5_downsample": "x5 level 2 (downsample [32.0, 32.0]) is not 4^k x the x20 level 1",
    "h5_bomb": "x5 features: h5_files/{s}.h5 features declares shape (1000000, 32)",
}


def _drop_h5(*paths: Path) -> None:
    """Leave the slide with pt_files only (as many cohorts are), so the .pt alone is damaged."""
    for path in paths:
        path.unlink()


@pytest.fixture(scope="module")
def cohort40(tmp_path_factory):
    """A cohort with a slide for every defect (the session cohort has too few)."""
    from dsca.store.synth import SynthSpec, write_synthetic_cohort

    return write_synthetic_cohort(tmp_path_factory.mktemp("cohort40"), SynthSpec(patients=40, seed=11, dim=32,
                                                                                 patches=24), progress=False)


@pytest.fixture(scope="module")
def damaged(cohort40, tmp_path_factory):
    synth_cohort = cohort40
    root = tmp_path_factory.mktemp("damaged") / "cohort"
    shutil.copytree(synth_cohort.root, root)
    c5, c20 = root / "tiles-l2-s256" / "patches", root / "tiles-l1-s256" / "patches"
    f5, f20 = root / "feats-l2-s256-synth", root / "feats-l1-s256-synth"
    sids = sorted(synth_cohort.slide_ids)
    bad = dict(zip(EXPECTED, sids[: len(EXPECTED)]))
    good = sids[len(EXPECTED):]
    assert len(good) >= 5

    def h5(f: Path, s: str) -> Path:
        return f / "h5_files" / f"{s}.h5"

    s = bad["x20_rows"]
    _save_pt(f20 / "pt_files" / f"{s}.pt", _pt(f20 / "pt_files" / f"{s}.pt")[:-16])
    _drop_h5(h5(f20, s))
    s = bad["coord_rows"]
    _save_pt(f5 / "pt_files" / f"{s}.pt", _pt(f5 / "pt_files" / f"{s}.pt")[:-1])
    _drop_h5(h5(f5, s))
    s = bad["level_dims"]
    _save_pt(f20 / "pt_files" / f"{s}.pt", _pt(f20 / "pt_files" / f"{s}.pt")[:, :31])
    _drop_h5(h5(f20, s))
    s = bad["slide_dims"]
    for f in (f5, f20):
        x = _pt(f / "pt_files" / f"{s}.pt")
        _save_pt(f / "pt_files" / f"{s}.pt", np.concatenate([x, x[:, :16]], axis=1))
        _drop_h5(h5(f, s))
    s = bad["nan"]
    x = _pt(f5 / "pt_files" / f"{s}.pt")
    x[3, 5] = np.nan
    _save_pt(f5 / "pt_files" / f"{s}.pt", x)
    _drop_h5(h5(f5, s))
    s = bad["h5_coords"]
    with h5py.File(h5(f5, s), "r") as f:
        coords = f["coords"][()]
    _set_h5(h5(f5, s), "coords", coords[::-1].copy())
    s = bad["x20_h5_coords"]
    with h5py.File(h5(f20, s), "r") as f:
        coords = f["coords"][()]
    coords[5] += 7
    _set_h5(h5(f20, s), "coords", coords)
    s = bad["naive_offsets"]
    low = read_coords(c5 / f"{s}.h5")
    naive = align_coords(low.coords, 256, np.ones(2))
    _set_h5(c20 / f"{s}.h5", "coords", naive)
    _set_h5(h5(f20, s), "coords", naive)
    s = bad["truncated_pt"]
    p = f20 / "pt_files" / f"{s}.pt"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    s = bad["corrupt_h5"]
    p = c5 / f"{s}.h5"
    data = bytearray(p.read_bytes())
    data[:64] = b"\x00" * 64  # kills the HDF5 superblock
    p.write_bytes(bytes(data))
    s = bad["empty_pt"]
    (f5 / "pt_files" / f"{s}.pt").write_bytes(b"")
    s = bad["empty_coords"]
    (c20 / f"{s}.h5").write_bytes(b"")
    s = bad["broken_link"]  # the features were moved away: a dangling link, no h5 copy
    (f5 / "pt_files" / f"{s}.pt").unlink()
    (f5 / "pt_files" / f"{s}.pt").symlink_to(root / "moved-away" / f"{s}.pt")
    _drop_h5(h5(f5, s))
    s = bad["copies_differ"]  # h5_files from another run than pt_files
    with h5py.File(h5(f5, s), "r") as f:
        features = f["features"][()]
    _set_h5(h5(f5, s), "features", features[:-2])
    s = bad["float16_overflow"]  # fine as float32, not representable in the default float16
    x = _pt(f20 / "pt_files" / f"{s}.pt")
    x[7, 1] = 1e6
    _save_pt(f20 / "pt_files" / f"{s}.pt", x)
    _drop_h5(h5(f20, s))
    s = bad["legacy_dim"]  # torch's pre-1.6 format, which cannot be memory-mapped to peek its dim
    for f in (f5, f20):
        torch.save(torch.from_numpy(_pt(f / "pt_files" / f"{s}.pt")[:, :16].copy()), f / "pt_files" / f"{s}.pt",
                   _use_new_zipfile_serialization=False)
        _drop_h5(h5(f, s))
    torch.save(torch.load(f5 / "pt_files" / f"{good[1]}.pt", weights_only=True), f5 / "pt_files" / f"{good[1]}.pt",
               _use_new_zipfile_serialization=False)  # a good slide in the legacy format converts
    s = bad["flipped_pt"]  # one byte flipped inside the tensor data: loads fine, the zip CRC says no
    p = f20 / "pt_files" / f"{s}.pt"
    data = bytearray(p.read_bytes())
    data[data.find(b"data/0") + 200] ^= 0x10
    p.write_bytes(bytes(data))
    _drop_h5(h5(f20, s))
    s = bad["copies_values"]  # same shape, other values: an h5_files copy of another extraction
    with h5py.File(h5(f5, s), "r") as f:
        features = f["features"][()]
    features[2] += 0.5
    _set_h5(h5(f5, s), "features", features)
    s = bad["huge_coords"]
    coords = read_coords(c5 / f"{s}.h5").coords.copy()
    coords[4] += 2**40
    _set_coords(c5, c20, f5, f20, s, coords)
    s = bad["nan_downsample"]
    _set_attrs(c5 / f"{s}.h5", downsample=np.array([np.nan, np.nan]))
    s = bad["negative_coords"]
    coords = read_coords(c5 / f"{s}.h5").coords.copy()
    coords[0] = [-4096, coords[0, 1]]
    _set_coords(c5, c20, f5, f20, s, coords)
    s = bad["stray_patch"]  # inside int32 and no slide size recorded: only the grid's extent tells
    coords = read_coords(c5 / f"{s}.h5").coords.copy()
    coords[-1] += 2**28
    _set_coords(c5, c20, f5, f20, s, coords)
    _set_attrs(c5 / f"{s}.h5", drop=("level_dim",))
    _set_attrs(c20 / f"{s}.h5", drop=("level_dim",))
    s = bad["no_level_attrs"]  # another tool's coords file: its conventions cannot be assumed
    _set_attrs(c5 / f"{s}.h5", drop=("patch_level", "downsample"))
    s = bad["swapped"]
    for name in ("pt_files",):
        a, b = f5 / name / f"{s}.pt", f20 / name / f"{s}.pt"
        a.rename(root / "tmp.pt")
        b.rename(a)
        (root / "tmp.pt").rename(b)
    _drop_h5(h5(f5, s), h5(f20, s))
    s = bad["underflow"]  # float32 values that float16 would flush to zero
    _save_pt(f20 / "pt_files" / f"{s}.pt", np.full_like(_pt(f20 / "pt_files" / f"{s}.pt"), 1e-9))
    _drop_h5(h5(f20, s))
    s = bad["x5_downsample"]  # consistent 4x4 offsets, but the x5 level's own downsample is off
    _set_attrs(c5 / f"{s}.h5", downsample=np.array([32.0, 32.0]), level_dim=np.array([10**6, 10**6]))
    s = bad["h5_bomb"]  # a tiny file that declares 10^6 x 32 floats it never stores
    (f5 / "pt_files" / f"{s}.pt").unlink()
    with h5py.File(h5(f5, s), "r") as f:
        coords = f["coords"][()]
    with h5py.File(h5(f5, s), "w") as f:
        f.create_dataset("features", shape=(10**6, 32), dtype=np.float32, chunks=(1024, 32))
        f["coords"] = coords
    p = f5 / "pt_files" / f"{good[2]}.pt"  # saved straight from a model: a tensor that needs grad
    torch.save(torch.from_numpy(_pt(p)).requires_grad_(), p)
    labels = pd.read_csv(root / "synth_path_full.csv", dtype=str)
    s = bad["label_duplicate"]
    labels = pd.concat([labels, pd.DataFrame([{"pathology_id": s, "patient_id": "SYN-9999", "e": "1", "t": "5"}])])
    labels = pd.concat([labels, pd.DataFrame([{"pathology_id": "SYN-8888-01Z-00-DX1", "patient_id": "SYN-8888",
                                               "e": "0", "t": "100"}])])
    labels.loc[labels.pathology_id == bad["label_no_patient"], "patient_id"] = ""  # a blank cell
    labels.to_csv(root / "synth_path_full.csv", index=False)
    s = bad["case_duplicate"]
    # a stray copy under a name that differs only in case: both ids are ambiguous
    shutil.copy(f5 / "pt_files" / f"{good[0]}.pt", f5 / "pt_files" / f"{s.lower()}.pt")
    s = bad["missing_x20"]
    (f20 / "pt_files" / f"{s}.pt").unlink()
    (f20 / "h5_files" / f"{s}.h5").unlink()

    out = root.parent / "store.zarr"
    cmd = [sys.executable, "-m", "dsca.cli.store_main", "-q", "convert", "--x5-features", str(f5),
           "--x20-features", str(f20), "--x5-coords", str(c5.parent), "--x20-coords", str(c20.parent),
           "--labels", str(root / "synth_path_full.csv"), "--out", str(out), "--jobs", "2"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return bad, good, out, run


@pytest.mark.parametrize("defect", list(EXPECTED))
def test_bad_slide_named_with_reason(damaged, defect):
    bad, _, _, run = damaged
    sid = bad[defect]
    lines = [line for line in run.stderr.splitlines() if line.startswith(f"{sid}: ")]
    assert len(lines) == 1, run.stderr
    assert EXPECTED[defect].format(s=sid) in lines[0], lines[0]


def test_good_slides_converted_and_exit_nonzero(damaged, cohort40):
    bad, good, out, run = damaged
    assert run.returncode == 1, run.stderr
    fs = FeatureStore.open(out)
    assert fs.slide_ids == sorted(good)
    # no half-written output: nothing on disk for the bad slides
    on_disk = {p.name for p in (out / "slides").iterdir()}
    assert on_disk == set(fs.slide_ids) | {"zarr.json"}
    legacy = fs.read_slide(good[1]).x5
    np.testing.assert_allclose(legacy, _pt(cohort40.x5_features / "pt_files" / f"{good[1]}.pt"), atol=2e-3)  # float16 store
    lowercase = bad["case_duplicate"].lower()
    assert any(line.startswith(f"{lowercase}: duplicate slide id") for line in run.stderr.splitlines())
    assert "SYN-8888-01Z-00-DX1: listed in the labels CSV but has no feature files (missing)" in run.stderr
    # one line per failure, nothing else (no tracebacks, no warnings)
    assert len(run.stderr.strip().splitlines()) == len(bad) + 2, run.stderr
    assert f"failed {len(bad) + 1}, missing 1" in run.stdout


def test_unusable_directories_fail_the_run(tmp_path, synth_cohort):
    cmd = [sys.executable, "-m", "dsca.cli.store_main", "-q", "convert", "--x5-features", str(tmp_path / "nope"),
           "--x20-features", str(synth_cohort.x20_features), "--x5-coords", str(synth_cohort.x5_coords),
           "--out", str(tmp_path / "s.zarr")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "nope does not exist" in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s.zarr").exists()
