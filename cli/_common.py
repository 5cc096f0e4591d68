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
        if ("%(default)" in text or "default" in text or default is None or default is False
                or default is argparse.SUPPRESS or not action.option_strings
                or isinstance(action, argparse._HelpAction)):
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
        help="debug output, with the traceback of any unexpected error (-vv: of other libraries too)",
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", default=quiet_default,
        help="only warnings, errors and the summary; no progress bars",
    )


def setup_logging(args: argparse.Namespace) -> None:
    """Log to stderr: INFO by default, WARNING with -q; DEBUG for dsca with -v, for all with -vv."""
    verbose = getattr(args, "verbose", 0)
    level = logging.WARNING if getattr(args, "quiet", False) else logging.INFO
    logging.basicConfig(
        level=logging.DEBUG if verbose >= 2 else level, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if verbose == 1:
        logging.getLogger("dsca").setLevel(logging.DEBUG)
