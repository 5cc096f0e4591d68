"""The reference study's real label CSVs are read the way convert needs them."""
from __future__ import annotations

import pandas as pd
import pytest

from dsca.store.convert import ConvertError, read_label_slides


@pytest.mark.parametrize("name", ["tcga_brca/tcga_brca_path_full.csv", "tcga_lgg/TCGA_LGG_path_full.csv",
                                  "nlst/nlst_path_full.csv"])
def test_reference_label_csvs(reference_dir, name):
    path = reference_dir / "labels" / name
    mapping, conflicts = read_label_slides(path)
    df = pd.read_csv(path, dtype=str)
    assert not conflicts
    assert len(mapping) == df.pathology_id.nunique()
    # ids stay strings exactly as written (NLST's are numbers; no float-ification like "100012.0")
    sid, pid = df.pathology_id.iloc[0], df.patient_id.iloc[0]
    assert mapping[sid] == pid
    multi = df.groupby("patient_id").pathology_id.nunique()
    assert sum(1 for p in mapping.values() if p in set(multi[multi > 1].index)) == int(multi[multi > 1].sum())


def test_labels_without_required_columns(tmp_path):
    bad = tmp_path / "labels.csv"
    bad.write_text("slide,patient\nA,B\n")
    with pytest.raises(ConvertError, match="no 'pathology_id' column"):
        read_label_slides(bad)
