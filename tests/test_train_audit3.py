"""Training side, third audit: options refused before any work, --no-amp reaching the teacher features,
resumes refused where the teacher or the fine-tune's config changed, reproduce's students checked before the
first teacher fine-tune."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("open_clip")

from cli_helpers import run_cli

from kdiqa_edge import paths


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> Path:
    """2 references x 30 images at the tiny teacher's size: 30 train, 30 test (2 steps an epoch at batch
    16)."""
    from kdiqa_edge.data.synthetic import generate

    root = tmp_path_factory.mktemp("audit3") / "set"
    generate(root, refs=2, size=(86, 64))
    return root


def _data(root: Path) -> list:
    return ["--dataset", "synthetic", "--root", root]


def _distill(root: Path, *options) -> list:
    return ["distill", *_data(root), "--student", "test_resnet", "--no-pretrained", "--epochs", "1",
            "--batch-size", "16", "--quiet", *options]


def _teacher_runs() -> set[str]:
    folder = paths.cache_dir() / "teacher-runs"
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def _one_line(err: str) -> bool:
    return err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_no_amp_reaches_the_teacher_features(tiny_set, tmp_path, capsys):
    """--no-amp: the teacher's features are computed without autocast, into a cache of their own (they were
    computed under autocast whatever the flag, and shared with the mixed-precision runs')."""
    from kdiqa_edge.preprocess import PreprocessSpec
    from kdiqa_edge.train.features import NO_AMP_SUFFIX, plan_shards

    code, _, err = run_cli(_distill(tiny_set, "--teacher", "tiny", "--no-amp", "--out", tmp_path / "run"),
                           capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    features = Path(summary["teacher_features"])
    assert features.name.endswith(NO_AMP_SUFFIX)
    assert json.loads((features / "meta.json").read_text())["amp"] is False
    teacher_run = Path(summary["teacher_checkpoint"]).parent.parent  # the fine-tune wrote the same cache
    assert json.loads((teacher_run / "summary.json").read_text())["teacher_features"]["path"] == str(features)
    hashes, teacher = ["a" * 64, "b" * 64], "c" * 64  # unlabeled shards: float32 ones are named apart too
    assert plan_shards(hashes, teacher, PreprocessSpec(), amp=False)[0].key != \
        plan_shards(hashes, teacher, PreprocessSpec())[0].key


@pytest.mark.parametrize("options, says", [
    (["--lr", "nan"], "lr must be a positive number"),
    (["--weight-decay", "-1"], "weight_decay must be a number of at least 0"),
    (["--weight-decay", "nan"], "weight_decay must be a number of at least 0"),
    (["--val-fraction", "1.5"], "bad split fractions"),
    (["--device", "bogus"], "--device must be auto, cpu, cuda or cuda:N"),  # torch's RuntimeError traceback
    (["--teacher", "nosuch"], "unknown teacher model 'nosuch'"),
    (["--teacher", "ViT-B-32:nosuchtag"], "unknown pretrained tag 'nosuchtag'"),
    (["--teacher", "ViT-B-32", "--teacher-weights", "missing.pt"], "--teacher-weights file not found"),
])
def test_distill_refuses_before_any_work(tiny_set, tmp_path, capsys, options, says):
    """Each was a traceback (--lr nan, --device bogus), a silent run (--weight-decay -1), an error only after
    the teacher's fine-tune (--weight-decay nan: a NaN loss) or after the run dir and the teacher run were
    begun."""
    before = _teacher_runs()
    options = options if "--teacher" in options else ["--teacher", "tiny", *options]
    code, out, err = run_cli(_distill(tiny_set, *options, "--out", tmp_path / "run"), capsys)
    assert code == 2 and says in err and _one_line(err), err
    assert not (tmp_path / "run").exists() and _teacher_runs() == before and not out


def test_teacher_checkpoint_of_a_student_refused_before_any_work(tiny_set, tmp_path, capsys,
                                                                  student_checkpoints):
    student = student_checkpoints("audit3-student", {"student": "test_resnet"})["student"]
    code, _, err = run_cli(_distill(tiny_set, "--teacher-checkpoint", student, "--out", tmp_path / "run"),
                           capsys)
    assert code == 2 and "holds a student, not a teacher" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", [["distill", "--student", "test_resnet", "--no-pretrained"],
                                     ["teacher", "finetune"]])
@pytest.mark.parametrize("under", [False, True])
def test_out_that_is_a_file_is_one_line(tiny_set, tmp_path, capsys, command, under):
    """An --out that is a file (or lies under one): one line naming --out, before any work (teacher finetune
    loaded the teacher and built the image cache first; the line was the generic OSError one, exit 1)."""
    (tmp_path / "afile").write_text("mine")
    out = tmp_path / "afile" / "run" if under else tmp_path / "afile"
    code, _, err = run_cli([*command, *_data(tiny_set), "--teacher", "tiny", "--epochs", "1", "--quiet",
                            "--out", out], capsys)
    assert code == 2 and "run dir" in err and _one_line(err), err
    assert (tmp_path / "afile").read_text() == "mine"


@pytest.mark.parametrize("options, says", [
    (["--teacher", "tiny", "--lr", "nan"], "lr must be a positive number"),  # a torch ValueError's traceback
    (["--teacher", "tiny:openai"], "takes no ':openai' tag"),  # refused still before the run dir is made
])
def test_teacher_finetune_refuses_bad_options_before_any_work(tiny_set, tmp_path, capsys, options, says):
    code, _, err = run_cli(["teacher", "finetune", *_data(tiny_set), *options, "--epochs", "1", "--quiet",
                            "--out", tmp_path / "run"], capsys)
    assert code == 2 and says in err and _one_line(err), err
    assert not (tmp_path / "run").exists()


def test_resume_refuses_a_replaced_teacher(tiny_set, tmp_path, monkeypatch):
    """The student's first epochs learned from one teacher's features: a resume whose teacher checkpoint was
    replaced (a cached teacher removed and fine-tuned again, a file overwritten) went on with the other
    one's."""
    from kdiqa_edge.data import DatasetSpec
    from kdiqa_edge.errors import DataError
    from kdiqa_edge.models import save_checkpoint
    from kdiqa_edge.models.teacher import load_teacher
    from kdiqa_edge.train.distill import DistillConfig, run_distill
    from kdiqa_edge.train.loop import Trainer
    from kdiqa_edge.train.state import RunInterrupted

    teacher = load_teacher("tiny")
    save_checkpoint(teacher, tmp_path / "teacher")
    cfg = DistillConfig(student="test_resnet", pretrained=False, teacher_checkpoint=str(tmp_path / "teacher"),
                        epochs=2, batch_size=16, progress=False)
    data = DatasetSpec(name="synthetic", root=tiny_set)
    monkeypatch.setattr(Trainer, "interrupt_after_steps", 3)  # 2 steps an epoch: in epoch 2, epoch 1 saved
    with pytest.raises(RunInterrupted):
        run_distill(cfg, data, tmp_path / "run", log=lambda *_: None)
    monkeypatch.setattr(Trainer, "interrupt_after_steps", None)
    with torch.no_grad():
        next(teacher.visual.parameters()).add_(0.01)
    save_checkpoint(teacher, tmp_path / "teacher")
    with pytest.raises(DataError, match="its teacher changed"):
        run_distill(cfg, data, tmp_path / "run", resume=True, log=lambda *_: None)


def test_teacher_finetune_resume_refuses_another_teacher_or_template(tiny_set, tmp_path, capsys, monkeypatch):
    """distill --resume compared the configs; teacher finetune --resume did not: another --template went on
    with the saved anchors under the new prompts' names (model.json said prompts the anchors never saw),
    another --teacher failed inside load_state_dict or, same architecture, trained on under the other's
    label."""
    from kdiqa_edge.train.loop import Trainer

    args = ["teacher", "finetune", *_data(tiny_set), "--teacher", "tiny", "--epochs", "2", "--batch-size",
            "16", "--quiet", "--out", tmp_path / "run"]
    monkeypatch.setattr(Trainer, "interrupt_after_steps", 3)  # 2 steps an epoch: in epoch 2, epoch 1 saved
    code, _, _ = run_cli(args, capsys)
    assert code == 130
    monkeypatch.setattr(Trainer, "interrupt_after_steps", None)
    code, _, err = run_cli([*args, "--resume", "--template", "an image of {level} quality"], capsys)
    assert code == 2 and "cannot resume" in err and "templates" in err, err


def test_reproduce_refuses_an_unknown_student_before_the_teacher(tiny_set, tmp_path, capsys):
    """The typo was found after the first split's teacher fine-tune, and reproduce.json kept it: the
    corrected command was then refused as 'another plan' in that --out."""
    code, _, err = run_cli(["reproduce", *_data(tiny_set), "--students", "test_resnet,nosuch_model",
                            "--seeds", "1", "--epochs", "1", "--teacher", "tiny", "--no-pretrained",
                            "--out", tmp_path / "rep"], capsys)
    assert code == 2 and "unknown timm model 'nosuch_model'" in err, err
    assert not (tmp_path / "rep").exists()


@pytest.mark.parametrize("command", [["distill"], ["teacher", "finetune"]])
def test_compile_help_says_what_it_compiles(command, capsys):
    """The help said 'the train step (CUDA)': it compiles the image encoder, on a CPU too."""
    code, out, _ = run_cli([*command, "--help"], capsys)
    words = " ".join(out.replace("│", " ").split())  # rich's panel borders and wrapping
    assert code == 0 and "torch.compile the image encoder, on any device" in words


def test_teacher_eval_val_split_says_where_one_comes_from(tiny_set, capsys):
    code, _, err = run_cli(["teacher", "eval", *_data(tiny_set), "--teacher", "tiny", "--split", "val"],
                           capsys)
    assert code == 2 and "made by its --val-fraction" in err.splitlines()[-1], err  # after the decode's lines


def test_a_test_split_too_small_to_evaluate_is_refused_before_training(tiny_set, tmp_path, capsys):
    """5 rated images split 4/1: the teacher fine-tune trained its first epoch, then failed evaluating it."""
    import shutil

    root = tmp_path / "five"
    root.mkdir()
    names = sorted(p.name for p in (tiny_set / "images").iterdir())[:5]
    for name in names:
        shutil.copy(tiny_set / "images" / name, root / name)
    (root / "scores.csv").write_text("image,mos\n" + "".join(f"{n},{i + 1}\n" for i, n in enumerate(names)))
    code, out, err = run_cli(["distill", "--dataset", "csv", "--root", root, "--teacher", "tiny", "--student",
                              "test_resnet", "--no-pretrained", "--epochs", "1", "--batch-size", "2",
                              "--out", tmp_path / "run"], capsys)
    assert code == 2 and "the test split has 1 image(s), too few to evaluate an epoch on" in err, err
    assert "epoch 1/1" not in out

