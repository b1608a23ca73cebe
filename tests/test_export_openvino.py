"""The OpenVINO target and backend on tiny random-init checkpoints and the synthetic set: IR parity at f32, uint8/NHWC
input through PrePostProcessor, the metadata round trip through rt_info, the INT8 float regions and NNCF settings,
BF16 and INT8 drift of a student that learned (through the CLI), score/bench on .xml without torch, and the
missing-openvino errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ov = pytest.importorskip("openvino")
pytest.importorskip("nncf")
pytest.importorskip("open_clip")

from cli_helpers import run_cli as _cli

from kdiqa_edge.errors import ConfigError, MissingDependency
from kdiqa_edge.export import ExportConfig, export_checkpoint
from kdiqa_edge.export import openvino as ovt

REPO = Path(__file__).resolve().parents[1]


def _quiet(_):
    pass


@pytest.fixture(scope="module")
def checkpoints(student_checkpoints) -> dict[str, Path]:
    return student_checkpoints("ov-checkpoints", {"student": "test_resnet", "vit": "test_vit",
                                                  "silu": "test_efficientnet"})


@pytest.fixture(scope="module")
def exports(tmp_path_factory, checkpoints, small_synthetic) -> dict[str, Path]:
    """f32 IRs of the student: float NCHW input, and uint8 NHWC (the PrePostProcessor's)."""
    out = {}
    for name, options in (("float", {}), ("uint8", {"input": "uint8", "layout": "NHWC"})):
        folder = tmp_path_factory.mktemp(f"ov-fp32-{name}")
        export_checkpoint(checkpoints["student"], ExportConfig(target="openvino", parity_images=8, **options),
                          folder, data=small_synthetic, progress=False, log=_quiet)
        out[name] = folder / "openvino-fp32" / "model.fp32.xml"
    return out


def _images(data, count: int = 6) -> np.ndarray:
    from kdiqa_edge.data import prepare
    from kdiqa_edge.preprocess import PreprocessSpec

    cache, split = prepare(data, PreprocessSpec(size=64), progress=False)
    return np.asarray(cache.images[split.test[:count]])


def _entry(xml: Path, label: str = "openvino-fp32") -> dict:
    return json.loads((xml.parents[1] / "manifest.json").read_text())["exports"][label]


def test_f32_ir_parity_and_the_metadata_round_trip_through_rt_info(exports, checkpoints, small_synthetic):
    from kdiqa_edge.models import load_checkpoint
    from kdiqa_edge.preprocess import normalize
    from kdiqa_edge.runtime import QualityModel

    entry = _entry(exports["float"])
    assert [f["path"] for f in entry["files"]] == ["openvino-fp32/model.fp32.xml", "openvino-fp32/model.fp32.bin"]
    assert entry["parity"]["passed"] and entry["parity"]["max_abs_diff"] <= 1e-4 and entry["parity"]["images"] == 8
    assert entry["details"]["latency"]["fp32"]["p50_ms"] > 0 and entry["details"]["weights"] == "fp32"

    # the .xml alone carries the kdiqa_edge.* keys, in rt_info
    read = ov.Core().read_model(str(exports["float"]))
    assert read.get_rt_info(["kdiqa_edge", "precision"]).astype(str) == "fp32"
    assert read.get_rt_info(["kdiqa_edge", "inference_precision"]).astype(str) == "f32"
    assert json.loads(read.get_rt_info(["kdiqa_edge", "score_range"]).astype(str)) == [1, 5]

    quality_model = QualityModel.load(exports["float"], threads=1)
    info = quality_model.info
    assert quality_model.backend.name == "openvino" and quality_model.backend.device == "cpu"
    assert info.target == "openvino" and info.precision == "fp32" and info.preprocess.size == 64
    assert info.pretrained is False and info.source["arch"] == "test_resnet" and info.source["params"] > 0
    assert info.input.dtype == "float32" and info.input.layout == "NCHW"
    # f32 is applied, though OpenVINO's CPU default here (AVX512-BF16) would be bf16
    assert quality_model.backend.inference_precision == "f32" and quality_model.notes == []

    images = _images(small_synthetic)
    model = load_checkpoint(checkpoints["student"])
    with torch.no_grad():
        expected = model(torch.from_numpy(normalize(images, model.preprocess))).numpy()
    np.testing.assert_allclose(quality_model.predict(images, batch_size=4), expected, atol=1e-4, rtol=0)


def test_uint8_nhwc_input_through_the_prepostprocessor_equals_float_input(exports, small_synthetic):
    from kdiqa_edge.runtime import QualityModel

    assert _entry(exports["uint8"])["input"] == {"name": "image", "dtype": "uint8", "layout": "NHWC", "size": 64,
                                                 "normalized": False}
    graph = ov.Core().read_model(str(exports["uint8"]))
    port = graph.input("image")
    assert port.get_element_type() == ov.Type.u8 and str(port.get_partial_shape()) == "[?,64,64,3]"
    types = [op.get_type_name() for op in graph.get_ordered_ops()]
    # the PrePostProcessor's convert, mean and scale sit in front of the float graph (the ONNX had no InputNorm)
    assert types[1] == "Convert" and "Subtract" in types[:6] and "Multiply" in types[:7] and "Transpose" in types[:9]
    assert not any("/input_norm/" in op.get_friendly_name() for op in graph.get_ordered_ops())

    images = _images(small_synthetic)
    as_float = QualityModel.load(exports["float"])
    as_uint8 = QualityModel.load(exports["uint8"])
    assert as_uint8.prepare(images).dtype == np.uint8 and as_uint8.prepare(images).shape == images.shape
    np.testing.assert_allclose(as_uint8.predict(images), as_float.predict(images), atol=1e-4, rtol=0)


def _examples(model, count: int = 16):
    from kdiqa_edge.export.base import Examples
    from kdiqa_edge.export.evaluate import torch_reference

    images = np.random.default_rng(0).integers(0, 256, (count, 64, 64, 3), dtype=np.uint8)
    return Examples(parity=images[:4], calib=images[:8], test=images, test_mos=torch_reference(model, images))


def _weight_types(graph) -> dict[str, str]:
    """Conv/MatMul friendly name -> the element type of the constant its weights come from (i8 when quantized)."""
    found = {}
    for op in graph.get_ordered_ops():
        if op.get_type_name() not in ("Convolution", "MatMul"):
            continue
        node = op.input_value(1).get_node()
        while node.get_type_name() != "Constant" and node.inputs():
            node = node.input_value(0).get_node()
        found[op.get_friendly_name()] = node.get_element_type().get_type_name()
    return found


def _fake_quantized_inputs(graph) -> set[str]:
    """Friendly names of the ops an activation FakeQuantize feeds."""
    return {target.get_node().get_friendly_name() for op in graph.get_ordered_ops()
            if op.get_type_name() == "FakeQuantize" for target in op.output(0).get_target_inputs()}


def test_int8_keeps_head_projection_and_stem_in_float(checkpoints, tmp_path):
    from kdiqa_edge.export.pipeline import artifact_meta
    from kdiqa_edge.models import load_checkpoint

    model = load_checkpoint(checkpoints["student"])
    examples = _examples(model)
    onnx_path = ovt.fp32_onnx(model, ExportConfig(), tmp_path)
    weights = {}
    for stem in ("float", "int8"):
        (tmp_path / stem).mkdir()
        cfg = ExportConfig(target="openvino", precision="int8", int8_stem=stem)
        path, int8, meta = ovt.write_ir(model, onnx_path, examples, tmp_path / stem, cfg, artifact_meta(model),
                                        "int8", stem)
        graph = ov.Core().read_model(str(path))
        weights[stem], fed = _weight_types(graph), _fake_quantized_inputs(graph)
        assert int8["preset"] == "performance" and int8["model_type"] == "default"  # a ReLU net, no attention
        assert meta["precision"] == "int8" and meta["inference_precision"] == "f32"
        assert not any(name.startswith(("/head/", "/proj/")) or name == "score" for name in fed)
        assert weights[stem]["/proj/Gemm/WithoutBiases"] == "f32" and weights[stem]["/head/MatMul"] == "f32"
    stem_conv = "/encoder/conv1/conv1.0/Conv/WithoutBiases"
    second = "/encoder/conv1/conv1.3/Conv/WithoutBiases"
    assert weights["float"][stem_conv] == "f32" and weights["int8"][stem_conv] == "i8"
    assert weights["float"][second] == "i8"

    # reproducible bytes: the same IR again in this process (OpenVINO numbers unnamed ops per process)
    (tmp_path / "again").mkdir()
    cfg = ExportConfig(target="openvino", precision="int8")
    again, _, _ = ovt.write_ir(model, onnx_path, examples, tmp_path / "again", cfg, artifact_meta(model), "int8")
    first = tmp_path / "float" / again.name
    assert again.read_bytes() == first.read_bytes()
    assert again.with_suffix(".bin").read_bytes() == first.with_suffix(".bin").read_bytes()


def test_int8_float_regions_in_bf16_are_the_same_graph_with_the_hint_recorded(checkpoints, tmp_path, monkeypatch):
    """`int8:bf16+stem-*`: the same quantized IR (its .bin byte for byte), bf16 recorded as the inference
    precision its float regions run in and applied by the runtime on a CPU with BF16 kernels; an auto
    candidate only there, a one-line reason elsewhere."""
    from kdiqa_edge.export.pipeline import artifact_meta
    from kdiqa_edge.models import load_checkpoint
    from kdiqa_edge.runtime import QualityModel
    from kdiqa_edge.runtime.openvino import HINTS

    model = load_checkpoint(checkpoints["student"])
    examples = _examples(model)
    onnx_path = ovt.fp32_onnx(model, ExportConfig(), tmp_path)
    cfg = ExportConfig(target="openvino", precision="int8")
    paths = {}
    for floats in ("f32", "bf16"):
        (tmp_path / floats).mkdir()
        paths[floats], int8, meta = ovt.write_ir(model, onnx_path, examples, tmp_path / floats, cfg,
                                                 artifact_meta(model), "int8", "float", floats)
        assert meta["precision"] == "int8" and meta["inference_precision"] == int8["inference_precision"] == floats
        assert ov.Core().read_model(str(paths[floats])).get_rt_info(
            ["kdiqa_edge", "inference_precision"]).astype(str) == floats
    assert paths["bf16"].with_suffix(".bin").read_bytes() == paths["f32"].with_suffix(".bin").read_bytes()
    with pytest.raises(ConfigError, match="only an int8 IR has float regions"):
        ovt.write_ir(model, onnx_path, examples, tmp_path, cfg, artifact_meta(model), "fp32", None, "bf16")

    as_f32, as_bf16 = QualityModel.load(paths["f32"], threads=1), QualityModel.load(paths["bf16"], threads=1)
    assert as_f32.backend.inference_precision == "f32"
    here = HINTS["bf16"] in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert here == ovt.bf16_here()  # OpenVINO's own view of the CPU agrees with the ISA flags auto goes by
    if here:  # bf16 applied: the scores move, by bf16's rounding of the float regions, not more
        assert as_bf16.backend.inference_precision == "bf16" and as_bf16.notes == []
        moved = np.abs(as_bf16.predict(examples.test) - as_f32.predict(examples.test))
        assert 0 < moved.max() < 0.05
    else:
        assert as_bf16.backend.inference_precision == "f32" and "recorded inference precision bf16" in as_bf16.notes[0]

    target = ovt.OpenVinoTarget()
    recipes = {c.name: c.recipe for c in target.candidates(model, examples, cfg, artifact_meta(model), tmp_path / "a")}
    bf16_floats = {"int8:bf16+stem-float", "int8:bf16+stem-int8"}
    assert (bf16_floats <= set(recipes)) == ovt.bf16_here()
    assert recipes["int8:stem-float"]["float_regions"] == "f32"
    for name in bf16_floats & set(recipes):
        assert recipes[name]["float_regions"] == recipes[name]["inference_precision"] == "bf16"
    monkeypatch.setattr(ovt, "bf16_here", lambda: False)  # a CPU without AVX512-BF16 or AMX-BF16
    names = [c.name for c in target.candidates(model, examples, cfg, artifact_meta(model), tmp_path / "b")]
    assert names == ["fp32", "int8:stem-float", "int8:stem-int8"]
    (line,) = [line for line in target.left_out(cfg) if "int8:bf16" in line]
    assert line.startswith("openvino int8:bf16+stem-float, int8:bf16+stem-int8: this CPU has neither AVX512-BF16")


def test_nncf_settings_come_from_the_graph(checkpoints, tmp_path):
    from kdiqa_edge.export.pipeline import artifact_meta
    from kdiqa_edge.models import load_checkpoint
    from kdiqa_edge.runtime import QualityModel

    facts = {}
    for name in ("student", "vit", "silu"):
        (tmp_path / name).mkdir()
        onnx_path = ovt.fp32_onnx(load_checkpoint(checkpoints[name]), ExportConfig(), tmp_path / name)
        graph = ovt.convert(onnx_path)
        facts[name] = ovt.graph_facts(graph, ignore=set(ovt.float_names(graph, onnx_path, stem=True)))
    assert facts["student"].preset == "performance" and facts["student"].model_type is None
    assert facts["vit"].attention >= 1 and facts["vit"].model_type == "transformer" and facts["vit"].preset == "mixed"
    assert facts["silu"].attention == 0 and "Swish" in facts["silu"].negative_activations
    assert facts["silu"].preset == "mixed" and facts["silu"].model_type is None

    # the transformer path of nncf.quantize, end to end: uint8 NHWC input, scores near torch's
    vit = load_checkpoint(checkpoints["vit"])
    examples = _examples(vit)
    cfg = ExportConfig(target="openvino", precision="int8", input="uint8", layout="NHWC")
    path, int8, _ = ovt.write_ir(vit, tmp_path / "vit" / "model.fp32.onnx", examples, tmp_path / "vit", cfg,
                                 artifact_meta(vit), "int8")
    assert int8["model_type"] == "transformer" and int8["preset"] == "mixed" and "attention" in int8["graph"]["why"]
    scores = QualityModel.load(path).predict(examples.test)
    # test_mos holds the torch scores: a random-init ViT on noise, calibrated on 8 images, stays near them
    assert np.abs(scores - examples.test_mos).mean() < 0.06 and np.corrcoef(scores, examples.test_mos)[0, 1] > 0.9


def test_fp16_is_an_inference_precision_over_fp16_weights(checkpoints, tmp_path, exports):
    from kdiqa_edge.export.pipeline import artifact_meta
    from kdiqa_edge.models import load_checkpoint
    from kdiqa_edge.runtime import QualityModel
    from kdiqa_edge.runtime.openvino import HINTS

    model = load_checkpoint(checkpoints["student"])
    onnx_path = ovt.fp32_onnx(model, ExportConfig(), tmp_path)
    path, _, meta = ovt.write_ir(model, onnx_path, _examples(model), tmp_path, ExportConfig(target="openvino"),
                                 artifact_meta(model), "fp16")
    assert meta["inference_precision"] == "f16"
    fp32_bin = exports["float"].with_suffix(".bin").stat().st_size
    assert path.with_suffix(".bin").stat().st_size < 0.6 * fp32_bin  # the weights are FP16 in the file
    quality_model = QualityModel.load(path)
    capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if HINTS["f16"] in capabilities:  # AVX512-FP16 (Sapphire Rapids) or ARM
        assert quality_model.backend.inference_precision == "f16" and quality_model.notes == []
    else:  # the CPU runs the nearest it has, and says so
        assert quality_model.backend.inference_precision in ("bf16", "f32")
        assert quality_model.notes and "recorded inference precision f16" in quality_model.notes[0]


@pytest.mark.slow
def test_bf16_and_int8_of_a_learned_student_stay_within_the_bound(learned_run, tmp_path, capsys):
    drifts = {}
    for precision in ("bf16", "int8"):
        out = tmp_path / precision
        args = (["--profile", REPO / "export" / "intel-cpu-openvino-int8.yaml", "--calib", "64"]
                if precision == "int8" else ["--target", "openvino", "--precision", "bf16"])
        code, _, err = _cli(["export", learned_run, *args, "--out", out], capsys)
        assert code == 0, err
        entry = json.loads((out / "manifest.json").read_text())["exports"][f"openvino-{precision}"]
        assert [Path(f["path"]).name for f in entry["files"]] == [f"model.{precision}.xml", f"model.{precision}.bin"]
        drifts[precision] = drift = entry["drift"]
        assert drift["images"] >= 100 and drift["fp32"]["srcc"] >= 0.4  # it learned
        assert abs(drift["delta_srcc"]) <= 0.02 and drift["srcc_vs_fp32"] >= 0.99  # the bound used for ONNX
        assert drift["latency"]["fp32"]["p50_ms"] > 0 and drift["latency"][precision]["p50_ms"] > 0
        assert drift["latency"]["runs_in"]["fp32"] == "f32"
        assert any(note.startswith(f"model.{precision}.xml: drift vs FP32") for note in entry["notes"])
    int8 = json.loads((tmp_path / "int8" / "manifest.json").read_text())["exports"]["openvino-int8"]
    assert int8["input"]["dtype"] == "uint8" and int8["input"]["layout"] == "NHWC"  # the profile's
    assert int8["details"]["int8"]["calibration_images"] == 64 and int8["details"]["int8"]["stem"] == "float"
    assert int8["details"]["int8"]["preset"] == "performance"
    assert int8["details"]["int8"]["activation_ranges"] == "MINMAX"  # --calib-method minmax, the default
    # within auto's default bound (--max-drift 0.01); NNCF's own range estimator (per-image means) drifted
    # |ΔSRCC| 0.019 and mean |Δscore| 0.055 on this student, MINMAX 0.002 and 0.036
    assert abs(drifts["int8"]["delta_srcc"]) <= 0.01 and drifts["int8"]["mean_abs_diff_vs_fp32"] <= 0.045
    assert abs(drifts["bf16"]["delta_srcc"]) <= 0.01
    print("openvino drift on the learned student:", {p: {k: round(d[k], 4) for k in (
        "delta_srcc", "mean_abs_diff_vs_fp32", "max_abs_diff_vs_fp32")} for p, d in drifts.items()})


@pytest.mark.slow
def test_int8_with_bf16_float_regions_of_a_learned_student_stays_within_the_bound(learned_run, tmp_path, capsys):
    """auto's `int8:bf16+stem-*` candidates, each measured against the f32 IR on the learned student's test split:
    within the bound, and recorded as such (on a CPU without BF16 they are not offered, and --candidates says
    which are)."""
    names = ["int8:bf16+stem-float", "int8:bf16+stem-int8"]
    out = tmp_path / "auto"
    code, _, err = _cli(["export", learned_run, "--target", "openvino", "--precision", "auto", "--candidates",
                         ",".join(names), "--calib", "64", "--max-batch", "1", "--out", out], capsys)
    if not ovt.bf16_here():
        assert code != 0 and "unknown candidate(s) int8:bf16+stem-float, int8:bf16+stem-int8" in err
        return
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads((out / "manifest.json").read_text())[
        "exports"]["openvino-auto"]["details"]["auto"]["candidates"]}
    assert list(rows) == ["fp32", *names]
    for name in names:
        drift = rows[name]["drift"]
        assert rows[name]["status"] == "ok" and rows[name]["recipe"]["float_regions"] == "bf16"
        assert drift["images"] >= 100 and rows["fp32"]["drift"]["srcc"] >= 0.4  # it learned
        # auto's default bound (--max-drift 0.01), as int8:stem-* (f32 float regions) meet it on this student
        assert abs(drift["delta_srcc"]) <= 0.01 and drift["srcc_vs_fp32"] >= 0.99 and rows[name]["within_bound"]
        assert drift["mean_abs_diff_vs_fp32"] <= 0.045
    print("openvino int8 with bf16 float regions, drift on the learned student:", {n: {k: round(rows[n]["drift"][k], 4)
          for k in ("delta_srcc", "mean_abs_diff_vs_fp32", "max_abs_diff_vs_fp32")} for n in names})


# --- torch-free: score and bench on .xml ------------------------------------------------------------------


def _blocked(tmp_path_factory, *modules: str) -> dict:
    """An environment where importing each of `modules` raises ImportError, like a machine without them."""
    blocker = tmp_path_factory.mktemp("blocked")
    for module in modules:
        (blocker / module).mkdir()
        (blocker / module / "__init__.py").write_text(f'raise ImportError("No module named {module} (blocked)")\n')
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(blocker), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    env.pop("KDIQA_DEBUG", None)
    return env


def _run(args: list, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdiqa_edge", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_score_and_bench_on_xml_without_torch(exports, small_synthetic, tmp_path, tmp_path_factory):
    env = _blocked(tmp_path_factory, "torch")
    images = sorted((Path(small_synthetic.root) / "images").iterdir())[:3]
    out = _run(["score", exports["uint8"], *images, "--json", "--threads", "1", "--provider", "cpu"], env)
    assert out.returncode == 0, out.stderr
    scores = [json.loads(line)["score"] for line in out.stdout.splitlines()]
    assert len(scores) == 3 and all(1.0 <= s <= 5.0 for s in scores)

    report = tmp_path / "bench.json"
    out = _run(["bench", exports["uint8"], "--reference", exports["float"], "--dataset", "synthetic", "--root",
                small_synthetic.root, "--batch-sizes", "1,4", "--warmup", "1", "--runs", "3", "--threads", "1",
                "--max-images", "20", "--json-out", report], env)
    assert out.returncode == 0, out.stderr
    rows = {r["model"]: r for r in json.loads(report.read_text())["results"]}
    row = rows[str(exports["uint8"])]
    assert row["status"] == "ok" and row["precision"] == "fp32" and row["params"] > 0
    assert row["format"] == "OpenVINO"  # the IR's size is its .xml and its weights' .bin
    xml = Path(exports["uint8"])
    assert row["size_mb"] * 1e6 == pytest.approx(xml.stat().st_size + xml.with_suffix(".bin").stat().st_size, rel=1e-3)
    assert [s["batch_size"] for s in row["latency"]] == [1, 4] and row["latency"][0]["p50_ms"] > 0
    assert row["drift"] is not None and row["drift"]["max_abs_diff"] <= 1e-3  # the same model, two inputs
    assert rows[str(exports["float"])]["reference"]


# --- errors: one line, naming the extra -----------------------------------------------------------------


def test_missing_openvino_is_one_line_naming_the_extra(exports, checkpoints, tmp_path, tmp_path_factory, monkeypatch,
                                                       small_synthetic):
    from kdiqa_edge.runtime import QualityModel

    env = _blocked(tmp_path_factory, "openvino")
    image = min((Path(small_synthetic.root) / "images").iterdir())
    out = _run(["score", exports["float"], image], env)
    assert out.returncode == MissingDependency.exit_code and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs openvino" in lines[0] and "pip install 'kdiqa-edge[openvino]'" in lines[0]

    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with pytest.raises(MissingDependency, match=r"kdiqa-edge\[openvino\]"):
        QualityModel.load(exports["float"])
    out_dir = tmp_path / "out"
    with pytest.raises(MissingDependency, match=r"the openvino target needs openvino.*kdiqa-edge\[openvino\]"):
        export_checkpoint(checkpoints["student"], ExportConfig(target="openvino"), out_dir, progress=False, log=_quiet)
    assert not out_dir.exists()  # refused before any work
    monkeypatch.setitem(sys.modules, "openvino", ov)
    monkeypatch.setitem(sys.modules, "nncf", None)
    with pytest.raises(MissingDependency, match=r"int8 needs nncf.*kdiqa-edge\[export\]"):
        export_checkpoint(checkpoints["student"], ExportConfig(target="openvino", precision="int8"), out_dir,
                          progress=False, log=_quiet)


def test_bad_ir_and_device_errors(exports, tmp_path):
    from kdiqa_edge.errors import CheckpointError
    from kdiqa_edge.runtime import QualityModel
    from kdiqa_edge.runtime.openvino import device_name

    assert [device_name(p) for p in (None, "cpu", "gpu.1", "auto:gpu,cpu", "NPU")] == [
        "CPU", "CPU", "GPU.1", "AUTO:GPU,CPU", "NPU"]
    with pytest.raises(ConfigError, match="--provider cuda is not one"):
        QualityModel.load(exports["float"], provider="cuda")
    lonely = tmp_path / "model.xml"
    lonely.write_bytes(exports["float"].read_bytes())
    with pytest.raises(CheckpointError, match=r"model\.bin, are not beside it"):
        QualityModel.load(lonely)
    lonely.with_suffix(".bin").write_bytes(b"")
    (tmp_path / "foreign.xml").write_text("<net name='x' version='11'><layers/></net>")
    (tmp_path / "foreign.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no kdiqa_edge metadata|openvino cannot read it"):
        QualityModel.load(tmp_path / "foreign.xml")
    auto = QualityModel.load(exports["float"], provider="AUTO", threads=1)
    assert auto.backend.device == "auto"


def test_entropy_calibration_is_refused_before_any_work(checkpoints, tmp_path):
    with pytest.raises(ConfigError, match="NNCF has no such calibration; the openvino target takes minmax or "
                                          "percentile"):
        export_checkpoint(checkpoints["student"], ExportConfig(target="openvino", precision="int8",
                                                               calib_method="entropy"),
                          tmp_path / "out", progress=False, log=_quiet)
    assert not (tmp_path / "out").exists()


def test_all_means_every_target_that_makes_the_precision():
    assert ExportConfig(target="all", precision="bf16").targets() == ["openvino"]
    assert "openvino" in ExportConfig(target="all", precision="int8").targets()
    assert "openvino" in ExportConfig(target="all", precision="fp16").targets()
    assert "executorch" not in ExportConfig(target="all", precision="bf16").targets()
    assert ovt.OpenVinoTarget.supports.tolerance == {"fp32": 1e-4}
