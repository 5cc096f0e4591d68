"""Reading input files once, checked: the pieces the CLAM and TRIDENT readers share.

Every reader raises :class:`ClamError` with a one-line, user-facing reason that names the file
by `label` (the caller's choice of `folder/file` or `run/folder/file`).
"""
from __future__ import annotations

import contextlib
import io
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from dsca.store.errors import ClamError
from dsca.store.provenance import SourceRecord, read_source

__all__ = ["ClamError", "ZIP_MAGIC", "check_h5_stored", "first_difference", "h5_dataset", "load_pt", "plain",
           "read_bytes", "read_h5", "short_reason"]

ZIP_MAGIC = b"PK\x03\x04"
Label = Callable[[Path], str]


def short_reason(exc: BaseException) -> str:
    """First sentence of an exception message: torch and h5py append paragraphs of advice."""
    lines = str(exc).strip().splitlines()
    text = (lines[0] if lines else type(exc).__name__).split(". ")[0].rstrip(".")
    return text if len(text) <= 120 else text[:117] + "..."


def first_difference(a: np.ndarray, b: np.ndarray, unit: str = "row") -> str:
    """Where two [N, 2] coordinate arrays first differ, for a one-line message."""
    if a.shape != b.shape:
        return f"{len(a)} vs {len(b)} {unit}s"
    row = int(np.argmax(np.any(a != b, axis=1)))
    return f"first at {unit} {row}: {a[row].tolist()} vs {b[row].tolist()}"


def plain(value: Any) -> Any:
    """An h5 attribute as a Python value: bytes decoded, numpy scalars and 1-element arrays
    unwrapped, other arrays as lists."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return value.item() if value.size == 1 and value.ndim == 0 else [plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return plain(value.item())
    return value


def read_bytes(path: Path, label: Label) -> tuple[bytes, SourceRecord]:
    """A file's bytes and its provenance record, in one read."""
    # a dangling link (cohort moved) or a folder named like a slide must be reported, not skipped
    if not path.is_file():
        kind = "broken symbolic link" if path.is_symlink() else "not a regular file"
        raise ClamError(f"{label(path)}: unreadable ({kind})")
    try:
        data, source = read_source(path)
    except OSError as exc:
        raise ClamError(f"{label(path)}: cannot read ({exc.strerror or exc})") from None
    if not data:
        raise ClamError(f"{label(path)}: empty file (0 bytes)")
    return data, source


def check_h5_stored(dset: Any, what: str) -> None:
    """Refuse a dataset whose declared size its file cannot hold.

    HDF5 reads unwritten chunks as fill values, so an 8 KB file may declare 10^8 rows: reading
    it would allocate gigabytes of zeros. An uncompressed dataset must store all its bytes; a
    compressed one may not shrink more than 1000x (real features compress < 2x).
    """
    declared = int(dset.size) * int(dset.dtype.itemsize)
    stored = int(dset.id.get_storage_size())
    limit = declared if dset.compression is None else declared / 1000
    if declared and stored < limit:
        raise ClamError(f"{what} declares shape {tuple(dset.shape)} ({declared / 1e6:.1f} MB) but the file stores "
                        f"{stored / 1e6:.3f} MB of it: truncated, or never written")


@contextlib.contextmanager
def read_h5(path: Path, label: Label) -> Iterator[tuple[h5py.File, SourceRecord]]:
    """An h5 file read once into memory and opened, with its provenance record.

    h5py raises many exception types for a damaged file; any of them, also from the caller's
    reads inside the block, becomes one ClamError naming the file.
    """
    data, source = read_bytes(path, label)
    try:
        with h5py.File(io.BytesIO(data), "r") as f:
            yield f, source
    except ClamError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise ClamError(f"{label(path)}: unreadable or truncated h5 ({short_reason(exc)})") from None


def h5_dataset(f: h5py.File, name: str, path: Path, label: Label, required: bool = True) -> h5py.Dataset | None:
    """Dataset `name` of `f`, checked to store what it declares; None when absent and not `required`."""
    dset = f.get(name)
    if not isinstance(dset, h5py.Dataset):
        if required:
            raise ClamError(f"{label(path)}: no '{name}' dataset")
        return None
    check_h5_stored(dset, f"{label(path)} {name}")
    return dset


def _numpy_safe_globals() -> list[Any]:
    """What unpickling a plain float ndarray needs (TRIDENT's `.pt` is ``torch.save(ndarray)``)."""
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    out: list[Any] = [np.ndarray, np.dtype, _reconstruct, (_reconstruct, "numpy.core.multiarray._reconstruct")]
    out += [type(np.dtype(t)) for t in (np.float16, np.float32, np.float64)]
    return out


def load_pt(path: Path, label: Label) -> tuple[np.ndarray, SourceRecord]:
    """A `.pt` holding a tensor or a float ndarray, zip (torch >= 1.6) or legacy format.

    Loaded with ``weights_only`` (no pickled code runs; besides tensors only float ndarrays
    are allowed). A zip `.pt` carries a CRC-32 per member that torch.load never checks:
    flipped bytes in the data would load as wrong values, so the CRCs are checked first.
    """
    data, source = read_bytes(path, label)
    if data[:4] == ZIP_MAGIC:
        try:
            bad = zipfile.ZipFile(io.BytesIO(data)).testzip()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise ClamError(f"{label(path)}: unreadable or truncated .pt ({short_reason(exc)})") from None
        if bad is not None:
            raise ClamError(f"{label(path)}: corrupt .pt (checksum mismatch in {bad.split('/', 1)[-1]})")
    try:
        # torch warns about old pickle protocols and nested tensors: the checks below decide
        with warnings.catch_warnings(), torch.serialization.safe_globals(_numpy_safe_globals()):
            warnings.simplefilter("ignore")
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ClamError(f"{label(path)}: unreadable or truncated .pt ({short_reason(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - pickle errors come in many types
        raise ClamError(f"{label(path)}: unreadable .pt ({type(exc).__name__}: {short_reason(exc)})") from None
    if isinstance(obj, torch.Tensor):
        if obj.layout != torch.strided or obj.device.type != "cpu" or obj.is_quantized:
            raise ClamError(f"{label(path)}: holds a {obj.layout}/{obj.device.type} tensor, expected a plain dense one")
        obj = obj.detach()  # saved straight from a model: an nn.Parameter or a tensor needing grad
        obj = (obj.float() if obj.dtype == torch.bfloat16 else obj).numpy()
    if not isinstance(obj, np.ndarray):
        raise ClamError(f"{label(path)}: holds a {type(obj).__name__}, expected a tensor or array [N, D]")
    return obj, source
