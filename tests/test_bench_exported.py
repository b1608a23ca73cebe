"""The runtime and `kdiqa-edge bench` on real exporter output (kdiqa_edge.export), against the run dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kdiqa_edge.data.spec import DatasetSpec
from kdiqa_edge.preprocess import PreprocessSpec
from kdiqa_edge.runtime import QualityModel


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random-init test_resnet student run dir, exported to ONNX FP32, INT8 and uint8-input FP32."""
    from kdiqa_edge.data.synthetic import generate
    from kdiqa_edge.export import ExportConfig, export_checkpoint
    from kdiqa_edge.models import QualityHead, save_checkpoint
    from kdiqa_edge.models.student import create_student

    folder = tmp_path_factory.mktemp("exported")
    data = DatasetSpec(name="synthetic", root=generate(folder / "synthetic", refs=3, seed=3))
    torch.manual_seed(0)
    head = QualityHead(torch.nn.functional.normalize(torch.randn(5, 32), dim=-1), 14.3)
    student = create_student("test_resnet", head, PreprocessSpec(size=64), pretrained=False).eval()
    run = folder / "distill-test_resnet"
    save_checkpoint(student, run / "checkpoints" / "best")
    common = {"calib": 16, "parity_images": 4, "eval_images": 16, "latency_runs": 2, "threads": 1}
    files = {}
    for label, cfg in (("fp32", ExportConfig(precision="fp32", **common)),
                       ("int8", ExportConfig(precision="int8", **common)),
                       ("uint8", ExportConfig(precision="fp32", input="uint8", layout="NHWC", **common))):
        out = folder / f"export-{label}"
        export_checkpoint(run, cfg, out, data=data, progress=False, log=lambda message: None)
        (files[label],) = sorted((out / f"onnx-{cfg.precision}").glob("*.onnx"))
    return run, files, data


def test_runtime_reads_exporter_metadata_and_matches_the_checkpoint(exported):
    run, files, data = exported
    from kdiqa_edge.data import prepare

    cache, split = prepare(data, PreprocessSpec(size=64), progress=False)
    pixels = np.asarray(cache.images[split.test[:8]])
    reference = QualityModel.load(run).predict(pixels)
    for label in ("fp32", "uint8"):
        model = QualityModel.load(files[label])
        assert model.info.precision == "fp32" and model.info.arch == "test_resnet"
        assert model.preprocess == PreprocessSpec(size=64)
        np.testing.assert_allclose(model.predict(pixels), reference, atol=1e-4)
    assert QualityModel.load(files["uint8"]).info.input.dtype == "uint8"
    int8 = QualityModel.load(files["int8"])
    assert int8.info.precision == "int8"
    assert np.abs(int8.predict(pixels) - reference).max() < 0.5  # quantized: close, not equal


def test_bench_cli_on_exports_against_the_run_dir(exported, tmp_path):
    run, files, data = exported
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "kdiqa_edge", "bench", str(files["fp32"]), str(files["int8"]), "--reference", str(run),
         "--dataset", "synthetic", "--root", str(data.root), "--batch-sizes", "1,4", "--warmup", "1", "--runs", "3",
         "--threads", "1", "--json-out", str(tmp_path / "b.json"), "--markdown", str(tmp_path / "b.md"),
         "--plot", str(tmp_path / "b.png")], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "kdiqa-edge bench" in out.stdout and "onnx-int8" in out.stdout  # rows named by export folder
    report = json.loads((tmp_path / "b.json").read_text())
    rows = report["results"]
    assert [r["format"] for r in rows] == ["PyTorch", "ONNX", "ONNX"] and rows[0]["reference"]
    fp32 = rows[1]
    assert fp32["status"] == "ok" and abs(fp32["drift"]["delta_srcc"]) <= 1e-4
    assert fp32["drift"]["max_abs_diff"] <= 1e-4
    assert rows[2]["precision"] == "int8" and rows[2]["size_mb"] < fp32["size_mb"]
    assert (tmp_path / "b.md").read_text().count("| onnx-fp32 |") >= 3
    assert (tmp_path / "b.png").stat().st_size > 1000
