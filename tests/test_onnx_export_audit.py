"""The ONNX target and the export pipeline, from an audit: what an INT8 or FP16 export with the map keeps in
float, what FP16 rounds between the head's float ops, auto's choice where a smaller INT8 ties a faster one, a bare
checkpoint's images, an OUT that is a file, the checkpoint path the manifest records.

Tiny random-init test_resnet students at 64 px and the small synthetic set.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run_cli

pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("open_clip")

from kdiqa_edge.export import ExportConfig, auto, export_checkpoint
from kdiqa_edge.export.auto import Candidate, Measured, choose

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoints(student_checkpoints):
    return student_checkpoints("onnx-audit", {"a": "test_resnet", "b": "test_resnet"})


# --- INT8/FP16 with the map: the head and the projection stay float for the score and the map -------------


def _int8_scores(model, examples, tmp_path: Path, with_map: bool) -> tuple[np.ndarray, Path]:
    from kdiqa_edge.export.evaluate import predict, session
    from kdiqa_edge.export.onnx import OnnxTarget
    from kdiqa_edge.export.pipeline import artifact_meta
    from kdiqa_edge.preprocess import normalize

    out = tmp_path / f"map-{with_map}"
    out.mkdir()
    cfg = ExportConfig(precision="int8", with_map=with_map, latency_runs=3)
    result = OnnxTarget().export(model, examples, out, cfg, artifact_meta(model))
    path = result.files[0]
    return predict(session(path), normalize(examples.test, model.preprocess)), path


def test_int8_with_the_map_keeps_the_head_and_its_shared_weights_in_float(tiny_student, scored_examples, tmp_path):
    """The map runs the head and the projection a second time (`/head_1/`, `/proj_1/`) on the same weights;
    those calls were quantized, and with them the weights the score's own head and projection read: the
    anchors, the levels 1..5 and the projection were int8, and the score moved by 0.02 against the same export
    without the map."""
    examples = scored_examples(40)
    plain, _ = _int8_scores(tiny_student, examples, tmp_path, with_map=False)
    mapped, path = _int8_scores(tiny_student, examples, tmp_path, with_map=True)
    assert np.max(np.abs(mapped - plain)) < 1e-6  # the score output does not change with the map
    graph = onnx.load(str(path)).graph
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    initializers = {t.name for t in graph.initializer}
    float_scope = re.compile(r"/(head|proj)(_\d+)?/")
    kept = [n for n in graph.node if float_scope.search(n.name)]
    assert {n.name.split("/")[1] for n in kept} >= {"head", "head_1", "proj", "proj_1"}
    # no weight of the head or the projection (either call) is read through a DequantizeLinear
    quantized_weights = [(n.name, name) for n in kept for name in n.input
                         if name in dequantized and not name.startswith("/")]
    assert quantized_weights == []
    assert not any(name.startswith("head.levels") and name != "head.levels" for name in initializers)


def test_float_nodes_finds_a_modules_second_call_and_the_readers_of_a_kept_weight(tiny_student, tmp_path):
    from kdiqa_edge.export.onnx import export_fp32, float_nodes, score_model

    path = export_fp32(score_model(tiny_student, ExportConfig(with_map=True)), tmp_path / "m.onnx", 17)
    names = float_nodes(path)
    assert "/proj/Gemm" in names and "/proj_1/Gemm" in names
    assert any(n.startswith("/head_1/") for n in names) and any(n.startswith("/head/") for n in names)
    stem = set(float_nodes(path, stem=True)) - set(names)
    assert len(stem) == 1 and "conv1" in next(iter(stem))  # the stem, and nothing of the encoder besides


def test_fp16_keeps_the_head_and_the_score_in_fp32(tiny_student, scored_examples, tmp_path):
    """onnxruntime's FP16 converter cast every output of a node kept in float to FP16 and back before the next
    one read it: the head's logits and probabilities, and the score output itself, were rounded to FP16 (score
    steps of 0.002-0.004: ties in the ranking, parity 1.4e-3 where the head in FP32 gives 1e-4)."""
    from kdiqa_edge.export.evaluate import predict, session
    from kdiqa_edge.export.onnx import OnnxTarget
    from kdiqa_edge.export.pipeline import artifact_meta
    from kdiqa_edge.preprocess import normalize

    examples = scored_examples(40)
    cfg = ExportConfig(precision="fp16", with_map=True, latency_runs=3)
    result = OnnxTarget().export(tiny_student, examples, tmp_path, cfg, artifact_meta(tiny_student))
    path = result.files[0]
    scores = predict(session(path, fp16=True), normalize(examples.test, tiny_student.preprocess))
    assert not np.array_equal(scores.astype(np.float16).astype(np.float64), scores)  # not FP16 values
    assert result.parity["max_abs_diff"] < 1e-3
    graph = onnx.load(str(path)).graph
    producers = {name: node for node in graph.node for name in node.output}
    to = {n.name: next(a.i for a in n.attribute if a.name == "to") for n in graph.node if n.op_type == "Cast"}
    round_trips = [n.name for n in graph.node if n.op_type == "Cast" and to[n.name] == onnx.TensorProto.FLOAT
                   and producers.get(n.input[0]) is not None and producers[n.input[0]].op_type == "Cast"
                   and to[producers[n.input[0]].name] == onnx.TensorProto.FLOAT16]
    assert round_trips == []
    assert [o.name for o in graph.output] == ["score", "score_map"]


# --- auto's choice: min_speedup before the tie --------------------------------------------------------------


def _row(name: str, ms: float, mb: float, reference: bool = False) -> Measured:
    item = Measured(Candidate(name, "fp32" if reference else "int8", build=None, reference=reference))
    item.latency = {1: {"p50_ms": ms, "images_per_s": 1e3 / ms}}
    item.drift, item.bytes = {"delta_srcc": 0.0}, int(mb * 1e6)
    return item


def test_a_smaller_int8_in_a_tie_does_not_hand_the_choice_to_fp32_when_a_faster_one_buys_the_speedup():
    """int8:a is 1.26x FP32 (over --min-speedup 1.25), int8:b within 3 % of it and smaller, but 1.235x: the tie
    went to b, b failed min_speedup, and FP32 shipped, though a buys the speed within the bound."""
    rows = [_row("fp32", 12.6, 4.0, reference=True), _row("int8:a", 10.0, 1.2), _row("int8:b", 10.2, 1.1)]
    choice = choose(rows, max_drift=0.01)
    assert choice.pick.name == "int8:a" and choice.declined is None
    assert "1.26x the speed of fp32" in choice.why
    # both short of the bar: FP32 ships, and says which faster one gave way
    rows = [_row("fp32", 12.0, 4.0, reference=True), _row("int8:a", 10.0, 1.2), _row("int8:b", 10.2, 1.1)]
    choice = choose(rows, max_drift=0.01)
    assert choice.pick.name == "fp32" and choice.declined == "int8:a"
    assert "int8:a, is 1.20x the speed of fp32" in choice.why
    # a lossy file within 3 % of a faster FP32: FP32 ships, and nothing faster gave way to it
    rows = [_row("fp32", 5.0, 40.0, reference=True), _row("int8", 5.1, 10.0)]
    choice = choose(rows, max_drift=0.01)
    assert choice.pick.name == "fp32" and choice.declined is None


def test_the_auto_profile_states_the_rounds_auto_runs():
    text = (REPO / "export" / "cpu-onnx-auto.yaml").read_text()
    stated = re.search(r"latency_runs:.*over (\d+) alternated rounds", text)
    assert stated and int(stated.group(1)) == auto.ROUNDS


# --- the pipeline ------------------------------------------------------------------------------------------


def _export(checkpoint, data, out, *extra) -> list:
    return ["export", checkpoint, "--dataset", "synthetic", "--root", data.root, "--target", "onnx", "--calib", "8",
            "--out", out, *extra]


def test_a_bare_checkpoint_says_its_drift_is_on_the_synthetic_set(checkpoints, tmp_path, monkeypatch):
    """No run dir and no dataset: calibration and drift on the built-in synthetic set, which the export did
    not say (bench says it in its first line)."""
    from kdiqa_edge.errors import DataError
    from kdiqa_edge.export import pipeline

    def stop(*args, **kwargs):
        raise DataError("stopped before the images")

    monkeypatch.setattr(pipeline, "load_examples", stop)
    for precision, said in (("int8", True), ("fp32", False)):
        lines: list[str] = []
        with pytest.raises(DataError):
            export_checkpoint(checkpoints["a"], ExportConfig(precision=precision), tmp_path / precision,
                              progress=False, log=lines.append)
        noted = [line for line in lines if "built-in synthetic set, NOT your data" in line]
        assert bool(noted) is said, lines
    assert "--dataset" in noted[0] if noted else True


def test_an_out_that_is_a_file_is_one_line(checkpoints, small_synthetic, tmp_path, capsys):
    taken = tmp_path / "exports"
    taken.write_text("not a folder")
    for out in (taken, taken / "sub"):
        code, _, err = run_cli(_export(checkpoints["a"], small_synthetic, out), capsys)
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert str(taken) in lines[0]
    assert taken.read_text() == "not a folder"


def test_the_manifest_names_the_checkpoint_by_its_absolute_path(checkpoints, small_synthetic, tmp_path,
                                                                monkeypatch):
    """A relative checkpoint path was recorded as given: an export run from another folder then called the same
    checkpoint folder 'another checkpoint', and the path named nothing there."""
    from kdiqa_edge.errors import ConfigError

    project = tmp_path / "project"
    shutil.copytree(checkpoints["a"], project / "student")
    out = tmp_path / "exports"
    cfg = ExportConfig(parity_images=4)
    monkeypatch.chdir(project)
    export_checkpoint("student", cfg, out, data=small_synthetic, progress=False, log=lambda _: None)
    recorded = json.loads((out / "manifest.json").read_text())["checkpoint"]["path"]
    assert Path(recorded).is_absolute() and Path(recorded) == project / "student"
    shutil.copytree(checkpoints["b"], project / "student", dirs_exist_ok=True)  # retrained in place
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="holds the exports of an earlier checkpoint of "):
        export_checkpoint(project / "student", cfg, out, data=small_synthetic, progress=False, log=lambda _: None)


def test_each_entry_records_the_options_it_was_built_with(checkpoints, small_synthetic, tmp_path):
    """The manifest's `config` is the last export's: an INT8 entry reused beside a later FP32 one with other
    options (calibration images, input kind) had no record of its own."""
    out = tmp_path / "exports"
    quiet = {"data": small_synthetic, "progress": False, "log": lambda _: None}
    export_checkpoint(checkpoints["a"], ExportConfig(precision="int8", calib=8, parity_images=4, latency_runs=3),
                      out, **quiet)
    export_checkpoint(checkpoints["a"], ExportConfig(input="uint8", layout="NHWC", parity_images=4), out, **quiet)
    manifest = json.loads((out / "manifest.json").read_text())
    int8, fp32 = manifest["exports"]["onnx-int8"], manifest["exports"]["onnx-fp32"]
    assert manifest["config"]["input"] == "uint8" and manifest["config"]["precision"] == "fp32"  # the last run's
    assert (int8["config"]["calib"], int8["config"]["input"], int8["config"]["precision"]) == (8, "float", "int8")
    assert (fp32["config"]["input"], fp32["config"]["layout"]) == ("uint8", "NHWC")
    assert int8["details"]["int8"]["calibration_images"] == int8["config"]["calib"]


def test_candidates_without_auto_is_refused(checkpoints, tmp_path, capsys):
    """`--precision int8 --candidates int8:dw-float+stem-int8` exported qdq-all+stem-float and said nothing."""
    code, _, err = run_cli(["export", checkpoints["a"], "--target", "onnx", "--precision", "int8", "--candidates",
                            "int8:qdq-all+stem-int8", "--out", tmp_path / "out"], capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "--candidates" in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()  # refused before any work
