"""Option values that several `dsca-store` subcommands parse the same way."""
from __future__ import annotations

import json
import sys
from typing import Any


def parse_level_attrs_option(text: str | None, option: str) -> dict | None:
    """The level attrs given as `option` K=V,... (None when not given); a malformed value is a
    usage error: one line naming the option, exit status 2, as argparse's own errors."""
    from dsca.store.clam import ClamError, parse_level_attrs

    try:
        return parse_level_attrs(text)
    except ClamError as exc:
        print(f"dsca-store: error: {option}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


# fsspec/s3fs options whose values are secrets or names: never parsed as JSON
_STRING_KEYS = frozenset({"key", "secret", "token", "password", "username", "profile"})


def add_storage_arguments(parser: Any, staging: bool = False) -> None:
    """--storage-option (and, for commands that write, --staging) for stores at a URL."""
    parser.add_argument("--storage-option", metavar="KEY=VALUE", action="append",
                        help="fsspec option for a store at a URL (s3://...), repeatable; a dotted KEY nests "
                             "(client_kwargs.region_name=eu-west-1), a JSON VALUE is parsed (anon=true) "
                             "(default: credentials and endpoint from AWS_* environment variables)")
    if staging:
        parser.add_argument("--staging", metavar="DIR",
                            help="for a store at a URL: local folder to stage slides in before they are uploaded "
                                 "(default: the system's temp folder)")


def parse_storage_options(items: list[str] | None) -> dict[str, Any] | None:
    """--storage-option KEY=VALUE items as fsspec storage options (None when none are given);
    a malformed item is a usage error (exit status 2), as argparse's own errors."""
    if not items:
        return None
    options: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            print(f"dsca-store: error: --storage-option: expected KEY=VALUE, got {item!r}", file=sys.stderr)
            raise SystemExit(2)
        *parents, leaf = key.strip().split(".")
        try:
            # a credential stays a str even when it reads as a number or true
            value: Any = text if leaf in _STRING_KEYS else json.loads(text)
        except ValueError:
            value = text  # a plain string (a URL, a region)
        node = options
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                print(f"dsca-store: error: --storage-option: {key!r} nests under {part!r}, which has a value",
                      file=sys.stderr)
                raise SystemExit(2)
            node = child
        node[leaf] = value
    return options
