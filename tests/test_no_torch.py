"""`score` and `bench` where torch cannot be imported (a Jetson or a Mac with numpy, pillow, onnxruntime)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import pytest
from test_runtime_helpers import export_tiny_onnx, quantize_dynamic_int8, real_photos


@pytest.fixture(scope="module")
def no_torch_env(tmp_path_factory):
    """An environment whose `import torch` raises ImportError, like a machine without torch."""
    blocker = tmp_path_factory.mktemp("no_torch")
    (blocker / "torch").mkdir()
    (blocker / "torch" / "__init__.py").write_text('raise ImportError("No module named torch (blocked by the test)")\n')
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(blocker), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    env.pop("KDIQA_DEBUG", None)
    return env


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("artifacts")
    fp32 = export_tiny_onnx(folder / "student.fp32.onnx")
    int8 = quantize_dynamic_int8(fp32, folder / "student.int8.onnx")
    return fp32, int8, real_photos(folder / "photos")


def _cli(args, env, timeout=300):
    return subprocess.run([sys.executable, "-m", "kdiqa_edge", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_torch_really_is_blocked_and_the_runtime_imports_without_it(no_torch_env):
    code = ("import sys\n"
            "try:\n    import torch\nexcept ImportError:\n    pass\nelse:\n    sys.exit('torch imported')\n"
            "import kdiqa_edge.runtime, kdiqa_edge.bench, kdiqa_edge.bench.report, kdiqa_edge.cli.score\n"
            "import kdiqa_edge.cli.bench, kdiqa_edge.data\n"
            "from kdiqa_edge import QualityModel\n"
            "assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules if sys.modules[m]), 'torch'\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=no_torch_env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_score_without_torch(artifacts, no_torch_env, tmp_path):
    fp32, _, photos = artifacts
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8 truncated jpeg")
    out = _cli(["score", fp32, photos[0], photos[1].parent, bad, "--format", "csv", "--batch-size", "4"], no_torch_env)
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert len(rows) == 2 + len(photos)  # photos[0] twice (file and directory), plus the corrupt file
    scored = [r for r in rows if not r["error"]]
    assert len(scored) == len(photos) + 1
    assert all(1.0 <= float(r["score"]) <= 5.0 for r in scored)
    assert [r["image"] for r in rows if r["error"]] == [str(bad)]
    assert "1 unreadable" in out.stderr
    out = _cli(["score", fp32, photos[0], "--json"], no_torch_env)
    assert out.returncode == 0, out.stderr
    line = json.loads(out.stdout)
    assert line["image"] == str(photos[0]) and line["error"] is None and 1 <= line["score"] <= 5


def test_score_refuses_a_checkpoint_without_torch_in_one_line(no_torch_env, tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.json").write_text('{"format": "kdiqa-edge/1", "kind": "student"}')
    (tmp_path / "x.png").write_bytes(b"")
    out = _cli(["score", tmp_path / "ckpt", tmp_path / "x.png"], no_torch_env)
    assert out.returncode == 3, out.stderr  # MissingDependency
    assert out.stderr.startswith("error: torch is not installed") and "Traceback" not in out.stderr


def test_bench_without_torch(artifacts, no_torch_env, tmp_path):
    from kdiqa_edge.data.synthetic import generate

    fp32, int8, _ = artifacts
    root = generate(tmp_path / "synthetic", refs=3, seed=1)
    broken = tmp_path / "broken.mlpackage"  # a format that cannot load here: a failed row, the others still run
    broken.mkdir()
    out = _cli(["bench", int8, broken, "--reference", fp32, "--dataset", "synthetic",
                "--root", root, "--batch-sizes", "1,4", "--warmup", "1", "--runs", "3",
                "--json-out", tmp_path / "b.json", "--markdown", tmp_path / "b.md", "--plot", tmp_path / "b.png"],
               no_torch_env)
    assert out.returncode == 1, out.stderr  # a failed row fails the run (CI), after every report is written
    report = json.loads((tmp_path / "b.json").read_text())
    rows = {r["name"]: r for r in report["results"]}
    assert rows["student.fp32.onnx"]["reference"] and rows["student.fp32.onnx"]["status"] == "ok"
    quantized = rows["student.int8.onnx"]
    assert quantized["status"] == "ok" and quantized["precision"] == "int8"
    assert [s["batch_size"] for s in quantized["latency"]] == [1, 4]
    assert quantized["params"] > 0 and quantized["metrics"]["n"] >= 3
    assert abs(quantized["drift"]["delta_srcc"]) <= 1.0 and quantized["drift"]["max_abs_diff"] >= 0
    assert rows["broken.mlpackage"]["status"] == "failed" and rows["broken.mlpackage"]["stage"] == "load"
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    assert "student.int8.onnx" in (tmp_path / "b.md").read_text()
    assert "student.int8.onnx" in out.stdout and "failed" in out.stdout
