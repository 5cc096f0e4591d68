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
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from dsca.labels import LabelColumns, LabelError, parse_labels_map

__all__ = ["ConfigError", "TrainConfig", "load_config", "parse_config", "parse_folds", "starter_config"]

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

    Model fields live in ``model`` (a ``dsca.model.ModelConfig``); the rest are the reference
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
    ``time_unit`` (the unit of the label times, for plots and reports).
    """

    model: Any
    store: Path
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
    bins = _number(raw.get("bins_discrete", out_dim if out_dim > 1 else 4), "bins_discrete", source, int)
    if loss == "survmle" and out_dim != bins:
        raise ConfigError(
            f"{source}: dims ends in {out_dim} but bins_discrete is {bins}: the discrete head "
            "needs one hazard per bin"
        )
    if loss == "survple" and out_dim != 1:
        raise ConfigError(f"{source}: loss survple (Cox) needs dims ending in 1, got {out_dim}")

    folds = parse_folds(raw.get("folds", [0, 1, 2, 3, 4]), f"{source}: folds")
    splits = need("splits")
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


def parse_folds(value: Any, where: str) -> list[int]:
    """Fold numbers from YAML (an int or a list) or the command line ("0,1,3").

    Raises:
        ConfigError: naming ``where`` (the key or flag), for anything but distinct
            non-negative whole numbers.
    """
    items = value.split(",") if isinstance(value, str) else [value] if isinstance(value, int) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise ConfigError(f"{where}: expected fold numbers such as 0,1,2; got {value!r}")
    folds = []
    for item in items:
        text = str(item).strip()
        if isinstance(item, bool) or not text.isdigit():
            raise ConfigError(f"{where}: expected fold numbers such as 0,1,2; {item!r} is not "
                              "a non-negative whole number")
        folds.append(int(text))
    repeated = sorted({k for k in folds if folds.count(k) > 1})
    if repeated:
        raise ConfigError(f"{where}: fold {', '.join(map(str, repeated))} given more than once")
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


# ---------------------------------------------------------------------------------------------
# the starter config of `dsca init`: every key, its default and what it means

_SECTIONS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("inputs and outputs", (
        ("store", "feature store written by `dsca-store convert` (required)"),
        ("labels", "labels CSV: one row per slide with slide id, patient id, time, event (required)"),
        ("labels_map", "which CSV columns hold slide, patient, time and event/censorship, e.g. "
                       "'slide=slide_id,patient=case_id,time=os_days,event=os_event'; null = "
                       "pathology_id, patient_id, t, e"),
        ("splits", "split files, one .npz per fold: a pattern with {} for the fold number, as "
                   "`dsca split` writes them, or a list of paths (required)"),
        ("folds", "fold numbers to run"),
        ("time_unit", "unit of the label times, for plot axes and reports"),
        ("save_path", "output folder when --out is not given"),
        ("save_prediction", "write predictions.csv (every patient's risk and survival curve)"),
    )),
    ("survival targets and loss", (
        ("loss", "survmle: discrete-time NLL over bins_discrete bins; survple: Cox partial "
                 "likelihood (dims must end in 1)"),
        ("bins_discrete", "number of discrete time bins (quartiles of the event times for 4)"),
        ("bin_cut", "train: bin edges from each fold's training patients; cohort: from all "
                    "patients, as the reference study (use it to compare with its numbers)"),
        ("alpha", "extra weight of the uncensored patients' NLL term in training"),
        ("cox_ties", "tied event times in the Cox loss: efron or breslow"),
        ("reg_l1", "L1 penalty on every weight, added once per optimizer step"),
    )),
    ("optimisation", (
        ("opt", "adam, adamw or lookahead_adam (Lookahead k=6, alpha=0.5 around Adam)"),
        ("lr", "learning rate"),
        ("weight_decay", "weight decay (not applied to biases and norm weights)"),
        ("opt_eps", "Adam epsilon; null = torch's default"),
        ("opt_betas", "Adam betas [beta1, beta2]; null = torch's default"),
        ("opt_momentum", "accepted for the reference's configs; Adam does not use it"),
        ("epochs", "maximum epochs per fold"),
        ("batch_size", "patients per forward pass (must be 1: patients differ in size)"),
        ("bp_every_iters", "patients per optimizer step (gradients accumulate over them)"),
        ("last_group", "drop: the last incomplete group of an epoch is not back-propagated "
                       "(the reference); step: it is"),
        ("lr_factor", "ReduceLROnPlateau: factor the learning rate is multiplied by"),
        ("lr_patience", "ReduceLROnPlateau: epochs without improvement before that"),
        ("monitor_metrics", "what picks the best epoch and drives the schedule: loss "
                            "(validation NLL) or ci (validation C-index)"),
        ("es_patience", "early stopping: epochs without improvement before stopping; null = never"),
        ("es_warmup", "early stopping: epochs before anything is recorded"),
        ("es_start_epoch", "early stopping: never stop at or before this epoch"),
        ("es_verbose", "accepted for the reference's configs"),
        ("seed", "seed of weights, dropout and the shuffling"),
    )),
    ("model", (
        ("dims", "input-embedding-hidden-output sizes; the input is the store's feature size, "
                 "the output is bins_discrete (or 1 for Cox)"),
        ("magnification", "x5_x20 (both streams), x5 or x20 (one stream)"),
        ("emb_x5_backbone", "x5 patch embedding"),
        ("emb_x5_ksize", "x5 embedding kernel size (odd)"),
        ("emb_x20_backbone", "x20 embedding: capool (cross-attention pooling guided by the x5 "
                             "patch), avgpool or gapool"),
        ("emb_x20_dw_conv", "depthwise-separable 4x4-block convolution"),
        ("emb_x20_ksize", "block convolution kernel size: 1 or 3"),
        ("tra_position_emb", "sin-cos position embedding of the patch grid"),
        ("tra_backbone", "Transformer or Nystromformer"),
        ("tra_nhead", "attention heads of the encoder"),
        ("tra_num_layers", "encoder layers"),
        ("tra_ksize", "accepted for the reference's configs (unused)"),
        ("tra_dw_conv", "accepted for the reference's configs (unused)"),
        ("tra_epsilon", "accepted for the reference's configs (unused)"),
        ("join", "post: encode each stream then fuse; pre: fuse then encode"),
        ("fusion", "fusion (sum) or cat (concatenate)"),
        ("pool", "global pooling of the patches: gap (attention), mean, max or max_mean"),
        ("dropout", "dropout probability"),
        ("capool_backend", "auto (Triton on CUDA, PyTorch elsewhere), triton or torch"),
    )),
    ("machine", (
        ("device", "auto, cpu, cuda or cuda:N"),
        ("amp", "mixed precision on CUDA: auto, bf16, fp16 or off"),
        ("num_workers", "DataLoader worker processes (capped at the CPUs)"),
        ("num_threads", "torch CPU threads; 0 = torch's default"),
        ("cache_features", "keep every patient's features in memory after the first read"),
        ("eval_bootstrap", "bootstrap resamples of the C-index confidence interval; 0 = none"),
    )),
)


def starter_config(store: str | None = None, labels: str | None = None,
                   splits: str | None = None) -> str:
    """The text of a commented YAML config with every key at its default.

    ``store``, ``labels`` and ``splits`` fill the required keys (placeholders otherwise).
    """
    model_defaults = asdict(_model_config_class()())
    train_defaults = {f.name: getattr(TrainConfig(model=None, store=Path(), labels=Path(), splits=""), f.name)
                      for f in fields(TrainConfig)}
    given = {"store": store or "cohort.zarr", "labels": labels or "labels.csv",
             "splits": splits or "splits/cohort-fold{}.npz"}
    lines = ["# dsca train configuration: every key with its default. Relative paths are read",
             "# against this file's folder. Keys of the reference study's config_hier.yaml are",
             "# accepted too.", ""]
    for title, keys in _SECTIONS:
        lines += [f"# --- {title} " + "-" * max(0, 86 - len(title)), ""]
        for key, meaning in keys:
            if key in given:
                value: Any = given[key]
            elif key == "bins_discrete":
                value = train_defaults["bins"]
            elif key in model_defaults:
                value = model_defaults[key]
                value = "-".join(map(str, value)) if key == "dims" else value
            elif key == "labels_map":
                value = None  # the default columns
            else:
                value = train_defaults[key]
            for text in _wrap(meaning):
                lines.append(f"# {text}")
            lines.append(yaml.safe_dump({key: list(value) if isinstance(value, tuple) else value},
                                        default_flow_style=True, width=1000).strip().strip("{}"))
            lines.append("")
    return "\n".join(lines)


def _wrap(text: str, width: int = 92) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width)
