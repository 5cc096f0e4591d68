"""Training under torchrun (dsca.train.distributed): real processes, gloo on the CPU.

Each launch is ``python -m torch.distributed.run --standalone --nproc-per-node=2 --no-python
dsca train ...`` (a free port per launch); the runs are shared through module fixtures.
"""
from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from dsca.cli.dsca_main import main

_DSCA = shutil.which("dsca", path=str(Path(sys.executable).parent))
pytestmark = pytest.mark.skipif(_DSCA is None, reason="the dsca console script is not installed")


def _torchrun(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", "--no-python", _DSCA, "-q", "train", *args]


def _launch(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(_torchrun(*args), capture_output=True, text=True, timeout=timeout)


def _config(directory: Path, synth_cohort, store: Path, **overrides: Any) -> Path:
    """The training tests' small config (tests/training/conftest.py::small_config)."""
    cfg: dict[str, Any] = {
        "store": str(store), "labels": str(synth_cohort.labels_csv),
        "splits": str(synth_cohort.splits[0]).replace("fold0", "fold{}"),
        "dims": "32-16-16-4", "tra_nhead": 2, "dropout": 0.1, "opt": "adam", "lr": 1e-3,
        "epochs": 2, "bp_every_iters": 4, "folds": [0, 1], "eval_bootstrap": 20,
        "num_threads": 1, "seed": 3, **overrides,
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def runs(synth_cohort, synth_store, tmp_path_factory):
    """The config, one single-process run and one 2-rank data-parallel run of it."""
    root = tmp_path_factory.mktemp("distributed")
    config = _config(root, synth_cohort, synth_store)
    assert main(["-q", "train", "--config", str(config), "--out", str(root / "single")]) == 0
    data = _launch("--config", str(config), "--out", str(root / "data"))
    assert data.returncode == 0, data.stderr[-3000:]
    return {"root": root, "config": config, "single": root / "single", "data": root / "data",
            "data_output": data}


def _metrics(run: Path) -> Any:
    """metrics.json without what may differ between equal runs: timings and the run id."""
    def strip(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in ("seconds", "run_id")}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    return strip(json.loads((run / "metrics.json").read_text()))


def _max_weight_difference(a: Path, b: Path) -> float:
    wa = torch.load(a, weights_only=True)["model"]
    wb = torch.load(b, weights_only=True)["model"]
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def test_data_parallel_equals_one_process(runs, assert_json_close):
    """2 gloo ranks split every optimizer group: the weights after 2 epochs and the metrics
    are those of one process (per-patient dropout seeds: the same masks on any rank)."""
    single, data = runs["single"], runs["data"]
    for fold in (0, 1):
        for name in ("best.pt", "last.pt"):
            diff = _max_weight_difference(single / f"fold{fold}" / name, data / f"fold{fold}" / name)
            assert diff <= 1e-5, (fold, name, diff)
    assert_json_close(_metrics(single), _metrics(data), 1e-6)
    # rank 0 alone wrote the run's files and printed the summary
    assert sorted(p.name for p in data.iterdir()) == sorted(p.name for p in single.iterdir())
    assert runs["data_output"].stdout.count("test C-index") == 1
    assert "[rank 1]" not in (data / "train.log").read_text()


def test_fold_parallel_equals_one_process(runs, assert_json_close):
    """--parallel folds: each rank trains whole folds; rank 0 reports them all."""
    out = runs["root"] / "folds"
    done = _launch("--config", str(runs["config"]), "--out", str(out), "--parallel", "folds")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_json_close(_metrics(runs["single"]), _metrics(out), 1e-6)
    log = (out / "train.log").read_text()
    assert "rank 0 trains fold(s) 0" in log and "rank 1 trains fold(s) 1" in log
    for fold in (0, 1):
        assert _max_weight_difference(runs["single"] / f"fold{fold}" / "best.pt",
                                      out / f"fold{fold}" / "best.pt") == 0.0


def test_resume_under_torchrun_continues_a_stopped_run(runs, assert_json_close):
    """A run stopped (SIGTERM to torchrun, as a scheduler does) right after fold 0's first
    last.pt continues with --resume and ends where an uninterrupted run ends."""
    out = runs["root"] / "stopped"
    args = ("--config", str(runs["config"]), "--out", str(out))
    proc = subprocess.Popen(_torchrun(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not (out / "fold0" / "last.pt").exists() and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)  # torchrun stops its workers (their own sessions)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and not (out / "metrics.json").exists()
    resumed = _launch(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (out / "train.log").read_text()
    assert "fold 0: resumed after epoch" in log or "fold 0: finished earlier" in log
    assert_json_close(_metrics(runs["data"]), _metrics(out), 1e-6)
    for fold in (0, 1):
        assert _max_weight_difference(runs["data"] / f"fold{fold}" / "last.pt",
                                      out / f"fold{fold}" / "last.pt") == 0.0


def _damage_first_read_of_rank_1(config: Path) -> str:
    """Corrupt the x20 chunk of the patient that rank 1 reads first (position 1 of fold 0's
    first epoch) in the config's store; returns its slide id."""
    from dsca.config import load_config
    from dsca.labels import load_labels
    from dsca.splits import resolve_split_paths
    from dsca.train.data import build_fold_data, open_store
    from dsca.train.steps import epoch_order

    cfg = load_config(config)
    labels = load_labels(cfg.labels, bins=cfg.bins, columns=cfg.labels_map)
    data = build_fold_data(cfg, labels, 0, resolve_split_paths(cfg.splits, [0])[0], open_store(cfg))
    train = data.datasets["train"]
    patient = train.patient_ids[epoch_order(len(train), cfg.seed, 0)[1]]
    slide = train.patient_slides[patient][0]
    chunk = next(p for p in (Path(cfg.store) / "slides" / slide / "x20" / "c").rglob("*") if p.is_file())
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 3] ^= 0x5A  # inside the chunk's data, before the shard index
    chunk.write_bytes(bytes(raw))
    return slide


def test_a_failing_rank_stops_every_rank_with_its_error(runs, synth_cohort, synth_store, tmp_path):
    """Rank 1 reads a damaged chunk in its first group: every rank stops, the output names
    rank 1's error, the exit status is non-zero, nothing is reported."""
    store = tmp_path / "damaged.zarr"
    shutil.copytree(synth_store, store)
    config = _config(tmp_path, synth_cohort, store)
    slide = _damage_first_read_of_rank_1(config)
    t0 = time.monotonic()
    done = _launch("--config", str(config), "--out", str(tmp_path / "run"), timeout=120)
    assert time.monotonic() - t0 < 120
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert f"[rank 1] {store}: slide {slide}: x20: chunk 0 corrupt" in output, output[-3000:]
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_parallel_without_torchrun_is_ignored_with_a_warning(monkeypatch, caplog):
    from dsca.train import distributed

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with caplog.at_level(logging.WARNING, logger="dsca"):
        ranks, device = distributed.start("folds", "cpu")
    assert ranks == distributed.SINGLE_PROCESS and device == "cpu" and not ranks.active
    assert "--parallel folds ignored: not launched by torchrun" in caplog.text


def test_patient_dropout_masks_depend_on_the_seed_only():
    """A patient's masks do not depend on the draws before it, and the global stream is left
    as it was (what makes them independent of the rank that runs the patient)."""
    from dsca.layers import Dropout
    from dsca.train.steps import patient_rng, patient_seed

    drop = Dropout(0.5).train()
    x = torch.ones(64, 64)
    seed = patient_seed(3, 1, 7)
    assert seed != patient_seed(3, 1, 8) and seed != patient_seed(3, 2, 7)
    torch.manual_seed(0)
    with patient_rng(seed, x.device):
        first = drop(x)
    after = torch.get_rng_state()
    torch.manual_seed(0)
    torch.rand(1000)  # other patients' draws before this one
    with patient_rng(seed, x.device):
        again = drop(x)
    assert torch.equal(first, again)
    torch.manual_seed(0)
    assert torch.equal(after, torch.get_rng_state())  # untouched by the seeded forward


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_multi_node_recipe_on_local_addresses(runs, assert_json_close):
    """The README's multi-node recipe (c10d rendezvous, one torchrun per node) with two
    "nodes" on 127.0.0.1 of one GPU each: the same run as 2 ranks on one node."""
    out = runs["root"] / "two-nodes"
    endpoint = f"127.0.0.1:{_free_port()}"
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=dsca-test",
            "--no-python", _DSCA, "-q", "train", "--config", str(runs["config"]), "--out", str(out)]
    nodes = [subprocess.Popen(node, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        results = [p.communicate(timeout=240) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in nodes), [r[1][-2000:] for r in results]
    assert_json_close(_metrics(runs["data"]), _metrics(out), 1e-6)
    for fold in (0, 1):
        assert _max_weight_difference(runs["data"] / f"fold{fold}" / "last.pt",
                                      out / f"fold{fold}" / "last.pt") == 0.0
