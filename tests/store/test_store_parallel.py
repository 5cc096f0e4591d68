"""The worker pool of `convert --jobs`: a dying worker, and workers whose parent was killed.

Ctrl-C, SIGTERM and kill -9 of the whole process group are tested on real converts in
test_store_resume.py; these are the two guarantees of `dsca.store.parallel` that those do not
reach.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dsca.store.parallel import run_tasks
from dsca.store.synth import SynthSpec, write_synthetic_cohort

_WORKER_UP = "DSCA_TEST_WORKER_UP"  # env: a file that a spawned worker creates when it imports this module


def _in_worker() -> bool:
    return multiprocessing.parent_process() is not None


if _in_worker() and os.environ.get(_WORKER_UP):  # a worker imports the work's module once it is up
    Path(os.environ[_WORKER_UP]).touch()


def _square_or_die_in_worker(task: int) -> int:
    """A worker dies on a negative task, as the OOM killer would end it; this process waits
    until the worker is up, so that the worker gets a task at all."""
    if _in_worker():
        if task < 0:
            os._exit(9)
        return task * task
    marker, deadline = Path(os.environ[_WORKER_UP]), time.time() + 120
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # the worker's start-up probe returns right after the import
    return task * task


def test_a_dying_worker_fails_its_own_task_only(tmp_path, monkeypatch):
    monkeypatch.setenv(_WORKER_UP, str(tmp_path / "worker-up"))
    discarded: list[int] = []
    tasks = [1, -2, -3, -4, -5]
    results = list(run_tasks(tasks, 2, f"{__name__}:_square_or_die_in_worker", lost=lambda task: ("lost", task),
                             discard=discarded.append))
    lost = [r[1] for r in results if isinstance(r, tuple)]
    assert len(lost) == 1 and discarded == lost, results  # the worker took one task and died on it
    # every other task was still run (here, once the only worker was gone)
    assert sorted(r for r in results if not isinstance(r, tuple)) == sorted(t * t for t in tasks if t not in lost)


def _group_alive(pgid: int) -> list[int]:
    """Processes of a process group that have not exited (zombies count as exited)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def _workers_of(pid: int) -> list[int]:
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            ppid = next(line for line in status.read_text().splitlines() if line.startswith("PPid:"))
            cmdline = (status.parent / "cmdline").read_bytes()
        except (OSError, StopIteration):
            continue
        if int(ppid.split()[1]) == pid and b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            found.append(int(status.parent.name))
    return found


def test_workers_exit_when_their_parent_is_killed(tmp_path):
    c = write_synthetic_cohort(tmp_path / "cohort", SynthSpec(patients=12, seed=4, dim=256, patches=300, multi_slide=0.0,
                                                              h5_files=False), progress=False)
    cmd = [sys.executable, "-m", "dsca.cli.store_main", "-q", "convert", "--x5-features", str(c.x5_features),
           "--x20-features", str(c.x20_features), "--x5-coords", str(c.x5_coords), "--x20-coords", str(c.x20_coords),
           "--out", str(tmp_path / "s.zarr"), "--dtype", "float32", "--jobs", "2"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not _workers_of(proc.pid) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert _workers_of(proc.pid), "no worker process was started"
        os.kill(proc.pid, signal.SIGKILL)  # the parent alone: its workers are orphaned
        proc.wait()
        deadline = time.time() + 60
        while _group_alive(proc.pid) and time.time() < deadline:
            time.sleep(0.1)
        assert _group_alive(proc.pid) == [], "orphaned workers kept running"
    finally:
        for pid in _group_alive(proc.pid):
            os.kill(pid, signal.SIGKILL)
