"""What a convert run is given: the indexed input folders, and the labels CSV matched to them.

:class:`CohortInputs` indexes the x5/x20 coords and feature folders of a run (CLAM's
`patches/`, `pt_files/`, `h5_files/`, or two TRIDENT patching runs) by slide id;
:func:`duplicate_ids` names ids that cannot be told apart (two files in one folder, or ids
that differ only in case or unicode form); :func:`cohort_dim` is the feature dim most slides
have; :func:`read_label_slides` maps the cohort's slides to patients from a labels CSV.
"""
from __future__ import annotations

import logging
import unicodedata
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from dsca.labels import LabelError, check_header, check_label_columns, match_slide_ids, missing_id, parse_labels_map
from dsca.store.clam import FeatureDir, find_coords_dir, index_dir, peek_shape
from dsca.store.errors import ClamError, ConvertError
from dsca.store.trident_attrs import trident_label
from dsca.store.trident_dirs import LOCK_REASON, TridentDir, looks_like_trident

__all__ = ["CohortInputs", "LabelSlides", "cohort_dim", "duplicate_ids", "hint_extensions", "read_label_slides"]

log = logging.getLogger(__name__)


def first_file(files: dict[str, list[Path]], slide_id: str) -> Path | None:
    """The slide's file in one index (its duplicates are reported by :func:`duplicate_ids`)."""
    return files[slide_id][0] if slide_id in files else None


@dataclass(frozen=True)
class CohortInputs:
    """The indexed input folders of one run: slide id -> its files, per level and kind."""

    c5: dict[str, list[Path]]
    c20: dict[str, list[Path]]
    pt5: dict[str, list[Path]]
    h5_5: dict[str, list[Path]]
    pt20: dict[str, list[Path]]
    h5_20: dict[str, list[Path]]
    c5_dir: Path
    c20_dir: Path | None
    roots: tuple[Path, Path]  # the x5 and x20 feature folders
    trident: bool = False
    encoder: str | None = None
    locked: dict[str, str] = field(default_factory=dict)  # slide id -> reason (TRIDENT lock files)

    @classmethod
    def open(cls, x5_features: str | Path, x20_features: str | Path, x5_coords: str | Path,
             x20_coords: str | Path | None) -> CohortInputs:
        """Index the run's folders (CLAM or TRIDENT, told apart by content); ConvertError if unusable."""
        try:
            if looks_like_trident(x5_features) or looks_like_trident(x5_coords):
                return cls._open_trident(x5_features, x20_features, x5_coords, x20_coords)
            f5, f20 = FeatureDir.open(x5_features), FeatureDir.open(x20_features)
            c5_dir = find_coords_dir(Path(x5_coords))
            c20_dir = find_coords_dir(Path(x20_coords)) if x20_coords is not None else None
        except ClamError as exc:
            raise ConvertError(str(exc)) from None
        if c20_dir is None and f20.h5_dir is None:
            log.warning("x20 alignment is not checked: give --x20-coords (or h5_files with coords)")
        return cls(index_dir(c5_dir, ".h5"), index_dir(c20_dir, ".h5") if c20_dir else {}, f5.pt, f5.h5, f20.pt,
                   f20.h5, c5_dir, c20_dir, (f5.root, f20.root))

    @classmethod
    def _open_trident(cls, x5_features: str | Path, x20_features: str | Path, x5_coords: str | Path,
                      x20_coords: str | Path | None) -> CohortInputs:
        t5, t20 = TridentDir.open(x5_features), TridentDir.open(x20_features)
        c5 = TridentDir.open(x5_coords, require_features=False)
        c20 = TridentDir.open(x20_coords, require_features=False) if x20_coords is not None else t20
        if t5.root == t20.root:
            raise ClamError(f"--x5-features and --x20-features are the same TRIDENT run ({t5.root}); "
                            "pass the 5x and the 20x patching folders")

        def files_with_suffix(files: dict[str, list[Path]], suffix: str) -> dict[str, list[Path]]:
            return {s: [p for p in ps if p.suffix.lower() == suffix] for s, ps in files.items()
                    if any(p.suffix.lower() == suffix for p in ps)}

        locked = {sid: f"{level}: {trident_label(locks[0].with_suffix(''))}: {LOCK_REASON}"
                  for level, tdir in (("x20", c20), ("x20", t20), ("x5", c5), ("x5", t5))
                  for sid, locks in tdir.locked.items()}
        for level, tdir in (("x20", t20), ("x5", t5)):  # S.h5 and S.pt: two runs, neither is the one
            for sid, files in tdir.features.items():
                if len(files) > 1:
                    locked.setdefault(sid, f"{level}: {len(files)} features files for one slide "
                                           f"({', '.join(trident_label(p) for p in files)}): remove all but one")
        return cls(c5.coords, c20.coords, files_with_suffix(t5.features, ".pt"), files_with_suffix(t5.features, ".h5"),
                   files_with_suffix(t20.features, ".pt"), files_with_suffix(t20.features, ".h5"), c5.root / "patches",
                   c20.root / "patches", (t5.features_dir or t5.root, t20.features_dir or t20.root),
                   trident=True, encoder=t5.encoder, locked=locked)

    @property
    def slide_ids(self) -> set[str]:
        """Every slide id any folder names (locked TRIDENT slides included: they are reported)."""
        return set(self.c5) | set(self.pt5) | set(self.h5_5) | set(self.pt20) | set(self.h5_20) | set(self.locked)

    def by_kind(self) -> dict[str, dict[str, list[Path]]]:
        """Folder kind (as messages name it) -> its index."""
        kinds = ("x5 coords", "x20 coords", "x5 pt_files", "x5 h5_files", "x20 pt_files", "x20 h5_files")
        return dict(zip(kinds, (self.c5, self.c20, self.pt5, self.h5_5, self.pt20, self.h5_20)))

    def coords_name(self, sid: str) -> str:
        """The name of the slide's coords file, for messages."""
        return f"{sid}_patches.h5" if self.trident else f"{sid}.h5"

    def slide_files(self, sid: str) -> dict[str, str | None]:
        """The slide's files, as the fields of :class:`~dsca.store.validate.SlideTask` name them."""
        files = {"x5_coords": self.c5, "x20_coords": self.c20, "x5_pt": self.pt5, "x5_h5": self.h5_5,
                 "x20_pt": self.pt20, "x20_h5": self.h5_20}
        return {name: None if (path := first_file(index, sid)) is None else str(path) for name, index in files.items()}


def duplicate_ids(sources: dict[str, dict[str, list[Path]]]) -> dict[str, str]:
    """slide id -> reason, for ids with two files in one folder or that differ only in case.

    Case-only differences (`TCGA-XX` vs `tcga-xx`) are one slide on case-insensitive file
    systems and almost surely a stray copy elsewhere; which copy is right is unknowable, so
    every id of such a group is skipped and named.
    """
    groups: dict[str, dict[str, dict[str, list[Path]]]] = {}  # casefold -> id -> source -> files
    for what, files in sources.items():
        for sid, paths in files.items():
            # NFC: an accented id typed on macOS (decomposed) and on Linux (composed) is one slide
            groups.setdefault(unicodedata.normalize("NFC", sid).casefold(), {}).setdefault(sid, {})[what] = paths
    failures: dict[str, str] = {}
    for ids in groups.values():
        doubled = [f"{what} has {' and '.join(p.name for p in paths)}"
                   for by_source in ids.values() for what, paths in by_source.items() if len(paths) > 1]
        if len(ids) == 1 and not doubled:
            continue
        if len(ids) > 1:
            places = "; ".join(f"{sid!r} in {', '.join(by_source)}" for sid, by_source in sorted(ids.items()))
            reason = f"duplicate slide id, differing only in case or unicode form: {places}"
        else:
            reason = f"duplicate slide id: {'; '.join(doubled)}"
        for sid in ids:
            failures[sid] = reason + " (remove or rename the copies)"
    return failures


def cohort_dim(inputs: CohortInputs, slide_ids: list[str]) -> int | None:
    """The feature dim most slides have (every readable file counts, legacy `.pt` included)."""
    dims: Counter[int] = Counter()
    for sid in slide_ids:
        for shape in (peek_shape(first_file(inputs.pt5, sid), first_file(inputs.h5_5, sid)),
                      peek_shape(first_file(inputs.pt20, sid), first_file(inputs.h5_20, sid))):
            if shape is not None and len(shape) == 2 and shape[1] > 0:
                dims[int(shape[1])] += 1
    if len(dims) > 1:
        log.info("feature dims differ between slides (%s); the cohort's is taken to be %d",
                    ", ".join(f"{d}: {n} files" for d, n in dims.most_common()), dims.most_common(1)[0][0])
    return dims.most_common(1)[0][0] if dims else None


@dataclass
class LabelSlides:
    """What a labels CSV says about the cohort's slides.

    Attributes:
        patients: feature slide id -> patient id, for the slides the CSV lists.
        problems: slide id -> reason, for rows that cannot be used (the slide is not converted).
        missing: label slide ids that match no feature file.
    """

    patients: dict[str, str] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)


def read_label_slides(labels: str | Path, slide_ids: Collection[str], labels_map: str | None = None) -> LabelSlides:
    """Slide -> patient from a labels CSV, matched to the cohort's feature slide ids.

    Columns are the canonical ones or named by `labels_map` (:func:`dsca.labels.parse_labels_map`),
    never guessed. Ids stay strings exactly as written (NLST's are numbers); a label id matches a
    feature file with or without a WSI extension (``A.svs`` -> ``A.pt``). A slide listed with
    two patients, or without a patient id, is unusable: a blank id read as NaN would otherwise
    pool unrelated slides into one patient "nan".
    """
    path = Path(labels)
    try:
        columns = parse_labels_map(labels_map)
        header = check_header(path)  # duplicate names, which pandas would silently rename
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
        check_label_columns(header, columns, path)
    except LabelError as exc:
        raise ConvertError(str(exc)) from None
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise ConvertError(f"{path}: cannot read labels CSV ({exc})") from None
    by_label: dict[str, str] = {}
    first_row: dict[str, int] = {}
    out = LabelSlides()
    for row, (sid, pid) in enumerate(zip(df[columns.slide], df[columns.patient]), start=2):
        sid, pid = str(sid).strip(), str(pid).strip()
        if missing_id(sid):
            continue
        if missing_id(pid):  # blank, or R's NA: read as an id it would pool unrelated slides
            out.problems[sid] = f"no patient_id in {path.name} (line {row}: {pid!r})"
        elif sid in by_label:  # training refuses a repeated slide too, whatever its patient
            out.problems[sid] = (f"duplicate slide id in {path.name} (lines {first_row[sid]} and {row}): "
                                 f"patients {by_label[sid]} and {pid}")
        by_label.setdefault(sid, pid)
        first_row.setdefault(sid, row)
    match = match_slide_ids(by_label, slide_ids)
    for label_id, sid in match.matched.items():
        if label_id in out.problems:  # reported under the feature file's id, which is what is skipped
            out.problems[sid] = out.problems.pop(label_id)
        else:
            out.patients[sid] = by_label[label_id]
    for label_id, ids in match.ambiguous.items():
        out.problems[label_id] = (f"label slide {label_id!r} in {path.name} could be any of the feature files' "
                                  f"slides {', '.join(ids)}; rename the label or the files")
    for sid, label_ids in match.clashes.items():
        out.problems[sid] = f"listed {len(label_ids)} times in {path.name}, as {', '.join(map(repr, label_ids))}"
    out.missing = sorted(s for s in match.unmatched if s not in out.problems)
    return out


def hint_extensions(missing: list[str], slide_ids: Collection[str]) -> None:
    """One warning when labels and feature files spell the slide ids differently throughout."""
    if missing and len(missing) >= 0.5 * max(1, len(slide_ids)):
        log.warning("%d of the labels' slides match no feature file (e.g. %r; feature files are named like %r): "
                    "check that the label slide ids are the feature files' names", len(missing), missing[0],
                    next(iter(sorted(slide_ids)), "?"))
