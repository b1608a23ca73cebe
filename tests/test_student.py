"""Students: timm encoders projected into the teacher's space and scored by the teacher's frozen head."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from kdiqa_edge.errors import ConfigError, WeightsUnavailable
from kdiqa_edge.models import load_checkpoint, read_meta, save_checkpoint
from kdiqa_edge.models.head import QualityHead
from kdiqa_edge.models.student import RegressionHead, Student, create_student


@pytest.fixture(scope="module")
def teacher():
    from kdiqa_edge.models.teacher import load_teacher

    return load_teacher("tiny")


def _images(teacher, n=3, seed=0):
    size = teacher.preprocess.size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["test_efficientnet", "test_resnet", "test_vit"])
def test_student_speaks_the_teachers_head(teacher, arch):
    student = create_student(arch, teacher.head, teacher.preprocess, pretrained=False).eval()
    x = _images(teacher)
    with torch.no_grad():
        features = student.encode(x)
        score = student(x)
    assert features.shape == (3, teacher.head.embed_dim)
    assert score.shape == (3,)
    assert torch.all((score >= 1.0) & (score <= 5.0))
    # Same anchors and temperature as the teacher, frozen (buffers only, nothing trainable in the head).
    assert isinstance(student.head, QualityHead)
    assert torch.equal(student.head.anchors, teacher.head.anchors)
    assert float(student.head.logit_scale) == float(teacher.head.logit_scale)
    assert not [p for p in student.head.parameters() if p.requires_grad]
    assert student.head is not teacher.head  # a copy: training the student never touches the teacher
    assert student.preprocess == teacher.preprocess
    assert "not pretrained" in student.label


def test_student_checkpoint_round_trip(teacher, tmp_path):
    student = create_student("test_efficientnet", teacher.head, teacher.preprocess, pretrained=False).eval()
    save_checkpoint(student, tmp_path / "run" / "checkpoints" / "best")
    meta = read_meta(tmp_path / "run")
    assert meta["kind"] == "student" and meta["head"] == "quality" and meta["pretrained"] is False
    assert meta["embed_dim"] == teacher.head.embed_dim and "not pretrained" in meta["label"]
    loaded = load_checkpoint(tmp_path / "run")  # a run dir resolves to checkpoints/best
    assert isinstance(loaded, Student)
    x = _images(teacher)
    with torch.no_grad():
        assert torch.allclose(loaded(x), student(x), atol=1e-6)
        assert torch.allclose(loaded.encode(x), student.encode(x), atol=1e-6)


def test_regression_student_has_no_teacher_head(teacher, tmp_path):
    student = create_student("test_resnet", None, teacher.preprocess, pretrained=False).eval()
    assert isinstance(student.head, RegressionHead) and student.proj is None
    x = _images(teacher)
    with torch.no_grad():
        assert student(x).shape == (3,)
        assert student.encode(x).shape[1] == student.embed_dim
    save_checkpoint(student, tmp_path / "ckpt")
    assert read_meta(tmp_path / "ckpt")["head"] == "regression"
    loaded = load_checkpoint(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.allclose(loaded(x), student(x), atol=1e-6)


def test_offline_without_cached_weights_names_both_flags(teacher, monkeypatch):
    import kdiqa_edge.models.student as student_module

    monkeypatch.setattr(student_module, "_cached_weights", lambda cfg: None)
    monkeypatch.setattr(student_module, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(WeightsUnavailable) as info:
        create_student("resnet18", teacher.head, teacher.preprocess, pretrained=True)
    message = str(info.value)
    assert "--student-weights PATH" in message and "--no-pretrained" in message and "\n" not in message


def _imagenet_file(tmp_path):
    from safetensors.torch import save_file

    reference = timm.create_model("test_efficientnet", pretrained=False)  # with its 1000-class classifier
    path = tmp_path / "test_efficientnet.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    return reference, path


def test_student_weights_file_loads_through_timm(teacher, tmp_path):
    reference, path = _imagenet_file(tmp_path)
    student = create_student("test_efficientnet", teacher.head, teacher.preprocess, weights=path)
    assert student.pretrained and "not pretrained" not in student.label
    assert torch.equal(student.encoder.conv_stem.weight, reference.conv_stem.weight)
    with pytest.raises(WeightsUnavailable, match="not found"):
        create_student("test_efficientnet", teacher.head, teacher.preprocess,
                       weights=tmp_path / "missing.pth")


def test_cached_weights_are_used_without_network(teacher, tmp_path, monkeypatch):
    import kdiqa_edge.models.student as student_module

    reference, path = _imagenet_file(tmp_path)
    monkeypatch.setattr(student_module, "_cached_weights", lambda cfg: str(path))
    monkeypatch.setattr(student_module, "_hub_reachable", lambda timeout=3.0: pytest.fail("network probed"))
    student = create_student("test_efficientnet", teacher.head, teacher.preprocess, pretrained=True)
    assert student.pretrained
    assert torch.equal(student.encoder.conv_stem.weight, reference.conv_stem.weight)


def test_unknown_student_is_a_config_error(teacher):
    with pytest.raises(ConfigError, match="unknown timm model"):
        create_student("no_such_net", teacher.head, teacher.preprocess, pretrained=False)
