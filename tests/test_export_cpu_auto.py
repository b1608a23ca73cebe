"""`--precision auto` across runtimes (`--target cpu`, the default for auto) and OpenVINO's own auto: an IR ships
with its weights, the faster runtime wins under injected latencies, a candidate over the bound never does, the
lossy pick is measured against the fastest FP32 of any runtime, and a candidate timed in a process of its own.

Tiny random-init test_resnet students at 64 px; `--candidates` keeps every run to a handful of candidates.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("open_clip")
pytest.importorskip("openvino")

from cli_helpers import run_cli as _cli

from kdiqa_edge.export import TARGETS, Examples, ExportConfig, auto, isolated
from kdiqa_edge.export.auto import Candidate, Measured, choose


@pytest.fixture(scope="module")
def student(tiny_student):
    return tiny_student


@pytest.fixture(scope="module")
def examples(scored_examples) -> Examples:
    return scored_examples(32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, student) -> Path:
    from kdiqa_edge.models import save_checkpoint

    return save_checkpoint(student, tmp_path_factory.mktemp("cpu-auto") / "student")


# --- the choice: the fastest lossless candidate is what a lossy one must beat -----------------------------


def _row(name: str, ms: float, precision: str = "int8", reference: bool = False, lossless: bool = False):
    item = Measured(Candidate(name, precision, build=None, reference=reference, lossless=lossless))
    item.latency = {1: {"p50_ms": ms, "images_per_s": 1e3 / ms}}
    item.drift, item.bytes = {"delta_srcc": 0.0 if reference or lossless else -0.002}, 1_000_000
    return item


def test_min_speedup_is_measured_against_the_fastest_fp32_of_any_runtime():
    rows = [_row("onnx:fp32", 10.0, "fp32", reference=True), _row("openvino:fp32", 6.0, "fp32", lossless=True),
            _row("openvino:int8", 5.0)]
    choice = choose(rows, max_drift=0.01)  # 2x ONNX Runtime's FP32, but 1.2x OpenVINO's: not worth its drift
    assert choice.pick.name == "openvino:fp32" and choice.declined == "openvino:int8"
    assert "is 1.20x the speed of openvino:fp32" in choice.why
    assert choose(rows, max_drift=0.01, min_speedup=1.0).pick.name == "openvino:int8"
    lossless_pick = choose(rows[:2], max_drift=0.01)  # a lossless pick is never held to min_speedup
    assert lossless_pick.pick.name == "openvino:fp32" and "1.67x the speed of onnx:fp32" in lossless_pick.why
    # the lossless candidates join the runoff when the ratio is in doubt, as the reference does
    assert [r.name for r in auto.contenders(rows, max_drift=0.01)] == ["openvino:fp32", "openvino:int8"]


# --- OpenVINO's own auto: the IR and its weights ship together -------------------------------------------


def test_openvino_auto_ships_the_ir_with_its_bin(checkpoint, small_synthetic, tmp_path, capsys):
    from kdiqa_edge.runtime import QualityModel

    out = tmp_path / "exports"
    code, stdout, err = _cli(["export", str(checkpoint), "--dataset", "synthetic", "--root", str(small_synthetic.root),
                              "--target", "openvino", "--precision", "auto", "--candidates", "int8:stem-int8",
                              "--max-drift", "2", "--calib", "16", "--out", str(out)], capsys)
    assert code == 0, err
    entry = json.loads((out / "manifest.json").read_text())["exports"]["openvino-auto"]
    files = {f["path"]: f for f in entry["files"]}
    assert list(files) == ["openvino-auto/model.xml", "openvino-auto/model.bin"]
    assert all((out / path).is_file() and f["bytes"] == (out / path).stat().st_size for path, f in files.items())
    rows = {r["name"]: r for r in entry["details"]["auto"]["candidates"]}
    assert list(rows) == ["fp32", "int8:stem-int8"] and all(r["runtime"] == "openvino" for r in rows.values())
    # a candidate's size is its .xml and its .bin
    assert rows["fp32"]["bytes"] > (out / "openvino-auto" / "model.xml").stat().st_size
    shipped = QualityModel.load(out / "openvino-auto" / "model.xml")
    assert shipped.info.precision == entry["precision"] == rows[entry["details"]["auto"]["pick"]]["precision"]
    assert f"{out / 'openvino-auto' / 'model.xml'}" in stdout and "model.bin" in stdout


# --- across runtimes --------------------------------------------------------------------------------------


class CpuWithReversed:
    """The cpu target plus an ONNX Runtime candidate whose scores run backwards (6 - score): far over any bound."""

    name = "cpu"
    auto_file = None
    rank = staticmethod(TARGETS.get("cpu").rank)  # each candidate timed in processes of its own
    supports = TARGETS.get("cpu").supports

    def candidates(self, model, examples, cfg, meta, work):
        found = TARGETS.get("cpu").candidates(model, examples, cfg, meta, work)
        reference = found[0]

        def reversed_scores(folder: Path) -> Path:
            from onnx import helper, numpy_helper

            path = reference.build(folder)
            graph = onnx.load(str(path))
            for node in graph.graph.node:
                node.output[:] = ["forward_score" if o == "score" else o for o in node.output]
            graph.graph.initializer.append(numpy_helper.from_array(np.array(6.0, np.float32), "six"))
            graph.graph.node.append(helper.make_node("Sub", ["six", "forward_score"], ["score"], name="reverse"))
            onnx.save(graph, str(path))
            return path

        return [*found, Candidate("onnx:reversed", "fp32", reversed_scores, runtime="onnx", file="model.onnx",
                                  extra=reference.extra)]

    def left_out(self, cfg):
        return TARGETS.get("cpu").left_out(cfg)


def test_auto_across_runtimes_with_an_injected_timer(student, examples, tmp_path):
    pytest.importorskip("executorch")
    from kdiqa_edge.export.pipeline import artifact_meta
    from kdiqa_edge.runtime import QualityModel

    ms = {"onnx:fp32": 5.0, "openvino:fp32": 2.0, "openvino:int8:stem-int8": 1.8, "executorch:fp32": 4.0,
          "onnx:reversed": 0.3}
    timed = set()

    def timer(measured, model, x):  # fake seconds per run by candidate: the choice must follow these
        timed.add(measured.name)
        return ms[measured.name] / 1e3 * len(x)

    cfg = ExportConfig(target="cpu", precision="auto", max_drift=1.0, latency_runs=5,
                       candidates=",".join(name for name in ms if name != "onnx:fp32"))
    result = auto.export_auto(CpuWithReversed(), student, examples, tmp_path, cfg, artifact_meta(student),
                              timer=timer, log=lambda _: None)
    details = result.extra["auto"]
    rows = {r["name"]: r for r in details["candidates"]}
    # every candidate, with its runtime; ONNX Runtime's FP32 the drift reference, the others' FP32 lossless
    assert set(rows) == set(ms) and timed == set(ms)
    assert {name: r["runtime"] for name, r in rows.items()} == {name: name.split(":")[0] for name in ms}
    assert rows["onnx:fp32"]["reference"] and rows["openvino:fp32"]["lossless"] and rows["executorch:fp32"]["lossless"]
    # the fastest is over the bound: never shipped; OpenVINO's INT8 is 1.11x OpenVINO's f32: under min_speedup
    assert rows["onnx:reversed"]["within_bound"] is False and rows["onnx:reversed"]["drift"]["delta_srcc"] < -1.9
    assert details["pick"] == "openvino:fp32" and details["runtime"] == "openvino"
    assert details["declined"] == "openvino:int8:stem-int8" and "openvino:fp32" in details["why"]
    assert details["timing"]["protocol"] == "side by side in one process"  # an injected timer times in process
    assert [p.name for p in result.files] == ["model.xml", "model.bin"] and result.precision == "fp32"
    assert result.parity["passed"] and result.extra["input"]["dtype"] == "float32"
    assert "runtime" in result.notes[1]  # the table's runtime column
    assert any(line.startswith("* openvino:fp32") and " openvino " in line for line in result.notes)
    assert QualityModel.load(tmp_path / "model.xml").backend.name == "openvino"


def test_openvino_int8_with_bf16_float_regions_is_a_cpu_auto_candidate_where_the_cpu_has_bf16(
        student, examples, tmp_path, monkeypatch):
    """`openvino:int8:bf16+stem-*`: offered where the CPU has BF16 kernels, its drift measured on its own
    scores, shipped with bf16 recorded when it is the fastest within the bound; one line where the CPU lacks
    BF16."""
    from kdiqa_edge.export import openvino as ovt
    from kdiqa_edge.export.pipeline import artifact_meta
    from kdiqa_edge.runtime import QualityModel

    cpu, names = TARGETS.get("cpu"), ["openvino:int8:stem-int8", "openvino:int8:bf16+stem-int8"]
    if ovt.bf16_here():
        ms = {"onnx:fp32": 5.0, names[0]: 2.0, names[1]: 1.0}

        def timer(measured, model, x):
            return ms[measured.name] / 1e3 * len(x)

        cfg = ExportConfig(target="cpu", precision="auto", max_drift=1.0, latency_runs=5, calib=16,
                           candidates=",".join(names))
        (tmp_path / "out").mkdir()
        result = auto.export_auto(cpu, student, examples, tmp_path / "out", cfg, artifact_meta(student), timer=timer,
                                  log=lambda _: None)
        details = result.extra["auto"]
        rows = {r["name"]: r for r in details["candidates"]}
        assert list(rows) == ["onnx:fp32", *names] and all(r["status"] == "ok" for r in rows.values())
        assert [rows[n]["recipe"]["float_regions"] for n in names] == ["f32", "bf16"]
        # the same quantized graph, its float regions in bf16: its own scores, so its own drift
        assert rows[names[1]]["drift"]["mean_abs_diff_vs_fp32"] != rows[names[0]]["drift"]["mean_abs_diff_vs_fp32"]
        assert details["pick"] == names[1] and result.precision == "int8"
        shipped = QualityModel.load(tmp_path / "out" / "model.xml")
        assert shipped.info.meta["inference_precision"] == "bf16" and shipped.backend.inference_precision == "bf16"
    # a CPU without AVX512-BF16 or AMX-BF16 (the openvino target's candidates there: test_export_openvino.py)
    monkeypatch.setattr(ovt, "bf16_here", lambda: False)
    said = [line for line in cpu.left_out() if line.startswith("openvino int8:bf16+stem-float, int8:bf16+stem-int8: ")]
    assert len(said) == 1 and "neither AVX512-BF16 nor AMX-BF16" in said[0]


def test_cli_auto_without_a_target_is_cpu_auto_timed_in_processes(checkpoint, small_synthetic, tmp_path, capsys,
                                                                     monkeypatch):
    monkeypatch.setattr(isolated, "TURN_SECONDS", 0.2)  # a turn: one fresh process, 0.2 s timed per batch size
    monkeypatch.setattr(isolated, "ISOLATED_ROUNDS", 2)
    monkeypatch.setattr(isolated, "ISOLATED_RUNOFF_ROUNDS", 2)
    out = tmp_path / "exports"
    code, stdout, err = _cli(["export", str(checkpoint), "--dataset", "synthetic", "--root", str(small_synthetic.root),
                              "--precision", "auto", "--candidates", "openvino:fp32", "--out", str(out)], capsys)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["exports"]) == ["cpu-auto"]
    entry = manifest["exports"]["cpu-auto"]
    details = entry["details"]["auto"]
    rows = {r["name"]: r for r in details["candidates"]}
    assert list(rows) == ["onnx:fp32", "openvino:fp32"]
    assert [r["runtime"] for r in rows.values()] == ["onnx", "openvino"]
    assert all(r["status"] == "ok" and r["latency"]["1"]["p50_ms"] > 0 and r["latency"]["1"]["runs"] >= 6
               for r in rows.values())  # at least 3 timed runs per turn, 2 turns
    assert details["timing"]["protocol"].startswith("each turn a fresh process")
    pick = rows[details["pick"]]
    expected = {"onnx": ["cpu-auto/model.onnx"], "openvino": ["cpu-auto/model.xml", "cpu-auto/model.bin"]}
    assert [f["path"] for f in entry["files"]] == expected[pick["runtime"]]
    assert "each in processes of its own" in stdout and f"* {details['pick']}" in stdout
    assert f"the fastest of {details['rounds']} alternated turns' medians" in stdout  # as ranked_by says
    assert stdout.splitlines()[-1].startswith(f"next: kdiqa-edge bench {out / entry['files'][0]['path']}")


def test_a_turn_in_a_process_of_its_own(student, examples, tmp_path):
    from kdiqa_edge.errors import ExportError
    from kdiqa_edge.export.measure import in_own_process
    from kdiqa_edge.export.pipeline import artifact_meta

    cfg = ExportConfig(precision="auto")
    reference = TARGETS.get("onnx").candidates(student, examples, cfg, artifact_meta(student), tmp_path / "w")[0]
    (tmp_path / "fp32").mkdir()
    path = reference.build(tmp_path / "fp32")
    np.save(tmp_path / "pixels.npy", examples.test[:2])
    times = in_own_process(path, tmp_path / "pixels.npy", (1, 2), 0.2, threads=1)
    assert set(times) == {1, 2} and all(len(runs) >= 3 and min(runs) > 0 for runs in times.values())
    assert float(np.median(times[1])) * 1e3 > 0  # the p50 in ms auto ranks by
    with pytest.raises(ExportError, match="its timing process failed"):
        in_own_process(tmp_path / "missing.onnx", tmp_path / "pixels.npy", (1,), 0.1, threads=1)


def test_isolated_timing_ranks_each_candidate_by_its_least_disturbed_turn(monkeypatch, tmp_path):
    """Other jobs only slow a turn down: two loaded turns of three must not sink the faster runtime (pooled, its
    median would be 9 ms against the other's 5)."""
    from kdiqa_edge.export import measure

    turns = {"openvino:int8": iter([[4.5e-3] * 3, [9e-3] * 3, [9e-3] * 3] + [[4.6e-3] * 3] * 3),
             "executorch:int8": iter([[5e-3] * 3] * 6), "onnx:fp32": iter([[20e-3] * 3] * 6)}
    monkeypatch.setattr(measure, "in_own_process", lambda path, sample, batches, *args: {
        b: next(turns[path.name]) for b in batches})
    rows = []
    for name in turns:
        row = _row(name, 1.0, "fp32" if name == "onnx:fp32" else "int8", reference=name == "onnx:fp32")
        row.path = tmp_path / name
        rows.append(row)
    choice = isolated.rank_isolated(rows, np.zeros((2, 64, 64, 3), np.uint8), ExportConfig(precision="auto", max_batch=1),
                                max_drift=0.01, work=tmp_path / "t", log=lambda _: None, rounds=3)
    fast = rows[0]
    assert fast.latency[1]["p50_ms"] == 4.5 and fast.latency[1]["all_runs_p50_ms"] == 9.0
    assert fast.latency[1]["turns"] == 3 and fast.runoff[1]["p50_ms"] == 4.6
    assert choice.pick.name == "openvino:int8"
