"""Training configuration: the reference study's YAML keys plus ``store``/``labels``/``splits``,
parsed once into :class:`TrainConfig`.

Every key of the reference ``config_hier.yaml`` is accepted. The network's keys are those of
``dsca.model.ModelConfig.yaml_keys()`` and end up in ``TrainConfig.model``; the raw-CLAM path
keys (``path_patchx20``, ...) are superseded by ``store``; ``path_label``,
``path_data_split`` and ``seed_data_split`` are aliases of ``labels``, ``splits`` and
``folds``. An unknown key is an error that names the closest valid key. ``labels_map`` (text
``slide=slide_id,patient=case_id,...`` or a mapping) says which label CSV columns hold the
slide, patient, time and event/censorship; it is parsed here, once, into a
``dsca.labels.LabelColumns``.
"""
from __future__ import annotations

import difflib
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from dsca.labels import LabelColumns, LabelError, parse_labels_map

__all__ = ["ConfigError", "TrainConfig", "load_config", "parse_config"]

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """The training configuration is invalid (message names the key and the file)."""


# Reference keys that only describe the raw CLAM layout or the reference's own bookkeeping:
# accepted so that the study's file loads unchanged, but the store replaces them.
_SUPERSEDED = {
    "path_patchx20", "path_patchx5", "path_coordx5", "path_coordx20", "feat_format",
    "label_discrete", "cuda_id", "task", "experiment", "dataset_name",
}
_ALIASES = {"path_label": "labels", "path_data_split": "splits", "seed_data_split": "folds"}
_LOSSES = {"survmle": "survmle", "nll": "survmle", "survple": "survple", "cox": "survple"}
_OPTS = ("adam", "adamw", "lookahead_adam")


@dataclass
class TrainConfig:
    """Everything `dsca train` needs; built by :func:`parse_config`, never from loose dicts.

    Model fields live in ``model`` (a ``dsca.model.ModelConfig``); the rest are the reference
    keys of the same names with these additions: ``store``, ``labels``, ``splits`` (a pattern
    with ``{}`` or a list of files), ``folds``, ``last_group`` ("drop" = the last, incomplete
    group of ``bp_every_iters`` patients of an epoch is not back-propagated, as the reference;
    "step" = it is, with its own mean loss), ``bin_cut`` ("cohort" = cut-points on all
    patients as the reference, or "train" = on each fold's training patients), ``cox_ties``,
    ``device`` ("auto", "cpu", "cuda", "cuda:1"), ``amp`` ("auto", "bf16", "fp16", "off";
    CUDA only), ``eval_bootstrap`` (C-index CI resamples), ``num_threads`` (CPU threads,
    0 = torch's default), ``cache_features`` (keep every patient's features in RAM after
    the first read: for cohorts that fit in memory) and ``labels_map`` (the label CSV's
    columns, a ``dsca.labels.LabelColumns``; default ``pathology_id, patient_id, t, e``).
    """

    model: Any
    store: Path
    labels: Path
    splits: str | list[str]
    folds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    bins: int = 4
    bin_cut: str = "cohort"
    loss: str = "survmle"
    alpha: float = 0.1
    cox_ties: str = "efron"
    reg_l1: float = 1e-5
    seed: int = 42
    epochs: int = 150
    batch_size: int = 1
    bp_every_iters: int = 16
    last_group: str = "drop"
    num_workers: int = 0
    monitor_metrics: str = "loss"
    es_patience: int | None = 30
    es_warmup: int = 0
    es_start_epoch: int = 0
    es_verbose: bool = True
    lr_factor: float = 0.5
    lr_patience: int = 10
    opt: str = "lookahead_adam"
    lr: float = 8e-5
    weight_decay: float = 5e-4
    opt_eps: float | None = None
    opt_betas: tuple[float, float] | None = None
    opt_momentum: float | None = None
    save_path: Path | None = None
    save_prediction: bool = True
    device: str = "auto"
    amp: str = "auto"
    eval_bootstrap: int = 1000
    num_threads: int = 0
    cache_features: bool = False
    labels_map: LabelColumns = field(default_factory=LabelColumns)
    source: str = "<dict>"

    @property
    def is_cox(self) -> bool:
        return self.loss == "survple"

    @property
    def position_emb(self) -> bool:
        return bool(self.model.tra_position_emb)

    def to_dict(self) -> dict[str, Any]:
        """Plain-YAML view (for the run directory and resume checks)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "model":
                v = {k: list(x) if isinstance(x, tuple) else x for k, x in asdict(v).items()}
            elif isinstance(v, Path):
                v = str(v)
            elif isinstance(v, LabelColumns):
                v = str(v)  # the full key=column text, which labels_map reads back
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out


def _model_config_class() -> Any:
    from dsca.model import ModelConfig

    return ModelConfig


def valid_keys() -> set[str]:
    """All keys a training YAML may hold."""
    own = {f.name for f in fields(TrainConfig)} - {"model", "source"}
    model_keys = set(_model_config_class().yaml_keys())
    return own | model_keys | _SUPERSEDED | set(_ALIASES) | {
        "bins_discrete", "no_cuda", "num_patch_sampling"
    }


def load_config(path: str | Path, **overrides: Any) -> TrainConfig:
    """Read a YAML file and parse it (relative paths resolve against the file's folder)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys, got {type(raw).__name__}")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return parse_config(raw, source=str(path), base_dir=path.parent)


def parse_config(raw: dict[str, Any], source: str = "<dict>", base_dir: Path | None = None) -> TrainConfig:
    """Validate a key -> value mapping and build the :class:`TrainConfig`.

    Raises:
        ConfigError: unknown key (with the closest valid one), missing store/labels/splits,
            wrong values.
    """
    raw = dict(raw)
    known = valid_keys()
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{source}: unknown key {key!r}{hint}")
    for alias, key in _ALIASES.items():
        if alias in raw:
            if key in raw and raw[key] != raw[alias]:
                # The study's file keeps its original paths; the added key is the one meant.
                log.info("%s: %s = %r overrides %s = %r", source, key, raw[key], alias, raw[alias])
            raw.setdefault(key, raw.pop(alias))
        raw.pop(alias, None)
    ignored = sorted(k for k in _SUPERSEDED if k in raw)
    if ignored:
        log.debug("%s: keys superseded by the store, ignored: %s", source, ", ".join(ignored))
    if raw.get("num_patch_sampling", -1) not in (-1, None):
        raise ConfigError(f"{source}: num_patch_sampling is not supported by the dual-stream model; use -1")

    model_cls = _model_config_class()
    model_keys = set(model_cls.yaml_keys())
    model_raw = {k: v for k, v in raw.items() if k in model_keys}
    try:
        model_cfg = model_cls.from_dict(model_raw)
    except (TypeError, ValueError, KeyError) as err:
        raise ConfigError(f"{source}: model configuration: {err}") from err

    def need(key: str) -> Any:
        if raw.get(key) in (None, ""):
            raise ConfigError(f"{source}: missing required key {key!r}")
        return raw[key]

    def resolve(p: Any) -> Any:
        if base_dir is None or p is None:
            return p
        return str(p) if Path(str(p)).is_absolute() else str(base_dir / str(p))

    loss = _LOSSES.get(str(raw.get("loss", "survmle")).lower())
    if loss is None:
        raise ConfigError(f"{source}: loss {raw['loss']!r} is not one of survmle (nll), survple (cox)")
    out_dim = model_cfg.dims[-1]
    bins = int(raw.get("bins_discrete", out_dim if out_dim > 1 else 4))
    if loss == "survmle" and out_dim != bins:
        raise ConfigError(
            f"{source}: dims ends in {out_dim} but bins_discrete is {bins}: the discrete head "
            "needs one hazard per bin"
        )
    if loss == "survple" and out_dim != 1:
        raise ConfigError(f"{source}: loss survple (Cox) needs dims ending in 1, got {out_dim}")

    folds = raw.get("folds", [0, 1, 2, 3, 4])
    folds = [int(folds)] if isinstance(folds, int) else [int(k) for k in folds]
    splits = need("splits")
    splits = resolve(splits) if isinstance(splits, str) else [resolve(s) for s in splits]

    try:
        labels_map = parse_labels_map(raw.get("labels_map"))
    except LabelError as err:
        raise ConfigError(f"{source}: labels_map: {str(err).removeprefix('labels map: ')}") from err

    device = raw.get("device", "cpu" if raw.get("no_cuda") else "auto")
    betas = raw.get("opt_betas")
    cfg = TrainConfig(
        model=model_cfg,
        store=Path(resolve(need("store"))),
        labels=Path(resolve(need("labels"))),
        splits=splits,
        folds=folds,
        bins=bins,
        loss=loss,
        opt_betas=tuple(float(b) for b in betas) if betas else None,
        device=str(device),
        save_path=Path(resolve(raw["save_path"])) if raw.get("save_path") else None,
        labels_map=labels_map,
        source=source,
        **{
            f.name: _coerce(raw[f.name], f.name, source)
            for f in fields(TrainConfig)
            if f.name in raw and f.name not in _SET_ABOVE
        },
    )
    _check(cfg)
    return cfg


_SET_ABOVE = {
    "model", "store", "labels", "splits", "folds", "bins", "loss", "opt_betas",
    "device", "save_path", "labels_map", "source",
}
_FLOATS = {"alpha", "reg_l1", "lr", "weight_decay", "lr_factor", "opt_eps", "opt_momentum"}
_INTS = {
    "seed", "epochs", "batch_size", "bp_every_iters", "num_workers", "es_patience", "es_warmup",
    "es_start_epoch", "lr_patience", "eval_bootstrap", "num_threads",
}


def _coerce(value: Any, key: str, source: str) -> Any:
    if value is None:
        return None
    try:
        if key in _FLOATS:
            return float(value)
        if key in _INTS:
            return int(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: {key} = {value!r} is not a number") from err
    return value


def _check(cfg: TrainConfig) -> None:
    s = cfg.source
    if cfg.opt not in _OPTS:
        close = difflib.get_close_matches(str(cfg.opt), _OPTS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{s}: opt {cfg.opt!r} is not one of {', '.join(_OPTS)}{hint}")
    if cfg.batch_size != 1:
        raise ConfigError(f"{s}: batch_size must be 1 (patients have different numbers of patches)")
    if cfg.bp_every_iters < 1:
        raise ConfigError(f"{s}: bp_every_iters must be >= 1")
    if cfg.last_group not in ("drop", "step"):
        raise ConfigError(f"{s}: last_group must be 'drop' or 'step', got {cfg.last_group!r}")
    if cfg.bin_cut not in ("cohort", "train"):
        raise ConfigError(f"{s}: bin_cut must be 'cohort' or 'train', got {cfg.bin_cut!r}")
    if cfg.cox_ties not in ("efron", "breslow"):
        raise ConfigError(f"{s}: cox_ties must be 'efron' or 'breslow', got {cfg.cox_ties!r}")
    if cfg.monitor_metrics not in ("loss", "ci"):
        raise ConfigError(f"{s}: monitor_metrics must be 'loss' or 'ci', got {cfg.monitor_metrics!r}")
    if cfg.amp not in ("auto", "bf16", "fp16", "off"):
        raise ConfigError(f"{s}: amp must be auto, bf16, fp16 or off, got {cfg.amp!r}")
    if not 0.0 <= cfg.alpha <= 1.0:
        raise ConfigError(f"{s}: alpha must be in [0, 1], got {cfg.alpha}")
    if cfg.epochs < 1 or cfg.lr <= 0:
        raise ConfigError(f"{s}: epochs must be >= 1 and lr > 0")
    if any(k < 0 for k in cfg.folds):
        raise ConfigError(f"{s}: fold numbers must be >= 0, got {cfg.folds}")
