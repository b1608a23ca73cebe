"""Local quality maps (issue 29): the fast map in torch and in every artifact `export --with-map` writes (ONNX
through the CLI, OpenVINO, ExecuTorch, CoreML's interface), the score output unchanged by the map, the
patches map, the overlay + .npy writer with a broken file among the images, and all of it without torch."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("open_clip")

from cli_helpers import run_cli

from kdiqa_edge.errors import ConfigError, ExportError
from kdiqa_edge.export import Examples, ExportConfig, evaluate
from kdiqa_edge.runtime import QualityModel, maps


def _quiet(_):
    pass


@pytest.fixture(scope="module")
def checkpoint(student_checkpoints) -> Path:
    return student_checkpoints("maps", {"student": "test_resnet"})["student"]


@pytest.fixture(scope="module")
def images(small_synthetic) -> np.ndarray:
    from kdiqa_edge.data import prepare
    from kdiqa_edge.preprocess import PreprocessSpec

    cache, split = prepare(small_synthetic, PreprocessSpec(size=64), progress=False)
    return np.asarray(cache.images[split.test[:8]])


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    """Two photos (a JPEG larger than the overlay, a small PNG) and a broken file, in one folder."""
    from PIL import Image
    from skimage import data

    folder = tmp_path_factory.mktemp("map-photos")
    Image.fromarray(data.astronaut()).resize((640, 480)).save(folder / "astronaut.jpg", quality=90)
    Image.fromarray(data.chelsea()).resize((120, 90)).save(folder / "chelsea.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return [folder / "astronaut.jpg", folder / "broken.jpg", folder / "chelsea.png"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, checkpoint, small_synthetic) -> dict[str, Path]:
    """FP32 ONNX of the student with the map, through the CLI, and without it: {with, without} export dirs."""
    from kdiqa_edge.cli import main

    root = tmp_path_factory.mktemp("maps-onnx")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(checkpoint), "--target", "onnx", "--with-map", "--dataset", "synthetic", "--root",
              str(small_synthetic.root), "--out", str(root / "with")])
    assert exit_info.value.code == 0
    # the same graph without the map, traced on its own (what an export without --with-map ships)
    from kdiqa_edge.export import onnx as onnx_target
    from kdiqa_edge.export.pipeline import artifact_meta
    from kdiqa_edge.models import load_checkpoint

    model = load_checkpoint(checkpoint)
    scored = onnx_target.score_model(model, ExportConfig())
    (root / "without" / "onnx-fp32").mkdir(parents=True)
    path = onnx_target.export_fp32(scored, root / "without" / "onnx-fp32" / "model.fp32.onnx", 17)
    onnx_target.set_metadata(path, {**artifact_meta(model), "target": "onnx", "precision": "fp32",
                                    "input": scored.input_spec(), "outputs": scored.output_names})
    return {"with": root / "with", "without": root / "without"}


def _entry(folder: Path, label: str = "onnx-fp32") -> dict:
    return json.loads((folder / "manifest.json").read_text())["exports"][label]


def test_onnx_with_map_through_the_cli_keeps_the_score_bit_identical(exported, checkpoint, images):
    entry = _entry(exported["with"])
    assert entry["details"]["outputs"] == ["score", "score_map"]
    recorded = entry["details"]["map"]
    assert recorded["shape"] == [2, 2] and recorded["parity"]["passed"] and recorded["parity"]["values"] == 4 * recorded["parity"]["images"]
    assert recorded["score_vs_without_map"]["identical"] is True
    assert recorded["latency"]["with_map_p50_ms"] > 0 and recorded["latency"]["without_map_p50_ms"] > 0
    assert any("score_map [N, 2, 2]" in note for note in entry["notes"])

    mapped = QualityModel.load(exported["with"] / "onnx-fp32" / "model.fp32.onnx")
    plain = QualityModel.load(exported["without"] / "onnx-fp32" / "model.fp32.onnx")
    scores, score_maps = maps.predict_maps(mapped, images)
    assert np.array_equal(scores, plain.predict(images))  # the export without the map, made on its own
    assert np.array_equal(scores, mapped.predict(images))  # the backend's own score path
    assert score_maps.shape == (len(images), 2, 2) and score_maps.dtype == np.float32
    assert ((score_maps >= 1) & (score_maps <= 5)).all()
    from kdiqa_edge.models import load_checkpoint

    reference = evaluate.torch_maps(load_checkpoint(checkpoint), images)
    assert np.abs(reference - score_maps).max() < 1e-4
    assert np.ptp(score_maps) > 1e-3  # the map is not one constant
    # a checkpoint (the torch backend) gives the same map through the runtime
    checkpoint_map = maps.predict_maps(QualityModel.load(checkpoint), images[:2])[1]
    assert np.abs(checkpoint_map - score_maps[:2]).max() < 1e-4


def test_openvino_ir_carries_the_map(exported, checkpoint, images, tmp_path):
    pytest.importorskip("openvino")
    from kdiqa_edge.export import openvino as ovt
    from kdiqa_edge.export.pipeline import artifact_meta
    from kdiqa_edge.models import load_checkpoint

    model = load_checkpoint(checkpoint)
    examples = Examples(parity=images, calib=images[:0], test=images, test_mos=np.zeros(len(images)))
    meta = {**artifact_meta(model), "target": "openvino"}
    onnx_path = exported["with"] / "onnx-fp32" / "model.fp32.onnx"
    path = ovt.write_ir(model, onnx_path, examples, tmp_path, ExportConfig(with_map=True), meta, "fp32")[0]
    report = evaluate.map_report(model, path, images, 1e-4, threads=2)
    assert report["shape"] == [2, 2] and report["parity"]["passed"]
    ir = QualityModel.load(path)
    # the IR's score output is the ONNX file's (converted from it), which the CLI test holds bit-identical
    assert np.abs(ir.predict(images) - QualityModel.load(onnx_path).predict(images)).max() < 1e-5
    assert ir.info.outputs == ("score", "score_map")


def test_executorch_program_carries_the_map(checkpoint, images, tmp_path):
    pytest.importorskip("executorch")
    from kdiqa_edge.export import executorch as et
    from kdiqa_edge.export.pipeline import artifact_meta
    from kdiqa_edge.models import load_checkpoint

    model = load_checkpoint(checkpoint)
    examples = Examples(parity=images, calib=images[:0], test=images, test_mos=np.zeros(len(images)))
    path = et.write_program(model, examples, tmp_path, ExportConfig(target="executorch", with_map=True),
                            artifact_meta(model), "fp32")[0]
    report = evaluate.map_report(model, path, images, 1e-4, threads=2)
    assert report["shape"] == [2, 2] and report["parity"]["passed"] and report["parity"]["values"] == 8 * 4
    program = QualityModel.load(path)
    assert program.backend.fixed_batch == 1  # map_outputs ran it image by image
    assert np.abs(program.predict(images) - evaluate.torch_reference(model, images)).max() < 1e-4


def test_coreml_package_lists_the_map_output(checkpoint, images, tmp_path):
    pytest.importorskip("coremltools")
    from kdiqa_edge.export import TARGETS
    from kdiqa_edge.export.coreml import describe
    from kdiqa_edge.export.pipeline import artifact_meta
    from kdiqa_edge.models import load_checkpoint

    model = load_checkpoint(checkpoint)
    examples = Examples(parity=images, calib=images[:0], test=images, test_mos=np.zeros(len(images)))
    result = TARGETS.get("coreml").export(model, examples, tmp_path, ExportConfig(target="coreml", with_map=True),
                                          artifact_meta(model))
    assert describe(result.files[0])["outputs"] == ["score", "score_map"]
    assert result.extra["map"]["shape"] == [2, 2]
    if sys.platform != "darwin":
        assert "macOS only" in result.extra["map"]["parity"]["skipped"]
    else:
        assert result.extra["map"]["parity"]["passed"]


def test_nhwc_token_grid_and_token_sequences(tiny_student):
    """Swin's final token grid (NHWC) gives a map; a ViT's token sequence is refused in one line."""
    import timm

    from kdiqa_edge.models.maps import fast_map, grid_shape
    from kdiqa_edge.models.score import ScoreModel
    from kdiqa_edge.models.student import StudentBuild, _assemble

    torch.manual_seed(0)
    encoder = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, img_size=64,
                                embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4)
    swin = _assemble(encoder, tiny_student.head, tiny_student.preprocess,
                     StudentBuild("tiny-swin", "quality", False, "not pretrained", {})).eval()
    assert getattr(encoder, "output_fmt", None) == "NHWC" and grid_shape(swin) == (8, 8)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        score, score_map = ScoreModel(swin, with_map=True)(x)
        plain = ScoreModel(swin)(x)
        assert torch.equal(score, plain)
        assert score_map.shape == (2, 8, 8)
        assert (score_map - fast_map(swin, x)).abs().max() < 1e-5

    vit = _assemble(timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=64),
                    tiny_student.head, tiny_student.preprocess,
                    StudentBuild("test_vit", "quality", False, "not pretrained", {}))
    with pytest.raises(ExportError, match="token sequence"):
        ScoreModel(vit, with_map=True)


def test_patch_boxes_tile_the_region():
    boxes = maps.patch_boxes((10.0, 0.0, 110.0, 100.0), grid=4, fraction=0.5)
    assert len(boxes) == 16
    for left, top, right, bottom in boxes:
        assert right - left == pytest.approx(50) and bottom - top == pytest.approx(50)
        assert 10 <= left and right <= 110 and 0 <= top and bottom <= 100
    assert boxes[0][:2] == (10.0, 0.0) and boxes[-1][2:] == (110.0, 100.0)  # corners shifted inward
    centres = sorted({(b[0] + b[2]) / 2 for b in boxes})
    assert centres == pytest.approx([35.0, 47.5, 72.5, 85.0])  # cell centres 22.5..97.5, clamped to 35..85
    with pytest.raises(ConfigError):
        maps.patch_boxes((0, 0, 1, 1), grid=0)


def test_the_overlay_colours_follow_the_map_and_its_scale(tmp_path):
    from PIL import Image

    grey = Image.new("RGB", (400, 300), (128, 128, 128))
    values = np.array([[1.0, 5.0], [1.0, 5.0]], np.float32)  # left half bad, right half perfect
    path = maps.render_overlay(grey, maps.QualityMap("fast", 4.25, values, (0.125, 0.0, 0.875, 1.0)),
                               tmp_path / "a.map.png", label="fast map 2x2")
    with Image.open(path) as overlay:
        pixels = np.asarray(overlay.convert("RGB"), np.int32)
    side = maps.OVERLAY_SIDE
    assert pixels.shape == (side, round(side * 1.25), 3)
    lut = maps._colour_table()
    bad, good = (128 * (1 - maps.OVERLAY_ALPHA) + lut[[0, -1]] * maps.OVERLAY_ALPHA).round()
    middle = side // 2
    assert np.abs(pixels[middle, 40] - bad).max() <= 1 and np.abs(pixels[middle, side - 40] - good).max() <= 1
    assert pixels[middle, 40, 0] > pixels[middle, 40, 1] and pixels[middle, side - 40, 1] > pixels[middle, side - 40, 0]
    bar = pixels[:, round(0.86 * pixels.shape[1])]  # the colour bar's middle column: 5 (green) on top, 1 at the foot
    top, foot = bar[round(0.1 * side)], bar[round(0.9 * side)]
    assert top[1] > top[0] and foot[0] > foot[1]
    assert (pixels[0:40, 0:100] > 215).all(axis=-1).mean() > 0.3  # the score's light box, top left (black text)


def test_overlays_and_arrays_for_a_folder_with_a_broken_file(exported, photos, tmp_path):
    from PIL import Image

    from kdiqa_edge.runtime.files import ImageFiles

    model = QualityModel.load(exported["with"] / "onnx-fp32" / "model.fp32.onnx")
    rows = list(maps.write_maps(model, ImageFiles([photos[0].parent]), tmp_path / "maps", kind="fast"))
    by_name = {Path(row.path).name: row for row in rows}
    assert set(by_name) == {"astronaut.jpg", "broken.jpg", "chelsea.png"}
    assert by_name["broken.jpg"].error and by_name["broken.jpg"].overlay is None
    for name in ("astronaut.jpg", "chelsea.png"):
        row = by_name[name]
        assert row.error is None and row.shape == (2, 2)
        assert row.score == pytest.approx(model.score(photos[0].parent / name), abs=0)  # what `score` prints
        values = np.load(row.array)
        assert np.array_equal(values, maps.score_map(model, photos[0].parent / name))
        with Image.open(row.overlay) as overlay:
            assert overlay.format == "PNG" and overlay.width > overlay.height >= maps.OVERLAY_SIDE
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == [
        "astronaut.map.npy", "astronaut.map.png", "chelsea.map.npy", "chelsea.map.png", "maps.csv"]

    patches = maps.quality_map(model, photos[0], "patches")
    assert patches.values.shape == (maps.PATCH_GRID,) * 2 and ((patches.values >= 1) & (patches.values <= 5)).all()
    assert patches.score == model.score(photos[0])
    left, top, right, bottom = patches.region  # the centre square of a 4:3 photo
    assert (top, bottom) == (0.0, 1.0) and right - left == pytest.approx(0.75, abs=0.01)

    plain = QualityModel.load(exported["without"] / "onnx-fp32" / "model.fp32.onnx")
    with pytest.raises(ConfigError, match="--with-map"):
        maps.score_map(plain, photos[0], "fast")
    assert maps.score_map(plain, photos[0], "patches").shape == (maps.PATCH_GRID,) * 2
    with pytest.raises(ConfigError, match="unknown map kind"):
        maps.MapWriter(plain, tmp_path, "nope")


def test_score_map_through_the_cli(exported, photos, tmp_path, capsys):
    model = exported["with"] / "onnx-fp32" / "model.fp32.onnx"
    code, out, err = run_cli(["score", model, photos[0].parent, "--map", tmp_path / "maps"], capsys)
    assert code == 0 and "Traceback" not in err and "broken.jpg\terror:" in out and "2 fast maps in" in err
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == [
        "astronaut.map.npy", "astronaut.map.png", "chelsea.map.npy", "chelsea.map.png", "maps.csv"]
    # QualityModel.score_map gives what the CLI wrote
    written = np.load(tmp_path / "maps" / "astronaut.map.npy")
    assert np.array_equal(QualityModel.load(model).score_map(photos[0]), written)
    code, _, err = run_cli(["score", exported["without"] / "onnx-fp32" / "model.fp32.onnx", photos[0],
                            "--map", tmp_path / "m2"], capsys)
    assert code == 2 and "--with-map" in err and "Traceback" not in err
    # bench reports the latency the map adds, as its export measured it
    code, out, err = run_cli(["bench", model, "--no-accuracy", "--batch-sizes", "1", "--runs", "3", "--warmup", "1",
                              "--json-out", tmp_path / "bench.json"], capsys)
    row = json.loads((tmp_path / "bench.json").read_text())["results"][0]
    added = _entry(exported["with"])["details"]["map"]["latency"]["added_ms"]
    assert code == 0 and row["map_added_ms"] == pytest.approx(added)
    assert f"onnx-fp32: has the score_map output (export --with-map), which adds {added:.2f} ms" in out + err


def test_map_names_hold_across_writers_odd_names_and_rows_score_out_skipped(exported, photos, tmp_path, capsys):
    """Two writers into one folder never take one name (each reads the other's maps.csv lines under its lock);
    a name that is not UTF-8 reads back from maps.csv; --map with --out maps the files --out skips too."""
    import os
    import shutil

    from kdiqa_edge.runtime.maps import MAP_INDEX, MapWriter

    model = QualityModel.load(exported["with"] / "onnx-fp32" / "model.fp32.onnx")
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(photos[0], tmp_path / folder / "same.jpg")
    first, second = MapWriter(model, tmp_path / "m"), MapWriter(model, tmp_path / "m")  # both open, both empty
    assert first.write(tmp_path / "a" / "same.jpg").array.endswith("same.map.npy")
    assert second.write(tmp_path / "b" / "same.jpg").array.endswith("same-2.map.npy")
    assert first.write(tmp_path / "b" / "same.jpg").array.endswith("same-2.map.npy")  # the other's claim, read
    with open(tmp_path / "m" / MAP_INDEX, newline="") as handle:
        assert [row[1] for row in csv.reader(handle)] == ["overlay", "same.map.png", "same-2.map.png"]

    odd = os.fsencode(tmp_path / "odd")
    os.mkdir(odd)
    shutil.copy(photos[0], os.path.join(odd, b"caf\xe9.jpg"))
    command = ["score", exported["with"] / "onnx-fp32" / "model.fp32.onnx", os.fsdecode(odd), "--map",
               tmp_path / "mo", "--out", tmp_path / "odd.csv", "-q"]  # rows in a file: capsys reads UTF-8
    assert run_cli(command, capsys)[0] == 0
    (tmp_path / "odd.csv").unlink()
    for suffix in (".kdiqa.json", ".kdiqa.index"):
        (tmp_path / f"odd.csv{suffix}").unlink()
    code, _, err = run_cli(command, capsys)  # before: "maps.csv cannot be read ('utf-8' codec ...)"
    assert code == 0 and "1 fast maps in" in err and "cannot be read" not in err, err
    assert len((tmp_path / "mo" / MAP_INDEX).read_bytes().splitlines()) == 2  # the header and one image

    out = tmp_path / "scores.csv"
    base = ["score", exported["with"] / "onnx-fp32" / "model.fp32.onnx", photos[0].parent, "--out", out, "-q"]
    run_cli(base, capsys)
    code, _, err = run_cli([*base, "--map", tmp_path / "ms"], capsys)
    assert "3 skipped" in err and "2 fast maps in" in err, err  # the broken file has no map
    assert sorted(p.name for p in (tmp_path / "ms").glob("*.map.npy")) == ["astronaut.map.npy", "chelsea.map.npy"]


def test_maps_without_torch(exported, photos, tmp_path):
    blocker = tmp_path / "no_torch"
    (blocker / "torch").mkdir(parents=True)
    (blocker / "torch" / "__init__.py").write_text('raise ImportError("No module named torch (blocked by the test)")\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    code = (
        "import sys, json\n"
        "from kdiqa_edge.runtime import QualityModel\n"
        "from kdiqa_edge.runtime import maps\n"
        f"model = QualityModel.load({str(exported['with'] / 'onnx-fp32' / 'model.fp32.onnx')!r})\n"
        f"files = {[str(p) for p in photos]!r}\n"
        "fast = maps.score_map(model, files[0], 'fast')\n"
        "patches = maps.score_map(model, files[0], 'patches')\n"
        f"rows = list(maps.write_maps(model, files, {str(tmp_path / 'out')!r}, 'patches'))\n"
        "assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules if sys.modules[m]), 'torch'\n"
        "print(json.dumps({'fast': fast.tolist(), 'patches': list(patches.shape),\n"
        "                  'rows': [[r.path, r.error, r.shape and list(r.shape)] for r in rows]}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    model = QualityModel.load(exported["with"] / "onnx-fp32" / "model.fp32.onnx")
    assert np.array_equal(np.asarray(found["fast"], np.float32), maps.score_map(model, photos[0], "fast"))
    assert found["patches"] == [maps.PATCH_GRID] * 2
    errors = {Path(path).name: error for path, error, _ in found["rows"]}
    assert errors["broken.jpg"] and errors["astronaut.jpg"] is None and errors["chelsea.png"] is None
    assert (tmp_path / "out" / "chelsea.map.png").is_file() and (tmp_path / "out" / "chelsea.map.npy").is_file()


def test_with_map_and_auto_is_one_line(checkpoint, capsys):
    code, _, err = run_cli(["export", checkpoint, "--precision", "auto", "--with-map"], capsys)
    assert code != 0 and "--with-map with --precision auto" in err and "Traceback" not in err
