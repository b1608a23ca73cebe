"""ScoreModel: the folded head equals the model's own head; uint8 input equals normalized float input."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("open_clip")

from kdiqa_edge.errors import ExportError
from kdiqa_edge.models.score import ScoreModel
from kdiqa_edge.preprocess import normalize


@pytest.fixture(scope="module")
def teacher():
    from kdiqa_edge.models.teacher import load_teacher

    return load_teacher("tiny")


@pytest.fixture(scope="module")
def students(teacher):
    from kdiqa_edge.models.student import create_student

    torch.manual_seed(0)
    quality = create_student("test_resnet", teacher.head, teacher.preprocess, pretrained=False).eval()
    regression = create_student("test_resnet", None, teacher.preprocess, pretrained=False).eval()
    return {"quality": quality, "regression": regression}


def _pixels(size: int, count: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("name", ["teacher", "quality", "regression"])
def test_folded_head_matches_model(name, teacher, students):
    model = teacher if name == "teacher" else students[name]
    x = torch.from_numpy(normalize(_pixels(model.preprocess.size), model.preprocess))
    scored = ScoreModel(model)
    with torch.no_grad():
        expected, got = model(x), scored(x)
    assert got.shape == (4,)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert scored.quality_head == (name != "regression")
    if scored.quality_head:  # one constant matrix W = logit_scale * anchors
        torch.testing.assert_close(scored.head.weight, model.head.logit_scale * model.head.anchors)


def test_probs_output(teacher):
    x = torch.from_numpy(normalize(_pixels(64), teacher.preprocess))
    scored = ScoreModel(teacher, with_probs=True)
    with torch.no_grad():
        score, probs = scored(x)
    assert probs.shape == (4, 5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))
    torch.testing.assert_close((probs * torch.arange(1.0, 6.0)).sum(-1), score)
    assert scored.output_names == ["score", "probs"]


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_uint8_input_equals_float_input(layout, students):
    model = students["quality"]
    pixels = _pixels(model.preprocess.size, seed=1)
    as_float = torch.from_numpy(normalize(pixels, model.preprocess))
    raw = torch.from_numpy(pixels if layout == "NHWC" else np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
    uint8_model = ScoreModel(model, input="uint8", layout=layout)
    with torch.no_grad():
        torch.testing.assert_close(uint8_model(raw), ScoreModel(model)(as_float), atol=1e-5, rtol=0)
    spec = uint8_model.input_spec()
    assert spec == {"name": "image", "dtype": "uint8", "layout": layout, "size": 64, "normalized": False}


def test_reparameterize_fuses_blocks(teacher):
    """A student with re-parameterizable blocks (MobileOne) is fused at export and scores the same."""
    from kdiqa_edge.models.student import create_student

    torch.manual_seed(0)
    model = create_student("mobileone_s0", teacher.head, teacher.preprocess, pretrained=False).eval()
    x = torch.from_numpy(normalize(_pixels(64, count=2), model.preprocess))
    scored = ScoreModel(model)
    fused = [m for m in scored.modules() if getattr(m, "reparam_conv", None) is not None]
    assert fused, "reparameterize_model fused no block"
    assert all(getattr(m, "reparam_conv", None) is None for m in model.modules())  # the source is untouched
    with torch.no_grad():
        torch.testing.assert_close(scored(x), model(x), atol=1e-4, rtol=0)


def test_bad_options(students):
    model = students["quality"]
    with pytest.raises(ExportError, match="input kind"):
        ScoreModel(model, input="float16")
    with pytest.raises(ExportError, match="NHWC"):
        ScoreModel(model, input="float", layout="NHWC")
    with pytest.raises(ExportError, match="regression"):
        ScoreModel(students["regression"], with_probs=True)
