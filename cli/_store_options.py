"""Option values that several `dsca-store` subcommands parse the same way."""
from __future__ import annotations

import sys


def parse_level_attrs_option(text: str | None, option: str) -> dict | None:
    """The level attrs given as `option` K=V,... (None when not given); a malformed value is a
    usage error: one line naming the option, exit status 2, as argparse's own errors."""
    from dsca.store.clam import ClamError, parse_level_attrs

    try:
        return parse_level_attrs(text)
    except ClamError as exc:
        print(f"dsca-store: error: {option}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
