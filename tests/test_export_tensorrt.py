"""TensorRT without TensorRT: the op check on the ONNX it consumes, and the trtexec command printed for it."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("onnx")

from kdiqa_edge.errors import ConfigError
from kdiqa_edge.export import ExportConfig


def _graph(op_type: str, domain: str = "", opset: int = 17):
    from onnx import TensorProto, helper

    node = helper.make_node(op_type, ["image"], ["score"], domain=domain)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("score", TensorProto.FLOAT, [1, 4])])
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=opsets)


def test_tensorrt_op_check_flags_unsupported_ops():
    from kdiqa_edge.export.tensorrt import check_ops

    assert check_ops(_graph("Relu"), "10.3").ok
    unique = check_ops(_graph("Unique"), "10.3")
    assert not unique.ok and "Unique" in unique.problems[0] and unique.ops == {"Unique": 1}
    assert not check_ops(_graph("Gelu", domain="com.microsoft"), "10.3").ok  # custom domain
    assert not check_ops(_graph("RMSNormalization"), "10.3").ok  # added in TensorRT 10.15
    assert check_ops(_graph("RMSNormalization"), "10.15").ok
    assert not check_ops(_graph("Relu", opset=22), "10.3").ok  # opset newer than 10.3 parses
    with pytest.raises(ConfigError):
        check_ops(_graph("Relu"), "8.6")


def test_trtexec_command():
    from kdiqa_edge.export.tensorrt import trtexec_command

    cfg = ExportConfig(max_batch=16, opt_batch=4, workspace_mib=512)
    line = trtexec_command(Path("m.onnx"), Path("m.engine"), (1, 3, 224, 224), cfg, Path("timing.cache"))
    assert line == ("trtexec --onnx=m.onnx --saveEngine=m.engine --stronglyTyped --minShapes=image:1x3x224x224 "
                    "--optShapes=image:4x3x224x224 --maxShapes=image:16x3x224x224 --memPoolSize=workspace:512M "
                    "--timingCacheFile=timing.cache")
