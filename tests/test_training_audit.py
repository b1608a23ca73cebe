"""The training engine around interruptions and bad disks, and the reproduce tables: a kill between removing the
old `last` and renaming the new one in, a full disk, summary.json written last, and tables that say what they
hold (random init, the split the best epoch was chosen on, the paper's figures of the right cell)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch.nn.functional as F

from kdiqa_edge import paths
from kdiqa_edge.data import DatasetSpec, prepare
from kdiqa_edge.errors import CheckpointError
from kdiqa_edge.io import is_temporary
from kdiqa_edge.models import load_checkpoint
from kdiqa_edge.models.checkpoint import content_hash
from kdiqa_edge.models.teacher import load_teacher
from kdiqa_edge.preprocess import PreprocessSpec
from kdiqa_edge.train.loop import TrainConfig, Trainer

SMALL_REFS = 4  # 120 images, as test_engine's


def _data():
    from kdiqa_edge.data.synthetic import generate

    root = paths.cache_dir() / f"synthetic-refs{SMALL_REFS}"
    if not (root / "scores.csv").is_file():
        generate(root, refs=SMALL_REFS)
    return prepare(DatasetSpec(name="synthetic", root=root), PreprocessSpec(size=64), seed=0, progress=False)


def mse_loss(model, batch, step, total_steps):
    return {"mse": F.mse_loss(model(batch["image"]), batch["mos"])}


CFG = {"epochs": 2, "batch_size": 16, "lr": 3e-4, "progress": False}


def _trainer(data, run_dir, resume=False) -> Trainer:
    cache, split = data
    return Trainer(load_teacher("tiny"), mse_loss, cache, split, TrainConfig(**CFG), run_dir, resume=resume)


@pytest.fixture(scope="module")
def data():
    return _data()


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must end as."""
    run = tmp_path_factory.mktemp("reference") / "run"
    _trainer(data, run).fit()
    return run


def _weights(run: Path, name: str = "last") -> str:
    return content_hash(load_checkpoint(run / "checkpoints" / name, verify=False).state_dict())


def _temporaries(run: Path) -> list[Path]:
    return [p for p in run.rglob("*") if is_temporary(p.name)]


def _same_run(run: Path, reference: Path) -> None:
    assert _weights(run) == _weights(reference) and _weights(run, "best") == _weights(reference, "best")
    summary, expected = (json.loads((r / "summary.json").read_text()) for r in (run, reference))
    assert summary["test"] == expected["test"] and summary["best_epoch"] == expected["best_epoch"]
    assert (run / "steps.csv").read_text() == (reference / "steps.csv").read_text()
    assert not _temporaries(run)


KILLED_IN_THE_RENAME = """
import os, signal, sys
import torch
import torch.nn.functional as F
from kdiqa_edge.data import DatasetSpec, prepare
from kdiqa_edge.models.teacher import load_teacher
from kdiqa_edge.preprocess import PreprocessSpec
from kdiqa_edge.train.loop import TrainConfig, Trainer

torch.set_num_threads(2)
replace, saves = os.replace, []
def dying_replace(src, dst):  # epoch 2's `last`: the old one is removed, the new one staged, not renamed in
    if str(dst).endswith(os.path.join("checkpoints", "last")):
        saves.append(dst)
        if len(saves) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    return replace(src, dst)
os.replace = dying_replace
def mse(model, batch, step, total):
    return {"mse": F.mse_loss(model(batch["image"]), batch["mos"])}
cache, split = prepare(DatasetSpec(name="synthetic", root=sys.argv[1]), PreprocessSpec(size=64), seed=0,
                       progress=False)
cfg = TrainConfig(epochs=2, batch_size=16, lr=3e-4, progress=False)
Trainer(load_teacher("tiny"), mse, cache, split, cfg, sys.argv[2]).fit()
"""


def test_a_kill_between_removing_last_and_renaming_the_new_one_in_loses_nothing(data, reference, tmp_path):
    """Before: the next run's sweep removed the staged epoch-2 checkpoint: --resume said "nothing to resume",
    and a plain re-run trained again from the first epoch over the run."""
    run = tmp_path / "run"
    cache, _ = data
    killed = subprocess.run([sys.executable, "-c", KILLED_IN_THE_RENAME, str(cache.dataset.root), str(run)],
                            capture_output=True, text=True, timeout=600, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (run / "checkpoints" / "last").exists()  # the window: no `last` at all, epoch 2 staged

    with pytest.raises(CheckpointError, match="interrupted the save of epoch 2.*pass --resume"):
        _trainer(data, run).setup()  # a plain re-run: refused, never trained over the run
    assert load_checkpoint(run / "checkpoints" / "last", verify=False).meta["epoch"] == 2
    _trainer(data, run, resume=True).fit()
    _same_run(run, reference)


class _StopBeforeFinish(Trainer):
    def finish(self):
        raise KeyboardInterrupt("killed in the final evaluation")


def _staged_after_a_cut_removal(data, run: Path) -> tuple[Path, Path]:
    """A run whose epoch-2 save was killed inside the removal of the old `last`: what is left of it (its
    train_state only) and the complete new checkpoint staged beside it, with its dead writer's claim."""
    trainer = _StopBeforeFinish(load_teacher("tiny"), mse_loss, *data, TrainConfig(**CFG), run)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    folder = run / "checkpoints"
    staged, claim = folder / ".last.k1ll3d00.tmp", folder / ".last.k1ll3d00.claim"
    shutil.copytree(folder / "last", staged)
    claim.touch()
    for name in ("model.safetensors", "model.json"):  # rmtree got that far
        (folder / "last" / name).unlink()
    return staged, claim


def test_a_half_removed_last_is_replaced_by_the_staged_checkpoint_once_its_writer_is_gone(data, reference,
                                                                                        tmp_path):
    from kdiqa_edge.train.resume import require_run
    from kdiqa_edge.train.state import recover_last

    run = tmp_path / "run"
    staged, claim = _staged_after_a_cut_removal(data, run)
    (run / "config.yaml").write_text("epochs: 2\n")
    with open(claim) as held:  # a live writer's staging is never taken
        fcntl.flock(held, fcntl.LOCK_EX)
        assert recover_last(run) is None and staged.is_dir()
    require_run(run)  # what distill/finetune --resume call first: the recipe then sees `last` to resume from
    assert not staged.exists() and not claim.exists()
    assert load_checkpoint(run / "checkpoints" / "last", verify=False).meta["epoch"] == 2
    _trainer(data, run, resume=True).fit()
    _same_run(run, reference)


def test_a_full_disk_is_one_line_and_the_saved_epoch_resumes(data, reference, tmp_path, monkeypatch):
    """Before: an OSError's traceback out of the atomic write."""
    from kdiqa_edge.models import checkpoint

    save = checkpoint.save_safetensors
    calls = []

    def full_disk(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:  # epoch 2's checkpoint
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_safetensors", full_disk)
    run = tmp_path / "run"
    with pytest.raises(CheckpointError) as error:
        _trainer(data, run).fit()
    message = str(error.value)
    assert "\n" not in message and "No space left on device" in message
    assert "checkpoints/last holds epoch 1: resume with --resume" in message
    assert not _temporaries(run)
    monkeypatch.setattr(checkpoint, "save_safetensors", save)
    _trainer(data, run, resume=True).fit()
    _same_run(run, reference)


def test_summary_json_is_written_last_so_a_failed_end_resumes(data, reference, tmp_path, monkeypatch):
    """Before: summary.json went first, so a run stopped in its plots counted as finished (`run_finished`:
    reproduce skipped it, --resume said it was done) without them."""
    from kdiqa_edge.train import plots
    from kdiqa_edge.train.state import run_finished, run_interrupted

    def no_room(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(plots, "write_plots", no_room)
    run = tmp_path / "run"
    with pytest.raises(CheckpointError, match="cannot write the run's plots and summary.json"):
        _trainer(data, run).fit()
    assert not run_finished(run) and run_interrupted(run)
    monkeypatch.undo()
    _trainer(data, run, resume=True).fit()
    assert (run / "plots" / "curves.png").is_file()
    _same_run(run, reference)


# -- reproduce: the tables


def _finished(run_dir: Path, **summary) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps(summary))


def _test(plcc: float, srcc: float) -> dict:
    return {"plcc": plcc, "plcc_fit": plcc, "srcc": srcc, "krcc": srcc, "rmse": 0.5, "n": 200}


def test_reproduce_tables_take_medians_of_finished_runs_and_say_which_are_random_init(tmp_path):
    from kdiqa_edge.train.reproduce import ReproduceConfig, collect, plan, table_i_markdown, table_ii_markdown

    cfg = ReproduceConfig(students=["resnet18"], variants=["full", "regression"], seeds=4)
    runs = plan(cfg, tmp_path)
    plcc = {0: 0.80, 1: 0.90, 2: 0.60, 3: 0.99}  # seed 3 is not finished: left out
    for seed in range(3):
        _finished(tmp_path / f"seed{seed}" / "teacher", label="ViT-B-32:openai", select="test plcc+srcc",
                  test=_test(0.9, 0.9))
        _finished(tmp_path / f"seed{seed}" / "resnet18-full", student="resnet18 (not pretrained)",
                  teacher="ViT-B-32:openai", select="test plcc+srcc", test=_test(plcc[seed], plcc[seed] - 0.1))
        _finished(tmp_path / f"seed{seed}" / "resnet18-regression", student="resnet18", teacher=None,
                  select="test plcc+srcc", test=_test(0.7, 0.7))
    (tmp_path / "seed3" / "resnet18-full").mkdir(parents=True)

    results = collect(runs, "koniq")
    rows = {row["run"]: row for row in results["rows"]}
    full = rows["resnet18-full"]
    assert full["n"] == 3 and [r["seed"] for r in full["runs"]] == [0, 1, 2]
    assert full["plcc_median"] == pytest.approx(0.80) and full["plcc_mean"] == pytest.approx(0.7667, abs=1e-4)
    assert full["not_pretrained"] == ["model"] and rows["resnet18-regression"]["not_pretrained"] == []

    table1 = table_i_markdown(results)
    assert "| resnet18 | 3 | 0.800 | 0.700 | 0.800 | 0.700 | 0.884 | 0.851 | not pretrained |" in table1  # KonIQ
    assert table1.count("| 0.884 | 0.851 |") == 1  # the paper's ResNet-18 figures, only in its own row
    assert "teacher ViT-B-32:openai, fine-tuned" in table1
    assert "not the paper's setting" in table1 and "Best epoch chosen by: test plcc+srcc" in table1
    table2 = table_ii_markdown(results)
    assert "| resnet18 | full | 3 | 0.800 | 0.700 | 0.884 | not pretrained |" in table2
    assert "| resnet18 | regression | 3 | 0.700 | 0.700 | 0.843 | pretrained |" in table2  # paper row B (X), KonIQ


def test_reproduce_resumes_a_run_whose_save_was_cut_short(reference, tmp_path, monkeypatch):
    """Before: `run_one` saw no `last` and started the run afresh (resume=False), and its sweep dropped the
    staged checkpoint: a sweep's (or a requeued SLURM job's) killed run lost every epoch."""
    from kdiqa_edge.train import distill, reproduce

    cfg = reproduce.ReproduceConfig(students=["test_resnet"], variants=["regression"], seeds=1)
    run = reproduce.plan(cfg, tmp_path)[0]
    folder = run.run_dir / "checkpoints"
    folder.mkdir(parents=True)
    shutil.copytree(reference / "checkpoints" / "last", folder / ".last.k1ll3d00.tmp")
    (folder / ".last.k1ll3d00.claim").touch()
    calls = []
    monkeypatch.setattr(distill, "run_distill", lambda *args, resume, **kwargs: calls.append(resume) or {})
    reproduce.run_one(cfg, DatasetSpec(name="synthetic"), tmp_path, run)
    assert calls == [True] and (folder / "last" / "train_state.pt").is_file()
    assert not _temporaries(run.run_dir)


def _ddp_setup_worker(rank: int, world_size: int, port: int, run_dir: str, cache_dir: str, outcome: str):
    from ddp_helpers import become_rank

    become_rank(rank, world_size, port, cache_dir)
    try:
        _trainer(_data(), Path(run_dir)).setup()
        said = "set up"
    except CheckpointError as exc:
        said = str(exc)
    finally:
        from kdiqa_edge.train.distributed import destroy_process_group

        destroy_process_group()
    Path(f"{outcome}.{rank}").write_text(said)


def test_under_ddp_every_rank_refuses_what_rank_0_found(data, tmp_path):
    """Rank 0 alone looks at the run dir (recovers, sweeps, checks split.json); what it refuses, every rank
    refuses with the same line, rather than the others training on into a collective rank 0 never joins."""
    import torch.multiprocessing as mp
    from ddp_helpers import free_port

    run = tmp_path / "run"
    _staged_after_a_cut_removal(data, run)
    outcome = tmp_path / "outcome"
    mp.spawn(_ddp_setup_worker, args=(2, free_port(), str(run), str(paths.cache_dir()), str(outcome)), nprocs=2)
    said = [Path(f"{outcome}.{rank}").read_text() for rank in range(2)]
    assert said[0] == said[1] and "interrupted the save of epoch 2" in said[0]


def test_status_shows_a_stopped_local_run_as_interrupted_not_todo(data, reference, tmp_path):
    """Before: `--status` of a local sweep called a run with 2 of 3 epochs saved `todo`, as if never begun."""
    from typer.testing import CliRunner

    from kdiqa_edge.cli import app
    from kdiqa_edge.train import reproduce

    cfg = reproduce.ReproduceConfig(students=["test_resnet"], variants=["regression"], seeds=2)
    out = tmp_path / "out"
    reproduce.record_plan(cfg, DatasetSpec(name="synthetic", root=data[0].dataset.root), out)
    first, _ = reproduce.plan(cfg, out)
    shutil.copytree(reference / "checkpoints" / "last", first.run_dir / "checkpoints" / "last")
    result = CliRunner().invoke(app, ["reproduce", "--out", str(out), "--status"])
    assert result.exit_code == 0, result.output
    assert "1 interrupted, 1 todo" in result.output


def test_a_resumed_teacher_finetune_keeps_its_zero_shot_figures(small_synthetic, tmp_path, monkeypatch, capsys):
    """zero_shot_test is the teacher before any training: a resumed fine-tune, whose model has trained since,
    dropped it from its summary; it is kept in the run dir when measured. And summary.json, which marks the
    run finished, is written once, last, by the recipe (not first by the engine without the recipe's part)."""
    from cli_helpers import run_cli

    run = tmp_path / "teacher"
    args = ["teacher", "finetune", "--teacher", "tiny", "--root", small_synthetic.root, "--epochs", "2",
            "--batch-size", "16", "--out", run]
    writes = []
    real_write_json = Trainer.finish.__globals__["write_json"]
    monkeypatch.setitem(Trainer.finish.__globals__, "write_json",
                        lambda path, obj: (writes.append(Path(path).name), real_write_json(path, obj))[1])
    monkeypatch.setattr(Trainer, "interrupt_after_steps", 7)  # 5 or 6 steps an epoch: in epoch 2
    code, _, err = run_cli(args, capsys)
    assert code != 0 and not (run / "summary.json").exists()
    measured = json.loads((run / "zero_shot.json").read_text())
    monkeypatch.setattr(Trainer, "interrupt_after_steps", None)
    code, _, err = run_cli([*args, "--resume"], capsys)
    assert code == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["zero_shot_test"] == measured and measured["n"] == summary["test"]["n"]
    assert "summary.json" not in writes  # the engine left it to the recipe
