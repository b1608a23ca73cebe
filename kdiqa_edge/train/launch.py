"""`reproduce` on a scheduler: the plan's runs as submitit jobs (SLURM, or local processes for a rehearsal).

Job graph, per split (seed):
    seed<k> teacher       one job (the teacher fine-tune of split k)
    seed<k> students      one job array, one task per distillation, throttled by --max-parallel;
                          it starts after the teacher job succeeded (sbatch --dependency=afterok:<teacher>)

Every job trains in the same run dir as `--launcher local`, so a finished run is skipped and an interrupted
one resumes from its last epoch checkpoint. Jobs are submitit Checkpointables: a preempted or timed-out SLURM
job is requeued by submitit and resumes the same way.

The job ids go in OUT/jobs.json (written atomically, absolute paths), the logs in OUT/jobs/<job id>/. A re-run
asks the scheduler for the state of each recorded job (sacct, parsed as submitit does; squeue for the jobs
sacct does not list, or where it is missing or accounting is off) and submits only the runs that are neither
done nor queued nor running. A run whose job neither answers for is `unknown`: it may still be queued or
running, so it is resubmitted only when asked (`resubmit_unknown`, the CLI's --resubmit-unknown).

submitit's LocalExecutor (`--launcher submitit-local`) has no dependencies, so there a student job itself
waits for its teacher: it polls the teacher's run dir and the teacher job's process, and fails if the teacher
job ended without finishing its run (afterok, done by the job instead of the scheduler). The submission code
is the same for both executors; --max-parallel applies to SLURM arrays only (local jobs all start at once).

`distill --feature-tasks N` uses the same machinery: the unlabeled teacher features as one array of N
`FeatureJob`s, and with --then-train the training as one `TrainJob` after it (afterok on the array, or the
job waiting for the tasks under submitit-local), all recorded in OUT/jobs.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdiqa_edge.errors import ConfigError, KdiqaError, require
from kdiqa_edge.train.jobs import (
    job_folder,
    local_state,
    read_jobs,
    run_key,
    run_states,
    sweep_placeholder_in_job,
    write_jobs,
)
from kdiqa_edge.train.state import run_finished

LAUNCHERS = ("local", "slurm", "submitit-local")


class LaunchError(KdiqaError):
    """The scheduler is missing, refused a job, or a submitted run failed."""


@dataclasses.dataclass
class SlurmOptions:
    partition: str | None = None  # sbatch --partition
    gpus_per_job: int = 1  # GPUs of one job; more than one runs the training under torchrun (DDP)
    cpus_per_job: int | None = None  # sbatch --cpus-per-task (data loading workers live here)
    mem: str | None = None  # sbatch --mem, e.g. 64G
    time: str = "24:00:00"  # wall time of one job: minutes, HH:MM:SS or D-HH:MM:SS
    max_parallel: int = 16  # array throttle: distillations of one split running at once (sbatch --array=...%N)
    account: str | None = None  # sbatch --account
    qos: str | None = None  # sbatch --qos
    extra: dict = dataclasses.field(default_factory=dict)  # any other sbatch option, KEY -> VALUE


def parse_extra(items: list[str]) -> dict[str, str]:
    extra = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--slurm-extra takes KEY=VALUE (an sbatch option without --), got {item!r}")
        extra[key.strip().lstrip("-")] = value.strip()
    return extra


def time_minutes(text: str) -> int:
    """sbatch's time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in whole minutes, rounded up."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise ConfigError(f"--time must be minutes, HH:MM:SS or D-HH:MM:SS, got {text!r}")
    days, a, b, c = (int(g) if g else 0 for g in match.groups())
    if match.group(1) is not None:  # D-H[:M[:S]]
        seconds = days * 86400 + a * 3600 + b * 60 + c
    elif match.group(4) is not None:  # H:M:S
        seconds = a * 3600 + b * 60 + c
    else:  # M[:S]
        seconds = a * 60 + b
    return max(1, -(-seconds // 60))


def sbatch_parameters(opts: SlurmOptions, name: str, dependency: str | None = None) -> dict[str, Any]:
    """SlurmExecutor.update_parameters() keyword arguments for one job (or array) of the graph."""
    if opts.max_parallel < 1 or opts.gpus_per_job < 0:
        raise ConfigError("--max-parallel must be at least 1 and --gpus-per-job at least 0")
    params: dict[str, Any] = {
        "job_name": name, "time": time_minutes(opts.time), "partition": opts.partition,
        "gpus_per_node": opts.gpus_per_job or None, "cpus_per_task": opts.cpus_per_job, "mem": opts.mem,
        "account": opts.account, "qos": opts.qos, "array_parallelism": opts.max_parallel,
        "dependency": dependency,
        # a student whose teacher failed is cancelled (then resubmitted by the next call), not left pending
        "additional_parameters": {"kill-on-invalid-dep": "yes", **opts.extra},
    }
    return {k: v for k, v in params.items() if v is not None}


# ---------------------------------------------------------------- the job itself

@dataclasses.dataclass
class RunJob:
    """One planned run, as a submitit job. Picklable: the job reads the plan back from OUT/reproduce.json.

    submitit treats any callable with a `checkpoint` method as a Checkpointable: on preemption or timeout it
    pickles the DelayedSubmission returned here and requeues the job, which then resumes from the run dir.
    """

    out: str
    key: str  # the run dir relative to out, e.g. seed0/resnet18-full
    gpus: int = 1  # more than one: the training runs under torchrun, one process per GPU
    after: dict | None = None  # submitit-local only: the teacher job to wait for {job_id, folder, run_dir}

    def __call__(self) -> str:
        sweep_placeholder_in_job()
        if self.after:
            _wait_for_teacher(self.after)
        if self.gpus > 1:
            _torchrun(self.out, self.key, self.gpus)
        else:
            run_planned(self.out, self.key)
        return self.key

    def checkpoint(self):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self)


@dataclasses.dataclass
class FeatureJob:
    """One array task of `distill --feature-tasks N`: its share of the unlabeled teacher-feature shards.

    Finished shards are on disk, so a requeued (preempted) task computes only what it had left."""

    config: dict  # the DistillConfig, as its fields
    dataset: dict  # the DatasetSpec, absolute paths
    task: int
    tasks: int

    def __call__(self) -> list[str]:
        sweep_placeholder_in_job()
        from kdiqa_edge.data.spec import DatasetSpec
        from kdiqa_edge.train.distill import DistillConfig
        from kdiqa_edge.train.mixed import unlabeled_feature_task

        return unlabeled_feature_task(DistillConfig(**self.config), DatasetSpec.from_dict(self.dataset),
                                      self.task, self.tasks)

    def checkpoint(self):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self)


def submit_features(cfg, data, out: Path, launcher: str, opts: SlurmOptions, tasks: int,
                    log: Callable[[str], None] = print) -> list:
    """Submit the unlabeled feature work as one array of `tasks` jobs (SLURM: --array=0-N%max_parallel);
    their ids go in OUT/jobs.json under `features/<task>`. Returns the jobs."""
    from kdiqa_edge.config import to_dict
    from kdiqa_edge.data.readers import absolute_spec

    if tasks < 1:
        raise ConfigError("--feature-tasks must be at least 1")
    if launcher == "slurm":
        _check_slurm()
    out = Path(out).absolute()
    config = {**to_dict(cfg), "progress": False}
    dataset = absolute_spec(data).to_dict()
    executor = _executor(launcher, out, opts, "kdiqa-features")
    jobs = _submit(executor, [FeatureJob(config, dataset, task, tasks) for task in range(tasks)])
    recorded = read_jobs(out)
    for task, job in enumerate(jobs):
        recorded[f"features/{task}"] = _record(launcher, out, job.job_id)
    write_jobs(out, recorded)
    log(f"unlabeled features: submitted {tasks} task(s) as job(s) {', '.join(j.job_id for j in jobs)}")
    return jobs


@dataclasses.dataclass
class TrainJob:
    """`distill --feature-tasks N --then-train`: the training on the feature array's shards, one job that
    starts when every feature task has succeeded (SLURM: afterok on the array; submitit-local: this job waits
    for the tasks itself, as reproduce's students wait for their teacher). Requeued, it resumes the run."""

    config: dict  # the DistillConfig, as its fields
    dataset: dict  # the DatasetSpec, absolute paths
    out: str  # the run dir (beside OUT/jobs.json)
    after: list | None = None  # submitit-local only: the feature tasks to wait for, [{job_id, folder}]

    def __call__(self) -> dict:
        sweep_placeholder_in_job()
        from kdiqa_edge.data.spec import DatasetSpec
        from kdiqa_edge.train.distill import DistillConfig, run_distill
        from kdiqa_edge.train.state import recover_last, run_interrupted

        if self.after:
            _wait_for_features(self.after)
        out = Path(self.out)
        recover_last(out)  # a save a kill cut short: the run is then interrupted, not new
        return run_distill(DistillConfig(**self.config), DatasetSpec.from_dict(self.dataset), out,
                           resume=run_interrupted(out) or run_finished(out))

    def checkpoint(self):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self)


def submit_training(cfg, data, out: Path, launcher: str, opts: SlurmOptions, feature_jobs: list,
                    log: Callable[[str], None] = print):
    """Submit the training after `feature_jobs` (submit_features' array): its id goes in OUT/jobs.json under
    `train`. SLURM runs it after the whole array succeeded (`afterok:<array id>`) and cancels it if a task
    failed (kill-on-invalid-dep). Returns the job."""
    from kdiqa_edge.config import to_dict
    from kdiqa_edge.data.readers import absolute_spec

    out = Path(out).absolute()
    array_id = str(feature_jobs[0].job_id).split("_")[0]  # an array's tasks are <array id>_<task>
    dependency = f"afterok:{array_id}" if launcher == "slurm" else None
    after = ([{"job_id": str(j.job_id), "folder": str(job_folder(out, str(j.job_id)))} for j in feature_jobs]
             if launcher == "submitit-local" else None)
    executor = _executor(launcher, out, opts, "kdiqa-distill", dependency)
    [job] = _submit(executor, [TrainJob({**to_dict(cfg), "progress": False}, absolute_spec(data).to_dict(),
                                        str(out), after)])
    recorded = read_jobs(out)
    recorded["train"] = _record(launcher, out, job.job_id)
    write_jobs(out, recorded)
    waits_on = f"array {array_id}" if dependency else ", ".join(str(j.job_id) for j in feature_jobs)
    log(f"training: submitted job {job.job_id}, to start when the feature task(s) {waits_on} succeeded")
    return job


def _wait_for_features(after: list, poll_s: float = 1.0) -> None:
    """afterok, done by the job: every feature task ended, and each one succeeded."""
    import pickle

    from submitit.core.utils import JobPaths

    for task in after:
        while (state := local_state(task["job_id"], Path(task["folder"]))) == "RUNNING":
            time.sleep(poll_s)
        outcome = None
        if state == "FINISHED":
            with open(JobPaths(Path(task["folder"]), task["job_id"]).result_pickle, "rb") as handle:
                outcome = pickle.load(handle)[0]
        if outcome != "success":
            raise LaunchError(f"feature task job {task['job_id']} did not succeed: not training (its log is in "
                              f"{task['folder']})")


def run_planned(out: str | Path, key: str, log: Callable[[str], None] = print) -> None:
    """Run (or resume, or skip) one run of the plan recorded in `out`; the last run to finish writes the tables."""
    from kdiqa_edge.train.reproduce import load_plan, plan, run_one, write_tables

    out = Path(out)
    cfg, data = load_plan(out)
    runs = plan(cfg, out)
    run = next((r for r in runs if run_key(out, r) == key), None)
    if run is None:
        raise LaunchError(f"{key} is not a run of the plan in {out}")
    if run.done:
        log(f"{key}: done, skipped")
    else:
        log(f"{key}: {'resuming' if run.interrupted else 'starting'} -> {run.run_dir}")
        run_one(cfg, data, out, run)
    if int(os.environ.get("RANK", "0")) == 0 and all(r.done for r in runs):
        write_tables(runs, data, out)
        log(f"all {len(runs)} runs done: tables written to {out}")


def _torchrun(out: str, key: str, gpus: int) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
               "-m", "kdiqa_edge.train.launch", out, key]
    print(" ".join(command), flush=True)
    agent = subprocess.Popen(command)
    try:
        code = agent.wait()
    except BaseException:  # preempted (submitit's checkpoint handler exits) or cancelled: stop the workers first
        _stop(agent)
        raise
    if code:
        raise subprocess.CalledProcessError(code, command)


def _stop(agent: subprocess.Popen, grace_s: float = 60.0) -> None:
    """SIGTERM to torchrun, which passes it to its workers and waits for them; SIGKILL after `grace_s`.

    A requeued job must not start while the old workers still write the run dir's checkpoints."""
    if agent.poll() is not None:
        return
    print(f"stopping torchrun (pid {agent.pid}): SIGTERM, then up to {grace_s:.0f} s for its workers", flush=True)
    agent.terminate()
    try:
        agent.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        agent.kill()
        agent.wait()


def _wait_for_teacher(after: dict, poll_s: float = 1.0) -> None:
    while not run_finished(Path(after["run_dir"])):
        if local_state(after["job_id"], Path(after["folder"])) != "RUNNING":
            if run_finished(Path(after["run_dir"])):
                return
            raise LaunchError(f"teacher job {after['job_id']} ended without finishing {after['run_dir']}")
        time.sleep(poll_s)


# ---------------------------------------------------------------- submission

def _check_slurm() -> None:
    for tool in ("sbatch", "srun"):  # submitit's SlurmExecutor needs srun on PATH too
        if shutil.which(tool) is None:
            raise LaunchError(f"--launcher slurm needs {tool} on PATH (not found): run on the cluster's login "
                              "node, or use --launcher local")


def _executor(launcher: str, out: Path, opts: SlurmOptions, name: str, dependency: str | None = None):
    submitit = require("submitit", "cluster")
    folder = job_folder(out)
    if launcher == "submitit-local":
        executor = submitit.LocalExecutor(folder)
        executor.update_parameters(timeout_min=time_minutes(opts.time), gpus_per_node=opts.gpus_per_job)
        return executor
    executor = submitit.SlurmExecutor(folder)
    executor.update_parameters(**sbatch_parameters(opts, name, dependency))
    return executor


def _submit(executor, jobs_fn: list[RunJob]) -> list:
    """One job, or one array (SLURM: --array=0-N%max_parallel) for several; sbatch's refusal is one line."""
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    from kdiqa_edge.console import quiet_logger

    echoed = io.StringIO()  # submitit prints sbatch's stderr on a failure; it goes into our one line instead
    try:
        with quiet_logger("submitit"), contextlib.redirect_stderr(echoed), executor.batch():
            jobs = [executor.submit(fn) for fn in jobs_fn]
    except (FailedJobError, FailedSubmissionError, subprocess.CalledProcessError) as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        raise LaunchError(f"sbatch refused the job: {' / '.join(lines) or exc}") from None
    return jobs


def _submissions(out: Path, runs: list, states: dict[str, dict], resubmit_unknown: bool) -> list[dict]:
    """What submit_plan submits, per split: {seed, teacher (the run to submit, or None), students (the runs to
    submit), waits_on (the job id of the split's teacher when it is not submitted but not done either)}.

    A run is submitted when it has no job yet (todo) or its job ended without finishing it (failed); one whose
    job's state is unknown only with `resubmit_unknown` (it may still be queued or running)."""
    redo = {"todo", "failed"} | ({"unknown"} if resubmit_unknown else set())
    splits = []
    for seed in sorted({r.seed for r in runs}):
        teacher = next((r for r in runs if r.seed == seed and r.stage == "teacher"), None)
        students = [r for r in runs if r.seed == seed and r.stage == "distill"
                    and states[run_key(out, r)]["state"] in redo]
        submit_teacher = teacher is not None and states[run_key(out, teacher)]["state"] in redo
        waiting = teacher is not None and not submit_teacher and not teacher.done
        waits_on = states[run_key(out, teacher)]["job_id"] if waiting else None
        if submit_teacher or students:
            splits.append({"seed": seed, "teacher": teacher if submit_teacher else None, "students": students,
                           "waits_on": waits_on})
    return splits


def _skipped(states: dict[str, dict], resubmit_unknown: bool) -> dict[str, list[str]]:
    """The runs not submitted although not done, by state: queued, running (and unknown)."""
    kept = ("queued", "running") + (() if resubmit_unknown else ("unknown",))
    return {state: [f"{k} (job {row['job_id']})" for k, row in states.items() if row["state"] == state]
            for state in kept}


def report_skipped(skipped: dict[str, list[str]], log: Callable[[str], None], names: bool = True) -> None:
    """One line per state of the runs left alone: each run and its job (`names`), else how many."""
    def runs(state):
        return ", ".join(skipped[state]) if names else f"{len(skipped[state])} run(s)"

    for state in ("queued", "running"):
        if skipped[state]:
            log(f"already {state}, not submitted again: {runs(state)}")
    if skipped.get("unknown"):
        log(f"state unknown, not submitted again: {runs('unknown')} (they may still be queued or running); "
            "once squeue no longer lists them, re-run with --resubmit-unknown")


def submit_plan(cfg, data, out: Path, launcher: str, opts: SlurmOptions, log: Callable[[str], None] = print,
                resubmit_unknown: bool = False) -> list:
    """Submit every run that is neither done nor queued nor running (nor unknown, unless `resubmit_unknown`);
    returns the submitted jobs. Paths in the jobs and in OUT/jobs.json are absolute."""
    from kdiqa_edge.train.reproduce import plan, record_plan

    if launcher not in LAUNCHERS[1:]:
        raise ConfigError(f"unknown launcher {launcher!r} (one of {', '.join(LAUNCHERS)})")
    if launcher == "slurm":
        _check_slurm()
    out = Path(out).absolute()  # the jobs, and a later --status, may run from another folder
    runs = plan(cfg, out)
    record_plan(cfg, data, out)
    states = {row["run"]: row for row in run_states(out, runs, log)}
    records = read_jobs(out)
    submitted = []
    for split in _submissions(out, runs, states, resubmit_unknown):
        seed, teacher, todo, waits_on = (split[k] for k in ("seed", "teacher", "students", "waits_on"))
        if teacher is not None:
            executor = _executor(launcher, out, opts, f"kdiqa-seed{seed}-teacher")
            [teacher_job] = _submit(executor, [RunJob(str(out), run_key(out, teacher), opts.gpus_per_job)])
            records[run_key(out, teacher)] = _record(launcher, out, teacher_job.job_id)
            write_jobs(out, records)
            submitted.append(teacher_job)
            waits_on = teacher_job.job_id
            log(f"seed {seed} teacher: submitted job {teacher_job.job_id}")
        if not todo:
            continue
        teacher_run = next(r for r in runs if r.seed == seed and r.stage == "teacher") if waits_on else None
        dependency = f"afterok:{waits_on}" if waits_on and launcher == "slurm" else None
        after = ({"job_id": waits_on, "folder": str(job_folder(out, waits_on)),
                  "run_dir": str(teacher_run.run_dir)} if waits_on and launcher == "submitit-local" else None)
        executor = _executor(launcher, out, opts, f"kdiqa-seed{seed}-students", dependency)
        jobs = _submit(executor, [RunJob(str(out), run_key(out, r), opts.gpus_per_job, after) for r in todo])
        for run, job in zip(todo, jobs):
            records[run_key(out, run)] = _record(launcher, out, job.job_id)
        write_jobs(out, records)
        submitted.extend(jobs)
        log(f"seed {seed} students: submitted {len(jobs)} run(s) as job(s) {', '.join(j.job_id for j in jobs)}"
            + (f", after {waits_on}" if waits_on else ""))
    skipped = _skipped(states, resubmit_unknown)
    report_skipped(skipped, log, names=False)
    if not submitted:
        left = "done, queued, running or unknown" if skipped.get("unknown") else "done, queued or running"
        log(f"nothing to submit: every run is {left}")
    return submitted


def _record(launcher: str, out: Path, job_id: str) -> dict[str, str]:
    folder = job_folder(Path(out).absolute(), str(job_id))
    return {"launcher": launcher, "job_id": str(job_id), "folder": str(folder),
            "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")}


def job_graph(cfg, out: Path, opts: SlurmOptions, resubmit_unknown: bool = False,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """What submit_plan would submit now, for --dry-run, from the same run states: `jobs`, one entry per
    sbatch call with its parameters; `runs`, the runs it would submit; `skipped`, the runs it would leave
    alone as queued, running (or unknown), by state."""
    from kdiqa_edge.train.reproduce import plan

    runs = plan(cfg, Path(out))
    states = {row["run"]: row for row in run_states(Path(out), runs, log)}
    graph, submitted = [], []
    for split in _submissions(Path(out), runs, states, resubmit_unknown):
        seed, teacher, students, waits_on = (split[k] for k in ("seed", "teacher", "students", "waits_on"))
        if teacher:
            graph.append({"job": f"seed{seed}-teacher", "runs": ["teacher"], "after": None,
                          "sbatch": sbatch_parameters(opts, f"kdiqa-seed{seed}-teacher")})
        after = f"seed{seed}-teacher" if teacher else (f"job {waits_on}" if waits_on else None)
        if students:
            params = sbatch_parameters(opts, f"kdiqa-seed{seed}-students", (
                f"afterok:<seed{seed}-teacher>" if teacher else f"afterok:{waits_on}" if waits_on else None))
            if len(students) > 1:
                params["array"] = f"0-{len(students) - 1}%{min(len(students), opts.max_parallel)}"
            graph.append({"job": f"seed{seed}-students", "runs": [r.name for r in students], "after": after,
                          "sbatch": params})
        submitted += ([teacher] if teacher else []) + students
    return {"jobs": graph, "runs": submitted, "skipped": _skipped(states, resubmit_unknown)}


if __name__ == "__main__":  # one run under torchrun: python -m kdiqa_edge.train.launch OUT KEY
    run_planned(sys.argv[1], sys.argv[2])
