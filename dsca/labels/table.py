"""The slide-level label table: header checks, then every row validated and parsed under the
canonical column names (used by training through :mod:`dsca.labels.patients` and by the store
converter)."""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from dsca.labels.columns import REQUIRED_COLUMNS, LabelColumns, check_label_columns
from dsca.labels.errors import LabelError
from dsca.labels.ids import missing_id

__all__ = ["check_header", "read_label_table"]

log = logging.getLogger(__name__)


def check_header(path: str | Path) -> list[str]:
    """The header row of a CSV, read with :mod:`csv` before pandas can rename anything.

    pandas renames a repeated column (``patient_id`` -> ``patient_id.1``) and names an empty one
    ``Unnamed: k``, so a duplicate would be read silently as an extra column. This reads the
    first line itself (a UTF-8 byte-order mark is dropped) and refuses such headers.

    Args:
        path: the CSV file.

    Returns:
        The column names, stripped of surrounding whitespace, in file order. The first name may
        be ``""``: the row-name column that R's ``write.csv`` and pandas' ``to_csv`` write by
        default (pandas reads it as ``Unnamed: 0``).

    Raises:
        LabelError: missing or unreadable (non-UTF-8) file, an empty file or first line, a
            column name given twice (after stripping), or an empty name other than the first.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "l.csv")
        >>> _ = open(p, "w").write("pathology_id, patient_id ,t,e\\ns1,p1,5,1\\n")
        >>> check_header(p)
        ['pathology_id', 'patient_id', 't', 'e']
    """
    path = Path(path)
    if not path.is_file():
        raise LabelError(f"{path}: label file not found")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            row = next(csv.reader(f), None)
    except UnicodeDecodeError as err:
        raise LabelError(f"{path}: not a readable CSV (not UTF-8 text: {err})") from err
    except csv.Error as err:
        raise LabelError(f"{path}: not a readable CSV ({err})") from err
    except OSError as err:
        raise LabelError(f"{path}: cannot read the label file ({err})") from err
    if row is None:
        raise LabelError(f"{path}: empty file (no header row)")
    names = [c.strip() for c in row]
    if not any(names):
        raise LabelError(
            f"{path}: line 1 is empty; the first line must be the header "
            f"(e.g. {','.join(REQUIRED_COLUMNS)})"
        )
    for k, name in enumerate(names):
        if not name and k > 0:
            raise LabelError(
                f"{path}: column {k + 1} of the header has no name (a trailing comma?); "
                "name it or remove the column"
            )
    seen: dict[str, int] = {}
    for k, name in enumerate(names):
        if name in seen:
            raise LabelError(
                f"{path}: column {name!r} appears more than once in the header (columns "
                f"{seen[name] + 1} and {k + 1}); rename or remove one of them"
            )
        seen[name] = k
    return names


def read_label_table(csv_path: str | Path, columns: LabelColumns | None = None) -> pd.DataFrame:
    """Read and validate a slide-level label CSV under the canonical column names.

    Ids are read as written (``"0012"`` keeps its zero, ``"1e3"`` stays text) and stripped of
    surrounding whitespace. A missing-value marker (``NA``, ``nan``, ``NULL``, ``#N/A``, ``-``, ...;
    see :func:`missing_id`) is not an id: R's ``write.csv`` writes ``NA`` for a missing value, and
    taking it as an id would pool unrelated slides into one patient. Blank lines are skipped.
    The header is checked by :func:`check_header` (no repeated or empty column names).

    Args:
        csv_path: CSV with one row per slide.
        columns: where each field is (default: ``pathology_id, patient_id, t, e``).

    Returns:
        DataFrame with one row per slide, in file order, indexed by the CSV line number of the
        row (``line``; the header is line 1), with columns ``pathology_id`` (str), ``patient_id``
        (str), ``t`` (float64, >= 0), ``e`` (int64, 1 = event; ``1 - censorship`` when the
        mapping names a censorship column) followed by the CSV's other columns (pandas' usual
        types). The mapped source columns are renamed (the censorship column is replaced by
        ``e``). ``attrs["source"]`` is the CSV path.

    Raises:
        LabelError: missing file or column (with the ``--labels-map`` that would fit a
            CLAM/PORPOISE table), a header :func:`check_header` refuses, no rows, an empty or
            missing-value (``NA``) id, a slide listed twice, a time that is
            not a non-negative finite number, an indicator that is not 0/1 (each naming file,
            line, slide and value), or a CSV column that a mapped one would overwrite.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "clam.csv")
        >>> _ = open(p, "w").write("case_id,slide_id,survival_months,censorship\\n"
        ...                        "TCGA-A1-A0SB,TCGA-A1-A0SB-01Z-00-DX1.svs,12.5,1\\n")
        >>> from dsca.labels import parse_labels_map
        >>> cols = parse_labels_map("slide=slide_id,patient=case_id,time=survival_months,"
        ...                         "censorship=censorship")
        >>> read_label_table(p, cols)[["pathology_id", "t", "e"]].to_dict("records")
        [{'pathology_id': 'TCGA-A1-A0SB-01Z-00-DX1.svs', 't': 12.5, 'e': 0}]
    """
    cols = columns if columns is not None else LabelColumns()
    path = Path(csv_path)
    names = check_header(path)  # before pandas renames a repeated column to "name.1"
    try:
        # Everything as text first: ids must stay exactly as written (NLST ids are numbers),
        # "NA" must be seen as written to be refused, and error messages quote the values as
        # they are in the file.
        # Blank lines are kept here so that index + 2 is the file's line number (true unless a
        # quoted field spans lines, which label tables do not have).
        text = pd.read_csv(path, dtype=str, keep_default_na=False, skip_blank_lines=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise LabelError(f"{path}: not a readable CSV ({err})") from err
    header = [str(c).strip() for c in text.columns]
    if len(header) != len(names):  # the csv module and pandas read the header differently
        raise LabelError(
            f"{path}: not a readable CSV (its header has {len(names)} columns, but pandas reads "
            f"{len(header)}: {', '.join(header[:12])})"
        )
    text.columns = header
    check_label_columns(header, cols, path)
    n_lines = len(text)
    text.index = pd.RangeIndex(2, n_lines + 2, name="line")
    blank = (text.apply(lambda c: c.str.strip()) == "").all(axis=1)
    text = text[~blank]
    if text.empty:
        raise LabelError(f"{path}: no rows")

    slide = text[cols.slide].str.strip()
    patient = text[cols.patient].str.strip()
    _refuse_missing_or_repeated_ids(slide, patient, cols, path)

    t = _parse_times(text[cols.time], slide, patient, cols.time, path)
    ind = _parse_indicator(text[cols.indicator], slide, patient, cols, path)
    e = ind if cols.event is not None else 1 - ind

    out = pd.DataFrame({"pathology_id": slide, "patient_id": patient, "t": t, "e": e})
    extras = [c for c in header if c not in set(cols.roles().values())]
    if extras:
        # Extra columns get pandas' usual parsing (numbers, NaN), as before the mapping existed.
        typed = pd.read_csv(path, skip_blank_lines=False)
        if len(typed) == n_lines:
            typed.columns = header
            typed.index = pd.RangeIndex(2, n_lines + 2, name="line")
        else:  # the two parses disagree on rows (should not happen): keep the text as read
            typed = text
        for c in extras:
            out[c] = typed.loc[out.index, c]
    out.attrs["source"] = str(path)
    return out


def _refuse_missing_or_repeated_ids(slide: pd.Series, patient: pd.Series, cols: LabelColumns,
                                    path: Path) -> None:
    """LabelError naming the first empty or missing-value (``NA``) slide/patient id, or the
    first slide id listed twice; ``slide``/``patient`` are the stripped id cells by line."""
    for ids, role in ((slide, "slide"), (patient, "patient")):
        empty = ids.index[ids == ""]
        if len(empty):
            raise LabelError(
                f"{path}, line {empty[0]}: empty {role} id (column {getattr(cols, role)!r})"
                f"{_more_rows_note(len(empty))}"
            )
        na = ids.index[ids.map(missing_id)]
        if len(na):
            i = na[0]
            what = (f"slide id {slide[i]!r}" if role == "slide"
                    else f"slide {slide[i]!r} has patient id {patient[i]!r}")
            raise LabelError(
                f"{path}, line {i}: {what} (column {getattr(cols, role)!r}), a missing-value "
                f"marker, not an id (R's write.csv writes NA for a missing value); "
                f"fill in the {role} id or drop the row{_more_rows_note(len(na))}"
            )
    dup = slide[slide.duplicated(keep=False)]
    if len(dup):
        repeated = dup.iloc[0]
        lines = dup.index[dup == repeated].tolist()
        raise LabelError(
            f"{path}: slide {repeated!r} is listed more than once (lines {', '.join(map(str, lines))})"
        )


def _more_rows_note(n: int) -> str:
    """`` (k more row(s) like it)`` for a message that names only the first of n bad rows."""
    return f" ({n - 1} more row(s) like it)" if n > 1 else ""


def _parse_times(raw: pd.Series, slide: pd.Series, patient: pd.Series, col: str, path: Path) -> pd.Series:
    """[rows] float64 times from the text cells; LabelError naming the first that is not a
    non-negative finite number."""
    stripped = raw.str.strip()
    t = pd.to_numeric(stripped, errors="coerce").astype(float)
    bad = t.index[~np.isfinite(t.to_numpy()) | (t.to_numpy() < 0)]
    if len(bad):
        i = bad[0]
        raise LabelError(
            f"{path}, line {i}: slide {slide[i]!r} (patient {patient[i]!r}) has time "
            f"{col}={raw[i]!r}; times must be non-negative numbers{_more_rows_note(len(bad))}"
        )
    zero = t.index[t == 0]
    if len(zero):
        # Some TCGA tables record 0 months (death or loss to follow-up at diagnosis). Valid,
        # but often a data-entry artefact, so it is said once.
        log.warning(
            "%s: %d slide row(s) have time %s = 0 (first: line %d, slide %r); kept as valid times",
            path, len(zero), col, zero[0], slide[zero[0]],
        )
    return t


def _parse_indicator(raw: pd.Series, slide: pd.Series, patient: pd.Series, cols: LabelColumns,
                     path: Path) -> pd.Series:
    """[rows] int64 0/1 of the event (or censorship) column as written; LabelError naming the
    first cell that is neither."""
    low = raw.str.strip().str.lower()
    # "1", "1.0", "True" (pandas/Excel writes booleans so) are all 1; anything else is an error.
    num = pd.to_numeric(low.replace({"true": "1", "false": "0"}), errors="coerce")
    value = pd.Series(np.full(len(low), -1, dtype=np.int64), index=low.index)
    value.loc[num == 1] = 1
    value.loc[num == 0] = 0
    bad = value.index[value < 0]
    if len(bad):
        i = bad[0]
        if cols.event is not None:
            name, rule = f"event {cols.event}", f"{cols.event} must be 0 (censored) or 1 (event)"
        else:
            name = f"censorship {cols.censorship}"
            rule = f"{cols.censorship} must be 0 (event observed) or 1 (censored)"
        raise LabelError(
            f"{path}, line {i}: slide {slide[i]!r} (patient {patient[i]!r}) has {name}="
            f"{raw[i]!r}; {rule}{_more_rows_note(len(bad))}"
        )
    return value


