"""Constants of the `dsca-store/1` layout and the codec presets it may be written with.

The block geometry (`SCALE`, `BLOCK`: 4x4 x20 patches per x5 patch) is the model's as much as
the store's and lives in :mod:`dsca.coords`.
"""
from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import zarr.codecs as zc

FORMAT = "dsca-store/1"
LEVELS = {"x5": 2, "x20": 1}
SLIDES = "slides"
ARRAYS = ("x5", "x20", "coords", "grid", "grid_index")
DTYPES = {"float16": np.float16, "float32": np.float32}
# Root attribute of a store that shards of a sharded convert (`convert --shard I/N`) are writing
# and `dsca-store finalize` has not finished yet: {"shards": N, "dtype", "codec", "extractor"}.
# Its presence tells readers that slides may still be missing.
SHARDED = "sharded_convert"

# Target size of one inner (decodable) chunk: big enough that per-chunk overhead is noise,
# small enough that region reads touch little extra data (docs/ARCHITECTURE.md, Store format).
CHUNK_BYTES = 2 << 20

# Chosen by measurement (README, codecs): float16 activations barely compress, so the default
# keeps bytes raw and only appends a checksum; the presets stay selectable for features that
# compress better (e.g. sparse post-ReLU vectors).
DEFAULT_CODEC = "none"


def codec_chain(name: str) -> list[Any]:
    """Bytes->bytes codecs of one inner chunk for preset `name` (crc32c always last)."""
    presets: dict[str, list[Any]] = {
        "none": [],
        "zstd1": [zc.ZstdCodec(level=1)],
        "zstd3": [zc.ZstdCodec(level=3)],
        "blosc-lz4": [zc.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")],
        "blosc-zstd": [zc.BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")],
    }
    if name not in presets:
        raise ValueError(f"unknown codec {name!r}; choose one of {', '.join(presets)}")
    return [*presets[name], zc.Crc32cCodec()]


CODECS = ("none", "zstd1", "zstd3", "blosc-lz4", "blosc-zstd")


def rows_per_chunk(row_bytes: int) -> int:
    """Rows of a 2-D/3-D array per inner chunk so that a chunk holds about CHUNK_BYTES."""
    return max(1, CHUNK_BYTES // max(1, row_bytes))


# A slide id names a folder `slides/<id>/`; anything that could escape it, hide in it or be
# mistaken for zarr's own files is refused (zarr's temp files end in `.partial`, its metadata
# files are `zarr.json` and the v2 dot-files).
_RESERVED = {"zarr.json", ".zattrs", ".zgroup", ".zarray", ".zmetadata", SLIDES}
_MAX_ID_BYTES = 200  # folder names stay well under the 255-byte limit of common file systems
# zarr's atomic writes: `<name>.<32 hex>.partial`; our own: `.<name>.<12 hex>.tmp`
TEMP_FILE = re.compile(r"(.+\.[0-9a-f]{32}\.partial|\..+\.[0-9a-f]{12}\.tmp)")


def slide_id_problem(slide_id: str) -> str | None:
    """Why `slide_id` cannot name a slide in a store, or None when it can.

    Refused: empty ids, ``.``/``..`` and other leading dots (hidden or relative folders), path
    separators, control characters, surrounding white space, undecodable bytes, names of store
    internals (``zarr.json``, ``*.partial``, ``*.tmp``) and ids too long for a folder name.
    """
    if not slide_id:
        return "empty slide id"
    if slide_id in (".", ".."):
        return f"slide id {slide_id!r} is a relative folder name"
    if slide_id.startswith("."):
        return f"slide id {slide_id!r} starts with '.' (a hidden folder)"
    if "/" in slide_id or "\\" in slide_id:
        return f"slide id {slide_id!r} contains a path separator"
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Cs") for ch in slide_id):
        return f"slide id {slide_id!r} contains control or undecodable characters"
    if slide_id != slide_id.strip():
        return f"slide id {slide_id!r} has leading or trailing white space"
    if slide_id.lower() in _RESERVED or slide_id.endswith((".partial", ".tmp")):
        return f"slide id {slide_id!r} collides with a name the store uses internally"
    if len(slide_id.encode("utf-8")) > _MAX_ID_BYTES:
        return f"slide id is longer than {_MAX_ID_BYTES} bytes"
    return None


def slide_folder(store: str | Path, slide_id: str) -> Path:
    """`store/slides/<slide_id>`, for a valid id only (ValueError otherwise).

    Every path that convert deletes or writes goes through here, so an id that slipped past
    validation can never reach outside its own folder.
    """
    problem = slide_id_problem(slide_id)
    if problem is not None:
        raise ValueError(problem)
    folder = Path(store) / SLIDES / slide_id
    if folder.parent.name != SLIDES or folder.name != slide_id:
        raise ValueError(f"slide id {slide_id!r} does not name one folder")
    return folder


def complete_attrs(slide_folder: Path) -> dict[str, Any] | None:
    """A slide group's attrs if its zarr.json marks it complete, else None (also if unreadable)."""
    try:
        attrs = json.loads((Path(slide_folder) / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return None
    return attrs if isinstance(attrs, dict) and attrs.get("complete") is True else None


def complete_slides(store: Path) -> dict[str, dict[str, Any]]:
    """slide id -> attrs of every slide group on disk that is marked complete.

    Read straight from each group's zarr.json, so that a store left behind by a killed convert
    (no consolidated metadata, maybe a half-written group) still lists exactly its complete
    slides; an unreadable group is simply not complete.
    """
    folder = Path(store) / SLIDES
    if not folder.is_dir():
        return {}
    found = ((child.name, complete_attrs(child)) for child in sorted(folder.iterdir())
             if slide_id_problem(child.name) is None)
    return {sid: attrs for sid, attrs in found if attrs is not None}
