"""Exporters: one module per target (onnx, tensorrt, coreml, executorch, openvino; cpu: auto across the CPU runtimes)
behind one small protocol, plus the pipeline.

    from kdiqa_edge.export import ExportConfig, export_checkpoint
    manifest = export_checkpoint("runs/distill", ExportConfig(target="all", precision="int8"), out="exports/")

Importing this package is light: the target modules import torch, onnx, coremltools, tensorrt and
executorch inside their functions.
"""

# each target module registers its target
from kdiqa_edge.export import coreml, cpu, executorch, onnx, openvino, tensorrt  # noqa: F401
from kdiqa_edge.export.base import (
    PRECISIONS,
    TARGETS,
    Examples,
    ExportConfig,
    ExportResult,
    Supports,
    Target,
    register_target,
)
from kdiqa_edge.export.pipeline import export_checkpoint, load_examples

__all__ = [
    "PRECISIONS", "TARGETS", "Examples", "ExportConfig", "ExportResult", "Supports", "Target",
    "export_checkpoint", "load_examples", "register_target",
]
