"""`reproduce --launcher`: the sweep as submitit jobs.

The LocalExecutor tests run the real submission code and real job processes (pickling, job states, the
waiting student jobs); a fake `sbatch` on PATH checks what goes to SLURM: the dependency chain, the array
throttle and the resources.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("timm")
submitit = pytest.importorskip("submitit")

from slurm_helpers import FAKE_SACCT, FAKE_SBATCH

from kdiqa_edge.cli import app
from kdiqa_edge.train.launch import LaunchError, parse_extra, time_minutes

KILLED = "seed0/test_efficientnet-full"
PREEMPTED = "seed1/test_efficientnet-soft"


def _args(data, out, *extra):
    return ["reproduce", "--dataset", "synthetic", "--root", str(data.root), "--students", "test_efficientnet",
            "--variants", "full,soft", "--seeds", "2", "--epochs", "2", "--teacher-epochs", "1", "--teacher",
            "tiny", "--no-pretrained", "--batch-size", "32", "--out", str(out), *extra]


def _cli(args, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdiqa_edge", *args], capture_output=True, text=True,
                          check=False, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def _jobs(out: Path) -> dict:
    path = out / "jobs.json"
    return json.loads(path.read_text())["runs"] if path.is_file() else {}


def _task_pid(controller: int) -> int | None:
    """The job's task: the process LocalExecutor's controller (the job id's pid) started."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == controller:
            return int(stat.parent.name)
    return None


def _last_state(out: Path, key: str) -> Path:
    return out / key / "checkpoints" / "last" / "train_state.pt"


@pytest.fixture(scope="module")
def local_sweep(small_synthetic, tmp_path_factory):
    """2 splits x 2 variants through LocalExecutor; after its first epoch one student job is killed (as scancel
    would) and another is preempted (SIGUSR2 to its task, the signal SLURM sends before preempting)."""
    out = tmp_path_factory.mktemp("launch") / "repro"
    args = _args(small_synthetic, out, "--launcher", "submitit-local")
    # SIGINT handled here, so the sweep's processes start with it at its default: a shell that starts pytest in
    # the background (`cmd &` without job control) passes SIGINT down ignored, and the job's controller would
    # then ignore the kill below (an ignored signal stays ignored across exec; a handled one does not)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        first = subprocess.Popen([sys.executable, "-m", "kdiqa_edge", *args], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        signal.signal(signal.SIGINT, inherited)
    todo = {KILLED, PREEMPTED}
    deadline = time.monotonic() + 400
    while todo and time.monotonic() < deadline and first.poll() is None:
        for key in sorted(todo):
            if not _last_state(out, key).is_file():
                continue
            controller = int(_jobs(out)[key]["job_id"])
            if key == KILLED:
                os.kill(controller, signal.SIGINT)  # the job's controller: it kills its task, as scancel would
            else:
                task = _task_pid(controller)
                if task is None:
                    continue
                os.kill(task, signal.SIGUSR2)  # submitit's handler: checkpoint(), then requeue
            todo.discard(key)
        time.sleep(0.05)
    stdout, stderr = first.communicate(timeout=400)
    jobs_after_first = _jobs(out)
    left_by_first = {"killed_run_done": (out / KILLED / "summary.json").is_file(),
                     "preempted_run_done": (out / PREEMPTED / "summary.json").is_file(),
                     "tables": (out / "table1.md").is_file()}
    second = _cli(args)
    third = _cli(args)
    return {"out": out, "first": (first.returncode, stdout, stderr), "second": second, "third": third,
            "jobs_after_first": jobs_after_first, "left_by_first": left_by_first, "signalled": not todo}


def test_local_sweep_killed_job_fails_the_first_call(local_sweep):
    code, stdout, stderr = local_sweep["first"]
    assert code == 2, stderr
    assert f"1 run(s) failed ({KILLED}" in stderr and "re-run the same reproduce command" in stderr
    assert local_sweep["signalled"]
    assert local_sweep["left_by_first"] == {"killed_run_done": False, "preempted_run_done": True, "tables": False}
    assert "5 done, 1 failed" in stdout
    # one teacher job per split, one job per distillation, each in its own job folder
    assert len(local_sweep["jobs_after_first"]) == 6


def test_local_sweep_preempted_job_is_requeued_by_submitit_and_resumes(local_sweep):
    out, jobs = local_sweep["out"], local_sweep["jobs_after_first"]
    job = jobs[PREEMPTED]
    log = (Path(job["folder"]) / f"{job['job_id']}_0_log.out").read_text()
    errors = (Path(job["folder"]) / f"{job['job_id']}_0_log.err").read_text()
    assert "Caught signal SIGUSR2" in errors and "this job is preempted" in errors
    # the same job (its controller restarted the task after checkpoint()), not a new submission
    assert log.index(f"{PREEMPTED}: starting") < log.index(f"{PREEMPTED}: resuming")
    epochs = [line.split(",")[0] for line in (out / PREEMPTED / "metrics.csv").read_text().splitlines()[1:]]
    assert epochs == ["1", "2"]  # epoch 1 before the signal, epoch 2 after the requeue
    assert _jobs(out)[PREEMPTED]["job_id"] == job["job_id"]  # later calls did not resubmit it


def test_local_sweep_resubmits_only_the_killed_run_which_resumes(local_sweep):
    second, out = local_sweep["second"], local_sweep["out"]
    assert second.returncode == 0, second.stderr
    before, after = local_sweep["jobs_after_first"], _jobs(out)
    changed = [key for key in after if after[key]["job_id"] != before[key]["job_id"]]
    assert changed == [KILLED]
    log = Path(after[KILLED]["folder"]) / f"{after[KILLED]['job_id']}_0_log.out"
    assert f"{KILLED}: resuming" in log.read_text()
    assert "all 6 runs done: tables written" in log.read_text()  # the last job to finish collects
    epochs = [line.split(",")[0] for line in (out / KILLED / "metrics.csv").read_text().splitlines()[1:]]
    assert epochs == ["1", "2"]  # epoch 1 came from the killed job, epoch 2 from the resumed one
    results = json.loads((out / "results.json").read_text())
    rows = {row["run"]: row for row in results["rows"]}
    assert {name: row["n"] for name, row in rows.items()} == {
        "teacher": 2, "test_efficientnet-full": 2, "test_efficientnet-soft": 2}
    assert "| test_efficientnet | 2 |" in (out / "table1.md").read_text()
    assert "| test_efficientnet | soft | 2 |" in (out / "table2.md").read_text()


def test_local_sweep_third_call_submits_nothing(local_sweep):
    third, out = local_sweep["third"], local_sweep["out"]
    assert third.returncode == 0, third.stderr
    assert "nothing to submit" in third.stderr
    assert "6 done" in third.stdout and "| test_efficientnet | full | 2 |" in third.stdout
    status = _cli(["reproduce", "--out", str(out), "--status"])
    assert status.returncode == 0, status.stderr
    assert "6 done" in status.stdout and "seed1/test_efficientnet-soft" in status.stdout


def test_local_job_with_two_gpus_runs_under_torchrun_and_survives_preemption(small_synthetic, tmp_path):
    """--gpus-per-job 2: the job trains under torch.distributed.run, two processes (gloo on a CPU). Preempted
    after its first epoch, it stops torchrun, is requeued by submitit and resumes under torchrun again."""
    out = tmp_path / "repro"
    student = "seed0/test_efficientnet-full"
    args = ["reproduce", "--dataset", "synthetic", "--root", str(small_synthetic.root), "--students",
            "test_efficientnet", "--variants", "full", "--seeds", "1", "--epochs", "2", "--teacher-epochs", "1",
            "--teacher", "tiny", "--no-pretrained", "--batch-size", "32", "--out", str(out),
            "--launcher", "submitit-local", "--gpus-per-job", "2"]
    run = subprocess.Popen([sys.executable, "-m", "kdiqa_edge", *args], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline, signalled = time.monotonic() + 400, False
    while not signalled and time.monotonic() < deadline and run.poll() is None:
        if _last_state(out, student).is_file():
            task = _task_pid(int(_jobs(out)[student]["job_id"]))
            if task is not None:
                os.kill(task, signal.SIGUSR2)
                signalled = True
        time.sleep(0.05)
    stdout, stderr = run.communicate(timeout=400)
    assert run.returncode == 0, stderr
    assert signalled and "2 done" in stdout
    for key in ("seed0/teacher", student):
        job = _jobs(out)[key]
        log = (Path(job["folder"]) / f"{job['job_id']}_0_log.out").read_text()
        assert "-m torch.distributed.run --standalone --nproc-per-node=2" in log
        assert json.loads((out / key / "summary.json").read_text())["world_size"] == 2
    job = _jobs(out)[student]
    log = (Path(job["folder"]) / f"{job['job_id']}_0_log.out").read_text()
    assert "this job is preempted" in (Path(job["folder"]) / f"{job['job_id']}_0_log.err").read_text()
    assert "stopping torchrun" in log and "SIGTERM" in log  # its workers stopped before the requeue
    assert log.count("-m torch.distributed.run") == 2 and f"{student}: resuming" in log  # requeued, resumed
    epochs = [line.split(",")[0] for line in (out / student / "metrics.csv").read_text().splitlines()[1:]]
    assert epochs == ["1", "2"]
    assert (out / "table1.md").is_file()


def test_a_stopped_torchrun_gets_sigterm_first_then_sigkill_after_the_grace(tmp_path):
    """What a preempted job does to its torchrun before the requeue: SIGTERM (torchrun stops its workers on it)
    and a wait; SIGKILL only when it does not exit within the grace."""
    from kdiqa_edge.train.launch import _stop

    marker = tmp_path / "terminated"
    polite = subprocess.Popen([sys.executable, "-c", (
        "import pathlib, signal, sys, time\n"
        f"signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path({str(marker)!r}).write_text('1'), sys.exit(3)))\n"
        "print('ready', flush=True)\ntime.sleep(60)")], stdout=subprocess.PIPE, text=True)
    assert polite.stdout.readline().strip() == "ready"
    _stop(polite, grace_s=30)
    assert polite.returncode == 3 and marker.read_text() == "1"  # it handled SIGTERM and exited by itself
    stubborn = subprocess.Popen([sys.executable, "-c", (
        "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\n"
        "time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    assert stubborn.stdout.readline().strip() == "ready"
    start = time.monotonic()
    _stop(stubborn, grace_s=0.5)
    assert stubborn.returncode == -signal.SIGKILL and time.monotonic() - start < 10


# ---------------------------------------------------------------- a fake SLURM



@pytest.fixture()
def fake_slurm(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {"sbatch": FAKE_SBATCH, "sacct": FAKE_SACCT, "srun": "#!/bin/bash\nexit 0\n"}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


def _sbatch_flags(path: Path) -> dict[str, str]:
    flags = {}
    for line in path.read_text().splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            flags[key] = value
    return flags


SLURM_OPTIONS = ["--launcher", "slurm", "--partition", "gpu", "--gpus-per-job", "2", "--cpus-per-job", "8",
                 "--mem", "32G", "--time", "2:00:00", "--max-parallel", "1", "--account", "lab", "--qos", "high",
                 "--slurm-extra", "constraint=a100"]


def test_slurm_submission_dependency_chain_throttle_and_resources(fake_slurm, small_synthetic, tmp_path):
    runner = CliRunner()
    out = tmp_path / "repro"
    result = runner.invoke(app, _args(small_synthetic, out, *SLURM_OPTIONS))
    assert result.exit_code == 0, result.output
    scripts = {n: _sbatch_flags(fake_slurm / f"sbatch.{n}") for n in range(1, 5)}
    assert not (fake_slurm / "sbatch.5").exists()  # 2 teachers + 2 arrays
    teacher0, students0, teacher1, students1 = (scripts[n] for n in range(1, 5))
    assert not {"dependency", "array"} & (set(teacher0) | set(teacher1))
    assert students0["dependency"] == "afterok:1" and students1["dependency"] == "afterok:3"
    assert students0["array"] == "0-1%1"  # 2 distillations, --max-parallel 1
    for flags in scripts.values():
        assert (flags["partition"], flags["gpus-per-node"], flags["cpus-per-task"], flags["mem"], flags["time"],
                flags["account"], flags["qos"], flags["constraint"], flags["kill-on-invalid-dep"]) == (
            "gpu", "2", "8", "32G", "120", "lab", "high", "a100", "yes")
    jobs = _jobs(out)
    assert {k: v["job_id"] for k, v in jobs.items()} == {
        "seed0/teacher": "1", "seed0/test_efficientnet-full": "2_0", "seed0/test_efficientnet-soft": "2_1",
        "seed1/teacher": "3", "seed1/test_efficientnet-full": "4_0", "seed1/test_efficientnet-soft": "4_1"}
    # what runs on the node: the run, its --out, 2 GPUs -> torchrun
    pickled = submitit.core.utils.DelayedSubmission.load(
        Path(jobs["seed0/test_efficientnet-soft"]["folder"]) / "2_1_submitted.pkl")
    assert (pickled.function.key, pickled.function.out, pickled.function.gpus) == (
        "seed0/test_efficientnet-soft", str(out), 2)
    assert hasattr(pickled.function, "checkpoint")  # submitit requeues it on preemption

    # queued and running jobs are never submitted again
    (fake_slurm / "states").write_text("1|RUNNING|n1\n2_[0-1]|PENDING|\n3|RUNNING|n2\n4_0|RUNNING|n3\n"
                                       "4_1|PENDING|\n")
    again = runner.invoke(app, _args(small_synthetic, out, *SLURM_OPTIONS))
    assert again.exit_code == 0, again.output
    assert "nothing to submit" in again.output and not (fake_slurm / "sbatch.5").exists()

    # a failed teacher: SLURM cancels its students (kill-on-invalid-dep); the next call resubmits that split
    (fake_slurm / "states").write_text("1|RUNNING|n1\n2_[0-1]|PENDING|\n3|FAILED|n2\n4_0|CANCELLED by 0|\n"
                                       "4_1|CANCELLED by 0|\n")
    status = runner.invoke(app, ["reproduce", "--out", str(out), "--status"])
    assert status.exit_code == 0, status.output
    assert "2 queued, 1 running, 3 failed" in status.output
    resubmit = runner.invoke(app, _args(small_synthetic, out, *SLURM_OPTIONS))
    assert resubmit.exit_code == 0, resubmit.output
    assert _sbatch_flags(fake_slurm / "sbatch.6")["dependency"] == "afterok:5"
    assert not (fake_slurm / "sbatch.7").exists()
    jobs = _jobs(out)
    assert [jobs[k]["job_id"] for k in sorted(jobs)] == ["1", "2_0", "2_1", "5", "6_0", "6_1"]


def test_slurm_bad_input_is_one_line(fake_slurm, small_synthetic, tmp_path, monkeypatch):
    out = tmp_path / "repro"
    refused = _cli(_args(small_synthetic, out, *SLURM_OPTIONS[:-2], "--partition", "nope"))
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [(
        "error: sbatch refused the job: sbatch: error: invalid partition specified: nope / "
        "sbatch: error: Batch job submission failed: Invalid partition name specified")]
    runner = CliRunner()
    other = runner.invoke(app, _args(small_synthetic, out, *SLURM_OPTIONS[:-2]) + ["--epochs", "3"])
    assert isinstance(other.exception, Exception) and "written by another plan" in str(other.exception)
    assert "epochs" in str(other.exception)
    monkeypatch.setenv("PATH", "/nonexistent")
    missing = runner.invoke(app, _args(small_synthetic, tmp_path / "fresh", *SLURM_OPTIONS))
    assert isinstance(missing.exception, LaunchError)
    assert "--launcher slurm needs sbatch on PATH" in str(missing.exception)


def test_slurm_option_parsing():
    assert [time_minutes(t) for t in ("90", "90:30", "2:00:00", "1-00:00", "1-2")] == [
        90, 91, 120, 1440, 1560]
    assert parse_extra(["constraint=a100", "--exclusive=user"]) == {"constraint": "a100", "exclusive": "user"}
    with pytest.raises(Exception, match="KEY=VALUE"):
        parse_extra(["constraint"])


def test_slurm_example_parses_and_its_dry_run_prints_the_job_graph(small_synthetic, tmp_path):
    script = Path(__file__).resolve().parents[1] / "examples" / "slurm_reproduce.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DRY_RUN": "1", "DATASET": "synthetic", "SEEDS": "2", "MAX_PARALLEL": "3", "OUT": str(tmp_path / "o"),
           "EXTRA": "--students test_efficientnet --teacher tiny --no-pretrained --epochs 1 --batch-size 8"}
    done = subprocess.run(["bash", str(script), str(small_synthetic.root)], capture_output=True, text=True,
                          check=False, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert "seed1-students: 4 run(s)" in done.stdout and "after seed1-teacher (afterok)" in done.stdout
    assert "--array=0-3%3" in done.stdout and "--partition=gpu" in done.stdout and "--time=720" in done.stdout
    assert "10 of 10 runs to do" in done.stdout
    assert not (tmp_path / "o").exists()  # a dry run writes nothing
