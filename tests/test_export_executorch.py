"""The ExecuTorch target (XNNPACK delegate) on tiny random-init checkpoints and the synthetic set: parity,
uint8/NHWC input, the undelegated-operator report, INT8 drift of a student that learned through the CLI
(export, score, bench), and the error paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("executorch")
pytest.importorskip("open_clip")

from cli_helpers import run_cli as _cli

from kdiqa_edge.errors import ExportError
from kdiqa_edge.export import ExportConfig, export_checkpoint
from kdiqa_edge.export import executorch as et
from kdiqa_edge.export.pipeline import OUT_LOCK

REPO = Path(__file__).resolve().parents[1]


def _quiet(_):
    pass


@pytest.fixture(scope="module")
def checkpoints(student_checkpoints) -> dict[str, Path]:
    # timm's ViT resamples its position embeddings at 64 px: an op ExecuTorch's edge dialect refuses
    return student_checkpoints("et-checkpoints", {"student": "test_resnet", "vit": "test_vit"})


@pytest.fixture(scope="module")
def exports(tmp_path_factory, checkpoints, small_synthetic) -> dict[str, Path]:
    """FP32 programs of the student: float NCHW input, and uint8 NHWC (normalization in the program)."""
    out = {}
    for name, options in (("float", {}), ("uint8", {"input": "uint8", "layout": "NHWC"})):
        folder = tmp_path_factory.mktemp(f"et-fp32-{name}")
        export_checkpoint(checkpoints["student"], ExportConfig(target="executorch", parity_images=8, **options),
                          folder, data=small_synthetic, progress=False, log=_quiet)
        out[name] = folder
    return out


def _images(data, count: int = 6) -> np.ndarray:
    from kdiqa_edge.data import prepare
    from kdiqa_edge.preprocess import PreprocessSpec

    cache, split = prepare(data, PreprocessSpec(size=64), progress=False)
    return np.asarray(cache.images[split.test[:count]])


def _manifest_entry(folder: Path, label: str) -> dict:
    return json.loads((folder / "manifest.json").read_text())["exports"][label]


def test_fp32_pte_parity_and_the_runtime_reads_its_own_metadata(exports, checkpoints, small_synthetic):
    from kdiqa_edge.models import load_checkpoint
    from kdiqa_edge.preprocess import normalize
    from kdiqa_edge.runtime import QualityModel

    entry = _manifest_entry(exports["float"], "executorch-fp32")
    assert entry["parity"]["passed"] and entry["parity"]["max_abs_diff"] <= 1e-4 and entry["parity"]["images"] == 8
    latency = entry["details"]["latency"]
    assert latency["fp32"]["p50_ms"] > 0 and latency["threads"] == 2
    images = _images(small_synthetic)
    model = load_checkpoint(checkpoints["student"])
    with torch.no_grad():
        expected = model(torch.from_numpy(normalize(images, model.preprocess))).numpy()
    quality_model = QualityModel.load(exports["float"] / "executorch-fp32" / "model.fp32.pte", threads=1)
    assert quality_model.backend.name == "executorch" and quality_model.backend.fixed_batch == 1
    assert quality_model.info.target == "executorch" and quality_model.info.precision == "fp32"
    assert quality_model.info.preprocess.size == 64 and quality_model.info.source["params"] > 0
    np.testing.assert_allclose(quality_model.predict(images, batch_size=4), expected, atol=1e-4, rtol=0)
    assert quality_model.backend._threadpool._threadpool_get_thread_count() == 1  # --threads reaches the pool


def test_uint8_nhwc_input_equals_float_input(exports, small_synthetic):
    from kdiqa_edge.runtime import QualityModel

    entry = _manifest_entry(exports["uint8"], "executorch-fp32")
    assert entry["input"] == {"name": "image", "dtype": "uint8", "layout": "NHWC", "size": 64, "normalized": False}
    images = _images(small_synthetic)
    as_float = QualityModel.load(exports["float"] / "executorch-fp32" / "model.fp32.pte")
    as_uint8 = QualityModel.load(exports["uint8"] / "executorch-fp32" / "model.fp32.pte")
    assert as_uint8.prepare(images).dtype == np.uint8 and as_uint8.prepare(images).shape == images.shape
    np.testing.assert_allclose(as_uint8.predict(images), as_float.predict(images), atol=1e-4, rtol=0)


def test_undelegated_operator_report(exports, tmp_path):
    # a program with one op XNNPACK takes (conv) and one it does not (cumsum): counted from the lowered graph
    from torch import nn

    class ConvCumsum(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return torch.cumsum(self.conv(x), dim=1)

    _, report = et.lower(ConvCumsum().eval(), torch.randn(1, 3, 8, 8), {"format": "1"}, "ConvCumsum")
    assert report.subgraphs == 1 and report.delegated >= 1 and report.undelegated == {"cumsum": 1}
    warned = et.delegation_notes(report, "m.pte")
    assert report.fraction > et.UNDELEGATED_WARN and warned[0].startswith("WARNING:") and "cumsum" in warned[0]
    fine = et.delegation_notes(et.Delegation(subgraphs=2, delegated=99, undelegated={"mm": 1}), "m.pte")
    assert not fine[0].startswith("WARNING") and "1 of 100 operators" in fine[0]

    # the student's report in the manifest and its notes agree with each other
    entry = _manifest_entry(exports["float"], "executorch-fp32")
    delegation = entry["details"]["delegation"]
    assert delegation["subgraphs"] >= 1 and delegation["delegated_ops"] > delegation["undelegated_ops"]
    assert delegation["undelegated_ops"] == sum(delegation["undelegated_by_op"].values())
    assert "getitem" not in delegation["undelegated_by_op"]  # bookkeeping, not a kernel
    assert any(f"{delegation['undelegated_ops']} of " in note for note in entry["notes"])


def test_int8_keeps_head_input_norm_projection_and_stem_in_float(checkpoints):
    from kdiqa_edge.models import load_checkpoint
    from kdiqa_edge.models.score import ScoreModel

    scored = ScoreModel(load_checkpoint(checkpoints["student"]), input="uint8", layout="NHWC")
    graph = torch.export.export(scored, (scored.example_input(1),)).module()
    nodes = {n.name: n for n in graph.graph.nodes}
    keep = et.float_nodes(graph, stem=True)
    scopes = {name: [path for path, _ in (nodes[name].meta.get("nn_module_stack") or {}).values()] for name in keep}
    assert any(any(p.startswith("head") for p in s) for s in scopes.values())
    assert any(any(p.startswith("input_norm") for p in s) for s in scopes.values())
    assert any(s and s[-1] == "model.proj" for s in scopes.values())  # the projection feeding the head
    stem = [name for name, s in scopes.items() if s and s[-1].startswith("model.encoder")]
    assert len(stem) == 1 and et._is_compute(nodes[stem[0]])  # the first conv, nothing else of the encoder
    assert stem[0] not in et.float_nodes(graph, stem=False)

    # after PT2E: the stem conv and the projection's weights are float, the next conv is int8 (its weight
    # and input arrive through dequantize nodes), the head's matmul is float
    calib = np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    converted, _ = et.quantize(scored, calib, stem="float")
    compute = [n for n in converted.graph.nodes if et._is_compute(n)]

    def dequantized(node) -> list[bool]:
        return [et._op_name(arg).startswith("dequantize") if hasattr(arg, "op") else False for arg in node.args[:2]]

    assert dequantized(compute[0]) == [False, False] and dequantized(compute[1]) == [True, True]
    projection = next(n for n in compute if et._op_name(n) == "linear")
    assert dequantized(projection)[1] is False
    assert dequantized(next(n for n in compute if et._op_name(n) == "matmul")) == [False, False]


def test_all_means_every_target_that_makes_the_precision():
    assert "executorch" in ExportConfig(target="all", precision="int8").targets()
    assert "executorch" not in ExportConfig(target="all", precision="fp16").targets()
    assert et.ExecuTorchTarget.supports.tolerance["fp32"] == 1e-4


def test_auto_measures_the_programs_and_ships_the_faster(checkpoints, tmp_path):
    """--target executorch --precision auto: FP32 and PT2E INT8 programs built, measured through the runtime
    (latencies injected, so the choice must follow them), the pick written as model.pte."""
    from kdiqa_edge.export import auto
    from kdiqa_edge.export.base import TARGETS, Examples
    from kdiqa_edge.export.evaluate import torch_reference
    from kdiqa_edge.export.pipeline import artifact_meta
    from kdiqa_edge.models import load_checkpoint
    from kdiqa_edge.runtime import QualityModel

    model = load_checkpoint(checkpoints["student"])
    images = np.random.default_rng(0).integers(0, 256, (24, 64, 64, 3), dtype=np.uint8)
    examples = Examples(parity=images[:4], calib=images[:8], test=images, test_mos=torch_reference(model, images))
    target = TARGETS.get("executorch")
    assert auto.supports_auto(target)
    cfg = ExportConfig(target="executorch", precision="auto", max_drift=1.0, latency_runs=2, max_batch=1,
                       candidates="int8:stem-float")
    ms = {"fp32": 4.0, "int8:stem-float": 1.0}
    result = auto.export_auto(target, model, examples, tmp_path, cfg, artifact_meta(model), log=_quiet,
                              timer=lambda measured, _model, x: ms[measured.name] / 1e3 * len(x))
    rows = {r["name"]: r for r in result.extra["auto"]["candidates"]}
    assert set(rows) == {"fp32", "int8:stem-float"} and rows["int8:stem-float"]["recipe"]["stem"] == "float"
    assert result.extra["auto"]["pick"] == "int8:stem-float" and result.precision == "int8"
    assert rows["int8:stem-float"]["drift"]["srcc_vs_fp32"] > 0.5  # scored through the runtime, vs FP32
    shipped = QualityModel.load(tmp_path / "model.pte")
    assert shipped.info.precision == "int8" and shipped.info.target == "executorch"
    # the pick's phone script, as a named precision writes it (auto shipped the program alone)
    script = tmp_path / "benchmark_on_device.sh"
    assert result.files == [tmp_path / "model.pte", script]
    assert "adb push model.pte /data/local/tmp/kdiqa/model.pte" in script.read_text()
    assert any(note.startswith("on the phone: benchmark_on_device.sh (beside model.pte")
               for note in result.notes)


def test_device_commands():
    lines = et.device_commands("model.int8.pte", threads=4, runs=20)
    assert lines[1] == "adb push model.int8.pte /data/local/tmp/kdiqa/model.int8.pte"
    assert lines[2] == ("adb shell '/data/local/tmp/kdiqa/executor_runner --model_path=/data/local/tmp/kdiqa/"
                        "model.int8.pte --method_name=forward --num_executions=20 --cpu_threads=4'")
    assert "org.pytorch.minibench.BenchmarkActivity" in et.benchmark_app_commands("model.int8.pte")[2]


# --- the CLI end to end: INT8 of a student that learned, then score and bench the .pte -------------------


@pytest.mark.slow
def test_int8_of_a_learned_student_through_the_cli(learned_run, tmp_path, capsys):
    out = tmp_path / "android"
    code, stdout, err = _cli(["export", learned_run, "--profile", REPO / "export" / "android-executorch-int8.yaml",
                              "--calib", "64", "--out", out], capsys)
    assert code == 0, err
    entry = _manifest_entry(out, "executorch-int8")
    pte = out / "executorch-int8" / "model.int8.pte"
    assert [f["path"] for f in entry["files"]] == ["executorch-int8/model.int8.pte",
                                                   "executorch-int8/benchmark_on_device.sh"]
    assert entry["input"]["dtype"] == "uint8" and entry["input"]["layout"] == "NHWC"
    int8 = entry["details"]["int8"]
    assert int8["calibration_images"] == 64 and int8["stem"] == "float" and int8["head"] == "float"
    drift = entry["drift"]
    assert drift["images"] >= 100 and drift["fp32"]["srcc"] >= 0.4  # it learned
    assert abs(drift["delta_srcc"]) <= 0.02 and drift["srcc_vs_fp32"] >= 0.99  # the bound used for ONNX
    assert drift["latency"]["fp32"]["p50_ms"] > 0 and drift["latency"]["int8"]["p50_ms"] > 0
    assert drift["latency"]["threads"] == 2
    slower = drift["latency"]["int8"]["p50_ms"] > drift["latency"]["fp32"]["p50_ms"]
    assert slower == any("SLOWER" in note for note in entry["notes"])
    assert "executor_runner --model_path=/data/local/tmp/kdiqa/model.int8.pte" in stdout  # the on-device command
    assert "--cpu_threads=2" in (out / "executorch-int8" / "benchmark_on_device.sh").read_text()

    images = sorted((_dataset_root(learned_run) / "images").iterdir())[:3]
    code, stdout, err = _cli(["score", pte, *images, "--threads", "1", "--json"], capsys)
    assert code == 0, err
    scores = [json.loads(line)["score"] for line in stdout.splitlines()]
    assert len(scores) == 3 and all(1.0 <= s <= 5.0 for s in scores)
    assert "cpuinfo" not in err  # the C++ runtime's chatter is filtered

    report = tmp_path / "bench.json"
    code, _, err = _cli(["bench", pte, "--reference", learned_run, "--root", _dataset_root(learned_run),
                         "--batch-sizes", "1", "--warmup", "2", "--runs", "5", "--threads", "2",
                         "--max-images", "40", "--json-out", report], capsys)
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(report.read_text())["results"]}
    row = rows["executorch-int8"]  # rows are named by export folder
    assert row["status"] == "ok" and row["format"] == "ExecuTorch" and row["precision"] == "int8"
    assert row["latency"][0]["p50_ms"] > 0 and row["size_mb"] > 0 and row["params"] > 0
    assert row["drift"] is not None and abs(row["drift"]["delta_srcc"]) <= 0.05


def _dataset_root(run: Path) -> Path:
    from kdiqa_edge.config import load_file

    return Path(load_file(run / "config.yaml")["dataset"]["root"])


# --- bad input: one line, non-zero exit, nothing partial -----------------------------------------------


def test_a_model_executorch_cannot_lower_is_one_line(checkpoints, small_synthetic, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = _cli(["export", checkpoints["vit"], "--target", "executorch", "--root", small_synthetic.root,
                         "--out", out], capsys)
    assert code == ExportError.exit_code
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert "ExecuTorch cannot lower test_vit" in lines[0] and "upsample_bicubic2d_aa" in lines[0]
    # no artifact, partial or whole; and no converters' log to point at, since they said nothing
    assert sorted(p.name for p in out.iterdir()) == [OUT_LOCK]  # OUT's lock
    assert "failed.log" not in lines[0]


def test_a_foreign_or_corrupt_pte_is_refused_in_one_line(tmp_path, small_synthetic, capsys):
    with et.quiet():
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

        foreign = tmp_path / "foreign.pte"  # a valid ExecuTorch program from someone else's exporter
        program = torch.export.export(torch.nn.Linear(4, 2).eval(), (torch.randn(1, 4),))
        lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
        foreign.write_bytes(lowered.to_executorch().buffer)
    capsys.readouterr()
    random = tmp_path / "random.pte"  # not UTF-8 where ExecuTorch logs the identifier: it would abort
    random.write_bytes(bytes([0x3C, 0, 0, 0, 0xA6, 0xFF, 0x01, 0x80]) + os.urandom(256))
    corrupt = tmp_path / "corrupt.pte"  # the identifier right, the flatbuffer garbage
    corrupt.write_bytes(b"\x3c\x00\x00\x00ET12" + os.urandom(400))
    truncated = tmp_path / "truncated.pte"
    truncated.write_bytes(foreign.read_bytes()[:-64])
    image = min((small_synthetic.root / "images").iterdir())
    for path, reason in ((foreign, "not a kdiqa-edge export"), (random, "not an ExecuTorch program"),
                         (corrupt, "ExecuTorch cannot load it"), (truncated, "ExecuTorch cannot load it")):
        code, out, err = _cli(["score", path, image], capsys)
        assert code == 2 and not out
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and reason in lines[0], err


def test_without_executorch_or_torch_the_error_names_the_extra(checkpoints, exports, tmp_path):
    """executorch blocked: export and score each fail in one line naming the [android] extra, exit 3, no
    output folder. torch blocked (a torch-free bench machine): the .pte cannot run, said the same way."""
    blocker = tmp_path / "blocked"
    for module in ("executorch", "torch"):
        (blocker / module / module).mkdir(parents=True)
        (blocker / module / module / "__init__.py").write_text(f'raise ImportError("No module named {module} '
                                                               '(blocked by the test)")\n')
    pte = exports["float"] / "executorch-fp32" / "model.fp32.pte"
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (64, 64), (90, 120, 30)).save(image)
    runs = {"export-no-executorch": ("executorch", ["export", checkpoints["student"], "--target", "executorch",
                                                    "--out", tmp_path / "out"]),
            "score-no-executorch": ("executorch", ["score", pte, image]),
            "score-no-torch": ("torch", ["score", pte, image])}
    for name, (module, args) in runs.items():
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker / module), os.environ.get("PYTHONPATH", "")])}
        env.pop("KDIQA_DEBUG", None)
        done = subprocess.run([sys.executable, "-m", "kdiqa_edge", *map(str, args)], capture_output=True, text=True,
                              env=env, timeout=300, check=False)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 3, (name, done.stderr)
        assert len(lines) == 1 and "pip install 'kdiqa-edge[android]'" in lines[0], (name, done.stderr)
    assert not (tmp_path / "out").exists()
