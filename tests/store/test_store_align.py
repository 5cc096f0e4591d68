"""Alignment of level-2 patches to their 4x4 level-1 blocks, and detection of misaligned files."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from dsca.store.align import align_coords, align_dir, block_offsets, check_alignment
from dsca.store.clam import LevelAttrs, CoordsFile, read_coords


def test_block_rows_are_row_major_with_downsampled_offsets():
    coords = np.array([[1000, 2000], [5096, 2000]], dtype=np.int64)
    ds = np.array([4.0003, 4.0002])
    high = align_coords(coords, 256, ds)
    assert high.shape == (32, 2)
    for i in range(2):
        for r in range(4):
            for c in range(4):
                expect = coords[i] + np.rint(np.array([c, r]) * 256 * ds).astype(np.int64)
                np.testing.assert_array_equal(high[16 * i + 4 * r + c], expect)
    # non-integer downsample: the 4th column sits at round(3 * 256 * 4.0003) = 3072, not 3*1024
    assert block_offsets(256, np.array([4.0003, 4.0002]))[3, 0] == 3072
    assert block_offsets(256, np.array([4.01, 4.0]))[3, 0] == 3080


def test_align_dir_writes_clam_layout(synth_cohort, tmp_path):
    report = align_dir(synth_cohort.x5_coords, tmp_path / "l1", level=1, progress=False)
    assert report.ok and report.written == len(synth_cohort.slide_ids)
    assert (tmp_path / "l1" / "process_list_autogen.csv").is_file()
    sid = synth_cohort.slide_ids[0]
    low = read_coords(synth_cohort.x5_coords / "patches" / f"{sid}.h5")
    with h5py.File(tmp_path / "l1" / "patches" / f"{sid}.h5", "r") as f:
        dset = f["coords"]
        assert dset.dtype == np.int64 and dset.shape == (16 * len(low.coords), 2)
        assert dset.attrs["patch_level"] == 1 and dset.attrs["patch_size"] == 256
        np.testing.assert_allclose(dset.attrs["downsample"], np.asarray(low.attrs["downsample"]) / 4)
        np.testing.assert_array_equal(dset.attrs["level_dim"], np.asarray(low.attrs["level_dim"]) * 4)
        high = dset[()]
    assert check_alignment(low, high) is None
    # the 16 sub-patches tile the low-res patch exactly: last column/row end at its far edge
    span = high.reshape(-1, 16, 2)[:, 15] + np.rint(256 * low.downsample / 4) - low.coords
    np.testing.assert_allclose(span, np.broadcast_to(256 * low.downsample, span.shape), atol=1.5)


def test_naive_patch_size_offsets_are_named():
    low = CoordsFile(np.array([[0, 0], [4096, 0]]), level=LevelAttrs(256, (16.0012, 16.0009), patch_level=2))
    naive = align_coords(low.coords, 256, np.ones(2))
    reason = check_alignment(low, naive)
    assert reason is not None and "patch_size (256 px)" in reason and "convention" in reason
    shuffled = align_coords(low.coords, 256, low.downsample / 4)[::-1].copy()
    assert "not aligned" in check_alignment(low, shuffled)
    assert "rows" in check_alignment(low, naive[:-1])


def test_cli_align_reproduces_the_cohort_level1_files(synth_cohort, tmp_path, capsys):
    from dsca.cli.store_main import main

    assert main(["-q", "align", "--coords", str(synth_cohort.x5_coords / "patches"), "--out", str(tmp_path)]) == 0
    assert f"aligned {len(synth_cohort.slide_ids)} slides" in capsys.readouterr().out
    for sid in synth_cohort.slide_ids[:3]:
        ours = read_coords(tmp_path / "patches" / f"{sid}.h5")
        theirs = read_coords(synth_cohort.x20_coords / "patches" / f"{sid}.h5")
        np.testing.assert_array_equal(ours.coords, theirs.coords)


def test_cli_align_reports_a_level_mismatch(synth_cohort, tmp_path, capsys):
    from dsca.cli.store_main import main

    # level-1 files cannot be aligned to level 1 again
    assert main(["-q", "align", "--coords", str(synth_cohort.x20_coords), "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == len(synth_cohort.slide_ids) and "patch_level is 1, cannot align to level 1" in err[0]


def test_align_never_guesses_missing_level_attrs(tmp_path, capsys):
    from dsca.cli.store_main import main
    from dsca.store.clam import write_coords

    low = np.array([[4096, 8192], [8192, 8192]], dtype=np.int64)
    write_coords(tmp_path / "l2" / "patches" / "S1.h5", low, {"patch_size": 256})  # another tool's file
    out = tmp_path / "l1"
    assert main(["-q", "align", "--coords", str(tmp_path / "l2"), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("S1: ") and "has no patch_level, downsample attributes" in err[0]
    assert not (out / "patches" / "S1.h5").exists()
    # given on the command line, they are used: level-1 sub-patches 256 px x downsample 4 apart
    assert main(["-q", "align", "--coords", str(tmp_path / "l2"), "--out", str(out),
                 "--attrs", "patch_level=2,downsample=16"]) == 0
    high = read_coords(out / "patches" / "S1.h5")
    np.testing.assert_array_equal(high.coords[:4] - low[0], [[0, 0], [1024, 0], [2048, 0], [3072, 0]])
    assert high.patch_level == 1 and np.allclose(high.downsample, 4.0)
    # a value that contradicts the file's own is refused, naming both
    assert main(["-q", "align", "--coords", str(tmp_path / "l2"), "--out", str(out),
                 "--attrs", "patch_size=512,patch_level=2,downsample=16"]) == 1
    assert "has patch_size=256 but the command line gives 512" in capsys.readouterr().err
    # garbage is a usage error
    with pytest.raises(SystemExit) as stop:
        main(["-q", "align", "--coords", str(tmp_path / "l2"), "--out", str(out), "--attrs", "patch_size=big"])
    assert stop.value.code == 2 and "--attrs: level attrs 'patch_size=big'" in capsys.readouterr().err


def test_align_refuses_to_overwrite_its_inputs(synth_cohort, tmp_path, capsys):
    import shutil

    from dsca.cli.store_main import main

    src = tmp_path / "l2"
    shutil.copytree(synth_cohort.x5_coords, src)
    before = {p.name: p.read_bytes() for p in (src / "patches").iterdir()}
    for out in (src, src / "patches"):
        assert main(["-q", "align", "--coords", str(src), "--out", str(out)]) == 2
        assert "would overwrite the input coordinates" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (src / "patches").iterdir()} == before
    # upper-case suffixes are coordinate files too
    first = sorted(before)[0]
    (src / "patches" / first).rename(src / "patches" / first.replace(".h5", ".H5"))
    assert main(["-q", "align", "--coords", str(src), "--out", str(tmp_path / "l1")]) == 0
    assert f"aligned {len(before)} slides" in capsys.readouterr().out
    # --out that is a file: one line
    (tmp_path / "afile").write_text("x")
    assert main(["-q", "align", "--coords", str(src), "--out", str(tmp_path / "afile")]) == 2
    assert capsys.readouterr().err.startswith("error: cannot create")
