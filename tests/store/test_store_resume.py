"""Resume, --overwrite, kill -9 mid-convert, and `verify` catching damage."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dsca.cli.store_main import main
from dsca.store import FeatureStore
from dsca.store.convert import ConvertError, convert_cohort
from dsca.store.synth import SynthSpec, write_synthetic_cohort
from dsca.store.verify import verify_store


def _convert(cohort, out: Path, **kw):
    return convert_cohort(x5_features=cohort.x5_features, x20_features=cohort.x20_features,
                          x5_coords=cohort.x5_coords, x20_coords=cohort.x20_coords, labels=cohort.labels_csv,
                          out=out, progress=False, **kw)


def test_resume_skips_complete_and_overwrite_redoes(synth_cohort, tmp_path):
    out = tmp_path / "s.zarr"
    first = _convert(synth_cohort, out)
    assert first.ok and not first.skipped
    victim = first.converted[0]
    # what a killed writer leaves: a slide group without complete=True and a partial array
    meta = out / "slides" / victim / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["complete"] = False
    meta.write_text(json.dumps(doc))
    (out / "slides" / victim / "x20" / "c" / "0" / "0" / "0").unlink()
    assert victim in FeatureStore.open(out).slide_ids  # consolidated view is from the first run
    second = _convert(synth_cohort, out)
    assert second.ok and second.converted == [victim] and len(second.skipped) == len(first.converted) - 1
    assert verify_store(out, progress=False).ok
    third = _convert(synth_cohort, out, overwrite=True)
    assert sorted(third.converted) == sorted(first.converted) and not third.skipped
    with pytest.raises(ConvertError, match="holds float16 features, asked for float32"):
        _convert(synth_cohort, out, dtype="float32")


def test_incomplete_slide_is_invisible_and_reported_by_verify(synth_cohort, tmp_path):
    out = tmp_path / "s.zarr"
    _convert(synth_cohort, out)
    victim = FeatureStore.open(out).slide_ids[-1]
    meta = out / "slides" / victim / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["complete"] = False
    meta.write_text(json.dumps(doc))
    root_meta = out / "zarr.json"
    root = json.loads(root_meta.read_text())
    root.pop("consolidated_metadata")  # as during a running convert
    root_meta.write_text(json.dumps(root))
    assert victim not in FeatureStore.open(out).slide_ids
    problems = dict(verify_store(out, progress=False).problems)
    assert "incomplete slide" in problems[victim]


def test_verify_detects_flipped_bytes(synth_cohort, tmp_path, capsys):
    out = tmp_path / "s.zarr"
    _convert(synth_cohort, out)
    victim = FeatureStore.open(out).slide_ids[2]
    shard = out / "slides" / victim / "x20" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x40  # one bit inside the first chunk's payload
    shard.write_bytes(bytes(data))
    assert main(["-q", "verify", str(out)]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"{victim}: ")]
    assert len(lines) == 1 and "unreadable chunk" in lines[0]
    assert len(err.strip().splitlines()) == 1


def test_kill_9_mid_convert_leaves_only_true_completes(tmp_path):
    # big enough slides that the kill lands while slides are being written
    cohort = write_synthetic_cohort(tmp_path / "c", SynthSpec(patients=8, seed=3, dim=256, patches=400,
                                                              h5_files=False), progress=False)
    out = tmp_path / "s.zarr"
    cmd = [sys.executable, "-m", "dsca.cli.store_main", "-q", "convert", "--x5-features", str(cohort.x5_features),
           "--x20-features", str(cohort.x20_features), "--x5-coords", str(cohort.x5_coords), "--out", str(out),
           "--dtype", "float32"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        slides = out / "slides"
        if slides.is_dir() and sum(p.is_dir() for p in slides.iterdir()) >= 3:
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    fs = FeatureStore.open(out)
    on_disk = [p.name for p in (out / "slides").iterdir() if p.is_dir()]
    assert len(on_disk) >= 3 and len(fs.slide_ids) < len(cohort.slide_ids)
    for sid in fs.slide_ids:  # whatever claims to be complete reads back exactly
        s = fs.read_slide(sid)
        np.testing.assert_array_equal(s.x20.reshape(-1, 256),
                                      torch.load(cohort.x20_features / "pt_files" / f"{sid}.pt").numpy())
    report = convert_cohort(x5_features=cohort.x5_features, x20_features=cohort.x20_features,
                            x5_coords=cohort.x5_coords, out=out, dtype="float32", progress=False)
    assert report.ok and len(report.converted) + len(report.skipped) == len(cohort.slide_ids)
    assert verify_store(out, progress=False).ok


def test_cli_synth_convert_verify_info(tmp_path, capsys):
    c = tmp_path / "c"
    assert main(["-q", "synth", "--out", str(c), "--patients", "6", "--dim", "16", "--patches", "12", "--seed", "1"]) == 0
    args = ["-q", "convert", "--x5-features", str(c / "feats-l2-s256-synth" / "h5_files"),
            "--x20-features", str(c / "feats-l1-s256-synth" / "pt_files"), "--x5-coords", str(c / "tiles-l2-s256"),
            "--x20-coords", str(c / "tiles-l1-s256" / "patches"), "--labels", str(c / "synth_path_full.csv"),
            "--out", str(tmp_path / "s.zarr"), "--jobs", "2"]
    assert main(args) == 0
    assert main(args) == 0  # resume: nothing to do, still a success
    out = capsys.readouterr().out
    assert "converted 0, skipped" in out
    assert main(["verify", str(tmp_path / "s.zarr")]) == 0
    assert main(["info", str(tmp_path / "s.zarr")]) == 0
    info = capsys.readouterr().out
    assert "6 patients" in info and "dim 16" in info and "float16" in info


def test_jobs_share_work_between_processes(synth_cohort, tmp_path, monkeypatch, source_arrays):
    import dsca.store.convert as convert

    real = convert._convert_slide
    in_main: list[str] = []

    def slow_main(task):  # slows only this process, so that the spawned workers get slides
        in_main.append(task.slide_id)
        time.sleep(0.4)
        return real(task)

    monkeypatch.setattr(convert, "_convert_slide", slow_main)
    out = tmp_path / "j.zarr"
    report = _convert(synth_cohort, out, jobs=3)
    assert report.ok and sorted(report.converted) == sorted(synth_cohort.slide_ids)
    assert 0 < len(in_main) < len(synth_cohort.slide_ids)  # both kinds of converter worked
    fs = FeatureStore.open(out)
    by_worker = next(s for s in fs.slide_ids if s not in in_main)
    x5, x20 = source_arrays(synth_cohort, by_worker)
    np.testing.assert_array_equal(fs.read_slide(by_worker, dtype=np.float16).x20.reshape(-1, 32), x20.astype(np.float16))
    assert verify_store(out, progress=False).ok
