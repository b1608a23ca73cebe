"""The method as DESIGN.md states it, checked by hand on tiny tensors, and the bad inputs around the teacher
and the student that used to give a silent wrong answer or a traceback instead of one line."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from cli_helpers import run_cli

from kdiqa_edge.errors import CheckpointError, ConfigError, WeightsUnavailable
from kdiqa_edge.models.head import LEVEL_NAMES, prompts_for
from kdiqa_edge.models.student import check_student, create_student
from kdiqa_edge.models.teacher import create_clip, load_teacher


@pytest.fixture(scope="module")
def tiny():
    return load_teacher("tiny")


def _save_timm(arch: str, path):
    from safetensors.torch import save_file

    model = timm.create_model(arch, pretrained=False)  # with its classifier, as an ImageNet file has it
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


# ----------------------------------------------------------------------------------------------------------
# The method by hand (numpy), against the code


def test_teacher_score_is_the_design_formula_by_hand(tiny):
    """s_i = cos(v, t_i); p = softmax(logit_scale * s); score = sum p_i * i, with t_i the normalized mean of
    the normalized prompt features (open_clip's build_zero_shot_classifier)."""
    clip_model, tokenizer, _ = create_clip("tiny")
    with torch.no_grad():
        text = clip_model.encode_text(tokenizer([f"a photo of {name} quality" for name in LEVEL_NAMES])).numpy()
    anchors = text / np.linalg.norm(text, axis=1, keepdims=True)
    np.testing.assert_allclose(tiny.head.anchors.numpy(), anchors, atol=1e-6)
    assert float(tiny.head.logit_scale) == pytest.approx(math.exp(float(clip_model.logit_scale.detach())), rel=1e-6)

    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        v = clip_model.encode_image(x).numpy()
        score = tiny(x).numpy()
    cos = (v / np.linalg.norm(v, axis=1, keepdims=True)) @ anchors.T
    logits = float(tiny.head.logit_scale) * cos
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(score, p @ np.arange(1, 6), atol=1e-5)


def test_distillation_loss_by_hand_over_a_run():
    """L(t) = lambda(t) (1 - cos(u, v)) + (1 - lambda(t)) MSE, lambda(t) = 0.5 (1 + cos(pi t / T))."""
    from kdiqa_edge.train.losses import distill_loss
    from kdiqa_edge.train.schedules import parse_variant

    rng = np.random.default_rng(0)
    u, v = rng.normal(size=(6, 16)), rng.normal(size=(6, 16))
    score, mos = 1 + 4 * rng.random(6), 1 + 4 * rng.random(6)
    cos = (u * v).sum(1) / np.linalg.norm(u, axis=1) / np.linalg.norm(v, axis=1)
    total = 7
    for t in range(total + 1):
        lam = 0.5 * (1 + math.cos(math.pi * t / total))
        expected = lam * (1 - cos).mean() + (1 - lam) * ((score - mos) ** 2).mean()
        got = parse_variant("full").lam(t, total)
        assert got == pytest.approx(lam)
        terms = distill_loss(*(torch.tensor(a, dtype=torch.float32) for a in (u, v, score, mos)), got)
        assert float(sum(terms.values())) == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Prompt templates: one without {level} made five identical anchors, and every image scored 3


@pytest.mark.parametrize("template", ["a good photo", "a photo of {} quality", "a photo of {level} {kind}",
                                      "a photo of {level quality"])
def test_template_without_level_is_one_line_not_a_constant_score(template):
    with pytest.raises(ConfigError, match="template"):
        prompts_for([template])
    with pytest.raises(ConfigError, match=r"\{level\}|template"):
        load_teacher("tiny", templates=(template,))


def test_template_error_is_one_line_at_the_cli(capsys):
    code, _out, err = run_cli(["teacher", "eval", "--teacher", "tiny", "--template", "a good photo"], capsys)
    assert code == 2
    assert err.strip().count("\n") == 0 and "{level}" in err and "Traceback" not in err


def test_good_templates_still_average():
    assert prompts_for(["a photo of {level} quality", "{level}"])[0] == ["a photo of bad quality", "bad"]


# ----------------------------------------------------------------------------------------------------------
# Teacher names and weights files


def test_registered_teacher_refuses_a_pretrained_tag():
    """`tiny:openai` was the random-init tiny, silently."""
    with pytest.raises(ConfigError, match="takes no ':openai' tag"):
        create_clip("tiny:openai")


def test_teacher_weights_that_are_not_weights_name_the_error(tmp_path):
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"hello")
    with pytest.raises(CheckpointError) as info:
        create_clip("ViT-S-32-alt", weights=garbage)  # the smallest ViT config open_clip has
    message = str(info.value)
    # the message was "... weights: 101" (a KeyError from the unpickler): now it says what failed
    assert "\n" not in message and message.split("weights: ", 1)[1].split(":")[0].endswith(("Error", "Exception"))
    with pytest.raises(WeightsUnavailable, match="is not a file"):
        create_clip("ViT-S-32-alt", weights=tmp_path)


# ----------------------------------------------------------------------------------------------------------
# Student weights: a file of another model loaded NOTHING (timm's strict=False) and the student was
# labelled pretrained; a corrupt file or a bad timm tag was a traceback


def test_student_weights_of_another_model_are_refused(tiny, tmp_path):
    other = _save_timm("test_vit", tmp_path / "test_vit.safetensors")
    with pytest.raises(WeightsUnavailable, match="does not hold test_resnet weights"):
        check_student("test_resnet", weights=other)  # before any teacher work
    with pytest.raises(WeightsUnavailable, match="does not hold test_resnet weights"):
        create_student("test_resnet", tiny.head, tiny.preprocess, weights=other)
    own = _save_timm("test_resnet", tmp_path / "test_resnet.safetensors")
    student = create_student("test_resnet", tiny.head, tiny.preprocess, weights=own)
    assert student.pretrained
    reference = timm.create_model("test_resnet", pretrained=False)
    from safetensors.torch import load_file

    reference.load_state_dict(load_file(str(own)))
    assert torch.equal(student.encoder.conv1[0].weight, reference.conv1[0].weight)


def test_corrupt_student_weights_and_bad_tag_are_one_line(tiny, tmp_path):
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"hello")
    with pytest.raises(WeightsUnavailable, match="cannot load the test_resnet weights from garbage.bin"):
        create_student("test_resnet", tiny.head, tiny.preprocess, weights=garbage)
    with pytest.raises(WeightsUnavailable, match="is not a file"):
        check_student("test_resnet", weights=tmp_path)
    with pytest.raises(ConfigError, match="unknown pretrained tag 'nope'"):
        check_student("test_resnet.nope", pretrained=False)
    with pytest.raises(ConfigError, match="unknown pretrained tag 'nope'"):
        create_student("test_resnet.nope", tiny.head, tiny.preprocess, pretrained=False)


def test_distill_refuses_foreign_student_weights_before_the_teacher(tmp_path, capsys, monkeypatch):
    from kdiqa_edge.train import distill

    other = _save_timm("test_vit", tmp_path / "test_vit.safetensors")
    monkeypatch.setattr(distill, "_teacher", lambda *a, **k: pytest.fail("teacher work before the student check"))
    code, _out, err = run_cli(["distill", "--teacher", "tiny", "--student", "test_resnet", "--student-weights", other,
                              "--epochs", "1", "--quiet", "--out", tmp_path / "run"], capsys)
    assert code == 2 and "does not hold test_resnet weights" in err and "Traceback" not in err
    assert err.strip().count("\n") == 0


def test_the_student_sees_the_image_whose_teacher_features_it_matches(small_synthetic):
    """v is the teacher's features of the SAME image (DESIGN.md): the cached features are of the unflipped
    image, so distillation does not flip by default (it flipped half the images against unflipped targets).
    The teacher fine-tune keeps its own augmentation, so its cached runs are the ones they were."""
    from kdiqa_edge.train.distill import DistillConfig, teacher_finetune_config
    from kdiqa_edge.train.finetune import FinetuneConfig
    from kdiqa_edge.train.loop import TrainConfig

    assert DistillConfig().augment == "none" and TrainConfig.from_any(DistillConfig()).augment == "none"
    flipped = teacher_finetune_config(DistillConfig(augment="hflip"), small_synthetic)
    plain = teacher_finetune_config(DistillConfig(), small_synthetic)
    assert flipped == plain and plain.augment == FinetuneConfig().augment == "hflip"
