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
    ],
)
def test_bad_values(extra, message):
    raw = {"store": "x", "labels": "y", "splits": "z{}", "dims": "32-16-16-4", "tra_nhead": 2, **extra}
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)


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
