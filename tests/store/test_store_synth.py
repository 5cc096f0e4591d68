"""The synthetic cohort: CLAM layout, determinism, and a planted signal that needs both streams."""
from __future__ import annotations

import filecmp

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from dsca.coords import discretize
from dsca.store.synth import SynthSpec, write_synthetic_cohort


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
