"""Trace-time layout rewrites (export/layouts.py): identical patches, other transposes."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
onnx = pytest.importorskip("onnx")

from kdiqa_edge.export.layouts import channels_last_patches


def _blocks(model):
    return [m for m in model.modules() if type(m).__name__ == "MobileVitBlock"]


@pytest.mark.parametrize("size", [64, 80])  # 80 px: 5x5 maps, resized to whole patches and back
def test_mobilevit_patches_are_timms(size):
    torch.manual_seed(0)
    model = timm.create_model("mobilevit_xxs", pretrained=False, num_classes=0).eval()
    original = type(_blocks(model)[0]).forward
    seen = []
    for block in _blocks(model):
        block.transformer.register_forward_hook(lambda module, args, out: seen.append(args[0].contiguous()))
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model(x)
        with channels_last_patches():
            assert type(_blocks(model)[0]).forward is not original
            got = model(x)
    assert type(_blocks(model)[0]).forward is original  # timm's forward is back after the trace
    half = len(seen) // 2
    assert half == 3
    for timm_patches, ours in zip(seen[:half], seen[half:]):  # the transformer sees the very same patches
        assert torch.equal(timm_patches, ours)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _transposes(path):
    graph = onnx.load(str(path)).graph
    return [tuple(next(a.ints for a in n.attribute if a.name == "perm")) for n in graph.node if n.op_type == "Transpose"]


def test_onnx_export_unfolds_channels_last(tmp_path, monkeypatch):
    from kdiqa_edge.export import layouts
    from kdiqa_edge.export.base import ExportConfig, model_input
    from kdiqa_edge.export.evaluate import torch_reference
    from kdiqa_edge.export.onnx import export_fp32, score_model
    from kdiqa_edge.models import QualityHead
    from kdiqa_edge.models.student import create_student
    from kdiqa_edge.preprocess import PreprocessSpec

    torch.manual_seed(0)
    head = QualityHead(torch.nn.functional.normalize(torch.randn(5, 32), dim=-1), 14.3)
    student = create_student("mobilevit_xxs", head, PreprocessSpec(size=96), pretrained=False).eval()
    scored = score_model(student, ExportConfig())
    ours = _transposes(export_fp32(scored, tmp_path / "ours.onnx", 17))
    # 96 px: 12, 6 and 3 (resized to 4) px maps. Per MobileViT block, one transpose each way that keeps the channels innermost
    assert ours.count((0, 2, 4, 1, 3, 5)) == 3 and ours.count((0, 3, 1, 4, 2, 5)) == 3
    # timm's own unfold and fold swap [.., p_h, n_w, p_w] axes, moving runs of p_w = 2 elements (slow in
    # uint8): six more (0, 2, 1, 3) transposes than ours (the rest are attention's heads)
    monkeypatch.setattr(layouts, "channels_last_patches", contextlib.nullcontext)
    timms = _transposes(export_fp32(scored, tmp_path / "timm.onnx", 17))
    assert timms.count((0, 2, 1, 3)) - ours.count((0, 2, 1, 3)) == 6
    assert (0, 2, 4, 1, 3, 5) not in timms

    import onnxruntime as ort

    pixels = np.random.default_rng(0).integers(0, 256, (2, 96, 96, 3), dtype=np.uint8)
    session = ort.InferenceSession(str(tmp_path / "ours.onnx"), providers=["CPUExecutionProvider"])
    score = session.run(None, {"image": model_input(pixels, scored.input_spec(), scored.preprocess)})[0]
    np.testing.assert_allclose(score.reshape(-1), torch_reference(student, pixels), atol=1e-4)
