"""Write a file so that readers see the old version or the new one, never half of either."""
from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_path", "atomic_write"]


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp path beside `path` to write to; renamed over `path` on success, removed on error.

    For writers that want a file name (h5py, numpy, torch.save). The temp name is unique (two
    writers never share one) and hidden (``.<name>.<hex>.tmp``); a kill -9 can still strand
    one, which is harmless: nothing reads it. A full disk or a Ctrl-C leaves `path` as it was
    and no temp file behind.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        # on disk before the rename: after a crash the name holds the old or the new bytes
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """`open(path, mode)` through :func:`atomic_path`, flushed to disk before the rename."""
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
