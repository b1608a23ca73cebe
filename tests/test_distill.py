"""Distillation end to end on a small synthetic set: every variant, the one-command pipeline, resume, DDP."""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("open_clip")

from ddp_helpers import become_rank, free_port

from kdiqa_edge import paths
from kdiqa_edge.data import DatasetSpec
from kdiqa_edge.models import load_checkpoint
from kdiqa_edge.models.head import QualityHead
from kdiqa_edge.models.student import RegressionHead, Student, create_student
from kdiqa_edge.train.distill import DistillConfig, ensure_teacher, run_distill
from kdiqa_edge.train.distributed import DistContext
from kdiqa_edge.train.schedules import parse_variant

REFS = 4  # 4 references x 6 distortions x 5 levels = 120 images; split by reference: 90 train, 30 test


def small_root():
    from kdiqa_edge.data.synthetic import generate

    root = paths.cache_dir() / f"synthetic-refs{REFS}"
    if not (root / "scores.csv").is_file():
        generate(root, refs=REFS)
    return root


def _cfg(**overrides) -> DistillConfig:
    values = {"student": "test_efficientnet", "pretrained": False, "teacher": "tiny", "epochs": 1,
              "batch_size": 32, "progress": False, **overrides}
    return DistillConfig(**values)


@pytest.fixture(scope="module")
def data():
    return DatasetSpec(name="synthetic", root=small_root())


@pytest.fixture(scope="module")
def teacher_dir(data):
    """The tiny teacher fine-tuned for one epoch on the small set, through distill's own teacher stage."""
    return ensure_teacher(_cfg(), data, DistContext(), log=lambda *_: None)


def _rows(run_dir):
    with open(run_dir / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


# `hard` runs through the command line below (test_cli_one_command_pipeline_and_offline_error).
@pytest.mark.parametrize("variant", ["full", "soft", "fixed:0.3", "regression"])
def test_each_variant_trains(variant, data, teacher_dir, tmp_path):
    cfg = _cfg(variant=variant, teacher_checkpoint=str(teacher_dir))
    summary = run_distill(cfg, data, tmp_path / "run", log=lambda *_: None)
    spec = parse_variant(variant)

    assert summary["variant"] == variant and summary["test"]["n"] == 30
    assert all(math.isfinite(summary["test"][k]) for k in ("plcc", "srcc", "krcc", "rmse"))
    student = load_checkpoint(tmp_path / "run")
    assert isinstance(student, Student) and "not pretrained" in student.label
    teacher = load_checkpoint(teacher_dir)
    if variant == "regression":
        assert isinstance(student.head, RegressionHead) and summary["teacher"] is None
        assert "teacher_facts" not in summary
    else:
        assert isinstance(student.head, QualityHead)
        assert torch.equal(student.head.anchors, teacher.head.anchors)  # the teacher's frozen head, unchanged
        assert summary["teacher_facts"]["params"] == sum(p.numel() for p in teacher.parameters())
    assert summary["student_facts"]["params"] == sum(p.numel() for p in student.parameters())
    assert summary["student_facts"]["flops"] > 0

    # It trained: the weights left their (seeded, reproducible) initialisation.
    torch.manual_seed(cfg.seed)
    init = create_student(cfg.student, None if variant == "regression" else teacher.head, student.preprocess,
                          pretrained=False)
    moved = sum(float((student.state_dict()[k] - v).abs().sum()) for k, v in init.state_dict().items()
                if v.is_floating_point())
    assert moved > 0

    # lambda and the terms, as logged: the epoch mean of lambda(t) over its optimizer steps.
    row = _rows(tmp_path / "run")[0]
    steps, total = int(row["step"]), summary["steps"]
    expected_lambda = np.mean([spec.lam(s, total) for s in range(steps)])
    assert float(row["lambda"]) == pytest.approx(expected_lambda, abs=1e-5)
    assert ("soft" in row) == spec.uses_teacher_features
    with open(tmp_path / "run" / "steps.csv") as handle:  # and lambda(t) at every optimizer step
        step_rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in step_rows] == list(range(total))
    assert [float(r["lambda"]) for r in step_rows] == pytest.approx([spec.lam(s, total) for s in range(total)],
                                                                    abs=1e-6)
    assert float(row["loss"]) == pytest.approx(float(row["hard"]) + float(row.get("soft", 0.0)), rel=1e-4)
    assert (tmp_path / "run" / "plots" / "distill.png").stat().st_size > 0
    assert (tmp_path / "run" / "plots" / "scatter_test.png").stat().st_size > 0
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / "split.json").is_file()
    if spec.uses_teacher_features:
        _check_cached_features(summary["teacher_features"], teacher, data)


def _check_cached_features(folder, teacher, data):
    """The features the run read are this teacher checkpoint's encodings of the cached images."""
    from kdiqa_edge.data import prepare
    from kdiqa_edge.train.features import FEATURES_FILE

    assert os.path.basename(folder).startswith(teacher.meta["content_hash"][:16])  # keyed by this checkpoint
    cache, _ = prepare(data, teacher.preprocess, progress=False)
    cached = np.memmap(os.path.join(folder, FEATURES_FILE), dtype=np.float16, mode="r",
                       shape=(len(cache), teacher.head.embed_dim))
    pixels = torch.from_numpy(np.array(cache.images[:4])).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(teacher.preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(teacher.preprocess.std).view(1, 3, 1, 1)
    with torch.no_grad():
        encoded = teacher.encode((pixels - mean) / std)
    stored = torch.from_numpy(np.array(cached[:4], np.float32))
    torch.testing.assert_close(stored, encoded, rtol=2e-3, atol=2e-3)


KILLED_DISTILL = """
import os, signal, sys
from kdiqa_edge.data import DatasetSpec
from kdiqa_edge.models import checkpoint
from kdiqa_edge.train.distill import DistillConfig, run_distill

write_json = checkpoint.write_json
def dying_write(path, meta):  # SIGKILL in the middle of epoch 2's checkpoint: weights written, model.json not
    if isinstance(meta, dict) and meta.get("epoch") == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return write_json(path, meta)
checkpoint.write_json = dying_write
cfg = DistillConfig(student="test_efficientnet", pretrained=False, teacher="tiny", epochs=2, batch_size=32,
                    progress=False, teacher_checkpoint=sys.argv[1])
run_distill(cfg, DatasetSpec(name="synthetic", root=sys.argv[2]), sys.argv[3], log=lambda *_: None)
"""


def test_interrupted_then_resumed_equals_uninterrupted(data, teacher_dir, tmp_path):
    """A run SIGKILLed in the middle of a checkpoint write resumes to the uninterrupted run's bytes."""
    import hashlib
    import signal
    import subprocess
    import sys

    from kdiqa_edge.io import is_temporary

    cfg = _cfg(epochs=2, teacher_checkpoint=str(teacher_dir))  # full variant: lambda moves every step
    full = run_distill(cfg, data, tmp_path / "full", log=lambda *_: None)
    killed = subprocess.run([sys.executable, "-c", KILLED_DISTILL, str(teacher_dir), str(data.root),
                             str(tmp_path / "resumed")], capture_output=True, text=True, timeout=600, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last").meta["epoch"] == 1
    left = [p for p in (tmp_path / "resumed").rglob("*") if is_temporary(p.name)]
    assert len(left) == 2  # the half-written checkpoint folder and its claim
    resumed = run_distill(cfg, data, tmp_path / "resumed", resume=True, log=lambda *_: None)

    assert not [p for p in (tmp_path / "resumed").rglob("*") if is_temporary(p.name)]
    assert resumed["steps"] == full["steps"]
    for name in ("last/model.safetensors", "last/model.json", "best/model.safetensors", "best/model.json"):
        digests = {hashlib.sha256((tmp_path / run / "checkpoints" / name).read_bytes()).hexdigest()
                   for run in ("full", "resumed")}
        assert len(digests) == 1, f"{name} differs between the uninterrupted and the resumed run"
    assert [(r["loss"], r["soft"], r["lambda"], r["srcc"]) for r in _rows(tmp_path / "full")] == \
           [(r["loss"], r["soft"], r["lambda"], r["srcc"]) for r in _rows(tmp_path / "resumed")]
    # the per-step log has each step once, as the uninterrupted run logged it
    assert (tmp_path / "full" / "steps.csv").read_text() == (tmp_path / "resumed" / "steps.csv").read_text()
    from kdiqa_edge.errors import ConfigError

    with pytest.raises(ConfigError, match="different config"):
        run_distill(_cfg(epochs=2, teacher_checkpoint=str(teacher_dir), variant="soft"), data,
                    tmp_path / "resumed", resume=True)




# -- DDP: two gloo processes on CPU, the whole pipeline (teacher fine-tune + distillation) under one group


def _ddp_cfg() -> DistillConfig:
    # test_vit: LayerNorm only (BatchNorm statistics of half batches would differ); no flips (seeded per
    # rank).
    # Batch 16 and a teacher config of its own, so the teacher is fine-tuned under DDP here.
    return _cfg(student="test_vit", batch_size=16, augment="none")



def _ddp_worker(rank: int, world_size: int, port: int, run_dir: str, cache_dir: str):
    become_rank(rank, world_size, port, cache_dir)
    run_distill(_ddp_cfg(), DatasetSpec(name="synthetic", root=small_root()), run_dir, log=lambda *_: None)


def test_ddp_gloo_two_processes_match_one(data, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path / "two"), str(paths.cache_dir())), nprocs=2)
    messages = []
    single = run_distill(_ddp_cfg(), data, tmp_path / "one", log=messages.append)
    assert any("reusing" in m for m in messages)  # the teacher the 2-process run fine-tuned
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["world_size"] == 2 and two["steps"] == single["steps"]
    assert two["teacher_content_hash"] == single["teacher_content_hash"]

    a = load_checkpoint(tmp_path / "one" / "checkpoints" / "last")
    b = load_checkpoint(tmp_path / "two" / "checkpoints" / "last")
    torch.manual_seed(0)
    init = create_student("test_vit", load_checkpoint(single["teacher_checkpoint"]).head, a.preprocess,
                          pretrained=False)
    keys = [k for k, v in a.state_dict().items() if v.is_floating_point() and not k.startswith("head.")]
    gap = sum(float((a.state_dict()[k] - b.state_dict()[k]).square().sum()) for k in keys)
    moved = sum(float((a.state_dict()[k] - init.state_dict()[k]).square().sum()) for k in keys)
    assert moved > 0 and math.sqrt(gap / moved) < 0.01
    x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=1e-4)
    assert two["test"]["srcc"] == pytest.approx(single["test"]["srcc"], abs=1e-3)


# -- the command line


def test_cli_one_command_pipeline_and_offline_error(data, teacher_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import kdiqa_edge.models.student as student_module
    from kdiqa_edge.cli import app

    runner = CliRunner()
    common = ["distill", "--dataset", "synthetic", "--root", str(data.root), "--teacher", "tiny",
              "--epochs", "1", "--batch-size", "32", "--quiet"]
    result = runner.invoke(app, common + ["--student", "test_resnet", "--no-pretrained", "--variant", "hard",
                                          "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert "reusing the fine-tuned tiny" in result.output  # the teacher the fixture fine-tuned, same config
    assert "PLCC" in result.output and "SRCC" in result.output and "teacher" in result.output
    summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert summary["variant"] == "hard" and summary["student"] == "test_resnet (not pretrained)"
    assert summary["teacher_checkpoint"] == str(teacher_dir)
    assert math.isfinite(summary["test"]["srcc"]) and summary["steps"] == 3
    rows = _rows(tmp_path / "cli")
    assert "soft" not in rows[0] and float(rows[0]["lambda"]) == 0.0  # hard: MSE only
    assert float(rows[0]["loss"]) == pytest.approx(float(rows[0]["hard"]), rel=1e-4)
    assert isinstance(load_checkpoint(tmp_path / "cli").head, QualityHead)

    monkeypatch.setattr(student_module, "_cached_weights", lambda cfg: None)
    monkeypatch.setattr(student_module, "_hub_reachable", lambda timeout=3.0: False)
    result = runner.invoke(app, common + ["--student", "resnet18", "--out", str(tmp_path / "offline")])
    assert result.exit_code != 0
    assert "--student-weights PATH" in str(result.exception) and "--no-pretrained" in str(result.exception)
    assert not (tmp_path / "offline").exists()  # failed before any work
