"""Run semantics: output folders, resume, fold subsets, failed folds, checkpoints (dsca.train,
dsca.train.rundir, dsca.train.checkpoint)."""
from __future__ import annotations

import json
import pickle

import pandas as pd
import pytest
import torch

from dsca.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dsca.cli.dsca_main import main
from dsca.config import load_config
from dsca.train.rundir import RunDirError
from dsca.train import train_cross_validation


def _train(config, out, *flags, folds=None):
    argv = ["train", "--config", str(config), "--out", str(out), *flags]
    return main(argv + (["--folds", folds] if folds else []))


def test_a_non_empty_output_folder_needs_resume_or_overwrite(small_config, tmp_path, capsys):
    config = small_config(epochs=1, folds=[0])
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert _train(config, out) == 2
    assert "not empty" in capsys.readouterr().err
    # --overwrite of a folder that no run wrote deletes nothing
    assert _train(config, out, "--overwrite") == 2
    assert "not a dsca train output folder" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    assert _train(config, out) == 0
    # --overwrite knows every file a run writes (its list lives in dsca.train.rundir)
    from dsca.train.rundir import _FOLD_FILES, _RUN_FILES

    assert {p.name for p in out.iterdir() if p.is_file()} <= _RUN_FILES
    assert {p.name for p in (out / "fold0").iterdir()} <= _FOLD_FILES
    first = json.loads((out / "run.json").read_text())["run_id"]
    (out / "notes.txt").write_text("mine")
    assert _train(config, out, "--overwrite") == 0
    assert json.loads((out / "run.json").read_text())["run_id"] != first
    assert (out / "notes.txt").read_text() == "mine"  # what no run writes is left alone


def test_fold_subsets_added_with_resume_merge_into_one_summary(small_config, tmp_path, capsys):
    """--folds 0, then --resume --folds 1 into the same run: metrics.json covers both folds,
    train.log keeps both, predictions.csv holds both folds' patients."""
    config = small_config(epochs=1)
    out = tmp_path / "run"
    assert _train(config, out, folds="0") == 0
    assert _train(config, out, folds="1") == 2  # not without --resume
    capsys.readouterr()
    assert _train(config, out, "--resume", folds="1") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [f["fold"] for f in metrics["folds"]] == [0, 1] and metrics["summary"]["n_folds"] == 2
    log = (out / "train.log").read_text()
    assert "fold 0 epoch 1" in log and "fold 1 epoch 1" in log
    assert sorted(pd.read_csv(out / "predictions.csv")["fold"].unique()) == [0, 1]
    alone = train_cross_validation(load_config(config), tmp_path / "alone", folds=[1])
    assert metrics["folds"][1]["test"]["cindex"] == pytest.approx(alone["folds"][0]["test"]["cindex"])


def test_resume_refuses_a_changed_config_naming_the_keys(small_config, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(small_config(epochs=1, folds=[0]), out) == 0
    assert _train(small_config(epochs=2, lr=0.5, dropout=0.5, folds=[0]), out, "--resume") == 2
    err = capsys.readouterr().err
    assert "another configuration" in err and "epochs: 1 -> 2" in err and "lr: 0.001 -> 0.5" in err
    assert "dropout: 0.1 -> 0.5" in err  # a model key, by its YAML name
    # where it runs may change
    assert _train(small_config(epochs=1, folds=[0], num_threads=2), out, "--resume") == 0


def test_a_fold_with_nan_predictions_fails_alone(small_config, tmp_path, capsys, monkeypatch):
    """A fold whose model predicts NaN is recorded as failed with its reason; the other folds
    are trained and reported; the exit status is 1."""
    import dsca.train.fold

    real_predict = dsca.train.fold.predict

    def nan_in_fold1(model, dataset, cfg, device, desc):
        out = real_predict(model, dataset, cfg, device, desc)
        if desc.startswith("fold 1"):
            out.out[0] = float("nan")
        return out

    monkeypatch.setattr(dsca.train.fold, "predict", nan_in_fold1)
    out = tmp_path / "run"
    assert _train(small_config(epochs=2, folds=[0, 1]), out) == 1
    err = capsys.readouterr().err
    assert "fold 1 failed" in err and "no epoch had a finite validation loss" in err
    metrics = json.loads((out / "metrics.json").read_text())
    s = metrics["summary"]
    assert (s["n_folds"], s["n_folds_failed"], s["folds_run"]) == (1, 1, [0])
    assert s["failed_folds"][0]["fold"] == 1
    assert metrics["folds"][1]["status"] == "failed" and "test" not in metrics["folds"][1]
    assert isinstance(s["test_cindex_mean"], float)
    assert set(pd.read_csv(out / "predictions.csv")["fold"]) == {0}
    # resumed without the fault: the failed fold is trained again, the finished one kept
    monkeypatch.undo()
    assert _train(small_config(epochs=2, folds=[0, 1]), out, "--resume") == 0
    s = json.loads((out / "metrics.json").read_text())["summary"]
    assert (s["n_folds"], s["n_folds_failed"]) == (2, 0)
    assert "fold 1: failed earlier" in (out / "train.log").read_text()


def test_a_fold_never_evaluates_another_runs_weights(small_config, tmp_path, capsys, monkeypatch):
    """Another run's best.pt where this run's should be is refused by name, not evaluated."""
    import dsca.train.fold

    config = small_config(epochs=1, folds=[0])
    assert _train(config, tmp_path / "a") == 0
    foreign = (tmp_path / "a" / "fold0" / "best.pt").read_bytes()
    real_save = dsca.train.fold.save_checkpoint

    def stale_best(path, *, kind, **state):
        if kind == "best":  # this run's best write lost, the other run's file in its place
            path.write_bytes(foreign)
        else:
            real_save(path, kind=kind, **state)

    monkeypatch.setattr(dsca.train.fold, "save_checkpoint", stale_best)
    assert _train(config, tmp_path / "b") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "best" in err[0] and "written by another run" in err[0]


def test_a_kill_between_best_and_last_checkpoint_resumes_exactly(small_config, tmp_path, monkeypatch):
    """Killed after a new best epoch's weights were written but before its last.pt: the
    resumed run equals an uninterrupted one (the early best weights are not taken)."""
    import dsca.train.fold

    cfg = load_config(small_config(epochs=3, folds=[0]))
    full = train_cross_validation(cfg, tmp_path / "full")
    real_save = dsca.train.fold._save_last

    def die_before_last(path, run_id, fold, epoch, *args):
        if epoch == 1:
            raise KeyboardInterrupt
        real_save(path, run_id, fold, epoch, *args)

    monkeypatch.setattr(dsca.train.fold, "_save_last", die_before_last)
    with pytest.raises(KeyboardInterrupt):
        train_cross_validation(cfg, tmp_path / "run")
    monkeypatch.undo()
    resumed = train_cross_validation(cfg, tmp_path / "run", resume=True)
    strip = lambda r: [{k: v for k, v in h.items() if k != "seconds"} for h in r["folds"][0]["history"]]  # noqa: E731
    assert strip(resumed) == strip(full)
    assert resumed["folds"][0]["test"] == full["folds"][0]["test"]
    assert not (tmp_path / "run" / "fold0" / "best.next.pt").exists()


def test_resume_retrains_a_fold_whose_result_is_unreadable(small_config, tmp_path):
    config = small_config(epochs=1, folds=[0])
    out = tmp_path / "run"
    assert _train(config, out) == 0
    (out / "fold0" / "result.json").write_text("{ truncated")
    assert _train(config, out, "--resume") == 0
    assert json.loads((out / "metrics.json").read_text())["summary"]["n_folds"] == 1
    assert "unreadable" in (out / "train.log").read_text()


def test_overwrite_removes_stranded_temp_files_of_the_run(small_config, tmp_path):
    config = small_config(epochs=1, folds=[0])
    out = tmp_path / "run"
    assert _train(config, out) == 0
    (out / "fold0" / ".best.pt.0123456789ab.tmp").write_bytes(b"half")  # a kill -9 mid-save
    (out / ".metrics.json.0123456789ab.tmp").write_bytes(b"half")
    assert _train(config, out, "--overwrite") == 0
    assert not list(out.rglob("*.tmp"))


class _Planted:
    """A pickle that runs code when unpickled."""

    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_resume_never_unpickles_a_planted_or_corrupt_checkpoint(small_config, tmp_path, capsys,
                                                                monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = small_config(epochs=2, folds=[0])
    out = tmp_path / "run"
    assert _train(config, out) == 0
    (out / "fold0" / "result.json").unlink()  # as if the fold had been killed
    last = out / "fold0" / "last.pt"
    good = last.read_bytes()
    torch.save({"format": "dsca-checkpoint", "payload": _Planted()}, last, pickle_protocol=2)
    assert _train(config, out, "--resume") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(last) in err[0] and "pickled objects" in err[0]
    assert not (tmp_path / "PWNED").exists()
    last.write_bytes(good[: len(good) // 2])  # truncated by a full disk
    assert _train(config, out, "--resume") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(last) in err[0] and "delete it to train fold 0" in err[0]
    last.write_bytes(good)
    assert _train(config, out, "--resume") == 0


def test_checkpoints_round_trip_with_weights_only(tmp_path):
    path = tmp_path / "c.pt"
    model = {"w": torch.arange(3.0)}
    save_checkpoint(path, kind="best", run_id="r1", fold=2, epoch=4, model=model)
    state = load_checkpoint(path, kind="best", run_id="r1", fold=2)
    assert state["epoch"] == 4 and torch.equal(state["model"]["w"], model["w"])
    with pytest.raises(CheckpointError, match="another run"):
        load_checkpoint(path, kind="best", run_id="r1", fold=3)
    with pytest.raises(CheckpointError, match="expected 'last'"):
        load_checkpoint(path, kind="last", run_id="r1", fold=2)
    path.write_bytes(pickle.dumps({"format": "x"}, protocol=2))
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(path, kind="best", run_id="r1", fold=2)


def test_run_dir_errors_name_the_folder(tmp_path):
    from dsca.train.rundir import open_run_dir

    (tmp_path / "file").write_text("")
    with pytest.raises(RunDirError, match="is not a folder"):
        open_run_dir(tmp_path / "file", {}, resume=False, overwrite=False)
    with pytest.raises(RunDirError, match="exclude each other"):
        open_run_dir(tmp_path / "x", {}, resume=True, overwrite=True)


def test_ci_monitor_with_an_unrankable_validation_set_is_an_input_error(
        small_config, tmp_path, capsys, synth_cohort):
    """monitor_metrics: ci on a validation set without a comparable pair could never pick an
    epoch: refused before training, naming the split file."""
    import numpy as np

    with np.load(synth_cohort.splits[0]) as d:
        val = list(d["val_patients"])
        np.savez(tmp_path / "one-fold0.npz", train_patients=list(d["train_patients"]) + val[1:],
                 val_patients=val[:1], test_patients=d["test_patients"])
    config = small_config(splits=str(tmp_path / "one-fold{}.npz"), folds=[0], monitor_metrics="ci")
    assert _train(config, tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "one-fold0.npz" in err and "no comparable pair" in err and "monitor_metrics: loss" in err
    assert not (tmp_path / "o").exists()
