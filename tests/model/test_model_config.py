"""ModelConfig reads the reference YAML's model keys and rejects bad values clearly."""
from __future__ import annotations

import pytest
import torch
import yaml

from dsca import build_model
from dsca.model import DSCA, ModelConfig


def test_reference_yaml_parses_to_defaults(reference_dir):
    raw = yaml.safe_load((reference_dir / "config_hier.yaml").read_text())
    cfg = ModelConfig.from_dict(raw)  # training keys are ignored
    assert cfg == ModelConfig()
    assert cfg.dims == (1024, 384, 384, 4)
    assert isinstance(build_model(raw), DSCA)
    # every model key of the reference file is one ModelConfig reads
    for key in ("dims", "emb_x20_backbone", "tra_epsilon", "join", "fusion", "pool", "dropout"):
        assert key in ModelConfig.yaml_keys()
    assert "lr" not in ModelConfig.yaml_keys()
    assert "capool_backend" in ModelConfig.yaml_keys()


def test_dims_as_list_and_string_agree():
    assert ModelConfig.from_dict({"dims": [64, 32, 32, 1]}) == ModelConfig.from_dict(
        {"dims": "64-32-32-1"}
    )
    assert ModelConfig.from_dict({"dims": "64-32-32-1"}).cox


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"dims": "1024-384-4"}, "'dims'.*4 sizes"),
        ({"dims": "1024-384-x-4"}, "'dims'.*4 integers"),
        ({"dims": "1024-384-256-4"}, "'dims'.*must be equal"),
        ({"dims": "1024-30-30-4"}, "'dims'.*multiple of 4"),
        ({"pool": "attention"}, "'pool'.*gap, mean, max, max_mean"),
        ({"fusion": "add"}, "'fusion'.*fusion, cat"),
        ({"emb_x20_backbone": "sconv"}, "'emb_x20_backbone'"),
        ({"tra_backbone": "transformer"}, "'tra_backbone'"),
        ({"magnification": "x10"}, "'magnification'"),
        ({"capool_backend": "cuda"}, "'capool_backend'"),
        ({"emb_x20_ksize": 5}, "'emb_x20_ksize'.*1 or 3"),
        ({"emb_x5_ksize": 4}, "'emb_x5_ksize'.*odd"),
        ({"tra_nhead": 5}, "'tra_nhead'.*divide"),
        ({"tra_nhead": "8"}, "'tra_nhead'.*integer"),
        ({"dropout": 1.5}, "'dropout'.*probability"),
        ({"tra_position_emb": "yes"}, "'tra_position_emb'.*true or false"),
    ],
)
def test_bad_values_name_the_key(bad, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(bad)


def test_input_shape_errors_are_clear():
    model = build_model({"dims": "32-16-16-4", "tra_nhead": 2}).eval()
    x5 = torch.randn(1, 4, 32)
    with pytest.raises(ValueError, match="16 x20 rows per x5 patch"):
        model(torch.randn(1, 48, 32), x5)
    with pytest.raises(ValueError, match=r"x20 must be \[B, 16N, 32\]"):
        model(torch.randn(1, 64, 31), x5)
    with pytest.raises(ValueError, match=r"coords must be \[B, 4, 2\]"):
        model(torch.randn(1, 64, 32), x5, torch.zeros(1, 5, 2))
    with pytest.raises(ValueError, match="no patches"):
        model(torch.randn(1, 0, 32), torch.randn(1, 0, 32))


def test_single_stream_variants_take_only_their_inputs():
    x5_only = build_model({"dims": "32-16-16-4", "tra_nhead": 2, "magnification": "x5"}).eval()
    assert x5_only(None, torch.randn(1, 3, 32)).shape == (1, 4)
    x20_avg = build_model({"dims": "32-16-16-4", "tra_nhead": 2, "magnification": "x20",
                           "emb_x20_backbone": "avgpool"}).eval()
    assert x20_avg(torch.randn(1, 48, 32), None).shape == (1, 4)
    names = {n.split(".")[0] for n, _ in x20_avg.named_parameters()}
    assert names == {"patch_embedding_layer", "patch_encoder_layer", "pool", "out_layer"}
