"""Shared plumbing of the argparse front ends: help layout, logging and failure reporting."""
from __future__ import annotations

import argparse
import logging
import sys
import textwrap

__all__ = ["HelpFormatter", "add_subcommand", "add_verbosity", "setup_logging"]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's default in its help; descriptions and examples keep their line breaks.

    Unlike argparse's ArgumentDefaultsHelpFormatter, nothing is added for options without a
    real default (None, False: flags and optional paths) or whose help already says it.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or "default" in text or default in (None, False, argparse.SUPPRESS)
                or action.option_strings == [] or isinstance(action, argparse._HelpAction)):
            return text
        return f"{text} (default: %(default)s)"


def add_subcommand(sub: argparse._SubParsersAction, name: str, *, help: str, description: str,
                   examples: str) -> argparse.ArgumentParser:
    """A subcommand whose --help has a description, option defaults and an example section.

    `description` and `examples` are dedented, so they can be written as indented literals.
    """
    epilog = "examples:\n" + textwrap.indent(textwrap.dedent(examples).strip("\n"), "  ")
    return sub.add_parser(name, help=help, description=textwrap.dedent(description).strip(),
                          epilog=epilog, formatter_class=HelpFormatter)


def add_verbosity(parser: argparse.ArgumentParser, subcommand: bool = False) -> None:
    """-v/-q on the front end and again on each subcommand.

    A subcommand's copies default to SUPPRESS: otherwise their defaults would overwrite the
    front end's values, and `dsca -q demo` would not be quiet.
    """
    verbose_default = argparse.SUPPRESS if subcommand else 0
    quiet_default = argparse.SUPPRESS if subcommand else False
    parser.add_argument(
        "-v", "--verbose", action="count", default=verbose_default,
        help="more log output (-vv for debug and tracebacks)",
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
