"""Exports reused and shared: a reused export judged again under this run's --max-drift, and two exports into
one OUT, one after the other (the manifest keeps both)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from cli_helpers import run_cli

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def checkpoint(student_checkpoints):
    return student_checkpoints("reuse", {"model": "test_resnet"})["model"]


def _export(checkpoint, data, out, *extra) -> list:
    return ["export", checkpoint, "--dataset", "synthetic", "--root", data.root, "--calib", "16", "--out", out,
            *extra]


def test_a_reused_export_is_judged_under_this_runs_bound_and_says_its_threads(checkpoint, small_synthetic, tmp_path,
                                                                              capsys):
    out = tmp_path / "exports"
    int8 = _export(checkpoint, small_synthetic, out, "--target", "onnx", "--precision", "int8")
    code, stdout, err = run_cli([*int8, "--max-drift", "2", "--threads", "1"], capsys)
    assert code == 0, err
    entry = json.loads((out / "manifest.json").read_text())["exports"]["onnx-int8"]
    delta = entry["drift"]["delta_srcc"]
    assert delta != 0 and entry["threads"] == 1 and "within the 2 bound (--max-drift): ok" in stdout
    bound = f"{abs(delta) / 2:g}"
    code, stdout, err = run_cli([*int8, "--max-drift", bound, "--threads", "2"], capsys)
    assert code == 0 and "(reused" in stdout and "onnx-int8: exporting" not in err, err
    assert f"over the {bound} bound (--max-drift)" in stdout and "within the 2 bound" not in stdout
    assert "its checks and latencies ran at 1 thread, when it was built (--force measures again at 2)" in stdout
    notes = json.loads((out / "manifest.json").read_text())["exports"]["onnx-int8"]["notes"]
    assert any(f"over the {bound} bound" in note for note in notes)  # the manifest says what the terminal said
    code, stdout, err = run_cli([*int8, "--threads", "1"], capsys)  # the default bound, 0.01, and its own threads
    assert code == 0 and "(reused" in stdout and "ran at 1 thread," not in stdout
    assert ("within" if abs(delta) <= 0.01 else "over") + " the 0.01 bound (--max-drift)" in stdout


def test_two_exports_into_one_folder_keep_both_in_the_manifest(checkpoint, small_synthetic, tmp_path):
    out = tmp_path / "exports"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen([sys.executable, "-m", "kdiqa_edge",
                              *map(str, _export(checkpoint, small_synthetic, out, "--target", "onnx", "--precision",
                                                precision, "--threads", "1"))],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for precision in ("fp32", "int8")]
    finished = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], finished
    exports = json.loads((out / "manifest.json").read_text())["exports"]
    assert sorted(exports) == ["onnx-fp32", "onnx-int8"]  # before the lock, the second writer dropped the first's
    for _, err in finished:
        waited = [line for line in err.splitlines() if "another export is writing here" in line]
        assert all(" (pid " in line and line.endswith("waiting for it to finish") for line in waited)
    assert (out / ".kdiqa-export.lock").is_file()


def test_a_tensorrt_ready_onnx_is_reused_while_tensorrt_is_still_missing(checkpoint, small_synthetic, tmp_path,
                                                                          capsys, monkeypatch):
    """Without tensorrt the export writes the TensorRT-ready ONNX and trtexec.sh and exits 4; the same export
    again reuses them (it rebuilt and recalibrated every time), and builds once tensorrt imports."""
    from kdiqa_edge.export.tensorrt import TensorRTTarget

    monkeypatch.setattr(TensorRTTarget, "missing", staticmethod(lambda: "No module named 'tensorrt'"))
    monkeypatch.setattr("kdiqa_edge.export.tensorrt.tensorrt_available", lambda: "No module named 'tensorrt'")
    out = tmp_path / "exports"
    command = _export(checkpoint, small_synthetic, out, "--target", "tensorrt", "--precision", "fp16")
    code, _, err = run_cli(command, capsys)
    assert code == 4 and "NO ENGINE WAS BUILT" in err, err
    onnx_file = next((out / "tensorrt-fp16").glob("*.onnx"))
    written = onnx_file.stat().st_mtime_ns
    code, _, err = run_cli(command, capsys)
    assert code == 4 and "NO ENGINE WAS BUILT" in err and "tensorrt-fp16: exporting" not in err, err
    assert onnx_file.stat().st_mtime_ns == written
    monkeypatch.setattr(TensorRTTarget, "missing", staticmethod(lambda: None))  # tensorrt here now: built again
    code, _, err = run_cli(command, capsys)
    assert "tensorrt-fp16: exporting" in err


def test_a_fix_to_what_reduced_precision_exports_write_rebuilds_them_not_fp32(monkeypatch):
    """Exports an earlier version made are reused while their key holds: a fix that changes an FP16 or INT8
    artifact must change its key, or the old artifact is shipped as up to date."""
    from kdiqa_edge.data.spec import DatasetSpec
    from kdiqa_edge.export import ExportConfig, pipeline

    def keys():
        return {p: pipeline.request_key("m", ExportConfig(target="onnx", precision=p), DatasetSpec(), "onnx")
                for p in ("fp32", "fp16", "int8", "auto")}

    before = keys()
    monkeypatch.setattr(pipeline, "REVISION", pipeline.REVISION + 1)
    after = keys()
    assert after["fp32"] == before["fp32"]
    assert all(after[p] != before[p] for p in ("fp16", "int8", "auto"))


def test_a_fix_to_one_targets_exports_rebuilds_that_targets_alone(monkeypatch):
    from kdiqa_edge.data.spec import DatasetSpec
    from kdiqa_edge.export import ExportConfig, pipeline

    def keys():
        return {t: pipeline.request_key("m", ExportConfig(target=t, precision="int8"), DatasetSpec(), t)
                for t in ("onnx", "coreml")}

    before = keys()
    monkeypatch.setitem(pipeline.TARGET_REVISIONS, "coreml", pipeline.TARGET_REVISIONS["coreml"] + 1)
    after = keys()
    assert after["onnx"] == before["onnx"] and after["coreml"] != before["coreml"]
