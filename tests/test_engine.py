"""The shared training engine: schedule, sharding, extras, resume equality, DDP (gloo) equality."""

from __future__ import annotations

import copy
import csv
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ddp_helpers import become_rank, free_port

from kdiqa_edge import paths
from kdiqa_edge.data import DatasetSpec, prepare
from kdiqa_edge.errors import CheckpointError, ConfigError
from kdiqa_edge.models import load_checkpoint
from kdiqa_edge.models.checkpoint import content_hash
from kdiqa_edge.models.teacher import load_teacher
from kdiqa_edge.train.loader import epoch_order
from kdiqa_edge.train.loop import TrainConfig, Trainer
from kdiqa_edge.train.step import cosine_factor

SMALL_REFS = 4  # 4 references x 6 distortions x 5 levels = 120 images


def small_synthetic(size: int = 64, split_by: str = "auto"):
    """A 120-image synthetic set at `size` px, generated once per test session (KDIQA_CACHE is per session)."""
    from kdiqa_edge.data.synthetic import generate
    from kdiqa_edge.preprocess import PreprocessSpec

    root = paths.cache_dir() / f"synthetic-refs{SMALL_REFS}"
    if not (root / "scores.csv").is_file():
        generate(root, refs=SMALL_REFS)
    return prepare(DatasetSpec(name="synthetic", root=root), PreprocessSpec(size=size), seed=0, progress=False,
                   split_by=split_by)


@pytest.fixture(scope="module")
def data():
    return small_synthetic()


_TINY = {}


def tiny_teacher():
    """A fresh copy of the tiny teacher (built once: open_clip model creation is the slow part)."""
    if "model" not in _TINY:
        _TINY["model"] = load_teacher("tiny")
    return copy.deepcopy(_TINY["model"])


def mse_loss(model, batch, step, total_steps):
    return {"mse": F.mse_loss(model(batch["image"]), batch["mos"])}


def _cfg(**overrides):
    return TrainConfig(**{"epochs": 2, "batch_size": 16, "lr": 1e-4, "progress": False, **overrides})


def test_cosine_schedule_ends_at_a_tenth():
    assert cosine_factor(0, 100, 0.1) == 1.0
    assert cosine_factor(50, 100, 0.1) == pytest.approx(0.55)
    assert cosine_factor(100, 100, 0.1) == pytest.approx(0.1)
    values = [cosine_factor(s, 100, 0.1) for s in range(101)]
    assert all(a >= b for a, b in itertools.pairwise(values))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_epoch_order_shards_cover_the_permutation(world_size):
    indices = list(range(10, 27))  # 17 images: padding needed for 2 and 3 processes
    shards = [epoch_order(indices, seed=5, epoch=1, rank=r, world_size=world_size) for r in range(world_size)]
    assert len({len(s) for s in shards}) == 1
    assert set(np.concatenate(shards)) == set(indices)
    assert len(np.concatenate(shards)) == math.ceil(17 / world_size) * world_size
    # the order depends on (seed, epoch) only
    assert not np.array_equal(epoch_order(indices, 5, 1), epoch_order(indices, 5, 2))
    assert np.array_equal(epoch_order(indices, 5, 1), epoch_order(indices, 5, 1))


def test_run_dir_extras_scalars_and_lr(data, tmp_path):
    cache, split = data
    features = np.random.default_rng(0).standard_normal((len(cache), 7)).astype(np.float16)
    seen = []

    def loss_with_extras(model, batch, step, total_steps):
        expected = torch.from_numpy(features[batch["index"].numpy()]).float()
        assert torch.equal(batch["teacher_features"], expected)  # rows follow the image index
        assert batch["image"].dtype == torch.float32 and batch["image"].shape[1:] == (3, 64, 64)
        seen.append(batch["index"])
        mse = F.mse_loss(model(batch["image"]), batch["mos"])
        return {"hard": 0.25 * mse, "other": 0.75 * mse}

    trainer = Trainer(tiny_teacher(), loss_with_extras, cache, split, _cfg(), tmp_path / "run",
                      extras={"teacher_features": features},
                      scalars_fn=lambda step, total: {"lambda": 1 - step / total}, extra_meta={"label": "tiny"})
    summary = trainer.fit()
    steps_per_epoch = math.ceil(len(split.train) / 16)
    assert summary["steps"] == 2 * steps_per_epoch and summary["test"]["n"] == len(split.test)
    # every training image seen once per epoch, never a test image
    first_epoch = torch.cat(seen[:steps_per_epoch]).numpy()
    assert sorted(first_epoch) == sorted(split.train)

    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").read_text().splitlines()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row in rows:
        assert float(row["loss"]) == pytest.approx(float(row["hard"]) + float(row["other"]), rel=1e-4)
        assert 0 < float(row["lambda"]) <= 1 and -1 <= float(row["srcc"]) <= 1
    assert float(rows[1]["lambda"]) < float(rows[0]["lambda"])
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)  # cosine to 0.1x by the last step
    for name in ("split.json", "summary.json", "plots/curves.png", "plots/scatter_test.png",
                 "checkpoints/best/model.json", "checkpoints/last/train_state.pt"):
        assert (tmp_path / "run" / name).is_file(), name
    assert load_checkpoint(tmp_path / "run").meta["epoch"] == summary["best_epoch"]

    with pytest.raises(ConfigError, match="already holds a run"):
        Trainer(tiny_teacher(), mse_loss, cache, split, _cfg(), tmp_path / "run").setup()
    with pytest.raises(ConfigError, match="changed: lr"):
        Trainer(tiny_teacher(), mse_loss, cache, split, _cfg(lr=2e-4), tmp_path / "run", resume=True).setup()
    with pytest.raises(CheckpointError, match="nothing to resume"):
        Trainer(tiny_teacher(), mse_loss, cache, split, _cfg(), tmp_path / "none", resume=True).setup()


def test_interrupted_then_resumed_equals_uninterrupted(data, tmp_path):
    cache, split = data
    cfg = _cfg(epochs=2, grad_accum=2, lr=3e-4)  # hflip augmentation on, accumulation on
    full = Trainer(tiny_teacher(), mse_loss, cache, split, cfg, tmp_path / "full").fit()

    steps_per_epoch = math.ceil(len(split.train) / 16)
    crashing = Trainer(tiny_teacher(), mse_loss, cache, split, cfg, tmp_path / "resumed")
    crashing.interrupt_after_steps = steps_per_epoch + 2  # dies in the middle of epoch 2
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last").meta["epoch"] == 1

    resumed = Trainer(tiny_teacher(), mse_loss, cache, split, cfg, tmp_path / "resumed", resume=True).fit()
    assert resumed["steps"] == full["steps"]
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last", verify=False)
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last", verify=False)
    assert content_hash(a.state_dict()) == content_hash(b.state_dict())  # bit-identical weights
    rows_a = list(csv.DictReader((tmp_path / "full" / "metrics.csv").read_text().splitlines()))
    rows_b = list(csv.DictReader((tmp_path / "resumed" / "metrics.csv").read_text().splitlines()))
    assert [(r["loss"], r["srcc"]) for r in rows_a] == [(r["loss"], r["srcc"]) for r in rows_b]



def _ddp_worker(rank: int, world_size: int, port: int, run_dir: str, cache_dir: str):
    become_rank(rank, world_size, port, cache_dir)
    cache, split = small_synthetic()
    Trainer(tiny_teacher(), mse_loss, cache, split, _cfg(epochs=1, augment="none"), run_dir).fit()


def test_ddp_gloo_two_processes_match_one(data, tmp_path):
    """2 gloo processes x 8 images == 1 process x 16 images: same images per step, gradients averaged."""
    import torch.multiprocessing as mp

    cache, split = data
    assert len(split.train) % 2 == 0  # no padding: per step, the two shards hold exactly the single run's images
    single = Trainer(tiny_teacher(), mse_loss, cache, split, _cfg(epochs=1, augment="none"), tmp_path / "one").fit()
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path / "two"), str(paths.cache_dir())), nprocs=2)
    a = load_checkpoint(tmp_path / "one" / "checkpoints" / "last")
    b = load_checkpoint(tmp_path / "two" / "checkpoints" / "last")
    init = tiny_teacher()
    # Not bit-equal: summation order differs, and AdamW turns the float noise of gradients that are zero in
    # exact arithmetic (attention key biases) into lr-sized steps. So: the two runs' weights differ by a
    # tiny fraction of what training moved, and their scores agree.
    keys = [k for k in a.state_dict() if k.startswith("visual.")]
    gap = sum(float((a.state_dict()[k] - b.state_dict()[k]).square().sum()) for k in keys)
    moved = sum(float((a.state_dict()[k] - init.state_dict()[k]).square().sum()) for k in keys)
    assert moved > 0 and math.sqrt(gap / moved) < 0.01
    x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert float((a(x) - init(x)).abs().max()) > 1e-3
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=1e-4)
    two = __import__("json").loads((tmp_path / "two" / "summary.json").read_text())
    assert two["world_size"] == 2 and two["steps"] == single["steps"]
    assert two["test"]["srcc"] == pytest.approx(single["test"]["srcc"], abs=1e-3)
