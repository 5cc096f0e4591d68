"""Ctrl-C and SIGTERM during a convert: deferred while a slide is written, ignored by workers.

SLURM's `scancel`, a time limit and `timeout` send SIGTERM, a terminal's Ctrl-C sends SIGINT,
both to the whole process group; the CLI turns SIGTERM into a KeyboardInterrupt. Only the
parent process decides how a run stops (:mod:`dsca.store.parallel`).
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["STOP_SIGNALS", "ignore_stop_signals", "stop_signals_deferred", "stop_signals_ignored"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _in_main_thread() -> bool:
    # Python changes signal handlers from the main thread only
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _stop_handlers(handler: Any) -> Iterator[None]:
    """`handler` for both signals inside the block, the previous handlers restored after it."""
    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def stop_signals_deferred() -> Iterator[None]:
    """Let a slide's write finish before a Ctrl-C (or SIGTERM) takes effect.

    zarr writes on its own IO thread: a KeyboardInterrupt in this thread would not stop it, so
    removing the half-written slide here would race with writes still landing. Finishing the
    slide and stopping after it (KeyboardInterrupt on leaving the block) leaves it complete
    instead. A worker process, which ignores both signals, runs the block as it is.
    """
    if not _in_main_thread() or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield
        return
    interrupted: list[int] = []
    with _stop_handlers(lambda signum, frame: interrupted.append(signum)):
        yield
    if interrupted:
        raise KeyboardInterrupt


@contextlib.contextmanager
def stop_signals_ignored() -> Iterator[None]:
    """Ignore both signals in this process for the block: a process started inside it ignores
    them from its first instruction (an ignored signal survives exec, and Python keeps it
    ignored), so a Ctrl-C while it still imports torch prints no traceback."""
    if not _in_main_thread():
        yield
        return
    with _stop_handlers(signal.SIG_IGN):
        yield


def ignore_stop_signals() -> None:
    """Ignore both signals for the rest of this process's life (a worker's first step)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
