"""`dsca COMMAND --help` and `dsca-store COMMAND --help`: a description, every option explained
with its default, examples."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from dsca.cli import dsca_main, store_main


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


FRONT_ENDS = {"dsca": dsca_main, "dsca-store": store_main}
COMMANDS = [(prog, name) for prog, module in FRONT_ENDS.items() for name in sorted(_subparsers(module.build_parser()))]


def _help(prog: str, name: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("COLUMNS", "100")
    text = _subparsers(FRONT_ENDS[prog].build_parser())[name].format_help()
    return " ".join(text.split())  # argparse wraps lines; compare words


def _shown_default(action: argparse.Action) -> str | None:
    """The default an option's help must show, or None when it has no real one (flags,
    optional values whose absence the help explains in words, the verbosity options)."""
    if action.default in (None, argparse.SUPPRESS) or isinstance(action, (argparse._StoreTrueAction,
                                                                         argparse._HelpAction)):
        return None
    return str(action.default)


def test_every_command_is_listed(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    text = dsca_main.build_parser().format_help()
    assert "examples:" in text
    for prog, name in COMMANDS:
        if prog == "dsca":
            assert name in text


@pytest.mark.parametrize("prog, name", COMMANDS)
def test_help_has_description_defaults_and_examples(prog, name, monkeypatch):
    parser = _subparsers(FRONT_ENDS[prog].build_parser())[name]
    text = _help(prog, name, monkeypatch)
    # a description of its own (what it reads and writes), not just the one-line summary
    assert parser.description and len(parser.description.split()) >= 20
    assert "examples:" in text and f"{prog} {name}" in text.split("examples:")[1]
    for action in parser._actions:
        if not action.option_strings:
            continue
        assert action.help and action.help.strip(), f"{name} {action.option_strings[0]} has no help"
        default = _shown_default(action)
        if default is not None:
            assert f"(default: {default})" in text, f"{name} {action.option_strings[0]}: default {default} not shown"
        elif action.default is None and not action.required and action.nargs != 0:
            # an optional value without a default says what happens without it
            assert "default" in action.help, f"{name} {action.option_strings[0]}: says nothing about its absence"


@pytest.mark.parametrize("prog, name", COMMANDS)
def test_help_through_the_real_entry_point(prog, name):
    out = subprocess.run([sys.executable, "-m", FRONT_ENDS[prog].__name__, name, "--help"],
                         check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    parser = _subparsers(FRONT_ENDS[prog].build_parser())[name]
    assert "examples:" in out.stdout
    if any(_shown_default(a) is not None for a in parser._actions if a.option_strings):
        assert "(default:" in out.stdout


@pytest.mark.parametrize("prog", sorted(FRONT_ENDS))
def test_every_subcommand_module_has_the_five_members(prog):
    """Both front ends are registries of modules with the same interface (dsca.cli._common)."""
    import importlib

    for name, module_name in FRONT_ENDS[prog].SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        for member in ("HELP", "DESCRIPTION", "EXAMPLES"):
            assert isinstance(getattr(module, member), str), f"{prog} {name}: {member}"
        assert callable(module.add_arguments) and callable(module.run), f"{prog} {name}"
