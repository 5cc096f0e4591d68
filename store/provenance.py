"""Where a slide's data came from, and whether those files changed since it was converted.

Each source file of a slide is recorded with its absolute path, size, modification time and a
crc32c of its bytes. crc32c (the checksum zarr already uses) is several times cheaper than
sha256: it is computed on bytes that convert reads anyway, and it detects a
re-extraction or a damaged copy, which is what it is for (it is no defence against forgery).

A rerun trusts an unchanged size and mtime, as make and rsync do, and reads a file again only
when either differs; a file whose bytes are the same after a `touch` or a copy is unchanged.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c

__all__ = ["SourceRecord", "read_source", "file_crc32c", "refreshed_sources", "source_changes"]

_READ_BYTES = 8 << 20  # how much of a file one read takes while checksumming it


@dataclass(frozen=True)
class SourceRecord:
    """One source file as convert read it."""

    path: str  # absolute
    bytes: int
    mtime_ns: int
    crc32c: int

    @property
    def file(self) -> str:
        return os.path.basename(self.path)

    def to_attrs(self) -> dict[str, Any]:
        return {"file": self.file, "path": self.path, "bytes": self.bytes, "mtime_ns": self.mtime_ns,
                "crc32c": self.crc32c}


def read_source(path: str | Path) -> tuple[bytes, SourceRecord]:
    """A file's bytes (one read) and its record; size and mtime from the open descriptor."""
    path = Path(path)
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        data = f.read()
    return data, SourceRecord(str(path.absolute()), len(data), st.st_mtime_ns, google_crc32c.value(data))


def file_crc32c(path: str | Path) -> int:
    """crc32c of a whole file, read in blocks."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(_READ_BYTES):
            crc = google_crc32c.extend(crc, block)
    return crc


def source_changes(recorded: Mapping[str, Mapping[str, Any]], current: Mapping[str, str | Path | None]) -> list[str]:
    """What differs between a slide's recorded sources and the files it would be read from now.

    Args:
        recorded: the slide's ``sources`` attribute (role -> record, e.g. "x5_features").
        current: role -> the file that role would be read from in this run (None: no file).

    Returns:
        One phrase per difference ("x5_features pt_files/A.pt changed (crc32c ...)"), empty
        when the slide's sources are the ones it was converted from.
    """
    changes: list[str] = []
    for role in sorted(set(recorded) | {r for r, p in current.items() if p is not None}):
        rec, now = recorded.get(role), current.get(role)
        if now is None:
            changes.append(f"{role} {rec.get('file') if rec else '?'} is no longer among the sources")
            continue
        now = Path(now)
        shown = f"{now.parent.name}/{now.name}"
        if rec is None:
            changes.append(f"{role} {shown} is a new source")
            continue
        try:
            st = now.stat()
        except OSError as exc:
            changes.append(f"{role} {shown} cannot be read ({exc.strerror})")
            continue
        if st.st_size != rec.get("bytes"):
            changes.append(f"{role} {shown} changed size ({rec.get('bytes')} -> {st.st_size} bytes)")
            continue
        same_file = rec.get("path") == str(now.absolute()) and rec.get("mtime_ns") == st.st_mtime_ns
        # a moved cohort or a touched file is read again and compared by content; a record of
        # an older convert (name and size only) can only be compared by size
        if not same_file and "crc32c" in rec and file_crc32c(now) != rec["crc32c"]:
            changes.append(f"{role} {shown} changed since it was converted (different content)")
    return changes


def refreshed_sources(recorded: Mapping[str, Mapping[str, Any]],
                      current: Mapping[str, str | Path | None]) -> dict[str, dict[str, Any]] | None:
    """`recorded` with the current path and mtime of files whose content was found unchanged.

    Call after :func:`source_changes` found nothing: a moved or touched cohort is then read
    in full once, and its new paths and mtimes recorded, instead of on every run. None when
    every record already matches.
    """
    out = {role: dict(rec) for role, rec in recorded.items()}
    for role, now in current.items():
        if now is None or role not in out or "path" not in out[role]:
            continue
        now = Path(now)
        st = now.stat()
        path = str(now.absolute())
        if out[role]["path"] != path or out[role].get("mtime_ns") != st.st_mtime_ns:
            out[role].update(path=path, file=now.name, mtime_ns=st.st_mtime_ns)
    return out if out != recorded else None
