"""synth -> convert -> read: every array read back equals the source, in source order."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from torch.utils.data import DataLoader, get_worker_info

from dsca.coords import patient_grid
from dsca.store import FeatureStore, PatientDataset, StoreError
from dsca.store.clam import read_coords
from dsca.store.convert import convert_cohort
from dsca.store.verify import store_info, verify_store


def _labels(path) -> dict[str, list[str]]:
    df = pd.read_csv(path, dtype=str)
    out: dict[str, list[str]] = {}
    for sid, pid in zip(df.pathology_id, df.patient_id):
        out.setdefault(pid, []).append(sid)
    return out


def test_float16_store_matches_sources(synth_cohort, synth_store, source_arrays):
    fs = FeatureStore.open(synth_store)
    assert fs.slide_ids == sorted(synth_cohort.slide_ids)
    assert fs.feature_dim == 32 and fs.dtype == np.float16 and fs.attrs["format"] == "dsca-store/1"
    for sid in fs.slide_ids:
        x5, x20 = source_arrays(synth_cohort, sid)
        s = fs.read_slide(sid)
        assert s.x5.dtype == np.float32 and s.x20.shape == (len(x5), 16, 32)
        np.testing.assert_array_equal(s.x5, x5.astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(s.x20.reshape(-1, 32), x20.astype(np.float16).astype(np.float32))
        low = read_coords(synth_cohort.x5_coords / "patches" / f"{sid}.h5")
        np.testing.assert_array_equal(s.coords, low.coords)  # source order, not re-sorted
        np.testing.assert_array_equal(s.grid, low.coords // low.step)
    assert fs.patient_slides() == {p: sorted(s) for p, s in _labels(synth_cohort.labels_csv).items()}


def test_float32_store_is_exact_and_direct_path_equals_zarr(synth_cohort, tmp_path, source_arrays):
    out = tmp_path / "f32.zarr"
    report = convert_cohort(x5_features=synth_cohort.x5_features / "h5_files", x20_features=synth_cohort.x20_features,
                            x5_coords=synth_cohort.x5_coords, out=out, dtype="float32", codec="zstd1", progress=False)
    assert report.ok and len(report.converted) == len(synth_cohort.slide_ids)
    fs = FeatureStore.open(out)
    root = zarr.open_group(out, mode="r")
    for sid in fs.slide_ids[:4]:
        x5, x20 = source_arrays(synth_cohort, sid)
        s = fs.read_slide(sid)
        np.testing.assert_array_equal(s.x5, x5)
        np.testing.assert_array_equal(s.x20.reshape(-1, 32), x20)
        assert fs._array(sid, "x20")[1] is not None  # the direct path was taken
        np.testing.assert_array_equal(s.x20, root[f"slides/{sid}/x20"][...])
        half = fs.read_slide(sid, dtype=np.float16)
        assert half.x20.dtype == np.float16
        np.testing.assert_array_equal(half.x20, x20.reshape(-1, 16, 32).astype(np.float16))


def test_direct_path_handles_many_chunks(synth_cohort, tmp_path, monkeypatch):
    # small inner chunks so that a slide spans several, with a partial last one
    monkeypatch.setattr("dsca.store._layout.CHUNK_BYTES", 16 * 32 * 2 * 6)
    out = tmp_path / "small.zarr"
    report = convert_cohort(x5_features=synth_cohort.x5_features, x20_features=synth_cohort.x20_features,
                            x5_coords=synth_cohort.x5_coords, out=out, codec="blosc-lz4", progress=False)
    assert report.ok
    fs = FeatureStore.open(out)
    root = zarr.open_group(out, mode="r")
    sid = max((s for s in fs.slide_ids if fs.n_patches(s) % 6), key=fs.n_patches)
    layout = fs._array(sid, "x20")[1]
    assert layout is not None and layout.n_chunks >= 3 and fs.n_patches(sid) % layout.chunk_rows
    np.testing.assert_array_equal(fs.read_slide(sid, dtype=np.float16).x20, root[f"slides/{sid}/x20"][...])
    # region reads touch only the chunks they need and equal slicing the full arrays
    full = fs.read_slide(sid)
    g = full.grid
    cols = slice(int(g[:, 0].min()), int(np.median(g[:, 0])) + 1)
    rows = slice(int(g[:, 1].min()) + 1, int(g[:, 1].max()))
    region = fs.read_region(sid, cols, rows)
    inside = (g[:, 0] >= cols.start) & (g[:, 0] < cols.stop) & (g[:, 1] >= rows.start) & (g[:, 1] < rows.stop)
    assert 0 < inside.sum() < len(g)
    np.testing.assert_array_equal(region.rows, np.flatnonzero(inside))
    for name in ("x5", "x20", "coords", "grid"):
        np.testing.assert_array_equal(getattr(region, name), getattr(full, name)[inside])
    empty = fs.read_region(sid, slice(0, 0), slice(0, 1))
    assert empty.x20.shape == (0, 16, 32)


def test_patient_reads_concatenate_in_given_order(synth_store):
    fs = FeatureStore.open(synth_store)
    pid, sids = next((p, s) for p, s in fs.patient_slides().items() if len(s) >= 2)
    order = list(reversed(sids))
    pat = fs.read_patient(order)
    parts = [fs.read_slide(s) for s in order]
    np.testing.assert_array_equal(pat.x5, np.concatenate([p.x5 for p in parts]))
    np.testing.assert_array_equal(pat.x20, np.concatenate([p.x20 for p in parts]))
    np.testing.assert_array_equal(pat.coords, patient_grid([p.coords for p in parts]))
    assert pat.lengths == [len(p.x5) for p in parts] and pat.slide_ids == order
    with pytest.raises(StoreError, match="not in the store"):
        fs.read_patient(["no-such-slide"])


def _tag_worker(sample):
    """collate_fn: runs in the DataLoader worker that loaded `sample`; says which one."""
    info = get_worker_info()
    return sample, (info.id if info is not None else None), os.getpid()


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataset_with_two_workers(synth_cohort, synth_store, context):
    patients = _labels(synth_cohort.labels_csv)
    df = pd.read_csv(synth_cohort.labels_csv, dtype={"patient_id": str}).groupby("patient_id").first()
    labels = pd.DataFrame({"t": df.t, "e": df.e, "y_t": df.t % 4, "y_c": 1 - df.e}).astype(float)
    ds = PatientDataset(synth_store, patients, labels=labels)
    # the parent touches zarr (its IO thread starts) before the workers fork
    FeatureStore.open(synth_store).read_slide(synth_cohort.slide_ids[0])
    seen, workers = {}, set()
    loader = DataLoader(ds, batch_size=None, num_workers=2, timeout=120, collate_fn=_tag_worker,
                        multiprocessing_context=context)
    for sample, worker, pid in loader:
        seen[sample.patient_id] = sample
        workers.add((worker, pid))
    assert sorted(seen) == sorted(patients)
    # both workers really loaded patients, in processes other than this one
    assert {w for w, _ in workers} == {0, 1} and os.getpid() not in {pid for _, pid in workers}
    pid = next(p for p, s in patients.items() if len(s) >= 2)
    s = seen[pid]
    direct = FeatureStore.open(synth_store).read_patient(patients[pid])
    assert s.x20.shape == (16 * len(s.x5), 32) and s.x20.dtype == torch.float32 and s.coords.dtype == torch.int64
    # block-major flattening: row 16*i + 4*r + c is sub-patch (c, r) of block i
    np.testing.assert_array_equal(s.x20.numpy()[16 * 3 + 4 * 2 + 1], direct.x20[3, 4 * 2 + 1])
    np.testing.assert_array_equal(s.x20.numpy(), direct.x20.reshape(-1, 32))
    np.testing.assert_array_equal(s.x5.numpy(), direct.x5)
    np.testing.assert_array_equal(s.coords.numpy(), direct.coords)
    np.testing.assert_array_equal(s.label.numpy(), labels.loc[pid, ["t", "e", "y_t", "y_c"]].to_numpy(np.float64))
    if context == "fork":
        assert torch.isnan(PatientDataset(synth_store, patients)[0].label).all()
        half = PatientDataset(synth_store, patients, dtype=torch.float16)[0]
        assert half.x5.dtype == torch.float16


def test_info_and_verify_on_clean_store(synth_cohort, synth_store):
    info = store_info(synth_store)
    assert info.slides == len(synth_cohort.slide_ids) and info.incomplete == 0
    assert info.patients == 20 and info.feature_dim == 32 and info.dtype == "float16"
    # codec "none": the shard holds the raw float16 bytes plus a 4-byte crc32c per chunk and its index
    assert 1.0 < info.ratio < 1.01
    report = verify_store(synth_store, progress=False)
    assert report.ok and report.slides == info.slides


@pytest.mark.filterwarnings("ignore:Consolidated metadata")
def test_other_layouts_fall_back_to_zarr(synth_cohort, tmp_path):
    # a store rewritten by another tool (no sharding, gzip): still readable, through zarr itself
    out = tmp_path / "s.zarr"
    assert convert_cohort(x5_features=synth_cohort.x5_features, x20_features=synth_cohort.x20_features,
                          x5_coords=synth_cohort.x5_coords, out=out, progress=False).ok
    sid = FeatureStore.open(out).slide_ids[0]
    group = zarr.open_group(out / "slides" / sid, mode="r+")
    x20 = group["x20"][...]
    del group["x20"]
    group.create_array("x20", data=x20, chunks=(7, 16, 32), compressors=[zarr.codecs.GzipCodec()])
    zarr.consolidate_metadata(out)
    fs = FeatureStore.open(out)
    assert fs._array(sid, "x20")[1] is None
    np.testing.assert_array_equal(fs.read_slide(sid).x20, x20.astype(np.float32))
    rows = fs.read_region(sid, slice(0, 10**6), slice(0, 10**6))
    np.testing.assert_array_equal(rows.x20, x20.astype(np.float32))
