"""The `openvino` target: OpenVINO IR (`model.<precision>.xml` + `.bin`) for Intel CPUs, iGPUs and NPUs (and any
x86 CPU): FP32, BF16 and FP16 inference precisions over one FP32 IR, and INT8 by NNCF.

Path: the onnx target's FP32 graph (`onnx.export_fp32`: the folded head, float NCHW input, dynamic batch,
checker-clean) -> `ov.convert_model` -> (INT8: `nncf.quantize`) -> (uint8 input: `PrePostProcessor`) ->
`ov.save_model`. Why the ONNX file and not the torch ScoreModel: it is the same graph the onnx and tensorrt
targets ship, traced once under `export/layouts.py:traced` (so MobileViT's unfold is the fast one here too),
and its nodes are named by module scope (/head/..., /proj/...), which OpenVINO keeps as the ops' friendly
names: the INT8 float regions are found by name, as `onnx.float_nodes` finds them for ONNX Runtime.

- Metadata: the kdiqa_edge.* keys (artifact.KEYS) go into the IR's rt_info under `kdiqa_edge/<key>`
  (`runtime/openvino.py:write_meta`), so the .xml alone says how to feed the model and what it is.
- `--input uint8 --layout NHWC|NCHW`: OpenVINO's PrePostProcessor puts the conversion, the layout and the CLIP
  mean/std into the model (u8 tensor -> f32 -> minus 255 mean, over 255 std -> NCHW), in front of the same
  FP32 graph; OpenVINO fuses it into the first convolution where it can.
- BF16 and FP16 are inference precisions (`INFERENCE_PRECISION_HINT`), not other graphs: the IR is the FP32
  one, and the hint is recorded in rt_info (`kdiqa_edge/inference_precision`), which the runtime applies. An
  FP32 IR records f32: OpenVINO's CPU plugin would otherwise run it in bf16 on CPUs with AVX512-BF16 or AMX.
- Weights in the .bin (`ov.save_model` compresses them to FP16 unless told not to): FP32 for fp32 (FP16
  weights alone move scores by ~1e-3, over the 1e-4 parity bound), bf16 (rounding FP32 -> FP16 -> BF16 is a
  double rounding, and FP16's narrow exponent flushes weights under 6e-8 that BF16 keeps) and int8 (its float
  regions must stay FP32); FP16 for fp16, where that is exactly what the kernels compute with: half the bytes,
  nothing lost.
- INT8: `nncf.quantize` calibrated on TRAIN-split images (in the float graph's input, before the
  PrePostProcessor: the input normalization is outside the quantized graph and stays float), an ignored scope
  of the folded head, the projection feeding it and (`--int8-stem float`, the default) the stem, found by
  `onnx.float_nodes`, and activation ranges per `--calib-method` (minmax, the default: the range over all
  calibration images; NNCF's own default averages each image's, `ACTIVATION_RANGES` says what that cost).
  `graph_facts` reads the graph: `model_type=TRANSFORMER` where it has attention (a
  ScaledDotProductAttention, as the converter fuses it, or an activation x activation MatMul), and the MIXED
  preset (asymmetric activations) where it has attention or activations that go negative (SiLU/Swish, GELU,
  HSwish, Mish, ELU, PReLU), else PERFORMANCE (symmetric); the choice and why go in the manifest
  (`details.int8`). The rest of an INT8 model (the ignored scope, and whatever NNCF leaves between its
  quantized ops: elementwise ops, norms, softmax) infers at the precision the IR records: f32, or bf16 on a CPU
  with BF16 kernels (`--precision auto`'s `int8:bf16+stem-*` candidates, offered where `bf16_here()`: OpenVINO's
  own CPU default there, which a plain `convert_model` + `nncf.quantize` runs in). The quantized ops are the same
  either way; drift is measured per candidate against the f32 IR, so the bound decides whether bf16 float
  regions may ship.
- Parity: at f32 the IR matches torch within 1e-4 or the export fails; bf16, fp16 and int8 report drift vs the
  f32 IR (|ΔSRCC|, mean/max |Δscore| on the test split) and both latencies, through the runtime (the CPU,
  `cfg.threads`). A CPU without a precision's kernels (f16 without AVX512-FP16) runs the nearest it has: the
  notes say which one the figures are for.

openvino and nncf are imported inside functions only; without openvino the target fails before any work,
naming the `[openvino]` extra (nncf, for int8: the `[export]` extra).
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from kdiqa_edge.errors import CheckpointError, ConfigError, ExportError, MissingDependency, first_line
from kdiqa_edge.export.base import Examples, ExportConfig, ExportResult, Supports, register_target

EXTRA = "openvino"
# precision -> OpenVINO INFERENCE_PRECISION_HINT recorded in the IR (INT8: what its float regions run in)
INFERENCE_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}
# what an INT8 IR's float regions may run in instead of f32 (write_ir's `float_precision`): bf16, where the CPU
# has BF16 kernels (bf16_here), OpenVINO's CPU default there; f16 float regions are not offered (not measured)
INT8_FLOAT_PRECISIONS = ("f32", "bf16")
# precision -> whether ov.save_model compresses the weights to FP16 (see the module docstring)
COMPRESS_TO_FP16 = {"fp32": False, "bf16": False, "fp16": True, "int8": False}
# --calib-method -> NNCF's activation range estimator. minmax: the min and max over all calibration images, as
# ONNX Runtime's MinMax. NNCF's default (the mean over images of each image's min and max) clips what a few
# images reach, and distortions are what reach it: on the tests' learned 64 px student it drifted |ΔSRCC|
# 0.019, mean |Δscore| 0.054 against 0.003 and 0.028 with MINMAX (256 calibration images). percentile: NNCF's
# quantiles. NNCF has no entropy (KL) calibration.
ACTIVATION_RANGES = {"minmax": "MINMAX", "percentile": "QUANTILE"}
# Activations with a negative range: NNCF's MIXED preset gives them asymmetric quantizers
NEGATIVE_ACTIVATIONS = ("Swish", "Gelu", "HSwish", "Mish", "Elu", "PRelu", "Selu")


def openvino_missing(precision: str = "fp32") -> str | None:
    """None when this precision's export imports (openvino; nncf too for int8), else the install line."""
    from kdiqa_edge.runtime.openvino import openvino

    try:
        openvino()
    except MissingDependency as exc:
        return str(exc).replace("running an OpenVINO IR (.xml)", "the openvino target")
    if precision == "int8":
        try:
            with quiet():
                import nncf  # noqa: F401
        except ImportError as exc:
            return f"the openvino target's int8 needs nncf ({exc}); install it with: pip install 'kdiqa-edge[export]'"
    return None


def require_openvino(precision: str = "fp32") -> None:
    missing = openvino_missing(precision)
    if missing is not None:
        raise MissingDependency(missing)


@contextlib.contextmanager
def quiet():
    """NNCF logs each ignored node and its statistics at INFO through the `nncf` logger, and warns about torch
    on import: nothing a user acts on. (Its progress bars go to the export log with the rest.)"""
    import warnings

    from kdiqa_edge.console import quiet_logger

    with quiet_logger("nncf", 30), quiet_logger("torch.utils.cpp_extension"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# --- the graph -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GraphFacts:
    """What NNCF's settings are chosen from, read from the converted FP32 graph (the float regions left out)."""

    attention: int  # attention ops: ScaledDotProductAttention, or MatMuls of two activations (q @ k.T, attn @ v)
    negative_activations: tuple[str, ...]  # op types of NEGATIVE_ACTIVATIONS present

    @property
    def model_type(self) -> str | None:
        return "transformer" if self.attention else None

    @property
    def preset(self) -> str:
        return "mixed" if self.attention or self.negative_activations else "performance"

    def why(self) -> str:
        if self.attention:
            return (f"attention ({self.attention} op(s)): model_type TRANSFORMER, MIXED preset (asymmetric "
                    "activations, as NNCF recommends for transformers)")
        if self.negative_activations:
            return (f"activations with a negative range ({', '.join(self.negative_activations)}): MIXED preset "
                    "(asymmetric activations)")
        return "ReLU-family activations only: PERFORMANCE preset (symmetric activations, the fast kernels)"

    def to_dict(self) -> dict[str, Any]:
        return {"attention_ops": self.attention, "negative_activations": list(self.negative_activations),
                "model_type": self.model_type or "default", "preset": self.preset, "why": self.why()}


def _is_constant(output) -> bool:
    """An input fed by a constant (through Convert/Reshape/Transpose of one, as converters leave weights)."""
    node = output.get_node()
    while node.get_type_name() in ("Convert", "Reshape", "Transpose", "Unsqueeze", "Squeeze") and node.inputs():
        node = node.input_value(0).get_node()
    return node.get_type_name() == "Constant"


def graph_facts(ov_model, ignore: set[str] = frozenset()) -> GraphFacts:
    ops = [op for op in ov_model.get_ordered_ops() if op.get_friendly_name() not in ignore]
    # OpenVINO's ONNX frontend fuses softmax(q k^T * scale) v into one ScaledDotProductAttention op; what it
    # leaves unfused shows as a MatMul of two activations
    attention = sum(1 for op in ops if op.get_type_name() == "ScaledDotProductAttention"
                    or (op.get_type_name() == "MatMul" and not any(_is_constant(op.input_value(i)) for i in range(2))))
    negative = sorted({op.get_type_name() for op in ops} & set(NEGATIVE_ACTIVATIONS))
    return GraphFacts(attention=attention, negative_activations=tuple(negative))


def float_names(ov_model, onnx_path: Path, stem: bool) -> list[str]:
    """Friendly names of the converted graph's ops that INT8 leaves in float: the ONNX nodes of
    `onnx.float_nodes` (head, projection, and with `stem` the first conv/matmul), as OpenVINO names them (a
    Gemm/Conv becomes NAME/WithoutBiases + NAME; an op feeding an output takes the output's name)."""
    import onnx

    from kdiqa_edge.export.onnx import float_nodes

    keep = set(float_nodes(onnx_path, stem=stem))
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    outputs = {name for node in graph.node if node.name in keep for name in node.output}
    names = []
    for op in ov_model.get_ordered_ops():
        if op.get_type_name() in ("Constant", "Parameter", "Result"):
            continue
        name = op.get_friendly_name()
        if name.removesuffix("/WithoutBiases") in keep or any(out.get_names() & outputs for out in op.outputs()):
            names.append(name)
    return names


# --- building an IR ------------------------------------------------------------------------------------


def convert(onnx_path: Path):
    """The FP32 ONNX as an ov.Model (a fresh one per call: quantizing and PrePostProcessor change it)."""
    import openvino as ov

    try:
        return ov.convert_model(str(onnx_path))
    except Exception as exc:  # noqa: BLE001 - the ONNX frontend raises its own types for an op it lacks
        raise ExportError(f"OpenVINO cannot convert the ONNX graph: {first_line(exc, limit=300, typed=True)}") from None


def quantize(ov_model, calib: np.ndarray, facts: GraphFacts, ignored: list[str], method: str = "minmax"):
    """nncf.quantize over float NCHW calibration images (one per item), the float regions ignored, activation
    ranges per `method` (ACTIVATION_RANGES)."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    dataset = nncf.Dataset([calib[i:i + 1] for i in range(len(calib))])
    options: dict[str, Any] = {}
    if facts.model_type == "transformer":
        options["model_type"] = nncf.ModelType.TRANSFORMER
    preset = {"mixed": nncf.QuantizationPreset.MIXED, "performance": nncf.QuantizationPreset.PERFORMANCE}
    ranges = getattr(RangeEstimatorParametersSet, ACTIVATION_RANGES[method])
    with quiet():
        return nncf.quantize(ov_model, dataset, preset=preset[facts.preset], subset_size=len(calib),
                             ignored_scope=nncf.IgnoredScope(names=ignored), **options,
                             advanced_parameters=AdvancedQuantizationParameters(
                                 activations_range_estimator_params=ranges))


def with_input(ov_model, input_spec: dict[str, Any], preprocess):
    """uint8 inputs: PrePostProcessor puts u8 -> f32, the layout and the CLIP mean/std into the model."""
    import openvino as ov
    from openvino.preprocess import PrePostProcessor

    if input_spec["dtype"] != "uint8":
        return ov_model
    ppp = PrePostProcessor(ov_model)
    port = ppp.input("image")
    port.tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout(input_spec["layout"]))
    port.model().set_layout(ov.Layout("NCHW"))
    port.preprocess().convert_element_type(ov.Type.f32) \
        .mean([255.0 * m for m in preprocess.mean]).scale([255.0 * s for s in preprocess.std])
    return ppp.build()


def canonical_names(ov_model) -> None:
    """Number OpenVINO's generated op names (Constant_2781, Range_243: a per-process counter) in graph order, so
    the same model gives the same .xml in any process and in any order of conversions (reproducible bytes). The
    names the ONNX graph gave (/encoder/..., score) are kept."""
    import re

    generated = re.compile(r"^([A-Z][A-Za-z0-9]*)_\d+$")
    for index, op in enumerate(ov_model.get_ordered_ops()):
        match = generated.match(op.get_friendly_name())
        if match:
            op.set_friendly_name(f"{match.group(1)}_{index}")


def input_spec(cfg: ExportConfig, size: int) -> dict[str, Any]:
    """The `kdiqa_edge.input` of the IR: as ScoreModel.input_spec says it for these options."""
    uint8 = cfg.input == "uint8"
    return {"name": "image", "dtype": "uint8" if uint8 else "float32", "layout": cfg.layout, "size": size,
            "normalized": not uint8}


def weights(precision: str) -> str:
    """What the .bin holds for this precision (the manifest's `weights`)."""
    if COMPRESS_TO_FP16[precision]:
        return "fp16"
    return "int8 + fp32" if precision == "int8" else "fp32"


def versions() -> dict[str, str]:
    import importlib.metadata

    found = {}
    for package in ("openvino", "nncf"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def inference_precision(precision: str, float_precision: str | None = None) -> str:
    """The INFERENCE_PRECISION_HINT an IR records: the precision's own, or for int8 `float_precision` (what its
    float regions run in: INT8_FLOAT_PRECISIONS) where given."""
    if float_precision is None or float_precision == INFERENCE_PRECISION[precision]:
        return INFERENCE_PRECISION[precision]
    if precision != "int8" or float_precision not in INT8_FLOAT_PRECISIONS:
        raise ConfigError(f"float regions in {float_precision}: only an int8 IR has float regions of its own "
                          f"precision ({' or '.join(INT8_FLOAT_PRECISIONS)})")
    return float_precision


def ir_meta(model, meta: dict[str, Any], cfg: ExportConfig, outputs: list[str], precision: str,
            hint: str | None = None) -> dict[str, Any]:
    from kdiqa_edge.export.executorch import model_facts

    source = {**(meta.get("source") or {}), **model_facts(model)}
    return {**meta, "target": "openvino", "precision": precision, "input": input_spec(cfg, model.preprocess.size),
            "outputs": outputs, "source": source, "inference_precision": hint or INFERENCE_PRECISION[precision],
            "versions": {**(meta.get("versions") or {}), **versions()}}


def write_ir(model, onnx_path: Path, examples: Examples, folder: Path, cfg: ExportConfig, meta: dict[str, Any],
             precision: str, stem: str | None = None,
             float_precision: str | None = None) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """Write `folder/model.<precision>.xml` (+ .bin) from the FP32 ONNX at `onnx_path`: (path, int8 facts,
    metadata). `float_precision` (int8 only): what the float regions run in, recorded as the IR's inference
    precision (default f32). What a candidate builds; `build_ir` measures it too."""
    import openvino as ov

    from kdiqa_edge.preprocess import normalize
    from kdiqa_edge.runtime.openvino import write_meta

    require_openvino(precision)
    stem = stem or cfg.int8_stem
    hint = inference_precision(precision, float_precision)
    ov_model = convert(onnx_path)
    full_meta = ir_meta(model, meta, cfg, [o.get_any_name() for o in ov_model.outputs], precision, hint)
    int8: dict[str, Any] = {}
    if precision == "int8":
        if len(examples.calib) == 0:
            raise ExportError("int8 needs calibration images, and the train split gave none")
        ignored = float_names(ov_model, onnx_path, stem=stem == "float")
        facts = graph_facts(ov_model, ignore=set(ignored))
        label = str(full_meta["source"].get("arch") or "the model")
        try:
            ov_model = quantize(ov_model, normalize(examples.calib, model.preprocess), facts, ignored,
                                cfg.calib_method)
        except Exception as exc:  # noqa: BLE001 - NNCF raises many types for a graph it cannot handle
            raise ExportError(f"NNCF quantization of {label} failed: {first_line(exc, limit=300, typed=True)}") from None
        int8 = {"quantizer": "nncf.quantize", "calibration_images": len(examples.calib), "stem": stem,
                "calibration_method": cfg.calib_method, "activation_ranges": ACTIVATION_RANGES[cfg.calib_method],
                "head": "float", "input_norm": "float (PrePostProcessor, after quantization)",
                "ignored_scope": ignored, "graph": facts.to_dict(), "preset": facts.preset,
                "model_type": facts.model_type or "default", "inference_precision": hint}
    ov_model = with_input(ov_model, full_meta["input"], model.preprocess)
    write_meta(ov_model, full_meta)
    canonical_names(ov_model)
    path = Path(folder) / f"model.{precision}.xml"
    ov.save_model(ov_model, str(path), compress_to_fp16=COMPRESS_TO_FP16[precision])
    return path, int8, full_meta


def fp32_onnx(model, cfg: ExportConfig, folder: Path) -> Path:
    """The onnx target's FP32 graph, float NCHW input (the IR's input options are OpenVINO's own, below)."""
    from kdiqa_edge.export.onnx import export_fp32
    from kdiqa_edge.models.score import ScoreModel

    scored = ScoreModel(model, input="float", layout="NCHW", with_probs=cfg.with_probs, with_map=cfg.with_map)
    return export_fp32(scored, Path(folder) / "model.fp32.onnx", cfg.opset)


@dataclasses.dataclass
class Ir:
    """One written IR and what was measured on it here: for the target's report."""

    path: Path
    precision: str
    parity: dict[str, Any]  # vs the torch model on the parity images
    latency: dict[str, Any]  # batch 1 through the runtime backend at cfg.threads
    test_scores: np.ndarray  # on examples.test, for drift
    meta: dict[str, Any]  # the kdiqa_edge.* metadata in its rt_info
    runs_in: str | None  # the inference precision OpenVINO ran it in here
    notes: list[str]  # the runtime's (a recorded precision this CPU lacks)
    int8: dict[str, Any] = dataclasses.field(default_factory=dict)


def build_ir(model, onnx_path: Path, examples: Examples, folder: Path, cfg: ExportConfig, meta: dict[str, Any],
             precision: str, stem: str | None = None, tolerance: float | None = None) -> Ir:
    """Write the IR for (precision, stem), then measure it through the runtime backend on this CPU: parity vs
    torch (ExportError beyond `tolerance`), batch-1 latency at cfg.threads, scores on the test images."""
    from kdiqa_edge.export import evaluate
    from kdiqa_edge.export.evaluate import torch_reference
    from kdiqa_edge.export.executorch import latency_ms
    from kdiqa_edge.runtime import QualityModel

    path, int8, full_meta = write_ir(model, onnx_path, examples, folder, cfg, meta, precision, stem)
    try:
        quality_model = QualityModel.load(path, threads=cfg.threads)
    except CheckpointError as exc:
        raise ExportError(f"{path.name} does not load here: {str(exc).removeprefix(f'{path}: ')}") from None
    reference = torch_reference(model, examples.parity)
    parity = evaluate.parity(reference, quality_model.predict(examples.parity).astype(np.float64), tolerance)
    if parity.get("passed") is False:
        raise ExportError(f"{path.name}: parity check failed, max |score - torch score| = "
                          f"{parity['max_abs_diff']:.2e} > {tolerance:.0e}")
    return Ir(path=path, precision=precision, parity=parity, latency=latency_ms(quality_model, cfg.latency_runs),
              test_scores=quality_model.predict(examples.test).astype(np.float64), meta=full_meta,
              runs_in=quality_model.backend.inference_precision, notes=quality_model.notes, int8=int8)


def check_map(model, ir: Ir, examples: Examples, cfg: ExportConfig, meta: dict[str, Any],
              tolerance: dict[str, float], work: Path) -> dict[str, Any]:
    """The IR's `score_map` vs torch through the runtime (export/evaluate.py:map_report); at fp32 also the
    same IR without the map, built in `work`: the score output must be bit-identical to it, and the map's
    added latency."""
    from kdiqa_edge.export import evaluate

    twin = None
    if ir.precision == "fp32":
        (work / "without-map").mkdir()
        plain_cfg = dataclasses.replace(cfg, with_map=False)
        plain_onnx = fp32_onnx(model, plain_cfg, work / "without-map")
        twin = write_ir(model, plain_onnx, examples, work / "without-map", plain_cfg, meta, "fp32")[0]
    return evaluate.map_report(model, ir.path, examples.parity, tolerance.get(ir.precision), cfg.threads,
                               without_map=twin, runs=cfg.latency_runs)


# --- the target ----------------------------------------------------------------------------------------


def drift_notes(report: dict[str, Any], ir: Ir, threads: int, max_drift: float) -> list[str]:
    """The drift check with its verdict, and both latencies with the precision each ran in here."""
    from kdiqa_edge.export.evaluate import drift_verdict

    name, label = ir.path.name, ir.precision.upper()
    fp32_ms, low_ms = report["latency"]["fp32"]["p50_ms"], report["latency"][ir.precision]["p50_ms"]
    notes = [f"{name}: drift vs FP32: SRCC {report['reduced']['srcc']:.4f} vs {report['fp32']['srcc']:.4f} "
             f"(ΔSRCC {report['delta_srcc']:+.4f}, ΔPLCC {report['delta_plcc']:+.4f}; mean |Δscore| "
             f"{report['mean_abs_diff_vs_fp32']:.4f}, max {report['max_abs_diff_vs_fp32']:.4f}) on "
             f"{report['images']} test images, {drift_verdict(report['delta_srcc'], max_drift)}",
             f"{name}: latency at batch 1, OpenVINO CPU, {threads} threads: {label} {low_ms:.2f} ms "
             f"(inference precision {ir.runs_in}), FP32 {fp32_ms:.2f} ms"]
    if low_ms > fp32_ms:
        notes.append(f"{name}: {label} is SLOWER than FP32 on this machine ({low_ms:.2f} ms vs {fp32_ms:.2f} ms)")
    return notes


@register_target
class OpenVinoTarget:
    """Intel CPUs, iGPUs and NPUs (and AMD x86): OpenVINO IR, f32/bf16/f16 inference precisions or NNCF INT8."""

    name = "openvino"
    supports = Supports(precisions=("fp32", "bf16", "fp16", "int8", "auto"), dynamic_batch=True,
                        tolerance={"fp32": 1e-4})
    auto_file = "model.xml"  # --precision auto: the pick in OUT/openvino-auto/, its weights beside it (model.bin)

    def preflight(self, cfg: ExportConfig) -> None:
        """Fail before any work when openvino (or, for int8, nncf) is missing, or NNCF lacks the calibration."""
        if cfg.precision in ("int8", "auto") and cfg.calib_method not in ACTIVATION_RANGES:
            raise ConfigError(f"--calib-method {cfg.calib_method}: NNCF has no such calibration; the openvino "
                              f"target takes {' or '.join(ACTIVATION_RANGES)}")
        require_openvino("fp32" if cfg.precision == "auto" else cfg.precision)  # auto without nncf: no int8

    def export(self, model, examples: Examples, out: Path, cfg: ExportConfig, meta: dict[str, Any]) -> ExportResult:
        from kdiqa_edge.bench.environment import cpu_info
        from kdiqa_edge.export import evaluate

        meta = {**meta, "target": self.name}
        with tempfile.TemporaryDirectory(prefix="kdiqa-openvino-") as scratch:
            onnx_path = fp32_onnx(model, cfg, Path(scratch))
            ir = build_ir(model, onnx_path, examples, out, cfg, meta, cfg.precision,
                          tolerance=self.supports.tolerance.get(cfg.precision))
            reference = None
            if cfg.precision != "fp32":
                (Path(scratch) / "reference").mkdir()
                reference = build_ir(model, onnx_path, examples, Path(scratch) / "reference", cfg, meta, "fp32",
                                     tolerance=self.supports.tolerance["fp32"])
            if cfg.with_map:
                map_report = check_map(model, ir, examples, cfg, meta, self.supports.tolerance, Path(scratch))
        result = ExportResult(target=self.name, precision=cfg.precision,
                              files=[ir.path, ir.path.with_suffix(".bin")], parity=ir.parity, notes=list(ir.notes))
        result.extra = {"input": ir.meta["input"], "outputs": ir.meta["outputs"], "runtime": "openvino",
                        "inference_precision": ir.meta["inference_precision"], "runs_in_here": ir.runs_in,
                        "weights": weights(cfg.precision),
                        "metadata": "rt_info kdiqa_edge/<key> (the kdiqa_edge.* keys)"}
        if cfg.with_map:
            result.extra["map"] = map_report
            result.notes.extend(evaluate.map_notes(map_report, ir.path.name))
        latency = {"runtime": "openvino CPU", "threads": cfg.threads, "cpu": cpu_info()}
        if reference is None:
            result.extra["latency"] = {"fp32": ir.latency, **latency}
            return result
        if ir.int8:
            result.extra["int8"] = ir.int8
            result.notes.append(f"{ir.path.name}: NNCF {ir.int8['preset'].upper()} preset, model type "
                                f"{ir.int8['model_type']}: {ir.int8['graph']['why']}; stem {ir.int8['stem']}, "
                                f"{len(ir.int8['ignored_scope'])} ops kept in float")
        result.drift = evaluate.drift(reference.test_scores, ir.test_scores, examples.test_mos)
        result.drift["latency"] = {"fp32": reference.latency, cfg.precision: ir.latency, **latency,
                                   "runs_in": {"fp32": reference.runs_in, cfg.precision: ir.runs_in}}
        result.notes.extend(drift_notes(result.drift, ir, cfg.threads, cfg.max_drift))
        return result

    def candidates(self, model, examples: Examples, cfg: ExportConfig, meta: dict[str, Any], work: Path) -> list:
        """--precision auto: the f32 IR (the reference), bf16 where this CPU has BF16 kernels (AVX512-BF16 or
        AMX-BF16; elsewhere OpenVINO would run it in f32, the reference again), and NNCF INT8 with the stem in
        float and in int8 where nncf imports, its float regions in f32 (`int8:stem-*`) and, where this CPU has
        BF16 kernels, in bf16 (`int8:bf16+stem-*`); each an IR + .bin, measured through the runtime on this
        CPU, its drift against the f32 IR (the bound decides whether the bf16 float regions may ship)."""
        from kdiqa_edge.export.auto import Candidate

        require_openvino("fp32")
        work.mkdir(parents=True, exist_ok=True)
        onnx_path = fp32_onnx(model, cfg, work)
        meta = {**meta, "target": self.name}
        extra = {"input": input_spec(cfg, model.preprocess.size), "outputs": ["score", *(["probs"] * cfg.with_probs)],
                 "runtime": "openvino", "metadata": "rt_info kdiqa_edge/<key> (the kdiqa_edge.* keys)"}

        def build(precision: str, stem: str | None, floats: str | None, recipe: dict[str, Any],
                  details: dict[str, Any]):
            def write(folder: Path) -> Path:
                path, int8, _ = write_ir(model, onnx_path, examples, folder, cfg, meta, precision, stem, floats)
                if int8:  # NNCF's settings, as the graph chose them: the pick's manifest entry, as --precision int8's
                    details["int8"] = int8
                    recipe.update(preset=int8["preset"], model_type=int8["model_type"])
                return path

            return write

        def candidate(name: str, precision: str, stem: str | None = None, floats: str | None = None,
                      **fields) -> Candidate:
            facts = {"inference_precision": inference_precision(precision, floats), "weights": weights(precision)}
            if precision == "int8":
                facts["float_regions"] = facts["inference_precision"]
            recipe = {"name": name, **facts, **({"stem": stem} if stem else {})}
            details = {**extra, **facts}
            return Candidate(name, precision, build(precision, stem, floats, recipe, details), companions=(".bin",),
                             recipe=recipe, extra=details, **fields)

        found = [candidate("fp32", "fp32", reference=True, tolerance=self.supports.tolerance["fp32"])]
        if bf16_here():
            found.append(candidate("bf16", "bf16"))
        if openvino_missing("int8") is None and cfg.calib_method in ACTIVATION_RANGES:
            found += [candidate(f"int8:stem-{stem}", "int8", stem) for stem in ("float", "int8")]
            if bf16_here():
                found += [candidate(f"int8:bf16+stem-{stem}", "int8", stem, "bf16") for stem in ("float", "int8")]
        return found

    def left_out(self, cfg: ExportConfig | None = None) -> list[str]:
        """What this machine cannot offer --precision auto, one line each."""
        lines = []
        if not bf16_here():
            lines.append("openvino bf16: this CPU has neither AVX512-BF16 nor AMX-BF16 (OpenVINO would run it in "
                         "f32): no bf16 candidate")
        missing = openvino_missing("int8") if openvino_missing("fp32") is None else None
        method = cfg.calib_method if cfg is not None else "minmax"
        if missing is not None:
            lines.append(f"openvino int8: {missing}: no int8 candidates")
        elif method not in ACTIVATION_RANGES:
            lines.append(f"openvino int8: NNCF has no {method} calibration (--calib-method {method}): no int8 "
                         f"candidates ({' or '.join(ACTIVATION_RANGES)} offers them)")
        elif not bf16_here():
            lines.append("openvino int8:bf16+stem-float, int8:bf16+stem-int8: this CPU has neither AVX512-BF16 nor "
                         "AMX-BF16 (their float regions would run in f32, as int8:stem-*'s do): no INT8 candidates "
                         "with bf16 float regions")
        return lines


def bf16_here() -> bool:
    """Whether this CPU has BF16 kernels for OpenVINO's CPU plugin (AVX512-BF16 or AMX-BF16)."""
    from kdiqa_edge.bench.environment import cpu_isa

    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_isa()))
