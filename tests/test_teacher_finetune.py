"""Teacher fine-tuning, zero-shot evaluation, the teacher feature cache and the `teacher` CLI (tiny teacher)."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch

from kdiqa_edge.models import load_checkpoint
from kdiqa_edge.models.teacher import create_clip, load_teacher, teacher_from_clip
from kdiqa_edge.train.features import feature_cache_path, teacher_features
from kdiqa_edge.train.finetune import finetune_loss, freeze_all_but_image_encoder, zero_shot
from kdiqa_edge.train.loop import TrainConfig, Trainer


@pytest.fixture(scope="module")
def data():
    from test_engine import small_synthetic

    # split by image: a from-scratch 64 px model learns the distortions of 4 contents, not a 5th content
    return small_synthetic(split_by="image")


@pytest.fixture(scope="module")
def tiny():
    return load_teacher("tiny")


@pytest.fixture(scope="module")
def finetuned(data, tiny, tmp_path_factory):
    """A short fine-tune of the tiny teacher (lr raised and batches small for a random-init model)."""
    cache, split = data
    model = copy.deepcopy(tiny)
    trainable = freeze_all_but_image_encoder(model)
    run = tmp_path_factory.mktemp("finetune") / "run"
    trainer = Trainer(model, finetune_loss, cache, split,
                      TrainConfig(epochs=4, batch_size=8, lr=3e-4, progress=False), run)
    trainer.setup()
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    summary = trainer.train()
    trainer.cleanup()
    return model, trainable, optimized, summary, run


def test_only_the_image_encoder_trains_and_frozen_parts_stay_bit_identical(tiny, finetuned):
    model, trainable, optimized, _, run = finetuned
    assert trainable and all(name.startswith("visual.") for name in trainable)
    assert optimized == {id(p) for p in model.visual.parameters()}
    for name in ("anchors", "logit_scale", "levels"):
        assert torch.equal(getattr(model.head, name), getattr(tiny.head, name)), name
    # the anchors still equal a fresh computation with the (never trained) text tower
    clip_model, tokenizer, build = create_clip("tiny")
    assert torch.equal(teacher_from_clip(clip_model, tokenizer, build).head.anchors, tiny.head.anchors)
    best = load_checkpoint(run)
    assert torch.equal(best.head.anchors, tiny.head.anchors) and float(best.head.logit_scale) == float(
        tiny.head.logit_scale)
    moved = [n for n, p in best.visual.named_parameters() if not torch.equal(p, tiny.visual.get_parameter(n))]
    assert len(moved) > 10  # the image encoder did train


def test_short_finetune_raises_srcc_over_zero_shot(data, tiny, finetuned):
    """The protocol's number (best epoch, selected on the test split as there is no val split) beats the
    zero-shot teacher clearly; on the training images too, by less: a random-init 64 px ViT learns the
    distortions slowly, and this is seconds of CPU."""
    cache, split = data
    model, _, _, summary, _ = finetuned
    before = zero_shot(tiny, cache, split.test)
    after = summary["test"]
    assert after["n"] == len(split.test)
    assert after["srcc"] > before.srcc + 0.15, (before.srcc, after["srcc"])
    assert zero_shot(model, cache, split.train).srcc > zero_shot(tiny, cache, split.train).srcc + 0.05


def test_teacher_feature_cache(data, finetuned):
    cache, _ = data
    run = finetuned[4]
    features = teacher_features(run, cache, progress=False)
    assert features.shape == (len(cache), 64) and features.dtype == np.float16
    model = load_checkpoint(run)
    from kdiqa_edge.preprocess import normalize

    with torch.no_grad():
        direct = model.encode(torch.from_numpy(normalize(np.asarray(cache.images[:8]), model.preprocess)))
    np.testing.assert_allclose(features[:8].astype(np.float32), direct.numpy(), rtol=2e-3, atol=2e-3)
    folder = feature_cache_path(run, cache)
    stamp = os.stat(folder / "features.f16").st_mtime_ns
    again = teacher_features(load_checkpoint(run), cache, progress=False)  # a loaded model works too
    assert os.stat(folder / "features.f16").st_mtime_ns == stamp  # read back, not recomputed
    assert np.array_equal(again, features)
    # keyed by the teacher checkpoint and the image cache: either one changed, another file
    from types import SimpleNamespace

    from kdiqa_edge.models import save_checkpoint

    other_teacher = save_checkpoint(load_teacher("tiny"), run.parent / "untrained")
    assert feature_cache_path(other_teacher, cache) != folder
    assert feature_cache_path(run, SimpleNamespace(key="0" * 64)) != folder


@pytest.mark.slow
def test_cli_finetune_tiny_with_no_other_flags_then_eval(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from kdiqa_edge.cli import app

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["teacher", "finetune", "--teacher", "tiny", "--epochs", "2"])
    assert result.exit_code == 0, result.output
    assert "not pretrained" in result.output
    (run,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 2 and "not pretrained" in summary["label"]
    assert summary["teacher_features"]["shape"][1] == 64 and summary["zero_shot_test"]["n"] == summary["test"]["n"]
    for name in ("config.yaml", "split.json", "metrics.csv", "plots/curves.png", "plots/scatter_test.png",
                 "checkpoints/best/model.safetensors", "checkpoints/last/train_state.pt"):
        assert (run / name).is_file(), name
    import yaml

    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["teacher"] == "tiny" and saved["epochs"] == 2 and saved["lr"] == 5e-6 and saved["batch_size"] == 64
    assert saved["dataset"]["name"] == "synthetic"

    result = runner.invoke(app, ["teacher", "eval", "--checkpoint", str(run), "--json"])
    assert result.exit_code == 0, result.output
    evaluated = json.loads(result.output)
    assert evaluated["pretrained"] is False and evaluated["split"] == "test" and "run's split" in evaluated["mode"]
    assert evaluated["metrics"]["srcc"] == pytest.approx(summary["test"]["srcc"], abs=1e-6)

    result = runner.invoke(app, ["teacher", "eval", "--teacher", "tiny"])
    assert result.exit_code == 0, result.output
    assert "NOT PRETRAINED" in result.output and "SRCC" in result.output and "zero-shot" in result.output


def test_config_file_then_cli_overrides(tmp_path):
    from kdiqa_edge.errors import ConfigError
    from kdiqa_edge.train.finetune import FinetuneConfig, dataset_spec, load_config

    assert (FinetuneConfig().lr, FinetuneConfig().epochs, FinetuneConfig().batch_size) == (5e-6, 100, 64)
    path = tmp_path / "teacher.yaml"
    path.write_text("epochs: 3\nlr: 1.0e-4\ntemplates: ['a {level} photo', 'a photo of {level} quality']\n"
                    "dataset: {name: csv, root: /data/x, mos_range: [0, 100]}\n")
    cfg = load_config(path, lr=2e-4, epochs=None)  # None never overrides
    assert (cfg.epochs, cfg.lr, len(cfg.templates)) == (3, 2e-4, 2)
    spec = dataset_spec(cfg, None)
    assert spec.name == "csv" and spec.mos_range == (0, 100) and str(spec.root) == "/data/x"
    path.write_text("epochz: 3\n")
    with pytest.raises(ConfigError, match="epochz"):
        load_config(path)
