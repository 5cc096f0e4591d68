"""Shared plumbing of the argparse front ends: logging and failure reporting."""
from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["add_verbosity", "setup_logging"]


def add_verbosity(parser: argparse.ArgumentParser, subcommand: bool = False) -> None:
    """-v/-q on the front end and again on each subcommand.

    A subcommand's copies default to SUPPRESS: otherwise their defaults would overwrite the
    front end's values, and `dsca -q demo` would not be quiet.
    """
    verbose_default = argparse.SUPPRESS if subcommand else 0
    quiet_default = argparse.SUPPRESS if subcommand else False
    parser.add_argument(
        "-v", "--verbose", action="count", default=verbose_default,
        help="more log output (-vv for debug)",
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", default=quiet_default,
        help="only warnings, errors and the summary; no progress bars",
    )


def setup_logging(args: argparse.Namespace) -> None:
    """Log to stderr; INFO by default, DEBUG with -vv, WARNING with -q."""
    level = logging.INFO
    if getattr(args, "quiet", False):
        level = logging.WARNING
    elif getattr(args, "verbose", 0) >= 2:
        level = logging.DEBUG
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
