"""Configuration, parsed and validated once into dataclasses.

``model.py``: :class:`ModelConfig`, the network's keys. ``training.py``: :class:`TrainConfig`,
the reference study's YAML keys plus ``store``/``labels``/``splits``, and the parsing that
builds it (an unknown key names the closest valid one). ``starter.py``: the commented starter
YAML that `dsca init` writes.
"""
from __future__ import annotations

from dsca.config.model import ModelConfig
from dsca.config.starter import starter_config
from dsca.config.training import (
    ConfigError,
    TrainConfig,
    load_config,
    parse_config,
    parse_folds,
    valid_keys,
)

__all__ = [
    "ConfigError",
    "ModelConfig",
    "TrainConfig",
    "load_config",
    "parse_config",
    "parse_folds",
    "starter_config",
    "valid_keys",
]
