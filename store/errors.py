"""The three errors of `dsca.store`, each a one-line message meant for the user.

* :class:`ClamError` - one input file cannot be used (raised by the CLAM and TRIDENT readers);
  convert fails that slide only.
* :class:`ConvertError` - a convert run as a whole cannot go on (bad folders, an incompatible
  store, a failed write).
* :class:`StoreError` - a store, or a slide in it, cannot be read.

They live in one module so that the readers, the writer and the read API can raise them
without importing each other; each is also importable from the module that documents it
(`dsca.store.clam`, `dsca.store.convert`, `dsca.store.reader`).
"""
from __future__ import annotations

__all__ = ["ClamError", "ConvertError", "StoreError"]


class ClamError(Exception):
    """An input file that cannot be used; the message is the one-line reason."""


class ConvertError(Exception):
    """The run as a whole cannot go on (bad directories, incompatible store, a failed write)."""


class StoreError(Exception):
    """The store (or a slide in it) cannot be read; the message names it and why."""
