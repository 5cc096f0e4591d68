"""`dsca predict` under torchrun: real processes, gloo on the CPU.

Each launch is ``python -m torch.distributed.run --standalone --nproc-per-node=2 --no-python --
dsca -q predict ...``; the single-process run it is compared with runs in this process.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsca.cli.dsca_main import main

_DSCA = shutil.which("dsca", path=str(Path(sys.executable).parent))
pytestmark = pytest.mark.skipif(_DSCA is None, reason="the dsca console script is not installed")


def _launch(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               # "--": torchrun would take --run for an abbreviation of its --run-path
               "--no-python", "--", _DSCA, "-q", "predict", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def test_two_ranks_write_what_one_process_writes(cv_run, synth_store, synth_cohort, tmp_path, assert_json_close):
    """Rank r scores patients r, r+2, ...; rank 0 writes the same predictions.csv (byte for
    byte: same rows, order and values), metrics.json and predict.json as one process."""
    args = ["--run", str(cv_run), "--store", str(synth_store), "--labels", str(synth_cohort.labels_csv),
            "--bootstrap", "50", "--workers", "1"]
    single, ranks = tmp_path / "single", tmp_path / "ranks"
    assert main(["-q", "predict", *args, "--out", str(single)]) == 0
    done = _launch(*args, "--out", str(ranks))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (ranks / "predictions.csv").read_bytes() == (single / "predictions.csv").read_bytes()
    assert_json_close(json.loads((single / "metrics.json").read_text()),
                      json.loads((ranks / "metrics.json").read_text()), 1e-9)
    assert json.loads((ranks / "predict.json").read_text()) == json.loads((single / "predict.json").read_text())
    assert sorted(p.name for p in ranks.iterdir()) == sorted(p.name for p in single.iterdir())
    assert done.stdout.count("scored 20 patient(s)") == 1  # rank 0 alone prints the summary


def test_a_failing_rank_stops_every_rank_and_nothing_is_written(cv_run, synth_store, synth_cohort, tmp_path):
    """Rank 1's first patient has a damaged x20 chunk: the launch fails with rank 1's error
    named, and no output is written (rank 0's rows are not written on their own)."""
    from dsca.infer.predict import select_patients
    from dsca.labels import load_labels
    from dsca.store import FeatureStore

    store = tmp_path / "damaged.zarr"
    shutil.copytree(synth_store, store)
    # the patients in predict's order: rank 1 reads position 1 first
    mapping = select_patients(FeatureStore.open(store), load_labels(synth_cohort.labels_csv, bins=1),
                              None, str(store))
    slide = mapping[list(mapping)[1]][0]
    chunk = next(p for p in (store / "slides" / slide / "x20" / "c").rglob("*") if p.is_file())
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 3] ^= 0x5A  # inside the chunk's data, before the shard index
    chunk.write_bytes(bytes(raw))

    out = tmp_path / "out"
    t0 = time.monotonic()
    done = _launch("--run", str(cv_run), "--store", str(store), "--labels", str(synth_cohort.labels_csv),
                   "--bootstrap", "20", "--workers", "1", "--out", str(out), timeout=120)
    assert time.monotonic() - t0 < 120
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert f"dsca predict: error: [rank 1] {store}: slide {slide}: x20: chunk 0 corrupt" in output, output[-3000:]
    assert not (out / "predictions.csv").exists() and not (out / "metrics.json").exists()


def test_shares_of_any_size_merge_back_in_order():
    """Positions r, r+K, ... of each rank, merged: the list again, also where ranks hold
    different numbers of items or none."""
    from dsca.infer.predict import merge_shares
    from dsca.train.distributed import Shard

    for n in range(7):
        for size in (1, 2, 3, 5):
            items = [f"p{i}" for i in range(n)]
            parts = [[items[i] for i in Shard(r, size).positions(0, n)] for r in range(size)]
            assert merge_shares(parts, n) == items, (n, size)
    with pytest.raises(RuntimeError, match="expected"):
        merge_shares([["a"], []], 3)


def test_without_torchrun_predict_runs_as_one_process(cv_run, synth_store, tmp_path, monkeypatch):
    """No torchrun variables: no process group is started, and --store reaches the store as
    the string given (a URL must not be turned into a Path on the way)."""
    import dsca.store
    from dsca.train import distributed

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "start", lambda *a, **k: pytest.fail("start called"))
    seen = []
    real_open = dsca.store.FeatureStore.open.__func__

    def spy(cls, path, *args, **kwargs):
        seen.append(path)
        return real_open(cls, path, *args, **kwargs)

    monkeypatch.setattr(dsca.store.FeatureStore, "open", classmethod(spy))
    assert main(["-q", "predict", "--run", str(cv_run), "--store", str(synth_store), "--workers", "0",
                 "--out", str(tmp_path / "out")]) == 0
    # (the dataset's own reopening in store/dataset.py is outside dsca predict's code)
    assert str(synth_store) in [p for p in seen if isinstance(p, str)]
    assert (tmp_path / "out" / "predictions.csv").is_file()


def test_heatmap_refuses_torchrun(cv_run, synth_store, tmp_path, monkeypatch, capsys):
    """Every rank would draw the same slides into the same files: one process only."""
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    assert main(["-q", "heatmap", "--run", str(cv_run), "--store", str(synth_store),
                 "--out", str(tmp_path / "maps")]) == 2
    assert "dsca heatmap: error: dsca heatmap runs in one process" in capsys.readouterr().err
    assert not (tmp_path / "maps").exists()
