"""`kdiqa-edge demo`: the whole path on a small synthetic set, a report with real numbers in every row."""

from __future__ import annotations

import re

import pytest
from cli_helpers import run_cli
from typer.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("onnx")

from kdiqa_edge.cli import app


@pytest.mark.slow
def test_demo_runs_end_to_end_and_reports_real_numbers(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--quick", "--out", str(out), "--students", "test_resnet,test_efficientnet",
            "--epochs", "1", "--teacher-epochs", "1", "--refs", "3", "--no-pretrained"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = (out / "report.md").read_text()
    # the first lines: each student against the teacher in plain words, then what the accuracy figures mean
    head = report.split("\n## ")[0]
    for student in ("test_resnet", "test_efficientnet"):
        assert re.search(rf"^On this CPU the student `{student}` is \*\*\d+\.\dx (faster|slower)\*\* and "
                         rf"\*\*\d+\.\dx (smaller|larger)\*\* than the `tiny` teacher", head, re.MULTILINE), head
    assert "**smoke test**: the weights are random" in head and "not pretrained" in head
    # the teacher in each runtime, the fastest at its accuracy the one compared against, and named
    assert re.search(r"^\| teacher:torch \|", report, re.MULTILINE) and "| teacher:onnx-fp32 |" in report, report
    assert "## Students vs the teacher" in report
    assert re.search(r"against the teacher in its fastest runtime here, \w+ \w+, at batch 1", head), head
    # where the quality is lost: fast and patches overlays of 4 test images, lowest to highest MOS
    maps = report.split("## Where the quality is lost")[1].split("\n## ")[0]
    rows = [line for line in maps.splitlines() if line.startswith("| ") and ".png" in line]
    assert len(rows) == 4 and all(line.count("](maps/") == 2 for line in rows), maps
    mos = [float(line.split("|")[2]) for line in rows]
    assert mos == sorted(mos)
    assert len(list((out / "maps" / "fast").glob("*.map.npy"))) == 4
    # one line per artifact, the converters' own output in each export's export.log, not on the console
    assert re.search(r"test_resnet: onnx-int8 .*model\.int8\.onnx \(\d+\.\d MB\)", result.output)
    assert "Running MIL" not in result.output and "RuntimeWarning" not in result.output
    logs = list((out / "exports").glob("*/*/export.log"))
    assert len(logs) >= 9 and not any("Logging error" in log.read_text() for log in logs)
    rows = [line for line in report.splitlines() if line.startswith(("| test_", "| teacher"))]
    onnx_rows = [r for r in rows if ".onnx-" in r and "| ok |" in r]
    # each student: FP32 and INT8 ONNX benched with a size, an SRCC and a latency
    for student in ("test_resnet", "test_efficientnet"):
        for precision in ("fp32", "int8"):
            row = next(r for r in onnx_rows if r.startswith(f"| {student}.onnx-{precision}"))
            cells = [c.strip() for c in row.strip("|").split("|")]
            assert re.fullmatch(r"-?\d+\.\d+", cells[6]), row  # SRCC
            assert re.fullmatch(r"\d+\.\d+", cells[8]), row  # p50 ms at batch 1
        assert (out / "exports" / student / "coreml-fp16" / "model.fp16.mlpackage").is_dir()
        assert (out / "exports" / student / "tensorrt-int8" / "trtexec.sh").is_file()
    assert (out / "bench" / "latency_vs_srcc.png").stat().st_size > 0
    for plot in re.findall(r"\]\(([^)]+\.png)\)", report):
        assert (out / plot).is_file(), plot
    # auto's candidates as a markdown table with the shipped one marked, not semicolon-joined text
    for student in ("test_resnet", "test_efficientnet"):
        table = report.split(f"#### {student} onnx-auto: the candidates")[1].split("\n\n")[1]
        assert table.startswith("| candidate | precision | p50 ms @1 |"), table
        assert len(re.findall(r"^\| \*\*[^|]+\*\* \(shipped\) \|", table, re.MULTILINE)) == 1, table
        assert re.search(r"^\| fp32 .*\| ref \|", table, re.MULTILINE) or "**fp32** (shipped)" in table, table
    exports_part = report.split("## Exports")[1].split("## Time")[0]
    assert "candidate prec" not in exports_part and "int8:qdq-all+stem-float int8" not in exports_part
    # the INT8 summary in words, not the manifest's keys
    assert "max_abs_diff_vs_fp32" not in report and "delta_srcc" not in report
    assert re.search(r"INT8 vs FP32 on \d+ test images: ΔSRCC [+-]\d\.\d{4}, ΔPLCC", report)
    # the time table: stages and their total, the exports' own times apart
    stage_table = report.split("| stage | seconds | CPU seconds | load |")[1].split("\n\n")[0]
    assert "onnx-int8" not in stage_table and "| export test_resnet |" in stage_table
    assert re.search(r"^\| \*\*total\*\* \| \*\*\d+\.\d\*\* \|", stage_table, re.MULTILINE), stage_table
    assert re.search(r"^\| test_resnet \| onnx-int8 \| \d+\.\d \| \d+\.\d \|$", report, re.MULTILINE)

    # a second run skips every finished stage
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "teacher: done" in again.output and "test_efficientnet: done" in again.output
    # ... and its report keeps the times of the run that did them, marked so (not 0.0 s)
    stage_table = (out / "report.md").read_text().split("| stage | seconds | CPU seconds | load |")[1]
    teacher_time = re.search(r"^\| teacher fine-tune \(\*earlier\*\) \| (\d+\.\d) \|", stage_table, re.MULTILINE)
    assert teacher_time and float(teacher_time.group(1)) > 0, stage_table
    # other options: the finished runs are not this demo's stages, and the report would say they were
    code, _, err = run_cli([*args[:-5], "--epochs", "2", "--teacher-epochs", "1", "--refs", "3", "--no-pretrained"],
                           capsys)
    said = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(said) == 1 and "holds a demo trained with other options" in said[0], err
    assert "test_resnet: epochs 1 -> 2" in said[0] and "teacher:" not in said[0]


def test_demo_stages_follow_the_registered_targets_and_precisions(monkeypatch):
    """`auto` and `executorch` join the demo once the export registry has them, and not before."""
    from kdiqa_edge.demo import STUDENT_EXPORTS, available_exports
    from kdiqa_edge.export import base

    built = available_exports(STUDENT_EXPORTS)
    assert ("onnx", "fp32") in built and ("onnx", "int8") in built and ("coreml", "fp16") in built
    assert [r for r in STUDENT_EXPORTS if r not in built] == [
        r for r in STUDENT_EXPORTS if r[0] not in base.TARGETS or r[1] not in base.PRECISIONS]
    monkeypatch.setattr(base, "PRECISIONS", (*base.PRECISIONS, "auto"))
    monkeypatch.setitem(base.TARGETS._entries, "executorch", base.TARGETS.get("onnx"))
    with_both = available_exports(STUDENT_EXPORTS)
    assert ("onnx", "auto") in with_both and ("executorch", "int8") in with_both
