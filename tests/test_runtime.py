"""The torch-free runtime: preprocessing parity with open_clip, the QualityModel API, backend refusals."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_runtime_helpers import SIZE, export_tiny_onnx, real_photos, tiny_score_model

from kdiqa_edge import artifact
from kdiqa_edge.errors import CheckpointError, MissingDependency
from kdiqa_edge.preprocess import PreprocessSpec, load_preprocessed, normalize
from kdiqa_edge.runtime import QualityModel, backend_kind
from kdiqa_edge.runtime.backends import check_engine_header, engine_meta


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return real_photos(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    export_tiny_onnx(folder / "float.onnx")
    export_tiny_onnx(folder / "uint8.onnx", uint8_nhwc=True)
    export_tiny_onnx(folder / "batch1.onnx", fixed_batch=1)
    export_tiny_onnx(folder / "foreign.onnx", metadata=False)
    return folder


def _clip_transform(size):
    from open_clip.transform import image_transform

    return image_transform(size, is_train=False, mean=PreprocessSpec().mean, std=PreprocessSpec().std)


def _grey_levels(ours: np.ndarray, theirs: np.ndarray, spec: PreprocessSpec) -> float:
    """Max |difference| of two normalized NCHW images, in 0..255 pixel units."""
    std = np.asarray(spec.std, np.float32).reshape(3, 1, 1)
    return float(np.abs((ours - theirs) * std * 255.0).max())


@pytest.mark.parametrize("draft", [False, True])
def test_preprocessing_matches_open_clip_transform_on_real_photos(photos, draft):
    spec = PreprocessSpec(size=224, draft=draft)
    transform = _clip_transform(224)
    worst = 0.0
    for path in photos:
        ours = normalize(load_preprocessed(path, spec)[None], spec)[0]
        with Image.open(path) as img:
            if draft and img.format == "JPEG":
                img.draft("RGB", (224, 224))  # the same reduced-scale decode the image cache uses
            theirs = transform(img.convert("RGB")).numpy()
        assert ours.shape == theirs.shape == (3, 224, 224)
        worst = max(worst, _grey_levels(ours, theirs, spec))
    assert worst <= 1.0, f"max difference {worst:.3f} grey levels"


def test_runtime_input_is_the_open_clip_input_from_metadata_alone(photos, onnx_dir):
    model = QualityModel.load(onnx_dir / "float.onnx")
    assert model.preprocess.size == SIZE  # read from the artifact, not a default
    transform = _clip_transform(SIZE)
    for path in photos[:4]:
        ours = model.prepare(model.load_image(path)[None])[0]
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft("RGB", (SIZE, SIZE))
            theirs = transform(img.convert("RGB")).numpy()
        assert _grey_levels(ours, theirs, model.preprocess) <= 1.0


def test_scores_match_the_torch_model_for_every_input_kind(photos, onnx_dir):
    import torch

    model = QualityModel.load(onnx_dir / "float.onnx")
    pixels = np.stack([load_preprocessed(p, model.preprocess) for p in photos[:5]])
    with torch.no_grad():
        expected = tiny_score_model()(torch.from_numpy(normalize(pixels, model.preprocess))).numpy()
    np.testing.assert_allclose(model.score(photos[:5]), expected, atol=1e-5)
    np.testing.assert_allclose(model.score(pixels), expected, atol=1e-5)  # NHWC uint8 at model size
    assert model.score(photos[0]) == pytest.approx(expected[0], abs=1e-5)
    assert model.score(str(photos[1])) == pytest.approx(expected[1], abs=1e-5)
    with Image.open(photos[2]) as img:  # a PIL image (full decode: close to, not equal to, the draft path)
        assert 1.0 <= model.score(img) <= 5.0
    png = photos[1]  # PNG: no draft mode, so a PIL image and an array are the same pixels as the file
    assert png.suffix == ".png"
    with Image.open(png) as img:
        assert model.score(img) == pytest.approx(expected[1], abs=1e-5)
        array = np.asarray(img.convert("RGB"))
    assert model.score(array) == pytest.approx(expected[1], abs=1e-5)
    assert model.score(array.astype(np.float32) / 255.0) == pytest.approx(expected[1], abs=1e-4)
    assert model.score([]).shape == (0,)


def test_uint8_and_fixed_batch_artifacts_agree_with_the_float_one(photos, onnx_dir):
    reference = QualityModel.load(onnx_dir / "float.onnx").score(photos)
    uint8 = QualityModel.load(onnx_dir / "uint8.onnx")
    assert uint8.info.input.dtype == "uint8" and uint8.info.input.layout == "NHWC"
    np.testing.assert_allclose(uint8.score(photos), reference, atol=1e-5)
    fixed = QualityModel.load(onnx_dir / "batch1.onnx")
    assert fixed.backend.fixed_batch == 1
    np.testing.assert_allclose(fixed.score(photos, batch_size=4), reference, atol=1e-5)  # split into batches of 1


def test_score_files_reports_bad_images_in_order_and_carries_on(photos, onnx_dir, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    paths = [photos[0], bad, photos[1], tmp_path / "missing.jpg", empty, photos[2]]
    model = QualityModel.load(onnx_dir / "float.onnx")
    results = list(model.score_files(paths, batch_size=2))
    assert [r.path for r in results] == [str(p) for p in paths]
    assert [r.error is None for r in results] == [True, False, True, False, False, True]
    assert "unidentified" in results[1].error and "not found" in results[3].error and "empty" in results[4].error
    good = [r.score for r in results if r.error is None]
    np.testing.assert_allclose(good, model.score(photos[:3]), atol=1e-6)


def test_artifact_without_metadata_is_refused(onnx_dir):
    with pytest.raises(CheckpointError, match="no kdiqa_edge metadata"):
        QualityModel.load(onnx_dir / "foreign.onnx")


def test_onnx_session_spinning_options_reach_onnxruntime(onnx_dir):
    def entries(model):  # the config entries the session was opened with (an unset key raises)
        options, found = model.backend.session.get_session_options(), {}
        for key in ("session.intra_op.allow_spinning", "session.force_spinning_stop"):
            try:
                found[key] = options.get_session_config_entry(key)
            except RuntimeError:
                pass
        return found

    served = QualityModel.load(onnx_dir / "float.onnx", threads=2)
    assert served.backend.spinning is True and served.backend.stop_spinning is False
    assert entries(served) == {}  # ORT's defaults: spinning, and spinning on between runs
    timed = QualityModel.load(onnx_dir / "float.onnx", threads=2, stop_spinning=True)
    assert entries(timed) == {"session.force_spinning_stop": "1"} and timed.backend.stop_spinning is True
    off = QualityModel.load(onnx_dir / "float.onnx", threads=2, spinning=False, stop_spinning=True)
    assert entries(off) == {"session.intra_op.allow_spinning": "0", "session.force_spinning_stop": "1"}
    x = timed.prepare(np.zeros((1, timed.preprocess.size, timed.preprocess.size, 3), np.uint8))
    assert np.allclose(timed.run(x), served.run(x), atol=1e-6)


def test_backend_chosen_by_artifact_kind(tmp_path, onnx_dir):
    assert backend_kind(onnx_dir / "float.onnx") == "onnx"
    assert backend_kind(tmp_path / "m.engine") == "tensorrt" and backend_kind(tmp_path / "m.plan") == "tensorrt"
    assert backend_kind(tmp_path / "m.mlpackage") == "coreml"
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.json").write_text("{}")
    assert backend_kind(tmp_path / "ckpt") == "torch"
    (tmp_path / "photo.jpg").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not a model"):
        backend_kind(tmp_path / "photo.jpg")


def _engine_header(**extra):
    meta = artifact.encode({"format": "1", "preprocess": PreprocessSpec().to_dict(), "precision": "fp16",
                            "target": "tensorrt"})
    return {**meta, "tensorrt_version": "10.3.0", "gpu": {"name": "Orin", "compute_capability": "8.7"}, **extra}


def test_engine_header_is_checked_against_tensorrt_version_and_gpu(tmp_path):
    header = _engine_header()
    assert engine_meta(header)["precision"] == "fp16"
    check_engine_header(tmp_path, header, "10.3.0", {"name": "Orin", "compute_capability": "8.7"})
    with pytest.raises(CheckpointError, match="TensorRT 10.3.0, this machine has TensorRT 10.7.0"):
        check_engine_header(tmp_path, header, "10.7.0", {"name": "Orin", "compute_capability": "8.7"})
    with pytest.raises(CheckpointError, match="rebuild it here"):
        check_engine_header(tmp_path, header, "10.3.0", {"name": "H100", "compute_capability": "9.0"})
    with pytest.raises(CheckpointError, match="does not record"):
        check_engine_header(tmp_path, {k: v for k, v in header.items() if k != "tensorrt_version"}, "10.3.0", {})


def test_engine_file_refused_cleanly_where_tensorrt_is_missing(tmp_path):
    path = artifact.write_engine_file(tmp_path / "m.fp16.engine", _engine_header(), b"\x00" * 16)
    with pytest.raises(MissingDependency) as info:
        QualityModel.load(path)
    assert "tensorrt" in str(info.value).lower()
    foreign = tmp_path / "bare.engine"
    foreign.write_bytes(b"\x01\x02 trtexec output")
    with pytest.raises(CheckpointError, match="not a kdiqa-edge engine"):
        QualityModel.load(foreign)


@pytest.mark.skipif(__import__("sys").platform == "darwin", reason="CoreML runs on macOS: this checks the refusal")
def test_coreml_refused_off_macos(tmp_path):
    (tmp_path / "model.fp16.mlpackage").mkdir()  # a package is a folder; a missing one is "no such file"
    with pytest.raises(MissingDependency, match="macOS"):
        QualityModel.load(tmp_path / "model.fp16.mlpackage")


def test_checkpoint_and_run_dir_scored_through_torch(photos, tmp_path):
    torch = pytest.importorskip("torch")
    from kdiqa_edge.models import QualityHead, save_checkpoint
    from kdiqa_edge.models.student import create_student

    torch.manual_seed(0)
    head = QualityHead(torch.nn.functional.normalize(torch.randn(5, 32), dim=-1), 14.3)
    student = create_student("test_resnet", head, PreprocessSpec(size=SIZE), pretrained=False).eval()
    save_checkpoint(student, tmp_path / "run" / "checkpoints" / "best")
    for path in (tmp_path / "run", tmp_path / "run" / "checkpoints" / "best"):
        model = QualityModel.load(path, provider="cpu")
        assert model.backend.name == "torch" and model.info.arch == "test_resnet"
        pixels = np.stack([load_preprocessed(p, model.preprocess) for p in photos[:3]])
        with torch.no_grad():
            expected = student(torch.from_numpy(normalize(pixels, model.preprocess))).numpy()
        np.testing.assert_allclose(model.score(photos[:3]), expected, atol=1e-5)
    meta = json.loads((tmp_path / "run" / "checkpoints" / "best" / "model.json").read_text())
    assert meta["preprocess"]["size"] == SIZE


def _score_cli(args):
    from typer.testing import CliRunner

    from kdiqa_edge.cli import app

    result = CliRunner().invoke(app, ["score", *map(str, args)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def _folder_of_every_kind(photos, root):
    """Photos, broken and empty files, dangling symlinks, symlink loops, a FIFO, a folder named like an image,
    a sidecar: (folder, {name: expected error fragment or None for a score})."""
    import os
    import shutil

    folder = root / "photos"
    (folder / "album.jpg").mkdir(parents=True)  # a folder, named like an image: walked
    shutil.copy(photos[0], folder / "a.jpg")
    shutil.copy(photos[1], folder / "album.jpg" / "b.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("a sidecar: counted, not listed")
    os.symlink("nowhere.jpg", folder / "gone.jpg")
    os.symlink("missing.png", folder / "gone-link")  # no suffix on the link, an image's on its target
    os.symlink(".", folder / "loop")  # the folder inside itself
    os.symlink("self.jpg", folder / "self.jpg")  # ELOOP
    os.mkfifo(folder / "pipe.jpg")  # opening it would block forever
    expected = {"a.jpg": None, "album.jpg/b.png": None, "broken.jpg": "not an image", "empty.png": "empty file",
                "gone.jpg": "dangling symlink (to nowhere.jpg", "gone-link": "dangling symlink (to missing.png",
                "loop": "already scanned", "self.jpg": "symlink loop", "pipe.jpg": "not a regular file"}
    return folder, expected


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="symlinks and FIFOs: POSIX")
def test_score_on_a_folder_gives_every_file_a_row_and_a_summary(photos, onnx_dir, tmp_path):
    folder, expected = _folder_of_every_kind(photos, tmp_path)
    result = _score_cli([onnx_dir / "float.onnx", folder, "--format", "csv"])
    assert result.exit_code == 0 and "Traceback" not in result.output
    rows = list(csv.DictReader(result.stdout.splitlines()))
    got = {str(Path(r["image"]).relative_to(folder)): r for r in rows}
    assert sorted(got) == sorted(expected)
    for name, error in expected.items():
        if error is None:
            assert not got[name]["error"] and 1.0 <= float(got[name]["score"]) <= 5.0, name
        else:
            assert error in got[name]["error"] and got[name]["score"] == "", (name, got[name]["error"])
    failed = sum(e is not None for e in expected.values())
    assert f"2 scored, {failed} unreadable in " in result.stderr
    assert "images/s; 1 other files ignored (no image suffix)" in result.stderr

    lines = [json.loads(line) for line in _score_cli([onnx_dir / "float.onnx", folder, "--json"]).stdout.splitlines()]
    assert sorted(line["image"] for line in lines) == sorted(r["image"] for r in rows)


def test_permission_errors_get_rows_even_as_root(photos, onnx_dir, tmp_path, monkeypatch):
    """Simulated (root reads through chmod 000): a folder that cannot be listed and a file that cannot be
    opened, as PermissionError from os.scandir and open, each get a row and count as unreadable."""
    import os
    import shutil

    from PIL import Image as PILImage

    folder = tmp_path / "photos"
    (folder / "private").mkdir(parents=True)
    shutil.copy(photos[0], folder / "a.jpg")
    shutil.copy(photos[1], folder / "private" / "b.jpg")
    shutil.copy(photos[2], folder / "denied.jpg")
    scandir, open_image = os.scandir, PILImage.open

    def scandir_denied(path="."):
        if Path(path).name == "private":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    def open_denied(fp, *args, **kwargs):
        if Path(str(fp)).name == "denied.jpg":
            raise PermissionError(13, "Permission denied", str(fp))
        return open_image(fp, *args, **kwargs)

    monkeypatch.setattr(os, "scandir", scandir_denied)
    monkeypatch.setattr(PILImage, "open", open_denied)
    result = _score_cli([onnx_dir / "float.onnx", folder, "--format", "csv"])
    assert result.exit_code == 0
    errors = {Path(r["image"]).name: r["error"] for r in csv.DictReader(result.stdout.splitlines())}
    assert errors == {"a.jpg": "", "denied.jpg": "permission denied",
                      "private": "cannot list the folder: permission denied"}
    assert "1 scored, 2 unreadable" in result.stderr


def _permissions_bind(folder: Path) -> bool:
    """Whether this process is refused a chmod 000 file (root, or CAP_DAC_OVERRIDE, reads it anyway)."""
    import os

    probe = folder / "probe"
    probe.write_bytes(b"x")
    os.chmod(probe, 0)
    try:
        probe.read_bytes()
    except PermissionError:
        return True
    finally:
        os.chmod(probe, 0o600)
        probe.unlink()
    return False


def test_chmod_000_files_and_folders_get_rows(photos, onnx_dir, tmp_path):
    import os

    if not _permissions_bind(tmp_path):
        pytest.skip("this process reads a chmod 000 file anyway (root, or CAP_DAC_OVERRIDE); the permission "
                    "errors themselves are simulated in test_permission_errors_get_rows_even_as_root")
    folder = tmp_path / "photos"
    (folder / "locked").mkdir(parents=True)
    (folder / "locked" / "c.jpg").write_bytes(photos[0].read_bytes())
    (folder / "secret.jpg").write_bytes(photos[0].read_bytes())
    (folder / "a.jpg").write_bytes(photos[1].read_bytes())
    os.chmod(folder / "secret.jpg", 0)
    os.chmod(folder / "locked", 0)
    try:
        result = _score_cli([onnx_dir / "float.onnx", folder, "--format", "csv"])
    finally:
        os.chmod(folder / "locked", 0o755)
    errors = {Path(r["image"]).name: r["error"] for r in csv.DictReader(result.stdout.splitlines())}
    assert errors == {"a.jpg": "", "locked": "cannot list the folder: permission denied",
                      "secret.jpg": "permission denied"}
    assert "1 scored, 2 unreadable" in result.stderr
