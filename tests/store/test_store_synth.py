"""The synthetic cohort: CLAM layout, determinism, and a planted signal that needs both streams."""
from __future__ import annotations

import filecmp

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from dsca.coords import discretize
from dsca.cli.store_main import main as store_main
from dsca.store.synth import MARKER, SynthSpec, check_spec, is_synth_cohort, write_synthetic_cohort

_TINY = SynthSpec(patients=6, seed=3, dim=8, patches=10, h5_files=False)


def _cindex(score: np.ndarray, time: np.ndarray, event: np.ndarray) -> float:
    """Harrell's C: among comparable pairs (earlier time has the event), share ranked right."""
    earlier = (time[:, None] < time[None, :]) & (event[:, None] == 1)
    concordant = (score[:, None] > score[None, :]) + 0.5 * (score[:, None] == score[None, :])
    return float((concordant * earlier).sum() / earlier.sum())


def test_layout_looks_like_clam(synth_cohort):
    sid = synth_cohort.slide_ids[0]
    with h5py.File(synth_cohort.x5_coords / "patches" / f"{sid}.h5", "r") as f:
        dset = f["coords"]
        coords, attrs = dset[()], dict(dset.attrs)
    assert coords.dtype == np.int64 and attrs["patch_size"] == 256 and attrs["patch_level"] == 2
    ds = np.asarray(attrs["downsample"])
    assert ds.shape == (2,) and np.all(ds != np.round(ds)) and ds[0] != ds[1] and abs(ds[0] - 16) < 0.01
    assert attrs["name"] == sid and len(attrs["level_dim"]) == 2
    assert (synth_cohort.x5_coords / "process_list_autogen.csv").is_file()
    assert (synth_cohort.root / "preview.png").stat().st_size > 10_000
    assert (synth_cohort.x20_coords / "patches" / f"{sid}.h5").is_file()
    for feats, rows in ((synth_cohort.x5_features, len(coords)), (synth_cohort.x20_features, 16 * len(coords))):
        x = torch.load(feats / "pt_files" / f"{sid}.pt", weights_only=True)
        assert x.dtype == torch.float32 and x.shape == (rows, 32)
        with h5py.File(feats / "h5_files" / f"{sid}.h5", "r") as f:
            np.testing.assert_array_equal(f["features"][()], x.numpy())
            assert f["coords"].shape == (rows, 2)
    # tissue, not a rectangle: blobs fill only part of their bounding box
    fill = []
    for s in synth_cohort.slide_ids:
        with h5py.File(synth_cohort.x5_coords / "patches" / f"{s}.h5", "r") as f:
            g = discretize(f["coords"][()])
        fill.append(len(g) / ((g[:, 0].max() + 1) * (g[:, 1].max() + 1)))
    assert 0.2 < np.median(fill) < 0.9


def test_labels_and_splits_in_reference_format(synth_cohort):
    df = pd.read_csv(synth_cohort.labels_csv, dtype={"patient_id": str})
    assert list(df.columns) == ["pathology_id", "patient_id", "e", "t"]
    assert sorted(df.pathology_id) == sorted(synth_cohort.slide_ids)
    per_patient = df.groupby("patient_id").size()
    assert per_patient.max() >= 2 and per_patient.max() <= 3 and len(per_patient) == 20
    assert set(df.e) <= {0, 1} and df.t.min() >= 1 and df.t.max() > 100
    patients = set(per_patient.index)
    tests = []
    for path in synth_cohort.splits:
        d = np.load(path)
        assert set(d.files) == {"train_patients", "val_patients", "test_patients"}
        parts = [set(d[k].tolist()) for k in ("train_patients", "val_patients", "test_patients")]
        assert set().union(*parts) == patients and sum(map(len, parts)) == len(patients)
        tests.append(parts[2])
    assert set().union(*tests) == patients and sum(map(len, tests)) == len(patients)


def test_deterministic_by_seed(tmp_path):
    spec = SynthSpec(patients=5, seed=11, dim=8, patches=10)
    a = write_synthetic_cohort(tmp_path / "a", spec, progress=False)
    b = write_synthetic_cohort(tmp_path / "b", spec, progress=False)
    c = write_synthetic_cohort(tmp_path / "c", SynthSpec(patients=5, seed=12, dim=8, patches=10), progress=False)
    assert filecmp.cmp(a.labels_csv, b.labels_csv, shallow=False)
    sid = a.slide_ids[0]
    for folder in ("x5_features", "x20_features"):
        xa = torch.load(getattr(a, folder) / "pt_files" / f"{sid}.pt")
        assert torch.equal(xa, torch.load(getattr(b, folder) / "pt_files" / f"{sid}.pt"))
    assert not filecmp.cmp(a.labels_csv, c.labels_csv, shallow=False)


def test_invalid_spec_is_refused(tmp_path):
    with pytest.raises(ValueError, match="at least 5 patients"):
        write_synthetic_cohort(tmp_path, SynthSpec(patients=3), progress=False)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"patients": 0}, "--patients must be an integer in 1..100000, got 0"),
        ({"patients": 100_001}, "--patients must be an integer in 1..100000"),
        ({"patients": 10.0}, "--patients must be an integer"),
        ({"patches": 100_000_000}, "--patches must be an integer in 1..20000, got 100000000"),
        ({"patches": 0}, "--patches must be an integer in 1..20000"),
        ({"dim": 0}, "--dim must be an integer in 8..16384, got 0"),
        ({"dim": 16_385}, "--dim must be an integer in 8..16384"),
        ({"dim": 4}, "--dim must be an integer in 8..16384"),
        ({"seed": -1}, "--seed must be an integer in 0.."),
        ({"signal": float("nan")}, "--signal must be a finite number, got nan"),
        ({"signal": float("inf")}, "--signal must be a finite number"),
        ({"censoring": 1.0}, "--censoring must be in \\[0, 1\\).*got 1.0"),
        ({"censoring": -0.1}, "--censoring must be in \\[0, 1\\)"),
        ({"censoring": float("nan")}, "--censoring must be in \\[0, 1\\)"),
        ({"multi_slide": 1.5}, "SynthSpec.multi_slide must be in \\[0, 1\\]"),
        ({"noise": -1.0}, "SynthSpec.noise must be a finite number >= 0"),
        ({"motif_rows": 17}, "SynthSpec.motif_rows must be an integer in 1..16"),
        ({"folds": 0}, "SynthSpec.folds must be an integer in 1..100"),
        ({"patches": 20_000, "dim": 16_384}, "--patches 20000 x --dim 16384 is too large: .* GB"),
    ],
)
def test_spec_out_of_bounds_is_refused_before_writing(tmp_path, change, message):
    spec = SynthSpec(**{**vars(_TINY), **change})
    with pytest.raises(ValueError, match=message):
        check_spec(spec)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        write_synthetic_cohort(out, spec, progress=False)
    assert not out.exists()  # nothing written, not even the folder


def test_spec_bounds_are_inclusive():
    check_spec(SynthSpec(patients=100_000, patches=1, dim=16_384, censoring=0.0))
    check_spec(SynthSpec(patches=20_000, dim=128, censoring=0.99, signal=-2.0, seed=0))


def test_cli_synth_refuses_huge_patches_with_one_error_line(tmp_path, capsys):
    out = tmp_path / "big"
    assert store_main(["-q", "synth", "--out", str(out), "--patches", "100000000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --patches must be an integer in 1..20000")
    assert not out.exists()


def _user_folder(path):
    """A folder of someone's own files, named as synth names its outputs."""
    (path / "patches").mkdir(parents=True)
    (path / "synth_path_full.csv").write_text("pathology_id,patient_id,t,e\nmine,me,1,1\n")
    (path / "patches" / "mine.h5").write_bytes(b"not synthetic")
    return {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}


def test_non_empty_folder_of_user_files_is_refused(tmp_path, capsys):
    before = _user_folder(tmp_path / "mine")
    with pytest.raises(ValueError, match="mine is not empty \\(patches, synth_path_full.csv\\) and is not a "
                                         "synthetic cohort written before .* give a new or empty folder"):
        write_synthetic_cohort(tmp_path / "mine", _TINY, progress=False)
    assert {p: p.read_bytes() for p in (tmp_path / "mine").rglob("*") if p.is_file()} == before
    # the CLI: one error line, exit 2, nothing touched
    assert store_main(["-q", "synth", "--out", str(tmp_path / "mine"), "--patients", "6", "--dim", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "is not empty" in err[0]
    assert {p: p.read_bytes() for p in (tmp_path / "mine").rglob("*") if p.is_file()} == before
    assert not is_synth_cohort(tmp_path / "mine")


def test_out_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "cohort"
    path.write_text("mine")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        write_synthetic_cohort(path, _TINY, progress=False)
    assert path.read_text() == "mine"


def test_empty_folder_is_used(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"finder")  # a desktop's file does not count
    cohort = write_synthetic_cohort(tmp_path / "empty", _TINY, progress=False)
    assert (cohort.root / MARKER).is_file() and is_synth_cohort(cohort.root) and cohort.labels_csv.is_file()


def test_previous_cohort_is_rewritten_without_stale_files(tmp_path):
    root = tmp_path / "c"
    first = write_synthetic_cohort(root, SynthSpec(patients=12, seed=1, dim=8, patches=10), progress=False)
    (root / "notes.txt").write_text("mine")  # the user's own file next to the cohort is kept
    (root / "cohort.zarr").mkdir()
    second = write_synthetic_cohort(root, SynthSpec(patients=6, seed=2, dim=8, patches=10), progress=False)
    assert (root / "notes.txt").read_text() == "mine" and (root / "cohort.zarr").is_dir()
    assert len(second.slide_ids) < len(first.slide_ids)
    # no slide of the first cohort is left behind in any of synth's folders
    for folder, pattern in ((second.x5_coords / "patches", "*.h5"), (second.x20_coords / "patches", "*.h5"),
                            (second.x5_features / "pt_files", "*.pt"), (second.x20_features / "h5_files", "*.h5")):
        assert sorted(p.stem for p in folder.glob(pattern)) == sorted(second.slide_ids), folder
    assert sorted(p.name for p in (root / "splits").iterdir()) == [f"synth-seed2-fold{k}.npz" for k in range(5)]
    assert not list(root.glob(".x20-*.npy"))
    labels = pd.read_csv(second.labels_csv)
    assert sorted(labels.pathology_id) == sorted(second.slide_ids)
    # the rewrite equals a fresh cohort of the same spec
    fresh = write_synthetic_cohort(tmp_path / "fresh", second.spec, progress=False)
    assert filecmp.cmp(fresh.labels_csv, second.labels_csv, shallow=False)


def test_cohort_of_an_earlier_version_or_interrupted_run_is_recognised(tmp_path):
    # earlier versions wrote no marker, but always truth.csv, patterns.npz and synth_spec.json
    legacy = write_synthetic_cohort(tmp_path / "legacy", _TINY, progress=False).root
    (legacy / MARKER).unlink()
    assert is_synth_cohort(legacy)
    write_synthetic_cohort(legacy, _TINY, progress=False)
    # the marker is written first: a run that died half-way can be rerun into the same folder
    broken = tmp_path / "broken"
    (broken / "tiles-l2-s256" / "patches").mkdir(parents=True)
    (broken / MARKER).write_text("")
    (broken / ".x20-SYN-0000-01Z-00-DX1.npy").write_bytes(b"partial")
    cohort = write_synthetic_cohort(broken, _TINY, progress=False)
    assert not list(broken.glob(".x20-*.npy")) and cohort.truth_csv.is_file()
    # one legacy file alone is not enough
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "truth.csv").write_text("patient_id,risk\n")
    with pytest.raises(ValueError, match="is not empty"):
        write_synthetic_cohort(lone, _TINY, progress=False)


def test_cli_synth_twice_into_the_same_folder(tmp_path, capsys):
    out = tmp_path / "synth"
    args = ["-q", "synth", "--out", str(out), "--patients", "6", "--dim", "8", "--patches", "10", "--no-h5"]
    assert store_main(args) == 0
    assert store_main(args) == 0
    assert "wrote" in capsys.readouterr().out


def test_demo_reruns_into_the_same_folder(tmp_path, monkeypatch, capsys):
    """The README's `dsca demo --out dsca-demo`, run twice: synth rewrites its own cohort."""
    from dsca.cli.dsca_main import main as dsca_main

    monkeypatch.chdir(tmp_path)
    args = ["demo", "--out", "dsca-demo", "--patients", "30", "--epochs", "1", "--folds", "0", "--no-control"]
    assert dsca_main(args) == 0
    assert is_synth_cohort(tmp_path / "dsca-demo" / "cohort")
    assert dsca_main(args) == 0
    assert "test C-index (signal)" in capsys.readouterr().out


@pytest.fixture(scope="module")
def signal_cohort(tmp_path_factory):
    spec = SynthSpec(patients=160, seed=5, dim=16, patches=60, signal=3.0, h5_files=False)
    return write_synthetic_cohort(tmp_path_factory.mktemp("signal"), spec, progress=False)


def test_signal_needs_both_streams(signal_cohort):
    c = signal_cohort
    pat = np.load(c.root / "patterns.npz")
    labels = pd.read_csv(c.labels_csv, dtype={"patient_id": str})
    truth = pd.read_csv(c.truth_csv, dtype={"patient_id": str}).set_index("patient_id")
    motif = pat["motif"] / np.linalg.norm(pat["motif"])
    oracle, x5_only, x20_only = {}, {}, {}
    for pid, rows in labels.groupby("patient_id"):
        x5 = np.concatenate([torch.load(c.x5_features / "pt_files" / f"{s}.pt").numpy() for s in rows.pathology_id])
        x20 = np.concatenate([torch.load(c.x20_features / "pt_files" / f"{s}.pt").numpy() for s in rows.pathology_id])
        tumour = np.argmax(x5 @ pat["proto_x5"].T, axis=1) == 0  # nearest tissue prototype
        hits = ((x20 @ motif).reshape(-1, 16) > 2.0).sum(axis=1) >= 2  # motif rows in the block
        oracle[pid] = hits[tumour].mean() if tumour.any() else hits.mean()
        x5_only[pid] = tumour.mean()
        x20_only[pid] = hits.mean()
    pids = list(truth.index)
    t, e = truth.loc[pids, "t_event"].to_numpy(), np.ones(len(pids))
    c_true = _cindex(truth.loc[pids, "risk"].to_numpy(), t, e)
    c_oracle = _cindex(np.array([oracle[p] for p in pids]), t, e)
    c_x5 = _cindex(np.array([x5_only[p] for p in pids]), t, e)
    c_x20 = _cindex(np.array([x20_only[p] for p in pids]), t, e)
    print(f"C-index true risk {c_true:.3f} oracle {c_oracle:.3f} x20-only {c_x20:.3f} x5-only {c_x5:.3f}")
    assert c_true > 0.8
    assert c_oracle > 0.75
    assert abs(c_x5 - 0.5) < 0.08
    assert c_oracle > c_x20 + 0.05
    # the observed labels: ~35% censored
    e_obs = labels.groupby("patient_id").e.first()
    assert 0.25 <= 1 - e_obs.mean() <= 0.45
