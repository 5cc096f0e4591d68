"""`dsca`: train, evaluate, profile and demo DSCA models.

Each subcommand lives in its own module of this package exposing ``HELP`` (one line for
the command list), ``DESCRIPTION`` and ``EXAMPLES`` (its --help), ``add_arguments(parser)``
and ``run(args) -> int`` (the exit status).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from dsca.cli._common import HelpFormatter, add_subcommand, add_verbosity, setup_logging

# subcommand name -> module under dsca.cli
_SUBCOMMANDS = {
    "init": "init",
    "train": "train",
    "demo": "demo",
    "split": "split",
    "profile": "profile",
}


_EXAMPLES = """\
examples:
  dsca demo                                          # the whole workflow on synthetic data
  dsca split --labels labels.csv --out splits
  dsca init --out config.yaml                        # a commented starter config
  dsca train --config config.yaml --out runs/brca
  dsca profile --device cuda
  dsca COMMAND --help                                # what each command reads and writes
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsca", description=__doc__.splitlines()[0],
                                     epilog=_EXAMPLES, formatter_class=HelpFormatter)
    add_verbosity(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in _SUBCOMMANDS.items():
        module = importlib.import_module(f"dsca.cli.{module_name}")
        p = add_subcommand(sub, name, help=module.HELP, description=module.DESCRIPTION,
                           examples=module.EXAMPLES)
        add_verbosity(p, subcommand=True)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
