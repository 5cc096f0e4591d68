"""Label tables as researchers have them: column mappings, CLAM/PORPOISE censorship, strict
values, string ids, slide ids with file extensions (dsca.labels, dsca.config labels_map)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest
import yaml

from dsca.config import ConfigError, load_config, parse_config
from dsca.labels import (
    LabelColumns,
    LabelError,
    SlideMatch,
    check_header,
    load_labels,
    match_slide_ids,
    missing_id,
    parse_labels_map,
    patient_slides,
    read_label_table,
    slide_key,
)

PORPOISE_MAP = "slide=slide_id,patient=case_id,time=survival_months,censorship=censorship"


def _write(tmp_path: Path, text: str, name: str = "labels.csv") -> Path:
    """Write CSV text exactly as given (the tests care about how values are spelled)."""
    path = tmp_path / name
    path.write_text(text)
    return path


def _porpoise(tmp_path: Path) -> Path:
    # PORPOISE's tcga_*_all_clean.csv layout: case first, slide file names with .svs,
    # censorship = 1 - event, and clinical extras.
    return _write(tmp_path, (
        "case_id,slide_id,survival_months,censorship,age,oncotree_code\n"
        "TCGA-A1-A0SB,TCGA-A1-A0SB-01Z-00-DX1.svs,70.2,1,70,IDC\n"
        "TCGA-A1-A0SD,TCGA-A1-A0SD-01Z-00-DX1.svs,14.0,0,59,IDC\n"
        "TCGA-A1-A0SE,TCGA-A1-A0SE-01Z-00-DX1.svs,43.5,1,56,ILC\n"
        "TCGA-A1-A0SF,TCGA-A1-A0SF-01Z-00-DX1.svs,48.0,0,54,IDC\n"
        "TCGA-A1-A0SF,TCGA-A1-A0SF-01Z-00-DX2.svs,48.0,0,54,IDC\n"
        "TCGA-A1-A0SG,TCGA-A1-A0SG-01Z-00-DX1.svs,9.9,0,61,IDC\n"
        "TCGA-A1-A0SH,TCGA-A1-A0SH-01Z-00-DX1.svs,30.0,0,39,IDC\n"
    ), "tcga_brca_all_clean.csv")


# --- the column mapping ----------------------------------------------------------------------


def test_parse_labels_map_text_mapping_and_defaults():
    cols = parse_labels_map(PORPOISE_MAP)
    assert cols == LabelColumns(slide="slide_id", patient="case_id", time="survival_months",
                                event=None, censorship="censorship")
    assert cols.indicator == "censorship"
    assert parse_labels_map(cols.to_text()) == cols and parse_labels_map(str(cols)) == cols
    # unspecified keys keep their defaults; a YAML mapping is the same as the text
    assert parse_labels_map(" time = os_days ") == LabelColumns(time="os_days")
    assert parse_labels_map({"time": "os_days", "Event": "dead"}) == LabelColumns(time="os_days", event="dead")
    assert parse_labels_map(None) == parse_labels_map("") == LabelColumns()
    assert LabelColumns().to_text() == "" and str(LabelColumns()) == "slide=pathology_id,patient=patient_id,time=t,event=e"
    # one slide per patient without a patient id: the slide column serves both
    assert parse_labels_map("slide=sid,patient=sid").patient == "sid"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("slid=slide_id", "unknown key 'slid'.*did you mean 'slide'"),
        ("slide_id=slide", "write key=column, e.g. slide=slide_id"),
        ("event=e,censorship=censorship", "either event .* or censorship"),
        ({"event": "e", "censorship": "c"}, "not both"),
        ("slide=", "empty or non-text column name for 'slide'"),
        ({"time": None}, "empty or non-text column name for 'time'"),
        ({"time": 5}, "empty or non-text column name for 'time'"),
        ("slide=slide_id,,time=t", "'' in .* is not key=column"),
        ("slide:slide_id", "'slide:slide_id' .* is not key=column"),
        ("time=a,time=b", "key 'time' is given twice"),
        ("time=x,event=x", "column 'x' is given for both time and event"),
        (["slide=a"], "expected key=column text or a mapping"),
    ],
)
def test_parse_labels_map_errors(text, message):
    with pytest.raises(LabelError, match=message):
        parse_labels_map(text)


def test_label_columns_need_exactly_one_indicator():
    with pytest.raises(LabelError, match="exactly one of event"):
        LabelColumns(censorship="c")  # the default event is still set
    with pytest.raises(LabelError, match="exactly one of event"):
        LabelColumns(event=None)


# --- CLAM / PORPOISE tables --------------------------------------------------------------------


def test_porpoise_censorship_is_inverted_through_the_map(tmp_path):
    path = _porpoise(tmp_path)
    cols = parse_labels_map(PORPOISE_MAP)
    table = read_label_table(path, cols)
    censorship = pd.read_csv(path)["censorship"].tolist()
    assert censorship == [1, 0, 1, 0, 0, 0, 0]
    assert table["e"].tolist() == [0, 1, 0, 1, 1, 1, 1]  # e = 1 - censorship, row by row
    assert str(table["e"].dtype) == "int64" and str(table["t"].dtype) == "float64"
    assert list(table.columns) == ["pathology_id", "patient_id", "t", "e", "age", "oncotree_code"]
    assert table.index.name == "line" and table.index.tolist() == [2, 3, 4, 5, 6, 7, 8]
    assert table.loc[2, "pathology_id"] == "TCGA-A1-A0SB-01Z-00-DX1.svs"
    assert table["age"].tolist() == [70, 59, 56, 54, 54, 61, 39]  # extras keep pandas' types

    df = load_labels(path, bins=2, columns=cols)
    assert df["e"].to_dict() == {"TCGA-A1-A0SB": 0, "TCGA-A1-A0SD": 1, "TCGA-A1-A0SE": 0,
                                 "TCGA-A1-A0SF": 1, "TCGA-A1-A0SG": 1, "TCGA-A1-A0SH": 1}
    assert (df["y_c"] == df.index.map(dict(zip(table["patient_id"], censorship)))).all()
    assert df.loc["TCGA-A1-A0SF", "slide_ids"] == ["TCGA-A1-A0SF-01Z-00-DX1.svs",
                                                  "TCGA-A1-A0SF-01Z-00-DX2.svs"]
    assert df.loc["TCGA-A1-A0SF", "t"] == 48.0 and df.loc["TCGA-A1-A0SF", "oncotree_code"] == "IDC"


def test_porpoise_without_map_is_an_error_that_suggests_it(tmp_path):
    path = _porpoise(tmp_path)
    with pytest.raises(LabelError) as err:
        read_label_table(path)
    msg = str(err.value)
    assert msg.startswith(str(path))
    assert "missing column(s) pathology_id, patient_id, t, e" in msg
    assert f"--labels-map {PORPOISE_MAP} (censorship = 1 - event)" in msg
    with pytest.raises(LabelError, match="--labels-map slide=slide_id"):
        load_labels(path)  # the training entry point says the same


def test_partial_clam_table_suggests_only_what_it_has(tmp_path):
    # CLAM ids but canonical time/event: the suggestion must not bring in censorship
    path = _write(tmp_path, "slide_id,case_id,t,e\ns1,p1,5,1\ns2,p2,6,0\n")
    with pytest.raises(LabelError) as err:
        read_label_table(path)
    msg = str(err.value)
    assert "missing column(s) pathology_id, patient_id" in msg
    assert "--labels-map slide=slide_id,patient=case_id" in msg and "censorship" not in msg
    assert read_label_table(path, parse_labels_map("slide=slide_id,patient=case_id"))["e"].tolist() == [1, 0]


def test_mapped_column_missing_names_close_columns(tmp_path):
    path = _write(tmp_path, "pathology_id,patient_id,OS_months,e\ns1,p1,5,1\n")
    with pytest.raises(LabelError, match="missing column\\(s\\) os_month .*'os_month' -> 'OS_months'"):
        read_label_table(path, parse_labels_map("time=os_month"))


def test_mapped_column_would_overwrite_a_canonical_one(tmp_path):
    path = _write(tmp_path, "slide_id,pathology_id,patient_id,t,e\na.svs,a,p1,5,1\n")
    with pytest.raises(LabelError, match="also has a 'pathology_id' column"):
        read_label_table(path, parse_labels_map("slide=slide_id"))
    path = _write(tmp_path, "pathology_id,patient_id,t,e,censorship\ns1,p1,5,1,0\n", "both.csv")
    with pytest.raises(LabelError, match="also has a 'e' column"):
        read_label_table(path, parse_labels_map("censorship=censorship"))


# --- values ------------------------------------------------------------------------------------

_GOOD = "pathology_id,patient_id,t,e\nS0,P0,10,1\nS1,P1,20,0\n"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("S2,P2,,1", "time t=''; times must be non-negative"),
        ("S2,P2,nan,1", "time t='nan'"),
        ("S2,P2,abc,1", "time t='abc'"),
        ("S2,P2,-1,1", "time t='-1'"),
        ("S2,P2,inf,1", "time t='inf'"),
        ("S2,P2,30,2", "event e='2'; e must be 0 \\(censored\\) or 1 \\(event\\)"),
        ("S2,P2,30,yes", "event e='yes'"),
        ("S2,P2,30,", "event e=''"),
    ],
)
def test_bad_values_name_file_line_slide_and_patient(tmp_path, row, message):
    path = _write(tmp_path, _GOOD + row + "\nS3,P3,40,1\n")
    with pytest.raises(LabelError, match=message) as err:
        read_label_table(path)
    assert str(err.value).startswith(f"{path}, line 4: slide 'S2' (patient 'P2')")


def test_bad_censorship_names_the_column(tmp_path):
    path = _write(tmp_path, "slide_id,case_id,survival_months,censorship\na,p,5,0\nb,q,6,2\n")
    with pytest.raises(LabelError, match="line 3: slide 'b' .*censorship='2'; censorship must be 0 "
                                         "\\(event observed\\) or 1 \\(censored\\)"):
        read_label_table(path, parse_labels_map(PORPOISE_MAP))


def test_indicator_spellings(tmp_path):
    path = _write(tmp_path, "pathology_id,patient_id,t,e\n"
                            "a,p1,1,1\nb,p2,2,0\nc,p3,3,1.0\nd,p4,4,0.0\ne,p5,5,True\nf,p6,6,false\n")
    assert read_label_table(path)["e"].tolist() == [1, 0, 1, 0, 1, 0]


def test_bad_time_and_event_in_a_mapped_table_name_the_mapped_column(tmp_path):
    path = _write(tmp_path, "slide_id,case_id,survival_months,censorship\na,p,5,0\nb,q,-3,1\n")
    with pytest.raises(LabelError, match="line 3: slide 'b' \\(patient 'q'\\) has time survival_months='-3'"):
        read_label_table(path, parse_labels_map(PORPOISE_MAP))


def test_zero_times_are_kept_with_a_warning(tmp_path, caplog):
    path = _write(tmp_path, _GOOD + "S2,P2,0,1\nS3,P3,0.0,0\nS4,P4,30,1\n")
    with caplog.at_level(logging.WARNING, logger="dsca.labels"):
        table = read_label_table(path)
    assert table["t"].tolist() == [10.0, 20.0, 0.0, 0.0, 30.0]
    assert "2 slide row(s) have time t = 0 (first: line 4, slide 'S2')" in caplog.text


@pytest.mark.parametrize(("row", "role"), [(",P2,30,1", "slide"), ("S2,  ,30,1", "patient")])
def test_empty_ids_name_the_line(tmp_path, row, role):
    path = _write(tmp_path, _GOOD + row + "\n")
    with pytest.raises(LabelError, match=f"line 4: empty {role} id"):
        read_label_table(path)


def test_duplicate_slide_names_its_lines(tmp_path):
    path = _write(tmp_path, _GOOD + "S0,P9,30,1\n")
    with pytest.raises(LabelError, match="slide 'S0' is listed more than once \\(lines 2, 4\\)"):
        read_label_table(path)


def test_ids_are_strings_as_written(tmp_path):
    # NLST-like numeric ids: leading zeros, exponents and surrounding spaces must not be
    # reinterpreted; ids that merely start like a missing-value marker are ids
    path = _write(tmp_path, "pathology_id,patient_id,e,t\n"
                            "0012,100012,1,10\n 11445 ,100012,1,10\nNA-7,007,0,20\n\n1e3,0,1,30\n"
                            "nan2,NAB2,1,40\n")
    table = read_label_table(path)
    assert table["pathology_id"].tolist() == ["0012", "11445", "NA-7", "1e3", "nan2"]
    assert table["patient_id"].tolist() == ["100012", "100012", "007", "0", "NAB2"]
    assert table.index.tolist() == [2, 3, 4, 6, 7]  # the blank line is skipped, line numbers kept
    df = load_labels(path, bins=1)
    assert list(df.index) == ["100012", "007", "0", "NAB2"]
    assert df.loc["100012", "slide_ids"] == ["0012", "11445"] and df.loc["007", "slide_ids"] == ["NA-7"]


@pytest.mark.parametrize("token", ["NA", "NaN", "nan", "None", "null", "NULL", "N/A", "#N/A", "-", " NA "])
def test_missing_value_patient_id_is_refused(tmp_path, token):
    # R's write.csv writes NA for a missing patient id: taken as an id, it would pool the
    # unrelated slides S2 and S3 into one patient "NA"
    path = _write(tmp_path, _GOOD + f"S2,{token},30,1\nS3,{token},40,0\n")
    with pytest.raises(LabelError) as err:
        read_label_table(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}, line 4: slide 'S2' has patient id {token.strip()!r} (column 'patient_id')")
    assert "missing-value marker" in msg and "(1 more row(s) like it)" in msg
    with pytest.raises(LabelError, match="line 4: slide 'S2' has patient id"):
        load_labels(path, bins=1)


@pytest.mark.parametrize("token", ["NA", "nan", "#N/A", "NULL", "-"])
def test_missing_value_slide_id_is_refused(tmp_path, token):
    path = _write(tmp_path, _GOOD + f"{token},P2,30,1\n")
    with pytest.raises(LabelError, match=f"line 4: slide id '{token}' \\(column 'pathology_id'\\), a missing-value"):
        read_label_table(path)


def test_missing_value_id_in_a_mapped_column_names_that_column(tmp_path):
    path = _write(tmp_path, "slide_id,case_id,survival_months,censorship\na.svs,TCGA-1,5,0\nb.svs,NA,6,1\n")
    with pytest.raises(LabelError, match="line 3: slide 'b.svs' has patient id 'NA' \\(column 'case_id'\\)"):
        read_label_table(path, parse_labels_map(PORPOISE_MAP))


def test_missing_id_helper():
    for token in ("NA", "NaN", "nan", "None", "null", "NULL", "N/A", "n/a", "#N/A", "-", "", "  ", " NA ", "<NA>"):
        assert missing_id(token), token
    assert missing_id(None) and missing_id(float("nan"))
    for ident in ("0012", "0", "NA-7", "NAB2", "nan2", "N", "A", "TCGA-A1-A0SB", "11445", "-1", "1e3"):
        assert not missing_id(ident), ident


def test_header_only_csv_has_no_rows(tmp_path):
    for name, text in (("header.csv", "pathology_id,patient_id,t,e\n"),
                       ("blank.csv", "pathology_id,patient_id,t,e\n\n  \n"),
                       ("noeol.csv", "pathology_id,patient_id,t,e")):
        path = _write(tmp_path, text, name)
        with pytest.raises(LabelError, match=f"^{path}: no rows$"):
            read_label_table(path)


def test_empty_file_and_empty_first_line_are_refused(tmp_path):
    path = _write(tmp_path, "", "empty.csv")
    with pytest.raises(LabelError, match="empty file \\(no header row\\)"):
        read_label_table(path)
    path = _write(tmp_path, "\npathology_id,patient_id,t,e\nS0,P0,1,1\n", "lead.csv")
    with pytest.raises(LabelError, match="line 1 is empty; the first line must be the header"):
        read_label_table(path)


@pytest.mark.parametrize(
    ("header", "column", "where"),
    [("pathology_id,patient_id,patient_id,t,e", "patient_id", "columns 2 and 3"),
     ("pathology_id,patient_id,t,e, patient_id ", "patient_id", "columns 2 and 5"),
     ("pathology_id,patient_id,t,e,age,age", "age", "columns 5 and 6")],
)
def test_duplicate_header_columns_are_refused(tmp_path, header, column, where):
    # pandas would rename the second one to "patient_id.1" and read it silently as an extra
    n = header.count(",") + 1
    path = _write(tmp_path, header + "\n" + ",".join(["S0", "P0", "1", "1"] + ["x"] * (n - 4)) + "\n")
    msg = f"column '{column}' appears more than once in the header \\({where}\\)"
    with pytest.raises(LabelError, match=msg):
        read_label_table(path)
    with pytest.raises(LabelError, match=msg):
        check_header(path)


def test_check_header(tmp_path):
    # a UTF-8 byte-order mark (Excel's "CSV UTF-8") is not part of the first name
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbfpathology_id, patient_id ,t,e\r\nS0,P0,1,1\r\n")
    assert check_header(path) == ["pathology_id", "patient_id", "t", "e"]
    assert read_label_table(path)["patient_id"].tolist() == ["P0"]
    # the unnamed row-name column of R's write.csv / pandas' to_csv is allowed (first only)
    path = _write(tmp_path, '"","pathology_id","patient_id","t","e"\n"1","S0","P0",1,1\n', "rnames.csv")
    assert check_header(path) == ["", "pathology_id", "patient_id", "t", "e"]
    assert read_label_table(path)["pathology_id"].tolist() == ["S0"]
    path = _write(tmp_path, "pathology_id,patient_id,t,e,\nS0,P0,1,1,\n", "trailing.csv")
    with pytest.raises(LabelError, match="column 5 of the header has no name"):
        check_header(path)
    with pytest.raises(LabelError, match="column 5 of the header has no name"):
        read_label_table(path)
    with pytest.raises(LabelError, match="label file not found"):
        check_header(tmp_path / "nope.csv")
    path = tmp_path / "latin1.csv"
    path.write_bytes("pathology_id,patient_id,t,e,\xe9tat\n".encode("latin-1"))
    with pytest.raises(LabelError, match="not UTF-8"):
        check_header(path)


# --- slide ids vs feature file stems ----------------------------------------------------------


def test_slide_key_strips_one_known_extension():
    assert slide_key("TCGA-A1-A0SB-01Z-00-DX1.svs") == "TCGA-A1-A0SB-01Z-00-DX1"
    assert slide_key("slide.NDPI") == "slide" and slide_key("x.ome.tiff") == "x.ome"
    assert slide_key("a.svs.svs") == "a.svs" and slide_key(".svs") == ".svs"
    # the dotted UUID suffix of TCGA ids is part of the id
    tcga = "TCGA-A1-A0SE-01Z-00-DX1.04B09232-C6C4-46EF-AA2C-41D078D0A80A"
    assert slide_key(tcga) == tcga and slide_key("11445") == "11445"


def test_match_svs_label_ids_to_feature_stems():
    labels = ["TCGA-A1-A0SB-01Z-00-DX1.svs", "TCGA-A1-A0SD-01Z-00-DX1.SVS", "exact", "gone.svs"]
    stores = ["TCGA-A1-A0SB-01Z-00-DX1", "TCGA-A1-A0SD-01Z-00-DX1", "exact", "unlabelled"]
    m = match_slide_ids(labels, stores)
    assert isinstance(m, SlideMatch) and m.ok
    assert m.matched == {"TCGA-A1-A0SB-01Z-00-DX1.svs": "TCGA-A1-A0SB-01Z-00-DX1",
                         "TCGA-A1-A0SD-01Z-00-DX1.SVS": "TCGA-A1-A0SD-01Z-00-DX1", "exact": "exact"}
    assert m.unmatched == ["gone.svs"]
    # the other way round: extension-less labels find store ids that kept the extension
    assert match_slide_ids(["A"], ["A.ndpi"]).matched == {"A": "A.ndpi"}


def test_ambiguous_keys_and_clashes_are_reported_not_matched():
    m = match_slide_ids(["A", "B.svs", "B.tif", "C", "C.svs"], ["A.svs", "A.tif", "B", "C"])
    assert m.ambiguous == {"A": ["A.svs", "A.tif"]}  # two store slides share the key A
    assert m.clashes == {"B": ["B.svs", "B.tif"], "C": ["C", "C.svs"]}
    assert m.matched == {"C": "C"}  # an exact id still matches
    assert not m.ok and len(m.problems()) == 3 and "'A.svs', 'A.tif'" in m.problems()[0]
    # an exact match wins over a key match
    assert match_slide_ids(["A.svs"], ["A.svs", "A"]).matched == {"A.svs": "A.svs"}


def test_patient_slides_reads_store_ids_of_svs_labels(tmp_path, caplog):
    df = load_labels(_porpoise(tmp_path), bins=2, columns=parse_labels_map(PORPOISE_MAP))
    store = {slide_key(s) for s in df.loc["TCGA-A1-A0SF", "slide_ids"]} | {"TCGA-A1-A0SB-01Z-00-DX1"}
    got = patient_slides(df, ["TCGA-A1-A0SF", "TCGA-A1-A0SB"], store, store_name="s.zarr")
    assert got == {"TCGA-A1-A0SF": ["TCGA-A1-A0SF-01Z-00-DX1", "TCGA-A1-A0SF-01Z-00-DX2"],
                   "TCGA-A1-A0SB": ["TCGA-A1-A0SB-01Z-00-DX1"]}
    # an ambiguous slide is skipped with a warning, never picked
    store = {"TCGA-A1-A0SB-01Z-00-DX1.tif", "TCGA-A1-A0SB-01Z-00-DX1.ndpi", "TCGA-A1-A0SD-01Z-00-DX1"}
    with pytest.raises(LabelError, match="patient 'TCGA-A1-A0SB' has no slide in the store"):
        patient_slides(df, ["TCGA-A1-A0SB"], store, store_name="s.zarr")
    assert "could be any of store slides" in caplog.text


# --- the training config -------------------------------------------------------------------------


def _config(tmp_path: Path, **extra) -> Path:
    raw = {"store": "cohort.zarr", "labels": "tcga_brca_all_clean.csv", "splits": "s/fold{}.npz",
           "dims": "32-16-16-4", "tra_nhead": 2, **extra}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("value", [PORPOISE_MAP, {"slide": "slide_id", "patient": "case_id",
                                                  "time": "survival_months", "censorship": "censorship"}])
def test_config_labels_map_is_parsed_once(tmp_path, value):
    _porpoise(tmp_path)
    cfg = load_config(_config(tmp_path, labels_map=value))
    assert cfg.labels_map == parse_labels_map(PORPOISE_MAP)
    # what training does with it (dsca.train.train_cross_validation loads labels so)
    df = load_labels(cfg.labels, bins=cfg.bins, columns=cfg.labels_map)
    assert df.loc["TCGA-A1-A0SB", "e"] == 0 and df.loc["TCGA-A1-A0SD", "e"] == 1
    # the run directory's config.yaml keeps the full mapping as readable text
    dumped = yaml.safe_load(yaml.safe_dump(cfg.to_dict()))["labels_map"]
    assert parse_labels_map(dumped) == cfg.labels_map


def test_config_without_labels_map_uses_the_canonical_columns(tmp_path):
    cfg = load_config(_config(tmp_path))
    assert cfg.labels_map == LabelColumns()
    _porpoise(tmp_path)
    with pytest.raises(LabelError, match=f"--labels-map {PORPOISE_MAP}"):
        load_labels(cfg.labels, bins=cfg.bins, columns=cfg.labels_map)


@pytest.mark.parametrize(
    ("value", "message"),
    [("slid=slide_id", "labels_map: unknown key 'slid'.*did you mean 'slide'"),
     ("event=e,censorship=c", "labels_map: give either event"),
     ({"time": ""}, "labels_map: empty or non-text column name for 'time'"),
     (["slide=a"], "labels_map: expected key=column text or a mapping")],
)
def test_config_bad_labels_map_names_the_key(tmp_path, value, message):
    path = _config(tmp_path, labels_map=value)
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: labels_map:")


def test_config_unknown_key_near_labels_map():
    with pytest.raises(ConfigError, match="unknown key 'label_map'; did you mean 'labels_map'"):
        parse_config({"store": "x", "labels": "y", "splits": "z{}", "label_map": "time=t"})


def test_training_on_a_porpoise_table_matches_the_canonical_one(synth_cohort, small_config, tmp_path):
    """The same cohort as a PORPOISE table (case_id/slide_id.svs/survival_months/censorship) trains
    exactly as the canonical CSV: events not inverted, .svs ids read the store's slides."""
    from dsca.train import train_cross_validation

    canon = pd.read_csv(synth_cohort.labels_csv, dtype={"pathology_id": str, "patient_id": str})
    porpoise = pd.DataFrame({
        "case_id": canon["patient_id"], "slide_id": canon["pathology_id"] + ".svs",
        "survival_months": canon["t"], "censorship": 1 - canon["e"],
    })
    porpoise_csv = tmp_path / "porpoise.csv"
    porpoise.to_csv(porpoise_csv, index=False)

    base = {"epochs": 1, "folds": [0], "eval_bootstrap": 5}
    ref = train_cross_validation(load_config(small_config(**base)), tmp_path / "canonical")
    cfg = load_config(small_config(**base, labels=str(porpoise_csv), labels_map=PORPOISE_MAP))
    got = train_cross_validation(cfg, tmp_path / "porpoise")
    assert got["folds"][0]["test"] == ref["folds"][0]["test"]
    pred = {name: pd.read_csv(tmp_path / name / "predictions.csv", dtype={"patient_id": str})
            for name in ("canonical", "porpoise")}
    pd.testing.assert_frame_equal(pred["porpoise"], pred["canonical"])
    assert json.loads((tmp_path / "porpoise" / "metrics.json").read_text())["folds"][0]["fold"] == 0
