"""The run's ``train.log``: the package's INFO log copied into a file for the run's duration."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

__all__ = ["log_to_file"]


@contextlib.contextmanager
def log_to_file(path: Path, append: bool) -> Iterator[None]:
    """Copy the package's INFO log into ``path`` without making the console chattier."""
    handler = logging.FileHandler(path, mode="a" if append else "w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    dsca_log = logging.getLogger("dsca")
    old_level = dsca_log.level
    console_level = dsca_log.getEffectiveLevel()
    raised = []
    if console_level > logging.INFO:
        # Records now pass the logger at INFO: keep the console handlers at their old level.
        for h in logging.getLogger().handlers:
            if h.level < console_level:
                raised.append((h, h.level))
                h.setLevel(console_level)
        dsca_log.setLevel(logging.INFO)
    dsca_log.addHandler(handler)
    try:
        yield
    finally:
        dsca_log.removeHandler(handler)
        handler.close()
        dsca_log.setLevel(old_level)
        for h, level in raised:
            h.setLevel(level)
