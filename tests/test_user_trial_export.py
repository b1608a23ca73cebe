"""Issue 30, the export side, through the real CLI: one OUT per checkpoint (5), older runs' relative dataset
paths (4), output that says each thing once with a verdict on every check (8), `export --help` (11).

Runs are made as distill leaves them (config.yaml, checkpoints/best), with tiny random-init test_resnet
students (64 px) of two seeds and a small synthetic set, so each export takes a few seconds.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
from cli_helpers import run_cli as _cli

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("open_clip")


def _make_run(run: Path, seed: int, root: str) -> Path:
    """A run folder as distill writes it, of an older kdiqa-edge: the dataset root as given on its command
    line (`root`, relative to the folder it ran in), no workdir recorded."""
    from kdiqa_edge.models import save_checkpoint
    from kdiqa_edge.models.student import create_student
    from kdiqa_edge.models.teacher import load_teacher

    teacher = load_teacher("tiny")
    torch.manual_seed(seed)
    student = create_student("test_resnet", teacher.head, teacher.preprocess, pretrained=False).eval()
    save_checkpoint(student, run / "checkpoints" / "best")
    (run / "config.yaml").write_text(f"student: test_resnet\ndataset:\n  name: synthetic\n  root: {root}\n"
                                     "split_seed: 0\nval_fraction: 0.0\ntest_fraction: 0.2\nsplit_by: auto\n")
    return run


@pytest.fixture(scope="module")
def project(tmp_path_factory, small_synthetic) -> Path:
    """project/set (the dataset), project/runs/{a,b} (two seeds, the root recorded absolute) and
    project/runs/old (an older run: trained 'from project/' with `--root set`, recorded as given)."""
    project = tmp_path_factory.mktemp("project")
    shutil.copytree(small_synthetic.root, project / "set")
    for name, seed in (("a", 0), ("b", 1)):
        _make_run(project / "runs" / name, seed, root=str(project / "set"))
    _make_run(project / "runs" / "old", 0, root="set")
    return project


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _hash(run: Path) -> str:
    return json.loads((run / "checkpoints" / "best" / "model.json").read_text())["content_hash"]


# --- 5: one OUT per checkpoint -----------------------------------------------------------------------------


def test_each_run_exports_to_its_own_folder_and_another_checkpoints_out_is_refused(project, tmp_path, capsys,
                                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = project / "runs"
    for name in ("a", "b"):  # no --out: exports/<run name>, so two runs' exports never meet
        code, _, err = _cli(["export", runs / name], capsys)
        assert code == 0, err
        manifest = json.loads((tmp_path / "exports" / name / "manifest.json").read_text())
        assert manifest["checkpoint"]["content_hash"] == _hash(runs / name)
        assert (tmp_path / "exports" / name / "onnx-fp32" / "model.fp32.onnx").is_file()
    first = tmp_path / "exports" / "a"
    before = _snapshot(first)

    # run b into run a's folder: refused in one line that names a's checkpoint and both ways out
    code, _, err = _cli(["export", runs / "b", "--out", first], capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert str(runs / "a" / "checkpoints" / "best") in errors[0] and _hash(runs / "a")[:12] in errors[0]
    assert "--out" in errors[0] and "--force" in errors[0]
    assert _snapshot(first) == before  # a's export and manifest untouched

    # --force replaces them: the manifest then names b, the one checkpoint whose exports OUT holds
    code, _, err = _cli(["export", runs / "b", "--out", first, "--force"], capsys)
    assert code == 0, err
    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["checkpoint"]["content_hash"] == _hash(runs / "b") and sorted(manifest["exports"]) == ["onnx-fp32"]
    assert _snapshot(first) != before and "replaced the exports of" in err


def test_force_over_another_checkpoint_removes_the_exports_it_does_not_rewrite(project, tmp_path, capsys):
    out = tmp_path / "out"
    for precision in ("fp32", "fp16"):
        code, _, err = _cli(["export", project / "runs" / "a", "--precision", precision, "--out", out], capsys)
        assert code == 0, err
    code, _, err = _cli(["export", project / "runs" / "b", "--out", out, "--force"], capsys)
    assert code == 0, err
    # a manifest names one checkpoint: a's FP16 export would be listed under b's name, so it goes
    assert sorted(json.loads((out / "manifest.json").read_text())["exports"]) == ["onnx-fp32"]
    assert not (out / "onnx-fp16").exists() and "removed its onnx-fp16" in err


# --- 4: an older run's relative dataset root, exported from another folder ---------------------------------


def test_a_run_with_a_relative_dataset_root_exports_from_another_folder(project, tmp_path, capsys, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the issue: `cd /tmp && kdiqa-edge export /abs/runs/x` -> root not found: set
    code, _, err = _cli(["export", project / "runs" / "old", "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert Path(manifest["data"]["root"]) == (project / "set").resolve()  # the run's set, not the synthetic one


# --- 8: the export's output says each thing once, with a verdict on every check ----------------------------


def test_int8_output_one_latency_per_artifact_one_machine_line_and_verdicts(project, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["export", project / "runs" / "a", "--precision", "int8", "--calib", "16", "--out", out]
    code, stdout, err = _cli(args, capsys)
    assert code == 0, err
    text = stdout + err
    assert text.count("ISA") == 1 and stdout.startswith("machine: ")  # the environment, once
    lines = stdout.splitlines()
    parity = [line for line in lines if "parity vs torch" in line]
    assert len(parity) == 1 and "max |diff|" in parity[0]
    assert "no tolerance for INT8 (reported only, its drift check judges it)" in parity[0]
    drift = [line for line in lines if "drift vs FP32" in line]
    assert len(drift) == 1 and re.search(r"(within|over) the 0\.01 bound \(--max-drift\)", drift[0])
    # one latency per artifact: the INT8 figure of the latency line is the one the alternative's note compares
    int8_ms = re.search(r"INT8 (\d+\.\d+) ms, FP32 (\d+\.\d+) ms", stdout)
    note = next(line for line in lines if "the alternative" in line)
    assert int8_ms and re.search(rf"\(\d+\.\d+ vs {int8_ms.group(1)} ms at batch 1\)", note)
    assert "pass --int8-stem int8 to ship it instead" in note and "ships it" not in note
    artifact = out / "onnx-int8" / "model.int8.onnx"
    assert lines[-1] == f"next: kdiqa-edge bench {artifact} --reference {project / 'runs' / 'a'}"

    # again: reused, said once, and the block printed once
    code, again, err = _cli(args, capsys)
    assert code == 0, err
    assert (again + err).count("reused") == 1 and "exporting" not in err
    assert [line for line in again.splitlines() if line.startswith("onnx-int8")] == [
        f"onnx-int8: {artifact} (reused: up to date for this checkpoint, these options and data; "
        "--force rebuilds it)"]
    assert again.count("parity vs torch") == 1 and again.count("drift vs FP32") == 1

    # a different export into the same OUT prints only its own block; the manifest line names the others
    code, fp32, err = _cli(["export", project / "runs" / "a", "--out", out], capsys)
    assert code == 0, err
    assert "onnx-int8:" not in fp32 and "(also lists onnx-int8)" in fp32
    assert "parity vs torch: max |diff|" in fp32 and "within the 1e-04 tolerance: ok" in fp32


# --- 11: `export --help` shows the defaults; the unknown-target error lists `all` -------------------------


@pytest.mark.parametrize("rich", [True, False])
def test_export_help_shows_the_defaults_of_target_and_precision(rich, monkeypatch):
    from typer.testing import CliRunner

    from kdiqa_edge.cli import app

    if not rich:  # typer's plain (click) help, as where rich is not installed (or TYPER_USE_RICH=0)
        monkeypatch.setattr("typer.core.HAS_RICH", False)
    result = CliRunner().invoke(app, ["export", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    text = re.sub(r"\s+", " ", re.sub(r"[│╭╮╰╯─]", " ", result.output))
    # typer's own rendering of a described default: [default: (onnx)]
    assert re.search(r"--target .*?onnx, tensorrt, coreml, executorch, [a-z, ]*or all \[default: \(onnx\)\]", text)
    assert re.search(r"--precision .*?OUT/<target>-auto/ \[default: \(fp32\)\]", text)
    assert text.count("[default: (onnx)]") == 1 and text.count("[default: (fp32)]") == 1
    assert "[default: (exports/<run name>)]" in text


def test_unknown_target_lists_all_too(project, tmp_path, capsys):
    code, _, err = _cli(["export", project / "runs" / "a", "--target", "nope", "--out", tmp_path / "out"], capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1
    from kdiqa_edge.export import TARGETS

    assert errors[0] == f"error: unknown export target 'nope'; choose one of: {', '.join(TARGETS.names())}, all"
    assert "onnx, " in errors[0]
