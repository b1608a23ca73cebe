"""Ratings dropped or misread by the readers (audit 2): every rating of a score file is kept, with its
direction, scale and content id, or skipped with a reason a user can act on; bad input is one line.

Each case is a tiny official layout (shared/datasets.md) written here, with the quirk real copies have: a
BOM, CRLF, tabs, quoted line breaks, names in another case, short or long rows.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import stats
from scipy.io import savemat
from test_data_readers import _cell, _xlsx, koniq, spaq

from kdiqa_edge.cli import main
from kdiqa_edge.data import DatasetSpec, load_dataset, make_split
from kdiqa_edge.errors import DataError
from kdiqa_edge.metrics import evaluate


def _png(path: Path, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), (10, 20, 30)).save(path, format=fmt)


def _ratings(dataset) -> dict[str, float]:
    return {record.image: record.raw for record in dataset.records}


# -- TID2013's text file ---------------------------------------------------------------------------------


def test_tid2013_keeps_every_rating_with_a_bom_crlf_tabs_and_blank_lines(tmp_path):
    for name in ("i01_01_1.bmp", "i02_08_3.bmp", "i03_24_5.bmp"):
        _png(tmp_path / "distorted_images" / name, "BMP")
    text = "\ufeff5.51429 i01_01_1.bmp\r\n4.2\ti02_08_3.bmp\r\n3,75   i03_24_5.bmp\r\n\r\n\r\n"
    (tmp_path / "mos_with_names.txt").write_bytes(text.encode("utf-8"))
    dataset = load_dataset(DatasetSpec(name="tid2013", root=tmp_path))
    assert dataset.skipped == []
    assert _ratings(dataset) == {"distorted_images/i01_01_1.bmp": 5.51429, "distorted_images/i02_08_3.bmp": 4.2,
                                 "distorted_images/i03_24_5.bmp": 3.75}
    assert [r.ref for r in dataset.records] == ["I01", "I02", "I03"]
    assert dataset.records[0].mos == pytest.approx(1 + 4 * 5.51429 / 9)


def test_tid2013_a_malformed_line_is_a_skip_that_names_the_line(tmp_path):
    _png(tmp_path / "distorted_images" / "i01_01_1.bmp", "BMP")
    (tmp_path / "mos_with_names.txt").write_text("5.5 i01_01_1.bmp\ngarbage\n")
    dataset = load_dataset(DatasetSpec(name="tid2013", root=tmp_path))
    assert len(dataset) == 1
    [skip] = dataset.skipped
    assert skip.image == "mos_with_names.txt line 2" and "malformed line 'garbage'" in skip.reason


# -- CSV rows ---------------------------------------------------------------------------------------------


def test_a_row_with_more_fields_than_the_header_is_skipped_not_read_shifted(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        _png(tmp_path / name)
    # a.png's 3,5 is 3.5 with a decimal comma, unquoted: read as 3 (and a stray 5) it would be a wrong rating
    (tmp_path / "scores.csv").write_text("image,mos\na.png,3,5\nb.png,4,\nc.png,2\n")
    dataset = load_dataset(DatasetSpec(name="csv", root=tmp_path))
    assert _ratings(dataset) == {"b.png": 4.0, "c.png": 2.0}  # a trailing empty field is harmless
    [skip] = dataset.skipped
    assert skip.image == "a.png" and "row has 3 fields, the header 2 (extra: '5')" in skip.reason


def test_koniq_long_and_short_rows_are_skips_never_tracebacks(tmp_path):
    koniq(tmp_path)
    path = tmp_path / "koniq10k_scores_and_distributions.csv"
    lines = path.read_text().splitlines()
    lines[1] += ",surplus"  # 1000.jpg: one field too many
    path.write_text("\n".join(lines + ["1005.jpg,1,2"]) + "\n")  # a cut-off row, listed a second time
    sets = tmp_path / "koniq10k_distributions_sets.csv"
    sets.write_text(sets.read_text() + "9999.jpg\n")  # a cut-off row in the split file
    dataset = load_dataset(DatasetSpec(name="koniq", root=tmp_path))
    assert sorted(_ratings(dataset)) == [f"1024x768/{1000 + i}.jpg" for i in range(1, 6)]
    reasons = {s.image: s.reason for s in dataset.skipped}
    assert "row has 11 fields, the header 10" in reasons["1024x768/1000.jpg"]
    assert "score is empty" in reasons["1024x768/1005.jpg"]
    assert make_split(dataset, by="official").sizes() == {"train": 3, "val": 1, "test": 1}


def test_kadid_a_short_row_is_a_skip_and_an_empty_ref_comes_from_the_name(tmp_path):
    for name in ("I01_01_01.png", "I02_03_05.png", "I03_01_01.png"):
        _png(tmp_path / "images" / name)
    (tmp_path / "dmos.csv").write_text("dist_img,ref_img,dmos,var\nI01_01_01.png,,4.1,0.2\n"
                                       "I02_03_05.png,I02.png,2.5,0.3\nI03_01_01.png\n")
    dataset = load_dataset(DatasetSpec(name="kadid", root=tmp_path))
    assert {r.image: (r.raw, r.ref) for r in dataset.records} == {
        "images/I01_01_01.png": (4.1, "I01"), "images/I02_03_05.png": (2.5, "I02")}
    assert [s.image for s in dataset.skipped] == ["images/I03_01_01.png"]


def test_only_the_csv_line_ends_end_a_row(tmp_path):
    for name in ("a.png", "b.png", "c.png", "d.png"):
        _png(tmp_path / name)
    # cp1252, read as Latin-1: its ellipsis is U+0085, which str.splitlines() takes for a line end
    text = 'image,comment,mos\na.png,dark\u2026ish,3.5\nb.png,"sharp\nbut noisy",4\nc.png,,2\r\nd.png,ok,1\n'
    (tmp_path / "scores.csv").write_bytes(text.encode("cp1252"))
    dataset = load_dataset(DatasetSpec(name="csv", root=tmp_path))
    assert _ratings(dataset) == {"a.png": 3.5, "b.png": 4.0, "c.png": 2.0, "d.png": 1.0} and dataset.skipped == []


def _one_line_error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == DataError.exit_code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_an_unparseable_csv_is_one_line_through_the_cli(tmp_path, capsys):
    (tmp_path / "scores.csv").write_text("image,mos\n" + "x" * 200_000 + ",3\n")
    err = _one_line_error(["data", "info", "--dataset", "csv", "--root", str(tmp_path)], capsys)
    assert "cannot parse score file" in err and "field larger than field limit" in err


def test_a_csv_ref_column_with_stray_spaces_is_one_content_per_id(tmp_path):
    lines = ["image,mos,content"]
    for i in range(20):
        _png(tmp_path / f"{i}.png")
        lines.append(f"{i}.png,{1 + i % 4},{' ' if i % 3 == 0 else ''}scene{i // 4}{' ' if i % 2 else ''}")
    (tmp_path / "scores.csv").write_text("\n".join(lines) + "\n")
    dataset = load_dataset(DatasetSpec(name="csv", root=tmp_path, ref_col="content"))
    assert dataset.refs == [f"scene{k}" for k in range(5)]
    for seed in range(3):
        split = make_split(dataset, seed=seed)
        assert split.by == "ref"
        train = {dataset.records[i].ref for i in split.train}
        assert train and not train & {dataset.records[i].ref for i in split.test}


# -- file names -------------------------------------------------------------------------------------------


def test_a_name_in_another_case_than_the_file_on_disk_is_found(tmp_path):
    koniq(tmp_path / "koniq")
    os.rename(tmp_path / "koniq" / "1024x768" / "1002.jpg", tmp_path / "koniq" / "1024x768" / "1002.JPG")
    dataset = load_dataset(DatasetSpec(name="koniq", root=tmp_path / "koniq"))
    assert len(dataset) == 6 and dataset.skipped == []
    assert "1024x768/1002.JPG" in _ratings(dataset) and (dataset.root / "1024x768/1002.JPG").is_file()
    spaq(tmp_path / "spaq")
    folder = tmp_path / "spaq" / "TestImage"
    for name in os.listdir(folder):
        os.rename(folder / name, folder / name.upper())
    assert len(load_dataset(DatasetSpec(name="spaq", root=tmp_path / "spaq"))) == 5


def test_two_spellings_of_one_file_are_one_image_and_two_files_in_case_only_are_not_guessed(tmp_path):
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        _png(tmp_path / name, "JPEG")
    (tmp_path / "scores.csv").write_text("image,mos\na.JPG,3\na.jpg,4\nb.jpg,2\nc.jpg,1\n")
    dataset = load_dataset(DatasetSpec(name="csv", root=tmp_path))
    assert _ratings(dataset) == {"b.jpg": 2.0, "c.jpg": 1.0}  # one image rated 3 and 4: a conflict
    assert [s.reason.split(":")[0] for s in dataset.skipped] == ["conflicting scores"] * 2
    _png(tmp_path / "D.jpg", "JPEG")
    _png(tmp_path / "d.JPG", "JPEG")
    (tmp_path / "scores.csv").write_text("image,mos\nd.jpg,3\nb.jpg,2\nc.jpg,1\n")
    dataset = load_dataset(DatasetSpec(name="csv", root=tmp_path))
    assert "d.jpg" not in _ratings(dataset)
    assert "differ from it in case only" in dataset.skipped[0].reason


def test_a_file_whose_name_on_disk_is_not_utf8_is_a_skip_that_says_so(tmp_path):
    Image.new("RGB", (8, 8)).save(os.path.join(os.fsencode(tmp_path), b"caf\xe9.png"), format="PNG")
    for name in ("b.png", "c.png"):
        _png(tmp_path / name)
    (tmp_path / "scores.csv").write_bytes(b"image,mos\ncaf\xe9.png,3.5\nb.png,4\nc.png,2\n")  # cp1252
    dataset = load_dataset(DatasetSpec(name="csv", root=tmp_path))
    [skip] = dataset.skipped
    assert skip.image == "café.png" and "named b'caf\\xe9.png', not UTF-8" in skip.reason


# -- MATLAB and Excel -------------------------------------------------------------------------------------


def test_clive_drops_the_training_images_by_name_not_the_first_seven_ratings(tmp_path):
    names = ["3.bmp", "10.bmp", "101.bmp", "1002.bmp", "5.bmp", "6.bmp", "7.bmp", "8.bmp", "9.bmp"]
    mos = np.linspace(20, 80, len(names))
    (tmp_path / "Data").mkdir()
    savemat(tmp_path / "Data" / "AllImages_release.mat", {"AllImages_release": _cell(names, (len(names), 1))})
    savemat(tmp_path / "Data" / "AllMOS_release.mat", {"AllMOS_release": mos[None, :]})
    for name in names:
        _png(tmp_path / "Images" / name, "BMP")
    dataset = load_dataset(DatasetSpec(name="clive", root=tmp_path))
    assert len(dataset) == len(names) and dataset.dropped == 0
    assert _ratings(dataset)["Images/3.bmp"] == pytest.approx(20.0)
    training = [f"t{k}.bmp" for k in range(1, 8)]  # as the release lists them: dropped, by convention
    savemat(tmp_path / "Data" / "AllImages_release.mat", {"AllImages_release": _cell(training + names, (16, 1))})
    savemat(tmp_path / "Data" / "AllMOS_release.mat", {"AllMOS_release": np.r_[np.full(7, 50.0), mos][None, :]})
    dataset = load_dataset(DatasetSpec(name="clive", root=tmp_path))
    assert len(dataset) == len(names) and dataset.dropped == 7 and not dataset.skipped


def test_a_mat_file_with_text_for_scores_is_one_line(tmp_path, capsys):
    names = ["t1.bmp", "3.bmp", "4.bmp"]
    (tmp_path / "Data").mkdir()
    savemat(tmp_path / "Data" / "AllImages_release.mat", {"AllImages_release": _cell(names, (3, 1))})
    savemat(tmp_path / "Data" / "AllMOS_release.mat", {"AllMOS_release": _cell(["good", "bad", "ok"], (1, 3))})
    err = _one_line_error(["data", "info", "--dataset", "clive", "--root", str(tmp_path)], capsys)
    assert "'AllMOS_release' is not an array of numbers" in err


def test_spaq_a_text_cell_with_a_decimal_comma_is_its_rating(tmp_path):
    header = ["Image name", "MOS", "Brightness", "Colorfulness", "Contrast", "Noisiness", "Sharpness"]
    _xlsx(tmp_path / "Annotations" / "MOS and Image attribute scores.xlsx", "Sheet1",
          [header, ["00001.jpg", 42.5], ["00002.jpg", "77,5"], ["00003.jpg", " 12 "]])
    for i in range(1, 4):
        _png(tmp_path / "TestImage" / f"{i:05d}.jpg", "JPEG")
    dataset = load_dataset(DatasetSpec(name="spaq", root=tmp_path))
    assert _ratings(dataset) == {"TestImage/00001.jpg": 42.5, "TestImage/00002.jpg": 77.5,
                                 "TestImage/00003.jpg": 12.0}


# -- metrics ----------------------------------------------------------------------------------------------


def test_fitted_plcc_is_never_below_the_raw_plcc_in_magnitude():
    # predictions that fall as MOS rises (a DMOS-style model): the fit from the VQEG start, which assumes a
    # rising curve, stopped at a local optimum far below |raw PLCC| on these
    rng = np.random.default_rng(0)
    checked = 0
    for trial in range(200):
        n = int(rng.integers(5, 60))
        mos = rng.uniform(1, 5, n)
        pred = (1 if trial % 2 else -1) * mos + rng.normal(0, rng.uniform(0.1, 3), n)
        m = evaluate(pred, mos)
        assert m.plcc == pytest.approx(stats.pearsonr(pred, mos)[0], abs=1e-12)
        assert m.plcc_fit >= abs(m.plcc) - 1e-9, (trial, m)
        checked += 1
    assert checked == 200
