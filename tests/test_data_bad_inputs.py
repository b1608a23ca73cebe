"""Bad input, each case: a bad file is skipped with its reason, an unusable dataset is one clear error."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_preprocess import _png_header_only

from kdiqa_edge.cli import main
from kdiqa_edge.data import DATASETS, DatasetSpec, ImageCache, load_dataset
from kdiqa_edge.errors import ConfigError, DataError


def _write_scores(path: Path, rows: list[list], header=("image", "mos")) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture
def messy(tmp_path) -> Path:
    """A csv dataset with every kind of bad entry beside good ones in every pixel format. Its scores out of
    range are bad rows of a 1..5 set, so its users pass --mos-range 1,5 (without it they are an error)."""
    root = tmp_path / "messy"
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)

    def photo(name, mode="RGB", size=(320, 240), **save):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).convert(mode).save(root / "img" / name, **save)

    photo("good.jpg")
    photo("twice.jpg")
    photo("gray.png", "L")
    photo("alpha.png", "RGBA")
    photo("la.png", "LA")
    photo("palette.png", "P")
    photo("cmyk.jpg", "CMYK")
    photo("tiny.png", size=(40, 30))  # smaller than 224: upscaled, kept
    Image.fromarray(np.full((240, 320), 40000, np.uint16)).save(root / "img" / "deep16.png")
    exif = Image.Exif()
    exif[0x0112] = 8
    photo("rotated.jpg", exif=exif)
    (root / "img" / "empty.jpg").write_bytes(b"")
    (root / "img" / "text.jpg").write_text("not an image")
    photo("cut.jpg")
    data = (root / "img" / "cut.jpg").read_bytes()
    (root / "img" / "cut.jpg").write_bytes(data[: len(data) // 3])
    _png_header_only(root / "img" / "bomb.png", 30_000, 30_000)
    (root / "img" / "folder.jpg").mkdir()
    (tmp_path / "outside.jpg").write_bytes((root / "img" / "good.jpg").read_bytes())
    os.symlink(tmp_path / "outside.jpg", root / "img" / "link.jpg")
    _write_scores(root / "scores.csv", [
        ["img/good.jpg", 4.5], ["img/gray.png", 3.0], ["img/alpha.png", 2.5], ["img/la.png", 2.0],
        ["img/palette.png", 3.5], ["img/cmyk.jpg", 1.5], ["img/tiny.png", 4.0], ["img/deep16.png", 3.2],
        ["img/rotated.jpg", 2.2],
        ["img/empty.jpg", 3.0], ["img/text.jpg", 3.0], ["img/cut.jpg", 3.0], ["img/bomb.png", 3.0],
        ["img/missing.jpg", 3.0], ["img/folder.jpg", 3.0],
        ["img/good.jpg", 4.5],  # duplicate row
        ["img/twice.jpg", 2.0], ["img/twice.jpg", 4.0],  # one image, two scores: a conflict, neither used
        ["img/nan.jpg", "nan"], ["img/blank.jpg", ""], ["img/word.jpg", "good"], ["img/high.jpg", 7.5],
        ["img/low.jpg", -1],
        ["../outside.jpg", 3.0], [str(tmp_path / "outside.jpg"), 3.0], ["img/link.jpg", 3.0],
        ["img/../../outside.jpg", 3.0],
    ])
    return root


INDEX_TIME_SKIPS = {
    "img/empty.jpg": "empty file (0 bytes)", "img/missing.jpg": "file not found", "img/folder.jpg": "not a file",
    "img/good.jpg": "duplicate row", "img/twice.jpg": "conflicting scores: listed 2 times, with 2, 4",
    "img/nan.jpg": "score is empty or not a number",
    "img/blank.jpg": "score is empty or not a number", "img/word.jpg": "score is empty or not a number",
    "img/high.jpg": "outside the nominal range", "img/low.jpg": "outside the nominal range",
    "../outside.jpg": "path escapes the dataset root", "img/link.jpg": "path escapes the dataset root",
    "img/../../outside.jpg": "path escapes the dataset root",
}
DECODE_SKIPS = {"img/text.jpg": "not an image", "img/cut.jpg": "unreadable image",
                "img/bomb.png": "decompression bomb"}
GOOD = ["img/good.jpg", "img/gray.png", "img/alpha.png", "img/la.png", "img/palette.png", "img/cmyk.jpg",
        "img/tiny.png", "img/deep16.png", "img/rotated.jpg"]


def test_bad_entries_are_skipped_with_their_reasons(messy, tmp_path):
    dataset = load_dataset(DatasetSpec(name="csv", root=messy, mos_range=(1.0, 5.0)))
    reasons = {}
    for skip in dataset.skipped:
        reasons.setdefault(skip.image, skip.reason)
    for image, reason in INDEX_TIME_SKIPS.items():
        assert reason in reasons.get(image, ""), (image, reasons.get(image))
    assert reasons[str(tmp_path / "outside.jpg")] == "path escapes the dataset root"
    # the good.jpg entry kept is the first row, not the duplicate; a conflict skips every row of its image
    good = next(r for r in dataset.records if r.image == "img/good.jpg")
    assert good.raw == 4.5
    assert [s.image for s in dataset.skipped].count("img/twice.jpg") == 2
    assert "img/twice.jpg" not in {r.image for r in dataset.records}
    cache = ImageCache.build(dataset, cache_root=tmp_path / "cache", workers=1, progress=False)
    assert [r.image for r in cache.dataset.records] == GOOD
    decode_reasons = {s.image: s.reason for s in cache.skipped}
    for image, reason in DECODE_SKIPS.items():
        assert reason in decode_reasons[image], (image, decode_reasons.get(image))
    images = np.asarray(cache.images)
    assert images.shape == (len(GOOD), 224, 224, 3)
    gray = images[GOOD.index("img/gray.png")]
    assert np.array_equal(gray[..., 0], gray[..., 1]) and gray.std() > 10
    assert images[GOOD.index("img/deep16.png")].mean() == pytest.approx(40000 / 65535 * 255, abs=1)


def test_data_index_writes_skipped_csv_and_a_summary_line(messy, tmp_path, capsys):
    out = tmp_path / "out" / "index.csv"
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "index", "--dataset", "csv", "--root", str(messy), "--mos-range", "1,5", "--out", str(out), "--decode"])
    assert exit_info.value.code in (0, None)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    total = len(INDEX_TIME_SKIPS) + len(DECODE_SKIPS) + 2  # + the absolute-path row, + twice.jpg's 2nd row
    assert line.startswith(f"indexed {len(GOOD)} images") and f"{total} skipped" in line and "skipped.csv" in line
    with open(out.parent / "skipped.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == total and {"image", "reason"} <= set(rows[0])
    assert {"img/bomb.png", "img/cut.jpg", "img/missing.jpg"} <= {r["image"] for r in rows}


def test_strict_turns_any_skip_into_a_one_line_error(messy, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "index", "--dataset", "csv", "--root", str(messy), "--mos-range", "1,5", "--out", str(tmp_path / "i.csv"),
              "--strict"])
    assert exit_info.value.code == DataError.exit_code
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --strict") and len(err.splitlines()) == 1
    assert not (tmp_path / "i.csv").exists()


def test_strict_also_covers_files_that_fail_to_decode(messy, tmp_path):
    _write_scores(messy / "scores.csv", [["img/good.jpg", 4.0], ["img/cut.jpg", 3.0]])
    spec = DatasetSpec(name="csv", root=messy, strict=True)
    dataset = load_dataset(spec)  # nothing wrong yet: both files exist with valid scores
    with pytest.raises(DataError, match="--strict.*cut.jpg"):
        ImageCache.build(dataset, cache_root=tmp_path / "cache", workers=1, progress=False, strict=True)


@pytest.mark.parametrize("name", sorted(DATASETS.names()))
def test_missing_score_file_is_a_clear_error(name, tmp_path):
    with pytest.raises(DataError, match="score file not found"):
        load_dataset(DatasetSpec(name=name, root=tmp_path))


def test_missing_root_is_a_clear_error_through_the_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "info", "--dataset", "koniq", "--root", str(tmp_path / "nowhere")])
    assert exit_info.value.code == DataError.exit_code
    assert capsys.readouterr().err.strip() == f"error: dataset root not found: {tmp_path / 'nowhere'}"
    with pytest.raises(ConfigError, match="needs --root"):
        load_dataset(DatasetSpec(name="koniq"))


def test_a_dataset_with_no_usable_image_is_an_error(tmp_path):
    _write_scores(tmp_path / "scores.csv", [["a.jpg", 3.0], ["b.jpg", "nan"]])
    with pytest.raises(DataError, match="no usable image; 2 skipped"):
        load_dataset(DatasetSpec(name="csv", root=tmp_path))


def test_csv_reader_names_missing_columns_and_reads_its_options(tmp_path):
    _write_scores(tmp_path / "scores.csv", [["a.jpg", 3.0]], header=("file", "score"))
    with pytest.raises(DataError, match="no column 'image'.*file, score"):
        load_dataset(DatasetSpec(name="csv", root=tmp_path))
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    dataset = load_dataset(DatasetSpec(name="csv", root=tmp_path, image_col="file", mos_col="score",
                                       mos_range=(0.0, 10.0), lower_better=True))
    assert dataset.records[0].mos == pytest.approx(1 + 4 * 0.7)
    with pytest.raises(ConfigError, match="LO must be below HI"):
        DatasetSpec.from_cli(dataset="csv", mos_range="5,1")


def test_synth_refuses_to_overwrite_a_folder_that_is_not_a_synthetic_set(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "synth", str(tmp_path), "--refs", "1"])
    assert exit_info.value.code == ConfigError.exit_code
    assert (tmp_path / "mine.txt").read_text() == "precious"


@pytest.mark.parametrize("size", ["86", "86x", "wide x 64", "8x8"])
def test_synth_bad_size_is_one_line(tmp_path, capsys, size):
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "synth", str(tmp_path / "set"), "--refs", "1", "--size", size])
    assert exit_info.value.code == ConfigError.exit_code
    err = capsys.readouterr().err.strip()
    assert "--size must be WIDTHxHEIGHT" in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "set").exists()


def test_info_still_reports_a_dataset_too_small_to_split(tmp_path, capsys):
    Image.new("RGB", (300, 300), (9, 9, 9)).save(tmp_path / "only.jpg")
    _write_scores(tmp_path / "scores.csv", [["only.jpg", 3.0], ["gone.jpg", 4.0]])
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "info", "--dataset", "csv", "--root", str(tmp_path)])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "split       none: need at least 2 images" in out and "gone.jpg: file not found" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "index", "--dataset", "csv", "--root", str(tmp_path), "--out", str(tmp_path / "i.csv")])
    assert exit_info.value.code == DataError.exit_code


def test_prepare_logs_one_summary_line_and_lists_the_skips(messy, caplog):
    import logging

    from kdiqa_edge.data import prepare

    with caplog.at_level(logging.WARNING, logger="kdiqa_edge.data"):
        cache, split = prepare(DatasetSpec(name="csv", root=messy, mos_range=(1.0, 5.0)), progress=False, workers=1)
    total = len(INDEX_TIME_SKIPS) + len(DECODE_SKIPS) + 2  # + the absolute-path row, + twice.jpg's 2nd row
    [record] = [r for r in caplog.records if r.name == "kdiqa_edge.data"]
    assert f"{total} skipped" in record.getMessage() and "skipped.csv" in record.getMessage()
    with open(cache.path / "skipped.csv", newline="") as handle:
        listed = {row["image"]: row["reason"] for row in csv.DictReader(handle)}
    assert "decompression bomb" in listed["img/bomb.png"] and listed["img/missing.jpg"] == "file not found"
    assert len(cache) == len(GOOD) and sorted(split.train + split.test) == list(range(len(GOOD)))


def _pngs(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.fromarray(np.full((24, 32, 3), 40 * i, np.uint8)).save(folder / name)


@pytest.mark.parametrize("delimiter", [";", "\t"])
def test_european_csvs_parse_semicolons_tabs_and_decimal_commas(delimiter, tmp_path):
    _pngs(tmp_path, "a.png", "café.png", "c.png", "d.png")
    lines = [["image", "mos", "ref"], ["a.png", "3,5", "r1"], ["café.png", '"4,25"', "r2"], ["c.png", "2", "r1"],
             ["d.png", "1,0", "r3"]]
    # Latin-1 (cp1252), as Excel writes a CSV on a European Windows
    (tmp_path / "scores.csv").write_bytes("\n".join(delimiter.join(row) for row in lines).encode("cp1252"))
    dataset = load_dataset(DatasetSpec(name="csv", root=tmp_path, ref_col="ref"))
    assert dataset.skipped == []
    assert [(r.image, r.raw, r.ref) for r in dataset.records] == [
        ("a.png", 3.5, "r1"), ("café.png", 4.25, "r2"), ("c.png", 2.0, "r1"), ("d.png", 1.0, "r3")]


def test_a_decimal_comma_in_a_comma_delimited_file_stays_a_reported_error(tmp_path):
    _pngs(tmp_path, "a.png", "b.png")
    (tmp_path / "scores.csv").write_text('image,mos\na.png,"3,5"\nb.png,4\n')  # 3.5 or 35? not guessed
    dataset = load_dataset(DatasetSpec(name="csv", root=tmp_path))
    assert [r.image for r in dataset.records] == ["b.png"]
    assert dataset.skipped[0].image == "a.png" and "not a number ('3,5')" in dataset.skipped[0].reason


def test_scores_outside_the_range_are_reported_never_clipped(tmp_path, caplog):
    from kdiqa_edge.data.records import Row, build_dataset

    _pngs(tmp_path, "a.png", "b.png", "c.png", "d.png")
    (tmp_path / "scores.csv").write_text("image,mos\na.png,0\nb.png,100\nc.png,100.5\nd.png,-3\n")
    dataset = load_dataset(DatasetSpec(name="csv", root=tmp_path, mos_range=(0.0, 100.0)))
    assert [(r.image, r.mos) for r in dataset.records] == [("a.png", 1.0), ("b.png", 5.0)]
    assert {s.image: s.reason for s in dataset.skipped} == {
        "c.png": "outside the nominal range [0, 100]: score 100.5", "d.png": "outside the nominal range [0, 100]: score -3"}
    # the official readers' widening (LIVE's DMOS runs a little past 100) remaps, and says so; farther out: skipped
    rows = [Row("a.png", 50), Row("b.png", 104), Row("c.png", 160)]
    with caplog.at_level("WARNING"):
        live = build_dataset("live", tmp_path, rows, (0.0, 100.0), lower_better=True, hard_range=False)
    assert live.raw_range == (0.0, 104.0) and [r.image for r in live.records] == ["a.png", "b.png"]
    assert "outside the nominal range [0, 104]: score 160" in live.skipped[0].reason
    assert "1 scores lie a little outside the nominal range [0, 100]: the 1..5 mapping uses [0, 104]" in caplog.text
