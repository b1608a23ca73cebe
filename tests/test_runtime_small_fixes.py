"""Small runtime fixes: an export OUT folder names the artifacts in its subfolders, a checkpoint refuses a
--provider torch cannot run on, and torch-backed runtimes take read-only arrays without torch's warning."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run_cli
from PIL import Image

from kdiqa_edge.errors import ConfigError
from kdiqa_edge.runtime import QualityModel


def _image(tmp_path: Path) -> Path:
    path = tmp_path / "x.png"
    Image.fromarray(np.full((40, 50, 3), 128, np.uint8)).save(path)
    return path


def _read_only(array: np.ndarray) -> np.ndarray:
    view = np.frombuffer(array.tobytes(), array.dtype).reshape(array.shape)  # what np.asarray(PIL image) gives
    assert not view.flags.writeable
    return view


def _export_out(out: Path) -> list[Path]:
    """An export OUT folder as `kdiqa-edge export` leaves it: manifest.json, one subfolder per export."""
    files = {"onnx-fp32": ["model.fp32.onnx"], "openvino-int8": ["model.int8.xml", "model.int8.bin"]}
    exports = {}
    for label, names in files.items():
        (out / label).mkdir(parents=True)
        for name in names:
            (out / label / name).write_bytes(b"x")
        (out / label / "export.log").write_text("log\n")
        exports[label] = {"files": [{"path": f"{label}/{name}", "bytes": 1, "sha256": "-"} for name in names],
                          "log": f"{label}/export.log"}
    (out / "manifest.json").write_text(json.dumps({"format": "kdiqa-edge-export/1", "exports": exports}))
    return [out / "onnx-fp32" / "model.fp32.onnx", out / "openvino-int8" / "model.int8.xml"]


def test_an_export_folder_names_the_artifacts_in_its_subfolders(tmp_path, capsys):
    out = tmp_path / "exp"
    artifacts = _export_out(out)
    with pytest.raises(ConfigError) as error:
        QualityModel.load(out)
    message = str(error.value)
    assert "export directory" in message and "\n" not in message
    assert message.endswith(", ".join(str(p) for p in artifacts))  # runnable ones: no .bin, no log
    code, stdout, stderr = run_cli(["score", out, _image(tmp_path)], capsys)
    lines = stderr.strip().splitlines()
    assert code == 2 and not stdout and len(lines) == 1 and str(artifacts[0]) in lines[0], stderr
    # a manifest that is not readable JSON: the subfolders are looked through instead
    (out / "manifest.json").write_text("{torn")
    with pytest.raises(ConfigError, match="model.fp32.onnx"):
        QualityModel.load(out)
    # nothing to run: said so, not an empty list
    for path in artifacts:
        path.unlink()
    with pytest.raises(ConfigError, match="without an artifact"):
        QualityModel.load(out)


@pytest.mark.parametrize("provider", ["foo", "gpu"])
def test_a_checkpoint_refuses_a_provider_torch_has_not(tmp_path, capsys, provider):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "model.json").write_text("{}")  # refused before torch loads anything
    with pytest.raises(ConfigError) as error:
        QualityModel.load(checkpoint, provider=provider)
    message = str(error.value)
    assert f"--provider {provider} is not one" in message and "cpu, cuda or auto" in message
    code, stdout, stderr = run_cli(["score", checkpoint, _image(tmp_path), "--provider", provider], capsys)
    lines = stderr.strip().splitlines()
    assert code == 2 and not stdout and len(lines) == 1 and "cpu, cuda or auto" in lines[0], stderr


def test_a_checkpoint_runs_tensorrt_as_cuda(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "model.json").write_text("{}")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this machine's case, on any machine
    with pytest.raises(ConfigError, match=r"--provider tensorrt asked for \(a checkpoint runs on cuda for it\), "
                                          "but torch sees no CUDA device"):
        QualityModel.load(checkpoint, provider="tensorrt")


def _no_user_warnings(monkeypatch, call):
    """call() emits no UserWarning, and what it hands torch.from_numpy is writable: torch warns of a read-only
    array once per process only, so an earlier test may have used up the warning."""
    import torch

    handed = []
    from_numpy = torch.from_numpy
    monkeypatch.setattr(torch, "from_numpy", lambda array: handed.append(array.flags.writeable) or from_numpy(array))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    monkeypatch.undo()
    assert not [w for w in caught if issubclass(w.category, UserWarning)], [str(w.message) for w in caught]
    assert handed and all(handed)
    return result


@pytest.fixture(scope="module")
def tiny_pte(tmp_path_factory) -> Path:
    """A uint8 NHWC ExecuTorch program of the tiny score model (its input is the caller's pixels, uncopied)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("executorch")
    from test_runtime_helpers import SIZE, SPEC, tiny_score_model

    from kdiqa_edge import artifact
    from kdiqa_edge.export.executorch import lower

    meta = {"format": artifact.FORMAT_VERSION, "preprocess": SPEC.to_dict(), "outputs": ["score"],
            "input": {"name": "image", "dtype": "uint8", "layout": "NHWC", "size": SIZE, "normalized": False},
            "source": {"kind": "student", "arch": "tiny", "pretrained": False}, "precision": "fp32",
            "target": "executorch", "batch": 1}
    example = torch.randint(0, 256, (1, SIZE, SIZE, 3), dtype=torch.uint8)
    with warnings.catch_warnings():  # executorch's own deprecation notices while it lowers
        warnings.simplefilter("ignore")
        program, _ = lower(tiny_score_model(uint8_nhwc=True), example, meta, "tiny")
    path = tmp_path_factory.mktemp("tiny-pte") / "model.fp32.pte"
    path.write_bytes(program)
    return path


def test_a_pte_scores_read_only_pixels_without_torch_warning(tiny_pte, monkeypatch):
    from test_runtime_helpers import SIZE

    model = QualityModel.load(tiny_pte)
    pixels = np.random.default_rng(0).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    scores = _no_user_warnings(monkeypatch, lambda: model.predict(_read_only(pixels)))
    np.testing.assert_array_equal(scores, model.predict(pixels))


def test_a_checkpoint_runs_read_only_input_without_torch_warning(student_checkpoints, monkeypatch):
    pytest.importorskip("torch")
    checkpoint = student_checkpoints("small-fixes", {"student": "test_resnet"})["student"]
    model = QualityModel.load(checkpoint, provider="cpu")
    size = model.preprocess.size
    x = model.prepare(np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8))
    scores = _no_user_warnings(monkeypatch, lambda: model.run(_read_only(x)))
    np.testing.assert_allclose(scores, model.run(x), atol=1e-6, rtol=0)
