"""`score`, the Python API and the runtimes, third audit (the using side): each test fails on the code before
its fix."""
# ruff: noqa: F811 - the tests take the imported `model` fixture as a parameter

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run_cli
from test_runtime_helpers import noise_jpegs
from test_score_audit2 import model  # noqa: F401 - the tiny ONNX model fixture (pytest injects it)

from kdiqa_edge.runtime.output import read_rows


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return noise_jpegs(tmp_path_factory.mktemp("audit3-photos"), 4)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_out_skips_a_file_named_another_way_and_a_changed_one_keeps_one_row(model, photos, tmp_path, capsys,
                                                                            monkeypatch, suffix):
    """/abs/dir, then dir from its parent, then through a symlinked folder: a row per file, as first typed."""
    folder = shutil.copytree(photos, tmp_path / "my photos")
    (tmp_path / "link").symlink_to(folder)
    out = tmp_path / f"scores{suffix}"
    assert run_cli(["score", model, folder, "--out", out, "-q"], capsys)[0] == 0
    first = {row["image"]: row["score"] for row in read_rows(out)}
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["score", model, "my photos", "link", "--out", out, "-q"], capsys)
    assert code == 0 and "0 scored" in err and "8 skipped" in err, err
    assert {row["image"]: row["score"] for row in read_rows(out)} == first
    changed = folder / "p01.jpg"
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    code, _, err = run_cli(["score", model, "link", "--out", out, "-q"], capsys)
    assert code == 0 and "1 scored" in err, err
    rows = list(read_rows(out))
    assert sorted(row["image"] for row in rows) == sorted(first)  # the changed file's row replaced, same path


def _openvino_ir(onnx_path: Path, folder: Path) -> Path:
    """The tiny ONNX model as an OpenVINO IR with its metadata (what export --target openvino writes)."""
    ov = pytest.importorskip("openvino")
    import onnx

    from kdiqa_edge import artifact
    from kdiqa_edge.runtime.openvino import write_meta

    meta = artifact.decode({entry.key: entry.value for entry in onnx.load(str(onnx_path)).metadata_props})
    ir = ov.convert_model(str(onnx_path))
    write_meta(ir, {**meta, "target": "openvino"})
    ov.save_model(ir, str(folder / "a.xml"), compress_to_fp16=False)
    return folder / "a.xml"


def test_one_openvino_model_scores_right_from_two_threads(model, tmp_path):
    """One infer request served both threads: 'Infer Request is busy', or a thread read the other's scores."""
    import threading

    from kdiqa_edge import QualityModel

    quality_model = QualityModel.load(_openvino_ir(model, tmp_path))
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (8, 64, 64, 3), dtype=np.uint8) for _ in range(2)]
    expected = [quality_model.predict(batch) for batch in batches]
    wrong = []

    def score(which: int) -> None:
        for _ in range(150):
            try:
                if not np.array_equal(quality_model.predict(batches[which]), expected[which]):
                    wrong.append("another thread's scores")
            except Exception as exc:  # noqa: BLE001 - what the test reports
                wrong.append(str(exc))

    threads = [threading.Thread(target=score, args=(which,)) for which in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not wrong, set(wrong)


def test_text_rows_stay_one_line_per_file_with_a_newline_or_tab_in_a_name(model, photos, tmp_path, capsys):
    folder = tmp_path / "odd"
    folder.mkdir()
    for name in ("new\nline.jpg", "tab\there.jpg"):
        shutil.copy(photos / "p00.jpg", folder / name)
    code, out, _ = run_cli(["score", model, folder], capsys)
    assert code == 0
    lines = out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [f"{folder}/new\\nline.jpg", f"{folder}/tab\\there.jpg"]
    assert len({line.split("\t")[1] for line in lines}) == 1  # one photo, one score


def test_an_image_files_bytes_score_as_the_file(model, photos):
    """bytes were iterated as a list of ints: 'cannot score a int'."""
    from kdiqa_edge import QualityModel

    quality_model = QualityModel.load(model)
    path = photos / "p01.jpg"
    data = path.read_bytes()
    assert quality_model.score(data) == quality_model.score(path)
    assert quality_model.score([data, photos / "p02.jpg"]).tolist() == \
        quality_model.score([path, photos / "p02.jpg"]).tolist()
    assert np.array_equal(quality_model.score_map(data, "patches"), quality_model.score_map(path, "patches"))


def test_a_folder_of_avif_jfif_and_heic_photos_gets_a_row_each(model, tmp_path, capsys):
    """They were 'other files ignored (no image suffix)': nothing scored, exit 1, no word of HEIC's plugin."""
    from PIL import Image, features

    pixels = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.jfif", format="JPEG")
    if features.check("avif"):
        Image.fromarray(pixels).save(tmp_path / "b.avif")
    (tmp_path / "c.heic").write_bytes(b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + bytes(64))  # an iPhone's header
    code, out, err = run_cli(["score", model, tmp_path, "--format", "json"], capsys)
    rows = {Path(row["image"]).name: row for row in map(json.loads, out.splitlines())}
    assert code == 0 and "ignored" not in err, err
    assert rows["a.jfif"]["score"] is not None and ("b.avif" in rows) == features.check("avif")
    if "pillow_heif" not in sys.modules:
        assert "pillow-heif" in rows["c.heic"]["error"]


def test_a_rerun_where_every_file_failed_before_still_exits_1(model, tmp_path, capsys):
    """The second run skipped the error rows and exited 0, its summary calling them 'scored before'."""
    (tmp_path / "empty.jpg").write_bytes(b"")
    out = tmp_path / "scores.csv"
    assert run_cli(["score", model, tmp_path / "empty.jpg", "--out", out, "-q"], capsys)[0] == 1
    code, _, err = run_cli(["score", model, tmp_path / "empty.jpg", "--out", out, "-q"], capsys)
    assert code == 1 and "no image was scored" in err and "1 of them unreadable then" in err, err


def test_score_files_searches_a_folder_as_score_does(model, photos):
    """A folder was one result: 'a folder, not an image file'."""
    from kdiqa_edge import QualityModel

    quality_model = QualityModel.load(model)
    files = sorted(photos.iterdir())
    by_folder = [(r.path, r.score, r.error) for r in quality_model.score_files([photos])]
    by_file = [(str(path), r.score, None) for path, r in zip(files, quality_model.score_files(files))]
    assert by_folder == by_file


def test_demo_refuses_an_unknown_student_before_the_teacher_trains(tmp_path, capsys):
    """A typo in --students failed after the teacher's fine-tune (a minute with --quick, far more without)."""
    code, _, err = run_cli(["demo", "--quick", "--students", "resnet18,nope_net", "--out", tmp_path / "demo"],
                           capsys)
    assert code == 2 and "unknown timm model 'nope_net'" in err, err
    assert not (tmp_path / "demo" / "teacher").exists()


def test_a_map_folder_inside_the_scored_folder_is_not_scored(model, photos, tmp_path, capsys):
    """Before: the next `score` of the folder scored the overlays of the run before as photos."""
    folder = shutil.copytree(photos, tmp_path / "photos")
    names = sorted(p.name for p in photos.iterdir())
    command = ["score", model, folder, "--map", folder / "maps", "--map-kind", "patches"]
    for run in range(2):
        code, out, err = run_cli(command, capsys)
        assert code == 0 and ("not searched for images" in err) == (run == 1)  # met by the second walk only
        assert sorted(Path(line.split("\t")[0]).name for line in out.splitlines()) == names
    assert len(list((folder / "maps").glob("*.map.png"))) == len(names)
    code, out, _ = run_cli(["score", model, folder / "maps"], capsys)  # named directly, it is searched
    assert code == 0 and len(out.splitlines()) == len(names)


def test_a_quoted_pattern_is_expanded_as_ultralytics_sources_are(model, photos, tmp_path, capsys):
    """Before: 'photos/*.jpg' (quoted, or on a shell that expands nothing) was 'no such file or directory'."""
    folder = shutil.copytree(photos, tmp_path / "photos")
    (folder / "sub").mkdir()
    shutil.copy(next(folder.glob("*.jpg")), folder / "sub" / "deep.jpg")
    code, out, err = run_cli(["score", model, str(folder / "*.jpg")], capsys)
    shallow = sorted(p.name for p in folder.glob("*.jpg"))
    assert code == 0 and [Path(line.split("\t")[0]).name for line in out.splitlines()] == shallow
    code, out, _ = run_cli(["score", model, str(folder / "**" / "deep.jpg")], capsys)
    assert code == 0 and [Path(line.split("\t")[0]).name for line in out.splitlines()] == ["deep.jpg"]
    code, out, err = run_cli(["score", model, str(folder / "*.nope")], capsys)
    assert code == 1 and err.strip().splitlines()[-1] == f"error: no file matches: {folder / '*.nope'}"
    assert out == f"{folder / '*.nope'}\terror: no file matches this pattern\n"
