"""benchmarks/device/gpu_check.sh, the one prepared run for a lent GPU machine, as a dry run on this CPU:
every step's command line still matches the CLI and the benchmarks (a GPU session has no time to debug it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("open_clip")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "KDIQA_CHECK_DEVICE": "cpu", "OUT": str(out)}
    run = subprocess.run(["bash", str(ROOT / "benchmarks/device/gpu_check.sh")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    summary = (out / "summary.md").read_text()
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in summary.splitlines()
            if line.startswith("| ") and not line.startswith("| check")}
    assert rows.pop("fine-tune step --compile").startswith("skipped")  # CUDA only
    assert rows.pop("ORT CUDA execution provider").startswith("skipped")  # no onnxruntime-gpu here
    assert len(rows) == 6 and set(rows.values()) == {"ok"}, summary  # environment ... export --precision auto
    info = json.loads((out / "env.json").read_text())
    assert info["cuda_provider_starts"] is False and "CPUExecutionProvider" in info["onnxruntime_providers"]
    assert info["cuda_provider_problem"]  # why not, in onnxruntime's words
    manifest = json.loads((out / "manifest.json").read_text())
    names = [row["name"] for row in manifest["exports"]["onnx-auto"]["details"]["auto"]["candidates"]]
    assert names == ["fp32", "int8:qdq-all+stem-int8"]
    assert "ships" in (out / "auto.txt").read_text()
    assert "geometric mean" in (out / "distill.md").read_text() and (out / "finetune.md").stat().st_size > 0
