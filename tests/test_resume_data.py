"""`distill --resume` goes on only with the data the run trained on, and says so in one line when it cannot.

Each run: 2 references x 30 images at the tiny teacher's 64 px, test_resnet, 2 epochs of batch 8, interrupted
in the student's 2nd epoch (`last` holds epoch 1, as after a kill -9 there), then edited and resumed.
"""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from cli_helpers import run_cli

TRAIN = ["--student", "test_resnet", "--no-pretrained", "--teacher", "tiny", "--epochs", "2", "--batch-size", "8",
         "--quiet"]
OTHER_DATA = "was trained on other data"
ADVICE = "resuming would train on data no uninterrupted run saw: restore the data, or start a new run with --out NEW"


def _one_line_error(code: int, err: str) -> str:
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err.strip()


def _interrupted_run(tmp_path: Path, monkeypatch, capsys, *args) -> Path:
    """A distill run stopped in the student's 2nd epoch, on its own synthetic set in tmp_path/set."""
    from kdiqa_edge.data.synthetic import generate
    from kdiqa_edge.train.loop import Trainer

    generate(tmp_path / "set", refs=2, size=(86, 64))
    optimizer_step = Trainer._optimizer_step

    def interrupted(self):
        optimizer_step(self)
        if self.extra_meta.get("stage") == "distill" and self.step == self.steps_per_epoch + 1:
            raise KeyboardInterrupt

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_optimizer_step", interrupted)
        code, _, err = run_cli(["distill", "--dataset", "synthetic", "--root", tmp_path / "set", *TRAIN, *args,
                                "--out", run], capsys)
    assert code == 130, err
    assert (run / "checkpoints" / "last" / "train_state.pt").is_file()
    return run


def _last_epoch(run: Path) -> int:
    from kdiqa_edge.models.checkpoint import read_meta

    return read_meta(run / "checkpoints" / "last")["epoch"]


def test_changed_pixels_refused_and_the_restored_file_resumes(tmp_path, monkeypatch, capsys):
    from PIL import Image, ImageFilter

    run = _interrupted_run(tmp_path, monkeypatch, capsys, "--variant", "regression")
    image = tmp_path / "set" / "images" / "r00_noise_1.png"
    shutil.copy2(image, tmp_path / "original.png")
    Image.open(image).filter(ImageFilter.GaussianBlur(3)).save(image)

    err = _one_line_error(*run_cli(["distill", "--out", run, "--resume"], capsys)[::2])
    assert f"{run} {OTHER_DATA}: its images changed since (image cache key" in err and err.endswith(ADVICE)
    assert _last_epoch(run) == 1  # refused before any training

    shutil.copy2(tmp_path / "original.png", image)  # restored: the same bytes and date
    code, _, err = run_cli(["distill", "--out", run, "--resume"], capsys)
    assert code == 0, err
    assert _last_epoch(run) == 2


def test_changed_rating_refused_and_gets_its_own_teacher(tmp_path, monkeypatch, capsys):
    from kdiqa_edge.data import DatasetSpec
    from kdiqa_edge.train.distill import DistillConfig, teacher_finetune_config, teacher_run_dir

    run = _interrupted_run(tmp_path, monkeypatch, capsys, "--variant", "regression")
    data = DatasetSpec(name="synthetic", root=tmp_path / "set")
    finetune = teacher_finetune_config(DistillConfig(teacher="tiny"), data)
    teacher_before = teacher_run_dir(finetune, data)
    scores = tmp_path / "set" / "scores.csv"
    with open(scores, newline="") as handle:
        rows = list(csv.DictReader(handle))
    rows[3]["mos"] = f"{float(rows[3]['mos']) + 0.5:.4f}"  # one rating edited, every image untouched
    with open(scores, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    err = _one_line_error(*run_cli(["distill", "--out", run, "--resume"], capsys)[::2])
    assert f"{run} {OTHER_DATA}: its ratings changed since (ratings key" in err and err.endswith(ADVICE)
    assert _last_epoch(run) == 1
    # a distill of the edited set fine-tunes its own teacher: the cached one learned the old rating
    assert teacher_run_dir(finetune, data) != teacher_before


def test_changed_unlabeled_pool_refused(tmp_path, monkeypatch, capsys):
    from kdiqa_edge.data.synthetic import generate
    from kdiqa_edge.models import save_checkpoint
    from kdiqa_edge.models.teacher import load_teacher

    torch.manual_seed(0)
    teacher = save_checkpoint(load_teacher("tiny"), tmp_path / "teacher")
    generate(tmp_path / "other", refs=2, seed=7, size=(86, 64))  # other content: unrated here
    pool = tmp_path / "pool"
    pool.mkdir()
    for path in sorted((tmp_path / "other" / "images").glob("r00_*"))[:8]:
        shutil.copy2(path, pool / path.name)
    run = _interrupted_run(tmp_path, monkeypatch, capsys, "--variant", "soft", "--teacher-checkpoint", teacher,
                           "--unlabeled", pool, "--workers", "0")
    os.remove(min(pool.iterdir()))  # one image removed, another added
    shutil.copy2(tmp_path / "other" / "images" / "r01_blur_1.png", pool / "r01_blur_1.png")

    err = _one_line_error(*run_cli(["distill", "--out", run, "--resume"], capsys)[::2])
    assert f"{run} {OTHER_DATA}: its unlabeled images changed since (pool key" in err and err.endswith(ADVICE)
    assert _last_epoch(run) == 1


def test_corrupt_train_state_is_one_line_and_its_advice_works(tmp_path, monkeypatch, capsys):
    run = _interrupted_run(tmp_path, monkeypatch, capsys, "--variant", "regression")
    last = run / "checkpoints" / "last"
    with open(last / "train_state.pt", "r+b") as handle:
        handle.truncate(1000)

    err = _one_line_error(*run_cli(["distill", "--out", run, "--resume"], capsys)[::2])
    assert err.startswith(f"error: corrupt {last / 'train_state.pt'}: ")
    assert f"remove {last} to train again from the first epoch" in err

    shutil.rmtree(last)  # as it says
    code, _, err = run_cli(["distill", "--out", run, "--resume"], capsys)
    assert code == 0, err
    assert _last_epoch(run) == 2 and (run / "summary.json").is_file()


def test_resume_of_no_run_says_so_before_the_student(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default student (pretrained resnet18) has no weights in this cache
    err = _one_line_error(*run_cli(["distill", "--out", "nothere", "--resume"], capsys)[::2])
    assert err == "error: nothing to resume in nothere (no config.yaml)"
