"""Training configuration: the reference study's YAML keys plus ``store``/``labels``/``splits``,
parsed once into :class:`TrainConfig`.

Every key of the reference ``config_hier.yaml`` is accepted. The network's keys are those of
``ModelConfig.yaml_keys()`` and end up in ``TrainConfig.model``; the raw-CLAM path
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
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from dsca.config.model import ModelConfig
from dsca.labels import LabelColumns, LabelError, parse_labels_map

__all__ = ["ConfigError", "TrainConfig", "load_config", "parse_config", "parse_folds", "valid_keys"]

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """The training configuration is invalid (message names the key and the file)."""


# Reference keys that only describe the raw CLAM layout or the reference's own bookkeeping:
# accepted so that the study's file loads unchanged, but the store replaces them.
_SUPERSEDED = {
    "path_patchx20", "path_patchx5", "path_coordx5", "path_coordx20", "feat_format",
    "label_discrete", "cuda_id", "task", "experiment", "dataset_name",
}
_ALIASES = {"path_label": "labels", "path_data_split": "splits", "seed_data_split": "folds",
            "bins": "bins_discrete"}
_LOSSES = {"survmle": "survmle", "nll": "survmle", "survple": "survple", "cox": "survple"}
_OPTS = ("adam", "adamw", "lookahead_adam")
# Names other tools use for our keys, which spelling similarity would not find.
_KEY_SYNONYMS = {
    "learning_rate": "lr", "lr_rate": "lr", "optimizer": "opt", "optim": "opt",
    "max_epochs": "epochs", "n_epochs": "epochs", "num_epochs": "epochs",
    "patience": "es_patience", "early_stopping_patience": "es_patience",
    "l1": "reg_l1", "l1_reg": "reg_l1", "wd": "weight_decay",
    "n_bins": "bins_discrete", "num_bins": "bins_discrete",
    "fold": "folds", "n_folds": "folds", "split": "splits", "split_dir": "splits",
    "labels_csv": "labels", "label_csv": "labels", "store_path": "store", "features": "store",
    "gpu": "device", "cuda": "device", "seed_everything": "seed", "output": "save_path",
    "out": "save_path", "output_dir": "save_path", "ties": "cox_ties",
}


@dataclass
class TrainConfig:
    """Everything `dsca train` needs; built by :func:`parse_config`, never from loose dicts.

    Model fields live in ``model`` (a :class:`~dsca.config.model.ModelConfig`); the rest are the reference
    keys of the same names with these additions: ``store``, ``labels``, ``splits`` (a pattern
    with ``{}`` or a list of files), ``folds``, ``last_group`` ("drop" = the last, incomplete
    group of ``bp_every_iters`` patients of an epoch is not back-propagated, as the reference;
    "step" = it is, with its own mean loss), ``bin_cut`` ("train" = cut-points on each fold's
    training patients, the default: test labels never shape the training targets; "cohort" =
    on all patients, as the reference, to compare with its published numbers), ``cox_ties``,
    ``device`` ("auto", "cpu", "cuda", "cuda:1"), ``amp`` ("auto", "bf16", "fp16", "off";
    CUDA only), ``eval_bootstrap`` (C-index CI resamples), ``num_threads`` (CPU threads,
    0 = torch's default), ``cache_features`` (keep every patient's features in RAM after
    the first read: for cohorts that fit in memory) and ``labels_map`` (the label CSV's
    columns, a ``dsca.labels.LabelColumns``; default ``pathology_id, patient_id, t, e``) and
    ``time_unit`` (the unit of the label times, for plots and reports). ``store`` may be a URL
    (``s3://bucket/cohort.zarr``) with ``storage_options``, fsspec's options for it (a mapping;
    its ``cache_dir`` key turns on a local read-through cache of the chunks read).
    """

    model: ModelConfig
    # a local folder (resolved against the config's folder), or a URL kept as the str it is
    # ("s3://bucket/cohort.zarr": a Path would collapse it to "s3:/bucket/cohort.zarr")
    store: Path | str
    labels: Path
    splits: str | list[str]
    folds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    bins: int = 4
    bin_cut: str = "train"
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
    time_unit: str = "days"
    # fsspec options of a store at a URL (credentials, endpoint_url, cache_dir: a local
    # read-through chunk cache); None: s3fs/botocore read the AWS_* environment variables
    storage_options: dict[str, Any] | None = None
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
            elif f.name == "storage_options" and v is not None:
                v = _redacted(v)  # the run folder's config.yaml must not hold credentials
            elif isinstance(v, LabelColumns):
                v = str(v)  # the full key=column text, which labels_map reads back
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out


def valid_keys() -> set[str]:
    """All keys a training YAML may hold."""
    own = {f.name for f in fields(TrainConfig)} - {"model", "source"}
    model_keys = set(ModelConfig.yaml_keys())
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
    section = raw.pop("model", None)
    if isinstance(section, dict):
        raw.pop("source", None)  # where the run's config was first read from, not a setting
        # a run folder's config.yaml keeps the model keys in their own section: it is a config too
        for key, value in section.items():
            if key not in ModelConfig.yaml_keys():
                raise ConfigError(f"{source}: model: unknown key {key!r}")
            if key in raw and raw[key] != value:
                raise ConfigError(f"{source}: {key} is given twice, {raw[key]!r} and model: {value!r}")
            raw[key] = value
    elif section is not None:
        raise ConfigError(f"{source}: model must be a mapping of model keys, got {section!r}")
    for key in raw:
        if key not in known:
            close = [_KEY_SYNONYMS[key]] if key in _KEY_SYNONYMS else difflib.get_close_matches(
                key, sorted(known), n=1, cutoff=0.5)
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

    model_keys = set(ModelConfig.yaml_keys())
    model_raw = {k: v for k, v in raw.items() if k in model_keys}
    try:
        model_cfg = ModelConfig.from_dict(model_raw)
    except (TypeError, ValueError, KeyError) as err:
        raise ConfigError(f"{source}: model configuration: {err}") from err

    def required(key: str) -> Any:
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
    bins = _number(raw.get("bins_discrete", out_dim if out_dim > 1 else 4), "bins_discrete", source, int)
    if loss == "survmle" and out_dim != bins:
        raise ConfigError(
            f"{source}: dims ends in {out_dim} but bins_discrete is {bins}: the discrete head "
            "needs one hazard per bin"
        )
    if loss == "survple" and out_dim != 1:
        raise ConfigError(f"{source}: loss survple (Cox) needs dims ending in 1, got {out_dim}")

    folds = parse_folds(raw.get("folds", [0, 1, 2, 3, 4]), f"{source}: folds")
    splits = required("splits")
    if isinstance(splits, str):
        splits = resolve(splits)
    elif isinstance(splits, list) and splits and all(isinstance(s, str) for s in splits):
        splits = [resolve(s) for s in splits]
    else:
        raise ConfigError(f"{source}: splits must be a path pattern with {{}} or a list of paths, "
                          f"got {splits!r}")

    try:
        labels_map = parse_labels_map(raw.get("labels_map"))
    except LabelError as err:
        raise ConfigError(f"{source}: labels_map: {str(err).removeprefix('labels map: ')}") from err

    device = raw.get("device", "cpu" if raw.get("no_cuda") else "auto")
    betas = raw.get("opt_betas")
    if betas is not None:
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            raise ConfigError(f"{source}: opt_betas must be two numbers [beta1, beta2], got {betas!r}")
        betas = [_number(b, "opt_betas", source, float) for b in betas]
    from dsca.store.remote import CACHE_KEY, is_url, local_path, storage_options_problem

    store = required("store")
    if not isinstance(store, (str, Path)):
        raise ConfigError(f"{source}: store must be a folder or a URL (s3://bucket/cohort.zarr), got {store!r}")
    storage_options = raw.get("storage_options")
    problem = storage_options_problem(storage_options)
    if problem:
        raise ConfigError(f"{source}: {problem}")
    if storage_options is not None:
        storage_options = dict(storage_options)
        if storage_options.get(CACHE_KEY):  # a cache folder is a local path like the others
            storage_options[CACHE_KEY] = resolve(storage_options[CACHE_KEY])
    cfg = TrainConfig(
        model=model_cfg,
        store=str(store) if is_url(str(store)) else Path(resolve(local_path(str(store)))),
        storage_options=storage_options,
        labels=Path(resolve(required("labels"))),
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
            if f.name in raw and f.name not in _PARSED_BEFORE
        },
    )
    _check(cfg)
    return cfg


_PARSED_BEFORE = {
    "model", "store", "labels", "splits", "folds", "bins", "loss", "opt_betas",
    "device", "save_path", "labels_map", "source", "storage_options",
}
# storage_options keys whose values are credentials (s3fs: key, secret, token)
_SECRET = ("key", "secret", "token", "password", "credential")


def _redacted(options: dict[str, Any]) -> dict[str, Any]:
    """`options` with the values of credential-like keys replaced, recursively."""
    return {k: _redacted(v) if isinstance(v, dict) else
            ("<redacted>" if any(word in str(k).lower() for word in _SECRET) and v is not None else v)
            for k, v in options.items()}
_FLOATS = {"alpha", "reg_l1", "lr", "weight_decay", "lr_factor", "opt_eps", "opt_momentum"}
_INTS = {
    "seed", "epochs", "batch_size", "bp_every_iters", "num_workers", "es_patience", "es_warmup",
    "es_start_epoch", "lr_patience", "eval_bootstrap", "num_threads",
}
_BOOLS = {"es_verbose", "save_prediction", "cache_features"}
_STRINGS = {"bin_cut", "cox_ties", "last_group", "monitor_metrics", "opt", "amp", "time_unit"}
# (low, high, low inclusive, high inclusive); high None = unbounded.
_RANGES: dict[str, tuple[float, float | None, bool, bool]] = {
    "alpha": (0.0, 1.0, True, True),
    "reg_l1": (0.0, None, True, False),
    "lr": (0.0, None, False, False),
    "weight_decay": (0.0, None, True, False),
    "lr_factor": (0.0, 1.0, False, False),
    "opt_eps": (0.0, None, False, False),
    "opt_momentum": (0.0, 1.0, True, False),
    "seed": (0, None, True, False),
    "epochs": (1, None, True, False),
    "bp_every_iters": (1, None, True, False),
    "num_workers": (0, None, True, False),
    "es_patience": (1, None, True, False),
    "es_warmup": (0, None, True, False),
    "es_start_epoch": (0, None, True, False),
    "lr_patience": (0, None, True, False),
    "eval_bootstrap": (0, None, True, False),
    "num_threads": (0, None, True, False),
}


def _number(value: Any, key: str, source: str, kind: type) -> Any:
    """``value`` as an int or float, refusing booleans, text and (for ints) fractions."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{source}: {key} = {value!r} is not a number")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise ConfigError(f"{source}: {key} = {str(value)[:40]!r} is not a number") from None
    if not math.isfinite(number):
        raise ConfigError(f"{source}: {key} = {value!r} must be finite")
    if kind is int:
        if not number.is_integer():
            raise ConfigError(f"{source}: {key} = {value!r} must be a whole number")
        return int(number)
    return number


# Keys whose value may be null (the others need a value of their type).
_NULLABLE = {"es_patience", "opt_eps", "opt_momentum"}


def _coerce(value: Any, key: str, source: str) -> Any:
    if value is None:
        if key in _NULLABLE:
            return None
        raise ConfigError(f"{source}: {key} needs a value (null is not allowed)")
    if key in _FLOATS:
        value = _number(value, key, source, float)
    elif key in _INTS:
        value = _number(value, key, source, int)
    elif key in _BOOLS and not isinstance(value, bool):
        raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
    elif key in _STRINGS and not isinstance(value, str):
        raise ConfigError(f"{source}: {key} must be text, got {value!r}")
    if key in _RANGES:
        _check_range(key, value, source)
    return value


def _check_range(key: str, value: float, source: str) -> None:
    low, high, low_in, high_in = _RANGES[key]
    if (value < low if low_in else value <= low) or (
        high is not None and (value > high if high_in else value >= high)
    ):
        if high is None:
            what = f"{'>=' if low_in else '>'} {low}"
        else:
            what = f"in {'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"
        raise ConfigError(f"{source}: {key} must be {what}, got {value}")


def parse_folds(value: Any, context: str) -> list[int]:
    """Fold numbers from YAML (an int or a list) or the command line ("0,1,3").

    Raises:
        ConfigError: naming ``context`` (the key or flag), for anything but distinct
            non-negative whole numbers.
    """
    items = value.split(",") if isinstance(value, str) else [value] if isinstance(value, int) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise ConfigError(f"{context}: expected fold numbers such as 0,1,2; got {value!r}")
    folds = []
    for item in items:
        text = str(item).strip()
        if isinstance(item, bool) or not text.isdigit():
            raise ConfigError(f"{context}: expected fold numbers such as 0,1,2; {item!r} is not "
                              "a non-negative whole number")
        folds.append(int(text))
    repeated = sorted({k for k in folds if folds.count(k) > 1})
    if repeated:
        raise ConfigError(f"{context}: fold {', '.join(map(str, repeated))} given more than once")
    return folds


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
    if cfg.opt_betas is not None and not all(0.0 <= b < 1.0 for b in cfg.opt_betas):
        raise ConfigError(f"{s}: opt_betas must be two numbers in [0, 1), got {list(cfg.opt_betas)}")
    if cfg.bins < 2:
        raise ConfigError(f"{s}: bins_discrete must be >= 2, got {cfg.bins}")
    if not cfg.time_unit.strip():
        raise ConfigError(f"{s}: time_unit must not be empty")
    if cfg.es_warmup >= cfg.epochs:
        raise ConfigError(f"{s}: es_warmup ({cfg.es_warmup}) must be below epochs ({cfg.epochs}): "
                          "no epoch after the warm-up could be the best")
