"""Training under torchrun on the CPU: one epoch with 1 process vs 2 gloo ranks, and the
all-reduce of the default model's gradient.

The same ``dsca train`` config (the default DSCA, dims 1024-384-384-4, 8.6M parameters; one
fold of a synthetic store; ``num_threads: 1``, ``num_workers: 0``, so each rank computes on one
core) is launched twice as one process and twice as ``torchrun --nproc-per-node=2`` (data
mode: each optimizer group's patients split over the ranks, gradients summed before every
step). An epoch's time is the ``seconds`` of the fold's history (its training steps and its
validation pass), each launch's first epoch left out (warm-up), the best of the rest taken;
the wall time of each whole launch (start-up, evaluation, files) is the pytest-benchmark
timing.

What the 2 ranks can gain depends on what the machine gives two processes at once, so that is
measured too: a fixed 1-thread matmul loop run alone and as two concurrent copies (threads,
each product on one core; ``cpu parallel efficiency`` = 2 x alone / concurrent: 2.0 = two
real cores, 1.0 = one core's worth). And the cost a data-parallel step adds, whatever the
patients: one all-reduce of the full gradient per optimizer step (every ``bp_every_iters``
patients), timed between 2 gloo ranks as a plain ``all_reduce`` of a flat float32 [8.6M] tensor and as
``Shard.reduce_gradients`` on the default model (flatten, all-reduce, copy back). A step on
K ranks takes about ``compute(bp_every_iters / K patients) + all-reduce``: the all-reduce
time against the per-patient compute says how far K GPUs (nccl, far faster links than gloo
over loopback) can scale a given ``bp_every_iters``.

No timing is asserted; the numbers are in each benchmark's extra_info and the summary lines,
with the share of the machine's CPU time that other processes used during each training
launch (``others_cpu_share``, from /proc/stat less this run's own children): work of others
on the same cores skews the comparison, and the summary says so.
Under ``--benchmark-disable`` (a smoke run) every part runs once on a tiny store and model.

Run:  pytest benchmarks/test_bench_distributed.py --benchmark-only -q -p no:cacheprovider
      torchrun --nproc-per-node=2 benchmarks/test_bench_distributed.py allreduce DIMS ROUNDS OUT.json
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

_HERE = Path(__file__).resolve()
_DSCA = shutil.which("dsca", path=str(Path(sys.executable).parent))
_TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
GROUP = "dsca train epoch on CPU, 1 process vs 2 gloo ranks"


@dataclass(frozen=True)
class Size:
    """One benchmark size: the synthetic cohort, the model and the timing rounds."""

    patients: int
    dim: int
    patches: int
    dims: str
    epochs: int
    bp_every_iters: int
    launches: int
    allreduce_rounds: int
    matmul_rounds: int


# full: the default model on 19 training patients (4 optimizer steps an epoch), two launches
# of two epochs per mode; about 2 minutes on 2 cores
FULL = Size(patients=32, dim=1024, patches=40, dims="1024-384-384-4", epochs=2,
            bp_every_iters=4, launches=2, allreduce_rounds=10, matmul_rounds=40)
SMOKE = Size(patients=10, dim=32, patches=8, dims="32-16-16-4", epochs=1, bp_every_iters=2,
             launches=1, allreduce_rounds=1, matmul_rounds=1)


@pytest.fixture(scope="module")
def size(request: pytest.FixtureRequest) -> Size:
    return SMOKE if request.config.getoption("benchmark_disable", False) else FULL


@pytest.fixture(scope="module")
def bench_config(size: Size, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic store and a one-fold training config on it; returns the config's path."""
    from dsca.store.convert import convert_cohort
    from dsca.store.synth import SynthSpec, write_synthetic_cohort

    if _DSCA is None:
        pytest.skip("the dsca console script is not installed")
    root = tmp_path_factory.mktemp("bench_distributed")
    cohort = write_synthetic_cohort(root / "cohort", SynthSpec(
        patients=size.patients, seed=1, dim=size.dim, patches=size.patches, h5_files=False),
        progress=False)
    report = convert_cohort(x5_features=cohort.x5_features, x20_features=cohort.x20_features,
                            x5_coords=cohort.x5_coords, x20_coords=cohort.x20_coords,
                            labels=cohort.labels_csv, out=root / "store.zarr", progress=False)
    assert report.ok, list(report.lines())
    cfg = {"store": str(root / "store.zarr"), "labels": str(cohort.labels_csv),
           "splits": str(cohort.splits[0]).replace("fold0", "fold{}"), "dims": size.dims,
           "epochs": size.epochs, "bp_every_iters": size.bp_every_iters, "folds": [0],
           "eval_bootstrap": 0, "num_threads": 1, "num_workers": 0, "seed": 3}
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


_RESULTS: dict[str, dict[str, Any]] = {}


def _train(config: Path, out: Path, ranks: int) -> None:
    launcher = [*_TORCHRUN, "--no-python"] if ranks > 1 else []
    done = subprocess.run([*launcher, _DSCA, "-q", "train", "--config", str(config), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _epochs(outs: list[Path]) -> dict[str, Any]:
    """The epoch times of the launches' fold (one list per launch), the best of those after
    each launch's first (warm-up; the only one where there is one), and how many patients an
    epoch trains."""
    results = [json.loads((out / "fold0" / "result.json").read_text()) for out in outs]
    seconds = [[row["seconds"] for row in r["history"]] for r in results]
    n_train = sum(1 for row in results[0]["predictions"] if row["split"] == "train")
    # the best, not the median: other work on the machine only ever adds time
    return {"epoch_seconds": seconds, "train_patients": n_train,
            "epoch_s": min(t for launch in seconds for t in (launch[1:] or launch))}


def _bench_training(benchmark, bench_config: Path, size: Size, tmp_path: Path, ranks: int) -> None:
    benchmark.group = GROUP
    outs: list[Path] = []

    def launch() -> None:
        outs.append(tmp_path / f"run{len(outs)}")
        _train(bench_config, outs[-1], ranks)

    with _others_cpu() as others:
        benchmark.pedantic(launch, rounds=size.launches, iterations=1, warmup_rounds=0)
    found = _epochs(outs)
    found.update(ranks=ranks, others_cpu_share=others.get("share"), bp_every_iters=size.bp_every_iters,
                 steps_per_epoch=found["train_patients"] // size.bp_every_iters)
    benchmark.extra_info.update(found)
    _RESULTS[f"train{ranks}"] = found


@contextlib.contextmanager
def _others_cpu() -> Iterator[dict[str, float]]:
    """Yields a dict that gets ``share``: the fraction of all CPUs' time in the block that
    processes other than this one and its waited-for children used (Linux; absent elsewhere)."""
    found: dict[str, float] = {}

    def busy() -> float | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    def mine() -> float:
        own = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    start, own0, t0 = busy(), mine(), time.perf_counter()
    yield found
    end = busy()
    if start is not None and end is not None:
        wall = time.perf_counter() - t0
        found["share"] = max(0.0, (end - start) - (mine() - own0)) / (wall * (os.cpu_count() or 1))


def test_bench_epoch_one_process(benchmark, bench_config, size, tmp_path):
    _bench_training(benchmark, bench_config, size, tmp_path, ranks=1)


def test_bench_epoch_two_gloo_ranks(benchmark, bench_config, size, tmp_path):
    _bench_training(benchmark, bench_config, size, tmp_path, ranks=2)


def test_bench_cpu_parallel_efficiency(benchmark, size):
    """The matmul probe alone, then two copies at once: what two ranks can get here."""
    found: dict[str, float] = {}

    def run() -> None:
        found["alone_s"] = _matmul_probe(size.matmul_rounds, copies=1)
        found["concurrent_s"] = _matmul_probe(size.matmul_rounds, copies=2)

    benchmark.group = GROUP
    with _others_cpu() as others:
        benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    found["efficiency"] = 2 * found["alone_s"] / found["concurrent_s"]
    found["others_cpu_share"] = others.get("share")
    benchmark.extra_info.update(found)
    _RESULTS["cpu"] = found


def _matmul_probe(rounds: int, copies: int) -> float:
    """Seconds until ``copies`` threads have each done ``rounds`` products of two [1024, 1024]
    float32 matrices, every product on one core (torch releases the GIL inside it: the
    threads run in parallel where the machine has the cores, as two processes would)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = torch.randn(1024, 1024)
        a @ a  # warm-up

        def loop() -> None:
            for _ in range(rounds):
                a @ a

        workers = [threading.Thread(target=loop) for _ in range(copies)]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)


def test_bench_gradient_allreduce_two_gloo_ranks(benchmark, size, tmp_path, bench_report):
    """2 gloo ranks all-reduce the model's full gradient; then the summary lines."""
    out = tmp_path / "allreduce.json"

    def run() -> None:
        done = subprocess.run([*_TORCHRUN, str(_HERE), "allreduce", size.dims, str(size.allreduce_rounds),
                               str(out)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]

    benchmark.group = GROUP
    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    found = json.loads(out.read_text())
    benchmark.extra_info.update(found)
    _RESULTS["allreduce"] = found
    for line in _summary():
        bench_report.add(line)
        print(line)


def _summary() -> list[str]:
    """The speed-up of 2 ranks and what an epoch's all-reduces cost, from the results above."""
    lines = []
    one, two, cpu, ar = (_RESULTS.get(k) for k in ("train1", "train2", "cpu", "allreduce"))
    if one and two:
        lines.append(
            f"{GROUP}: epoch (train + val; best of those after each launch's first) 1 process {one['epoch_s']:.2f} s, "
            f"2 ranks {two['epoch_s']:.2f} s -> speed-up {one['epoch_s'] / two['epoch_s']:.2f}x "
            f"({one['train_patients']} training patients, {one['steps_per_epoch']} optimizer steps "
            f"of {one['bp_every_iters']})")
    others = [r["others_cpu_share"] for r in (one, two, cpu) if r and r["others_cpu_share"] is not None]
    if others and max(others) > 0.1:
        lines.append(f"{GROUP}: WARNING: other processes used up to {100 * max(others):.0f}% of the "
                     f"{os.cpu_count()} CPUs during the launches: the timings are skewed")
    if cpu:
        lines.append(
            f"{GROUP}: cpu parallel efficiency {cpu['efficiency']:.2f} (1-core matmul loop alone "
            f"{cpu['alone_s']:.2f} s, two concurrent copies {cpu['concurrent_s']:.2f} s; 2.0 = two "
            "real cores): the most 2 ranks can gain on this machine")
    if ar:
        line = (f"{GROUP}: gradient all-reduce of {ar['numel']:,} float32 between 2 gloo ranks: "
                f"all_reduce {ar['all_reduce_ms']:.1f} ms, Shard.reduce_gradients "
                f"{ar['reduce_gradients_ms']:.1f} ms (median of {ar['rounds']})")
        if two:
            share = two["steps_per_epoch"] * ar["reduce_gradients_ms"] / 1000 / two["epoch_s"]
            line += f"; {two['steps_per_epoch']} per epoch = {100 * share:.1f}% of the 2-rank epoch"
        if one and one["steps_per_epoch"]:
            # (the epoch includes validation and the dropped last group: an upper bound)
            step_ms = 1000 * one["epoch_s"] / one["steps_per_epoch"]
            line += (f"; a 1-process step of {one['bp_every_iters']} patients <= {step_ms:.0f} ms, "
                     f"so one all-reduce is {100 * ar['reduce_gradients_ms'] / step_ms:.1f}% of it")
        lines.append(line)
    return lines


# -- the subprocesses -------------------------------------------------------------------------

def _allreduce(dims: str, rounds: int, out: Path) -> None:
    """One torchrun rank: median milliseconds of a flat all_reduce of the gradient of a DSCA
    with ``dims`` ([P] float32, P its parameter count) and of ``Shard.reduce_gradients`` on
    that model's parameters; rank 0 writes them to ``out``."""
    import torch
    import torch.distributed as dist

    from dsca import build_model
    from dsca.model import count_parameters
    from dsca.train.distributed import Shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model({"dims": dims})
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    flat = torch.ones(count_parameters(model))
    shard = Shard(rank, world)  # without a store: that only names a failed peer

    def timed(fn) -> float:
        fn()  # warm-up: gloo's buffers and pairs
        times = []
        for _ in range(rounds):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1000 * statistics.median(times)

    found = {"dims": dims, "numel": flat.numel(), "rounds": rounds, "ranks": world,
             "all_reduce_ms": timed(lambda: dist.all_reduce(flat)),
             "reduce_gradients_ms": timed(lambda: shard.reduce_gradients(params, 0.0))}
    if rank == 0:
        out.write_text(json.dumps(found))
    dist.destroy_process_group()


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "allreduce":
        _allreduce(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
    else:
        sys.exit("usage: test_bench_distributed.py allreduce DIMS ROUNDS OUT.json (under torchrun)")
