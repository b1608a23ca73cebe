"""The `tensorrt` target: a TensorRT-ready ONNX, its op check, the trtexec line, and (where tensorrt imports)
the engine, built as a STRONGLY TYPED network.

Precision comes from the ONNX itself, not from builder flags (TensorRT 11 removed the FP16/INT8 flags and
the INT8 calibrator): FP16 from an FP16 ONNX, INT8 from symmetric int8 Q/DQ nodes (zero points 0). The
same code builds on TensorRT 10.x (Jetson JetPack 6 ships 10.3) and 11.x. Engines do not move between GPUs
or TensorRT versions, so the engine file's header records both, and the runtime refuses a mismatch.
"""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path
from typing import Any, ClassVar

from kdiqa_edge.errors import ConfigError, ExportError
from kdiqa_edge.export.base import Examples, ExportConfig, ExportResult, Supports, register_target

# ONNX operators TensorRT's parser imports, from onnx-tensorrt's docs/operators.md ("Supported: Y"), for
# TensorRT 10.0 onwards (opsets 9..20). Ops added later map to the first version that has them.
_TRT10_OPS = frozenset(["Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh", "AveragePool", "BatchNormalization", "BlackmanWindow", "Cast", "CastLike", "Ceil", "Celu", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv", "ConvTranspose", "Cos", "Cosh", "CumSum", "DepthToSpace", "DequantizeLinear", "Div", "Dropout", "Einsum", "Elu", "Equal", "Erf", "Exp", "Expand", "EyeLike", "Flatten", "Floor", "Gather", "GatherElements", "GatherND", "Gelu", "Gemm", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "Greater", "GreaterOrEqual", "GridSample", "GroupNormalization", "GRU", "HammingWindow", "HannWindow", "HardSigmoid", "HardSwish", "Hardmax", "Identity", "If", "ImageScaler", "InstanceNormalization", "IsInf", "IsNaN", "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "Loop", "LRN", "LSTM", "LpNormalization", "LpPool", "MatMul", "Max", "MaxPool", "Mean", "MeanVarianceNormalization", "Min", "Mish", "Mod", "Mul", "Neg", "NonMaxSuppression", "NonZero", "Not", "OneHot", "Or", "Pad", "ParametricSoftplus", "Pow", "PRelu", "QuantizeLinear", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Range", "Reciprocal", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu", "Reshape", "Resize", "ReverseSequence", "RNN", "RoiAlign", "Round", "ScaledTanh", "Scan", "Scatter", "ScatterElements", "ScatterND", "Selu", "Shape", "Shrink", "Sigmoid", "Sign", "Sin", "Sinh", "Size", "Slice", "Softmax", "Softplus", "Softsign", "SpaceToDepth", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tan", "Tanh", "ThresholdedRelu", "Tile", "TopK", "Transpose", "Trilu", "Unsqueeze", "Upsample", "Where", "Xor"])
_ADDED_OPS = {  # op -> first TensorRT version whose ONNX parser supports it
    "Attention": (10, 15), "DeformConv": (10, 15), "RMSNormalization": (10, 15), "RotaryEmbedding": (10, 15),
    "TensorScatter": (10, 15), "STFT": (10, 15),
}
_MAX_OPSET = {(10, 0): 20, (10, 15): 24}  # first TensorRT version -> newest ONNX opset its parser reads


def parse_version(text: str) -> tuple[int, int]:
    try:
        major, minor, *_ = (int(part) for part in f"{text}.0".split("."))
    except ValueError:
        raise ConfigError(f"TensorRT version must look like 10.3, got {text!r}") from None
    if major < 10:
        raise ConfigError(f"TensorRT {text} is not supported: the strongly typed path needs TensorRT >= 10")
    return major, minor


def supported_ops(version: str) -> frozenset[str]:
    wanted = parse_version(version)
    return _TRT10_OPS | {op for op, since in _ADDED_OPS.items() if wanted >= since}


def max_opset(version: str) -> int:
    wanted = parse_version(version)
    return max(opset for since, opset in _MAX_OPSET.items() if wanted >= since)


@dataclasses.dataclass
class OpCheck:
    version: str
    ops: dict[str, int]  # op type -> count in the graph
    problems: list[str]  # one line each; empty when TensorRT will import the graph

    @property
    def ok(self) -> bool:
        return not self.problems


def check_ops(graph, version: str) -> OpCheck:
    """Every node of an ONNX ModelProto against TensorRT `version`'s supported-op list and Q/DQ rules."""
    from kdiqa_edge.export.quantize import asymmetric_qdq_nodes

    supported = supported_ops(version)
    ops: dict[str, int] = {}
    problems = []
    for node in graph.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    for node in graph.graph.node:
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{node.op_type} ({node.domain}) is a custom-domain op TensorRT's parser does not know")
    for op in sorted(set(ops) - supported):
        since = _ADDED_OPS.get(op)
        when = f" (supported from TensorRT {since[0]}.{since[1]})" if since else ""
        problems.append(f"{op} x{ops[op]} is not supported by TensorRT {version}{when}")
    opset = max((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset > max_opset(version):
        problems.append(f"opset {opset} is newer than TensorRT {version} reads ({max_opset(version)})")
    bad = asymmetric_qdq_nodes(graph)
    if bad:
        problems.append(f"{len(bad)} Q/DQ node(s) with non-zero or uint8 zero points (e.g. {bad[0]}); "
                        "TensorRT needs symmetric int8 Q/DQ")
    return OpCheck(version, dict(sorted(ops.items())), problems)


def trtexec_command(onnx_path: Path, engine_path: Path, input_shape: tuple[int, ...], cfg: ExportConfig,
                    timing_cache: Path) -> str:
    """The trtexec line that builds the same engine as `build_engine` (strongly typed, same profile)."""
    def shape(batch: int) -> str:
        return "image:" + "x".join(str(d) for d in (batch, *input_shape[1:]))

    args = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}", "--stronglyTyped",
            f"--minShapes={shape(1)}", f"--optShapes={shape(cfg.opt_batch)}", f"--maxShapes={shape(cfg.max_batch)}",
            f"--memPoolSize=workspace:{cfg.workspace_mib}M", f"--timingCacheFile={timing_cache}"]
    return " ".join(shlex.quote(a) for a in args)


def script_timing_cache(cfg: ExportConfig) -> Path:
    """The timing cache trtexec.sh names: one beside it, or the file named with --timing-cache, absolute (the
    script runs from its own folder, not from the one the export ran in)."""
    return Path(cfg.timing_cache).absolute() if cfg.timing_cache else Path("timing.cache")


def default_timing_cache() -> Path:
    from kdiqa_edge import paths

    return paths.cache_dir() / "tensorrt" / "timing.cache"


def gpu_info() -> dict[str, str]:
    import torch

    if not torch.cuda.is_available():
        raise ExportError("building a TensorRT engine needs a CUDA GPU, and torch sees none here")
    major, minor = torch.cuda.get_device_capability(0)
    return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}


def build_engine(onnx_path: Path, engine_path: Path, input_shape: tuple[int, ...], cfg: ExportConfig,
                 timing_cache: Path, header: dict[str, Any]) -> dict[str, Any]:
    """Parse the ONNX into a strongly typed network and serialize an engine with the kdiqa-edge header."""
    import tensorrt as trt

    from kdiqa_edge import artifact
    from kdiqa_edge.io import write_bytes

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is not None:  # TensorRT 11 is always strongly typed and keeps the flag as a no-op
        flags |= 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT {trt.__version__} cannot parse {onnx_path.name}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_mib << 20)
    profile = builder.create_optimization_profile()
    profile.set_shape("image", (1, *input_shape[1:]), (cfg.opt_batch, *input_shape[1:]),
                      (cfg.max_batch, *input_shape[1:]))
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT {trt.__version__} failed to build an engine from {onnx_path.name}")
    write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))
    full_header = {**header, "tensorrt_version": trt.__version__, "gpu": gpu_info(),
                   "profile": {"min": 1, "opt": cfg.opt_batch, "max": cfg.max_batch},
                   "workspace_mib": cfg.workspace_mib}
    artifact.write_engine_file(engine_path, full_header, bytes(serialized))
    return full_header


def installed_version() -> str:
    """major.minor of the tensorrt that imports here."""
    import tensorrt as trt

    return ".".join(trt.__version__.split(".")[:2])


def tensorrt_available() -> str | None:
    """None when tensorrt imports, else why not."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return str(exc)
    return None


@register_target
class TensorRTTarget:
    """NVIDIA GPUs and Jetson: FP16 ONNX or symmetric int8 Q/DQ ONNX -> strongly typed engine."""

    name = "tensorrt"
    supports = Supports(precisions=("fp32", "fp16", "int8"), dynamic_batch=True,
                        tolerance={"fp32": 1e-4, "fp16": 5e-2})
    engine_tolerance: ClassVar[dict[str, float]] = {"fp32": 1e-2, "fp16": 5e-2}  # FP32 layers may run in TF32

    def preflight(self, cfg: ExportConfig) -> None:
        """A --tensorrt-version that is no version is refused before any work (it failed after the ONNX)."""
        parse_version(cfg.tensorrt_version)

    @staticmethod
    def missing() -> str | None:
        """None where tensorrt imports here (an engine can be built), else why not."""
        return tensorrt_available()

    def export(self, model, examples: Examples, out: Path, cfg: ExportConfig, meta: dict[str, Any]) -> ExportResult:
        import onnx

        from kdiqa_edge import artifact
        from kdiqa_edge.export import onnx as onnx_target
        from kdiqa_edge.io import write_script

        meta = {**meta, "target": self.name}
        # the ONNX TensorRT consumes: same graph as the onnx target, but INT8 as symmetric S8S8 Q/DQ
        result = onnx_target.build(model, examples, out, cfg, meta, form="s8s8", tolerance=self.supports.tolerance)
        onnx_path = result.files[0]
        graph = onnx.load(str(onnx_path))
        missing = tensorrt_available()
        # the targeted version, and the installed one when the engine is built here
        versions = [cfg.tensorrt_version] + ([] if missing else [installed_version()])
        for version in dict.fromkeys(versions):
            check = check_ops(graph, version)
            result.extra.setdefault("op_check", {"tensorrt_version": check.version, "ops": check.ops,
                                                 "problems": check.problems})
            if not check.ok:
                raise ExportError(f"{onnx_path.name} will not import into TensorRT {version}: "
                                  + "; ".join(check.problems))

        input_shape = tuple(d.dim_value or 1 for d in graph.graph.input[0].type.tensor_type.shape.dim)
        engine_path = out / f"model.{cfg.precision}.engine"
        timing_cache = Path(cfg.timing_cache) if cfg.timing_cache else default_timing_cache()
        # the command runs on the device, beside the files
        command = trtexec_command(Path(onnx_path.name), Path(engine_path.name), input_shape, cfg,
                                  script_timing_cache(cfg))
        command_file = write_script(out / "trtexec.sh", [
            "Build the engine on the target device (engines do not move between GPUs or TensorRT versions).",
            "Same network, precision and profile as `kdiqa-edge export --target tensorrt` builds;",
            "trtexec writes a bare engine without the kdiqa-edge header the runtime reads, so prefer the export "
            "command there."], [command])
        result.files.append(command_file)
        result.extra["trtexec"] = command
        result.notes.append(f"trtexec equivalent: {command_file.name} (beside {onnx_path.name}; from any folder) "
                            f"runs {command}")

        if missing is not None:
            result.unavailable = (f"tensorrt does not import here ({missing}): NO ENGINE WAS BUILT; wrote the "
                                  f"TensorRT-ready {onnx_path.name} and trtexec.sh; build on the device")
            result.extra["engine_built"] = False
            return result

        # the engine header carries the same kdiqa_edge.* keys as the ONNX it was built from
        props = {p.key: p.value for p in graph.metadata_props if p.key.startswith(artifact.PREFIX)}
        header = build_engine(onnx_path, engine_path, input_shape, cfg, timing_cache, props)
        result.files.append(engine_path)
        result.extra["engine_built"] = True
        result.extra["engine"] = {k: header[k] for k in ("tensorrt_version", "gpu", "profile")}
        result.parity["engine"] = self._engine_parity(model, engine_path, examples, cfg.precision)
        return result

    def _engine_parity(self, model, engine_path: Path, examples: Examples, precision: str) -> dict[str, Any]:
        from kdiqa_edge.export import evaluate
        from kdiqa_edge.export.evaluate import torch_reference
        from kdiqa_edge.runtime import QualityModel

        scores = QualityModel.load(engine_path).predict(examples.parity)
        report = evaluate.parity(torch_reference(model, examples.parity), scores,
                                 self.engine_tolerance.get(precision))
        if report.get("passed") is False:
            raise ExportError(f"{engine_path.name}: engine parity failed, max |score - torch score| = "
                              f"{report['max_abs_diff']:.2e}")
        return report
