"""The contract between exporters and the torch-free runtime: metadata keys and the engine file format.

Every artifact (ONNX metadata_props, CoreML user_defined_metadata, the TensorRT engine header, the
ExecuTorch program's `kdiqa_edge_meta` constant method, the OpenVINO IR's rt_info) carries the same
string-valued keys, so the runtime needs nothing but the artifact itself.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from kdiqa_edge.errors import CheckpointError

FORMAT_VERSION = "1"
PREFIX = "kdiqa_edge."

# key -> meaning; values are strings (JSON where structured)
KEYS = {
    "format": "artifact format version",
    "preprocess": "JSON PreprocessSpec.to_dict(): resize/crop/mean/std the input expects",
    "input": 'JSON {"name", "dtype": "float32"|"uint8", "layout": "NCHW"|"NHWC", "size", "normalized": bool}',
    "outputs": 'JSON list of output names, "score" first',
    "score_range": "JSON [1, 5]",
    "prompts": "JSON list of the prompts the anchors were built from",
    "source": 'JSON {"kind": "teacher"|"student", "arch", "checkpoint_hash", "pretrained", "variant"} (+ "params", '
              '"macs" where the runtime cannot count them: .pte)',
    "precision": "fp32 | bf16 | fp16 | int8",
    "target": "onnx | tensorrt | coreml | executorch | openvino",
    "versions": "JSON {package: version} of the exporting environment",
    "batch": "the one batch size a static-shape artifact takes (ExecuTorch programs: 1); absent: dynamic",
    "recipe": "the INT8 recipe's name (export/recipes.py), INT8 ONNX only",
    "inference_precision": "f32 | bf16 | f16: OpenVINO's INFERENCE_PRECISION_HINT, which the runtime applies "
                           "(OpenVINO IR only; bf16/fp16 exports are the f32 graph run at that precision; an int8 IR's: what "
                           "its float regions run in, f32 or bf16)",
    "ort_spinning": "on | off: ONNX Runtime intra-op spin-waiting, measured for the pick by --precision auto; "
                    "the runtime applies it (absent: ORT's default, on)",
}


def encode(meta: dict[str, Any]) -> dict[str, str]:
    """Plain dict -> prefixed string dict (JSON-encoding non-strings)."""
    return {PREFIX + k: (v if isinstance(v, str) else json.dumps(v, sort_keys=True)) for k, v in meta.items()}


def decode(props: dict[str, str]) -> dict[str, Any]:
    """Prefixed string dict -> plain dict (JSON-decoding what parses)."""
    out: dict[str, Any] = {}
    for key, value in props.items():
        if not key.startswith(PREFIX):
            continue
        try:
            out[key[len(PREFIX):]] = json.loads(value)
        except (TypeError, ValueError):
            out[key[len(PREFIX):]] = value
    return out


# --- ExecuTorch program: a constant method returning json.dumps(encode(meta)) as a uint8 tensor ----------
# (.pte files carry no free-form metadata; a constant method travels inside the program, readable by any
# ExecuTorch runtime, and leaves `forward` alone)
PTE_META_METHOD = "kdiqa_edge_meta"


# --- TensorRT engine file: magic, header length, JSON header, serialized engine -------------------------
ENGINE_MAGIC = b"KDIQATRT"
_LEN = struct.Struct("<I")


def write_engine_file(path: str | Path, header: dict[str, Any], engine: bytes) -> Path:
    from kdiqa_edge.io import write_bytes

    blob = json.dumps(header, sort_keys=True).encode("utf-8")
    return write_bytes(path, ENGINE_MAGIC + _LEN.pack(len(blob)) + blob + bytes(engine))


def read_engine_file(path: str | Path) -> tuple[dict[str, Any], bytes]:
    data = Path(path).read_bytes()
    if not data.startswith(ENGINE_MAGIC):
        raise CheckpointError(f"{path} is not a kdiqa-edge engine file (no {ENGINE_MAGIC.decode()} header)")
    start = len(ENGINE_MAGIC) + _LEN.size
    if len(data) < start:  # cut off inside the header's length: struct.error, a traceback in score
        raise CheckpointError(f"{path}: truncated engine file ({len(data)} bytes)")
    (length,) = _LEN.unpack_from(data, len(ENGINE_MAGIC))
    try:
        header = json.loads(data[start:start + length])
    except ValueError:
        raise CheckpointError(f"{path}: corrupt engine header") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt engine header (not a JSON object)")
    return header, data[start + length:]
