"""The CLIP quality teacher and checkpoints, on the tiny random-init open_clip config."""

from __future__ import annotations

import json

import pytest
import torch

from kdiqa_edge.errors import CheckpointError, ConfigError, WeightsUnavailable
from kdiqa_edge.models import QualityHead, load_checkpoint, register_checkpoint_kind, save_checkpoint
from kdiqa_edge.models.checkpoint import CHECKPOINT_BUILDERS, content_hash
from kdiqa_edge.models.head import LEVEL_NAMES
from kdiqa_edge.models.teacher import create_clip, load_teacher, parse_teacher, teacher_from_clip


@pytest.fixture(scope="module")
def tiny():
    return load_teacher("tiny")


def _images(n=6, size=64, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_anchors_equal_open_clip_zero_shot_classifier():
    import open_clip

    clip_model, tokenizer, build = create_clip("tiny")
    templates = ("a photo of {} quality", "a {} quality picture", "an image of {} quality")
    direct = open_clip.build_zero_shot_classifier(clip_model, tokenizer, LEVEL_NAMES, templates).T
    ours = teacher_from_clip(clip_model, tokenizer, build, [t.replace("{}", "{level}") for t in templates])
    assert ours.head.anchors.shape == (5, 64)
    torch.testing.assert_close(ours.head.anchors, direct, rtol=0, atol=1e-6)
    # averaging three templates gives different anchors from the single default prompt
    single = teacher_from_clip(clip_model, tokenizer, build)
    assert not torch.allclose(single.head.anchors, ours.head.anchors)
    assert single.head.prompts[0] == ["a photo of bad quality"]


def test_head_is_frozen_and_uses_clip_logit_scale(tiny):
    head = tiny.head
    assert list(head.parameters()) == []
    assert {name for name, _ in head.named_buffers()} == {"anchors", "logit_scale", "levels"}
    assert float(head.logit_scale) == pytest.approx(1 / 0.07, rel=1e-5)  # random-init CLIP's own
    torch.testing.assert_close(head.anchors.norm(dim=-1), torch.ones(5))


def test_scores_lie_in_1_to_5_and_match_the_formula(tiny):
    x = _images()
    with torch.no_grad():
        features = tiny.encode(x)
        score = tiny(x)
    assert features.shape == (6, 64)
    assert torch.all((score >= 1) & (score <= 5))
    v = features / features.norm(dim=-1, keepdim=True)
    probs = torch.softmax(tiny.head.logit_scale * v @ tiny.head.anchors.T, dim=-1)
    torch.testing.assert_close(score, probs @ torch.arange(1.0, 6.0))
    # extreme anchors: features equal to an anchor push the score to that level
    head = QualityHead(torch.eye(5), logit_scale=100.0)
    torch.testing.assert_close(head(torch.eye(5) * 3), torch.arange(1.0, 6.0), atol=1e-3, rtol=0)


def test_tiny_teacher_is_labelled_not_pretrained_and_reproducible(tiny):
    assert not tiny.pretrained
    assert "not pretrained" in tiny.label
    again = load_teacher("tiny")
    assert content_hash(again.state_dict()) == content_hash(tiny.state_dict())


def test_checkpoint_round_trip_without_text_tower(tiny, tmp_path):
    run = tmp_path / "run"
    directory = save_checkpoint(tiny, run / "checkpoints" / "best", {"epoch": 3})
    meta = json.loads((directory / "model.json").read_text())
    assert meta["format"] == "kdiqa-edge/1" and meta["kind"] == "teacher" and meta["head"] == "quality"
    assert meta["pretrained"] is False and "not pretrained" in meta["label"]
    assert meta["preprocess"]["size"] == 64 and meta["epoch"] == 3 and meta["levels"] == [1, 2, 3, 4, 5]
    from safetensors.torch import load_file

    keys = load_file(str(directory / "model.safetensors")).keys()
    assert not any(k.startswith(("transformer", "token_embedding", "text")) for k in keys)
    assert "head.anchors" in keys and any(k.startswith("visual.") for k in keys)

    for path in (directory, run):  # a checkpoint dir or the run dir
        loaded = load_checkpoint(path)
        assert loaded.meta["content_hash"] == meta["content_hash"]
        x = _images(seed=1)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), tiny(x))
        assert loaded.preprocess == tiny.preprocess and loaded.label == tiny.label


def test_corrupt_and_foreign_checkpoints_are_refused(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a checkpoint"):
        load_checkpoint(tmp_path / "empty")
    directory = save_checkpoint(tiny, tmp_path / "ck")
    meta = json.loads((directory / "model.json").read_text())
    (directory / "model.json").write_text(json.dumps({**meta, "content_hash": "0" * 64}))
    with pytest.raises(CheckpointError, match="content hash"):
        load_checkpoint(directory)
    (directory / "model.json").write_text(json.dumps({**meta, "kind": "martian"}))
    with pytest.raises(CheckpointError, match="unknown checkpoint kind"):
        load_checkpoint(directory)
    (directory / "model.safetensors").write_bytes(b"not safetensors")
    (directory / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(directory)


def test_other_kinds_register_their_own_builder(tiny, tmp_path):
    class Wrapped(torch.nn.Module):
        kind = "test-wrapped"

        def __init__(self, head):
            super().__init__()
            self.proj = torch.nn.Linear(64, 64)
            self.head = head
            self.preprocess = tiny.preprocess

        def checkpoint_meta(self):
            return {"arch": "linear", "embed_dim": 64, "pretrained": False}

    if "test-wrapped" not in CHECKPOINT_BUILDERS:
        @register_checkpoint_kind("test-wrapped")
        def _build(meta, state_dict):
            model = Wrapped(QualityHead(state_dict["head.anchors"], float(state_dict["head.logit_scale"])))
            model.load_state_dict(state_dict)
            return model

    original = Wrapped(tiny.head.copy())
    loaded = load_checkpoint(save_checkpoint(original, tmp_path / "w"))
    assert isinstance(loaded, Wrapped)
    torch.testing.assert_close(loaded.proj.weight, original.proj.weight)
    with pytest.raises(ValueError, match="duplicate"):
        register_checkpoint_kind("teacher")(lambda meta, sd: None)


def test_random_tag_is_the_architecture_with_random_weights_labelled_not_pretrained():
    """`NAME:random`: the real sizes and speeds (the demo's ViT-B/32) on a machine without the weights."""
    teacher = load_teacher("ViT-S-32-alt:random")  # the smallest ViT config open_clip has
    assert not teacher.pretrained and teacher.label == "ViT-S-32-alt (not pretrained)"
    assert teacher.preprocess.size == 224 and teacher.build.arch == "ViT-S-32-alt"
    assert teacher.head.logit_scale == pytest.approx(1 / 0.07)  # open_clip's init, not a pretrained 100
    with pytest.raises(ConfigError, match="random init"):
        create_clip("ViT-S-32-alt:random", weights="/some/w.safetensors")
    with pytest.raises(ConfigError, match="ViT-B-32:random for random init"):
        create_clip("ViT-B-32")


def test_teacher_names_and_offline_error(monkeypatch, tmp_path):
    import open_clip

    assert parse_teacher("ViT-B-32:openai") == ("ViT-B-32", "openai")
    assert parse_teacher("tiny") == ("tiny", None)
    with pytest.raises(ConfigError, match="unknown teacher model"):
        create_clip("ViT-Nope:openai")
    with pytest.raises(ConfigError, match="unknown pretrained tag"):
        create_clip("ViT-B-32:not-a-tag")

    def offline(*args, **kwargs):
        raise RuntimeError("Failed to download weights for tag 'openai': Name or service not known")

    monkeypatch.setattr(open_clip, "create_model", offline)
    with pytest.raises(WeightsUnavailable) as info:
        create_clip("ViT-B-32:openai")
    message = str(info.value)
    assert "--teacher-weights PATH" in message and "--teacher tiny" in message and "\n" not in message
    with pytest.raises(WeightsUnavailable, match="not found"):
        create_clip("ViT-B-32:openai", weights="/nonexistent/w.safetensors")

    def silent(*args, **kwargs):  # a loader error with no message still makes a one-line CheckpointError
        raise RuntimeError()

    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"not weights")
    monkeypatch.setattr(open_clip, "create_model", silent)
    with pytest.raises(CheckpointError, match=r"as ViT-B-32 weights: RuntimeError$"):
        create_clip("ViT-B-32", weights=weights)
