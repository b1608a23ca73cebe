"""`teacher eval --checkpoint RUN` scores the run's own data and test split; `reproduce --dry-run` refuses an
--out planned otherwise, as the real command does."""

from __future__ import annotations

import json

import pytest
from cli_helpers import run_cli

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def teacher_run(small_synthetic, tmp_path_factory):
    """The tiny teacher fine-tuned for one epoch on small_synthetic: a run dir with config.yaml and split.json."""
    from kdiqa_edge.cli import main

    run = tmp_path_factory.mktemp("teacher-eval") / "run"
    with pytest.raises(SystemExit) as done:
        main(["teacher", "finetune", "--teacher", "tiny", "--dataset", "synthetic", "--root", str(small_synthetic.root),
              "--epochs", "1", "--batch-size", "32", "--no-features", "--quiet", "--out", str(run)])
    assert not done.value.code
    return run


def test_eval_of_a_run_without_dataset_options_scores_its_own_test_split(teacher_run, capsys):
    code, out, err = run_cli(["teacher", "eval", "--checkpoint", teacher_run, "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    summary = json.loads((teacher_run / "summary.json").read_text())
    held_out = json.loads((teacher_run / "split.json").read_text())["test"]
    assert result["metrics"]["n"] == len(held_out) == summary["test"]["n"]
    assert result["metrics"]["srcc"] == pytest.approx(summary["test"]["srcc"], abs=1e-6)
    assert "run's split" in result["mode"] and str(teacher_run) in result["source"]
    assert result["headline"] is None and "NOT your data" not in err


def test_another_split_seed_is_a_fresh_split_with_the_note_bench_gives(teacher_run, capsys):
    """As `bench --split-seed`: the seed given is used, and a note says the run may have trained on its images."""
    code, out, err = run_cli(["teacher", "eval", "--checkpoint", teacher_run, "--split-seed", "7", "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert "run's split" not in result["mode"] and str(teacher_run) in result["source"]
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and "--split-seed 7: a fresh split" in notes[0] and "trained on" in notes[0]


def test_dataset_options_that_differ_from_the_run_win_with_one_note(teacher_run, tmp_path, capsys):
    from kdiqa_edge.data.synthetic import generate

    other = generate(tmp_path / "other", refs=2, size=(86, 64))
    code, out, err = run_cli(["teacher", "eval", "--checkpoint", teacher_run, "--dataset", "synthetic",
                              "--root", other, "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and "win over the dataset of" in notes[0] and str(teacher_run) in notes[0]
    assert result["source"] == "the dataset options" and "run's split" not in result["mode"]


def test_no_run_and_no_dataset_options_say_first_it_is_the_built_in_set(teacher_run, tmp_path):
    import shutil

    from kdiqa_edge.data.spec import DatasetSpec
    from kdiqa_edge.train.finetune import teacher_eval_source

    bare = shutil.copytree(teacher_run / "checkpoints" / "best", tmp_path / "best")  # in no run dir
    for checkpoint, says in ((bare, "not in a run dir"), (None, "no dataset options")):
        source, headline = teacher_eval_source(DatasetSpec(), checkpoint)
        assert source.dataset == DatasetSpec() and source.split_file is None
        assert headline.startswith("scores on the built-in synthetic set, NOT your data") and says in headline
    source, headline = teacher_eval_source(DatasetSpec(), teacher_run)
    assert headline is None and source.split_file == teacher_run / "split.json"  # the run names its data


def test_reproduce_dry_run_refuses_another_plan_as_the_real_run_does(small_synthetic, tmp_path, capsys):
    from kdiqa_edge.train.reproduce import ReproduceConfig, record_plan

    out = tmp_path / "rep"
    args = ["reproduce", "--dataset", "synthetic", "--root", small_synthetic.root, "--out", out, "--students",
            "test_resnet", "--variants", "hard", "--seeds", "1", "--teacher-epochs", "1", "--teacher", "tiny",
            "--no-pretrained", "--batch-size", "8"]
    record_plan(ReproduceConfig(students=["test_resnet"], variants=["hard"], seeds=1, teacher_epochs=1,
                                teacher="tiny", pretrained=False, batch_size=8, epochs=3), small_synthetic, out)
    planned = (out / "reproduce.json").read_text()  # the plan of these args with --epochs 3
    dry_code, _, dry_err = run_cli([*args, "--epochs", "4", "--dry-run"], capsys)
    real_code, _, real_err = run_cli([*args, "--epochs", "4"], capsys)
    assert dry_code == real_code != 0
    assert dry_err.strip().splitlines() == real_err.strip().splitlines() == [
        f"error: {out} was written by another plan (it differs in epochs): use the same options or another --out"]
    assert (out / "reproduce.json").read_text() == planned and sorted(p.name for p in out.iterdir()) == [
        "reproduce.json"]
    # the same with a launcher's dry run (cli/reproduce.py `_launch`), which lists jobs instead of runs
    launch_code, _, launch_err = run_cli([*args, "--epochs", "4", "--dry-run", "--launcher", "submitit-local"], capsys)
    assert launch_code == real_code and launch_err.strip().splitlines() == real_err.strip().splitlines()
    assert (out / "reproduce.json").read_text() == planned
