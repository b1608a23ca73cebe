"""CoreML conversion: the torch.export -> jit.trace fallback, Swin through rank-5 windows, and one clear error when nothing converts."""

from __future__ import annotations

import contextlib

import pytest

torch = pytest.importorskip("torch")
ct = pytest.importorskip("coremltools")

from kdiqa_edge.errors import ExportError
from kdiqa_edge.export import coreml
from kdiqa_edge.export.base import ExportConfig
from kdiqa_edge.models.student import create_student
from kdiqa_edge.models.teacher import load_teacher


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


@pytest.fixture(scope="module")
def swin_student():
    """A small Swin (two stages, shifted windows, patch merging) at the tiny teacher's 64 px."""
    import timm

    from kdiqa_edge.models.student import NOT_PRETRAINED, StudentBuild, _assemble

    kwargs = {"img_size": 64, "embed_dim": 16, "depths": (2, 2), "num_heads": (1, 2), "window_size": 4}
    torch.manual_seed(0)
    encoder = timm.create_model("swin_tiny_patch4_window7_224", num_classes=0, exportable=True, **kwargs)
    teacher = load_teacher("tiny")
    build = StudentBuild("swin_tiny_patch4_window7_224", "quality", False, NOT_PRETRAINED, kwargs)
    return _assemble(encoder, teacher.head, teacher.preprocess, build).eval()


def test_rank5_swin_rearrangements_are_timms(swin_student):
    from timm.models import swin_transformer as swin

    x = torch.randn(3, 16, 24, 8)
    windows = swin.window_partition(x, (4, 4))
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        reference = swin_student(images)
        with coreml.rank5_swin():
            assert torch.equal(swin.window_partition(x, (4, 4)), windows)
            assert torch.equal(swin.window_reverse(windows, (4, 4), 16, 24), x)
            assert torch.equal(swin_student(images), reference)
    assert swin.window_partition is not coreml._window_partition  # timm's own functions are back


def test_swin_student_converts_with_rank5_windows(swin_student, monkeypatch):
    cfg = ExportConfig(target="coreml", precision="fp16")
    # timm's own rank-6 window partition is what Core ML refuses
    monkeypatch.setattr(coreml, "rank5_swin", contextlib.nullcontext)
    with pytest.raises(ExportError, match="rank"):
        coreml.convert(swin_student, cfg, {"source": {"arch": "swin"}})
    monkeypatch.undo()
    spec = coreml.convert(swin_student, cfg, {"source": {"arch": "swin"}}).get_spec()
    assert [i.name for i in spec.description.input] == ["image"]
    assert [o.name for o in spec.description.output] == ["score"]
