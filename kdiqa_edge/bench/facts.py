"""Model facts without torch: parameter count from the ONNX graph's initializers, MACs, file size, memory.

The parameter count reads the ONNX protobuf wire format directly (a few dozen lines), so it works where
only onnxruntime is installed. MACs need shapes: they use the `onnx` package's shape inference when it is
installed, torch's flop counter for checkpoints, and are left out otherwise.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

# ONNX TensorProto.DataType values that hold weights (float, uint8, int8, float16, double, bfloat16, fp8s,
# int4/uint4); int64/int32 initializers are shapes and indices, not parameters.
_WEIGHT_TYPES = {1, 2, 3, 10, 11, 16, 17, 18, 19, 20, 21, 22}
# Field numbers in onnx.proto: ModelProto.graph, GraphProto.node/initializer, NodeProto.op_type/attribute,
# AttributeProto.t, TensorProto.dims/data_type.
_MODEL_GRAPH, _GRAPH_NODE, _GRAPH_INITIALIZER = 7, 1, 5
_NODE_OP_TYPE, _NODE_ATTRIBUTE, _ATTRIBUTE_TENSOR = 4, 5, 5
_TENSOR_DIMS, _TENSOR_DATA_TYPE = 1, 2


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, int value or (start, end) slice) for each field of one message."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield field, wire, value
        elif wire == 2:
            length, pos = _varint(buf, pos)
            yield field, wire, (pos, pos + length)
            pos += length
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def _tensor_elements(buf: memoryview, start: int, end: int) -> tuple[int, int]:
    """(element count, data type) of a TensorProto."""
    dims: list[int] = []
    data_type = 0
    for field, wire, value in _fields(buf, start, end):
        if field == _TENSOR_DIMS and wire == 0:
            dims.append(value)
        elif field == _TENSOR_DIMS and wire == 2:  # packed repeated int64
            pos, stop = value
            while pos < stop:
                dim, pos = _varint(buf, pos)
                dims.append(dim)
        elif field == _TENSOR_DATA_TYPE:
            data_type = value
    count = 1
    for dim in dims:
        count *= dim
    return count, data_type


def onnx_param_count(path: str | Path) -> int:
    """Weight elements in the graph's initializers and Constant nodes (shape/index tensors excluded)."""
    buf = memoryview(Path(path).read_bytes())
    total = 0
    for field, wire, value in _fields(buf, 0, len(buf)):
        if field != _MODEL_GRAPH or wire != 2:
            continue
        for gfield, gwire, gvalue in _fields(buf, *value):
            if gfield == _GRAPH_INITIALIZER and gwire == 2:
                count, data_type = _tensor_elements(buf, *gvalue)
                total += count if data_type in _WEIGHT_TYPES and count > 1 else 0
            elif gfield == _GRAPH_NODE and gwire == 2:
                total += _constant_node_params(buf, *gvalue)
    return total


def _constant_node_params(buf: memoryview, start: int, end: int) -> int:
    op_type, tensors = "", []
    for field, wire, value in _fields(buf, start, end):
        if field == _NODE_OP_TYPE and wire == 2:
            op_type = bytes(buf[value[0]:value[1]]).decode()
        elif field == _NODE_ATTRIBUTE and wire == 2:
            tensors += [v for f, w, v in _fields(buf, *value) if f == _ATTRIBUTE_TENSOR and w == 2]
    if op_type != "Constant":
        return 0
    total = 0
    for tensor in tensors:
        count, data_type = _tensor_elements(buf, *tensor)
        total += count if data_type in _WEIGHT_TYPES and count > 1 else 0
    return total


def onnx_macs(path: str | Path) -> int | None:
    """Multiply-accumulates of one image through Conv/ConvTranspose/MatMul/Gemm (and their quantized forms).

    Needs the `onnx` package for shape inference; None when it is not installed or shapes stay unknown.
    """
    try:
        import onnx
        from onnx import shape_inference
    except ImportError:
        return None
    try:
        model = shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False), data_prop=True)
    except Exception:  # noqa: BLE001 - any inference failure just means "not computable"
        return None
    graph = model.graph

    def dims(info) -> list[int] | None:
        shape = info.type.tensor_type.shape
        if not info.type.tensor_type.HasField("shape"):
            return None
        return [d.dim_value if d.HasField("dim_value") else 1 for d in shape.dim]  # symbolic batch -> 1

    shapes = {vi.name: dims(vi) for vi in [*graph.input, *graph.value_info, *graph.output]}
    shapes.update({init.name: list(init.dims) for init in graph.initializer})
    total = 0
    for node in graph.node:
        op = node.op_type
        if op in ("Conv", "ConvInteger", "QLinearConv", "ConvTranspose"):
            weight_index = 3 if op == "QLinearConv" else 1
            out, weight = shapes.get(node.output[0]), shapes.get(node.input[weight_index])
            if not out or not weight:
                return None
            per_output = 1
            for d in weight[1:]:
                per_output *= d  # Cin/groups * kH * kW
            if op == "ConvTranspose":  # every input element scatters into Cout/groups * k outputs
                per_output = weight[1] * _prod(weight[2:])
                out = shapes.get(node.input[0])
            total += _prod(out) * per_output
        elif op in ("MatMul", "MatMulInteger", "QLinearMatMul", "Gemm"):
            out, a = shapes.get(node.output[0]), shapes.get(node.input[0])
            if not out or not a:
                return None
            transposed = op == "Gemm" and any(att.name == "transA" and att.i for att in node.attribute)
            k = a[-2] if transposed else a[-1]
            total += _prod(out) * k
    return int(total)


def _prod(values) -> int:
    result = 1
    for value in values:
        result *= int(value)
    return result


def size_bytes(path: str | Path) -> int:
    """A file's size, or the total of a directory's files (an .mlpackage, a checkpoint dir); an OpenVINO IR
    is its .xml and the .bin of its weights beside it."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    weights = path.with_suffix(".bin") if path.suffix == ".xml" else None
    return path.stat().st_size + (weights.stat().st_size if weights is not None and weights.is_file() else 0)


def current_rss_mb() -> float | None:
    """Resident memory now, in MB (1e6 bytes, as every size bench reports) (Linux /proc), None elsewhere."""
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_mb() -> float | None:
    """The process's high-water resident memory so far, in MB (1e6 bytes)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6  # bytes on macOS, KiB on Linux
