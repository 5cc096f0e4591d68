"""The output folder of a training run: started empty, continued only with the same config.

A run folder holds ``run.json`` (its id and the configuration it was started with) beside the
outputs that ``dsca.train`` writes. Rules:

- a new run needs an empty or absent folder;
- ``resume`` continues the run in the folder, refusing a changed configuration (the message
  names the changed keys); running other folds into it adds them to the same run, whose
  summary then covers every finished fold;
- ``overwrite`` replaces a run: only the files and ``fold<k>`` folders a run writes are
  removed, and only in a folder that ``run.json`` marks as a run; anything else is left.
"""
from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsca.atomic import atomic_write

__all__ = ["RunDir", "RunDirError", "open_run_dir", "RUN_FILE", "NEXT_BEST"]

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
NEXT_BEST = "best.next.pt"  # a new best checkpoint until its epoch's last.pt is written
_FORMAT = "dsca-run"
_VERSION = 1
# Configuration keys that may differ when a run is continued: where and how fast it runs,
# not what it computes. ``folds`` differs when fold subsets are added to a run.
_MAY_CHANGE = frozenset({"folds", "device", "num_workers", "num_threads", "cache_features",
                         "source", "save_path"})
# What a run writes at its top level (``fold<k>/`` folders aside).
_RUN_FILES = frozenset({RUN_FILE, "metrics.json", "predictions.csv", "train.log", "config.yaml",
                        "training_curves.png", "km_test.png"})
_FOLD_FILES = frozenset({"best.pt", "last.pt", "result.json", NEXT_BEST})
_FOLD_DIR = re.compile(r"fold(0|[1-9]\d*)")
# folders whose files a run writes: the folds', and a final run's (dsca train --final)
_MODEL_DIR = re.compile(r"fold(0|[1-9]\d*)|final")
# the temp files of dsca.atomic for any of the above (a kill -9 can strand one)
_TEMP = re.compile(r"\.(.+)\.[0-9a-f]{12}\.tmp")


class RunDirError(ValueError):
    """The output folder cannot take this run (message says why and what to pass)."""


@dataclass(frozen=True)
class RunDir:
    """An output folder prepared for a run."""

    path: Path
    run_id: str
    resumed: bool

    def fold_dir(self, fold: int) -> Path:
        """``fold<k>/`` of this run (not created here)."""
        return self.path / f"fold{fold}"

    def folds(self) -> list[int]:
        """Numbers of the fold folders present, ascending."""
        return sorted(int(m.group(1)) for p in self.path.iterdir()
                      if (m := _FOLD_DIR.fullmatch(p.name)) and p.is_dir())


def open_run_dir(out: Path, config: dict[str, Any], *, resume: bool, overwrite: bool) -> RunDir:
    """Prepare ``out`` for a run of ``config`` (``TrainConfig.to_dict()``).

    Raises:
        RunDirError: ``out`` is a file; it is not empty and neither flag is given; ``resume``
            on a folder that is not a run or whose run had another configuration;
            ``overwrite`` of a non-empty folder that is not a run.
    """
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other")
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{out}: exists and is not a folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if resume:
        if not entries:
            log.info("%s: nothing to resume, starting a new run", out)
        else:
            run = _read_run_file(out)
            changed = _changed_keys(run["config"], config)
            if changed:
                raise RunDirError(
                    f"{out}: the run was started with another configuration ("
                    + "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changed)
                    + "); --resume needs the same config, or use --overwrite or another --out")
            return RunDir(out, run["run_id"], resumed=True)
    elif entries and not overwrite:
        raise RunDirError(
            f"{out}: the output folder is not empty; pass --resume to continue the run in it "
            "(other folds are added to it), --overwrite to replace it, or choose another --out")
    elif entries:
        _read_run_file(out, action="replace")
        _remove_run_outputs(out)
    out.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex
    with atomic_write(out / RUN_FILE) as f:
        json.dump({"format": _FORMAT, "version": _VERSION, "run_id": run_id,
                   "config": _comparable(config)}, f, indent=1)
    return RunDir(out, run_id, resumed=False)


def _read_run_file(out: Path, action: str = "resume") -> dict[str, Any]:
    """The folder's validated ``run.json``; ``action`` names what was refused in messages."""
    path = out / RUN_FILE
    try:
        run = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunDirError(f"{out}: not a dsca train output folder (no {RUN_FILE}); nothing to "
                          f"{action} there: choose an empty --out") from None
    except (OSError, ValueError) as err:
        raise RunDirError(f"{path}: cannot be read ({err})") from None
    if not isinstance(run, dict) or run.get("format") != _FORMAT or not isinstance(run.get("config"), dict):
        raise RunDirError(f"{path}: not a dsca run file; nothing to {action} there")
    if run.get("version") != _VERSION:
        raise RunDirError(f"{path}: run format version {run.get('version')}, this dsca writes "
                          f"{_VERSION}; use another --out")
    return run


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """The keys of ``config`` that must not change on resume, as JSON values."""
    # through JSON so that tuples and lists compare equal after a round trip
    return json.loads(json.dumps({k: v for k, v in config.items() if k not in _MAY_CHANGE}))


def _changed_keys(saved: dict[str, Any], config: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) of every key that differs; model keys by their own
    names, as the YAML spells them."""
    now = _comparable(config)
    flat_saved, flat_now = _flatten_model_keys(saved), _flatten_model_keys(now)
    return [(k, flat_saved.get(k), flat_now.get(k)) for k in sorted(set(flat_saved) | set(flat_now))
            if k not in _MAY_CHANGE and flat_saved.get(k) != flat_now.get(k)]


def _flatten_model_keys(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with the keys of its ``model`` section moved to the top level."""
    model = config.get("model")
    rest = {k: v for k, v in config.items() if k != "model"}
    return {**rest, **model} if isinstance(model, dict) else config


def _remove_run_outputs(out: Path) -> None:
    """Delete what a run wrote: its files by name (and their stranded temp files), fold
    folders emptied that way; ``run.json`` last, so that an interrupted removal can be
    repeated."""
    kept = []
    for entry in sorted(out.iterdir()):
        if entry.name == RUN_FILE:
            continue
        if _MODEL_DIR.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
            foreign = [p.name for p in sorted(entry.iterdir()) if not _remove_own(p, _FOLD_FILES)]
            if foreign:
                kept.append(f"{entry.name}/{', '.join(foreign[:3])}")
            else:
                entry.rmdir()
        elif not _remove_own(entry, _RUN_FILES):
            kept.append(entry.name)
    (out / RUN_FILE).unlink()
    if kept:
        log.warning("%s: --overwrite left what no run writes: %s", out, ", ".join(kept))


def _remove_own(path: Path, names: frozenset[str]) -> bool:
    """Unlink ``path`` if it is a regular file a run writes (or its temp file); True if so."""
    temp = _TEMP.fullmatch(path.name)
    if path.is_symlink() or not path.is_file() or not (path.name in names or (temp and temp.group(1) in names)):
        return False
    path.unlink()
    return True
