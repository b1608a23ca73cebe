"""`kdiqa-edge teacher eval|finetune`: the CLIP quality teacher, zero-shot or fine-tuned."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Annotated

import typer

from kdiqa_edge.cli.options import Logger, MlflowUri, OldSeed, dataset_options, renamed
from kdiqa_edge.data.spec import DatasetSpec

teacher_app = typer.Typer(help="The CLIP quality teacher: zero-shot evaluation and image-encoder fine-tuning.",
                          no_args_is_help=True)

TEACHER_PANEL = "Teacher"
TRAIN_PANEL = "Training (defaults: the paper's recipe)"

Teacher = Annotated[str | None, typer.Option(
    "--teacher", help="open_clip NAME:TAG (default ViT-B-32:openai, the paper's teacher), NAME:random (that model, "
    "random init, not pretrained), or 'tiny': a random-init 64 px config for tests and quick demos (not pretrained).",
    rich_help_panel=TEACHER_PANEL)]
TeacherWeights = Annotated[Path | None, typer.Option(
    "--teacher-weights", help="Local open_clip weights file for --teacher's NAME (offline machines).",
    rich_help_panel=TEACHER_PANEL)]
Template = Annotated[list[str] | None, typer.Option(
    "--template", help="Prompt template with {level}; repeat to average several (default: 'a photo of {level} "
    "quality').", rich_help_panel=TEACHER_PANEL)]
Device = Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda, cuda:N.")]
BatchSize = Annotated[int | None, typer.Option("--batch-size", "-b", min=1, help="Images per step.")]


def register(app: typer.Typer) -> None:
    app.add_typer(teacher_app, name="teacher")


@teacher_app.command("eval")
@dataset_options
def eval_command(
    data: DatasetSpec,
    teacher: Teacher = None,
    teacher_weights: TeacherWeights = None,
    checkpoint: Annotated[Path | None, typer.Option(
        "--checkpoint", help="A fine-tuned teacher: checkpoint dir or run dir (instead of --teacher).",
        rich_help_panel=TEACHER_PANEL)] = None,
    template: Template = None,
    split: Annotated[str, typer.Option("--split", help="test, train, val or all.")] = "test",
    split_seed: Annotated[int | None, typer.Option(
        "--split-seed", help="Train/test split seed (default: the checkpoint's run's own split.json, else 0; "
                               "another seed is a fresh split, as bench's).")] = None,
    old_seed: OldSeed = None,
    test_fraction: Annotated[float | None, typer.Option(
        "--test-fraction", help="Share held out for testing (default: the checkpoint's run's, else 0.2).")] = None,
    batch_size: BatchSize = None,
    device: Device = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Score the test split with the teacher and print PLCC (raw and fitted), SRCC, KRCC, RMSE.

    Without --checkpoint this is CLIP-IQA-style zero-shot scoring with the quality prompts. A --checkpoint in a
    run dir is scored on that run's dataset and its own test split unless dataset options are given; with
    neither, on the built-in synthetic set (the first line says so).

    Examples:

      kdiqa-edge teacher eval --dataset koniq --root ~/data/koniq10k

      kdiqa-edge teacher eval --teacher tiny --json

      kdiqa-edge teacher eval --checkpoint runs/teacher-koniq --dataset koniq --root ~/data/koniq10k
    """
    from kdiqa_edge.errors import ConfigError
    from kdiqa_edge.train.finetune import evaluate_teacher

    if checkpoint is not None and (teacher or teacher_weights or template):
        raise ConfigError("--checkpoint already holds a teacher: drop --teacher/--teacher-weights/--template")
    if split not in ("test", "train", "val", "all"):
        raise ConfigError(f"--split must be test, train, val or all, got {split!r}")
    result = evaluate_teacher(data, teacher=teacher, weights=teacher_weights, checkpoint=checkpoint,
                              templates=template, split=split,
                              seed=renamed("--seed", "--split-seed", old_seed, split_seed),
                              test_fraction=test_fraction,
                              batch_size=batch_size or 128, device=device or "auto", progress=not as_json,
                              log=lambda line: typer.secho(line, err=True, fg="yellow"))  # before the work
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    m = result["metrics"]
    typer.echo(f"teacher  {result['teacher']}" + ("" if result["pretrained"] else "  [NOT PRETRAINED: random init]"))
    typer.echo(f"data     {result['dataset']} ({result['source']}), {result['split']} split, {m['n']} images "
               f"({result['mode']})")
    typer.echo(f"PLCC {m['plcc']:.4f} (after logistic fit {m['plcc_fit']:.4f})  SRCC {m['srcc']:.4f}  "
               f"KRCC {m['krcc']:.4f}  RMSE {m['rmse']:.4f}")


@teacher_app.command("finetune")
@dataset_options
def finetune_command(
    data: DatasetSpec,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run dir (default runs/teacher-...).")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML/JSON config; flags override it. "
                                                   "A run's config.yaml works.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in --out.")] = False,
    teacher: Teacher = None,
    teacher_weights: TeacherWeights = None,
    template: Template = None,
    epochs: Annotated[int | None, typer.Option("--epochs", min=1, rich_help_panel=TRAIN_PANEL,
                                                  help="Epochs (100).")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", "-b", min=1, rich_help_panel=TRAIN_PANEL,
                                                      help="Images per optimizer step (64).")] = None,
    lr: Annotated[float | None, typer.Option("--lr", rich_help_panel=TRAIN_PANEL,
                                                help="Peak AdamW learning rate (5e-6), cosine to 0.1x.")] = None,
    weight_decay: Annotated[float | None, typer.Option(
        "--weight-decay", rich_help_panel=TRAIN_PANEL, help="AdamW weight decay (0.05; the paper does not state one).")
    ] = None,
    grad_accum: Annotated[int | None, typer.Option("--grad-accum", min=1, rich_help_panel=TRAIN_PANEL,
                                                      help="Micro-batches per step.")] = None,
    augment: Annotated[str | None, typer.Option("--augment", rich_help_panel=TRAIN_PANEL,
                                                   help="hflip (default) or none.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", rich_help_panel=TRAIN_PANEL,
                                                help="Data order / augmentation seed.")] = None,
    split_seed: Annotated[int | None, typer.Option("--split-seed", help="Train/test split seed.")] = None,
    val_fraction: Annotated[float | None, typer.Option(
        "--val-fraction", help="Hold out a validation split for checkpoint selection (default 0: select on test, "
        "as the paper's protocol).")] = None,
    device: Device = None,
    amp: Annotated[bool | None, typer.Option("--amp/--no-amp", help="CUDA mixed precision (bf16 where "
                                                "supported).")] = None,
    compile_model: Annotated[bool | None, typer.Option(
        "--compile/--no-compile", help="torch.compile the image encoder, on any device (pays off on CUDA: "
        "1.25-1.3x for 20-60 s of compiling).")] = None,
    features: Annotated[bool | None, typer.Option("--features/--no-features", help="Write the teacher feature "
                                                     "cache for distillation afterwards (default on).")] = None,
    logger: Logger = None,
    mlflow_uri: MlflowUri = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Fine-tune CLIP's image encoder on an IQA dataset (text tower, anchors and temperature stay frozen).

    Examples:

      kdiqa-edge teacher finetune --teacher tiny --epochs 2

      kdiqa-edge teacher finetune --dataset koniq --root ~/data/koniq10k --out runs/teacher-koniq

      kdiqa-edge teacher finetune --out runs/teacher-koniq --resume

      kdiqa-edge teacher finetune --teacher tiny --epochs 2 --logger tensorboard --logger mlflow

      torchrun --nproc-per-node 4 -m kdiqa_edge teacher finetune --dataset koniq --root ... --out ...
    """
    from kdiqa_edge.train.finetune import load_config, run_finetune
    from kdiqa_edge.train.state import RunInterrupted

    if resume and config is None and out is not None and (out / "config.yaml").is_file():
        config = out / "config.yaml"  # resume with the run's own resolved config
    cfg = load_config(
        config, teacher=teacher, teacher_weights=str(teacher_weights) if teacher_weights else None,
        templates=list(template) if template else None, epochs=epochs, batch_size=batch_size, lr=lr,
        weight_decay=weight_decay, grad_accum=grad_accum, augment=augment, seed=seed, split_seed=split_seed,
        val_fraction=val_fraction, device=device, amp=amp, compile=compile_model, features=features,
        progress=False if quiet else None, loggers=list(logger) if logger else None, mlflow_uri=mlflow_uri,
    )
    main_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 reports
    try:
        summary = run_finetune(cfg, data, out, resume=resume)
    except RunInterrupted as stop:  # Ctrl-C: every completed epoch is saved in the run dir
        if main_process:
            typer.echo(f"{stop}; resume with: kdiqa-edge teacher finetune --out {shlex.quote(str(stop.run_dir))} "
                       "--resume", err=True)
        raise typer.Exit(130) from None
    if not main_process:
        return
    test = summary.get("test") or {}
    zero = summary.get("zero_shot_test")
    label = summary.get("label", cfg.teacher)
    typer.echo(f"teacher {label}: best epoch {summary['best_epoch']} -> {summary['run_dir']}")
    if zero:
        typer.echo(f"  zero-shot test  PLCC {zero['plcc']:.4f}  SRCC {zero['srcc']:.4f}")
    if test:
        typer.echo(f"  fine-tuned test PLCC {test['plcc']:.4f} (fitted {test['plcc_fit']:.4f})  SRCC {test['srcc']:.4f}"
                   f"  KRCC {test['krcc']:.4f}  RMSE {test['rmse']:.4f}")
