"""Which CSV column holds each label field: the canonical names, the :class:`LabelColumns`
mapping parsed once by :func:`parse_labels_map`, and the check of a header against it.

No mapping is ever applied silently: ``censorship`` is ``1 - event``, so renaming a CLAM/PORPOISE
``censorship`` column to ``e`` would invert every event. A missing column is an error that
*suggests* the mapping instead.
"""
from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from dsca.labels.errors import LabelError

__all__ = ["REQUIRED_COLUMNS", "LabelColumns", "parse_labels_map", "check_label_columns"]

#: The canonical slide-level columns: slide id, patient id, follow-up time, event (1 = event).
REQUIRED_COLUMNS = ("pathology_id", "patient_id", "t", "e")

# Role -> canonical column of the output table (``censorship`` also lands in ``e``).
_OUTPUT_COLUMN_OF_ROLE = {"slide": "pathology_id", "patient": "patient_id", "time": "t", "event": "e"}
# The columns of CLAM / PORPOISE survival tables, used only to *suggest* a mapping.
_CLAM_COLUMN_OF_ROLE = {"slide": "slide_id", "patient": "case_id", "time": "survival_months",
                 "censorship": "censorship"}


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
    pairs: list[tuple[str, object, str]] = []  # (key, column, the pair as quoted in messages)
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
    for key, col, quoted in pairs:
        role = key.lower()
        if role not in keys:
            hint = _mapping_key_hint(key, col, keys)
            raise LabelError(f"labels map: unknown key {key!r} in {quoted}{hint}")
        if role in given:
            raise LabelError(f"labels map: key {role!r} is given twice")
        if col is None and role in ("event", "censorship"):
            given[role] = None  # YAML "event: null" next to a censorship column: explicit unset
            continue
        if not isinstance(col, str) or not col.strip():
            raise LabelError(f"labels map: empty or non-text column name for {role!r} in {quoted}")
        given[role] = col.strip()
    if given.get("event") is not None and given.get("censorship") is not None:
        raise LabelError(
            "labels map: give either event (1 = event) or censorship (1 = censored = 1 - event), "
            f"not both (event={given['event']}, censorship={given['censorship']})"
        )
    if given.get("censorship") is not None:
        given["event"] = None  # censorship replaces the default e
    return LabelColumns(**given)  # type: ignore[arg-type]


def _mapping_key_hint(key: str, col: object, keys: list[str]) -> str:
    """The tail of an "unknown key" message: the pair turned round, or the closest key."""
    # "slide_id=slide" is the mapping written backwards (column=role).
    if isinstance(col, str) and col.strip().lower() in keys:
        return f"; write key=column, e.g. {col.strip().lower()}={key}"
    close = difflib.get_close_matches(key.lower(), keys, n=1, cutoff=0.5)
    listing = f"(keys: {', '.join(keys)})"
    return f"; did you mean {close[0]!r}? {listing}" if close else f" {listing}"


def check_label_columns(header: list[str], cols: LabelColumns, path: Path) -> None:
    """LabelError naming what is missing (with a mapping to pass) unless `header` has every
    column of `cols` and none that the mapping would overwrite."""
    present = set(header)
    missing = {role: col for role, col in cols.roles().items() if col not in present}
    if missing:
        raise LabelError(_missing_columns_message(header, cols, missing, path))
    # A CSV column with a canonical name that the mapping does not use would be overwritten.
    sources = set(cols.roles().values())
    for role, col in cols.roles().items():
        target = _OUTPUT_COLUMN_OF_ROLE.get(role, "e")
        if target != col and target in present and target not in sources:
            raise LabelError(
                f"{path}: the labels map reads {role} from {col!r}, but the CSV also has a "
                f"{target!r} column, which would be overwritten; drop or rename one of them"
            )


def _missing_columns_message(
    header: list[str], cols: LabelColumns, missing: dict[str, str], path: Path
) -> str:
    """The "missing column(s)" message, with the ``--labels-map`` that would fit if the table
    looks like a CLAM/PORPOISE one, else the header's closest names."""
    msg = f"{path}: missing column(s) {', '.join(missing.values())}"
    msg += f" (need {', '.join(cols.roles().values())}; the CSV has {', '.join(header[:12])}"
    msg += ", ...)" if len(header) > 12 else ")"
    present = set(header)
    # Suggest the CLAM/PORPOISE mapping for the fields it would find; never apply it here.
    suggested_roles: dict[str, str | None] = {f.name: getattr(cols, f.name) for f in fields(cols)}
    for role, col in _CLAM_COLUMN_OF_ROLE.items():
        role_is_missing = role in missing or (role == "censorship" and "event" in missing)
        if role_is_missing and col in present:
            suggested_roles[role] = col
            if role == "censorship":
                suggested_roles["event"] = None  # censorship replaces the event column, inverted
    try:
        suggested: LabelColumns | None = LabelColumns(**suggested_roles)  # type: ignore[arg-type]
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


