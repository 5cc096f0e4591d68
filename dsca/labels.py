"""Survival labels: slide-level CSV -> one row per patient with discrete time bins.

The canonical CSV format is the reference study's: one row per slide with ``pathology_id``
(slide id), ``patient_id``, ``t`` (follow-up time) and ``e`` (1 = event observed, 0 =
censored); extra columns are kept. Tables with other column names (CLAM/PORPOISE use
``slide_id, case_id, survival_months, censorship``) are read through a :class:`LabelColumns`
mapping, parsed once by :func:`parse_labels_map` (``--labels-map`` / the ``labels_map`` config
key). A missing column is an error that suggests the mapping; no mapping is ever applied
silently, because ``censorship`` is ``1 - event`` and renaming it to ``e`` would invert every
event.

Layers:

* :func:`read_label_table` - the validated slide-level table under canonical column names
  (used by training and by the store converter);
* :func:`check_header` / :func:`missing_id` - the header and id checks it makes, for readers
  of label CSVs that do not go through it;
* :func:`load_labels` - the patient-level labels with time bins (training);
* :func:`slide_key` / :func:`match_slide_ids` - label slide ids vs feature/store slide ids,
  which may differ by a WSI file extension (``X.svs`` in the CSV, ``X.h5`` on disk).

A patient's ``t`` and ``e`` are taken from its first slide row, as in the reference; rows of
one patient that disagree are reported in the log.

Discretization (reference semantics): ``bins`` intervals cut at the quantiles of the uncensored
patients' times; the outer edges are moved to ``min(t) - 1e-5`` and ``max(t) + 1e-5`` over all
patients so that every patient falls in a bin; intervals are left-closed ``[a_k, a_{k+1})``.
"""
from __future__ import annotations

import csv
import difflib
import logging
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "LabelError",
    "LabelColumns",
    "SlideMatch",
    "parse_labels_map",
    "read_label_table",
    "check_header",
    "missing_id",
    "MISSING_ID_TOKENS",
    "load_labels",
    "check_label_columns",
    "slide_key",
    "match_slide_ids",
    "bin_edges",
    "assign_bins",
    "rebin",
    "patient_slides",
    "LABEL_COLUMNS",
    "REQUIRED_COLUMNS",
    "WSI_EXTENSIONS",
]

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("pathology_id", "patient_id", "t", "e")
#: Per-patient label columns in the order training and the dataset hold them: time, event,
#: discrete time bin, censoring indicator (1 - event).
LABEL_COLUMNS = ("t", "e", "y_t", "y_c")
_EDGE_PAD = 1e-5

#: File extensions of whole-slide images that :func:`slide_key` strips (compared lower-case).
WSI_EXTENSIONS = (
    ".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".czi", ".dcm",
    ".isyntax", ".qptiff", ".svslide", ".kfb", ".sdpc", ".jpg", ".jpeg", ".png",
)

# Role -> canonical column of the output table (``censorship`` also lands in ``e``).
_CANONICAL = {"slide": "pathology_id", "patient": "patient_id", "time": "t", "event": "e"}
# The columns of CLAM / PORPOISE survival tables, used only to *suggest* a mapping.
_CLAM_COLUMNS = {"slide": "slide_id", "patient": "case_id", "time": "survival_months",
                 "censorship": "censorship"}


class LabelError(ValueError):
    """A label CSV, split file or store does not fit the survival labels (message names it)."""


#: Spellings of a missing value (compared stripped and lower-case) that are never taken as a
#: patient or slide id: pandas' default NA strings (R's ``write.csv`` writes ``NA``, Excel
#: ``#N/A``), plus ``-``, ``--``, ``.`` (SAS/Stata) and ``?``. Digit-only ids such as
#: ``"0012"`` are unaffected.
MISSING_ID_TOKENS = frozenset({
    "na", "n/a", "#n/a", "#n/a n/a", "#na", "<na>", "nan", "-nan", "nat", "none", "null",
    "1.#ind", "-1.#ind", "1.#qnan", "-1.#qnan", "-", "--", ".", "?",
})


def missing_id(text: object) -> bool:
    """Whether an id cell is empty or a missing-value marker rather than an id.

    Args:
        text: the cell as read (text; ``None`` and float NaN count as missing too).

    Returns:
        True for ``""``/whitespace and for :data:`MISSING_ID_TOKENS` in any case and with
        surrounding whitespace (``"NA"``, ``" nan "``, ``"NULL"``, ``"#N/A"``, ``"-"``);
        False for anything else, e.g. ``"0012"`` or ``"NA-0012"``.

    Example:
        >>> [missing_id(x) for x in ("NA", "N/A", " null ", "-", "", "0012", "NAB2", "na_01")]
        [True, True, True, True, True, False, False, False]
    """
    if text is None:
        return True
    if isinstance(text, float) and text != text:  # NaN
        return True
    token = str(text).strip().lower()
    return not token or token in MISSING_ID_TOKENS


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


@dataclass(frozen=True)
class LabelColumns:
    """Which CSV column holds each label field (``role -> column name``).

    Attributes:
        slide: slide id column (output ``pathology_id``).
        patient: patient id column (output ``patient_id``); may equal ``slide`` for cohorts
            with one slide per patient and no separate patient id.
        time: follow-up time column (output ``t``).
        event: event indicator column, 1 = event observed, 0 = censored (output ``e``).
        censorship: censorship indicator column, 1 = censored, 0 = event observed: the
            CLAM/PORPOISE convention. The output is ``e = 1 - censorship``.

    Exactly one of ``event`` and ``censorship`` is set. Build it from text with
    :func:`parse_labels_map`; ``str(cols)`` gives that text back.

    Example:
        >>> LabelColumns(slide="slide_id", censorship="censorship", event=None).to_text()
        'slide=slide_id,censorship=censorship'
    """

    slide: str = "pathology_id"
    patient: str = "patient_id"
    time: str = "t"
    event: str | None = "e"
    censorship: str | None = None

    def __post_init__(self) -> None:
        if (self.event is None) == (self.censorship is None):
            raise LabelError(
                "labels map: give exactly one of event (1 = event) and censorship "
                f"(1 = censored), got event={self.event!r}, censorship={self.censorship!r}"
            )
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise LabelError(f"labels map: {f.name} must be a non-empty column name, got {value!r}")
        used = [(r, c) for r, c in self.roles().items() if r != "patient" or c != self.slide]
        names = [c for _, c in used]
        for role, col in used:
            if names.count(col) > 1:
                others = [r for r, c in used if c == col and r != role]
                raise LabelError(
                    f"labels map: column {col!r} is given for both {role} and {others[0]}"
                )

    @property
    def indicator(self) -> str:
        """Column holding the event (or censorship) indicator."""
        return self.event if self.event is not None else str(self.censorship)

    def roles(self) -> dict[str, str]:
        """``{role: column}`` of the set roles, in the order slide, patient, time, event/censorship."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def to_text(self, changed_only: bool = True) -> str:
        """The ``key=column,...`` text that :func:`parse_labels_map` reads back.

        Args:
            changed_only: leave out keys equal to their default (the shortest equivalent
                text; ``censorship=`` alone implies no ``event``). ``""`` for the defaults.
        """
        default = LabelColumns()
        return ",".join(
            f"{role}={col}" for role, col in self.roles().items()
            if not changed_only or getattr(default, role) != col
        )

    def __str__(self) -> str:
        return self.to_text(changed_only=False)


def parse_labels_map(text: str | Mapping[str, str] | LabelColumns | None) -> LabelColumns:
    """Parse a label column mapping once, from the CLI text or a config mapping.

    Args:
        text: ``"slide=slide_id,patient=case_id,time=survival_months,censorship=censorship"``,
            the same as a mapping (``{"slide": "slide_id", ...}``, e.g. from YAML), an existing
            :class:`LabelColumns` (returned as is), or ``None``/``""`` for the defaults. Keys:
            ``slide, patient, time, event, censorship`` (case-insensitive); unspecified keys
            keep their defaults (``pathology_id, patient_id, t, e``); giving ``censorship``
            clears the default ``event`` (``e = 1 - censorship``).

    Returns:
        The :class:`LabelColumns`.

    Raises:
        LabelError: unknown key (naming the closest), a key given twice, both event and
            censorship, an empty column name, a pair without ``=``, or one column for two roles.

    Example:
        >>> cols = parse_labels_map("slide=slide_id,patient=case_id,time=survival_months,"
        ...                         "censorship=censorship")
        >>> cols.event is None and cols.censorship == "censorship"
        True
        >>> parse_labels_map({"time": "os_days"}).time
        'os_days'
    """
    if isinstance(text, LabelColumns):
        return text
    if text is None:
        return LabelColumns()
    pairs: list[tuple[str, object, str]] = []  # (key, column, where: for messages)
    if isinstance(text, str):
        if not text.strip():
            return LabelColumns()
        for item in text.split(","):
            key, sep, col = item.partition("=")
            if not sep:
                raise LabelError(
                    f"labels map: {item.strip()!r} in {text!r} is not key=column "
                    "(e.g. slide=slide_id,patient=case_id)"
                )
            pairs.append((key.strip(), col.strip(), repr(item.strip())))
    elif isinstance(text, Mapping):
        pairs = [(str(k).strip(), v, f"{k!r}: {v!r}") for k, v in text.items()]
    else:
        raise LabelError(
            f"labels map: expected key=column text or a mapping, got {type(text).__name__}"
        )

    keys = [f.name for f in fields(LabelColumns)]
    given: dict[str, str | None] = {}
    for key, col, where in pairs:
        role = key.lower()
        if role not in keys:
            raise LabelError(f"labels map: unknown key {key!r} in {where}{_key_hint(key, col, keys)}")
        if role in given:
            raise LabelError(f"labels map: key {role!r} is given twice")
        if col is None and role in ("event", "censorship"):
            given[role] = None  # YAML "event: null" next to a censorship column: explicit unset
            continue
        if not isinstance(col, str) or not col.strip():
            raise LabelError(f"labels map: empty or non-text column name for {role!r} in {where}")
        given[role] = col.strip()
    if given.get("event") is not None and given.get("censorship") is not None:
        raise LabelError(
            "labels map: give either event (1 = event) or censorship (1 = censored = 1 - event), "
            f"not both (event={given['event']}, censorship={given['censorship']})"
        )
    if given.get("censorship") is not None:
        given["event"] = None  # censorship replaces the default e
    return LabelColumns(**given)  # type: ignore[arg-type]


def _key_hint(key: str, col: object, keys: list[str]) -> str:
    # "slide_id=slide" is the mapping written backwards (column=role).
    if isinstance(col, str) and col.strip().lower() in keys:
        return f"; write key=column, e.g. {col.strip().lower()}={key}"
    close = difflib.get_close_matches(key.lower(), keys, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}? (keys: {', '.join(keys)})" if close else f" (keys: {', '.join(keys)})"


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
    for ids, role in ((slide, "slide"), (patient, "patient")):
        empty = ids.index[ids == ""]
        if len(empty):
            raise LabelError(
                f"{path}, line {empty[0]}: empty {role} id (column {getattr(cols, role)!r})"
                f"{_more(len(empty))}"
            )
        na = ids.index[ids.map(missing_id)]
        if len(na):
            i = na[0]
            what = (f"slide id {slide[i]!r}" if role == "slide"
                    else f"slide {slide[i]!r} has patient id {patient[i]!r}")
            raise LabelError(
                f"{path}, line {i}: {what} (column {getattr(cols, role)!r}), a missing-value "
                f"marker, not an id (R's write.csv writes NA for a missing value); "
                f"fill in the {role} id or drop the row{_more(len(na))}"
            )
    dup = slide[slide.duplicated(keep=False)]
    if len(dup):
        first = dup.iloc[0]
        lines = dup.index[dup == first].tolist()
        raise LabelError(
            f"{path}: slide {first!r} is listed more than once (lines {', '.join(map(str, lines))})"
        )

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


def check_label_columns(header: list[str], cols: LabelColumns, path: Path) -> None:
    """LabelError naming what is missing (with a mapping to pass) unless `header` has every
    column of `cols` and none that the mapping would overwrite."""
    present = set(header)
    missing = {role: col for role, col in cols.roles().items() if col not in present}
    if missing:
        raise LabelError(_missing_message(header, cols, missing, path))
    # A CSV column with a canonical name that the mapping does not use would be overwritten.
    sources = set(cols.roles().values())
    for role, col in cols.roles().items():
        target = _CANONICAL.get(role, "e")
        if target != col and target in present and target not in sources:
            raise LabelError(
                f"{path}: the labels map reads {role} from {col!r}, but the CSV also has a "
                f"{target!r} column, which would be overwritten; drop or rename one of them"
            )


def _missing_message(header: list[str], cols: LabelColumns, missing: dict[str, str], path: Path) -> str:
    msg = f"{path}: missing column(s) {', '.join(missing.values())}"
    msg += f" (need {', '.join(cols.roles().values())}; the CSV has {', '.join(header[:12])}"
    msg += ", ...)" if len(header) > 12 else ")"
    present = set(header)
    # Suggest the CLAM/PORPOISE mapping for the fields it would find; never apply it here.
    kw: dict[str, str | None] = {f.name: getattr(cols, f.name) for f in fields(cols)}
    for role, col in _CLAM_COLUMNS.items():
        needed = role in missing or (role == "censorship" and "event" in missing)
        if needed and col in present:
            kw[role] = col
            if role == "censorship":
                kw["event"] = None  # censorship replaces the event column, inverted
    try:
        suggested: LabelColumns | None = LabelColumns(**kw)  # type: ignore[arg-type]
    except LabelError:
        suggested = None
    if suggested is not None and suggested != cols:
        msg += f"; this looks like a CLAM/PORPOISE table: pass --labels-map {suggested.to_text()}"
        if suggested.censorship is not None:
            msg += " (censorship = 1 - event)"
        msg += f", or in a training config labels_map: {suggested.to_text()}"
        still = [c for r, c in suggested.roles().items() if c not in present]
        if still:
            msg += f"; still missing then: {', '.join(still)}"
        return msg
    hints = []
    for col in missing.values():
        close = difflib.get_close_matches(col, header, n=1, cutoff=0.6)
        close = close or [h for h in header if h.lower() == col.lower()]
        if close:
            hints.append(f"{col!r} -> {close[0]!r}?")
    if hints:
        msg += f"; similar columns: {', '.join(hints)}"
    msg += ("; map the CSV's columns with --labels-map slide=COL,patient=COL,time=COL,event=COL "
            "(or censorship=COL for 1 = censored)")
    return msg


def _more(n: int) -> str:
    return f" ({n - 1} more row(s) like it)" if n > 1 else ""


def _parse_times(raw: pd.Series, slide: pd.Series, patient: pd.Series, col: str, path: Path) -> pd.Series:
    stripped = raw.str.strip()
    t = pd.to_numeric(stripped, errors="coerce").astype(float)
    bad = t.index[~np.isfinite(t.to_numpy()) | (t.to_numpy() < 0)]
    if len(bad):
        i = bad[0]
        raise LabelError(
            f"{path}, line {i}: slide {slide[i]!r} (patient {patient[i]!r}) has time "
            f"{col}={raw[i]!r}; times must be non-negative numbers{_more(len(bad))}"
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
            f"{raw[i]!r}; {rule}{_more(len(bad))}"
        )
    return value


def load_labels(csv_path: str | Path, bins: int = 4, columns: LabelColumns | None = None) -> pd.DataFrame:
    """Read a slide-level label CSV into patient-level survival labels.

    Args:
        csv_path: CSV with columns ``pathology_id, patient_id, t, e`` (extra columns allowed),
            or the columns that ``columns`` names.
        bins: number of discrete time bins.
        columns: column mapping (see :func:`read_label_table`); default the canonical names.

    Returns:
        DataFrame indexed by ``patient_id`` (first-appearance order of the CSV) with columns
        ``t`` (float), ``e`` (int, 1 = event), ``y_t`` (int bin in ``[0, bins)``), ``y_c``
        (int, 1 = censored), ``slide_ids`` (list of slide ids in CSV order) and the CSV's extra
        columns (values of the patient's first row). ``df.attrs["bin_edges"]`` holds the
        ``bins + 1`` edges and ``df.attrs["source"]`` the CSV path.

    Raises:
        LabelError: everything :func:`read_label_table` rejects, or too few distinct event
            times for ``bins`` bins.
    """
    path = Path(csv_path)
    raw = read_label_table(path, columns)

    grouped = raw.groupby("patient_id", sort=False)
    first = grouped.head(1).set_index("patient_id")
    n_conflict = int((grouped[["t", "e"]].nunique() > 1).any(axis=1).sum())
    if n_conflict:
        log.warning(
            "%s: %d patient(s) have slides with different t/e; using each patient's first row",
            path, n_conflict,
        )

    df = first.drop(columns=["pathology_id"]).copy()
    df["t"] = df["t"].astype(float)
    df["e"] = df["e"].astype(int)
    df["y_c"] = 1 - df["e"]
    df["slide_ids"] = grouped["pathology_id"].agg(list)
    edges = bin_edges(df["t"].to_numpy(), df["e"].to_numpy(), bins, source=str(path))
    df["y_t"] = assign_bins(df["t"].to_numpy(), edges)
    df.attrs = {"bin_edges": edges.tolist(), "source": str(path)}
    front = ["t", "e", "y_t", "y_c", "slide_ids"]
    return df[front + [c for c in df.columns if c not in front]]


def slide_key(slide_id: str) -> str:
    """The slide id without one known WSI file extension (case-insensitive).

    Only :data:`WSI_EXTENSIONS` are stripped: TCGA ids such as
    ``TCGA-A1-A0SE-01Z-00-DX1.04B09232-C6C4-46EF-AA2C-41D078D0A80A`` contain dots that are part
    of the id, so a generic "strip the suffix" would merge different slides.

    Example:
        >>> slide_key("TCGA-A1-A0SB-01Z-00-DX1.svs"), slide_key("s1.ome.TIFF"), slide_key("11445")
        ('TCGA-A1-A0SB-01Z-00-DX1', 's1.ome', '11445')
    """
    low = slide_id.lower()
    for ext in WSI_EXTENSIONS:
        if low.endswith(ext) and len(slide_id) > len(ext):
            return slide_id[: -len(ext)]
    return slide_id


@dataclass(frozen=True)
class SlideMatch:
    """Result of :func:`match_slide_ids`.

    Attributes:
        matched: ``{label id: store id}`` in label order.
        ambiguous: ``{label id: [store ids]}``: label ids not matched exactly whose key is
            shared by two or more store ids (e.g. ``A`` vs ``A.svs`` and ``A.tif``).
        clashes: ``{store id: [label ids]}``: store ids that two or more label ids denote (e.g.
            ``A.svs`` and ``A.tif`` both for ``A``). A label id equal to the store id stays
            matched; the others are not.
        unmatched: label ids with no store id at all.
    """

    matched: dict[str, str] = field(default_factory=dict)
    ambiguous: dict[str, list[str]] = field(default_factory=dict)
    clashes: dict[str, list[str]] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No ambiguous key and no clash (unmatched ids are the caller's business)."""
        return not self.ambiguous and not self.clashes

    def problems(self) -> list[str]:
        """One human-readable line per ambiguous label id and per clash."""
        out = [f"label slide {lab!r} could be any of store slides {', '.join(map(repr, ids))}; "
               "not matched" for lab, ids in self.ambiguous.items()]
        out += [f"label slides {', '.join(map(repr, ids))} all denote store slide {sid!r}; "
                "only an exact id is matched" for sid, ids in self.clashes.items()]
        return out


def match_slide_ids(label_ids: Iterable[str], store_ids: Iterable[str]) -> SlideMatch:
    """Map each label slide id to the store/feature slide id it denotes.

    An exact id match wins; otherwise both sides are compared by :func:`slide_key` (so
    ``X.svs`` in a CSV finds the feature file stem ``X``, and ``X`` finds a store id
    ``X.ndpi``). Nothing is guessed: a key shared by two store ids, or one store id claimed
    by two label ids, is reported instead of matched.

    Args:
        label_ids: slide ids of the label table (duplicates are ignored).
        store_ids: slide ids of the store or of the feature files (their stems).

    Returns:
        A :class:`SlideMatch`.

    Example:
        >>> m = match_slide_ids(["A.svs", "B", "C.svs"], ["A", "B", "C.tif", "C.ndpi"])
        >>> m.matched, m.ambiguous
        ({'A.svs': 'A', 'B': 'B'}, {'C.svs': ['C.ndpi', 'C.tif']})
    """
    labels = list(dict.fromkeys(label_ids))
    stores = list(dict.fromkeys(store_ids))
    store_set = set(stores)
    by_key: dict[str, list[str]] = {}
    for sid in stores:
        by_key.setdefault(slide_key(sid), []).append(sid)

    exact = {lab for lab in labels if lab in store_set}
    claims: dict[str, list[str]] = {}  # store id -> label ids that reach it by key
    ambiguous: dict[str, list[str]] = {}
    unmatched: list[str] = []
    for lab in labels:
        if lab in exact:
            continue
        cands = by_key.get(slide_key(lab), [])
        if not cands:
            unmatched.append(lab)
        elif len(cands) > 1:
            ambiguous[lab] = sorted(cands)
        else:
            claims.setdefault(cands[0], []).append(lab)
    clashes = {sid: ([sid] if sid in exact else []) + labs for sid, labs in claims.items()
               if sid in exact or len(labs) > 1}
    by_label = {labs[0]: sid for sid, labs in claims.items() if sid not in clashes}
    matched = {lab: lab if lab in exact else by_label[lab]
               for lab in labels if lab in exact or lab in by_label}
    return SlideMatch(matched=matched, ambiguous=ambiguous, clashes=clashes, unmatched=unmatched)


def bin_edges(
    t: np.ndarray,
    e: np.ndarray,
    bins: int,
    t_all: np.ndarray | None = None,
    source: str = "labels",
) -> np.ndarray:
    """Cut-points of the discrete time bins.

    Args:
        t: [P] times of the patients whose events define the cut-points.
        e: [P] event indicators (1 = event).
        bins: number of bins K.
        t_all: [Q] times whose range the outer edges must cover (default ``t``).
        source: name used in error messages.

    Returns:
        [K + 1] increasing edges: interior edges at the K-quantiles of the event times
        (linear interpolation, as ``pandas.qcut``), outer edges ``min - 1e-5``, ``max + 1e-5``.
    """
    t = np.asarray(t, dtype=float)
    events = t[np.asarray(e) == 1]
    if bins < 1:
        raise LabelError(f"{source}: bins must be >= 1, got {bins}")
    if len(events) == 0:
        raise LabelError(f"{source}: no uncensored patients to place the time bins")
    edges = np.quantile(events, np.linspace(0.0, 1.0, bins + 1))
    span = t if t_all is None else np.asarray(t_all, dtype=float)
    edges[0] = span.min() - _EDGE_PAD
    edges[-1] = span.max() + _EDGE_PAD
    if np.any(np.diff(edges) <= 0):
        raise LabelError(
            f"{source}: {len(np.unique(events))} distinct event time(s) cannot make {bins} "
            f"time bins (edges {np.round(edges, 4).tolist()} are not increasing)"
        )
    return edges


def assign_bins(t: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin index of each time for left-closed bins ``[edges[k], edges[k+1])``.

    Args:
        t: [P] times, inside ``[edges[0], edges[-1])``.
        edges: [K + 1] increasing edges.

    Returns:
        [P] int64 bins in ``[0, K)``.
    """
    t = np.asarray(t, dtype=float)
    k = np.searchsorted(np.asarray(edges), t, side="right") - 1
    return np.clip(k, 0, len(edges) - 2).astype(np.int64)


def rebin(labels: pd.DataFrame, cut_patients: Iterable[str]) -> pd.DataFrame:
    """Recompute ``y_t`` with cut-points from a subset of patients (e.g. a fold's training set).

    The reference places the cut-points on the whole cohort, which lets the test patients'
    times shape the training targets; this variant keeps them out. The outer edges still span
    every patient so that all of them get a bin.

    Args:
        labels: output of :func:`load_labels`.
        cut_patients: ids of the patients whose event times set the interior edges.

    Returns:
        A copy of ``labels`` with new ``y_t`` and ``attrs["bin_edges"]``.
    """
    ids = list(cut_patients)
    unknown = [p for p in ids if p not in labels.index]
    if unknown:
        raise LabelError(f"{labels.attrs.get('source', 'labels')}: unknown patient {unknown[0]!r}")
    bins = len(labels.attrs["bin_edges"]) - 1
    sub = labels.loc[ids]
    edges = bin_edges(
        sub["t"].to_numpy(), sub["e"].to_numpy(), bins, t_all=labels["t"].to_numpy(),
        source=labels.attrs.get("source", "labels"),
    )
    out = labels.copy()
    out["y_t"] = assign_bins(out["t"].to_numpy(), edges)
    out.attrs = {**labels.attrs, "bin_edges": edges.tolist()}
    return out


def patient_slides(
    labels: pd.DataFrame,
    patients: Sequence[str],
    available_slides: Collection[str],
    store_name: str = "store",
) -> dict[str, list[str]]:
    """Map patients to their slides that exist in a feature store.

    Label slide ids are matched to store ids by :func:`match_slide_ids` (exact, else ignoring
    a WSI file extension: ``X.svs`` in the CSV reads the store's ``X``). Slides of a patient
    that are missing from the store, or whose match is ambiguous, are dropped with a warning;
    a patient with none left is an error (training on it would be impossible).

    Args:
        labels: output of :func:`load_labels`.
        patients: patient ids to look up.
        available_slides: complete slide ids of the store.
        store_name: path of the store, for messages.

    Returns:
        ``{patient_id: [store slide ids in CSV order]}`` in the order of ``patients``.
    """
    for pid in patients:
        if pid not in labels.index:
            raise LabelError(f"{labels.attrs.get('source', 'labels')}: unknown patient {pid!r}")
    match = match_slide_ids((s for pid in patients for s in labels.at[pid, "slide_ids"]),
                            available_slides)
    for line in match.problems():
        log.warning("%s: %s", store_name, line)
    by_key = sum(lab != sid for lab, sid in match.matched.items())
    if by_key:
        log.info("%s: %d label slide id(s) matched to store ids without their file extension",
                 store_name, by_key)
    out: dict[str, list[str]] = {}
    without: list[str] = []
    dropped = 0
    for pid in patients:
        ids = labels.at[pid, "slide_ids"]
        slides = [match.matched[s] for s in ids if s in match.matched]
        dropped += len(ids) - len(slides)
        if not slides:
            without.append(pid)
        out[pid] = slides
    if without:
        more = f" (and {len(without) - 1} more)" if len(without) > 1 else ""
        raise LabelError(
            f"{store_name}: patient {without[0]!r}{more} has no slide in the store "
            f"(expected one of {labels.at[without[0], 'slide_ids'][:3]})"
        )
    if dropped:
        log.warning("%s: %d labelled slide(s) are not in the store and are skipped", store_name, dropped)
    return out
