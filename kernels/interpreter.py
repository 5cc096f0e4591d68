"""Whether Triton runs its kernels through the CPU interpreter (``TRITON_INTERPRET``)."""
from __future__ import annotations

import os

__all__ = ["interpreter_requested"]


def interpreter_requested() -> bool:
    """True when ``TRITON_INTERPRET`` is set to anything but empty or ``0``, as Triton reads it.

    ``triton.jit`` reads the variable when a kernel is decorated, so what counts for the
    kernels of a process is its value when ``dsca.kernels.triton_capool`` was first imported
    (``triton_capool.INTERPRETED``).
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
