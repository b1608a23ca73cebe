"""`kdiqa-edge distill`: the paper's whole pipeline in one command (teacher fine-tune, then distillation)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Annotated

import typer

from kdiqa_edge.cli.options import Logger, MlflowUri, dataset_options
from kdiqa_edge.data.spec import DatasetSpec

STUDENT_PANEL = "Student"
TEACHER_PANEL = "Teacher"
TRAIN_PANEL = "Training (defaults: the paper's recipe)"
UNLABELED_PANEL = "Unlabeled images (soft loss only)"
CLUSTER_PANEL = "Unlabeled features on a cluster"


def register(app: typer.Typer) -> None:
    app.command("distill")(distill_command)


@dataset_options
def distill_command(
    data: DatasetSpec,
    student: Annotated[str | None, typer.Option(
        "--student", "-s", rich_help_panel=STUDENT_PANEL,
        help="timm model name (default resnet18; the paper's: swin_tiny_patch4_window7_224, resnet18, "
        "mobilevit_s, efficientnet_b0).")] = None,
    variant: Annotated[str | None, typer.Option(
        "--variant", rich_help_panel=STUDENT_PANEL,
        help="full (cosine-annealed soft+hard, default), soft (lambda=1), hard (lambda=0), fixed:X (constant "
        "lambda X), regression (plain regression head, no teacher).")] = None,
    no_pretrained: Annotated[bool, typer.Option(
        "--no-pretrained", rich_help_panel=STUDENT_PANEL,
        help="Random-init student encoder instead of timm's ImageNet weights (labelled 'not pretrained')."
    )] = False,
    student_weights: Annotated[Path | None, typer.Option(
        "--student-weights", rich_help_panel=STUDENT_PANEL,
        help="Local ImageNet weights file for the student (offline machines).")] = None,
    teacher_checkpoint: Annotated[Path | None, typer.Option(
        "--teacher-checkpoint", rich_help_panel=TEACHER_PANEL,
        help="A fine-tuned teacher (checkpoint or run dir). Without it the teacher is fine-tuned first, once "
        "per dataset, split and teacher config, and reused by later runs.")] = None,
    teacher: Annotated[str | None, typer.Option(
        "--teacher", rich_help_panel=TEACHER_PANEL,
        help="Teacher to fine-tune: open_clip NAME:TAG (default ViT-B-32:openai), NAME:random (that model, random "
        "init, not pretrained) or 'tiny' (random init, 64 px, not pretrained: tests and quick demos).")] = None,
    teacher_weights: Annotated[Path | None, typer.Option(
        "--teacher-weights", rich_help_panel=TEACHER_PANEL,
        help="Local open_clip weights file for --teacher's NAME (offline machines).")] = None,
    teacher_epochs: Annotated[int | None, typer.Option(
        "--teacher-epochs", min=1, rich_help_panel=TEACHER_PANEL,
        help="Teacher fine-tune epochs (default: the same as --epochs).")] = None,
    logger: Logger = None,
    mlflow_uri: MlflowUri = None,
    unlabeled: Annotated[list[str] | None, typer.Option(
        "--unlabeled", rich_help_panel=UNLABELED_PANEL,
        help="Unlabeled images for the soft loss (repeatable): a folder (recursive), a .txt/.csv list of paths, "
        "or tar shards ('shards-{000..099}.tar', read in place). TRAIN side only; images also in the rated "
        "test split are excluded (by content) and counted.")] = None,
    unlabeled_fraction: Annotated[float | None, typer.Option(
        "--unlabeled-fraction", min=0.0, max=1.0, rich_help_panel=UNLABELED_PANEL,
        help="Share of each batch that is unlabeled (0.5); an epoch is one pass over the rated images.")] = None,
    rated_fraction: Annotated[float | None, typer.Option(
        "--rated-fraction", min=0.0, max=1.0, rich_help_panel=UNLABELED_PANEL,
        help="Share of the rated train split whose ratings train (1; seeded by --split-seed). Below 1 needs "
        "--teacher-checkpoint; 0 with --variant soft and --unlabeled: pure feature distillation.")] = None,
    image_cache: Annotated[bool | None, typer.Option(
        "--image-cache/--no-image-cache", rich_help_panel=UNLABELED_PANEL,
        help="Keep the unlabeled images decoded on disk (size*size*3 bytes each) instead of decoding them from "
        "their source every epoch.")] = None,
    workers: Annotated[int | None, typer.Option(
        "--workers", min=0, rich_help_panel=UNLABELED_PANEL,
        help="Processes decoding unlabeled images (2).")] = None,
    feature_tasks: Annotated[int | None, typer.Option(
        "--feature-tasks", min=1, rich_help_panel=CLUSTER_PANEL,
        help="Compute the unlabeled images' teacher features as N scheduler tasks (one array; shard i is "
        "task i % N's), then exit; the same distill without this flag then trains on them (or --then-train "
        "submits that too). Needs --teacher-checkpoint and --out (the jobs' logs and OUT/jobs.json).")] = None,
    feature_shard_images: Annotated[int | None, typer.Option(
        "--feature-shard-images", min=1, rich_help_panel=CLUSTER_PANEL,
        help="Unlabeled images per teacher-feature shard (2048): the unit of work and of resume.")] = None,
    launcher: Annotated[str, typer.Option(
        "--launcher", rich_help_panel=CLUSTER_PANEL,
        help="With --feature-tasks: slurm (sbatch through submitit) or submitit-local (local processes).")] = "slurm",
    then_train: Annotated[bool, typer.Option(
        "--then-train", rich_help_panel=CLUSTER_PANEL,
        help="With --feature-tasks: also submit the training itself, as one more job that starts when every "
        "feature task has succeeded (SLURM: --dependency=afterok on the array).")] = False,
    wait: Annotated[bool, typer.Option("--wait", rich_help_panel=CLUSTER_PANEL,
                                       help="With --feature-tasks: wait for the jobs to end.")] = False,
    partition: Annotated[str | None, typer.Option("--partition", rich_help_panel=CLUSTER_PANEL,
                                                  help="sbatch --partition.")] = None,
    time_limit: Annotated[str | None, typer.Option("--time", rich_help_panel=CLUSTER_PANEL,
                                                   help="sbatch --time of one task (24:00:00).")] = None,
    cpus_per_job: Annotated[int | None, typer.Option("--cpus-per-job", min=1, rich_help_panel=CLUSTER_PANEL,
                                                     help="sbatch --cpus-per-task.")] = None,
    mem: Annotated[str | None, typer.Option("--mem", rich_help_panel=CLUSTER_PANEL, help="sbatch --mem.")] = None,
    slurm_extra: Annotated[list[str] | None, typer.Option(
        "--slurm-extra", rich_help_panel=CLUSTER_PANEL, help="Any other sbatch option as KEY=VALUE.")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Run dir (default runs/distill-<student>-<variant>-<dataset>-<time>).")] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="YAML/JSON config; flags override it. A run's config.yaml works.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in --out.")] = False,
    epochs: Annotated[int | None, typer.Option("--epochs", min=1, rich_help_panel=TRAIN_PANEL,
                                                  help="Epochs (100).")] = None,
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", "-b", min=1, rich_help_panel=TRAIN_PANEL,
        help="Images per optimizer step (64).")] = None,
    lr: Annotated[float | None, typer.Option(
        "--lr", rich_help_panel=TRAIN_PANEL, help="Peak AdamW learning rate (1e-4), cosine to 0.1x.")] = None,
    weight_decay: Annotated[float | None, typer.Option(
        "--weight-decay", rich_help_panel=TRAIN_PANEL, help="AdamW weight decay (0.05; the paper does not state one).")] = None,
    grad_accum: Annotated[int | None, typer.Option("--grad-accum", min=1, rich_help_panel=TRAIN_PANEL,
                                                      help="Micro-batches per optimizer step.")] = None,
    augment: Annotated[str | None, typer.Option(
        "--augment", rich_help_panel=TRAIN_PANEL,
        help="none (default, the paper's: the soft target is the teacher's features of the same image) or hflip "
             "(the flipped half keeps the unflipped image's features). The teacher fine-tune flips either way.")
    ] = None,
    seed: Annotated[int | None, typer.Option(
        "--seed", rich_help_panel=TRAIN_PANEL,
        help="Student init, data order and augmentation seed.")] = None,
    split_seed: Annotated[int | None, typer.Option("--split-seed", help="Train/test split seed.")] = None,
    val_fraction: Annotated[float | None, typer.Option(
        "--val-fraction", help="Hold out a validation split for checkpoint selection (default 0: select on "
        "test, the paper's protocol).")] = None,
    device: Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda, cuda:N.")] = None,
    amp: Annotated[bool | None, typer.Option("--amp/--no-amp", help="CUDA mixed precision (bf16 where "
                                                "supported).")] = None,
    compile_model: Annotated[bool | None, typer.Option(
        "--compile/--no-compile", help="torch.compile the image encoder, on any device (pays off on CUDA: "
        "1.25-1.3x for 20-60 s of compiling).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Distil the CLIP quality teacher into a timm student: L = lambda(1 - cos(u, v)) + (1 - lambda) MSE.

    Without --teacher-checkpoint the teacher is fine-tuned first (or an earlier fine-tune of the same
    teacher on the same data and split is reused), so this one command is the paper's whole pipeline.

    Examples:

      kdiqa-edge distill --teacher tiny --student resnet18 --no-pretrained --epochs 2

      kdiqa-edge distill --dataset koniq --root ~/data/koniq10k --student efficientnet_b0 --out runs/b0

      kdiqa-edge distill --student mobilevit_s --teacher-checkpoint runs/teacher-koniq --variant hard ...

      kdiqa-edge distill --out runs/b0 --resume

      kdiqa-edge distill --dataset koniq --root ~/data/koniq10k --unlabeled ~/photos --unlabeled 'web-{000..099}.tar'

      kdiqa-edge distill ... --unlabeled 'web-{000..999}.tar' --feature-tasks 32 --then-train --out runs/big

      torchrun --nproc-per-node 4 -m kdiqa_edge distill --dataset koniq --root ... --out ...
    """
    from kdiqa_edge.errors import ConfigError
    from kdiqa_edge.train.distill import load_config, run_distill
    from kdiqa_edge.train.state import RunInterrupted

    if resume and out is None:
        raise ConfigError("--resume needs --out: the run dir to continue")
    if resume and config is None and (out / "config.yaml").is_file():
        config = out / "config.yaml"  # resume with the run's own resolved config
    cfg = load_config(
        config, student=student, variant=variant, pretrained=False if no_pretrained else None,
        student_weights=str(student_weights) if student_weights else None,
        teacher_checkpoint=str(teacher_checkpoint) if teacher_checkpoint else None, teacher=teacher,
        teacher_weights=str(teacher_weights) if teacher_weights else None, teacher_epochs=teacher_epochs,
        epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, grad_accum=grad_accum,
        augment=augment, seed=seed, split_seed=split_seed, val_fraction=val_fraction, device=device, amp=amp,
        compile=compile_model, progress=False if quiet else None, unlabeled=unlabeled or None,
        unlabeled_fraction=unlabeled_fraction, rated_fraction=rated_fraction, image_cache=image_cache,
        workers=workers, feature_shard_images=feature_shard_images, loggers=list(logger) if logger else None,
        mlflow_uri=mlflow_uri,
    )
    if feature_tasks is not None:
        return _feature_tasks(cfg, data, out, feature_tasks, launcher, then_train, wait, partition, time_limit,
                              cpus_per_job, mem, slurm_extra)
    if then_train:
        raise ConfigError("--then-train goes with --feature-tasks N: it submits the training after the feature tasks")
    main_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun, one report
    try:
        summary = run_distill(cfg, data, out, resume=resume, log=typer.echo)
    except RunInterrupted as stop:  # Ctrl-C: every completed epoch is saved in the run dir
        if main_process:
            typer.echo(f"{stop}; resume with: kdiqa-edge distill --out {shlex.quote(str(stop.run_dir))} --resume",
                       err=True)
        raise typer.Exit(130) from None
    if main_process:
        _report(summary)
        typer.echo(f"next: kdiqa-edge export {shlex.quote(summary['run_dir'])} --precision auto")


def _feature_tasks(cfg, data, out, tasks, launcher, then_train, wait, partition, time_limit, cpus_per_job, mem,
                   slurm_extra) -> None:
    """Submit the unlabeled feature work as an array of `tasks` jobs, and the training after it if asked (and
    wait for them, if asked)."""
    from kdiqa_edge.config import override
    from kdiqa_edge.errors import ConfigError
    from kdiqa_edge.train.launch import SlurmOptions, parse_extra, submit_features, submit_training
    from kdiqa_edge.train.mixed import check_unlabeled, feature_task_config
    from kdiqa_edge.train.schedules import parse_variant

    if out is None or not cfg.unlabeled or not cfg.teacher_checkpoint:
        raise ConfigError("--feature-tasks needs --unlabeled, --teacher-checkpoint and --out")
    if launcher not in ("slurm", "submitit-local"):
        raise ConfigError(f"--launcher must be slurm or submitit-local, got {launcher!r}")
    check_unlabeled(cfg, parse_variant(cfg.variant))
    opts = override(SlurmOptions(gpus_per_job=0 if cfg.device == "cpu" else 1), partition=partition,
                    time=time_limit, cpus_per_job=cpus_per_job, mem=mem, extra=parse_extra(slurm_extra or []))
    cfg = feature_task_config(cfg)
    jobs = submit_features(cfg, data, Path(out), launcher, opts, tasks, log=typer.echo)
    training = submit_training(cfg, data, Path(out), launcher, opts, jobs, log=typer.echo) if then_train else None
    if not wait:
        typer.echo(f"the job ids are in {Path(out) / 'jobs.json'}" if then_train else
                   "next: the same kdiqa-edge distill command without --feature-tasks (it reuses the shards)")
        return
    for task, job in enumerate(jobs):
        _job_result(job, f"feature task {task}")
    typer.echo(f"{tasks} feature task(s) done")
    if training is None:
        typer.echo("next: the same kdiqa-edge distill command without --feature-tasks (it reuses the shards)")
        return
    summary = _job_result(training, "training")
    _report(summary)
    typer.echo(f"next: kdiqa-edge export {shlex.quote(summary['run_dir'])} --precision auto")


def _job_result(job, what: str):
    from kdiqa_edge.train.launch import LaunchError

    try:
        return job.result()
    except Exception as exc:  # noqa: BLE001 - submitit raises the job's own error, any type
        raise LaunchError(f"{what} (job {job.job_id}) failed: {str(exc).strip().splitlines()[-1]}; its log: "
                          f"{job.paths.stderr}") from None


def _report(summary: dict) -> None:
    student, teacher = summary.get("student_facts", {}), summary.get("teacher_facts")
    typer.echo(f"{summary.get('label', '')}: best epoch {summary.get('best_epoch')} -> {summary['run_dir']}")
    test = summary.get("test")
    unlabeled = summary.get("unlabeled")
    if unlabeled:
        references = unlabeled.get("test_references", 0)
        typer.echo(f"  unlabeled: {unlabeled['used']} images in the soft loss "
                   f"({round(unlabeled['fraction'] * 100)}% of each batch); {unlabeled['in_test_split']} also in "
                   f"the test split excluded"
                   + (f", and {references} reference image{'s' if references != 1 else ''} of test contents"
                      if references else ""))
    if test:
        typer.echo(f"  test  PLCC {test['plcc']:.4f} (fitted {test['plcc_fit']:.4f})  "
                   f"SRCC {test['srcc']:.4f}  KRCC {test['krcc']:.4f}  RMSE {test['rmse']:.4f}  "
                   f"n={test['n']}")
    line = f"  student {_millions(student.get('params'))} params, {_giga(student.get('flops'))} FLOPs"
    if teacher:
        line += (f"  |  teacher {_millions(teacher.get('params'))} params, "
                 f"{_giga(teacher.get('flops'))} FLOPs  (per image at the input size)")
    typer.echo(line)
    ratio = (summary.get("compression") or {}).get("teacher_over_student", {}).get("params")
    if ratio:
        typer.echo(f"  the student is {ratio:.1f}x smaller than the teacher (params)" if ratio >= 1 else
                   f"  the student is {1 / ratio:.1f}x LARGER than this teacher (params): a tiny or small "
                   f"teacher, not a compression")


def _millions(value) -> str:
    return f"{value / 1e6:.2f}M" if value else "?"


def _giga(value) -> str:
    return f"{value / 1e9:.3f}G" if value else "?"
