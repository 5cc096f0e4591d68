"""`dsca-store`: pack CLAM outputs into a validated Zarr feature store, and look after it.

A registry of subcommand modules (dsca.cli.store_*), each exposing the five members that
dsca.cli._common describes; `build_parser` and `run_main` there assemble and run them, the
same way as for `dsca` (dsca.cli.dsca_main).
"""
from __future__ import annotations

import argparse
import sys
import warnings

from dsca.cli import _common

# subcommand name -> its module, in the order of `dsca-store --help`
SUBCOMMANDS = {
    "align": "dsca.cli.store_align",
    "convert": "dsca.cli.store_convert",
    "finalize": "dsca.cli.store_finalize",
    "info": "dsca.cli.store_info",
    "verify": "dsca.cli.store_verify",
    "synth": "dsca.cli.store_synth",
}

_EPILOG = ("typical run: synth or CLAM -> align -> (CLAM feature extraction) -> convert -> verify -> info; "
           "on a cluster: N jobs of convert --shard I/N, then finalize; "
           "'dsca-store COMMAND --help' shows each step with an example")


def build_parser() -> argparse.ArgumentParser:
    return _common.build_parser("dsca-store", __doc__.splitlines()[0], _EPILOG, SUBCOMMANDS,
                                verbosity_after_options=True)


def main(argv: list[str] | None = None) -> int:
    # zarr warns on every consolidated-metadata use; the store relies on it knowingly
    warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
    # a Ctrl-C outside convert's own handling (which says how to resume) still exits 130
    return _common.run_main(build_parser(), argv, catch_interrupt=True)


if __name__ == "__main__":
    sys.exit(main())
