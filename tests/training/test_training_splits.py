"""Split files: reading the reference's .npz, checks, stratified generation, `dsca split`."""
from __future__ import annotations

import numpy as np
import pytest

from dsca.cli.dsca_main import main
from dsca.labels import LabelError, load_labels
from dsca.splits import load_split, make_splits, resolve_split_paths, write_splits


def _labels(write_csv, n=60, seed=0):
    rng = np.random.default_rng(seed)
    rows = [{"pathology_id": f"S{i}", "patient_id": f"P{i}", "e": int(rng.random() < 0.6),
             "t": float(rng.integers(1, 3000))} for i in range(n)]
    return write_csv(rows)


def test_reference_split_files(reference_dir):
    labels = load_labels(reference_dir / "labels/tcga_lgg/TCGA_LGG_path_full.csv")
    pattern = str(reference_dir / "labels/tcga_lgg/tcga_lgg-seed783-fold{}.npz")
    tests = []
    for path in resolve_split_paths(pattern, range(5)):
        split = load_split(path, known_patients=labels.index)
        assert len(split.train) and len(split.val) and split.test
        tests += split.test
    assert sorted(tests) == sorted(labels.index)  # test sets partition the cohort


def test_unknown_and_overlapping_patients(tmp_path):
    path = tmp_path / "f.npz"
    np.savez(path, train_patients=["A", "B"], val_patients=["C"], test_patients=["Z"])
    with pytest.raises(LabelError, match="'Z'.*test.*not in the labels"):
        load_split(path, known_patients=["A", "B", "C"])
    np.savez(path, train_patients=["A", "B"], val_patients=["B"])
    with pytest.raises(LabelError, match="'B' is in both train and val"):
        load_split(path)
    np.savez(path, train_patients=["A"])
    with pytest.raises(LabelError, match="missing val_patients"):
        load_split(path)
    with pytest.raises(LabelError, match="no '\\{\\}'"):
        resolve_split_paths("fold.npz", [0])
    with pytest.raises(LabelError, match="fold 2"):
        resolve_split_paths(["a.npz", "b.npz"], [2])


def test_make_splits_partition_and_stratify(write_csv):
    labels = load_labels(_labels(write_csv, n=100))
    splits = make_splits(labels, folds=5, seed=1)
    tests = [p for s in splits for p in s.test]
    assert sorted(tests) == sorted(labels.index)
    for s in splits:
        assert not set(s.train) & set(s.val) and not set(s.train) & set(s.test)
        assert set(s.train) | set(s.val) | set(s.test) == set(labels.index)
        assert abs(len(s.val) - 0.2 * (len(s.train) + len(s.val))) <= 1
        # every fold's test set has about the cohort's event rate and each time bin
        assert abs(labels.loc[s.test, "e"].mean() - labels["e"].mean()) < 0.08
        assert labels.loc[s.test, "y_t"].nunique() == 4
    assert make_splits(labels, folds=5, seed=1) == splits
    assert make_splits(labels, folds=5, seed=2) != splits


def test_write_and_read_back(write_csv, tmp_path):
    labels = load_labels(_labels(write_csv, n=30))
    splits = make_splits(labels, folds=3, seed=0)
    paths = write_splits(splits, tmp_path / "out", "demo")
    assert [p.name for p in paths] == [f"demo-fold{k}.npz" for k in range(3)]
    for split, path in zip(splits, paths):
        assert load_split(path, known_patients=labels.index) == split
        with np.load(path) as data:
            assert data["train_patients"].dtype.kind == "U"  # reference format: no pickles


def test_cli_split(write_csv, tmp_path, capsys):
    csv = _labels(write_csv, n=40)
    assert main(["split", "--labels", str(csv), "--out", str(tmp_path / "s"), "--folds", "4", "--seed", "7"]) == 0
    out = capsys.readouterr().out
    assert "labels-seed7-fold3.npz" in out
    assert len(list((tmp_path / "s").glob("*.npz"))) == 4
    bad = write_csv([{"pathology_id": "S0", "patient_id": "P0", "t": 1}], "bad.csv")
    assert main(["split", "--labels", str(bad), "--out", str(tmp_path / "b")]) == 2
    assert "missing column(s) e" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
