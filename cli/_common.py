"""What both front ends (`dsca` and `dsca-store`) share: how a front end is assembled from its
subcommand modules, how it runs one, the help layout, logging and printing failure lines.

A subcommand module exposes five members:

- ``HELP``: one line for the front end's command list;
- ``DESCRIPTION`` and ``EXAMPLES``: its --help (indented literals are fine, they are dedented);
- ``add_arguments(parser)``: its options;
- ``run(args) -> int``: the work; returns the exit status.

A front end lists its subcommands in a registry (name -> module), hands it to
`build_parser` and runs the result with `run_main`.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
import textwrap
from collections.abc import Iterable, Mapping

__all__ = ["HelpFormatter", "add_subcommand", "add_verbosity", "build_parser", "print_to_stderr",
           "run_main", "setup_logging"]


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


def build_parser(prog: str, description: str, epilog: str, subcommands: Mapping[str, str], *,
                 verbosity_after_options: bool = False) -> argparse.ArgumentParser:
    """The front end `prog` with one subcommand per entry of `subcommands` (name -> the dotted
    name of its module, see this module's docstring).

    `verbosity_after_options` lists a subcommand's -v/-q after its own options in its --help
    instead of before them: `dsca-store` has always shown them there, `dsca` before.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                     formatter_class=HelpFormatter)
    add_verbosity(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in subcommands.items():
        module = importlib.import_module(module_name)
        p = add_subcommand(sub, name, help=module.HELP, description=module.DESCRIPTION,
                           examples=module.EXAMPLES)
        if not verbosity_after_options:
            add_verbosity(p, subcommand=True)
        module.add_arguments(p)
        if verbosity_after_options:
            add_verbosity(p, subcommand=True)
        p.set_defaults(_run=module.run)
    return parser


def run_main(parser: argparse.ArgumentParser, argv: list[str] | None, *,
             catch_interrupt: bool = False) -> int:
    """Parse `argv`, set up logging, run the chosen subcommand and return its exit status.

    With `catch_interrupt`, a Ctrl-C that the subcommand does not handle itself ends with one
    line and exit status 130 instead of a traceback.
    """
    args = parser.parse_args(argv)
    setup_logging(args)
    if not catch_interrupt:
        return int(args._run(args) or 0)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:  # e.g. while the first command still imports torch
        print_to_stderr(["interrupted"])
        return 130


def print_to_stderr(lines: Iterable[str]) -> None:
    """Print each line to stderr: the failure lines a command reports besides its summary."""
    for line in lines:
        print(line, file=sys.stderr)


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
