"""A patient load from S3 against the same load from a local store, in the same run.

Run: `pytest benchmarks/test_bench_s3.py --benchmark-only`. The store is the one of
test_bench_store.py (2 slides x 1000 patches, D=1024, float16 on disk, read as float32); the
S3 server is moto's on 127.0.0.1, in a process of its own (its request handling is Python: in
this process it would compete with the reader for the GIL). Loopback has no network latency or
bandwidth limit, so the ratio is the cost of the S3 path itself (HTTP, s3fs, zarr's pipeline);
a real bucket adds its round trips. No timing is asserted: the ratios go to the summary and to
each benchmark's extra_info.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from test_bench_store import PATIENT, _convert, cohort  # noqa: E402,F401 - cohort: the shared fixture

from dsca.store import FeatureStore  # noqa: E402

GROUP = "patient load, local vs S3 (2 slides x 1000 patches, D=1024, f16 -> f32)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_url(cohort, tmp_path_factory):  # noqa: F811 - the fixture imported above
    """The benchmark store converted locally and uploaded to a moto S3 server; (local, url)."""
    import boto3
    import s3fs

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                            "AWS_ENDPOINT_URL")}
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=endpoint)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        boto3.client("s3").create_bucket(Bucket=bucket)
        local = tmp_path_factory.mktemp("bench_s3") / "f16.zarr"
        _convert(cohort, local, dtype="float16")
        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().put(str(local), f"{bucket}/f16.zarr", recursive=True)
        yield local, f"s3://{bucket}/f16.zarr"
    finally:
        server.terminate()
        server.wait(timeout=10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _load(benchmark, store: FeatureStore):
    return benchmark.pedantic(store.read_patient, args=(PATIENT, np.float32), rounds=15, iterations=1,
                              warmup_rounds=2)


def test_patient_load_local(benchmark, s3_url, bench_report):
    benchmark.group = GROUP
    local, _ = s3_url
    pat = _load(benchmark, FeatureStore.open(local))
    assert pat.x20.shape[0] == 2 * 1000
    bench_report.record("s3-bench-local", benchmark)


@pytest.mark.parametrize("cached", [False, True], ids=["s3", "s3-cache"])
def test_patient_load_s3(benchmark, s3_url, bench_report, tmp_path, cached):
    benchmark.group = GROUP
    local, url = s3_url
    store = FeatureStore.open(url, cache_dir=tmp_path / "cache" if cached else None)
    pat = _load(benchmark, store)
    want = FeatureStore.open(local).read_patient(PATIENT, np.float32)
    np.testing.assert_array_equal(pat.x20, want.x20)
    np.testing.assert_array_equal(pat.coords, want.coords)
    median = bench_report.record(f"s3-bench-{'cache' if cached else 's3'}", benchmark)
    base = bench_report.medians.get("s3-bench-local")
    if base:
        ratio = base / median
        benchmark.extra_info["speed_vs_local"] = round(ratio, 3)
        what = "S3 through a warm local cache" if cached else "S3 (moto, loopback)"
        bench_report.add(f"patient load from {what}: {median * 1e3:.1f} ms, {ratio:.2f} of local speed "
                         f"({base * 1e3:.1f} ms; goal >= 0.5)")
