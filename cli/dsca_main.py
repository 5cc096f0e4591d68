"""`dsca`: train, evaluate, profile and demo DSCA models.

A registry of subcommand modules: each one (under dsca.cli) exposes the five members that
dsca.cli._common describes; `build_parser` and `run_main` there assemble and run them, the
same way as for `dsca-store` (dsca.cli.store_main).
"""
from __future__ import annotations

import argparse
import sys

from dsca.cli import _common

# subcommand name -> its module, in the order of `dsca --help`
SUBCOMMANDS = {
    "init": "dsca.cli.init",
    "train": "dsca.cli.train",
    "predict": "dsca.cli.predict",
    "heatmap": "dsca.cli.heatmap",
    "report": "dsca.cli.report",
    "demo": "dsca.cli.demo",
    "split": "dsca.cli.split",
    "profile": "dsca.cli.profile",
}


_EXAMPLES = """\
examples:
  dsca demo                                          # the whole workflow on synthetic data
  dsca split --labels labels.csv --out splits
  dsca init --out config.yaml                        # a commented starter config
  dsca train --config config.yaml --out runs/brca
  dsca report --run runs/brca                        # metrics recomputed from predictions.csv
  dsca predict --run runs/brca --store external.zarr --labels external.csv --out pred
  dsca heatmap --run runs/brca --store cohort.zarr --wsi slides/ --out heat
  dsca profile --device cuda
  dsca COMMAND --help                                # what each command reads and writes
"""


def build_parser() -> argparse.ArgumentParser:
    return _common.build_parser("dsca", __doc__.splitlines()[0], _EXAMPLES, SUBCOMMANDS)


def main(argv: list[str] | None = None) -> int:
    return _common.run_main(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
