"""`kdiqa-edge reproduce`: the paper's protocol, Tables I and II beside the published figures."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kdiqa_edge.cli.options import Logger, MlflowUri, dataset_options
from kdiqa_edge.data.spec import DatasetSpec

SLURM = "Scheduler (SLURM through submitit)"


def register(app: typer.Typer) -> None:
    app.command(
        "reproduce",
        epilog="Example: kdiqa-edge reproduce --dataset koniq --root /data/koniq10k --seeds 5 --out runs/koniq\n\n"
        "Smoke test: kdiqa-edge reproduce --students test_efficientnet --seeds 2 --epochs 1 --teacher tiny "
        "--no-pretrained --out runs/repro\n\n"
        "On SLURM: kdiqa-edge reproduce --dataset koniq --root /data/koniq10k --seeds 10 --launcher slurm "
        "--partition gpu --gpus-per-job 1 --time 12:00:00 --max-parallel 8 --out runs/koniq; then "
        "kdiqa-edge reproduce --out runs/koniq --status",
    )(reproduce_command)


def _csv_list(text: str | None) -> list[str] | None:
    return [item.strip() for item in text.split(",") if item.strip()] if text else None


@dataset_options
def reproduce_command(
    data: DatasetSpec,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the runs and the tables go.")],
    students: Annotated[str | None, typer.Option(
        "--students", help="Comma-separated timm names (default the paper's four).")] = None,
    variants: Annotated[str | None, typer.Option(
        "--variants", help="Comma-separated: full, soft, hard, fixed:X, regression (default full).")] = None,
    seeds: Annotated[int | None, typer.Option("--seeds", min=1, help="Number of random splits (5).")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", min=1, help="Student epochs (100).")] = None,
    teacher_epochs: Annotated[int | None, typer.Option(
        "--teacher-epochs", min=1, help="Teacher epochs (default --epochs).")] = None,
    teacher: Annotated[str | None, typer.Option(
        "--teacher", help="open_clip NAME:TAG (default ViT-B-32:openai) or tiny.")] = None,
    teacher_weights: Annotated[Path | None, typer.Option(
        "--teacher-weights", help="Local open_clip weights file (offline machines).")] = None,
    no_pretrained: Annotated[bool, typer.Option(
        "--no-pretrained", help="Random-init students (labelled 'not pretrained').")] = False,
    batch_size: Annotated[int | None, typer.Option("--batch-size", "-b", min=1, help="Batch size (64).")] = None,
    device: Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda, cuda:1 ...")] = None,
    unlabeled: Annotated[list[str] | None, typer.Option(
        "--unlabeled", help="Unlabeled images for every distillation's soft loss (repeatable; as distill's "
        "--unlabeled: a folder, a .txt/.csv list, tar shards). Each split's test images are excluded.")] = None,
    unlabeled_fraction: Annotated[float | None, typer.Option(
        "--unlabeled-fraction", min=0.0, max=1.0, help="Share of each batch that is unlabeled (0.5).")] = None,
    logger: Logger = None,
    mlflow_uri: MlflowUri = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and its cost estimate; run nothing.")]
    = False,
    launcher: Annotated[str, typer.Option(
        "--launcher", help="local (this process, in sequence), slurm (job arrays through submitit), or "
        "submitit-local (the same jobs as local processes, waited for: a rehearsal).", rich_help_panel=SLURM)]
    = "local",
    status: Annotated[bool, typer.Option(
        "--status", help="Show every run's state and log, and the table so far; submit nothing.")] = False,
    wait: Annotated[bool, typer.Option(
        "--wait", help="slurm: wait for the submitted jobs, then write the tables.", rich_help_panel=SLURM)]
    = False,
    resubmit_unknown: Annotated[bool, typer.Option(
        "--resubmit-unknown", help="slurm: also resubmit the unfinished runs whose job state is unknown "
        "(neither sacct nor squeue answers); check first that they are not queued or running.",
        rich_help_panel=SLURM)]
    = False,
    partition: Annotated[str | None, typer.Option("--partition", help="sbatch --partition.",
                                                     rich_help_panel=SLURM)] = None,
    gpus_per_job: Annotated[int | None, typer.Option(
        "--gpus-per-job", min=0, help="GPUs per job (1); more run the training under torchrun.",
        rich_help_panel=SLURM)] = None,
    cpus_per_job: Annotated[int | None, typer.Option(
        "--cpus-per-job", min=1, help="sbatch --cpus-per-task.", rich_help_panel=SLURM)] = None,
    mem: Annotated[str | None, typer.Option("--mem", help="sbatch --mem, e.g. 64G.", rich_help_panel=SLURM)]
    = None,
    time_limit: Annotated[str | None, typer.Option(
        "--time", help="Wall time per job: minutes, HH:MM:SS, D-HH:MM:SS (24:00:00).", rich_help_panel=SLURM)]
    = None,
    max_parallel: Annotated[int | None, typer.Option(
        "--max-parallel", min=1, help="Distillations of one split running at once (array throttle, 16).",
        rich_help_panel=SLURM)] = None,
    account: Annotated[str | None, typer.Option("--account", help="sbatch --account.", rich_help_panel=SLURM)]
    = None,
    qos: Annotated[str | None, typer.Option("--qos", help="sbatch --qos.", rich_help_panel=SLURM)] = None,
    slurm_extra: Annotated[list[str] | None, typer.Option(
        "--slurm-extra", help="Any other sbatch option as KEY=VALUE (repeatable), e.g. constraint=a100.",
        rich_help_panel=SLURM)] = None,
) -> None:
    """Run the paper's protocol: N seeded 80/20 splits (by reference for synthetic-distortion sets), a
    teacher fine-tune and the distillations per split, median PLCC/SRCC per student and variant. Re-running
    skips finished runs and resumes interrupted ones."""
    from rich.console import Console
    from rich.table import Table

    from kdiqa_edge.config import override
    from kdiqa_edge.train.reproduce import ReproduceConfig, run_reproduce

    if status:
        _status(out)
        return
    cfg = override(ReproduceConfig(), students=_csv_list(students), variants=_csv_list(variants), seeds=seeds,
                   epochs=epochs, teacher_epochs=teacher_epochs, teacher=teacher,
                   teacher_weights=str(teacher_weights) if teacher_weights else None,
                   pretrained=False if no_pretrained else None, batch_size=batch_size, device=device,
                   unlabeled=[str(Path(u).expanduser().absolute()) for u in unlabeled] if unlabeled else None,
                   unlabeled_fraction=unlabeled_fraction, loggers=list(logger) if logger else None,
                   mlflow_uri=mlflow_uri)
    console = Console(stderr=True)
    if launcher != "local":
        from kdiqa_edge.train.launch import SlurmOptions, parse_extra

        opts = override(SlurmOptions(), partition=partition, gpus_per_job=gpus_per_job, cpus_per_job=cpus_per_job,
                        mem=mem, time=time_limit, max_parallel=max_parallel, account=account, qos=qos,
                        extra=parse_extra(slurm_extra or []))
        if launcher == "submitit-local" and max_parallel is not None:
            console.print("note: --max-parallel throttles SLURM job arrays; submitit-local starts every job at once")
        return _launch(cfg, data, out, launcher, opts, dry_run, wait, resubmit_unknown, console)
    from kdiqa_edge.train.state import RunInterrupted

    try:
        result = run_reproduce(cfg, data, out, dry_run=dry_run, log=console.print)
    except RunInterrupted as stop:  # Ctrl-C: finished runs are kept, the interrupted one resumes
        typer.echo(f"{stop} in {stop.run_dir}; run the same command again to resume", err=True)
        raise typer.Exit(130) from None
    if dry_run:
        table = Table(title=f"reproduce plan: {data.name}, {cfg.seeds} seeds")
        for column in ("seed", "run", "status", "dir"):
            table.add_column(column)
        for row in result["plan"]:
            table.add_row(str(row["seed"]), row["run"], row["status"], row["dir"])
        Console().print(table)
        _echo_estimate(result["estimate"])
        return
    _echo_tables(out)


def _echo_estimate(est: dict) -> None:
    rates = ", ".join(f"{k} {v:.0f}/s" if v else f"{k} ?" for k, v in est["images_per_s"].items())
    typer.echo(f"{est['runs_todo']} of {est['runs_total']} runs to do on {est['device']}, "
               f"{est['train_images']} training images each; train-step throughput: {rates or '-'}")
    hours = est["estimated_seconds"] / 3600
    typer.echo(f"estimated training time: {hours:.2f} h (excluding evaluation and data caching)"
               + (f"; not estimated: {', '.join(est['unestimated'])}" if est["unestimated"] else ""))


def _echo_tables(out: Path) -> None:
    typer.echo((Path(out) / "table1.md").read_text())
    typer.echo((Path(out) / "table2.md").read_text())
    typer.echo(f"results: {Path(out) / 'results.json'}")


def _launch(cfg, data: DatasetSpec, out: Path, launcher: str, opts, dry_run: bool, wait: bool,
            resubmit_unknown: bool, console) -> None:
    """Submit the plan's missing runs as jobs; submitit-local (and slurm with --wait) waits for them."""
    from kdiqa_edge.console import quiet_logger
    from kdiqa_edge.train import launch
    from kdiqa_edge.train.reproduce import check_plan, estimate, plan

    if dry_run:
        check_plan(cfg, data, out)  # what the real launch would refuse, the dry run refuses too (writing nothing)
        graph = launch.job_graph(cfg, out, opts, resubmit_unknown, log=console.print)
        for job in graph["jobs"]:
            after = f"  after {job['after']} (afterok)" if job["after"] else ""
            typer.echo(f"{job['job']}: {len(job['runs'])} run(s) {', '.join(job['runs'])}{after}")
            typer.echo("  sbatch " + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in job["sbatch"].items()
                                              if k not in ("additional_parameters", "array_parallelism"))
                       + "".join(f" --{k}={v}" for k, v in job["sbatch"]["additional_parameters"].items()))
        launch.report_skipped(graph["skipped"], typer.echo)
        est = estimate(cfg, data, graph["runs"])
        _echo_estimate({**est, "runs_total": len(plan(cfg, out))})
        return
    jobs = launch.submit_plan(cfg, data, out, launcher, opts, log=console.print,
                              resubmit_unknown=resubmit_unknown)
    if launcher == "submitit-local" or wait:
        from kdiqa_edge.train.launch import LaunchError

        if launcher == "slurm":
            _wait_slurm(cfg, out)
        else:
            with quiet_logger("submitit"):  # its sacct warnings (each twice): _status says what is known
                for job in jobs:
                    job.wait()
        failed = [r for r in _status(out) if r["state"] == "failed"]
        if failed:
            raise LaunchError(f"{len(failed)} run(s) failed ({', '.join(r['run'] for r in failed)}; first log: "
                              f"{failed[0]['log']}): re-run the same reproduce command to resubmit them")


SLURM_POLL_S = 60.0  # --wait: how often the runs' states are read (sacct, else squeue)


def _wait_slurm(cfg, out: Path) -> None:
    """--wait on SLURM: until no run is queued or running, by the states `--status` reads (sacct, else squeue).
    submitit's own wait reads sacct alone: without it, a job that died without a result was waited for forever.
    Runs whose state nobody can tell end the wait in one line."""
    import time

    from kdiqa_edge.train.jobs import run_states
    from kdiqa_edge.train.launch import LaunchError
    from kdiqa_edge.train.reproduce import plan

    said: set[str] = set()

    def once(line: str) -> None:
        if line not in said:
            said.add(line)
            typer.echo(line, err=True)

    while True:
        rows = run_states(out, plan(cfg, out), log=once)
        waiting = [r for r in rows if r["state"] in ("queued", "running")]
        unknown = [r for r in rows if r["state"] == "unknown"]
        if not waiting:
            if unknown:
                raise LaunchError(f"cannot wait for {len(unknown)} run(s) whose SLURM state is unknown "
                                  f"({', '.join(r['run'] for r in unknown)}): see `reproduce --out {out} --status` "
                                  "later")
            return
        time.sleep(SLURM_POLL_S)


def _status(out: Path) -> list[dict]:
    """Every run's state and log; the tables so far (written to --out once every run is done)."""
    from rich.console import Console
    from rich.table import Table

    from kdiqa_edge.train.jobs import run_states
    from kdiqa_edge.train.reproduce import (
        collect,
        load_plan,
        plan,
        table_i_markdown,
        table_ii_markdown,
        write_tables,
    )

    cfg, data = load_plan(out)
    runs = plan(cfg, out)
    rows = run_states(out, runs, log=lambda line: typer.echo(line, err=True))
    for row, run in zip(rows, runs):
        if row["state"] == "todo" and run.interrupted:  # a local run stopped mid-way: the next call resumes it
            row["state"] = "interrupted"
    table = Table(title=f"reproduce {out}: {data.name}, {cfg.seeds} seeds")
    for column in ("run", "state", "job"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["run"], row["state"], row["job_id"] or "-")
    Console().print(table)
    states = ("done", "queued", "running", "unknown", "failed", "interrupted", "todo")
    counts = {state: sum(r["state"] == state for r in rows) for state in states}
    typer.echo(", ".join(f"{n} {state}" for state, n in counts.items() if n))
    # whole paths, one a line, so they can be copied (a table column would cut or fold them)
    logs = [row for row in rows if row["log"] and row["state"] != "done"]
    if logs:
        pattern = Path(out).absolute() / "jobs" / "<job>" / "<job>_0_log.out"
        typer.echo(f"logs of the runs not done (every job's: {pattern}):")
        for row in logs:
            typer.echo(f"  {row['run']} ({row['state']}): {row['log']}")
    if counts["done"] == len(rows):
        write_tables(runs, data, out)
        _echo_tables(out)
        return rows
    results = collect(runs, data.name)
    typer.echo("tables so far (finished runs only):\n")
    typer.echo(table_i_markdown(results))
    typer.echo(table_ii_markdown(results))
    return rows
