"""The release gate (`bench` and `export --precision auto`: bench/gate.py) and bench's teacher in its fastest
runtime here (`bench --teacher`: bench/teacher.py), through the real CLI on tiny random-init models."""

from __future__ import annotations

import json

import pytest
from cli_helpers import run_cli

pytest.importorskip("torch")

QUICK = ["--batch-sizes", "1", "--warmup", "1", "--runs", "2", "--rounds", "1", "--max-images", "8"]
LOOSE = {"--fail-under": "srcc=-1,plcc=-1", "--max-drift": "2", "--max-latency-ms": "1e6", "--max-size-mb": "1e6"}


@pytest.fixture(scope="module")
def students(student_checkpoints, tmp_path_factory):
    """Two random-init test_resnet checkpoints of different weights (the reference and the model gated), and
    each one's FP32 ONNX, written by the onnx target's own functions (bench times ONNX in milliseconds)."""
    from kdiqa_edge.export import ExportConfig
    from kdiqa_edge.export.onnx import export_fp32, score_model, set_metadata
    from kdiqa_edge.export.pipeline import artifact_meta
    from kdiqa_edge.models import load_checkpoint

    found = student_checkpoints("gate", {"reference": "test_resnet", "model": "test_resnet"})
    folder = tmp_path_factory.mktemp("gate-onnx")
    for name in ("reference", "model"):
        model = load_checkpoint(found[name])
        scored = score_model(model, ExportConfig())
        path = export_fp32(scored, folder / f"{name}.onnx", ExportConfig.opset)
        set_metadata(path, {**artifact_meta(model), "target": "onnx", "precision": "fp32",
                            "input": scored.input_spec(), "outputs": scored.output_names})
        found[f"{name}.onnx"] = path
    return found


def _bench(students, small_synthetic, tmp_path, capsys, bounds: dict[str, str], *extra):
    args = ["bench", students["model.onnx"], "--reference", students["reference.onnx"], "--dataset", "synthetic", "--root",
            small_synthetic.root, *QUICK, "--json-out", tmp_path / "bench.json", *extra]
    for option, value in bounds.items():
        args += [option, value]
    code, out, err = run_cli(args, capsys)
    report = json.loads((tmp_path / "bench.json").read_text()) if (tmp_path / "bench.json").is_file() else None
    return code, out, err, report


def test_the_gate_exits_1_on_each_violated_bound_and_0_when_all_hold(students, small_synthetic, tmp_path, capsys):
    code, out, err, report = _bench(students, small_synthetic, tmp_path, capsys, LOOSE)
    assert code == 0, err
    assert "gate: passed: 1 model(s) within --fail-under srcc=-1,plcc=-1 --max-drift 2" in out
    assert report["gate"]["passed"] and report["gate"]["broken"] == [] and report["gate"]["rows"] == ["model.onnx"]
    assert report["gate"]["bounds"] == {"srcc": -1, "plcc": -1, "max_drift": 2, "max_latency_ms": 1e6,
                                        "max_size_mb": 1e6}
    row = next(r for r in report["results"] if r["name"] == "model.onnx")
    srcc, plcc, size = row["metrics"]["srcc"], row["metrics"]["plcc"], row["size_mb"]
    drift = abs(row["drift"]["delta_srcc"])
    assert drift > 1e-3  # two models of different weights: the drift bound can be set just under it

    # each bound set just past the model's own (deterministic) figure, the others loose: exit 1, one line each
    broken = {"srcc": ("--fail-under", f"srcc={srcc + 1e-4},plcc=-1", "SRCC"),
              "plcc": ("--fail-under", f"srcc=-1,plcc={plcc + 1e-4}", "PLCC"),
              "max_drift": ("--max-drift", f"{drift - 1e-4}", "|ΔSRCC|"),
              "max_latency_ms": ("--max-latency-ms", "1e-6", "p50 at batch 1"),
              "max_size_mb": ("--max-size-mb", f"{size * 0.999}", "size")}
    for bound, (option, value, figure) in broken.items():
        code, out, err, report = _bench(students, small_synthetic, tmp_path, capsys, {**LOOSE, option: value})
        lines = [line for line in err.splitlines() if line.startswith("gate:")]
        assert code == 1, (bound, err)
        assert len(lines) == 1 and lines[0].startswith(f"gate: model.onnx: {figure} ") and option in lines[0], lines
        assert "gate: FAILED: 1 of 1 model(s) broke 1 bound(s)" in out
        gate = report["gate"]
        assert not gate["passed"] and gate["broken"] == ["model.onnx"]
        assert [(v["row"], v["bound"]) for v in gate["violations"]] == [("model.onnx", bound)]


def test_the_gate_refuses_what_it_cannot_check_and_fails_a_model_that_does_not_run(
        students, small_synthetic, tmp_path, capsys):
    model = students["model.onnx"]
    for args, says in (
            (["--fail-under", "srcc=high"], "--fail-under srcc= needs a number"),
            (["--fail-under", "krcc=0.8"], "--fail-under takes METRIC=VALUE pairs"),
            (["--fail-under", "srcc=0.8,srcc=0.9"], "names srcc twice"),
            (["--max-drift", "0.01"], "--max-drift bounds |ΔSRCC| against the reference: give --reference"),
            (["--fail-under", "srcc=0.5", "--no-accuracy"], "need the accuracy figures"),
            (["--max-latency-ms", "5", "--batch-sizes", "4"], "--batch-sizes must include 1")):
        code, _, err = run_cli(["bench", model, *args], capsys)
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert code == 2 and len(errors) == 1 and says in errors[0] and "Traceback" not in err, err

    broken = tmp_path / "model.int8.onnx"
    broken.write_bytes(b"not an onnx model")
    code, out, err, report = _bench(students, small_synthetic, tmp_path, capsys, {"--max-size-mb": "1e6"},
                                    broken)
    assert code == 1 and "gate: FAILED: 1 of 2 model(s) broke 1 bound(s)" in out
    lines = [line for line in err.splitlines() if line.startswith("gate:")]
    assert lines == [line for line in lines if "model.int8.onnx: failed at load" in line] and len(lines) == 1
    assert report["gate"]["broken"] == ["model.int8.onnx"]  # the model that ran holds the bound


def test_the_gate_judges_the_pick_of_export_precision_auto(students, small_synthetic, tmp_path, capsys):
    out = tmp_path / "exports"
    common = ["export", students["model"], "--target", "onnx", "--precision", "auto", "--candidates", "fp32",
              "--dataset", "synthetic", "--root", small_synthetic.root, "--out", out, "--threads", "1"]
    code, _, err = run_cli([*common, "--max-size-mb", "0.001", "--fail-under", "srcc=-1"], capsys)
    lines = [line for line in err.splitlines() if line.startswith("gate:")]
    assert code == 1, err
    assert len(lines) == 1 and lines[0].startswith("gate: onnx-auto (fp32): size ") and "--max-size-mb 0.001" in lines[0]
    entry = json.loads((out / "manifest.json").read_text())["exports"]["onnx-auto"]
    assert (out / "onnx-auto" / "model.onnx").is_file()  # exported; the gate says it must not ship
    assert entry["gate"]["bounds"] == {"srcc": -1, "max_drift": 0.01, "max_size_mb": 0.001}
    assert not entry["gate"]["passed"] and [v["bound"] for v in entry["gate"]["violations"]] == ["max_size_mb"]
    size = sum(f["bytes"] for f in entry["files"]) / 1e6
    assert entry["gate"]["violations"][0]["value"] == pytest.approx(size)

    # the same export again (reused, not rebuilt) under bounds it holds: exit 0, the verdict replaced
    code, stdout, err = run_cli([*common, "--max-size-mb", f"{size * 1.01}", "--max-latency-ms", "1e6",
                                 "--fail-under", f"srcc={entry['drift']['srcc'] - 1e-4}"], capsys)
    assert code == 0, err
    assert "(reused" in stdout and "gate: passed: 1 model(s)" in stdout
    assert json.loads((out / "manifest.json").read_text())["exports"]["onnx-auto"]["gate"]["passed"]

    # the bounds from a profile, as a CI's deployment profile carries them: the same verdict, nothing rebuilt
    profile = tmp_path / "ci.yaml"
    profile.write_text("target: onnx\nprecision: auto\nmax_size_mb: 0.001\nfail_under: srcc=-1\n")
    code, stdout, err = run_cli([*common, "--profile", profile], capsys)
    assert code == 1 and "(reused" in stdout, err
    assert [line for line in err.splitlines() if line.startswith("gate:")] == lines
    code, _, err = run_cli([*common, "--profile", profile, "--max-size-mb", f"{size * 1.01}"], capsys)
    assert code == 0, err  # a flag overrides the profile's bound

    code, _, err = run_cli([*common[:5], "fp32", "--out", out, "--max-latency-ms", "5"], capsys)
    assert code == 2 and "--max-latency-ms gate --precision auto's pick" in err
    profile.write_text("precision: fp32\nmax_size_mb: 10\n")
    code, _, err = run_cli([*common[:2], "--out", out, "--profile", profile], capsys)
    assert code == 2 and "--max-size-mb gate --precision auto's pick" in err and "Traceback" not in err

    code, stdout, err = run_cli(common, capsys)  # no bounds this time: an earlier run's verdict is not kept
    assert code == 0 and "(reused" in stdout and "gate:" not in stdout + err, err
    assert "gate" not in json.loads((out / "manifest.json").read_text())["exports"]["onnx-auto"]


def test_bench_times_the_teacher_in_every_runtime_and_compares_against_its_fastest(
        students, small_synthetic, tmp_path, capsys):
    from kdiqa_edge.models import save_checkpoint
    from kdiqa_edge.models.teacher import load_teacher

    teacher = save_checkpoint(load_teacher("tiny"), tmp_path / "teacher")
    code, out, err = run_cli(["bench", students["model.onnx"], "--reference", teacher, "--teacher", teacher,
                              "--teacher-runtimes", "torch,onnx", "--dataset", "synthetic", "--root",
                              small_synthetic.root, *QUICK, "--json-out", tmp_path / "t.json",
                              "--max-latency-ms", "1e6"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "t.json").read_text())
    rows = {r["name"]: r for r in report["results"]}
    # the reference is the teacher's checkpoint: its PyTorch row, not a second one
    assert list(rows) == ["teacher:torch", "teacher:onnx-fp32", "model.onnx"]
    assert rows["teacher:torch"]["reference"] and rows["teacher:onnx-fp32"]["format"] == "ONNX"
    assert rows["teacher:onnx-fp32"]["teacher"] == "onnx-fp32" and rows["model.onnx"]["teacher"] is None
    p50 = {name: row["latency"][0]["p50_ms"] for name, row in rows.items()}
    fastest = min(("teacher:torch", "teacher:onnx-fp32"), key=p50.get)
    said = report["teacher"]
    assert said["row"] == fastest and said["p50_ms"] == p50[fastest] and said["format"] == rows[fastest]["format"]
    assert said["versus"][0]["row"] == "model.onnx"
    assert said["versus"][0]["speedup"] == pytest.approx(p50[fastest] / p50["model.onnx"])
    assert f"teacher: fastest here in {rows[fastest]['format']} fp32 ({fastest}" in out
    assert f"the teacher in its fastest runtime here ({rows[fastest]['format']} fp32)" in out
    assert report["gate"]["rows"] == ["model.onnx"]  # neither the reference nor the teacher is gated


def test_a_drifting_reduced_precision_teacher_is_not_the_one_compared_against():
    from kdiqa_edge.bench import BenchResult, LatencyStats
    from kdiqa_edge.bench.teacher import versus_teacher
    from kdiqa_edge.metrics import IQAMetrics

    def row(name, teacher, precision, ms, srcc):
        metrics = IQAMetrics(plcc=srcc, plcc_fit=srcc, srcc=srcc, krcc=srcc, rmse=0.1, n=50)
        return BenchResult(model=name, name=name, format="OpenVINO", precision=precision, teacher=teacher,
                           latency=[LatencyStats.from_times(1, [ms / 1e3])], metrics=metrics, size_mb=10.0)

    fp32, student = row("teacher:openvino-fp32", "openvino-fp32", "fp32", 20.0, 0.9), row("s", None, "int8", 4.0, 0.85)
    drifting = row("teacher:openvino-bf16", "openvino-bf16", "bf16", 10.0, 0.85)
    said = versus_teacher([fp32, drifting, student], batch=1)
    assert said["row"] == "teacher:openvino-fp32" and said["versus"][0]["speedup"] == pytest.approx(5.0)
    assert "over 0.01, so left out" in next(f["left_out"] for f in said["forms"] if f["precision"] == "bf16")
    faithful = row("teacher:openvino-bf16", "openvino-bf16", "bf16", 10.0, 0.895)
    said = versus_teacher([fp32, faithful, student], batch=1)
    assert said["row"] == "teacher:openvino-bf16" and said["versus"][0]["speedup"] == pytest.approx(2.5)
