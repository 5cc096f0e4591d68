"""The starter config of `dsca init`: every key of the training YAML, its default and what it
means, grouped in sections."""
from __future__ import annotations

import textwrap
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import yaml

from dsca.config.model import ModelConfig
from dsca.config.training import TrainConfig

__all__ = ["starter_config"]

_SECTIONS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("inputs and outputs", (
        ("store", "feature store written by `dsca-store convert`: a folder or a URL such as "
                  "s3://bucket/cohort.zarr (required)"),
        ("storage_options", "fsspec options of a store at a URL, e.g. {endpoint_url: ..., cache_dir: "
                            "local folder of a read-through chunk cache}; null = credentials and endpoint "
                            "from the AWS_* environment variables"),
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
    model_defaults = asdict(ModelConfig())
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
    return textwrap.wrap(text, width)
