"""`bench` defects found by an audit, each pinned: a report path that would overwrite a model or another report,
or that cannot be written, a timed-run count other than --runs, a batch size timed twice, an SRCC floor judged on
the built-in set, a teacher with nothing to compare against said nowhere, memory in MiB labelled MB. Tiny
random-init ONNX models on the shared small synthetic set, through the real CLI where the user meets it."""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

import pytest
from cli_helpers import run_cli

pytest.importorskip("torch")
pytest.importorskip("onnx")

QUICK = ["--batch-sizes", "1", "--warmup", "1", "--runs", "2", "--rounds", "1", "--max-images", "8"]
NO_ACCURACY = ["--no-accuracy", "--batch-sizes", "1", "--warmup", "0", "--runs", "1", "--rounds", "1"]


def _onnx(checkpoint: Path, path: Path, precision: str = "fp32") -> Path:
    """The checkpoint as an FP32 ONNX graph with export's metadata, `precision` as recorded."""
    from kdiqa_edge.export import ExportConfig
    from kdiqa_edge.export.onnx import export_fp32, score_model, set_metadata
    from kdiqa_edge.export.pipeline import artifact_meta
    from kdiqa_edge.models import load_checkpoint

    model = load_checkpoint(checkpoint)
    scored = score_model(model, ExportConfig())
    export_fp32(scored, path, ExportConfig.opset)
    set_metadata(path, {**artifact_meta(model), "target": "onnx", "precision": precision,
                        "input": scored.input_spec(), "outputs": scored.output_names})
    return path


@pytest.fixture(scope="module")
def models(student_checkpoints, tmp_path_factory) -> dict[str, Path]:
    found = student_checkpoints("bench-audit", {"reference": "test_resnet", "model": "test_resnet"})
    folder = tmp_path_factory.mktemp("bench-audit")
    return {"checkpoint": found["model"], "reference.onnx": _onnx(found["reference"], folder / "reference.onnx"),
            "model.onnx": _onnx(found["model"], folder / "model.onnx"),
            "teacher.int8.onnx": _onnx(found["reference"], folder / "teacher.int8.onnx", precision="int8")}


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


def test_a_report_path_that_is_a_model_or_another_report_is_refused_before_any_work(models, tmp_path, capsys):
    model, reference = models["model.onnx"], models["reference.onnx"]
    before = {path: path.read_bytes() for path in (model, reference)}
    report = tmp_path / "bench.json"
    for args, says in (
            # `bench --json-out exports/*/*.onnx`: the shell names the first artifact as the report
            (["--json-out", reference, model], f"--json-out {reference} is a model file"),
            ([model, "--markdown", model], f"--markdown {model} is (part of) the model {model}"),
            ([model, "--reference", reference, "--plot", reference], f"--plot {reference} is (part of) the model"),
            ([model, "--json-out", report, "--markdown", report], f"--markdown {report}: --json-out names the same")):
        code, out, err = run_cli(["bench", *args, *NO_ACCURACY], capsys)
        errors = _errors(err)
        assert code == 2 and len(errors) == 1 and says in errors[0] and "Traceback" not in err, err
        assert out == "" and not report.exists()
    assert {path: path.read_bytes() for path in before} == before  # no artifact was overwritten

    checkpoint = models["checkpoint"]  # an existing file of a model folder is refused; a new file there is fine
    code, _, err = run_cli(["bench", checkpoint, *NO_ACCURACY, "--json-out", checkpoint / "model.json"], capsys)
    assert code == 2 and "is (part of) the model" in err, err
    assert json.loads((checkpoint / "model.json").read_text())["content_hash"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc takes no new files on Linux")
def test_a_report_path_that_cannot_be_written_is_one_line_before_any_work(models, capsys):
    for option in ("--json-out", "--markdown", "--plot"):
        code, out, err = run_cli(["bench", models["model.onnx"], *NO_ACCURACY, option, "/proc/bench.out"], capsys)
        errors = _errors(err)
        assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
        assert errors[0].startswith(f"error: {option} /proc/bench.out: cannot write in /proc"), errors
        assert out == ""


def test_a_report_that_fails_to_write_is_one_line_and_the_others_are_still_written(models, tmp_path, capsys,
                                                                                  monkeypatch):
    import kdiqa_edge.bench.report as report_module

    def full_disk(report, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(report_module, "write_report_json", full_disk)
    code, out, err = run_cli(["bench", models["model.onnx"], *NO_ACCURACY, "--json-out", tmp_path / "bench.json",
                              "--markdown", tmp_path / "bench.md"], capsys)
    assert code == 2 and "Traceback" not in err, err
    assert _errors(err) == [f"error: cannot write {tmp_path / 'bench.json'}: {os.strerror(errno.ENOSPC)}"]
    assert (tmp_path / "bench.md").is_file() and f"wrote {tmp_path / 'bench.md'}" in out


def test_timed_runs_are_exactly_runs_and_a_batch_size_given_twice_is_timed_once(models, tmp_path, capsys):
    from kdiqa_edge.cli.bench import parse_batch_sizes

    assert parse_batch_sizes("1,1,4,1") == (1, 4)
    code, _, err = run_cli(["bench", models["model.onnx"], models["reference.onnx"], "--no-accuracy",
                            "--batch-sizes", "1,1,2", "--warmup", "0", "--runs", "5", "--rounds", "2",
                            "--json-out", tmp_path / "bench.json", "--markdown", tmp_path / "bench.md"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "bench.json").read_text())
    for row in report["results"]:  # 5 runs in 2 rounds were 3 + 3: six, where the report says five
        assert [(s["batch_size"], s["runs"]) for s in row["latency"]] == [(1, 5), (2, 5)], row["latency"]
    text = (tmp_path / "bench.md").read_text()
    assert "5 timed runs each, in 2 round(s)" in text and "## Latency (ms per batch" in text


def test_an_accuracy_floor_is_refused_on_the_built_in_set_and_judged_on_named_data(models, small_synthetic,
                                                                                    tmp_path, capsys):
    report = tmp_path / "bench.json"
    code, out, err = run_cli(["bench", models["model.onnx"], *QUICK, "--fail-under", "srcc=-1",
                              "--json-out", report], capsys)
    errors = _errors(err)
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert "--fail-under bounds SRCC/PLCC on your data, but bench would score the built-in synthetic set" \
           in errors[0] and "--reference RUN_DIR" in errors[0], errors
    assert out == "" and not report.exists()  # no report says a gate on unrelated images passed

    code, _, err = run_cli(["bench", models["model.onnx"], *QUICK, "--fail-under", "srcc=-1", "--dataset",
                            "synthetic", "--root", small_synthetic.root, "--json-out", report], capsys)
    assert code == 0, err
    assert json.loads(report.read_text())["gate"]["passed"]


def test_a_teacher_with_no_fp32_form_says_why_there_is_no_speed_up(models, small_synthetic, tmp_path, capsys):
    code, out, err = run_cli(["bench", models["model.onnx"], "--teacher", models["teacher.int8.onnx"], *QUICK,
                              "--dataset", "synthetic", "--root", small_synthetic.root,
                              "--json-out", tmp_path / "bench.json"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["teacher"] is None
    said = [note for note in report["notes"] if note.startswith("teacher: no speed-ups against the teacher")]
    assert len(said) == 1 and "teacher:teacher.int8.onnx: int8" in said[0], report["notes"]
    assert "no FP32 form of the teacher was scored here" in said[0] and "accuracy off" not in said[0]
    assert "note: teacher: no speed-ups against the teacher" in out


@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="Linux /proc")
def test_memory_is_in_mb_of_1e6_bytes_as_its_label_says():
    from kdiqa_edge.bench import facts

    pages = int(Path("/proc/self/statm").read_text().split()[1])
    assert facts.current_rss_mb() == pytest.approx(pages * os.sysconf("SC_PAGE_SIZE") / 1e6, rel=0.01)
    import resource

    assert facts.peak_rss_mb() == pytest.approx(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6,
                                                rel=0.01)


def test_the_plot_is_written_in_the_format_its_name_says(models, tmp_path, capsys):
    code, _, err = run_cli(["bench", models["model.onnx"], *NO_ACCURACY, "--plot", tmp_path / "bench.svg"], capsys)
    assert code == 0, err
    assert b"<svg" in (tmp_path / "bench.svg").read_bytes()[:400]  # was PNG bytes under a .svg name
    code, out, err = run_cli(["bench", models["model.onnx"], *NO_ACCURACY, "--plot", tmp_path / "bench.jpg"], capsys)
    assert code == 2 and _errors(err) == [f"error: --plot {tmp_path / 'bench.jpg'}: the plot is written as .png, "
                                          f".svg, .pdf (by the name's suffix), e.g. {tmp_path / 'bench.png'}"], err
    assert out == "" and not (tmp_path / "bench.jpg").exists()
