"""Issue #30 (what a new user hit), the data and training side, through the real command line.

A user's own CSV rated 0..5 (`mos_quality`), some ratings below 1: `distill --mos-range 0,5` interrupted with
Ctrl-C and resumed (from another folder) to the uninterrupted run's bytes; an older run's relative paths;
`--resume` of a finished run; ratings outside 1..5 without --mos-range; distill's output; the plots' epoch
axes; `--split-seed` in data and teacher eval.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("open_clip")

from typer.testing import CliRunner

from kdiqa_edge.cli import app, main
from kdiqa_edge.data import DatasetSpec, load_dataset
from kdiqa_edge.data.runs import run_data

# The user's flags, relative to their folder (the module's `workdir`), as typed.
DATA_FLAGS = ["--dataset", "csv", "--root", "set", "--csv", "set/labels.csv", "--image-col", "name",
              "--mos-col", "mos_quality"]
RANGE = ["--mos-range", "0,5"]
TRAIN_FLAGS = ["--teacher", "tiny", "--teacher-epochs", "1", "--no-pretrained", "--student", "test_resnet",
               "--epochs", "2", "--batch-size", "32"]
CHECKPOINT_FILES = ("last/model.safetensors", "last/model.json", "best/model.safetensors", "best/model.json")


@contextlib.contextmanager
def working_in(folder: Path):
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        yield


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The user's folder: `set/` (images) and `set/labels.csv`, rated 0..5 in `mos_quality`."""
    from kdiqa_edge.data.synthetic import generate

    folder = tmp_path_factory.mktemp("user")
    generate(folder / "set", refs=2, size=(86, 64))  # the tiny teacher's 64 px
    with open(folder / "set" / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    with open(folder / "set" / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "mos_quality"])
        writer.writerows([row["image"], f"{(float(row['mos']) - 1) * 1.25:.3f}"] for row in rows)
    return folder


@pytest.fixture(scope="module")
def full_run(workdir) -> tuple[Path, str]:
    """The uninterrupted run (and its output), made in the user's folder with relative paths."""
    with working_in(workdir):
        result = CliRunner().invoke(app, ["distill", *DATA_FLAGS, *RANGE, *TRAIN_FLAGS, "--out", "runs/full",
                                          "--logger", "tensorboard"])  # a tracker changes no checkpoint byte
    assert result.exit_code == 0, result.output
    return workdir / "runs" / "full", result.output


def _same_checkpoints(a: Path, b: Path) -> None:
    for name in CHECKPOINT_FILES:
        digests = {hashlib.sha256((run / "checkpoints" / name).read_bytes()).hexdigest() for run in (a, b)}
        assert len(digests) == 1, f"{name} differs between {a} and {b}"


# -- defects 1, 4, 13: Ctrl-C, then --resume from another folder, to the uninterrupted run's bytes

CTRL_C_IN_EPOCH_2 = """
import os, signal, sys
from kdiqa_edge.cli import main
from kdiqa_edge.train.loop import Trainer

optimizer_step = Trainer._optimizer_step
def pressing_ctrl_c(self):  # the user's Ctrl-C (a real SIGINT) in the middle of the student's 2nd epoch
    optimizer_step(self)
    if self.extra_meta.get("stage") == "distill" and self.step == self.steps_per_epoch + 1:
        os.kill(os.getpid(), signal.SIGINT)
Trainer._optimizer_step = pressing_ctrl_c
main(sys.argv[1:])
"""


def test_ctrl_c_then_resume_from_another_folder_gives_the_uninterrupted_bytes(workdir, full_run, tmp_path):
    full, _ = full_run
    killed = subprocess.run([sys.executable, "-c", CTRL_C_IN_EPOCH_2, "distill", *DATA_FLAGS, *RANGE,
                             *TRAIN_FLAGS, "--quiet", "--out", "runs/R"],
                            cwd=workdir, capture_output=True, text=True, timeout=600, check=False)
    assert killed.returncode == 130, killed.stderr[-3000:]
    assert "interrupted at epoch 2/2; resume with: kdiqa-edge distill --out runs/R --resume" in killed.stderr
    run = workdir / "runs" / "R"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["dataset"]["root"] == str((workdir / "set").resolve())  # absolute: usable from anywhere
    assert saved["dataset"]["csv"] == str((workdir / "set" / "labels.csv").resolve())
    assert saved["workdir"] == str(workdir.resolve())

    with working_in(tmp_path):  # another folder: the relative flags would not even exist here
        resumed = CliRunner().invoke(app, ["distill", "--out", str(run), "--resume", "--quiet"])
        assert resumed.exit_code == 0, resumed.output
        _same_checkpoints(full, run)
        data = run_data(run)
        assert data.dataset.root == (workdir / "set").resolve() and data.dataset.mos_range == (0.0, 5.0)
        assert load_dataset(data.dataset).records  # readable from here

    # --resume of a finished run, with no flags, every flag again, or its config.yaml: one line, exit 0
    with working_in(workdir):
        for extra in ([], [*DATA_FLAGS, *RANGE, *TRAIN_FLAGS], ["--config", "runs/R/config.yaml"]):
            again = CliRunner().invoke(app, ["distill", "--out", "runs/R", "--resume", "--quiet", *extra])
            assert again.exit_code == 0, again.output
            assert "runs/R is finished: nothing to resume" in again.output
    _same_checkpoints(full, run)


def test_an_older_run_with_relative_paths_resumes_from_another_folder(workdir, full_run, tmp_path, monkeypatch):
    """A run whose config.yaml holds paths relative to where it ran (as runs made before this fix do)."""
    from kdiqa_edge.train.loop import Trainer

    full, _ = full_run
    optimizer_step = Trainer._optimizer_step

    def interrupted(self):
        optimizer_step(self)
        if self.extra_meta.get("stage") == "distill" and self.step == self.steps_per_epoch + 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_optimizer_step", interrupted)
    with working_in(workdir):
        stopped = CliRunner().invoke(app, ["distill", *DATA_FLAGS, *RANGE, *TRAIN_FLAGS, "--quiet",
                                           "--out", "runs/old"])
    assert stopped.exit_code == 130, stopped.output
    assert "interrupted at epoch 2/2; resume with: kdiqa-edge distill --out runs/old --resume" in stopped.output
    monkeypatch.setattr(Trainer, "_optimizer_step", optimizer_step)

    run = workdir / "runs" / "old"
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["dataset"].update(root="set", csv="set/labels.csv")  # as an older version wrote them
    del config["workdir"]
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    monkeypatch.chdir(tmp_path)
    assert run_data(run).dataset.root == (workdir / "set").resolve()
    resumed = CliRunner().invoke(app, ["distill", "--out", str(run), "--resume", "--quiet"])
    assert resumed.exit_code == 0, resumed.output
    _same_checkpoints(full, run)


def test_a_score_file_named_relative_to_the_root_stays_the_roots(workdir, monkeypatch):
    from kdiqa_edge.data.readers import absolute_spec

    monkeypatch.chdir(workdir)
    spec = absolute_spec(DatasetSpec(name="csv", root=Path("set"), csv=Path("labels.csv"), image_col="name",
                                     mos_col="mos_quality", mos_range=(0.0, 5.0)))
    assert spec.root == (workdir / "set").resolve() and spec.csv == (workdir / "set" / "labels.csv").resolve()
    assert len(load_dataset(spec).records) == len(load_dataset(absolute_spec(DatasetSpec(
        name="csv", root=Path("set"), csv=Path("set/labels.csv"), image_col="name", mos_col="mos_quality",
        mos_range=(0.0, 5.0)))).records)


def test_teacher_finetune_says_how_to_resume_and_resumes(workdir, tmp_path, monkeypatch, capsys):
    from kdiqa_edge.train.loop import Trainer

    optimizer_step = Trainer._optimizer_step

    def interrupted(self):
        optimizer_step(self)
        raise KeyboardInterrupt

    monkeypatch.chdir(workdir)
    monkeypatch.setattr(Trainer, "_optimizer_step", interrupted)
    command = ["teacher", "finetune", *DATA_FLAGS, *RANGE, "--teacher", "tiny", "--epochs", "1",
               "--batch-size", "32", "--no-features", "--quiet", "--out", "runs/teacher"]
    with pytest.raises(SystemExit) as exit_info:
        main(command)
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert "interrupted at epoch 1/1; resume with: kdiqa-edge teacher finetune --out runs/teacher --resume" in err
    monkeypatch.setattr(Trainer, "_optimizer_step", optimizer_step)
    monkeypatch.chdir(tmp_path)  # before its first saved epoch: --resume starts it afresh, from anywhere
    resumed = CliRunner().invoke(app, ["teacher", "finetune", "--out", str(workdir / "runs" / "teacher"),
                                       "--resume", "--quiet"])
    assert resumed.exit_code == 0, resumed.output
    saved = yaml.safe_load((workdir / "runs" / "teacher" / "config.yaml").read_text())
    assert saved["dataset"]["root"] == str((workdir / "set").resolve()) and saved["workdir"] == str(workdir)
    assert json.loads((workdir / "runs" / "teacher" / "summary.json").read_text())["epochs"] == 1


def test_reproduce_of_a_csv_set_with_mos_range_resumes(workdir, monkeypatch, capsys):
    """Ctrl-C in a reproduce sweep, then the same command again: its plan (reproduce.json) is the same plan."""
    from kdiqa_edge.train.loop import Trainer

    optimizer_step = Trainer._optimizer_step

    def interrupted(self):
        optimizer_step(self)
        if self.extra_meta.get("stage") == "distill":
            raise KeyboardInterrupt

    monkeypatch.chdir(workdir)
    monkeypatch.setattr(Trainer, "_optimizer_step", interrupted)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3's opt-in for a folder store
    store = f"file:{workdir / 'mlruns'}"
    command = ["reproduce", *DATA_FLAGS, *RANGE, "--students", "test_resnet", "--seeds", "1", "--epochs", "1",
               "--teacher", "tiny", "--no-pretrained", "--batch-size", "32", "--out", "runs/repro",
               "--logger", "mlflow", "--mlflow-uri", store]
    with pytest.raises(SystemExit) as exit_info:
        main(command)
    assert exit_info.value.code == 130
    assert "interrupted at epoch 1/1 in runs/repro/seed0/test_resnet-full; run the same command again to resume" \
        in capsys.readouterr().err
    monkeypatch.setattr(Trainer, "_optimizer_step", optimizer_step)
    with pytest.raises(SystemExit) as exit_info:
        main(command)
    assert exit_info.value.code in (0, None), capsys.readouterr().err
    assert (workdir / "runs" / "repro" / "seed0" / "test_resnet-full" / "summary.json").is_file()
    plan = json.loads((workdir / "runs" / "repro" / "reproduce.json").read_text())
    assert plan["dataset"]["root"] == str((workdir / "set").resolve()) and plan["dataset"]["mos_range"] == [0, 5]
    # --logger: each run of the sweep is one tracker run (the interrupted one continued), tagged so the
    # tracker's own tables compare split seeds, students and variants
    from mlflow import MlflowClient

    client = MlflowClient(store)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    distills = [r for r in runs if r.data.tags.get("stage") == "distill"]
    assert len(distills) == 1, [r.data.tags for r in runs]
    tags = distills[0].data.tags
    assert (tags["split_seed"], tags["student"], tags["variant"]) == ("0", "test_resnet", "full")


# -- defect 3: ratings outside 1..5 without --mos-range


@pytest.mark.parametrize("command", [["data", "info"], ["distill", *TRAIN_FLAGS, "--out", "runs/never"]])
def test_ratings_outside_the_default_range_are_an_error_not_a_skip(command, workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    with pytest.raises(SystemExit) as exit_info:
        main([*command, *DATA_FLAGS])
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    low, high = re.search(r"mos_quality holds ratings ([\d.]+)\.\.([\d.]+), outside the default range 1\.\.5",
                          err).groups()
    assert float(low) < 1 <= float(high) <= 5
    assert "pass --mos-range LO,HI" in err
    assert not (workdir / "runs" / "never").exists()


def test_an_explicit_range_keeps_the_skip_report(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "info", *DATA_FLAGS, "--mos-range", "1,5", "--json"])
    assert exit_info.value.code in (0, None)
    info = json.loads(capsys.readouterr().out)
    with open(workdir / "set" / "labels.csv", newline="") as handle:
        below = sum(float(row["mos_quality"]) < 1 for row in csv.DictReader(handle))
    assert below > 0 and info["skipped"] == below
    assert all(reason.startswith("outside the nominal range [1, 5]") for reason in info["skipped_reasons"])


# -- defect 10: what distill prints and what summary.json says


def test_distill_output_is_labelled_said_once_and_ends_with_the_next_step(full_run, workdir):
    run, output = full_run
    lines = output.splitlines()
    assert "teacher: fine-tuning tiny for 1 epoch ->" in output  # not "1 epochs"
    assert "student: test_resnet at 64 px (the teacher's preprocessing), 2 epochs" in output
    assert not [line for line in lines if line.startswith("train:")]  # every progress line says its stage
    assert any(line.startswith("teacher train:") for line in lines)
    assert any(line.startswith("student train:") for line in lines)
    for epoch in (1, 2):  # each epoch line once
        assert sum(f"student train: epoch {epoch}/2 " in line for line in lines) == 1, output
    summary = json.loads((run / "summary.json").read_text())
    ratio = summary["compression"]["teacher_over_student"]["params"]
    assert ratio == pytest.approx(summary["teacher_facts"]["params"] / summary["student_facts"]["params"], rel=1e-2)
    assert ratio < 1 and f"the student is {1 / ratio:.1f}x LARGER than this teacher" in output
    assert lines[-1] == "next: kdiqa-edge export runs/full --precision auto"
    # --logger tensorboard: the student's steps.csv in RUN/tb, each step once, and the run's summary
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with open(run / "steps.csv", newline="") as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle)]
    events = EventAccumulator(str(run / "tb")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == steps and len(steps) > 0
    assert len(events.Scalars("test/srcc")) == 2  # one per epoch


# -- defect 12: one epoch axis, integer epochs, lambda not a loss


def _history(epochs: int) -> list[dict]:
    return [{"epoch": e, "step": 3 * e, "lr": 1e-4, "loss": 1.0 / e, "hard": 0.6 / e, "soft": 0.4 / e,
             "lambda": 0.5, "eval_split": "test", "plcc": 0.5, "plcc_fit": 0.5, "srcc": 0.5, "krcc": 0.4,
             "rmse": 1.0, "train_seconds": 1.0, "images_per_s": 10.0} for e in range(1, epochs + 1)]


@pytest.mark.parametrize("epochs", [1, 7])
def test_plots_put_epochs_on_one_integer_axis(epochs):
    import matplotlib.pyplot as plt

    from kdiqa_edge.train.distill import distill_figure
    from kdiqa_edge.train.plots import curves_figure
    from kdiqa_edge.train.schedules import parse_variant

    history = _history(epochs)
    curves = curves_figure(history, scalars={"lambda"})
    distill = distill_figure(history, parse_variant("full"), total_steps=3 * epochs, steps_per_epoch=3)
    try:
        ax_loss = curves.axes[0]
        assert "lambda" not in [line.get_label() for line in ax_loss.get_lines()]
        assert {"loss", "hard", "soft"} == {line.get_label() for line in ax_loss.get_lines()}
        for ax in curves.axes + distill.axes:
            low, high = ax.get_xlim()
            assert low == 0 and epochs < high < epochs + 1
            ticks = [t for t in ax.get_xticks() if low <= t <= high]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks
        ax_lambda = distill.axes[1]
        means = next(line for line in ax_lambda.get_lines() if line.get_label().startswith("epoch mean"))
        assert list(means.get_xdata()) == list(range(1, epochs + 1))  # where the other panels put epoch e
        per_step = next(line for line in ax_lambda.get_lines() if line.get_label().startswith("lambda(t)"))
        assert per_step.get_xdata()[0] == 0 and per_step.get_xdata()[-1] == epochs
    finally:
        plt.close(curves)
        plt.close(distill)


# -- defect 11: --split-seed in data index / data info / teacher eval; --seed a deprecated alias


@pytest.mark.parametrize("flag", ["--split-seed", "--seed"])
def test_data_info_and_index_take_split_seed(flag, workdir, tmp_path, monkeypatch):
    monkeypatch.chdir(workdir)
    runner = CliRunner()
    info = runner.invoke(app, ["data", "info", *DATA_FLAGS, *RANGE, flag, "3", "--json"])
    assert info.exit_code == 0, info.output
    assert json.loads(info.stdout)["split"]["seed"] == 3
    index = runner.invoke(app, ["data", "index", *DATA_FLAGS, *RANGE, flag, "3", "--out", str(tmp_path / "i.csv")])
    assert index.exit_code == 0, index.output
    reference = runner.invoke(app, ["data", "index", *DATA_FLAGS, *RANGE, "--split-seed", "3",
                                    "--out", str(tmp_path / "r.csv")])
    assert (tmp_path / "i.csv").read_text() == (tmp_path / "r.csv").read_text() != ""
    deprecated = "warning: --seed is deprecated here, use --split-seed"
    assert (deprecated in info.stderr) == (flag == "--seed") and (deprecated in index.stderr) == (flag == "--seed")
    assert deprecated not in reference.stderr


def test_teacher_eval_takes_split_seed(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    runner = CliRunner()
    common = ["teacher", "eval", *DATA_FLAGS, *RANGE, "--teacher", "tiny", "--json"]
    new = runner.invoke(app, [*common, "--split-seed", "2"])
    old = runner.invoke(app, [*common, "--seed", "2"])
    other = runner.invoke(app, [*common, "--split-seed", "0"])
    assert new.exit_code == old.exit_code == other.exit_code == 0, new.output + old.output
    assert json.loads(new.stdout)["metrics"] == json.loads(old.stdout)["metrics"]
    assert json.loads(new.stdout)["metrics"] != json.loads(other.stdout)["metrics"]  # the seed reached the split
    assert "--seed is deprecated" in old.stderr and "--seed is deprecated" not in new.stderr


def test_help_names_split_seed(monkeypatch):
    for command in (["data", "info"], ["data", "index"], ["teacher", "eval"]):
        result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
        assert "--split-seed" in result.output and re.search(r"--seed\b", result.output) is None, command

