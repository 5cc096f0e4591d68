"""Damaged stores on disk: every read either returns the stored values or raises StoreError
naming the slide and the array, never wrong data silently, a MemoryError or shifted rows.

Each test damages a private copy of the session's `synth_store` (the direct read path's
layout: one shard file per array, raw float16 chunks + crc32c, index + crc32c at the end).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import yaml
import zarr

from dsca.cli.dsca_main import main
from dsca.store import FeatureStore, PatientDataset, StoreError

_MISSING = 2**64 - 1

# zarr warns on every use of consolidated metadata; the store relies on it knowingly
pytestmark = pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning")


@pytest.fixture
def store(synth_store: Path, tmp_path: Path) -> Path:
    """A private copy of the session store that a test may damage."""
    out = tmp_path / "cohort.zarr"
    shutil.copytree(synth_store, out)
    return out


def _first_slide(store: Path) -> str:
    return FeatureStore.open(store).slide_ids[0]


def _shard(store: Path, sid: str, name: str) -> Path:
    ndim = len(zarr.open_array(store / "slides" / sid / name, mode="r").shape)
    return store / "slides" / sid / name / "c" / "/".join("0" * ndim)


def _n_chunks(store: Path, sid: str, name: str) -> int:
    layout = FeatureStore.open(store)._array(sid, name)[1]
    assert layout is not None, "the store must take the direct path"
    return layout.n_chunks


def _read_index(path: Path, n_chunks: int) -> np.ndarray:
    raw = path.read_bytes()[-(16 * n_chunks + 4):]
    return np.frombuffer(raw[:-4], dtype="<u8").reshape(n_chunks, 2).copy()


def _write_index(path: Path, index: np.ndarray) -> None:
    """Replace the shard's index, with a valid crc32c: only the bounds checks can catch it."""
    data = bytearray(path.read_bytes())
    body = index.astype("<u8").tobytes()
    data[-(len(body) + 4):] = body + google_crc32c.value(body).to_bytes(4, "little")
    path.write_bytes(bytes(data))


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def _set_all_chunks(store: Path, sid: str, value: bool) -> None:
    """Mark `sid` as a slide of the current convert (every chunk written, attr all_chunks) or
    of an older one (attr absent), in its own zarr.json and in the root's consolidated metadata
    that FeatureStore reads."""

    def edit(attrs: dict) -> None:
        if value:
            attrs["all_chunks"] = True
        else:
            attrs.pop("all_chunks", None)

    slide_json = store / "slides" / sid / "zarr.json"
    meta = json.loads(slide_json.read_text())
    edit(meta["attributes"])
    slide_json.write_text(json.dumps(meta))
    root_json = store / "zarr.json"
    root = json.loads(root_json.read_text())
    edit(root["consolidated_metadata"]["metadata"][f"slides/{sid}"]["attributes"])
    root_json.write_text(json.dumps(root))
    assert FeatureStore.open(store).slide_attrs(sid).get("all_chunks", False) is value


def _raises_naming(store: Path, sid: str, name: str, match: str, **open_kw) -> StoreError:
    fs = FeatureStore.open(store, **open_kw)
    with pytest.raises(StoreError, match=match) as info:
        fs.read_slide(sid)
    msg = str(info.value)
    assert f"slide {sid}: {name}:" in msg and str(store) in msg and "\n" not in msg
    return info.value


# --- chunk payloads -------------------------------------------------------------------------
def test_flipped_payload_byte_is_caught_by_checked_reads(store):
    sid = _first_slide(store)
    clean = FeatureStore.open(store).read_slide(sid, dtype=np.float16)
    shard = _shard(store, sid, "x20")
    offset, nbytes = _read_index(shard, _n_chunks(store, sid, "x20"))[0]
    _flip(shard, int(offset + nbytes // 2))

    _raises_naming(store, sid, "x20", r"chunk 0 corrupt \(crc32c mismatch\)", checked=True)
    # the default is checked
    assert FeatureStore.open(store).checked
    with pytest.raises(StoreError, match="x20"):
        FeatureStore.open(store).read_patient([sid])

    # unchecked: the index still vouches for the layout, so exactly the flipped value differs
    damaged = FeatureStore.open(store, checked=False).read_slide(sid, dtype=np.float16)
    differs = damaged.x20.view(np.uint16) != clean.x20.view(np.uint16)
    assert differs.sum() == 1
    np.testing.assert_array_equal(damaged.x5, clean.x5)


def test_flipped_crc_byte_is_caught(store):
    sid = _first_slide(store)
    shard = _shard(store, sid, "x5")
    offset, nbytes = _read_index(shard, _n_chunks(store, sid, "x5"))[0]
    _flip(shard, int(offset + nbytes - 1))
    _raises_naming(store, sid, "x5", "crc32c mismatch", checked=True)


# --- the shard index ------------------------------------------------------------------------
def _corrupt_index(store: Path, sid: str, how: str) -> None:
    shard = _shard(store, sid, "x20")
    n = _n_chunks(store, sid, "x20")
    index = _read_index(shard, n)
    size = shard.stat().st_size
    if how == "flipped byte":  # caught by the index's crc32c
        _flip(shard, size - 16 * n - 4 + 3)
        return
    if how == "offset beyond file":
        index[0, 0] = size + 1000
    elif how == "huge nbytes":  # once a MemoryError (bytearray of ~2^63 bytes)
        index[0, 1] = 2**63
    elif how == "shifted offset":  # would read rows shifted by a byte
        index[0, 0] += 2
    elif how == "short nbytes":
        index[0, 1] -= 64
    elif how == "half missing":
        index[0, 0] = _MISSING
    _write_index(shard, index)


@pytest.mark.parametrize("how", ["flipped byte", "offset beyond file", "huge nbytes", "shifted offset",
                                 "short nbytes", "half missing"])
@pytest.mark.parametrize("checked", [True, False])
def test_corrupt_shard_index_is_a_store_error(store, how, checked):
    sid = _first_slide(store)
    _corrupt_index(store, sid, how)
    _raises_naming(store, sid, "x20", r"shard index corrupt \(", checked=checked)
    with pytest.raises(StoreError, match="shard index corrupt"):
        FeatureStore.open(store, checked=checked).read_region(sid, slice(0, 1000), slice(0, 1000))


def test_overlapping_chunks_are_a_store_error(synth_cohort, tmp_path, monkeypatch):
    # several chunks per shard (small inner chunks): point chunk 1 into chunk 0
    from dsca.store.convert import convert_cohort

    monkeypatch.setattr("dsca.store._layout.CHUNK_BYTES", 16 * 32 * 2 * 6)
    out = tmp_path / "small.zarr"
    report = convert_cohort(x5_features=synth_cohort.x5_features, x20_features=synth_cohort.x20_features,
                            x5_coords=synth_cohort.x5_coords, out=out, progress=False)
    assert report.ok
    sid = _first_slide(out)
    n = _n_chunks(out, sid, "x20")
    assert n >= 3
    shard = _shard(out, sid, "x20")
    index = _read_index(shard, n)
    index[1, 0] = index[0, 0] + 16
    _write_index(shard, index)
    _raises_naming(out, sid, "x20", r"shard index corrupt \(chunks 0 and 1 overlap\)", checked=False)


@pytest.mark.parametrize("codec", ["zstd1", "blosc-lz4"])
def test_damaged_compressed_chunk_is_a_store_error(synth_cohort, tmp_path, codec):
    from dsca.store.convert import convert_cohort

    out = tmp_path / f"{codec}.zarr"
    report = convert_cohort(x5_features=synth_cohort.x5_features, x20_features=synth_cohort.x20_features,
                            x5_coords=synth_cohort.x5_coords, out=out, codec=codec, progress=False)
    assert report.ok
    sid = _first_slide(out)
    shard = _shard(out, sid, "x20")
    index = _read_index(shard, _n_chunks(out, sid, "x20"))
    offset, nbytes = (int(v) for v in index[0])
    _flip(shard, offset + 8)  # inside the codec's header or first block
    _raises_naming(out, sid, "x20", r"chunk 0 corrupt \(crc32c mismatch\)", checked=True)
    try:  # unchecked: the codec may or may not notice, but nothing but a StoreError escapes
        FeatureStore.open(out, checked=False).read_slide(sid)
    except StoreError as err:
        assert f"slide {sid}: x20: chunk 0" in str(err)
    # a payload cut short (index consistent, crc32c valid): never a bare codec error
    index[0, 1] = nbytes // 2
    _write_index(shard, index)
    with pytest.raises(StoreError, match=f"slide {sid}: x20: chunk 0"):
        FeatureStore.open(out, checked=False).read_slide(sid)


@pytest.mark.parametrize("keep", ["half", "all but one byte", "nothing"])
def test_truncated_shard_is_a_store_error(store, keep):
    sid = _first_slide(store)
    shard = _shard(store, sid, "x20")
    data = shard.read_bytes()
    shard.write_bytes(data[: {"half": len(data) // 2, "all but one byte": len(data) - 1, "nothing": 0}[keep]])
    for checked in (True, False):
        _raises_naming(store, sid, "x20", "shard index corrupt", checked=checked)


# --- missing chunks and shards ----------------------------------------------------------------
def _drop_chunk(store: Path, sid: str, name: str) -> None:
    shard = _shard(store, sid, name)
    index = _read_index(shard, _n_chunks(store, sid, name))
    index[0] = _MISSING
    _write_index(shard, index)


def test_missing_chunk_of_all_chunks_slide_is_a_store_error(store):
    sid = _first_slide(store)
    _set_all_chunks(store, sid, True)
    _drop_chunk(store, sid, "x20")
    _raises_naming(store, sid, "x20", r"chunk 0 missing: deleted or never written", checked=False)


def test_missing_chunk_of_old_slide_reads_as_fill_value(store):
    # slides written before "all_chunks" may have had all-zero chunks elided by zarr
    sid = _first_slide(store)
    _set_all_chunks(store, sid, False)
    _drop_chunk(store, sid, "x20")
    slide = FeatureStore.open(store).read_slide(sid)
    assert not slide.x20.any() and slide.x5.any()


def test_deleted_shard_of_all_chunks_slide_is_a_store_error(store):
    sid = _first_slide(store)
    _set_all_chunks(store, sid, True)
    _shard(store, sid, "x20").unlink()
    _raises_naming(store, sid, "x20", r"shard file missing: deleted or never written")


def test_deleted_shard_of_old_slide_reads_as_fill_value_with_a_warning(store, caplog):
    sid = _first_slide(store)
    _set_all_chunks(store, sid, False)
    _shard(store, sid, "x20").unlink()
    with caplog.at_level(logging.WARNING, logger="dsca.store"):
        slide = FeatureStore.open(store).read_slide(sid)
    assert not slide.x20.any()
    assert any(f"slide {sid}: x20" in r.getMessage() and "fill value" in r.getMessage() for r in caplog.records)


def _rewrite_unsharded(store: Path, sid: str) -> None:
    """x20 of `sid` in another layout (no sharding: one file per chunk): the zarr fallback."""
    fs = FeatureStore.open(store)
    x20 = fs.read_array(sid, "x20")
    group = zarr.open_group(store / "slides" / sid, mode="r+")
    del group["x20"]
    group.create_array("x20", data=x20, chunks=(7, 16, x20.shape[2]), compressors=[zarr.codecs.GzipCodec()])
    zarr.consolidate_metadata(store)
    assert FeatureStore.open(store)._array(sid, "x20")[1] is None  # zarr's pipeline reads it


def test_zarr_fallback_missing_chunk_file_of_all_chunks_slide(store):
    sid = _first_slide(store)
    _rewrite_unsharded(store, sid)
    clean = FeatureStore.open(store).read_slide(sid)
    _set_all_chunks(store, sid, True)
    np.testing.assert_array_equal(FeatureStore.open(store).read_slide(sid).x20, clean.x20)
    (store / "slides" / sid / "x20" / "c" / "0" / "0" / "0").unlink()
    _raises_naming(store, sid, "x20", r"1 of \d+ chunks missing: deleted or never written")


def test_zarr_fallback_corrupt_chunk_names_the_slide(store):
    sid = _first_slide(store)
    _rewrite_unsharded(store, sid)
    chunk = store / "slides" / sid / "x20" / "c" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-10])  # a truncated gzip stream
    _raises_naming(store, sid, "x20", "cannot decode")


def test_rows_beyond_the_array_are_a_store_error(store):
    # a grid_index pointing past the slide (a damaged but checksum-valid value) must not index
    # into the next chunk or beyond
    sid = _first_slide(store)
    fs = FeatureStore.open(store)
    n = fs.n_patches(sid)
    with pytest.raises(StoreError, match=f"slide {sid}: x20: rows .* the array has {n}"):
        fs._read_into(sid, "x20", np.empty((1, 16, 32), np.float32), np.array([n + 5]))


def test_patient_dataset_forwards_checked(store):
    sid = _first_slide(store)
    shard = _shard(store, sid, "x20")
    offset, _ = _read_index(shard, _n_chunks(store, sid, "x20"))[0]
    _flip(shard, int(offset + 10))
    assert PatientDataset(store, {"p": [sid]}, checked=False)[0].x20.shape[1] == 32
    with pytest.raises(StoreError, match=f"slide {sid}: x20: chunk 0 corrupt"):
        PatientDataset(store, {"p": [sid]})[0]


# --- dsca train on a damaged store ----------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 2])
def test_train_on_damaged_chunk_exits_with_one_line(store, synth_cohort, tmp_path, capsys, workers):
    # a slide of a training patient of fold 0: read in the first epoch
    with np.load(synth_cohort.splits[0]) as split:
        patient = str(split["train_patients"][0])
    sid = FeatureStore.open(store).patient_slides()[patient][0]
    shard = _shard(store, sid, "x20")
    offset, nbytes = _read_index(shard, _n_chunks(store, sid, "x20"))[0]
    _flip(shard, int(offset + nbytes // 3))
    cfg = {
        "store": str(store), "labels": str(synth_cohort.labels_csv),
        "splits": str(synth_cohort.splits[0]).replace("fold0", "fold{}"),
        "dims": "32-16-16-4", "tra_nhead": 2, "opt": "adam", "lr": 1e-3, "epochs": 1,
        "bp_every_iters": 4, "folds": [0], "eval_bootstrap": 10, "num_threads": 1, "seed": 3,
        "num_workers": workers,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["train", "-q", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("dsca train: error:")]
    assert len(lines) == 1, err
    assert f"slide {sid}: x20: chunk 0 corrupt (crc32c mismatch)" in lines[0]
    assert "DataLoader" not in lines[0]

