"""CoreML conversion falls back from torch.export to jit.trace, and says plainly when neither converts."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
ct = pytest.importorskip("coremltools")

from kdiqa_edge.errors import ExportError  # noqa: E402
from kdiqa_edge.export import coreml  # noqa: E402
from kdiqa_edge.export.base import ExportConfig  # noqa: E402
from kdiqa_edge.models.student import create_student  # noqa: E402
from kdiqa_edge.models.teacher import load_teacher  # noqa: E402


@pytest.fixture(scope="module")
def vit_student():
    teacher = load_teacher("tiny")
    return create_student("test_vit", teacher.head, teacher.preprocess, pretrained=False).eval()


def test_vit_student_converts_through_the_jit_trace_fallback(vit_student):
    # timm's ViT at the teacher's 64 px resamples its position embeddings with an antialiased bicubic
    # resize, which coremltools cannot convert from torch.export's graph: only the fallback converts it.
    cfg = ExportConfig(target="coreml", precision="fp16")
    exported = dict(coreml._traced_graphs(coreml._image_model(vit_student, cfg), 64, cfg))["torch.export"]
    with pytest.raises(Exception, match="upsample_bicubic2d_aa"):
        ct.convert(exported(), inputs=[ct.ImageType(name="image", shape=(1, 3, 64, 64))], convert_to="mlprogram")
    mlmodel = coreml.convert(vit_student, cfg, {"source": {"arch": "test_vit"}})
    spec = mlmodel.get_spec()
    assert [i.name for i in spec.description.input] == ["image"]
    assert [o.name for o in spec.description.output] == ["score"]


def test_unconvertible_model_is_one_clear_error(vit_student, monkeypatch):
    def broken():
        raise ValueError("Core ML only supports tensors with rank <= 5\nmore detail")

    monkeypatch.setattr(coreml, "_traced_graphs", lambda *a: (("torch.export", broken), ("jit.trace", broken)))
    with pytest.raises(ExportError, match=r"cannot convert test_vit \(torch.export: ValueError: Core ML only "
                                          r"supports tensors with rank <= 5; jit.trace: ValueError"):
        coreml.convert(vit_student, ExportConfig(target="coreml"), {"source": {"arch": "test_vit"}})
