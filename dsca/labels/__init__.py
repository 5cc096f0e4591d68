"""Survival labels: slide-level CSV -> one row per patient with discrete time bins.

The canonical CSV format is the reference study's: one row per slide with ``pathology_id``
(slide id), ``patient_id``, ``t`` (follow-up time) and ``e`` (1 = event observed, 0 =
censored); extra columns are kept. Tables with other column names (CLAM/PORPOISE use
``slide_id, case_id, survival_months, censorship``) are read through a :class:`LabelColumns`
mapping, parsed once by :func:`parse_labels_map` (``--labels-map`` / the ``labels_map`` config
key).

One concern per module, in the order the data flows:

* :mod:`~dsca.labels.errors` - :class:`LabelError`, the one error type;
* :mod:`~dsca.labels.columns` - :class:`LabelColumns`, :func:`parse_labels_map`,
  :func:`check_label_columns` (which CSV column holds each field);
* :mod:`~dsca.labels.ids` - :func:`missing_id`, :func:`slide_key`, :func:`match_slide_ids`
  (ids that are not ids; label slide ids vs feature/store slide ids);
* :mod:`~dsca.labels.table` - :func:`check_header`, :func:`read_label_table` (the validated
  slide-level table, used by training and by the store converter);
* :mod:`~dsca.labels.bins` - :func:`bin_edges`, :func:`assign_bins`, :func:`rebin` (discrete
  time bins);
* :mod:`~dsca.labels.patients` - :func:`load_labels`, :func:`patient_slides` (one row per
  patient with its bin; its slides in a store).

Everything public is importable from ``dsca.labels`` itself.

Example:
    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "l.csv")
    >>> _ = open(p, "w").write("pathology_id,patient_id,t,e\\n"
    ...                        "s1,p1,5,1\\ns2,p2,9,0\\ns3,p3,2,1\\ns4,p4,7,1\\n")
    >>> load_labels(p, bins=2)[["t", "e", "y_t", "y_c"]].to_dict("index")["p2"]
    {'t': 9.0, 'e': 0, 'y_t': 1, 'y_c': 1}
"""
from __future__ import annotations

from dsca.labels.bins import assign_bins, bin_edges, rebin
from dsca.labels.columns import REQUIRED_COLUMNS, LabelColumns, check_label_columns, parse_labels_map
from dsca.labels.errors import LabelError
from dsca.labels.ids import (
    MISSING_ID_TOKENS,
    WSI_EXTENSIONS,
    SlideMatch,
    match_slide_ids,
    missing_id,
    slide_key,
)
from dsca.labels.patients import LABEL_COLUMNS, load_labels, patient_slides
from dsca.labels.table import check_header, read_label_table

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
