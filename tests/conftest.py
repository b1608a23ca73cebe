"""Shared test set-up: every test session gets its own cache dir, so nothing touches ~/.cache."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("kdiqa-cache")
    old = os.environ.get("KDIQA_CACHE")
    os.environ["KDIQA_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("KDIQA_CACHE", None)
    else:
        os.environ["KDIQA_CACHE"] = old


# `make test` runs the suite in two pytest-xdist workers (a file's tests stay in one worker). Each keeps torch at
# two threads: in-process runs must compute what the CLI's subprocesses compute (resume tests compare bytes).
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")


@pytest.fixture(autouse=True)
def _few_threads(monkeypatch):
    # Two cores here: keep torch from oversubscribing when several processes run.
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(2)


def shared_folder(tmp_path_factory, name: str) -> Path:
    """A folder every xdist worker of this run sees (the run's base temp dir), or this session's own without
    xdist: what a session fixture builds there once, under `built_once`, the other worker reuses."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if XDIST_WORKER else base) / name


SMALL_REFS = 4  # 4 references x 6 distortions x 5 levels = 120 images


@pytest.fixture(scope="session")
def small_synthetic(_isolated_cache):
    """A small synthetic set shared by the end-to-end tests (the same folder test_distill uses)."""
    from kdiqa_edge.data import DatasetSpec
    from kdiqa_edge.data.synthetic import generate

    root = _isolated_cache / f"synthetic-refs{SMALL_REFS}"
    if not (root / "scores.csv").is_file():
        generate(root, refs=SMALL_REFS)
    return DatasetSpec(name="synthetic", root=root)


@pytest.fixture(scope="session")
def learned_run(tmp_path_factory) -> Path:
    """A test_resnet that learned the synthetic task: the set generated at the tiny teacher's own 64 px (at
    320x240 the downscale hides most noise and JPEG), 24 references (150 test images), 20 epochs of the
    `hard` variant, flipped (no soft target to disagree with a flip). Measured over split/init seeds 0-4: test
    SRCC 0.58-0.83. Shared by the ONNX and
    ExecuTorch INT8 drift tests."""
    from kdiqa_edge.cli import main
    from kdiqa_edge.data._lock import file_lock

    root = shared_folder(tmp_path_factory, "learned")  # trained once per run, by whichever worker asks first
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / ".lock"):
        if (root / "run" / "summary.json").is_file():
            return root / "run"
        shutil.rmtree(root / "set", ignore_errors=True)
        shutil.rmtree(root / "run", ignore_errors=True)
        with pytest.raises(SystemExit) as exit_info:
            main(["data", "synth", str(root / "set"), "--refs", "24", "--size", "86x64"])
        assert exit_info.value.code == 0
        with pytest.raises(SystemExit) as exit_info:
            main(["distill", "--dataset", "synthetic", "--root", str(root / "set"), "--teacher", "tiny",
                  "--teacher-epochs", "1", "--student", "test_resnet", "--no-pretrained", "--variant", "hard",
                  "--augment", "hflip", "--epochs", "20", "--batch-size", "32", "--lr", "3e-3", "--quiet",
                  "--out", str(root / "run")])
        assert exit_info.value.code == 0
    return root / "run"


@pytest.fixture(scope="module")
def tiny_student():
    """A random-init test_resnet under the tiny teacher's head (64 px), seed 0, in eval mode."""
    import torch

    from kdiqa_edge.models.student import create_student
    from kdiqa_edge.models.teacher import load_teacher

    teacher = load_teacher("tiny")
    torch.manual_seed(0)
    return create_student("test_resnet", teacher.head, teacher.preprocess, pretrained=False).eval()


@pytest.fixture(scope="module")
def scored_examples(tiny_student):
    """make(count): Examples of `count` random 64 px images whose MOS IS the FP32 model's score (FP32 SRCC 1,
    so any candidate's drift is in plain view)."""
    import numpy as np

    from kdiqa_edge.export import Examples
    from kdiqa_edge.export.evaluate import torch_reference

    def make(count: int):
        images = np.random.default_rng(0).integers(0, 256, (count, 64, 64, 3), dtype=np.uint8)
        return Examples(parity=images[:8], calib=images[:16], test=images,
                        test_mos=torch_reference(tiny_student, images))

    return make


@pytest.fixture(scope="session")
def student_checkpoints(tmp_path_factory):
    """make(tag, {name: timm arch}) -> {name: checkpoint dir}: random-init students under the tiny teacher's head,
    seed 0, saved as checkpoints (what export reads)."""
    def make(tag: str, archs: dict[str, str]) -> dict[str, Path]:
        import torch

        from kdiqa_edge.models import save_checkpoint
        from kdiqa_edge.models.student import create_student
        from kdiqa_edge.models.teacher import load_teacher

        root = tmp_path_factory.mktemp(tag)
        teacher = load_teacher("tiny")
        torch.manual_seed(0)
        built = {name: create_student(arch, teacher.head, teacher.preprocess, pretrained=False)
                 for name, arch in archs.items()}
        return {name: save_checkpoint(model, root / name) for name, model in built.items()}

    return make
