"""The scoring pipeline: parallel decode keeps walk order and error rows, draft decoding only where it pays."""

from __future__ import annotations

import csv
import threading
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run_cli
from PIL import Image
from test_runtime_helpers import export_tiny_onnx

from kdiqa_edge.preprocess import PreprocessSpec, draft_scale, load_preprocessed, open_image
from kdiqa_edge.runtime import QualityModel
from kdiqa_edge.runtime.pipeline import decode_files, preprocessed, walk


def _photo(width: int, height: int, seed: int) -> Image.Image:
    """A smooth scene with fine noise: DCT scaling and a full decode give visibly different pixels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = 128 + 60 * np.sin(x / (7 + seed)) * np.cos(y / 11.0)
    pixels = base[..., None] + rng.normal(0, 12, (height, width, 3)) + np.array([10 * seed, 0, -10 * seed])
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return export_tiny_onnx(tmp_path_factory.mktemp("pipeline") / "tiny.onnx")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """24 small JPEGs and PNGs, a large JPEG (slow to decode), a broken file and an empty one, mixed."""
    root = tmp_path_factory.mktemp("mixed")
    for index in range(24):
        _photo(96 + index, 80, index).save(root / f"p{index:02d}.{'jpg' if index % 3 else 'png'}", quality=90)
    _photo(1800, 1350, 99).save(root / "p05_large.jpg", quality=90)
    (root / "p10_broken.jpg").write_bytes(b"\xff\xd8 not a whole jpeg")
    (root / "p17_empty.png").write_bytes(b"")
    return root


def test_parallel_decode_keeps_walk_order_and_error_rows(model_file, folder, capsys):
    rows = {}
    for workers in ("1", "3"):
        code, out, err = run_cli(["score", model_file, folder, "--format", "csv", "--workers", workers,
                                  "--batch-size", "4", "--decode", "exact"], capsys)
        assert code == 0, err
        rows[workers] = list(csv.DictReader(out.splitlines()))
    names = [Path(r["image"]).name for r in rows["3"]]
    assert names == sorted(p.name for p in folder.iterdir())  # walk order, the slow file in its place
    assert rows["3"] == rows["1"]  # the same rows, byte for byte, whatever the number of workers
    errors = {Path(r["image"]).name: r["error"] for r in rows["3"] if r["error"]}
    assert set(errors) == {"p10_broken.jpg", "p17_empty.png"} and "empty file" in errors["p17_empty.png"]
    assert "25 scored, 2 unreadable" in err


def test_decode_files_restores_order_when_a_file_finishes_last(folder):
    """The first file's decode waits until the last one's is done: the results still come out in order."""
    paths = sorted(str(p) for p in folder.iterdir() if p.suffix == ".jpg")[:6]
    last_done = threading.Event()
    spec = PreprocessSpec(size=64)

    def load(path: str) -> np.ndarray:
        if path == paths[0]:
            assert last_done.wait(timeout=30), "the other workers never reached the last file"
        pixels = load_preprocessed(path, spec)
        if path == paths[-1]:
            last_done.set()
        return pixels

    found = [*walk(paths[:3]), (paths[3] + ".gone", "dangling symlink (to nowhere)"), *walk(paths[3:])]
    results = list(decode_files(found, load, workers=3, ahead=8))
    assert [r.path for r in results] == [str(p) for p, _ in found]
    assert [r.error for r in results] == [None] * 3 + ["dangling symlink (to nowhere)"] + [None] * 3
    serial = list(decode_files(walk(paths), preprocessed(spec), workers=1))
    assert all(np.array_equal(a.pixels, b.pixels) for a, b in zip([r for r in results if r.error is None], serial))
    assert results[0].stamp == (Path(paths[0]).stat().st_size, Path(paths[0]).stat().st_mtime_ns)


def test_score_files_uses_the_pipeline_with_the_same_scores(model_file, folder):
    model = QualityModel.load(model_file)
    paths = sorted(folder.iterdir())
    serial = list(model.score_files(paths, batch_size=5, workers=1))
    parallel = list(model.score_files(paths, batch_size=5, workers=4))
    assert serial == parallel and len(serial) == len(paths)
    good = [p for p, r in zip(paths, serial) if r.error is None]
    np.testing.assert_allclose([r.score for r in serial if r.error is None], model.score(good), atol=1e-6)


@pytest.mark.parametrize(("width", "height", "scale"), [(100, 80, 1), (447, 600, 1), (448, 600, 2), (896, 900, 4),
                                                          (1800, 1800, 8), (300, 3000, 1)])
def test_draft_decode_only_for_jpegs_large_enough(tmp_path, width, height, scale):
    """Draft (DCT-scaled) decoding only where both sides are at least twice the input: a smaller JPEG keeps
    its exact pixels, a PNG is never scaled, and a large JPEG is decoded at the scale draft_scale names."""
    assert draft_scale(width, height, 224) == scale
    path = tmp_path / "photo.jpg"
    _photo(width, height, 1).save(path, quality=90)
    draft, exact = PreprocessSpec(draft=True), PreprocessSpec(draft=False)
    assert open_image(path, draft_size=224).size == (-(-width // scale), -(-height // scale))
    same = np.array_equal(load_preprocessed(path, draft), load_preprocessed(path, exact))
    assert same == (scale == 1)
    if scale > 1:
        png = tmp_path / "photo.png"
        _photo(width, height, 1).save(png, compress_level=1)
        assert open_image(png, draft_size=224).size == (width, height)


def test_decode_option_reaches_the_pixels_and_says_when_it_is_not_the_models(model_file, tmp_path, capsys):
    big = tmp_path / "big.jpg"
    _photo(1600, 1200, 3).save(big, quality=90)
    scores = {}
    for decode in ("draft", "exact"):
        code, out, err = run_cli(["score", model_file, big, "--format", "json", "--decode", decode], capsys)
        assert code == 0, err
        scores[decode] = float(out.split('"score": ')[1].split(",")[0])
        assert ("records draft decoding" in err) == (decode == "exact")  # the tiny model records draft
    model = QualityModel.load(model_file)
    spec = model.preprocess
    assert scores["exact"] == pytest.approx(float(model.predict(load_preprocessed(big, spec.with_decode("exact"))[None])[0]), abs=1e-6)
    assert scores["draft"] == pytest.approx(model.score(big), abs=1e-6)
    assert scores["draft"] != scores["exact"]


def test_score_opens_onnx_runtime_without_spin_waiting(model_file, folder, capsys, monkeypatch):
    """The decode threads share the cores with ONNX Runtime's workers: `score` turns their spin-waiting off."""
    opened = []
    load = QualityModel.load.__func__

    def spy(cls, *args, **kwargs):
        opened.append(load(cls, *args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(QualityModel, "load", classmethod(spy))
    code, _, err = run_cli(["score", model_file, folder / "p01.jpg"], capsys)
    assert code == 0, err
    options = opened[0].backend.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
