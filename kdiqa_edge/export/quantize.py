"""INT8 static post-training quantization with ONNX Runtime, in the Q/DQ form each target needs.

- `u8s8`: uint8 activations (asymmetric), int8 per-channel weights: what ONNX Runtime's CPU kernels run
  fast (measured here: resnet18 score model FP32 12.2 ms -> 4.6 ms).
- `s8s8`: int8 activations and weights, symmetric, every zero point 0: what TensorRT requires of Q/DQ nodes
  (and slow under ONNX Runtime on CPUs: 14.9 ms for the same model).

Which ops are quantized and which stay float is a `recipes.Recipe`, chosen from the graph.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import numpy as np

from kdiqa_edge.errors import ConfigError, ExportError
from kdiqa_edge.export.recipes import Recipe

FORMS = ("u8s8", "s8s8")


def _reader(inputs: np.ndarray, batch: int = 8, name: str = "image", progress=None):
    """A CalibrationDataReader feeding `inputs` in batches to ONNX Runtime's calibrator; `progress` (a
    kdiqa_edge.console.Progress) advances as each batch is handed over, the one before it having run."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._batches = iter([{name: inputs[i:i + batch]} for i in range(0, len(inputs), batch)])
            self._handed = 0

        def get_next(self):
            if progress is not None and self._handed:
                progress.advance(self._handed)
            item = next(self._batches, None)
            self._handed = len(item[name]) if item is not None else 0
            return item

    return Reader()


# KL-divergence calibration as TensorRT's: a 2048-bin histogram, thresholds searched down to 128 bins.
ENTROPY_BINS, ENTROPY_QUANTIZED_BINS = 2048, 128


@contextlib.contextmanager
def _entropy_histogram():
    """quantize_static forwards no histogram size to the entropy calibrator, whose defaults (128 bins, 128
    quantized bins) leave it one candidate threshold, the full range: `entropy` would be minmax (found in ONNX
    Runtime 1.32, where both gave identical scales). For the length of a call, the entropy calibrator gets
    TensorRT's histogram size."""
    import importlib

    from onnxruntime.quantization.calibrate import CalibrationMethod

    # the module (the package's `quantize` attribute is the function of that name)
    ort_quantize = importlib.import_module("onnxruntime.quantization.quantize")

    original = ort_quantize.create_calibrator

    def create_calibrator(*args, **kwargs):
        if kwargs.get("calibrate_method") == CalibrationMethod.Entropy:
            kwargs["extra_options"] = {"num_bins": ENTROPY_BINS, "num_quantized_bins": ENTROPY_QUANTIZED_BINS,
                                       **(kwargs.get("extra_options") or {})}
        return original(*args, **kwargs)

    ort_quantize.create_calibrator = create_calibrator
    try:
        yield
    finally:
        ort_quantize.create_calibrator = original


def int8(src: Path, dst: Path, calib: np.ndarray, *, form: str, method: str = "minmax",
         keep_float: list[str] | None = None, recipe: Recipe | None = None,
         calibration_cache: Path | None = None) -> Path:
    """quant_pre_process, then quantize_static (QDQ) with the nodes in `keep_float` excluded.

    Without a recipe: every op type, per-channel weights (the `qdq-all` recipe). A recipe sets the op types,
    per-channel, reduce_range, the extra options, static or dynamic, and the transformer optimizer; `keep_float`
    must then hold its float groups too (`Recipe.nodes_to_exclude`). `calibration_cache` (a JSON file) keeps
    the calibrated ranges, so recipes over the same graph and calibration images calibrate once.
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if form not in FORMS:
        raise ConfigError(f"unknown INT8 form {form!r}; choose one of: {', '.join(FORMS)}")
    recipe = recipe or Recipe("qdq-all", "every op type")
    if recipe.mode not in ("static", "dynamic"):
        raise ConfigError(f"unknown quantization mode {recipe.mode!r}; choose static or dynamic")
    if recipe.mode == "static" and len(calib) == 0:
        raise ConfigError("int8 needs calibration images, and the train split gave none")
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise ConfigError(f"unknown calibration method {method!r}; choose one of: {', '.join(methods)}")

    # The histogram calibrators (entropy, percentile) stack every batch's activations into one array, so
    # a short last batch breaks them ("inhomogeneous shape"): feed them one image at a time.
    from kdiqa_edge.console import Progress, quiet_logger

    progress = Progress("calibration", len(calib), unit="images", transient=True)
    reader = _reader(calib, batch=8 if method == "minmax" else 1, progress=progress)
    symmetric = form == "s8s8"
    extra = {"ActivationSymmetric": symmetric or recipe.activation_symmetric, "WeightSymmetric": True,
             # TensorRT's DequantizeLinear takes int8 only: biases stay float there (it fuses them itself)
             "QuantizeBias": not symmetric, "MatMulConstBOnly": recipe.matmul_const_b_only,
             "QDQKeepRemovableActivations": recipe.keep_removable_activations}
    # onnxruntime.quantization logs per-tensor chatter on the root logger, and the entropy/percentile
    # calibrators and the transformer optimizer print to stdout: keep both off the output
    with tempfile.TemporaryDirectory(prefix="kdiqa-quant-") as scratch, quiet_logger(), \
            contextlib.redirect_stdout(io.StringIO()), _entropy_histogram(), progress:
        source = optimize_transformer(src, Path(scratch) / "optimized.onnx", recipe.optimizer) \
            if recipe.optimizer else src
        if recipe.means_as_pools:
            source = means_as_pools(source, Path(scratch) / "pools.onnx")
        pre = Path(scratch) / "pre.onnx"
        # shape inference + graph clean-up first, as ONNX Runtime recommends before quantization
        quant_pre_process(str(source), str(pre), skip_symbolic_shape=True)
        common = {"op_types_to_quantize": list(recipe.op_types) or None, "per_channel": recipe.per_channel,
                  "reduce_range": recipe.reduce_range, "weight_type": QuantType.QInt8,
                  "nodes_to_exclude": list(keep_float or [])}
        if recipe.mode == "dynamic":
            quantize_dynamic(str(pre), str(dst), **common,
                             extra_options={"MatMulConstBOnly": recipe.matmul_const_b_only})
        else:
            quantize_static(
                str(pre), str(dst), reader, quant_format=QuantFormat.QDQ, **common,
                activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                calibrate_method=methods[method], calibration_providers=["CPUExecutionProvider"],
                extra_options=extra,
                calibration_cache_path=str(calibration_cache) if calibration_cache else None)
    _drop_unused_domains(dst)
    if symmetric:
        import onnx

        bad = asymmetric_qdq_nodes(onnx.load(str(dst)))
        if bad:
            raise ExportError(f"{dst.name}: Q/DQ nodes with non-zero zero points ({', '.join(bad[:3])}); "
                              "TensorRT requires symmetric quantization")
    return dst


def means_as_pools(src: Path, dst: Path) -> Path:
    """Every ReduceMean over H, W with keepdims becomes a GlobalAveragePool of the same name (same values)."""
    import onnx
    from onnx import helper

    from kdiqa_edge.export.recipes import graph_constants, is_spatial_pool

    model = onnx.load(str(src))
    constants = graph_constants(model.graph)
    for index, node in enumerate(model.graph.node):
        if node.op_type == "ReduceMean" and is_spatial_pool(node, constants):
            pool = helper.make_node("GlobalAveragePool", [node.input[0]], list(node.output), name=node.name)
            model.graph.node[index].CopyFrom(pool)
    onnx.save(model, str(dst))
    return dst


def optimize_transformer(src: Path, dst: Path, model_type: str) -> Path:
    """ONNX Runtime's transformer optimizer (LayerNorm, GELU, attention, SkipLayerNorm fusions) for CPU.

    Heads and hidden size are detected from the graph (0); the fused ops are com.microsoft contrib ops,
    which ONNX Runtime runs and TensorRT does not, so only the `onnx` target uses this."""
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(str(src), model_type=model_type, num_heads=0, hidden_size=0, use_gpu=False)
    optimized.save_model_to_file(str(dst))
    return dst


def _drop_unused_domains(path: Path) -> None:
    """quant_pre_process leaves opset imports for every ONNX Runtime domain; keep those the graph uses."""
    import onnx

    model = onnx.load(str(path))
    used = {"", "ai.onnx"} | {n.domain for n in model.graph.node}
    kept = [o for o in model.opset_import if o.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def asymmetric_qdq_nodes(model) -> list[str]:
    """Names of QuantizeLinear/DequantizeLinear nodes of an ONNX ModelProto whose zero point is not int8 0."""
    from onnx import numpy_helper

    graph = model.graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    constants[node.output[0]] = numpy_helper.to_array(attr.t)
    bad = []
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        # a missing zero point means uint8 for QuantizeLinear, which TensorRT rejects too
        zero = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zero is None or zero.dtype != np.int8 or np.any(zero != 0):
            bad.append(node.name or node.output[0])
    return bad
