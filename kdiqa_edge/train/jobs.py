"""Where each planned run's job is: OUT/jobs.json (the job recorded for each run, written atomically, folders
absolute) and the scheduler's state of each job (`run_states`), for a re-run of `reproduce` (what to submit
again), `--status` and `--wait`.

SLURM states come from sacct, parsed as submitit does, and from squeue for the jobs sacct does not list (it is
missing, accounting is off, or it lags right after a submission): a job squeue no longer lists has ended.
Where neither answers, the state is UNKNOWN, and one line says why. A submitit-local job's state is its
controller process's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdiqa_edge.errors import require
from kdiqa_edge.io import read_json, write_json

JOBS_FILE = "jobs.json"
JOBS_DIR = "jobs"
# SLURM states of a job that will still run (queued) or runs now; every other state has ended
QUEUED = {"PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "CONFIGURING", "SUSPENDED", "RESV_DEL_HOLD",
          "READY"}
RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "RESIZING", "SIGNALING"}
UNKNOWN = "UNKNOWN"  # neither sacct nor squeue answered for the job: it may still be queued or running
LEFT_QUEUE = "ENDED"  # sacct does not list the job and squeue no longer does: it has ended


def run_key(out: Path, run) -> str:
    return run.run_dir.relative_to(out).as_posix()


def job_folder(out: Path, job_id: str = "%j") -> Path:
    return out / JOBS_DIR / job_id


def read_jobs(out: Path) -> dict[str, dict]:
    """OUT/jobs.json's records, each job's folder absolute (an older file holds `<--out as given>/jobs/<id>`,
    relative to wherever that command ran: it is OUT/jobs/<id>)."""
    path = Path(out) / JOBS_FILE
    jobs = read_json(path).get("runs", {}) if path.is_file() else {}
    for job in jobs.values():
        if not Path(job["folder"]).is_absolute():
            job["folder"] = str(job_folder(Path(out).absolute(), job["job_id"]))
    return jobs


def write_jobs(out: Path, jobs: dict[str, dict]) -> None:
    write_json(out / JOBS_FILE, {"runs": jobs})


def local_state(job_id: str, folder: Path) -> str:
    """A LocalExecutor job seen from any process: its id is the controller's pid."""
    from submitit.core.utils import JobPaths

    if JobPaths(folder, job_id).result_pickle.exists():
        return "FINISHED"
    try:
        with open(f"/proc/{int(job_id)}/stat") as handle:  # a zombie has exited
            return "ENDED" if handle.read().rsplit(")", 1)[1].split()[0] == "Z" else "RUNNING"
    except (FileNotFoundError, ValueError):
        pass
    try:
        os.kill(int(job_id), 0)
    except (ProcessLookupError, ValueError):
        return "ENDED"
    except PermissionError:
        pass
    return "RUNNING"


def _query(command: list[str]) -> tuple[str | None, str]:
    """A SLURM query's output, or None and why it gave none ("sacct not found", "sacct failed: <error>")."""
    if shutil.which(command[0]) is None:
        return None, f"{command[0]} not found"
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"{command[0]} failed: {exc}"
    if done.returncode and command[0] == "squeue" and "Invalid job id" in done.stderr:
        return "", ""  # squeue -j with one id that has left the queue: an error, though it answers
    if done.returncode:
        error = next((line.strip() for line in done.stderr.splitlines() if line.strip()), "")
        return None, f"{command[0]} failed: {error or f'exit code {done.returncode}'}"
    return done.stdout, ""


def slurm_states(job_ids: list[str], log: Callable[[str], None] = print) -> dict[str, str]:
    """The SLURM state of each job id (an array task as <id>_<task>).

    sacct, read by submitit's parser, as submitit's own watcher does; for the jobs it does not list (sacct
    missing, accounting off, or lagging right after a submission) squeue, which lists the jobs that are queued
    or running: one it does not list has ended (LEFT_QUEUE). Where neither answers the state is UNKNOWN, and
    one line to `log` says why. submitit itself would warn on every call and call such a job pending."""
    watcher = require("submitit.slurm.slurm", "cluster").SlurmInfoWatcher()

    def arrays(ids):
        return ",".join(sorted({i.split("_")[0] for i in ids}))

    sacct = ["sacct", "-o", "JobID,State,NodeList", "--parsable2", "-j", arrays(job_ids)]  # submitit's query
    output, sacct_error = _query(sacct)
    listed = {k: v.get("State", "") for k, v in watcher.read_info(output).items()} if output else {}
    states = {i: listed[i].split()[0].upper() for i in job_ids if listed.get(i, "").strip()}
    missing = [i for i in job_ids if i not in states]
    if not missing:
        return states
    output, squeue_error = _query(["squeue", "-h", "-r", "-o", "%i %T", "-j", arrays(missing)])
    if output is not None:
        queue = dict(line.split()[:2] for line in output.splitlines() if len(line.split()) >= 2)
        if sacct_error:
            log(f"{sacct_error}: job states from squeue (a job it does not list has ended)")
        return {**states, **{i: queue.get(i, LEFT_QUEUE).upper() for i in missing}}
    why = sacct_error or f"sacct does not list job(s) {', '.join(missing)} yet"
    log(f"{why}: SLURM job states unknown ({squeue_error})")
    return {**states, **dict.fromkeys(missing, UNKNOWN)}


def remove_placeholder_folder(out: Path) -> None:
    """submitit's local job controller creates its folder pattern literally, OUT/jobs/%j (left empty)."""
    with contextlib.suppress(OSError):
        (Path(out) / JOBS_DIR / "%j").rmdir()


def sweep_placeholder_in_job() -> None:
    """In a running job: remove the literal jobs/%j folder that submitit's local controller made just before it
    started this job (so a local run leaves none behind; under SLURM there is none)."""
    import submitit

    with contextlib.suppress(RuntimeError):  # not inside a submitit job (a direct call)
        remove_placeholder_folder(Path(submitit.JobEnvironment().paths.folder).parent.parent)


def run_states(out: Path, runs: list, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """done / queued / running / unknown / failed / todo for every planned run, with its job id and its log
    (absolute). `log` gets the line saying why SLURM states are inferred or unknown, if they are."""
    jobs = read_jobs(out)
    remove_placeholder_folder(out)
    pending = {run_key(out, r): jobs[run_key(out, r)] for r in runs if not r.done and run_key(out, r) in jobs}
    slurm_ids = [j["job_id"] for j in pending.values() if j["launcher"] == "slurm"]
    slurm = slurm_states(slurm_ids, log) if slurm_ids else {}
    rows = []
    for run in runs:
        key = run_key(out, run)
        job = jobs.get(key)
        row = {"run": key, "seed": run.seed, "name": run.name, "job_id": job and job["job_id"],
               "log": str(Path(job["folder"]) / f"{job['job_id']}_0_log.out") if job else None}
        if run.done:
            row["state"] = "done"
        elif job is None:
            row["state"] = "todo"
        else:
            raw = (slurm[job["job_id"]] if job["launcher"] == "slurm"
                   else local_state(job["job_id"], Path(job["folder"])))
            row["scheduler_state"] = raw
            row["state"] = ("queued" if raw in QUEUED else "running" if raw in RUNNING
                            else "unknown" if raw == UNKNOWN else "failed")
        rows.append(row)
    return rows
