"""`dsca report`: a run's metrics recomputed from predictions.csv equal what training wrote."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from dsca.cli import dsca_main
from dsca.config import load_config
from dsca.losses import survival_curve
from dsca.metrics import concordance_index
from dsca.train import train_cross_validation
from dsca.train.recompute import ReportError, compare_reports, compared_keys, recompute_report
from dsca.train.report import hazards_from_survival

_PNG = b"\x89PNG\r\n\x1a\n"
# What must be among the compared keys of every fold's test part (IBS: discrete head only).
_TEST_METRICS = ("cindex", "cindex_ci_low", "cindex_ci_high", "td_auc", "loss", "logrank_p",
                 "hazard_ratio")


def _train(synth_cohort, synth_store, root: Path, **overrides: Any) -> Path:
    """A tiny real run (the keys of conftest's small_config, which is function-scoped: these
    runs are shared by the module's tests)."""
    cfg: dict[str, Any] = {
        "store": str(synth_store), "labels": str(synth_cohort.labels_csv),
        "splits": str(synth_cohort.splits[0]).replace("fold0", "fold{}"),
        "dims": "32-16-16-4", "tra_nhead": 2, "dropout": 0.1, "opt": "adam", "lr": 1e-3,
        "epochs": 2, "bp_every_iters": 4, "folds": [0, 1], "eval_bootstrap": 20,
        "num_threads": 1, "seed": 3,
    }
    cfg.update(overrides)
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    train_cross_validation(load_config(root / "config.yaml"), root / "run")
    return root / "run"


@pytest.fixture(scope="module")
def discrete_run(synth_cohort, synth_store, tmp_path_factory) -> Path:
    return _train(synth_cohort, synth_store, tmp_path_factory.mktemp("report") / "discrete")


@pytest.fixture(scope="module")
def cox_run(synth_cohort, synth_store, tmp_path_factory) -> Path:
    return _train(synth_cohort, synth_store, tmp_path_factory.mktemp("report") / "cox",
                  dims="32-16-16-1", loss="survple", bp_every_iters=6, folds=[2])


def _copy(run: Path, dest: Path) -> Path:
    """A copy of the run folder to tamper with (without its checkpoints, which are not read)."""
    return Path(shutil.copytree(run, dest / run.name, ignore=shutil.ignore_patterns("*.pt")))


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = dsca_main.main(["-q", "report", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _numbers(report: dict[str, Any]) -> dict[str, float | None]:
    """Every compared key -> its value, walked here independently of compare_reports."""
    found = {}
    for key in compared_keys(report):
        head, *path = key.split(".")
        node: Any = report["summary"] if head == "summary" else next(
            f for f in report["folds"] if f"fold{f['fold']}" == head)
        for part in path:
            node = node[part]
        found[key] = node
    return found


@pytest.mark.parametrize("head", ["discrete", "cox"])
def test_recomputed_metrics_equal_the_saved_ones(head, request, tmp_path):
    run = request.getfixturevalue(f"{head}_run")
    saved = json.loads((run / "metrics.json").read_text())
    new = recompute_report(run, tmp_path / "out")
    assert new == json.loads((tmp_path / "out" / "metrics.json").read_text())
    a, b = _numbers(saved), _numbers(new)
    assert a.keys() == b.keys()
    folds = [f["fold"] for f in saved["folds"]]
    metrics = _TEST_METRICS + (("ibs",) if head == "discrete" else ())
    expected = {f"fold{k}.{part}.{m}" for k in folds for part in ("train", "val", "test")
                for m in metrics} | {"summary.test_pooled_logrank_p", "summary.test_pooled_hazard_ratio",
                                     "summary.test_cindex_mean", "summary.test_loss_mean"}
    assert expected <= a.keys()
    assert not any(".history" in k or k.endswith(".seconds") for k in a)
    for key in sorted(a):
        if a[key] is None:  # NaN in the run (e.g. a log-rank p with one group only)
            assert b[key] is None, key
        else:
            assert b[key] is not None and math.isclose(a[key], b[key], rel_tol=1e-9), (key, a[key], b[key])
    # the risk-group figures are compared on real numbers, not only on NaN == NaN
    assert a["summary.test_pooled_logrank_p"] is not None and a["summary.test_pooled_hazard_ratio"] is not None
    assert compare_reports(saved, new) == []
    for name in ("metrics.json", "km_test.png", "training_curves.png"):
        assert (tmp_path / "out" / name).is_file(), name
    for name in ("km_test.png", "training_curves.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == _PNG


def test_cli_prints_the_table_and_matches(discrete_run, tmp_path, capsys):
    rc, out, err = _cli(capsys, "--run", str(discrete_run), "--out", str(tmp_path / "rep"))
    assert rc == 0, err
    assert f"matches {discrete_run / 'metrics.json'}" in out
    assert "test C-index [95% CI]" in out and "mean over 2 fold(s)" in out
    assert (tmp_path / "rep" / "km_test.png").is_file()


def test_default_output_folder_is_inside_the_run(discrete_run, tmp_path, capsys):
    run = _copy(discrete_run, tmp_path)
    assert _cli(capsys, "--run", str(run))[0] == 0
    assert (run / "report" / "metrics.json").is_file()
    rc, _, err = _cli(capsys, "--run", str(run), "--out", str(run))
    assert rc == 2 and "is the run folder itself" in err


def test_a_changed_risk_is_a_difference_naming_its_key(discrete_run, tmp_path, capsys):
    run = _copy(discrete_run, tmp_path)
    preds = pd.read_csv(run / "predictions.csv", dtype={"patient_id": str}, float_precision="round_trip")
    # move one test patient's risk away from its fold's median (its risk group stays) so far
    # that its rank, and so the C-index, changes
    for i in preds.index[preds["split"] == "test"]:
        fold = preds.at[i, "fold"]
        test = (preds["fold"] == fold) & (preds["split"] == "test")
        high = preds.at[i, "risk_group"] == "high"
        new_risk = preds.loc[test, "risk"].max() + 1.0 if high else preds.loc[test, "risk"].min() - 1.0
        changed = preds.loc[test].copy()
        changed.loc[i, "risk"] = new_risk
        if concordance_index(changed["t"], changed["e"], changed["risk"]) != \
                concordance_index(preds.loc[test, "t"], preds.loc[test, "e"], preds.loc[test, "risk"]):
            preds.loc[i, "risk"] = new_risk
            break
    else:
        pytest.fail("no test risk whose change moves the C-index")
    preds.to_csv(run / "predictions.csv", index=False)
    rc, out, err = _cli(capsys, "--run", str(run))
    assert rc == 1, err
    assert f"fold{fold}.test.cindex: saved" in out and "differ from" in out


def test_a_risk_group_that_disagrees_with_the_risks_is_an_error(discrete_run, tmp_path, capsys):
    run = _copy(discrete_run, tmp_path)
    preds = pd.read_csv(run / "predictions.csv", dtype={"patient_id": str}, float_precision="round_trip")
    i = preds.index[(preds["fold"] == 1) & (preds["split"] == "val")][0]
    preds.loc[i, "risk_group"] = "low" if preds.loc[i, "risk_group"] == "high" else "high"
    preds.to_csv(run / "predictions.csv", index=False)
    with pytest.raises(ReportError, match=r"fold 1 val: risk_group of 1 patient"):
        recompute_report(run)
    rc, _, err = _cli(capsys, "--run", str(run))
    assert rc == 2 and err.startswith("dsca report: error: ") and len(err.strip().splitlines()) == 1
    assert preds.loc[i, "patient_id"] in err


def test_missing_inputs_are_one_line_errors_naming_the_file(discrete_run, tmp_path, capsys):
    run = _copy(discrete_run, tmp_path)
    (run / "fold0" / "result.json").unlink()
    rc, _, err = _cli(capsys, "--run", str(run))
    assert rc == 2 and f"{run / 'fold0' / 'result.json'}: not found" in err and "rows of fold 0" in err

    run = _copy(discrete_run, tmp_path / "b")
    preds = pd.read_csv(run / "predictions.csv").drop(columns=["risk", "surv_1"])
    preds.to_csv(run / "predictions.csv", index=False)
    with pytest.raises(ReportError, match=r"predictions.csv: missing column\(s\) risk"):
        recompute_report(run)
    assert _cli(capsys, "--run", str(run))[0] == 2

    (run / "predictions.csv").unlink()
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["save_prediction"] = False
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    rc, _, err = _cli(capsys, "--run", str(run))
    assert rc == 2 and f"{run / 'predictions.csv'}: not found" in err and "save_prediction: false" in err

    rc, _, err = _cli(capsys, "--run", str(tmp_path / "nowhere"))
    assert rc == 2 and "not a folder" in err
    rc, _, err = _cli(capsys)
    assert rc == 2 and "--run RUN" in err


def test_hazards_come_back_from_the_survival_curve():
    hazards = torch.tensor([[0.1, 0.5, 0.9], [0.3, 1.0, 0.2], [1e-6, 0.25, 0.5]], dtype=torch.float64)
    survival = survival_curve(hazards).numpy()
    back = hazards_from_survival(survival)
    # after a survival of 0 there is nothing left to lose: the hazard counts as 1
    np.testing.assert_allclose(back, [[0.1, 0.5, 0.9], [0.3, 1.0, 1.0], [1e-6, 0.25, 0.5]], rtol=1e-9)
    np.testing.assert_allclose(survival_curve(torch.from_numpy(back)).numpy(), survival, rtol=1e-12)
