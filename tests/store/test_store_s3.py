"""Feature stores on S3: a real S3 server (moto's, on 127.0.0.1), real zarr and s3fs, no mocks.

The server runs in this process (a thread) for the module; each test gets its own bucket.
Credentials and the endpoint come from the AWS_* environment variables, as in production.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from dsca.cli.store_main import main  # noqa: E402
from dsca.store import FeatureStore, StoreError  # noqa: E402
from dsca.store._layout import SHARDED  # noqa: E402
from dsca.store.convert import ConvertError, Shard, convert_cohort, finalize_store  # noqa: E402
from dsca.store.verify import store_info, verify_store  # noqa: E402


@pytest.fixture(scope="module")
def s3_endpoint():
    """An S3 server on a free port of 127.0.0.1 for this module; its endpoint URL."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    """A new, empty bucket; returns an s3fs file system and the bucket's URL (s3://<name>)."""
    import boto3
    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    # s3fs caches its instances (and their clients, made with the environment of their time)
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"dsca-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return s3fs.S3FileSystem(), f"s3://{bucket}"


def _convert(c, out, **kw):
    return convert_cohort(x5_features=c.x5_features, x20_features=c.x20_features, x5_coords=c.x5_coords,
                          x20_coords=c.x20_coords, labels=c.labels_csv, out=out, progress=False, **kw)


def _upload(fs, local: Path, url: str) -> str:
    """A copy of a local store at `url` (as a convert to it would leave it)."""
    fs.put(str(local), url.removeprefix("s3://"), recursive=True)
    return url


def test_convert_to_s3_reads_back_as_a_local_convert_and_verifies(synth_cohort, synth_store, s3, capsys, assert_same_store):
    fs, bucket = s3
    url = f"{bucket}/cohort.zarr"
    report = _convert(synth_cohort, url)
    assert report.ok, list(report.lines())
    assert report.out == url and len(report.converted) == len(synth_cohort.slide_ids)
    assert_same_store(synth_store, url)
    # the summary is written last and lists every slide: readers need no listing
    root = json.loads(fs.cat(f"{url}/zarr.json"))
    assert root.get("consolidated_metadata") and SHARDED not in root["attributes"]
    # patients load alike (the concurrent remote path), also as float16
    local, remote = FeatureStore.open(synth_store), FeatureStore.open(url)
    for slides in list(local.patient_slides().values())[:3]:
        a, b = local.read_patient(slides, dtype=np.float16), remote.read_patient(slides, dtype=np.float16)
        assert a.slide_ids == b.slide_ids and a.lengths == b.lengths
        assert np.array_equal(a.x5, b.x5) and np.array_equal(a.x20, b.x20) and np.array_equal(a.coords, b.coords)
    sid = local.slide_ids[0]
    a, b = local.read_region(sid, slice(0, 4), slice(0, 4)), remote.read_region(sid, slice(0, 4), slice(0, 4))
    assert np.array_equal(a.rows, b.rows) and np.array_equal(a.x20, b.x20)
    assert verify_store(url, progress=False).ok
    assert main(["verify", "-q", url]) == 0
    assert main(["info", url]) == 0
    out = capsys.readouterr().out
    assert f"store        {url}" in out and f"{len(local.slide_ids)} complete, 0 incomplete" in out
    info, local_info = store_info(url), store_info(synth_store)
    assert (info.slides, info.patches, info.feature_bytes) == (local_info.slides, local_info.patches,
                                                               local_info.feature_bytes)
    # a rerun skips every (unchanged) slide and leaves the store as it was
    again = _convert(synth_cohort, url)
    assert again.ok and not again.converted and len(again.skipped) == len(local.slide_ids)
    assert_same_store(synth_store, url)


def test_overwrite_replaces_every_slide_and_leaves_no_stale_object(synth_cohort, synth_store, s3, assert_same_store):
    fs, bucket = s3
    url = _upload(fs, synth_store, f"{bucket}/cohort.zarr")
    sid = FeatureStore.open(url).slide_ids[0]
    stray = f"{url}/slides/{sid}/x5/c/9/9"  # an object an older layout might have left
    fs.pipe(stray, b"old")
    report = _convert(synth_cohort, url, overwrite=True)
    assert report.ok and len(report.converted) == len(synth_cohort.slide_ids)
    assert not fs.exists(stray)
    assert_same_store(synth_store, url)
    assert verify_store(url, progress=False).ok


def test_a_deleted_remote_chunk_is_a_store_error_naming_slide_and_array(synth_store, s3):
    fs, bucket = s3
    url = _upload(fs, synth_store, f"{bucket}/cohort.zarr")
    store = FeatureStore.open(url)
    sid = store.slide_ids[0]
    fs.rm(f"{url}/slides/{sid}/x20/c/0/0/0")
    with pytest.raises(StoreError) as err:
        FeatureStore.open(url).read_patient([sid])
    assert str(err.value).startswith(f"{url}: slide {sid}: x20: ") and "missing" in str(err.value)
    with pytest.raises(StoreError, match=f"slide {sid}: x20: .*missing"):
        FeatureStore.open(url).read_array(sid, "x20")
    report = verify_store(url, progress=False)
    assert [s for s, _ in report.problems] == [sid] and "x20" in report.problems[0][1]


def test_a_failed_or_interrupted_slide_is_never_listed_complete(cohort_copy, s3):
    c = cohort_copy
    fs, bucket = s3
    url = f"{bucket}/cohort.zarr"
    victim = c.slide_ids[1]
    pt = c.x20_features / "pt_files" / f"{victim}.pt"
    pt.write_bytes(pt.read_bytes()[:100])
    report = _convert(c, url)
    assert [sid for sid, _ in report.failures] == [victim]
    store = FeatureStore.open(url)
    assert victim not in store.slide_ids and len(store.slide_ids) == len(c.slide_ids) - 1
    assert not fs.exists(f"{url}/slides/{victim}")  # nothing of it was uploaded
    # an upload killed before its last write: chunks there, no group document, no summary
    # (a convert drops the summary before it touches any slide)
    cut = store.slide_ids[0]
    root = json.loads(fs.cat(f"{url}/zarr.json"))
    root.pop("consolidated_metadata")
    fs.pipe(f"{url}/zarr.json", json.dumps(root).encode())
    fs.rm(f"{url}/slides/{cut}/zarr.json")
    assert fs.exists(f"{url}/slides/{cut}/x5/c/0/0")
    half = FeatureStore.open(url)
    assert cut not in half.slide_ids and len(half.slide_ids) == len(store.slide_ids) - 1
    with pytest.raises(StoreError, match="not in the store"):
        half.read_slide(cut)
    problems = dict(verify_store(url, progress=False).problems)
    assert "incomplete slide" in problems[cut]
    # the next run (the input repaired) finishes both and consolidates again
    again = _convert(c, url)
    assert cut in again.converted and [sid for sid, _ in again.failures] == [victim]
    final = FeatureStore.open(url)
    assert cut in final.slide_ids and victim not in final.slide_ids
    assert json.loads(fs.cat(f"{url}/zarr.json")).get("consolidated_metadata")


def test_an_interrupted_run_summarises_only_the_slides_it_uploaded(synth_cohort, synth_store, s3, monkeypatch, assert_same_store):
    from dsca.store.remote_write import RemotePublisher

    fs, bucket = s3
    url = f"{bucket}/cohort.zarr"
    upload = RemotePublisher.publish_slide
    done: list[str] = []

    def upload_two_then_ctrl_c(self, slide_id: str) -> None:
        if len(done) == 2:  # the third slide is complete in the staging store, not uploaded
            raise KeyboardInterrupt
        upload(self, slide_id)
        done.append(slide_id)

    monkeypatch.setattr(RemotePublisher, "publish_slide", upload_two_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        _convert(synth_cohort, url)
    root = json.loads(fs.cat(f"{url}/zarr.json"))
    listed = {k.split("/")[1] for k in root["consolidated_metadata"]["metadata"] if k.count("/") == 1}
    assert listed == set(done)
    assert FeatureStore.open(url).slide_ids == sorted(done)
    assert verify_store(url, progress=False).ok
    monkeypatch.setattr(RemotePublisher, "publish_slide", upload)
    again = _convert(synth_cohort, url)
    assert again.ok and sorted(again.skipped) == sorted(done)
    assert_same_store(synth_store, url)


def test_three_concurrent_shards_then_finalize_on_s3_equal_one_run(synth_cohort, synth_store, s3, assert_same_store):
    c = synth_cohort
    fs, bucket = s3
    url = f"{bucket}/sharded.zarr"
    shards = [Shard(k, 3) for k in range(3)]
    args = ["--x5-features", str(c.x5_features), "--x20-features", str(c.x20_features), "--x5-coords",
            str(c.x5_coords), "--x20-coords", str(c.x20_coords), "--labels", str(c.labels_csv), "--out", url]
    cmd = [sys.executable, "-m", "dsca.cli.store_main", "-q", "convert", *args]
    procs = [subprocess.Popen([*cmd, "--shard", str(s)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for s in shards]
    runs = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    assert all(code == 0 for code, _, _ in runs), [(k, err) for k, (code, _, err) in enumerate(runs) if code]
    waiting = FeatureStore.open(url)
    assert waiting.not_finalized and waiting.slide_ids == FeatureStore.open(synth_store).slide_ids
    assert any("not finalized" in reason for _, reason in verify_store(url, progress=False).problems)
    report = finalize_store(url)
    assert report.shards == 3 and report.slides == len(c.slide_ids) and report.out == url
    root = json.loads(fs.cat(f"{url}/zarr.json"))
    assert SHARDED not in root["attributes"] and root.get("consolidated_metadata")
    assert_same_store(synth_store, url)
    assert verify_store(url, progress=False).ok
    assert main(["finalize", url]) == 0  # again: harmless


def test_a_shard_that_finds_the_store_created_under_it_joins_it(synth_cohort, synth_store, s3, monkeypatch,
                                                               assert_same_store):
    """The interleaving of concurrent shards: this shard reads no root, then another shard
    creates the store (root and slides) before this one lists the prefix."""
    from dsca.store.remote import RemoteLocation

    _, bucket = s3
    url = f"{bucket}/raced.zarr"
    listing = RemoteLocation.children
    raced = []

    def children_after_a_peer(self, key):
        if key == "" and not raced:
            raced.append(True)
            assert _convert(synth_cohort, url, shard=Shard(1, 3)).ok  # the peer, start to end
        return listing(self, key)

    monkeypatch.setattr(RemoteLocation, "children", children_after_a_peer)
    report = _convert(synth_cohort, url, shard=Shard(0, 3))
    assert raced and report.ok, report.failures
    assert _convert(synth_cohort, url, shard=Shard(2, 3)).ok
    assert finalize_store(url).slides == len(synth_cohort.slide_ids)
    assert_same_store(synth_store, url)


def test_shards_started_together_with_other_settings_stop(synth_cohort, s3, monkeypatch):
    """Both shards found no store and uploaded their roots (no exclusive create on S3): the one
    whose root was overwritten by a shard of another N stops, naming both settings."""
    from dsca.store.remote_write import RemotePublisher

    fs, bucket = s3
    url, other = f"{bucket}/mixed.zarr", f"{bucket}/other.zarr"
    assert _convert(synth_cohort, other, shard=Shard(0, 2)).ok  # a real root of a 2-shard convert
    publish = RemotePublisher.publish_metadata

    def then_the_peer_uploads_its_root(self):
        publish(self)
        fs.pipe_file(f"{url}/zarr.json".removeprefix("s3://"), fs.cat(f"{other}/zarr.json"))

    monkeypatch.setattr(RemotePublisher, "publish_metadata", then_the_peer_uploads_its_root)
    with pytest.raises(ConvertError, match="other settings.*'shards': 2.*'shards': 3"):
        _convert(synth_cohort, url, shard=Shard(0, 3))


def test_read_through_cache_serves_chunks_deleted_since(synth_store, s3, tmp_path):
    fs, bucket = s3
    url = _upload(fs, synth_store, f"{bucket}/cohort.zarr")
    cache = tmp_path / "cache"
    local = FeatureStore.open(synth_store)
    pid, slides = next(iter(local.patient_slides().items()))
    want = local.read_patient(slides)
    first = FeatureStore.open(url, cache_dir=cache).read_patient(slides)
    assert np.array_equal(first.x5, want.x5) and np.array_equal(first.x20, want.x20)
    assert any(p.is_file() for p in cache.rglob("*"))
    for sid in slides:  # every chunk object of the patient gone from the server
        for name in ("x5", "x20", "coords"):
            fs.rm(f"{url}/slides/{sid}/{name}/c", recursive=True)
    # the same cache, also given as a storage option: read from disk alone
    again = FeatureStore.open(url, storage_options={"cache_dir": str(cache)}).read_patient(slides)
    assert np.array_equal(again.x5, want.x5) and np.array_equal(again.x20, want.x20)
    assert np.array_equal(again.coords, want.coords)
    with pytest.raises(StoreError, match="missing"):  # without it the loss shows
        FeatureStore.open(url).read_patient(slides)


def test_bad_urls_buckets_and_options_are_clear_errors(synth_cohort, s3):
    fs, bucket = s3
    with pytest.raises(StoreError, match=r"^s3://no-such-bucket-dsca/x\.zarr: bucket 'no-such-bucket-dsca' does not exist"):
        FeatureStore.open("s3://no-such-bucket-dsca/x.zarr")
    with pytest.raises(StoreError, match=rf"^{bucket}/absent\.zarr: no zarr store here"):
        FeatureStore.open(f"{bucket}/absent.zarr")
    with pytest.raises(StoreError, match="nosuchscheme://b/x.zarr: cannot open this URL"):
        FeatureStore.open("nosuchscheme://b/x.zarr")
    with pytest.raises(StoreError, match="pass it as a str"):  # a URL that went through Path
        FeatureStore.open(Path(f"{bucket}/absent.zarr"))
    with pytest.raises(StoreError, match="storage_options must be a mapping"):
        FeatureStore.open(f"{bucket}/x.zarr", storage_options=["key"])  # type: ignore[arg-type]
    report = verify_store("s3://no-such-bucket-dsca/x.zarr", progress=False)
    assert report.problems[0][1].startswith("s3://no-such-bucket-dsca/x.zarr: ")
    with pytest.raises(ConvertError, match=r"^s3://no-such-bucket-dsca/x\.zarr: "):
        _convert(synth_cohort, "s3://no-such-bucket-dsca/x.zarr")
    fs.pipe(f"{bucket}/notzarr/readme.txt", b"mine")
    with pytest.raises(ConvertError, match="is not a zarr store"):
        _convert(synth_cohort, f"{bucket}/notzarr")
    assert fs.cat(f"{bucket}/notzarr/readme.txt") == b"mine"
    with pytest.raises(ConvertError, match="no dsca-store here"):
        finalize_store(f"{bucket}/absent.zarr")
    # explicit options reach fsspec: wrong credentials are refused by the server's answer
    assert main(["info", f"{bucket}/absent.zarr", "--storage-option", "anon=true"]) == 2


@pytest.fixture
def small_config(synth_cohort, tmp_path: Path):
    """A small training YAML on the synthetic cohort (as tests/training's); overrides; its path."""
    import yaml

    def make(**overrides) -> Path:
        cfg = {"labels": str(synth_cohort.labels_csv),
               "splits": str(synth_cohort.splits[0]).replace("fold0", "fold{}"), "dims": "32-16-16-4",
               "tra_nhead": 2, "dropout": 0.1, "opt": "adam", "lr": 1e-3, "epochs": 2, "bp_every_iters": 4,
               "folds": [0, 1], "eval_bootstrap": 20, "num_threads": 1, "seed": 3, **overrides}
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    return make


def test_training_config_with_an_s3_store_loads_and_trains(synth_store, s3, small_config, tmp_path):
    from dsca.config import ConfigError, load_config
    from dsca.train.data import build_fold_data, open_store

    fs, bucket = s3
    url = _upload(fs, synth_store, f"{bucket}/cohort.zarr")
    path = small_config(store=url, storage_options={"config_kwargs": {"retries": {"max_attempts": 2}}},
                        epochs=1, folds=[0])
    cfg = load_config(path)
    assert cfg.store == url and isinstance(cfg.store, str)
    slides = open_store(cfg)
    assert slides == set(FeatureStore.open(synth_store).slide_ids)
    from dsca.labels import load_labels

    labels = load_labels(cfg.labels, bins=cfg.bins, columns=cfg.labels_map)
    split = str(cfg.splits).format(0)
    data = build_fold_data(cfg, labels, 0, Path(split), slides)
    sample = data.datasets["train"][0]
    assert sample.x5.shape[1] == 32 and sample.x20.shape[0] == 16 * sample.x5.shape[0]
    # a small `dsca train` on it
    assert main_train(path, tmp_path / "run") == 0
    assert (tmp_path / "run").is_dir()
    for bad, why in (([1, 2], "storage_options must be a mapping"), ({1: "x"}, "keys must be strings")):
        with pytest.raises(ConfigError, match=why):
            load_config(small_config(store=url, storage_options=bad))


def main_train(config: Path, out: Path) -> int:
    from dsca.cli.dsca_main import main as dsca

    return dsca(["train", "--config", str(config), "--out", str(out)])


def test_file_urls_open_local_stores_and_option_values_parse(synth_store, small_config):
    from dsca.cli._store_options import parse_storage_options
    from dsca.config import load_config
    from dsca.store import PatientDataset

    url = f"file://{synth_store}"
    local = FeatureStore.open(synth_store)
    assert FeatureStore.open(url).slide_ids == local.slide_ids
    patients = dict(list(local.patient_slides().items())[:1])
    want, got = PatientDataset(synth_store, patients)[0], PatientDataset(url, patients)[0]
    assert got.patient_id == want.patient_id
    for a, b in ((got.x20, want.x20), (got.x5, want.x5), (got.coords, want.coords)):
        assert torch.equal(a, b)
    assert load_config(small_config(store=url)).store == synth_store
    # a credential stays a str; JSON values parse; dotted keys nest
    assert parse_storage_options(["key=0123", "secret=true", "anon=false", "client_kwargs.region_name=eu-west-1"]) == {
        "key": "0123", "secret": "true", "anon": False, "client_kwargs": {"region_name": "eu-west-1"}}
