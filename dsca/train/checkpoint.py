"""Training checkpoints: written atomically, read with ``weights_only=True``, tied to their run.

Every checkpoint is a dict of tensors and plain Python values (no pickled classes), so loading
one never executes code from the file. It carries the run's id and its fold: a fold only
continues from, or evaluates, weights that its own run wrote, never those of an earlier run
left in the same folder.

    {"format": "dsca-checkpoint", "version": 1, "kind": "best" | "last", "run_id": str,
     "fold": int, "epoch": int (0-based), "model": state_dict, ...}

``last`` checkpoints add ``optimizer``, ``scheduler``, ``stopper``, ``scaler``, ``history`` and
``rng`` (see :func:`rng_state`). Once a fold is evaluated its ``best`` checkpoint also carries
``inference`` (:func:`inference_record`): everything ``dsca predict`` and ``dsca heatmap``
need to apply it without the run's other files. Best checkpoints written before that record
existed still load; :mod:`dsca.infer.models` then reads the same facts from the run folder. Tensors are loaded onto the CPU: the optimizer moves its state
to the parameters' device itself, and the RNG state must stay a CPU ByteTensor.
"""
from __future__ import annotations

import dataclasses
import pickle
import random
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsca.atomic import atomic_path

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state",
           "inference_record", "store_fingerprint"]

_FORMAT = "dsca-checkpoint"
_VERSION = 1


_REQUIRED = {
    "best": ("model", "epoch"),
    "last": ("model", "epoch", "optimizer", "scheduler", "stopper", "scaler", "history", "rng"),
}


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file and what to do."""


def save_checkpoint(path: Path, *, kind: str, run_id: str, fold: int, epoch: int,
                    model: dict[str, torch.Tensor], **extra: Any) -> None:
    """Write a checkpoint so that a kill leaves the previous one or this one, never half."""
    state = {"format": _FORMAT, "version": _VERSION, "kind": kind, "run_id": run_id,
             "fold": int(fold), "epoch": int(epoch), "model": model, **extra}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, *, kind: str, run_id: str, fold: int) -> dict[str, Any]:
    """Read a checkpoint of this run's fold.

    Raises:
        CheckpointError: the file is damaged, holds anything but tensors and plain values, is
            not a dsca checkpoint, or belongs to another run or fold.
    """
    what = f"delete it to train fold {fold} from the beginning" if kind == "last" else (
        f"delete the fold{fold} folder and train fold {fold} again")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError,
            ValueError, TypeError, AttributeError) as err:
        reason = " ".join(str(err).split())
        if "weights_only" in reason or "Unsupported global" in reason:
            reason = "it holds pickled objects, which are never loaded (only tensors and plain values)"
        elif len(reason) > 200:
            reason = reason[:200] + "..."
        raise CheckpointError(f"{path}: cannot be read ({reason}); {what}") from None
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise CheckpointError(f"{path}: not a dsca training checkpoint; {what}")
    if state.get("version") != _VERSION or state.get("kind") != kind:
        raise CheckpointError(f"{path}: a {state.get('kind')!r} checkpoint of format version "
                              f"{state.get('version')}, expected {kind!r} version {_VERSION}; {what}")
    missing = [k for k in _REQUIRED[kind] if k not in state]
    if missing:
        raise CheckpointError(f"{path}: a {kind} checkpoint without {', '.join(missing)}; {what}")
    if state.get("run_id") != run_id or state.get("fold") != fold:
        raise CheckpointError(f"{path}: written by another run (run {state.get('run_id')}, fold "
                              f"{state.get('fold')}), not this one; {what}")
    return state


def store_fingerprint(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """What must agree between the store a model was trained on and one it is applied to: the
    feature size, the encoder (``extractor``) and the pyramid levels of the two streams."""
    levels = attrs.get("levels")
    return {"feature_dim": int(attrs["feature_dim"]), "extractor": attrs.get("extractor"),
            "levels": dict(levels) if isinstance(levels, Mapping) else None}


def inference_record(cfg: Any, bin_edges: np.ndarray, train_risk: np.ndarray,
                     store_attrs: Mapping[str, Any], n_train: int) -> dict[str, Any]:
    """The ``inference`` entry of an evaluated best checkpoint (tensors and plain values only).

    Args:
        cfg: the run's :class:`~dsca.config.TrainConfig`.
        bin_edges: [K + 1] the fold's time-bin edges (the discrete head's bins).
        train_risk: [M] the best weights' risks of the fold's training patients: the scale
            that standardizes this model's risks in an ensemble, and its risk-group threshold.
        store_attrs: the training store's root attributes (see :func:`store_fingerprint`).
        n_train: training patients.
    """
    return {
        "model_config": dataclasses.asdict(cfg.model),
        "head": "cox" if cfg.is_cox else "discrete",
        "bin_edges": torch.as_tensor(np.asarray(bin_edges, dtype=np.float64)),
        "time_unit": cfg.time_unit,
        "train_risk": torch.as_tensor(np.asarray(train_risk, dtype=np.float64)),
        "n_train": int(n_train),
        "store": {"path": str(cfg.store), **store_fingerprint(store_attrs)},
        "amp": cfg.amp,
        "num_threads": int(cfg.num_threads),
    }


def rng_state() -> dict[str, Any]:
    """Every random generator's state, as tensors and plain values (loadable weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`; a CUDA state is restored only where CUDA is present."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
