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
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsca.atomic import atomic_write

__all__ = ["RunDir", "RunDirError", "open_run_dir", "RUN_FILE"]

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
_FORMAT = "dsca-run"
_VERSION = 1
# Configuration keys that may differ when a run is continued: where and how fast it runs,
# not what it computes. ``folds`` differs when fold subsets are added to a run.
_MAY_CHANGE = frozenset({"folds", "device", "num_workers", "num_threads", "cache_features",
                         "source", "save_path"})
# What a run writes at its top level (``fold<k>/`` folders aside).
_RUN_FILES = frozenset({RUN_FILE, "metrics.json", "predictions.csv", "train.log", "config.yaml",
                        "training_curves.png", "km_test.png"})
_FOLD_FILES = frozenset({"best.pt", "last.pt", "result.json"})
_FOLD_DIR = re.compile(r"fold\d+")


class RunDirError(ValueError):
    """The output folder cannot take this run (message says why and what to pass)."""


@dataclass(frozen=True)
class RunDir:
    """An output folder prepared for a run."""

    path: Path
    run_id: str
    resumed: bool

    def fold_dir(self, fold: int) -> Path:
        return self.path / f"fold{fold}"


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
                    + "; ".join(f"{k}: {run['config'].get(k)!r} -> {config.get(k)!r}" for k in changed)
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
    # through JSON so that tuples and lists compare equal after a round trip
    return json.loads(json.dumps({k: v for k, v in config.items() if k not in _MAY_CHANGE}))


def _changed_keys(saved: dict[str, Any], config: dict[str, Any]) -> list[str]:
    now = _comparable(config)
    changed = []
    for key in sorted(set(saved) | set(now)):
        if key in _MAY_CHANGE:
            continue
        if key == "model" and isinstance(saved.get(key), dict) and isinstance(now.get(key), dict):
            changed += [k for k in sorted(set(saved[key]) | set(now[key]))
                        if saved[key].get(k) != now[key].get(k)]
        elif saved.get(key) != now.get(key):
            changed.append(key)
    return changed


def _remove_run_outputs(out: Path) -> None:
    """Delete what a run wrote (regular files by name, fold folders holding only those)."""
    kept = []
    for entry in sorted(out.iterdir()):
        if entry.name in _RUN_FILES and entry.is_file() and not entry.is_symlink():
            entry.unlink()
        elif _FOLD_DIR.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
            foreign = [p.name for p in entry.iterdir()
                       if p.name not in _FOLD_FILES or not p.is_file() or p.is_symlink()]
            if foreign:
                kept.append(f"{entry.name}/ (holds {', '.join(sorted(foreign)[:3])})")
                continue
            shutil.rmtree(entry)
        else:
            kept.append(entry.name)
    if kept:
        log.warning("%s: --overwrite left what no run writes: %s", out, ", ".join(kept))
