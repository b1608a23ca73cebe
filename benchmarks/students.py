"""Random-init students as `kdiqa-edge export` writes them, for the benchmarks in this folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def int8_graph(arch: str, folder: Path, calib: np.ndarray, size: int = 224):
    """A random-init timm `arch` student (seed 0, a random 5-prompt head) exported as our FP32 score model
    (`folder/model.fp32.onnx`, opset 17) and its kdiqa_edge Int8Graph, MinMax-calibrated on `calib` (NCHW
    float32): `graph.fp32` is the FP32 file, `graph.facts` what the recipes read, `graph.build(recipe, path)`
    writes one INT8 recipe."""
    import torch

    from kdiqa_edge.export.base import ExportConfig
    from kdiqa_edge.export.onnx import Int8Graph, export_fp32, score_model
    from kdiqa_edge.models import QualityHead
    from kdiqa_edge.models.student import create_student
    from kdiqa_edge.preprocess import PreprocessSpec

    torch.manual_seed(0)
    head = QualityHead(torch.nn.functional.normalize(torch.randn(5, 512), dim=-1), 14.3)
    student = create_student(arch, head, PreprocessSpec(size=size), pretrained=False).eval()
    folder.mkdir(parents=True)
    fp32 = export_fp32(score_model(student, ExportConfig()), folder / "model.fp32.onnx", 17)
    return Int8Graph(fp32, calib, "minmax", folder)
