"""`convert --shard I/N` and `finalize`: N processes writing one store give what one run gives.

Real stores on disk, real processes: the shards of the main test are `dsca-store convert`
subprocesses started together; the root-creation race is run many times by threads released
at one instant by a barrier.
"""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import threading
import zlib
from collections import Counter
from pathlib import Path

import pytest

from dsca.cli.store_main import main
from dsca.store import FeatureStore
from dsca.store._layout import SHARDED
from dsca.store.convert import ConvertError, Shard, convert_cohort, finalize_store
from dsca.store.verify import store_info, verify_store


def _args(c, out: Path, *extra: str) -> list[str]:
    return ["convert", "--x5-features", str(c.x5_features), "--x20-features", str(c.x20_features),
            "--x5-coords", str(c.x5_coords), "--x20-coords", str(c.x20_coords), "--labels", str(c.labels_csv),
            "--out", str(out), *extra]


def _convert(c, out: Path, **kw):
    return convert_cohort(x5_features=c.x5_features, x20_features=c.x20_features, x5_coords=c.x5_coords,
                          x20_coords=c.x20_coords, labels=c.labels_csv, out=out, progress=False, **kw)


def _owned(ids, shard: Shard) -> list[str]:
    return sorted(s for s in ids if shard.owns(s))


def test_three_concurrent_shards_then_finalize_equal_one_run(cohort_copy, tmp_path, assert_same_store):
    c = cohort_copy
    shards = [Shard(k, 3) for k in range(3)]
    assert all(_owned(c.slide_ids, s) for s in shards), "every shard should have slides to convert"
    victim = c.slide_ids[1]  # a broken file: its shard fails it alone
    pt = c.x20_features / "pt_files" / f"{victim}.pt"
    pt.write_bytes(pt.read_bytes()[:100])
    one = tmp_path / "one.zarr"
    single = _convert(c, one)
    assert [sid for sid, _ in single.failures] == [victim]

    out = tmp_path / "sharded.zarr"
    cmd = [sys.executable, "-m", "dsca.cli.store_main", "-q"]
    procs = [subprocess.Popen([*cmd, *_args(c, out, "--shard", str(s))], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for s in shards]
    runs = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    converted = 0
    for shard, (code, stdout, stderr) in zip(shards, runs):
        mine = victim in _owned(c.slide_ids, shard)
        assert code == (1 if mine else 0), (shard, stdout, stderr)
        assert "Traceback" not in stderr
        assert stderr.strip().splitlines() == ([f"{victim}: {dict(single.failures)[victim]}"] if mine else [])
        line, = stdout.strip().splitlines()
        n = len(_owned(c.slide_ids, shard)) - mine
        assert line.startswith(f"shard {shard}: converted {n}, skipped 0 (already complete), failed {int(mine)}")
        assert line.endswith(f"once all 3 shards are done: dsca-store finalize {out}")
        converted += n
    assert converted == len(single.converted)

    # before finalize: readable, every complete slide listed, and said to be unfinished
    fs = FeatureStore.open(out)
    assert fs.slide_ids == FeatureStore.open(one).slide_ids and fs.not_finalized
    assert "not finalized: converted in 3 shards" in "\n".join(store_info(out).lines())
    problems = verify_store(out, progress=False).problems
    assert [sid for sid, _ in problems] == ["<store>"] and "dsca-store finalize" in problems[0][1]

    assert main(["-q", "finalize", str(out)]) == 0
    assert "consolidated_metadata" in json.loads((out / "zarr.json").read_text())
    assert FeatureStore.open(out).not_finalized is None
    assert verify_store(out, progress=False).ok
    assert_same_store(out, one)


def test_shards_starting_at_one_instant_create_the_root_once(tmp_path, monkeypatch):
    # threads, each with its own open of the folder (flock treats them as separate processes) and
    # released together by a barrier: far more rounds of the race than spawned processes allow
    import dsca.store.write as write

    real, attempts = write._create_exclusive, Counter()

    def counted(path: Path, body: bytes) -> bool:
        attempts[path.parent.name] += 1
        return real(path, body)

    monkeypatch.setattr(write, "_create_exclusive", counted)
    stores = [tmp_path / f"race{k}.zarr" for k in range(12)]
    barrier, found, lock = threading.Barrier(6), [], threading.Lock()

    def shard() -> None:
        for out in stores:
            barrier.wait(timeout=60)
            out.mkdir(exist_ok=True)
            fd = write.lock_store(out, shared=True)
            try:
                attrs, created = write.join_store(out, "float16", "none", "enc", False, 6, lambda: 32)
            finally:
                os.close(fd)
            with lock:
                found.append((out, created, json.dumps(attrs, sort_keys=True)))

    threads = [threading.Thread(target=shard) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(found) == 6 * len(stores)
    assert max(attempts.values()) > 1, attempts  # the race was run: several shards tried to create a root
    for out in stores:
        mine = [(created, attrs) for s, created, attrs in found if s == out]
        assert sum(created for created, _ in mine) == 1  # exactly one shard created it
        assert len({attrs for _, attrs in mine}) == 1  # and all agree on what it holds
        attrs = json.loads(mine[0][1])
        assert attrs["feature_dim"] == 32
        assert attrs[SHARDED] == {"shards": 6, "dtype": "float16", "codec": "none", "extractor": "enc"}
        assert json.loads((out / "slides" / "zarr.json").read_text())["node_type"] == "group"
        assert sorted(p.name for p in out.iterdir()) == ["slides", "zarr.json"]  # no temp file left


def test_shard_assignment_is_stable_disjoint_and_covering(synth_cohort):
    ids = [*synth_cohort.slide_ids, "é", "e\u0301", "a\udcff", "TCGA-AA-0001-01Z-00-DX1"]
    for n in (1, 2, 3, 7):
        owners = {sid: [k for k in range(n) if Shard(k, n).owns(sid)] for sid in ids}
        assert all(len(k) == 1 for k in owners.values()), owners  # each slide in exactly one shard
        again = {sid: [k for k in range(n) if Shard(k, n).owns(sid)] for sid in reversed(ids)}
        assert again == owners
        # crc32 of the UTF-8 id: the same in every process and Python version (str hash is salted)
        assert all(owners[s] == [zlib.crc32(s.encode("utf-8", "surrogateescape")) % n] for s in ids)
    assert [k for k in range(3) if Shard(k, 3).owns("slide-1")] == [2]
    assert [k for k in range(3) if Shard(k, 3).owns("TCGA-AA-0001-01Z")] == [1]
    assert Shard.parse("0/1") == Shard(0, 1) and str(Shard.parse("7/8")) == "7/8"
    for index, count in ((3, 2), (-1, 3), (0, 0), (2, 2)):
        with pytest.raises(ValueError):
            Shard(index, count)


@pytest.mark.parametrize("value", ["3/2", "2/2", "a/b", "-1/3", "1/0", "0/0", "1", "1/2/3", " 1/2", "+1/2"])
def test_bad_shard_values_are_usage_errors_naming_the_flag(value, tmp_path, capsys):
    args = ["convert", "--x5-features", "f5", "--x20-features", "f20", "--x5-coords", "c5",
            "--out", str(tmp_path / "s.zarr")]
    with pytest.raises(SystemExit) as stop:
        main([*args, f"--shard={value}"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("dsca-store convert: error: argument --shard: ") and repr(value) in err
    with pytest.raises(SystemExit) as stop:  # a value that looks like an option: argparse's own words
        main([*args, "--shard", "-1/3"])
    assert stop.value.code == 2 and "argument --shard" in capsys.readouterr().err
    assert not (tmp_path / "s.zarr").exists()


def _hold(out: Path, how: int) -> int:
    """Hold the store's lock as a running shard (LOCK_SH) or convert/finalize (LOCK_EX) does."""
    fd = os.open(out, os.O_RDONLY)
    fcntl.flock(fd, how | fcntl.LOCK_NB)
    return fd


def test_shards_and_exclusive_runs_exclude_each_other(synth_cohort, tmp_path, capsys):
    c, out = synth_cohort, tmp_path / "s.zarr"
    assert _convert(c, out, shard=Shard(0, 3)).ok
    fd = _hold(out, fcntl.LOCK_SH)  # shard 0 still running
    try:
        # refused at once (no waiting): it would consolidate while shards write
        with pytest.raises(ConvertError, match="is being written by another convert .*; wait for it to finish"):
            _convert(c, out)
        with pytest.raises(ConvertError, match="being written by another convert"):
            _convert(c, out, overwrite=True)
        assert main(["-q", "finalize", str(out)]) == 2
        assert capsys.readouterr().err.startswith(f"error: {out} is being written by another convert")
        assert _convert(c, out, shard=Shard(1, 3)).ok  # another shard runs alongside
    finally:
        os.close(fd)
    fd = _hold(out, fcntl.LOCK_EX)  # a convert without --shard, or finalize
    try:
        with pytest.raises(ConvertError, match=r"another convert \(one without --shard\) or by finalize"):
            _convert(c, out, shard=Shard(2, 3))
    finally:
        os.close(fd)
    assert _convert(c, out, shard=Shard(2, 3)).ok
    report = finalize_store(out)
    assert report.shards == 3 and report.slides == len(c.slide_ids)
    assert FeatureStore.open(out).slide_ids == sorted(c.slide_ids)
    assert verify_store(out, progress=False).ok


def test_a_rerun_shard_skips_its_slides_and_leaves_the_others_alone(synth_cohort, tmp_path):
    c, out = synth_cohort, tmp_path / "s.zarr"
    zero, one = Shard(0, 2), Shard(1, 2)
    first = _convert(c, out, shard=zero)
    assert first.converted == _owned(c.slide_ids, zero) and first.ok
    assert FeatureStore.open(out).slide_ids == first.converted  # the other shard's are not there yet
    # what shards killed mid-slide left: the rerun of shard 0 removes only its own
    theirs = out / "slides" / f".{_owned(c.slide_ids, one)[0]}.0123456789ab.tmp"
    ours = out / "slides" / f".{first.converted[0]}.0123456789ab.tmp"
    for folder in (theirs, ours):
        folder.mkdir()
        (folder / "x5").write_bytes(b"half")
    again = _convert(c, out, shard=zero)
    assert again.converted == [] and again.skipped == first.converted
    assert theirs.is_dir() and not ours.exists()
    redo = _convert(c, out, shard=zero, overwrite=True)
    assert redo.converted == first.converted and not redo.skipped
    assert FeatureStore.open(out).slide_ids == first.converted
    # shards of another split or other settings would not add up to one store
    with pytest.raises(ConvertError, match=r"being converted in 2 shards \(not finalized yet\); this shard is one of 3"):
        _convert(c, out, shard=Shard(0, 3))
    with pytest.raises(ConvertError, match="other settings \\(codec 'none' there, 'zstd3' here\\)"):
        _convert(c, out, shard=one, codec="zstd3")
    rest = _convert(c, out, shard=one)
    assert rest.converted == _owned(c.slide_ids, one) and not theirs.exists()
    assert finalize_store(out).shards == 2
    assert verify_store(out, progress=False).ok
    # finalized: a new split may start; everything is complete already
    later = _convert(c, out, shard=Shard(2, 3))
    assert later.converted == [] and later.skipped == _owned(c.slide_ids, Shard(2, 3))
    assert finalize_store(out).shards == 3 and finalize_store(out).shards is None  # a second finalize is harmless
    assert FeatureStore.open(out).slide_ids == sorted(c.slide_ids)
