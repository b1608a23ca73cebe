"""Reproducible bytes: the same content gives the same file, whatever process wrote it and whether a run was
killed on the way. (A killed-and-resumed distillation against an uninterrupted one: test_distill.py.)"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kdiqa_edge.io import is_temporary

SAFETENSORS_WRITER = """
import sys
import numpy as np
from safetensors.numpy import save_file

save_file({"b": np.ones(3, np.float32), "a": np.zeros((2, 2), np.float16)}, sys.argv[1],
          metadata={key: key.upper() for key in "kdiqa-edge"})
"""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_safetensors_files_are_the_same_bytes_from_any_process(tmp_path):
    """safetensors keeps its metadata in a HashMap seeded per process; sorted, two processes agree."""
    pytest.importorskip("safetensors")
    from safetensors.numpy import load_file

    from kdiqa_edge.models.checkpoint import read_safetensors_metadata, sort_safetensors_metadata

    paths = [tmp_path / f"{run}.safetensors" for run in range(2)]
    for path in paths:
        subprocess.run([sys.executable, "-c", SAFETENSORS_WRITER, str(path)], check=True, timeout=120)
    assert len({_sha256(p) for p in paths}) == 2  # 8 metadata keys: two processes all but never agree
    for path in paths:
        sort_safetensors_metadata(path)
    assert len({_sha256(p) for p in paths}) == 1
    assert load_file(str(paths[0]))["a"].shape == (2, 2)
    assert read_safetensors_metadata(paths[0]) == {key: key.upper() for key in "kdiqa-edge"}


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    torch = pytest.importorskip("torch")
    pytest.importorskip("open_clip")
    from kdiqa_edge.models import save_checkpoint
    from kdiqa_edge.models.student import create_student
    from kdiqa_edge.models.teacher import load_teacher

    teacher = load_teacher("tiny")
    torch.manual_seed(0)
    model = create_student("test_resnet", teacher.head, teacher.preprocess, pretrained=False)
    return save_checkpoint(model, tmp_path_factory.mktemp("student") / "checkpoint")


KILLED_EXPORT = """
import os, signal, sys
from kdiqa_edge.cli import main
from kdiqa_edge.export.onnx import OnnxTarget

export = OnnxTarget.export
def export_then_die(self, *args, **kwargs):  # the model is staged; its folder is not yet renamed in
    export(self, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
OnnxTarget.export = export_then_die
sys.argv = ["kdiqa-edge", "export", *sys.argv[1:]]
main()
"""


def _files(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): _sha256(p) for p in sorted(out.rglob("*")) if p.is_file()}


def test_a_killed_export_reruns_clean_and_exports_are_the_same_bytes(student, small_synthetic, tmp_path):
    """An export SIGKILLed with its model staged: the re-run (in this process) leaves no temporary, and its
    files have the killed process's sha256."""
    import shutil

    from kdiqa_edge.export import ExportConfig, export_checkpoint

    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", KILLED_EXPORT, str(student), "--target", "onnx", "--precision",
                             "fp32", "--dataset", "synthetic", "--root", str(small_synthetic.root), "--out", str(out)],
                            capture_output=True, text=True, timeout=600, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    left = [p for p in out.iterdir() if is_temporary(p.name)]
    assert {p.name.split(".")[1] for p in left} == {"onnx-fp32", "scratch"}  # staging, library scratch, claims
    assert not (out / "manifest.json").exists()
    staged = next(p for p in left if p.name.startswith(".onnx-fp32.") and p.suffix == ".tmp")
    shutil.copytree(staged, tmp_path / "from-the-killed-process")

    export_checkpoint(student, ExportConfig(target="onnx", precision="fp32"), out, data=small_synthetic,
                      progress=False, log=lambda _: None)
    assert not [p for p in out.rglob("*") if is_temporary(p.name)]
    models = {name: digest for name, digest in _files(tmp_path / "from-the-killed-process").items()
              if name.endswith(".onnx")}  # (a log of the export, if one is written, holds timings)
    assert list(models) == ["model.fp32.onnx"]
    assert {name: digest for name, digest in _files(out / "onnx-fp32").items() if name in models} == models
    manifest = json.loads((out / "manifest.json").read_text())
    assert [f["path"] for f in manifest["exports"]["onnx-fp32"]["files"]] == ["onnx-fp32/model.fp32.onnx"]


def test_coreml_packages_are_canonical(student, tmp_path):
    """coremltools writes the same model in new bytes each time: uuid4 identifiers in Manifest.json, and
    protobuf maps (metadata, MIL attributes) in an order of the process. Canonical: path-derived ids and
    protobuf's deterministic serialization (maps sorted), so any two processes write the same bytes."""
    pytest.importorskip("coremltools")
    from coremltools.proto import Model_pb2

    from kdiqa_edge.export import ExportConfig, coreml
    from kdiqa_edge.export.pipeline import artifact_meta
    from kdiqa_edge.models import load_checkpoint

    model = load_checkpoint(student)
    cfg = ExportConfig(target="coreml", precision="fp16")
    packages = []
    for run in range(2):
        path = tmp_path / f"{run}.mlpackage"
        coreml.convert(model, cfg, artifact_meta(model)).save(str(path))
        packages.append(coreml.canonical_mlpackage(path))
    assert _files(packages[0]) == _files(packages[1])
    spec_file = next(packages[0].rglob("model.mlmodel"))
    spec = Model_pb2.Model()
    spec.ParseFromString(spec_file.read_bytes())
    assert spec_file.read_bytes() == spec.SerializeToString(deterministic=True)
    assert coreml.describe(packages[0])["outputs"] == ["score"]  # coremltools still reads it
