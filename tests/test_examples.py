"""The examples/ scripts run as a user would run them (tiny models, the small synthetic set)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")

REPO = Path(__file__).resolve().parents[1]
SMOKE = "--no-pretrained --teacher-epochs 1 --batch-size 32"


def _env(**extra) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # kdiqa-edge of this venv
    env.update(extra)
    return env


def _run(args, **env) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{args}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def run_dir(small_synthetic, tmp_path_factory):
    """examples/distill_own_csv.sh on the synthetic set's own scores.csv, read as a plain CSV dataset."""
    out = tmp_path_factory.mktemp("own-csv") / "run"
    root = small_synthetic.root
    done = _run(["bash", "examples/distill_own_csv.sh", str(root), str(root / "scores.csv")],
                OUT=str(out), STUDENT="test_efficientnet", TEACHER="tiny", EPOCHS="1", EXTRA=SMOKE, REF_COL="ref")
    assert "images" in done.stdout  # data info printed its counts first
    assert (out / "summary.json").is_file() and (out / "exports" / "onnx-int8" / "model.int8.onnx").is_file()
    return out


def _csv_options(small_synthetic) -> str:
    root = small_synthetic.root
    return f"--dataset csv --csv {root / 'scores.csv'} --image-dir {root} --ref-col ref"


def test_score_folder_from_python(run_dir, small_synthetic, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for src in sorted((small_synthetic.root / "images").iterdir())[:5]:
        (images / src.name).write_bytes(src.read_bytes())
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "scores.csv"
    done = _run([sys.executable, "examples/score_folder.py", str(run_dir / "exports" / "onnx-int8" / "model.int8.onnx"),
                 str(images), "--out", str(out)])
    assert "5 images scored, 1 unreadable" in done.stdout
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 6
    scores = [float(r["score"]) for r in rows if r["score"]]
    assert len(scores) == 5 and all(1.0 <= s <= 5.0 for s in scores)
    assert next(r for r in rows if r["image"].endswith("broken.jpg"))["error"]


def test_jetson_example_writes_the_tensorrt_onnx_and_benches_it(run_dir, small_synthetic, tmp_path):
    out = tmp_path / "jetson"
    done = _run(["bash", "examples/jetson.sh", str(run_dir)], OUT=str(out), EXTRA=_csv_options(small_synthetic))
    assert "no TensorRT on this machine" in done.stdout
    assert (out / "tensorrt-int8" / "trtexec.sh").is_file()
    assert "--stronglyTyped" in (out / "tensorrt-int8" / "trtexec.sh").read_text()
    assert "| ok |" in (out / "bench.md").read_text() and (out / "bench.png").is_file()


def test_iphone_example_converts_to_coreml(run_dir, small_synthetic, tmp_path):
    out = tmp_path / "iphone"
    done = _run(["bash", "examples/iphone.sh", str(run_dir)], OUT=str(out), EXTRA=_csv_options(small_synthetic))
    assert (out / "coreml-fp16" / "model.fp16.mlpackage").is_dir()
    if sys.platform != "darwin":
        assert "not macOS" in done.stdout


def test_android_example_exports_executorch_int8_scores_and_benches(run_dir, small_synthetic, tmp_path):
    pytest.importorskip("executorch")
    out = tmp_path / "android"
    images = small_synthetic.root / "images"
    done = _run(["bash", "examples/android.sh", str(run_dir)], OUT=str(out), IMAGES=str(images),
                EXTRA=_csv_options(small_synthetic), EXPORT_EXTRA="--calib 32")
    assert (out / "executorch-int8" / "model.int8.pte").is_file()
    assert "executor_runner --model_path=/data/local/tmp/kdiqa/model.int8.pte" in done.stdout
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert len(rows) == len(list(images.iterdir())) and all(1.0 <= float(r["score"]) <= 5.0 for r in rows)
    bench = (out / "bench.md").read_text()
    assert "| ok |" in bench and "ExecuTorch" in bench


def test_intel_example_exports_the_openvino_int8_ir_scores_and_benches(run_dir, small_synthetic, tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    out = tmp_path / "intel"
    images = small_synthetic.root / "images"
    done = _run(["bash", "examples/intel_cpu.sh", str(run_dir)], OUT=str(out), IMAGES=str(images),
                EXTRA=_csv_options(small_synthetic), EXPORT_EXTRA="--calib 32")
    assert (out / "openvino-int8" / "model.int8.xml").is_file() and "model.int8.xml" in done.stdout
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert len(rows) == len(list(images.iterdir())) and all(1.0 <= float(r["score"]) <= 5.0 for r in rows)
    bench = (out / "bench.md").read_text()
    assert "| ok |" in bench and "OpenVINO" in bench
