"""The bench harness: model facts, latency statistics, failing-format rows, reports, drift vs a reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_runtime_helpers import SIZE, export_tiny_onnx, quantize_dynamic_int8, tiny_score_model

from kdiqa_edge import artifact
from kdiqa_edge.bench import BenchConfig, LatencyStats, run_bench, time_inference
from kdiqa_edge.bench.facts import onnx_macs, onnx_param_count
from kdiqa_edge.bench.report import markdown, write_markdown, write_plot, write_report_json
from kdiqa_edge.data.spec import DatasetSpec
from kdiqa_edge.preprocess import PreprocessSpec
from kdiqa_edge.runtime import QualityModel

torch = pytest.importorskip("torch")

FAST = {"batch_sizes": (1, 4), "warmup": 1, "runs": 3}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from kdiqa_edge.data.synthetic import generate

    root = generate(tmp_path_factory.mktemp("synthetic") / "set", refs=3, seed=2)
    return DatasetSpec(name="synthetic", root=root)


@pytest.fixture(scope="module")
def student_run(tmp_path_factory):
    """A random-init student saved as a run dir, and its FP32 ONNX export with the artifact metadata."""
    from kdiqa_edge.models import QualityHead, save_checkpoint
    from kdiqa_edge.models.student import create_student

    folder = tmp_path_factory.mktemp("student")
    torch.manual_seed(0)
    head = QualityHead(torch.nn.functional.normalize(torch.randn(5, 32), dim=-1), 14.3)
    student = create_student("test_resnet", head, PreprocessSpec(size=SIZE), pretrained=False).eval()
    save_checkpoint(student, folder / "run" / "checkpoints" / "best")
    return folder / "run", _export_student(student, folder / "student.fp32.onnx")


def _export_student(student, path):
    import warnings

    from kdiqa_edge.export.onnx import set_metadata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(student, (torch.randn(2, 3, SIZE, SIZE),), str(path), input_names=["image"],
                          output_names=["score"], dynamic_axes={"image": {0: "batch"}, "score": {0: "batch"}},
                          opset_version=17, dynamo=False)
    set_metadata(path, {"format": "1", "preprocess": student.preprocess.to_dict(), "precision": "fp32",
                        "target": "onnx", "input": {"name": "image", "dtype": "float32", "layout": "NCHW",
                                                    "size": SIZE, "normalized": True},
                        "outputs": ["score"], "source": {"kind": "student", "arch": "test_resnet"}})
    return path


def test_params_and_macs_from_the_graph_match_torch(tmp_path):
    from torch.utils.flop_counter import FlopCounterMode

    path = export_tiny_onnx(tmp_path / "tiny.onnx")
    model = tiny_score_model()
    weights = sum(p.numel() for p in model.parameters()) + model.weight.numel() + model.levels.numel()
    assert onnx_param_count(path) == weights  # learned weights + the folded head's constants
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, SIZE, SIZE))
    assert onnx_macs(path) == counter.get_total_flops() // 2
    int8 = quantize_dynamic_int8(path, tmp_path / "tiny.int8.onnx")
    assert onnx_param_count(int8) >= weights - model.encoder[6].weight.numel()  # int8 weights still counted


def test_latency_statistics():
    stats = LatencyStats.from_times(4, [0.010, 0.020, 0.030, 0.040])
    assert stats.mean_ms == pytest.approx(25.0) and stats.p50_ms == pytest.approx(25.0)
    assert stats.p90_ms == pytest.approx(37.0) and stats.std_ms == pytest.approx(np.std([10, 20, 30, 40]))
    assert stats.images_per_s == pytest.approx(4 / 0.025)


def test_time_inference_runs_warmup_and_timed_runs(tmp_path):
    model = QualityModel.load(export_tiny_onnx(tmp_path / "tiny.onnx"), threads=1)
    calls = []
    run = model.backend.run
    model.backend.run = lambda x: calls.append(len(x)) or run(x)
    stats = time_inference(model, batch_size=3, warmup=2, runs=5)
    assert calls == [3] * 7 and stats.runs == 5 and stats.batch_size == 3
    assert 0 < stats.p50_ms <= stats.p99_ms and stats.images_per_s > 0


class _Timed:
    """A loaded model that records when it runs; `breaks_after` runs, it raises."""

    def __init__(self, name, calls, breaks_after=None):
        self.name, self.calls, self.breaks_after = name, calls, breaks_after
        self.backend = type("Backend", (), {"synchronize": staticmethod(lambda: None)})()

    def run(self, x):
        self.calls.append((self.name, len(x)))
        if self.breaks_after is not None and sum(n == self.name for n, _ in self.calls) > self.breaks_after:
            raise RuntimeError("device lost")


def test_models_are_timed_side_by_side_in_rotated_rounds():
    from kdiqa_edge.bench.runner import BenchResult, Loaded, time_side_by_side

    calls = []
    items = [Loaded(BenchResult(model=n, name=n, format="ONNX", precision="fp32"), _Timed(n, calls, breaks))
             for n, breaks in (("a", None), ("b", None), ("c", 9))]
    for item in items:
        item.inputs = {1: np.zeros((1, 3)), 4: np.zeros((4, 3))}
    time_side_by_side(items, BenchConfig(batch_sizes=(1, 4), runs=6, rounds=3))
    # batch 1: 3 rounds; each turn 1 untimed + 2 timed runs; the order rotated every round
    first = [name for name, batch in calls if batch == 1][::3]
    assert first == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    a, b, c = (item.result for item in items)
    assert [s.batch_size for s in a.latency] == [1, 4] and a.latency[0].runs == 6 and b.latency[1].runs == 6
    # c broke at batch 4 (its 10th run): a row with the reason, the others still timed
    assert c.status == "failed" and c.stage == "latency" and "device lost" in c.reason
    assert [s.batch_size for s in c.latency] == [1] and items[2].model is None


def test_fp32_onnx_has_no_drift_vs_its_reference_run_and_broken_formats_get_rows(student_run, synthetic, tmp_path):
    run_dir, fp32 = student_run
    int8 = quantize_dynamic_int8(fp32, tmp_path / "student.int8.onnx")
    corrupt = tmp_path / "student.fp16.onnx"
    corrupt.write_bytes(b"not an onnx model")
    header = {**QualityModel.load(fp32).backend.session.get_modelmeta().custom_metadata_map,
              "tensorrt_version": "10.3.0", "gpu": {"name": "Orin", "compute_capability": "8.7"}}
    engine = artifact.write_engine_file(tmp_path / "student.fp16.engine", header, b"\0")
    report = run_bench([fp32, int8, corrupt, engine], reference=run_dir, data=synthetic,
                       cfg=BenchConfig(threads=1, **FAST), progress=False)
    rows = {r.name: r for r in report.results}
    reference = rows["run"]
    assert reference.reference and reference.format == "PyTorch" and reference.status == "ok", reference.reason
    assert reference.params and reference.macs
    onnx_row = rows["student.fp32.onnx"]
    assert onnx_row.status == "ok" and onnx_row.drift is not None
    assert abs(onnx_row.drift.delta_srcc) <= 1e-4 and abs(onnx_row.drift.delta_plcc) <= 1e-4
    assert onnx_row.drift.max_abs_diff <= 1e-4
    assert onnx_row.metrics.n == reference.metrics.n >= 3
    # the graph's initializers: torch's parameters with batch norms folded away and the head as constants
    assert onnx_row.params == pytest.approx(reference.params, rel=0.03)
    assert onnx_row.macs == pytest.approx(reference.macs, rel=0.01)
    assert rows["student.int8.onnx"].status == "ok" and rows["student.int8.onnx"].precision == "int8"
    assert rows["student.fp16.onnx"].status == "failed" and rows["student.fp16.onnx"].stage == "load"
    assert "onnxruntime cannot load" in rows["student.fp16.onnx"].reason
    assert rows["student.fp16.engine"].status == "failed" and "tensorrt" in rows["student.fp16.engine"].reason.lower()
    assert any("2 ONNX Runtime session(s) timed side by side stopped spinning" in n for n in report.notes)
    assert report.dataset["n"] == onnx_row.metrics.n and report.environment["cpu"]

    write_report_json(report, tmp_path / "r.json")
    write_markdown(report, tmp_path / "r.md")
    write_plot(report, tmp_path / "r.png")
    data = json.loads((tmp_path / "r.json").read_text())
    assert [r["status"] for r in data["results"]] == ["ok", "ok", "ok", "failed", "failed"]
    assert data["results"][1]["latency"][0]["batch_size"] == 1
    text = (tmp_path / "r.md").read_text()
    assert text == markdown(report)
    for needle in ("| Model | Format | Precision | Status |", "## Latency", "## Accuracy and drift", "## Failures",
                   "student.fp16.engine", "CPU:"):
        assert needle in text
    # memory: per model what loading it added; the process's peak once, said to be the process's
    facts_header = next(line for line in text.splitlines() if line.startswith("| Model | Backend |"))
    assert "Peak" not in facts_header and facts_header.endswith("| RSS added (MB) |")
    peak = max(r.peak_rss_mb for r in report.results if r.peak_rss_mb is not None)
    assert text.count(f"peaked at {peak:.0f} MB resident, with every model loaded at once") == 1
    from PIL import Image

    with Image.open(tmp_path / "r.png") as plot:
        assert plot.format == "PNG" and plot.width > 300


def test_bench_without_accuracy_still_reports_latency_and_facts(tmp_path):
    path = export_tiny_onnx(tmp_path / "tiny.onnx")
    report = run_bench([path], cfg=BenchConfig(accuracy=False, threads=1, **FAST), progress=False)
    (row,) = report.results
    assert row.status == "ok" and row.metrics is None and row.drift is None and report.dataset is None
    assert [s.batch_size for s in row.latency] == [1, 4] and row.size_mb > 0
    write_plot(report, tmp_path / "p.png")  # latency bars when there is no SRCC to plot
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_same_named_exports_get_distinct_row_names():
    from kdiqa_edge.bench.runner import BenchResult, _distinct_names

    paths = ["/x/run", "/e/resnet18/onnx-fp32/model.fp32.onnx", "/e/teacher/onnx-fp32/model.fp32.onnx",
             "/e/resnet18/onnx-int8/model.int8.onnx"]
    results = [BenchResult(model=p, name="", format="ONNX", precision="fp32") for p in paths]
    _distinct_names(results)
    assert [r.name for r in results] == ["run", "resnet18/onnx-fp32/model.fp32.onnx",
                                         "teacher/onnx-fp32/model.fp32.onnx", "model.int8.onnx"]


def test_a_symlinked_artifact_keeps_its_own_name(tmp_path):
    from kdiqa_edge.bench.runner import BenchResult, _distinct_names

    target = tmp_path / "exports" / "onnx-fp32" / "model.fp32.onnx"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"")
    alias = tmp_path / "resnet18.onnx-fp32.onnx"
    alias.symlink_to(target)
    results = [BenchResult(model=str(alias), name="", format="ONNX", precision="fp32")]
    _distinct_names(results)
    assert results[0].name == "resnet18.onnx-fp32.onnx"
