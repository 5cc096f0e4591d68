"""Progress of long loops: a tqdm bar on a terminal, periodic log lines everywhere else.

Cluster jobs (SLURM, nohup, CI) write stderr to a file: a bar there is either disabled (tqdm's
``disable=None``) or an unreadable stream of carriage returns, so a long convert would say
nothing until it ends. Off a terminal this logs one INFO line every ``every_s`` seconds or
``every_frac`` of the total, whichever comes first, and one at the end.
"""
from __future__ import annotations

import logging
import sys
import time
from types import TracebackType

from tqdm import tqdm

__all__ = ["Progress"]

log = logging.getLogger("dsca.progress")


class Progress:
    """A counter shown as a bar on a terminal and as periodic log lines otherwise.

    Args:
        total: number of steps (None when unknown).
        desc: what is counted, e.g. "convert".
        unit: unit of one step, e.g. "slide".
        enabled: False shows nothing (``-q``).
        every_s, every_frac: log cadence off a terminal.

    Use as a context manager, calling :meth:`update` once per finished step.
    """

    def __init__(self, total: int | None, desc: str, unit: str = "it", enabled: bool = True, *,
                 every_s: float = 30.0, every_frac: float = 0.1, leave: bool = True) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.every_s, self.every_frac = every_s, every_frac
        self.n = 0
        self._bar: tqdm | None = None
        self._log = False
        if enabled:
            if sys.stderr.isatty():
                self._bar = tqdm(total=total, desc=desc, unit=unit, leave=leave)
            else:
                self._log = True
        self._t0 = self._last_t = time.monotonic()
        self._last_n = 0

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._log:
            now = time.monotonic()
            step = max(1, int(self.total * self.every_frac)) if self.total else None
            if now - self._last_t >= self.every_s or (step is not None and self.n - self._last_n >= step):
                self._emit(now)

    def _emit(self, now: float) -> None:
        """Log one progress line (count, rate, time left) and restart the cadence from it."""
        elapsed = now - self._t0
        rate = self.n / elapsed if elapsed > 0 else 0.0
        if self.total:
            eta = (self.total - self.n) / rate if rate > 0 else float("nan")
            log.info("%s: %d/%d %ss (%.0f%%), %.1f %s/s, %.0f s elapsed, ~%.0f s left", self.desc, self.n,
                     self.total, self.unit, 100.0 * self.n / self.total, rate, self.unit, elapsed, eta)
        else:
            log.info("%s: %d %ss, %.1f %s/s, %.0f s elapsed", self.desc, self.n, self.unit, rate, self.unit, elapsed)
        self._last_t, self._last_n = now, self.n

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._log and self.n != self._last_n:
            self._emit(time.monotonic())
        self._log = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
