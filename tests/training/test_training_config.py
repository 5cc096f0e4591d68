"""Training configuration parsing (dsca.config)."""
from __future__ import annotations

import pytest
import yaml

from dsca.config import ConfigError, load_config, parse_config


def _reference(reference_dir, **extra):
    raw = yaml.safe_load((reference_dir / "config_hier.yaml").read_text())
    raw.update(extra)
    return raw


def test_reference_config_with_store_keys(reference_dir, tmp_path):
    raw = _reference(reference_dir, store="cohort.zarr", labels="labels.csv", splits="s/f{}.npz")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    # relative paths resolve against the config's folder; the added keys win over path_*
    assert cfg.store == tmp_path / "cohort.zarr" and cfg.labels == tmp_path / "labels.csv"
    assert cfg.splits == str(tmp_path / "s/f{}.npz")
    assert cfg.folds == [0, 1, 2, 3, 4] and cfg.bins == 4 and cfg.loss == "survmle"
    assert (cfg.opt, cfg.lr, cfg.weight_decay, cfg.bp_every_iters) == ("lookahead_adam", 8e-5, 5e-4, 16)
    assert (cfg.es_patience, cfg.epochs, cfg.alpha, cfg.reg_l1) == (30, 150, 0.1, 1e-5)
    assert cfg.model.dims == (1024, 384, 384, 4) and cfg.model.tra_nhead == 8 and cfg.position_emb
    assert yaml.safe_load(yaml.safe_dump(cfg.to_dict()))["model"]["dims"] == [1024, 384, 384, 4]


def test_reference_aliases(reference_dir):
    raw = _reference(reference_dir, store="x.zarr", seed_data_split=[1, 3])
    cfg = parse_config(raw)
    assert cfg.labels.name == "tcga_brca_path_full.csv"
    assert cfg.splits.endswith("tcga_brca-seed54-fold{}.npz") and cfg.folds == [1, 3]


@pytest.mark.parametrize(
    ("key", "suggestion"), [("lerning_rate", None), ("bp_every_iter", "bp_every_iters"),
                            ("es_patiance", "es_patience"), ("tra_nheads", "tra_nhead")]
)
def test_unknown_key_suggests_closest(key, suggestion):
    raw = {"store": "x", "labels": "y", "splits": "z{}", key: 1}
    with pytest.raises(ConfigError, match=f"unknown key '{key}'") as err:
        parse_config(raw, source="c.yaml")
    assert str(err.value).startswith("c.yaml:")
    if suggestion:
        assert f"did you mean '{suggestion}'" in str(err.value)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"store": None}, "missing required key 'store'"),
        ({"opt": "adamx"}, "did you mean 'adam'"),
        ({"loss": "survple"}, "Cox\\) needs dims ending in 1"),
        ({"dims": "32-16-16-3", "bins_discrete": 4}, "bins_discrete is 4"),
        ({"loss": "hinge"}, "not one of survmle"),
        ({"batch_size": 4}, "batch_size must be 1"),
        ({"bin_cut": "test"}, "bin_cut"),
        ({"lr": "fast"}, "lr = 'fast' is not a number"),
        ({"dropout": 1.5}, "model configuration.*dropout"),
        ({"num_patch_sampling": 100}, "num_patch_sampling"),
        ({"weight_decay": -1e-4}, "weight_decay must be >= 0"),
        ({"reg_l1": -1}, "reg_l1 must be >= 0"),
        ({"es_patience": -3}, "es_patience must be >= 1"),
        ({"eval_bootstrap": -1}, "eval_bootstrap must be >= 0"),
        ({"lr_factor": 2}, "lr_factor must be in \\(0.0, 1.0\\)"),
        ({"lr_patience": -1}, "lr_patience must be >= 0"),
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"epochs": 2.5}, "epochs = 2.5 must be a whole number"),
        ({"num_workers": -2}, "num_workers must be >= 0"),
        ({"alpha": True}, "alpha = True is not a number"),
        ({"lr": float("nan")}, "lr = nan must be finite"),
        ({"opt_betas": [0.9]}, "opt_betas must be two numbers"),
        ({"opt_betas": [0.9, 1.5]}, "opt_betas must be two numbers in \\[0, 1\\)"),
        ({"folds": [0, 0]}, "folds: fold 0 given more than once"),
        ({"folds": [0, -1]}, "-1 is not a non-negative whole number"),
        ({"save_prediction": "yes"}, "save_prediction must be true or false"),
        ({"bins": 3, "dims": "32-16-16-3"}, None),  # bins is bins_discrete, never ignored
    ],
)
def test_bad_values(extra, message):
    raw = {"store": "x", "labels": "y", "splits": "z{}", "dims": "32-16-16-4", "tra_nhead": 2, **extra}
    if message is None:
        assert parse_config(raw).bins == extra["bins"]
        return
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)


@pytest.mark.parametrize(("key", "meant"), [("learning_rate", "lr"), ("max_epochs", "epochs"),
                                            ("optimizer", "opt"), ("patience", "es_patience")])
def test_keys_of_other_tools_suggest_ours(key, meant):
    with pytest.raises(ConfigError, match=f"did you mean '{meant}'"):
        parse_config({"store": "x", "labels": "y", "splits": "z{}", key: 1})


def test_folds_flag_errors_name_the_flag(small_config, tmp_path, capsys):
    from dsca.cli.dsca_main import main

    for bad in ("a,b", "0,0", "1,,2", ""):
        assert main(["train", "--config", str(small_config()), "--out", str(tmp_path / "o"),
                     "--folds", bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("dsca train: error: --folds:"), err
    assert not (tmp_path / "o").exists()


def test_init_writes_a_config_with_every_key_that_parses_to_the_defaults(tmp_path, capsys):
    """`dsca init`: every key dsca train reads (the reference's aliases aside), commented,
    parsing to exactly the defaults; an existing file is kept."""
    from dataclasses import fields

    from dsca.cli.dsca_main import main
    from dsca.config import TrainConfig, valid_keys
    from dsca.model import ModelConfig

    out = tmp_path / "config.yaml"
    assert main(["init", "--out", str(out), "--store", "c.zarr", "--labels", "l.csv",
                 "--splits", "s/f{}.npz"]) == 0
    text = out.read_text()
    raw = yaml.safe_load(text)
    own = {f.name for f in fields(TrainConfig)} - {"model", "source", "bins"}
    assert own | ModelConfig.yaml_keys() | {"bins_discrete"} == set(raw)
    assert set(raw) <= valid_keys()
    lines = text.splitlines()
    for key in raw:  # each key has its comment right above it
        at = next(i for i, line in enumerate(lines) if line.startswith(f"{key}:"))
        assert lines[at - 1].startswith("# ") and lines[at - 1][2:].strip(), key
    cfg = load_config(out)
    default = parse_config({"store": "c.zarr", "labels": "l.csv", "splits": "s/f{}.npz"})
    assert cfg.to_dict() | {"source": "", "store": "", "labels": "", "splits": ""} == \
        default.to_dict() | {"source": "", "store": "", "labels": "", "splits": ""}
    assert cfg.store == tmp_path / "c.zarr"
    assert main(["init", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err


def test_cox_head_and_fold_train_bins():
    cfg = parse_config({"store": "x", "labels": "y", "splits": ["a.npz", "b.npz"], "dims": "32-16-16-1",
                        "tra_nhead": 2, "loss": "cox", "cox_ties": "breslow", "bin_cut": "train"})
    assert cfg.is_cox and cfg.cox_ties == "breslow" and cfg.bin_cut == "train"
    assert cfg.splits == ["a.npz", "b.npz"]


def test_not_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.yaml")


def test_a_run_folders_config_yaml_is_a_config_again(small_config, tmp_path):
    """The parsed config a run writes (model keys in their own section) parses to itself."""
    cfg = load_config(small_config(tra_nhead=2, dims="32-16-16-4"))
    written = tmp_path / "run_config.yaml"
    written.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    again = load_config(written)
    assert {k: v for k, v in again.to_dict().items() if k != "source"} == \
        {k: v for k, v in cfg.to_dict().items() if k != "source"}
    clash = cfg.to_dict()
    clash["dropout"] = 0.3
    with pytest.raises(ConfigError, match="dropout is given twice"):
        parse_config(clash)
    with pytest.raises(ConfigError, match="model: unknown key 'lr'"):
        parse_config({**cfg.to_dict(), "model": {"lr": 1.0}})
