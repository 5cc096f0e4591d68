"""Slide and patient ids: missing-value markers that are never ids, and label slide ids matched
to feature/store slide ids that may differ by a WSI file extension (``X.svs`` in the CSV,
``X.h5`` on disk)."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["MISSING_ID_TOKENS", "missing_id", "WSI_EXTENSIONS", "slide_key", "SlideMatch",
           "match_slide_ids"]

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


#: File extensions of whole-slide images that :func:`slide_key` strips (compared lower-case).
WSI_EXTENSIONS = (
    ".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".czi", ".dcm",
    ".isyntax", ".qptiff", ".svslide", ".kfb", ".sdpc", ".jpg", ".jpeg", ".png",
)


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


