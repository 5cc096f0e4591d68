"""Damaged metadata on disk: the root attrs, a slide's attrs and the consolidated copy of them.

Every test damages a private copy of the session's `synth_store`. What FeatureStore reads is
the consolidated block of the root zarr.json (``consolidated_metadata.metadata["slides/<id>"]``
and ``[".../<array>"]``); what convert wrote for each slide is in its own zarr.json files.
Readers must never return rows that do not belong together, `verify` must report every
difference between the two copies, and neither `verify` nor `info` may show a traceback.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from dsca.store import FeatureStore, StoreError
from dsca.store.verify import store_info, verify_store

pytestmark = pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning")

Edit = Callable[[dict], None]


@pytest.fixture
def store(synth_store: Path, tmp_path: Path) -> Path:
    """A private copy of the session store that a test may damage."""
    out = tmp_path / "cohort.zarr"
    shutil.copytree(synth_store, out)
    return out


def _edit_json(path: Path, edit: Edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def _edit_root_attrs(store: Path, edit: Edit) -> None:
    _edit_json(store / "zarr.json", lambda doc: edit(doc["attributes"]))


def _edit_consolidated(store: Path, node: str, edit: Edit) -> None:
    """Edit only the consolidated copy of `node` ("slides/<id>" or "slides/<id>/<array>")."""
    _edit_json(store / "zarr.json", lambda doc: edit(doc["consolidated_metadata"]["metadata"][node]))


def _edit_own(store: Path, node: str, edit: Edit) -> None:
    """Edit only the node's own zarr.json."""
    _edit_json(store / node / "zarr.json", edit)


_DROP = object()  # _set_slide_attr: remove the attribute


def _set_slide_attr(store: Path, sid: str, key: str, value, consolidated: bool = True, own: bool = True) -> None:
    def edit(doc: dict) -> None:
        if value is _DROP:
            doc["attributes"].pop(key)
        else:
            doc["attributes"][key] = value

    if consolidated:
        _edit_consolidated(store, f"slides/{sid}", edit)
    if own:
        _edit_own(store, f"slides/{sid}", edit)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsca.cli.store_main", *args], capture_output=True, text=True,
                          check=False, timeout=300)


_REBUILD = "; rerun convert to rebuild it"


def _differs(diff: str) -> str:
    """verify's problem line for one difference between the two copies of the metadata."""
    return f"consolidated metadata differs from the slide's own: {diff}{_REBUILD}"


def _two_patients(fs: FeatureStore) -> tuple[str, str]:
    """Two slides of different patients."""
    by_patient = fs.patient_slides()
    a, b = sorted(by_patient)[:2]
    return by_patient[a][0], by_patient[b][0]


# --- 1. open never writes -----------------------------------------------------------------
@pytest.mark.parametrize("mode", ["w", "w-", "a", "x", "", "R"])
def test_open_refuses_modes_that_could_write(store, mode):
    before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"mode must be one of 'r', 'r\+'") as info:
        FeatureStore.open(store, mode=mode)
    assert repr(mode) in str(info.value)
    assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == before
    fs = FeatureStore.open(store, mode="r+")
    assert len(fs.slide_ids) == 28 and fs.read_slide(fs.slide_ids[0]).x5.shape[1] == 32
    # checked before the path: nothing is created where no store is
    missing = store.parent / "nothing.zarr"
    with pytest.raises(ValueError, match="mode"):
        FeatureStore.open(missing, mode="w")
    assert not missing.exists()


# --- 2. root attrs ---------------------------------------------------------------------------
def _drop(key: str) -> Edit:
    return lambda attrs: attrs.pop(key)


def _put(key: str, value) -> Edit:
    return lambda attrs: attrs.__setitem__(key, value)


@pytest.mark.parametrize(("edit", "attr"), [
    (_drop("dtype"), "dtype is missing"),
    (_put("dtype", "garbage"), "dtype is 'garbage'"),
    (_put("dtype", "float64"), "dtype is 'float64'"),
    (_put("dtype", 16), "dtype is 16"),
    (_put("feature_dim", "abc"), "feature_dim is 'abc'"),
    (_put("feature_dim", None), "feature_dim is null, but the store holds complete slides"),
    (_drop("feature_dim"), "feature_dim is missing"),
    (_put("feature_dim", 0), "feature_dim is 0"),
    (_put("feature_dim", 32.5), "feature_dim is 32.5"),
    (_put("feature_dim", True), "feature_dim is True"),
    (_put("scale", 2), "scale is 2"),
    (_put("scale", "4"), "scale is '4'"),
    (_drop("scale"), "scale is missing"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_root_attrs_are_one_store_error_at_open(store, edit, attr):
    _edit_root_attrs(store, edit)
    with pytest.raises(StoreError) as info:
        FeatureStore.open(store)
    msg = str(info.value)
    assert msg.startswith(f"{store}: root attribute {attr}") and "\n" not in msg
    with pytest.raises(StoreError, match="root attribute"):
        store_info(store)
    report = verify_store(store, progress=False)
    assert report.problems == [("<store>", msg)]

    if "garbage" not in attr and "abc" not in attr:
        return  # the CLI for two of them (a few seconds each)
    for command in ("info", "verify"):
        run = _cli("-q", command, str(store))
        assert run.returncode == (2 if command == "info" else 1), run.stderr
        assert "Traceback" not in run.stderr
        assert run.stderr.strip().splitlines() == [f"error: {msg}" if command == "info" else f"<store>: {msg}"]


def test_store_without_slides_may_lack_feature_dim(store):
    # what convert leaves before it knows the cohort's dim: readable, with nothing in it
    shutil.rmtree(store / "slides")
    (store / "slides").mkdir()
    (store / "slides" / "zarr.json").write_text(json.dumps({"attributes": {}, "zarr_format": 3,
                                                            "node_type": "group"}))
    _edit_json(store / "zarr.json", lambda doc: doc.pop("consolidated_metadata"))
    _edit_root_attrs(store, _put("feature_dim", None))
    fs = FeatureStore.open(store)
    assert fs.slide_ids == []
    with pytest.raises(StoreError, match="no feature_dim"):
        fs.feature_dim  # noqa: B018
    info = store_info(store)
    assert info.slides == 0 and info.feature_dim is None
    assert verify_store(store, progress=False).ok


# --- 3. the consolidated copy differs from the slides' own metadata -------------------------
def test_consolidated_n_patches_off_by_one(store):
    fs = FeatureStore.open(store)
    sid = fs.slide_ids[3]
    n = fs.n_patches(sid)
    _set_slide_attr(store, sid, "n_patches", n + 1, own=False)

    fs = FeatureStore.open(store)
    assert fs.n_patches(sid) == n + 1  # what every reader sees
    for read in (lambda: fs.read_slide(sid), lambda: fs.read_patient([sid]),
                 lambda: fs.read_region(sid, slice(0, 10**6), slice(0, 10**6))):
        with pytest.raises(StoreError, match=f"slide {sid}: x5, x20, coords(, grid)?: shapes disagree "
                                             f"with n_patches {n + 1}") as info:
            read()
        assert str(store) in str(info.value) and f"x5 ({n}, 32)" in str(info.value)

    report = verify_store(store, progress=False)
    assert report.problems == [(sid, _differs(f"n_patches {n + 1} vs {n}"))]


def test_consolidated_patient_id_of_another_slide(store):
    fs = FeatureStore.open(store)
    sid, other = _two_patients(fs)
    mine, theirs = fs.slide_attrs(sid)["patient_id"], fs.slide_attrs(other)["patient_id"]
    clean = fs.patient_slides()
    _set_slide_attr(store, sid, "patient_id", theirs, own=False)

    # the readers trust the consolidated copy: the slide now trains as another patient's
    moved = FeatureStore.open(store).patient_slides()
    assert sid in moved[theirs] and sid not in moved.get(mine, []) and moved != clean

    report = verify_store(store, progress=False)
    assert report.problems == [(sid, _differs(f'patient_id "{theirs}" vs "{mine}"'))]


@pytest.mark.parametrize("name", ["x5", "x20", "coords", "grid"])
def test_consolidated_array_shape_with_one_row_more(store, name):
    fs = FeatureStore.open(store)
    sid = fs.slide_ids[1]
    n = fs.n_patches(sid)
    own_shape = list(fs.read_array(sid, name).shape)
    shape = [n + 1, *own_shape[1:]]

    def grow(doc: dict) -> None:  # the array and its one shard, consistently: zarr reads it
        doc["shape"] = shape
        doc["chunk_grid"]["configuration"]["chunk_shape"] = shape
        doc["codecs"][0]["configuration"]["chunk_shape"][0] = n + 1

    _edit_consolidated(store, f"slides/{sid}/{name}", grow)
    fs = FeatureStore.open(store)
    assert fs._array(sid, name)[0].shape[0] == n + 1
    reads = {"read_slide": lambda: fs.read_slide(sid),
             "read_region": lambda: fs.read_region(sid, slice(0, 10**6), slice(0, 10**6))}
    if name != "grid":  # read_patient reads no grid
        reads["read_patient"] = lambda: fs.read_patient([sid])
    for what, read in reads.items():
        with pytest.raises(StoreError, match=f"slide {sid}: {name}: shapes disagree with n_patches {n}") as info:
            read()
        assert f"{name} {(n + 1, *own_shape[1:])}" in str(info.value), what

    problems = verify_store(store, progress=False).problems
    assert [sid_ for sid_, _ in problems] == [sid] * 3
    assert problems[0][1] == _differs(f"{name} chunk_grid {_grid(shape)} vs {_grid(own_shape)}")
    assert problems[1][1].startswith(_differs(f"{name} codecs [")[:-len(_REBUILD)])
    assert problems[1][1].endswith(_REBUILD)
    assert problems[2][1] == _differs(f"{name} shape {json.dumps(shape)} vs {json.dumps(own_shape)}")


def _grid(shape: list[int]) -> str:
    """A chunk_grid as verify shows it (JSON, cut at 60 characters)."""
    text = json.dumps({"configuration": {"chunk_shape": shape}, "name": "regular"}, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


@pytest.mark.parametrize("all_chunks", [True, False])
def test_consolidated_coords_shape_alone_never_reads_mismatched_rows(store, all_chunks):
    # only "shape" edited: zarr then sees two shards of which the second is missing; for a slide
    # of an older convert (no "all_chunks") that once read as x5 with n rows and coords with
    # n + 1, the last one the fill value (0, 0)
    fs = FeatureStore.open(store)
    sid = fs.slide_ids[0]
    n = fs.n_patches(sid)
    if not all_chunks:
        _set_slide_attr(store, sid, "all_chunks", _DROP)
    _edit_consolidated(store, f"slides/{sid}/coords", lambda doc: doc.__setitem__("shape", [n + 1, 2]))
    with pytest.raises(StoreError, match=f"slide {sid}: coords: shapes disagree with n_patches {n}"):
        FeatureStore.open(store).read_slide(sid)
    problems = verify_store(store, progress=False).problems
    assert problems == [(sid, _differs(f"coords shape [{n + 1}, 2] vs [{n}, 2]"))]


def test_array_only_in_one_copy_is_reported(store):
    fs = FeatureStore.open(store)
    sid = fs.slide_ids[5]
    _edit_json(store / "zarr.json", lambda doc: doc["consolidated_metadata"]["metadata"].pop(f"slides/{sid}/grid"))
    with pytest.raises(StoreError, match=f"slide {sid}: grid: array missing"):
        FeatureStore.open(store).read_slide(sid)
    assert verify_store(store, progress=False).problems == [(sid, _differs("grid is in the slide's own metadata only"))]


def test_metadata_and_attr_damage_through_the_cli(store):
    fs = FeatureStore.open(store)
    ids = fs.slide_ids
    a, b, c, d = ids[0], ids[4], ids[8], ids[12]
    n_a = fs.n_patches(a)
    _set_slide_attr(store, a, "n_patches", n_a + 1, own=False)
    _set_slide_attr(store, b, "patient_id", "SOMEONE-ELSE", own=False)
    n_c = fs.n_patches(c)
    _edit_consolidated(store, f"slides/{c}/x5", lambda doc: doc.__setitem__("shape", [n_c - 1, 32]))
    _set_slide_attr(store, d, "n_patches", "abc")  # both copies: no difference, a bad value

    run = _cli("-q", "verify", str(store))
    assert run.returncode == 1, run.stdout + run.stderr
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 4, run.stderr
    by_slide = {line.split(": ", 1)[0]: line for line in lines}
    assert set(by_slide) == {a, b, c, d}
    assert f"n_patches {n_a + 1} vs {n_a}" in by_slide[a]
    assert 'patient_id "SOMEONE-ELSE" vs' in by_slide[b]
    assert f"x5 shape [{n_c - 1}, 32] vs [{n_c}, 32]" in by_slide[c]
    assert "attribute n_patches is 'abc'" in by_slide[d]
    assert run.stdout.strip() == "verified 28 slides: 4 problems"

    run = _cli("info", str(store))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [
        f"error: {store}: slide {d}: attribute n_patches is 'abc', expected an integer >= 1 (run dsca-store verify)"]


# --- 4. and 5. slide attrs that are not numbers --------------------------------------------
@pytest.mark.parametrize(("key", "value", "expected"), [
    ("n_patches", "abc", "attribute n_patches is 'abc', expected an integer >= 1"),
    ("n_patches", _DROP, "attribute n_patches is missing"),
    ("n_patches", None, "attribute n_patches is None, expected an integer >= 1"),
    ("n_patches", 13.5, "attribute n_patches is 13.5, expected an integer >= 1"),
    ("step", "abc", "attribute step is 'abc', expected two positive integers"),
    ("step", [4096], "attribute step is [4096], expected two positive integers"),
    ("grid_collisions", "abc", "attribute grid_collisions is 'abc', expected an integer >= 0"),
    ("grid_collisions", -1, "attribute grid_collisions is -1, expected an integer >= 0"),
    ("patient_id", 17, "attribute patient_id is 17, expected a string"),
    ("sources", "abc", "attribute sources is unreadable"),
], ids=lambda v: "" if v is _DROP else str(v)[:30])
def test_slide_attr_that_is_not_a_number_is_that_slides_problem(store, key, value, expected):
    fs = FeatureStore.open(store)
    sid = fs.slide_ids[2]
    _set_slide_attr(store, sid, key, value)  # both copies alike: only the value is wrong

    report = verify_store(store, progress=False)
    assert report.slides == 28
    assert len(report.problems) == 1, report.problems
    got_sid, reason = report.problems[0]
    assert got_sid == sid and reason.startswith(expected) and "\n" not in reason

    with pytest.raises(StoreError) as info:
        store_info(store)
    assert str(info.value).startswith(f"{store}: slide {sid}: {expected}")

    fs = FeatureStore.open(store)
    if key == "n_patches":
        with pytest.raises(StoreError, match=f"slide {sid}: attribute n_patches"):
            fs.read_slide(sid)
    other = fs.slide_ids[0]  # the other slides read as before
    assert fs.read_slide(other).x5.shape == (fs.n_patches(other), 32)


def test_info_of_slide_attr_damage_is_one_line(store):
    sid = FeatureStore.open(store).slide_ids[6]
    _set_slide_attr(store, sid, "n_patches", _DROP)
    run = _cli("info", str(store))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [
        f"error: {store}: slide {sid}: attribute n_patches is missing (run dsca-store verify)"]
    run = _cli("-q", "verify", str(store))
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [
        f"{sid}: attribute n_patches is missing (in slides/{sid}/zarr.json; convert it again with --overwrite)"]


def test_clean_store_has_no_metadata_differences(store):
    report = verify_store(store, progress=False)
    assert report.ok and report.slides == 28
    fs = FeatureStore.open(store)
    for sid in fs.slide_ids[:3]:
        slide = fs.read_slide(sid)
        assert len(slide.x5) == len(slide.x20) == len(slide.coords) == len(slide.grid) == fs.n_patches(sid)
    assert np.isfinite(fs.read_patient(fs.slide_ids[:2]).x5).all()
