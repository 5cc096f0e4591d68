"""What every command that runs under torchrun shares: one-line errors, rank-tagged console
lines and failure reports that reach the other ranks (``dsca train``, ``dsca predict``)."""
from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported only once a command runs
    from dsca.train.distributed import Distributed

__all__ = ["one_line", "rank_logging", "report_failure"]


def one_line(err: BaseException) -> str:
    """The error's own message, on one line.

    A DataLoader worker's exception comes back re-raised as the same type, but its message is
    "Caught X in DataLoader worker process N. Original Traceback ...": the original message is
    the last line of that traceback, after "module.X: ".
    """
    msg = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    if msg.startswith("Caught ") and "Original Traceback" in msg:
        last = [line for line in msg.splitlines() if line.strip()][-1]
        prefix = f"{type(err).__module__}.{type(err).__qualname__}: "
        for head in (prefix, f"{type(err).__qualname__}: "):
            if last.startswith(head):
                last = last[len(head):]
                break
        msg = last
        if isinstance(err, KeyError) and len(msg) >= 2 and msg[0] == msg[-1] and msg[0] in "'\"":
            msg = msg[1:-1]  # a KeyError's str() is its repr
    return " ".join(msg.split())


def rank_logging(ranks: Distributed) -> None:
    """Console lines of a torchrun rank start with its rank; where every rank does the same
    work (data mode) the other ranks would repeat rank 0's progress, so they show only
    warnings and errors."""
    root = logging.getLogger()
    for handler in root.handlers:
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s [rank {ranks.rank}] %(levelname)s %(name)s: %(message)s"))
        if ranks.mode == "data" and not ranks.is_main:
            handler.setLevel(max(handler.level, logging.WARNING))


def report_failure(command: str, ranks: Distributed, err: BaseException, message: str) -> None:
    """Print ``dsca <command>: error: [rank r] <message>``; under torchrun also tell the other
    ranks (unless this rank only stopped because another one failed) and leave the error
    where torchrun's summary of the failed ranks shows it."""
    from dsca.train.distributed import PeerFailed

    prefix = f"[rank {ranks.rank}] " if ranks.active else ""
    print(f"dsca {command}: error: {prefix}{message}", file=sys.stderr)
    if ranks.active and not isinstance(err, PeerFailed):
        ranks.note_failure(message)
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(RuntimeError(f"rank {ranks.rank}: {message}"))
