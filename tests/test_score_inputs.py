"""What `score` and the Python API do with inputs a new user's audit tried: arrays of other types, one path
as a string, pixels of another size, file names that are not UTF-8, and map folders written twice."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from cli_helpers import run_cli
from PIL import Image
from test_runtime_helpers import export_tiny_onnx

from kdiqa_edge.errors import ConfigError
from kdiqa_edge.runtime import QualityModel, maps


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return export_tiny_onnx(tmp_path_factory.mktemp("inputs") / "m.onnx", seed=3)


@pytest.fixture(scope="module")
def grey():
    y, x = np.mgrid[0:48, 0:64]
    return (128 + 90 * np.sin(x / 5.0) * np.cos(y / 7.0)).astype(np.uint8)


def test_arrays_of_every_type_score_as_their_pixels_or_are_refused_in_one_line(model_path, grey):
    model = QualityModel.load(model_path)
    expected = model.score(grey)
    assert model.score(grey.astype(np.uint16) * 257) == pytest.approx(expected, abs=1e-6)  # 16 bits: scaled
    assert model.score(Image.fromarray(grey.astype(np.uint16) * 257)) == pytest.approx(expected, abs=1e-6)
    assert model.score(grey.astype(np.int64)) == pytest.approx(expected, abs=1e-6)  # Python ints, 0..255
    assert model.score(grey.astype(np.float32) / 255) == pytest.approx(expected, abs=1e-6)
    assert model.score(np.full_like(grey, 255)) != pytest.approx(expected, abs=1e-3)  # white is not the photo
    assert list(model.score(image for image in (grey, grey))) == pytest.approx([expected] * 2, abs=1e-6)
    for bad, says in ((np.zeros((0, 10, 3)), "holds no pixel"), (np.full((8, 8), np.nan), "no finite value"),
                      (grey.astype(np.int64) * 300, "must hold 0..255")):
        with pytest.raises(ConfigError, match=says):
            model.score(bad)
    with pytest.raises(ConfigError, match=r"predict\(\) takes uint8 \[N, 64, 64, 3\]"):
        model.predict(np.zeros((1, 16, 16, 3), np.uint8))
    with pytest.raises(ConfigError, match="batch_size must be at least 1"):
        model.predict(np.zeros((1, 64, 64, 3), np.uint8), batch_size=0)


def test_score_files_takes_one_path_as_one_path(model_path, grey, tmp_path):
    path = tmp_path / "one.png"
    Image.fromarray(grey).save(path)
    rows = list(QualityModel.load(model_path).score_files(str(path)))
    assert [(r.path, r.error) for r in rows] == [(str(path), None)]


def test_file_names_that_are_not_utf8_go_out_as_their_bytes(model_path, grey, tmp_path, capsys):
    folder = tmp_path / "odd"
    folder.mkdir()
    name = os.fsdecode(b"bad\xff\xfename.png")
    Image.fromarray(grey).save(folder / name)
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}  # what a UTF-8 locale's stdout is
    for output in ("text", "csv"):
        run = subprocess.run([sys.executable, "-m", "kdiqa_edge", "score", str(model_path), str(folder), "--format",
                              output], capture_output=True, env=env)
        assert run.returncode == 0 and b"Traceback" not in run.stderr, run.stderr
        assert b"bad\xff\xfename.png" in run.stdout
    for suffix in (".csv", ".parquet"):
        out = tmp_path / f"scores{suffix}"
        code, _, err = run_cli(["score", model_path, folder, "--out", out], capsys)
        assert code == 0, err
        code, _, err = run_cli(["score", model_path, folder, "--out", out], capsys)  # resumed: matched by name
        assert code == 0 and "1 skipped" in err, err
    assert (tmp_path / "scores.csv").read_bytes().splitlines()[1].startswith(os.fsencode(str(folder / name)))


def test_a_map_is_never_written_over_another_images_and_keeps_its_name(model_path, grey, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    Image.fromarray(grey).save(a / "x.jpg")
    Image.fromarray(255 - grey).save(a / "x.png")
    Image.fromarray(np.roll(grey, 9, axis=1)).save(b / "x.png")
    out, scores = tmp_path / "maps", tmp_path / "scores.csv"
    common = ["--map", out, "--map-kind", "patches", "--out", scores]
    assert run_cli(["score", model_path, a, *common], capsys)[0] == 0
    first = {p.name: p.read_bytes() for p in out.glob("*.npy")}
    assert sorted(first) == ["x-2.map.npy", "x.map.npy"]
    assert run_cli(["score", model_path, a, b, *common], capsys)[0] == 0  # only b/x.png is scored now
    assert {p.name: p.read_bytes() for p in out.glob("*.npy") if p.name in first} == first  # a's maps untouched
    with open(out / maps.MAP_INDEX, newline="") as handle:
        index = {Path_(row["image"]): row["array"] for row in csv.DictReader(handle)}
    assert index == {Path_(a / "x.jpg"): "x.map.npy", Path_(a / "x.png"): "x-2.map.npy",
                     Path_(b / "x.png"): "x-3.map.npy"}
    model = QualityModel.load(model_path)
    assert np.array_equal(np.load(out / "x-3.map.npy"), maps.score_map(model, b / "x.png", "patches"))
    code, _, err = run_cli(["score", model_path, a / "x.jpg", "--map", scores, "--map-kind", "patches"], capsys)
    assert code == 2 and err.strip().splitlines()[-1] == f"error: --map {scores} is a file: name a folder for the maps"


def test_the_map_follows_decode_and_the_exif_orientation(model_path, tmp_path):
    model = QualityModel.load(model_path)
    y, x = np.mgrid[0:600, 0:900]
    photo = Image.fromarray(np.stack([(x * 7 % 256), (y * 3 % 256), ((x + y) % 256)], -1).astype(np.uint8))
    photo.save(tmp_path / "big.jpg", quality=90)  # over twice the input: draft and exact decode differ
    writer = maps.MapWriter(model, tmp_path / "exact", "patches", decode="exact")
    row = writer.write(tmp_path / "big.jpg")
    assert row.score == pytest.approx(model.score_files([tmp_path / "big.jpg"], decode="exact").__next__().score,
                                      abs=0)
    exact = maps.quality_map(model, tmp_path / "big.jpg", "patches", spec=model.preprocess.with_decode("exact"))
    assert np.array_equal(np.load(row.array), exact.values)
    rotated = Image.open(tmp_path / "big.jpg")
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90° on display
    rotated.save(tmp_path / "turned.jpg", exif=exif, quality=90)
    with Image.open(tmp_path / "turned.jpg") as turned:
        upright = Image.fromarray(np.asarray(turned.transpose(Image.Transpose.ROTATE_270)))  # no EXIF left
        assert maps.score_map(model, turned, "patches") == pytest.approx(maps.score_map(model, upright, "patches"),
                                                                         abs=1e-5)


def Path_(path) -> str:
    from pathlib import Path

    return str(Path(path).resolve())


def test_json_output_is_parsable(model_path, grey, tmp_path, capsys):
    Image.fromarray(grey).save(tmp_path / "g.png")
    code, out, _ = run_cli(["score", model_path, tmp_path / "g.png", "--format", "json"], capsys)
    assert code == 0 and json.loads(out)["image"] == str(tmp_path / "g.png")
