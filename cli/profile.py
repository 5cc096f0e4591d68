"""`dsca profile`: per-module time, memory and FLOPs of one forward+backward of the model."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

HELP = "per-module time, memory, FLOPs and FLOP/s of one forward+backward pass of the model"

DESCRIPTION = """\
    Profile one forward+backward pass of the DSCA model on a synthetic patient.

    Reads nothing but, optionally, the model keys of a reference-style YAML config (--config;
    --dims and --backend override it). Builds the model, runs a warm-up pass (which compiles
    and autotunes the Triton kernels on CUDA) and --repeats timed passes on a random patient
    of N low-res and 16N high-res rows.

    Prints a table of time, peak memory, FLOPs and FLOP/s per module; --json also writes the
    report as JSON. Exit status 2 when the config or the backend cannot be used here."""

EXAMPLES = """\
    dsca profile --n-patches 4000 --device cuda
    dsca profile --backend torch --device cpu --dims 1024-384-384-4 --repeats 5
    dsca profile --config config.yaml --json profile.json
    """

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--n-patches", type=int, default=1000, metavar="N",
        help="low-res patches N of the synthetic patient, with 16N high-res rows")
    add("--backend", choices=("auto", "triton", "torch"), default="auto",
        help="CAPool implementation; auto: Triton on CUDA, PyTorch on CPU")
    add("--device", choices=("cpu", "cuda"), default=None,
        help="where to run (default: cuda when available, else cpu)")
    add("--dims", default=None, metavar="D-C-H-B",
        help="input-embedding-hidden-bins sizes (default: --config's, else the reference's 1024-384-384-4)")
    add("--config", type=Path, default=None, metavar="YAML",
        help="take the model keys of this reference-style config, ignore the others "
             "(default: none, the reference model)")
    add("--repeats", type=int, default=3, help="timed passes after a warm-up; the median is reported")
    add("--seed", type=int, default=0, help="seed of the weights and the synthetic patient (default: %(default)s)")
    add("--json", type=Path, default=None, metavar="PATH", help="also write the report as JSON here (default: not written)")


def _model_cfg(args: argparse.Namespace) -> dict[str, Any]:
    """Model keys: reference defaults, then --config's model keys, then --dims/--backend."""
    import yaml

    from dsca.model import ModelConfig

    cfg: dict[str, Any] = {}
    if args.config is not None:
        if not args.config.is_file():
            raise ValueError(f"{args.config}: config file not found")
        try:
            raw = yaml.safe_load(args.config.read_text()) or {}
        except yaml.YAMLError as err:
            first_line = str(err).splitlines()[0]
            raise ValueError(f"{args.config}: not valid YAML ({first_line})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{args.config}: expected a mapping of keys")
        cfg = {k: v for k, v in raw.items() if k in ModelConfig.yaml_keys()}
    if args.dims is not None:
        cfg["dims"] = args.dims
    cfg["capool_backend"] = args.backend
    return cfg


def run(args: argparse.Namespace) -> int:
    import torch

    from dsca.profile import format_table, profile_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        report = profile_model(_model_cfg(args), args.n_patches, device, args.repeats, args.seed)
    except (ValueError, RuntimeError) as err:
        print(f"dsca profile: error: {err}", file=sys.stderr)
        return 2
    print(format_table(report))
    if args.json is not None:
        payload = asdict(report)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1))
        log.info("wrote %s", args.json)
    return 0
