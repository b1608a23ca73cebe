"""`reproduce --launcher slurm` where the audit found it wrong: no sacct (states unknown, not queued;
squeue as the fallback), a dry run that ignores what is queued, paths relative to where the command ran.

A fake SLURM on PATH, as in test_reproduce_launch.py: sbatch keeps each submission script and prints an id;
sacct and squeue print the states the test writes. Nothing trains: the jobs are only submitted.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("torch")
submitit = pytest.importorskip("submitit")

from slurm_helpers import FAKE_SACCT, FAKE_SBATCH

from kdiqa_edge.cli import app
from kdiqa_edge.train import launch
from kdiqa_edge.train.jobs import read_jobs, run_states

NO_ACCOUNTING = """#!/bin/bash
echo "sacct: error: Slurm accounting storage is disabled" >&2
exit 1
"""
FAKE_SQUEUE = """#!/bin/bash
cat "$(dirname "$0")/queue" 2>/dev/null
"""
SYSTEM_PATH = "/usr/bin:/bin"  # bash, cat, cp for the fakes; no real SLURM tool may answer instead of them
TEACHER, FULL, SOFT = "seed0/teacher", "seed0/test_efficientnet-full", "seed0/test_efficientnet-soft"


def _fake_slurm(bin_dir: Path, monkeypatch, **tools: str) -> Path:
    if any(shutil.which(tool, path=SYSTEM_PATH) for tool in ("sacct", "squeue")):
        pytest.skip("a real sacct or squeue is on this machine")
    bin_dir.mkdir()
    for name, text in {"sbatch": FAKE_SBATCH, "srun": "#!/bin/bash\nexit 0\n", **tools}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{SYSTEM_PATH}")
    return bin_dir


def _args(data, out, *extra, variants="full,soft"):
    return ["reproduce", "--dataset", "synthetic", "--root", str(data.root), "--students",
            "test_efficientnet", "--variants", variants, "--seeds", "1", "--epochs", "1", "--teacher", "tiny",
            "--no-pretrained", "--out", str(out), "--launcher", "slurm", "--partition", "gpu", *extra]


def _dependency(script: Path) -> str | None:
    lines = [line for line in script.read_text().splitlines() if line.startswith("#SBATCH --dependency=")]
    return lines[0].split("=", 1)[1] if lines else None


def _jobs(out: Path) -> dict:
    return json.loads((out / "jobs.json").read_text())["runs"]


# ---------------------------------------------------------------- D11: no sacct

def test_without_sacct_job_states_are_unknown_and_not_resubmitted_unless_asked(small_synthetic, tmp_path,
                                                                              monkeypatch):
    bin_dir = _fake_slurm(tmp_path / "bin", monkeypatch)  # sbatch and srun only: accounting is off
    runner, out = CliRunner(), tmp_path / "repro"
    first = runner.invoke(app, _args(small_synthetic, out, variants="full"))
    assert first.exit_code == 0, first.output
    assert {k: v["job_id"] for k, v in _jobs(out).items()} == {TEACHER: "1", FULL: "2"}

    # a process of its own: submitit's log handlers write to the streams it started with
    status = subprocess.run([sys.executable, "-m", "kdiqa_edge", "reproduce", "--out", str(out), "--status"],
                            capture_output=True, text=True, check=False, timeout=300)
    assert status.returncode == 0, status.stderr
    assert "2 unknown" in status.stdout and "queued" not in status.stdout
    assert status.stderr.count("sacct not found: SLURM job states unknown (squeue not found)") == 1
    assert "submitit" not in status.stderr + status.stdout  # not its warnings, each twice

    again = runner.invoke(app, _args(small_synthetic, out, variants="full"))
    assert again.exit_code == 0, again.output
    assert not (bin_dir / "sbatch.3").exists()  # it may still be queued or running: not submitted twice
    assert "state unknown, not submitted again: 2 run(s)" in again.output
    assert "--resubmit-unknown" in again.output
    assert "nothing to submit: every run is done, queued, running or unknown" in again.output

    forced = runner.invoke(app, _args(small_synthetic, out, "--resubmit-unknown", variants="full"))
    assert forced.exit_code == 0, forced.output
    assert _dependency(bin_dir / "sbatch.4") == "afterok:3" and not (bin_dir / "sbatch.5").exists()
    assert {k: v["job_id"] for k, v in _jobs(out).items()} == {TEACHER: "3", FULL: "4"}


def test_without_sacct_squeue_tells_queued_and_running_from_ended(small_synthetic, tmp_path, monkeypatch):
    """squeue lists the jobs that are queued or running; a job it does not list has ended, so its unfinished
    run failed and is resubmitted (after the teacher job, still running)."""
    bin_dir = _fake_slurm(tmp_path / "bin", monkeypatch, squeue=FAKE_SQUEUE)
    runner, out = CliRunner(), tmp_path / "repro"
    assert runner.invoke(app, _args(small_synthetic, out)).exit_code == 0
    (bin_dir / "queue").write_text("1 RUNNING\n2_1 PENDING\n")  # 2_0 (seed0 full) is gone: it ended

    status = runner.invoke(app, ["reproduce", "--out", str(out), "--status"])
    assert status.exit_code == 0, status.output
    assert "1 queued, 1 running, 1 failed" in status.output
    assert "sacct not found: job states from squeue" in status.output

    again = runner.invoke(app, _args(small_synthetic, out))
    assert again.exit_code == 0, again.output
    assert _dependency(bin_dir / "sbatch.3") == "afterok:1" and not (bin_dir / "sbatch.4").exists()
    assert _jobs(out)[FULL]["job_id"] == "3" and _jobs(out)[SOFT]["job_id"] == "2_1"


def test_sacct_with_accounting_off_is_no_answer_either(small_synthetic, tmp_path, monkeypatch):
    _fake_slurm(tmp_path / "bin", monkeypatch, sacct=NO_ACCOUNTING)
    runner, out = CliRunner(), tmp_path / "repro"
    assert runner.invoke(app, _args(small_synthetic, out, variants="full")).exit_code == 0
    status = runner.invoke(app, ["reproduce", "--out", str(out), "--status"])
    assert status.exit_code == 0, status.output
    assert "sacct failed: sacct: error: Slurm accounting storage is disabled: SLURM job states unknown" in (
        status.output)
    assert "2 unknown" in status.output and "submitit" not in status.output


# ---------------------------------------------------------------- D12: the dry run skips what is queued

def test_dry_run_shows_what_the_real_run_submits(small_synthetic, tmp_path, monkeypatch):
    bin_dir = _fake_slurm(tmp_path / "bin", monkeypatch, sacct=FAKE_SACCT)
    runner, out = CliRunner(), tmp_path / "repro"
    assert runner.invoke(app, _args(small_synthetic, out)).exit_code == 0
    (bin_dir / "states").write_text("1|RUNNING|n1\n2_0|PENDING|\n2_1|FAILED|n2\n")

    dry = runner.invoke(app, _args(small_synthetic, out, "--dry-run"))
    assert dry.exit_code == 0, dry.output
    assert "seed0-teacher" not in dry.output  # running
    assert "seed0-students: 1 run(s) test_efficientnet-soft  after job 1 (afterok)" in dry.output
    assert "--dependency=afterok:1" in dry.output and "--array" not in dry.output
    assert f"already running, not submitted again: {TEACHER} (job 1)" in dry.output
    assert f"already queued, not submitted again: {FULL} (job 2_0)" in dry.output
    assert "1 of 3 runs to do" in dry.output
    assert not (bin_dir / "sbatch.3").exists()

    real = runner.invoke(app, _args(small_synthetic, out))  # submits exactly that
    assert real.exit_code == 0, real.output
    assert _dependency(bin_dir / "sbatch.3") == "afterok:1" and not (bin_dir / "sbatch.4").exists()
    assert {k: v["job_id"] for k, v in _jobs(out).items()} == {TEACHER: "1", FULL: "2_0", SOFT: "3"}


# ---------------------------------------------------------------- D13: paths from anywhere

def test_job_paths_are_absolute_and_status_shows_whole_logs_from_another_folder(small_synthetic, tmp_path,
                                                                               monkeypatch):
    bin_dir = _fake_slurm(tmp_path / "bin", monkeypatch, sacct=FAKE_SACCT)
    runner = CliRunner()
    (tmp_path / "submit").mkdir()
    monkeypatch.chdir(tmp_path / "submit")
    assert runner.invoke(app, _args(small_synthetic, Path("rp"))).exit_code == 0
    out = tmp_path / "submit" / "rp"
    jobs = _jobs(out)
    assert jobs[FULL]["folder"] == str(out / "jobs" / "2_0")
    pickled = submitit.core.utils.DelayedSubmission.load(out / "jobs" / "2_0" / "2_0_submitted.pkl")
    assert pickled.function.out == str(out)

    (bin_dir / "states").write_text("1|FAILED|n1\n2_0|CANCELLED by 0|\n2_1|CANCELLED by 0|\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "80")  # rich, not a terminal: 80 columns
    status = runner.invoke(app, ["reproduce", "--out", str(out), "--status"])
    assert status.exit_code == 0, status.output
    log = out / "jobs" / "2_1" / "2_1_0_log.out"
    assert f"  {SOFT} (failed): {log}\n" in status.output  # whole, one line: it can be copied

    # a jobs.json written before: folders relative to where that command ran, read as OUT/jobs/<id>
    old = {k: {**v, "folder": f"rp/jobs/{v['job_id']}"} for k, v in jobs.items()}
    (out / "jobs.json").write_text(json.dumps({"runs": old}))
    status = runner.invoke(app, ["reproduce", "--out", str(out), "--status"])
    assert status.exit_code == 0, status.output
    assert f"  {SOFT} (failed): {log}\n" in status.output
    assert read_jobs(out)[TEACHER]["folder"] == str(out / "jobs" / "1")


def test_local_executor_placeholder_folder_is_removed(tmp_path):
    """submitit's local controller makes OUT/jobs/%j literally; the next look at the jobs removes it."""
    out = tmp_path / "repro"
    executor = launch._executor("submitit-local", out, launch.SlurmOptions(time="1"), "kdiqa-test")
    [job] = launch._submit(executor, [functools.partial(int, "7")])
    assert job.result() == 7
    assert (out / "jobs" / "%j").is_dir()
    assert run_states(out, []) == []
    assert not (out / "jobs" / "%j").exists() and (out / "jobs" / job.job_id).is_dir()


# ---------------------------------------------------------------- --wait without sacct

COUNTING_SQUEUE = """#!/bin/bash
dir=$(dirname "$0")
n=$(( $(cat "$dir/polls" 2>/dev/null || echo 0) + 1 ))
echo $n > "$dir/polls"
[ $n -le 2 ] && cat "$dir/queue"
exit 0
"""


def test_wait_reads_the_states_status_reads_and_ends_when_no_job_is_left(small_synthetic, tmp_path, monkeypatch):
    """--wait without sacct: squeue lists the jobs for two polls, then none (they died without a result): the
    wait ends with the failed runs in one line. submitit's own wait reads sacct alone, and waited forever."""
    monkeypatch.setattr("kdiqa_edge.cli.reproduce.SLURM_POLL_S", 0.01)
    bin_dir = _fake_slurm(tmp_path / "bin", monkeypatch, squeue=COUNTING_SQUEUE)
    (bin_dir / "queue").write_text("1 RUNNING\n2_0 PENDING\n")
    result = CliRunner().invoke(app, _args(small_synthetic, tmp_path / "repro", "--wait", variants="full"))
    polls = int((bin_dir / "polls").read_text())
    assert result.exit_code != 0 and polls == 4, result.output  # 2 listing the jobs, 1 not, then the status
    assert isinstance(result.exception, launch.LaunchError) and "2 run(s) failed" in str(result.exception)

    bin_dir.joinpath("squeue").unlink()  # neither sacct nor squeue: nobody can tell, the wait does not start
    again = CliRunner().invoke(app, _args(small_synthetic, tmp_path / "repro2", "--wait", variants="full"))
    assert isinstance(again.exception, launch.LaunchError) and "cannot wait for 2 run(s) whose SLURM state is " \
        "unknown" in str(again.exception)
