"""Nothing lost, nothing stale, nothing half-written: hostile ids, changed sources, full disks.

Every test runs the real CLI (or convert_cohort) on real CLAM-layout files on disk.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from dsca.store import FeatureStore
from dsca.store.convert import convert_cohort
from dsca.store.verify import store_info, verify_store


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsca.cli.store_main", *args], capture_output=True, text=True,
                          timeout=timeout)


def _convert_args(c, out: Path, *extra: str) -> list[str]:
    return ["convert", "--x5-features", str(c.x5_features), "--x20-features", str(c.x20_features),
            "--x5-coords", str(c.x5_coords), "--x20-coords", str(c.x20_coords), "--labels", str(c.labels_csv),
            "--out", str(out), *extra]


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """relative path -> (size, mtime_ns) of every file under root."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


def _convert(c, out: Path, **kw):
    return convert_cohort(x5_features=c.x5_features, x20_features=c.x20_features, x5_coords=c.x5_coords,
                          x20_coords=c.x20_coords, labels=c.labels_csv, out=out, progress=False, **kw)


HOSTILE = [".", "..", "a\\b", "zarr.json", "x.partial", "y.tmp", ".hidden", " lead", "ctl\x01id", "new\nline"]


def test_hostile_slide_ids_are_refused_and_nothing_else_is_touched(cohort_copy, tmp_path):
    c = cohort_copy
    out = tmp_path / "store.zarr"
    assert _convert(c, out).ok
    before = {k: v for k, v in _tree(out / "slides").items() if k != "zarr.json"}
    good = c.slide_ids[0]
    # feature and coords files whose stems are the hostile ids (`..pt` has the stem `.`)
    for sid in HOSTILE:
        for folder, suffix in ((c.x5_features / "pt_files", ".pt"), (c.x20_features / "pt_files", ".pt"),
                               (c.x5_coords / "patches", ".h5"), (c.x20_coords / "patches", ".h5")):
            shutil.copy(folder / f"{good}{suffix}", folder / f"{sid}{suffix}")
    run = _cli("-q", *_convert_args(c, out))
    assert run.returncode == 1, run.stderr
    lines = run.stderr.splitlines()
    for sid in HOSTILE:
        shown = sid if sid.isprintable() else repr(sid)  # one line per slide, also for an id with a newline
        assert sum(line.startswith(f"{shown}: slide id") for line in lines) == 1, (sid, run.stderr)
    assert len(lines) == len(HOSTILE), run.stderr
    # every finished slide is still there, byte for byte, and nothing else appeared
    after = {k: v for k, v in _tree(out / "slides").items() if k != "zarr.json"}
    assert after == before
    assert sorted(p.name for p in out.iterdir()) == ["slides", "zarr.json"]
    fs = FeatureStore.open(out)
    assert fs.slide_ids == sorted(c.slide_ids)
    assert verify_store(out, progress=False).ok


def test_changed_sources_are_converted_again_and_verify_names_them(cohort_copy, tmp_path):
    c = cohort_copy
    out = tmp_path / "store.zarr"
    assert _convert(c, out, dtype="float32").ok
    changed, touched = c.slide_ids[0], c.slide_ids[1]
    # re-extracted into the same folders: same shape, other values, in both copies
    for folder in (c.x5_features,):
        pt = folder / "pt_files" / f"{changed}.pt"
        x = torch.load(pt, weights_only=True) + 1.0
        torch.save(x, pt)
        with h5py.File(folder / "h5_files" / f"{changed}.h5", "r+") as f:
            f["features"][...] = x.numpy()
    # touched only: same bytes, newer mtime
    p = c.x20_features / "pt_files" / f"{touched}.pt"
    os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))

    report = verify_store(out, progress=False, sources=True)
    assert [sid for sid, _ in report.problems] == [changed]
    assert "x5_features pt_files" in report.problems[0][1] and "changed" in report.problems[0][1]

    run = _cli(*_convert_args(c, out, "--dtype", "float32"))
    assert run.returncode == 0, run.stderr
    assert "converted 1 (1 again: sources changed)" in run.stdout
    assert f"{changed}: sources changed since it was converted" in run.stderr
    fs = FeatureStore.open(out)
    np.testing.assert_array_equal(fs.read_slide(changed).x5, x.numpy())
    assert verify_store(out, progress=False, sources=True).ok
    # a moved cohort is the same cohort: compared by content, nothing to redo
    moved = tmp_path / "moved"
    shutil.move(c.root, moved)
    mc = type(c)(**{k: (moved / Path(v).relative_to(c.root)) if isinstance(v, Path) and c.root in Path(v).parents
                    else v for k, v in vars(c).items() if k in c.__dataclass_fields__})
    run = _cli(*_convert_args(mc, out, "--dtype", "float32"))
    assert run.returncode == 0 and "converted 0," in run.stdout, run.stdout + run.stderr
    # ... whose new paths are recorded: verify --sources agrees, and the next run reads no file again
    assert FeatureStore.open(out).slide_attrs(changed)["sources"]["x5_features"]["path"].startswith(str(moved))
    assert verify_store(out, progress=False, sources=True).ok


def test_a_failed_first_convert_leaves_no_store(cohort_copy, tmp_path):
    c = cohort_copy
    for p in (c.x20_features / "pt_files").iterdir():
        p.unlink()
    shutil.rmtree(c.x20_features / "h5_files")
    (c.x20_features / "h5_files").mkdir()
    out = tmp_path / "store.zarr"
    run = _cli("-q", *_convert_args(c, out))
    assert run.returncode == 1
    assert not out.exists()
    # the same into an existing empty folder: the folder stays, empty
    out.mkdir()
    assert _cli("-q", *_convert_args(c, out)).returncode == 1
    assert out.is_dir() and not any(out.iterdir())


def test_info_reports_the_codec_in_use_and_an_empty_verify_is_clear(cohort_copy, tmp_path):
    c = cohort_copy
    out = tmp_path / "store.zarr"
    assert _convert(c, out).ok
    assert store_info(out).codec == "none"
    assert _convert(c, out, overwrite=True, codec="zstd3").ok
    info = store_info(out)
    assert info.codec == "zstd3" and "codec zstd3" in "\n".join(info.lines())
    # a store without its slides/ group: one problem line, no traceback
    shutil.rmtree(out / "slides")
    run = _cli("verify", str(out))
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "no slides/ group" in run.stderr


def test_deleted_chunk_file_is_found_by_verify(cohort_copy, tmp_path):
    c = cohort_copy
    out = tmp_path / "store.zarr"
    assert _convert(c, out).ok
    sid = c.slide_ids[2]
    shard = next((out / "slides" / sid / "x20" / "c").rglob("*"))
    while shard.is_dir():
        shard = next(shard.iterdir())
    shard.unlink()
    run = _cli("verify", str(out))
    assert run.returncode == 1, run.stdout
    lines = [line for line in run.stderr.splitlines() if line.startswith(f"{sid}: ")]
    assert len(lines) == 1 and "x20" in lines[0], run.stderr


def test_progress_is_logged_when_stderr_is_not_a_terminal(cohort_copy, tmp_path):
    run = _cli(*_convert_args(cohort_copy, tmp_path / "store.zarr"))
    assert run.returncode == 0, run.stderr
    progress = [line for line in run.stderr.splitlines() if "dsca.progress: convert:" in line]
    n = len(cohort_copy.slide_ids)
    assert len(progress) >= 5 and progress[-1].split("convert: ")[1].startswith(f"{n}/{n} slides (100%)"), run.stderr


# --- a full disk -----------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """f(size) -> a fresh tmpfs of that size (needs root and mount; skipped elsewhere)."""
    mounts: list[Path] = []

    def make(size: str) -> Path:
        point = tmp_path / f"disk{len(mounts)}"
        point.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
        mounts.append(point)
        return point

    yield make
    for point in mounts:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def _leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.name.endswith((".partial", ".tmp"))]


@pytest.mark.parametrize("size", ["8k", "160k"])
def test_a_full_disk_is_one_line_and_leaves_a_consistent_store(cohort_copy, small_disk, size):
    disk = small_disk(size)
    out = disk / "store.zarr"
    run = _cli("-q", *_convert_args(cohort_copy, out, "--dtype", "float32"))
    assert run.returncode == 2, run.stdout + run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "No space left on device" in lines[0], run.stderr
    assert _leftovers(disk) == []
    if out.exists():  # some slides fit: exactly those are there, complete and sound
        fs = FeatureStore.open(out)
        assert fs.slide_ids and set(fs.slide_ids) < set(cohort_copy.slide_ids)
        assert verify_store(out, progress=False).ok
        assert {p.name for p in (out / "slides").iterdir()} == set(fs.slide_ids) | {"zarr.json"}
    else:
        assert list(disk.iterdir()) == []


def test_jobs_are_checked_and_capped(cohort_copy, tmp_path):
    run = _cli("-q", *_convert_args(cohort_copy, tmp_path / "a.zarr", "--jobs", "0"))
    assert run.returncode == 2 and run.stderr.strip() == "error: --jobs must be at least 1, got 0"
    assert not (tmp_path / "a.zarr").exists()
    run = _cli(*_convert_args(cohort_copy, tmp_path / "b.zarr", "--jobs", "999"))
    assert run.returncode == 0, run.stderr
    cores = len(os.sched_getaffinity(0))
    assert f"--jobs 999 is more than the {cores} CPU cores available; using {cores}" in run.stderr


def test_two_first_converts_at_once_never_destroy_each_other(cohort_copy, tmp_path):
    for attempt in range(3):
        out = tmp_path / f"race{attempt}.zarr"
        cmd = [sys.executable, "-m", "dsca.cli.store_main", "-q", *_convert_args(cohort_copy, out)]
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
        codes = sorted(code for code, _ in results)
        # one wins; the other is refused, or ran after it and found everything complete
        assert codes in ([0, 0], [0, 2]), results
        assert all("Traceback" not in err for _, err in results)
        if codes == [0, 2]:
            assert any("being written by another convert" in err for _, err in results)
        assert FeatureStore.open(out).slide_ids == sorted(cohort_copy.slide_ids)
        assert verify_store(out, progress=False).ok


def test_a_rerun_takes_patient_ids_from_the_labels_and_names_slides_without_sources(cohort_copy, tmp_path, caplog):
    import pandas as pd

    c = cohort_copy
    out = tmp_path / "store.zarr"
    unlabelled = convert_cohort(x5_features=c.x5_features, x20_features=c.x20_features, x5_coords=c.x5_coords,
                                x20_coords=c.x20_coords, out=out, progress=False)
    assert unlabelled.ok and FeatureStore.open(out).patient_slides() == {}
    # the labels come later: a rerun with them gives every complete slide its patient
    assert _convert(c, out).skipped == sorted(c.slide_ids)
    df = pd.read_csv(c.labels_csv, dtype=str)
    assert FeatureStore.open(out).patient_slides() == {p: sorted(g.pathology_id) for p, g in df.groupby("patient_id")}
    # a corrected table moves one slide to another patient
    moved = df.pathology_id.iloc[0]
    df.loc[df.pathology_id == moved, "patient_id"] = "SYN-NEW"
    df.to_csv(c.labels_csv, index=False)
    assert _convert(c, out).ok
    assert FeatureStore.open(out).slide_attrs(moved)["patient_id"] == "SYN-NEW"
    # a slide whose files are gone stays, and the run says so
    gone = c.slide_ids[-1]
    for folder, suffix in ((c.x5_features / "pt_files", ".pt"), (c.x5_features / "h5_files", ".h5"),
                           (c.x20_features / "pt_files", ".pt"), (c.x20_features / "h5_files", ".h5"),
                           (c.x5_coords / "patches", ".h5"), (c.x20_coords / "patches", ".h5")):
        (folder / f"{gone}{suffix}").unlink()
    df[df.pathology_id != gone].to_csv(c.labels_csv, index=False)
    caplog.clear()
    assert _convert(c, out).ok
    assert any(f"1 complete slides of {out} have no source files in this run ({gone})" in r.getMessage()
               for r in caplog.records)
    assert gone in FeatureStore.open(out).slide_ids


def test_level_attrs_and_encoder_are_part_of_what_a_rerun_compares(cohort_copy, tmp_path):
    c = cohort_copy
    out = tmp_path / "store.zarr"
    sid = c.slide_ids[0]
    import h5py

    for p in (c.x5_coords / "patches").iterdir():  # another tool's files: no downsample
        with h5py.File(p, "r+") as f:
            ds = f["coords"].attrs["downsample"].tolist()
            del f["coords"].attrs["downsample"]
    given = f"downsample={ds[0]}x{ds[1]}"
    run = _cli("-q", *_convert_args(c, out, "--x5-attrs", given))
    assert run.returncode == 0, run.stderr
    assert FeatureStore.open(out).slide_attrs(sid)["given_attrs"]["x5"] == {"downsample": ds}
    run = _cli(*_convert_args(c, out, "--x5-attrs", f"downsample={ds[0] * 1.0001}x{ds[1]}"))
    assert run.returncode == 0 and "level attributes given on the command line changed" in run.stderr, run.stderr
    n = len(c.slide_ids)
    assert f"converted {n} ({n} again" in run.stdout
    # features of another encoder into the same store are refused when the encoder is named
    run = _cli("-q", *_convert_args(c, out, "--x5-attrs", given, "--extractor", "uni_v1"))
    assert run.returncode == 2 and "holds features of 'feats-l2-s256-synth', these are 'uni_v1'" in run.stderr


def test_ids_that_differ_only_in_unicode_form_are_one_slide(cohort_copy, tmp_path):
    import unicodedata

    c = cohort_copy
    good = c.slide_ids[0]
    composed, decomposed = "caf\u00e9", unicodedata.normalize("NFD", "caf\u00e9")
    for sid in (composed, decomposed):
        shutil.copy(c.x5_features / "pt_files" / f"{good}.pt", c.x5_features / "pt_files" / f"{sid}.pt")
    report = _convert(c, tmp_path / "store.zarr")
    reasons = dict(report.failures)
    assert "differing only in case or unicode form" in reasons[composed] and decomposed in reasons


def test_a_fifo_named_like_a_feature_file_is_reported_not_read(cohort_copy, tmp_path):
    c = cohort_copy
    os.mkfifo(c.x5_features / "pt_files" / "PIPE.pt")
    run = _cli("-q", *_convert_args(c, tmp_path / "store.zarr"), timeout=120)
    assert run.returncode == 1
    # no hang on the cohort's dim probe; the slide fails with one line
    assert sum(line.startswith("PIPE: ") for line in run.stderr.splitlines()) == 1, run.stderr


def test_a_failed_rewrite_keeps_the_complete_slide(cohort_copy, small_disk):
    disk = small_disk("32m")
    c = cohort_copy
    out = disk / "store.zarr"
    assert _cli("-q", *_convert_args(c, out, "--dtype", "float32")).returncode == 0
    sid = c.slide_ids[0]
    before = FeatureStore.open(out).read_slide(sid).x5
    pt = c.x5_features / "pt_files" / f"{sid}.pt"  # re-extracted: must be converted again
    x = torch.load(pt, weights_only=True) + 1.0
    torch.save(x, pt)
    with h5py.File(c.x5_features / "h5_files" / f"{sid}.h5", "r+") as f:
        f["features"][...] = x.numpy()
    with open(disk / "filler", "wb", buffering=0) as f:  # no room left for the new version
        with pytest.raises(OSError):
            while True:
                f.write(b"\1" * 4096)
    run = _cli("-q", *_convert_args(c, out, "--dtype", "float32"))
    assert run.returncode == 2 and "No space left on device" in run.stderr, run.stderr
    (disk / "filler").unlink()
    fs = FeatureStore.open(out)
    assert fs.slide_ids == sorted(c.slide_ids)  # the old version of the slide is still there
    np.testing.assert_array_equal(fs.read_slide(sid).x5, before)
    assert _leftovers(disk) == [] and not [p for p in (out / "slides").iterdir() if p.name.startswith(".")]
    assert verify_store(out, progress=False).ok


def test_an_entry_in_slides_that_is_no_folder_fails_that_slide_only(cohort_copy, tmp_path):
    c = cohort_copy
    out = tmp_path / "store.zarr"
    assert _convert(c, out).ok
    sid = c.slide_ids[0]
    outside = tmp_path / "outside"
    shutil.move(out / "slides" / sid, outside)
    (out / "slides" / sid).symlink_to(outside)
    run = _cli("-q", *_convert_args(c, out, "--overwrite"))
    assert run.returncode == 1, run.stderr
    assert run.stderr.strip().splitlines() == [f"{sid}: slides/{sid} in the store is not a slide folder "
                                               "(a link or a file): remove it"]
    assert (outside / "zarr.json").is_file()  # never followed, never deleted
