"""Distillation (the paper's second stage): a timm student learns the fine-tuned CLIP teacher's features.

    L = lambda(t) * (1 - cos(u, v)) + (1 - lambda(t)) * MSE(score, mos)
    lambda(t) = 0.5 * (1 + cos(pi t / T)), t the optimizer step, T all steps of the run

The recipe is the shared engine (kdiqa_edge.train.loop.Trainer) with the distillation loss plugged in; the
teacher never runs per epoch: its features come from the feature cache (keyed by the teacher
checkpoint's content hash and the image cache, rebuilt when either changes). Without a teacher
checkpoint, the teacher is fine-tuned first, once per (dataset, split, teacher config): a later distill
of another student on the same data reuses that run. One command is the whole pipeline.

Shape: setup (teacher, data, features, student) / train (the engine) / save (summary, plots) / cleanup.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from kdiqa_edge import config as config_lib
from kdiqa_edge import paths
from kdiqa_edge.console import plural
from kdiqa_edge.data._lock import waiting_lock
from kdiqa_edge.data.spec import DatasetSpec
from kdiqa_edge.data.split import check_split_options
from kdiqa_edge.errors import ConfigError
from kdiqa_edge.io import read_json, write_json
from kdiqa_edge.models.teacher import DEFAULT_TEACHER
from kdiqa_edge.preprocess import PreprocessSpec
from kdiqa_edge.train.distributed import barrier, broadcast_object, main_process_first
from kdiqa_edge.train.loop import Trainer
from kdiqa_edge.train.mixed import (
    MixedTrainer,
    absolute_source,
    check_unlabeled,
    rated_subset,
    unlabeled_data,
)
from kdiqa_edge.train.resume import (
    check_resume,
    check_resumed_images,
    make_run_dir,
    recorded_data,
    refuse_existing_run,
    require_run,
    resumed_teacher,
)
from kdiqa_edge.train.schedules import Variant, parse_variant


@dataclasses.dataclass
class DistillConfig:
    student: str = "resnet18"  # timm model name (the paper's four: see models.student.PAPER_STUDENTS)
    variant: str = "full"  # full | soft | hard | fixed:X | regression (the rows of the paper's Table II)
    pretrained: bool = True  # ImageNet init through timm; False = random init, labelled "not pretrained"
    student_weights: str | None = None  # local weights file for the student encoder (offline machines)
    teacher_checkpoint: str | None = None  # fine-tuned teacher (checkpoint/run dir); None: fine-tune one
    teacher: str = DEFAULT_TEACHER  # the teacher to fine-tune first: open_clip NAME:TAG, or tiny
    teacher_weights: str | None = None  # local open_clip weights file for `teacher` (offline machines)
    teacher_epochs: int | None = None  # teacher fine-tune epochs; None = the same as `epochs`
    teacher_lr: float = 5e-6  # teacher fine-tune learning rate (the paper's)
    dataset: dict = dataclasses.field(default_factory=dict)  # DatasetSpec fields; CLI dataset options win
    split_seed: int = 0  # seed of the train/val/test split (the teacher's and the student's: the same split)
    val_fraction: float = 0.0  # held out for model selection; 0 = select on the test split (paper protocol)
    test_fraction: float = 0.2  # the paper's random 80/20 split
    split_by: str = "auto"  # auto | ref | image | official
    epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-4  # the paper's student learning rate
    min_lr_ratio: float = 0.1  # cosine decay to 0.1x
    weight_decay: float = 0.05  # not stated in the paper (torch's AdamW default: 0.01)
    grad_accum: int = 1
    grad_clip: float | None = None
    # none (the paper's: v is the teacher's features of the SAME image) | hflip (on-device; the soft target then
    # stays the unflipped image's cached features for the flipped half). The teacher fine-tune keeps its own.
    augment: str = "none"
    seed: int = 0  # student init, data order and augmentation
    device: str = "auto"
    amp: bool = True
    channels_last: bool = True
    compile: bool = False
    eval_batch_size: int = 128
    select: str = "plcc+srcc"
    progress: bool = True
    workdir: str | None = None  # the folder the command ran in (set by run_distill; how, not what, is trained)
    unlabeled: list = dataclasses.field(default_factory=list)  # unlabeled SOURCEs (folder, list, tar shards)
    unlabeled_fraction: float = 0.5  # share of each batch that is unlabeled (where rated images train too)
    rated_fraction: float = 1.0  # share of the rated train split whose ratings train (seeded by split_seed)
    image_cache: bool = False  # keep the unlabeled images decoded on disk (~S*S*3 bytes each) instead of streaming
    workers: int = 2  # processes decoding unlabeled images
    feature_shard_images: int = 2048  # unlabeled images per teacher-feature shard (the unit of resume and of work)
    loggers: list = dataclasses.field(default_factory=list)  # trackers: tensorboard, mlflow, wandb (train/trackers/)
    mlflow_uri: str | None = None  # MLflow tracking URI (else MLFLOW_TRACKING_URI, else MLflow's default)


# Fields that may change between an interrupted run and its --resume (how, not what, is trained). `workdir`
# is where the command ran: a run resumed from another folder trains the same thing.
VOLATILE = ("progress", "device", "compile", "eval_batch_size", "workdir", "image_cache", "workers",
            "feature_shard_images", "loggers", "mlflow_uri")


def load_config(config_file: str | Path | None = None, **overrides) -> DistillConfig:
    """Defaults <- YAML/JSON file (e.g. a run's saved config.yaml) <- CLI overrides (None never overrides)."""
    return config_lib.resolve(DistillConfig, config_file, **overrides)


def default_run_dir(cfg: DistillConfig, data: DatasetSpec) -> Path:
    variant = parse_variant(cfg.variant).spec.replace(":", "")
    return Path("runs") / f"distill-{cfg.student}-{variant}-{data.name}-{time.strftime('%Y%m%d-%H%M%S')}"


# ----------------------------------------------------------------------------------------------------------
# The teacher stage


def teacher_finetune_config(cfg: DistillConfig, data: DatasetSpec):
    """The teacher fine-tune this distillation implies: same data, split, schedule shape and seed."""
    from kdiqa_edge.train.finetune import FinetuneConfig

    return FinetuneConfig(
        teacher=cfg.teacher, teacher_weights=cfg.teacher_weights, dataset=data.to_dict(),
        split_seed=cfg.split_seed, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
        split_by=cfg.split_by, epochs=cfg.teacher_epochs or cfg.epochs, batch_size=cfg.batch_size,
        lr=cfg.teacher_lr, min_lr_ratio=cfg.min_lr_ratio, weight_decay=cfg.weight_decay,
        grad_accum=cfg.grad_accum, grad_clip=cfg.grad_clip, seed=cfg.seed,  # augment: the fine-tune's own
        device=cfg.device, amp=cfg.amp,
        channels_last=cfg.channels_last, compile=cfg.compile, eval_batch_size=cfg.eval_batch_size,
        select=cfg.select, progress=cfg.progress, features=True, workdir=cfg.workdir,
        loggers=list(cfg.loggers), mlflow_uri=cfg.mlflow_uri,
    )


def teacher_run_dir(finetune_cfg, data: DatasetSpec, root: Path | None = None) -> Path:
    """Where the teacher fine-tune for (dataset files, split, teacher config) lives: one run, reused."""
    from kdiqa_edge.data import cache_key, load_dataset
    from kdiqa_edge.train.state import ratings_key

    ignored = VOLATILE + ("features",)
    settings = {k: v for k, v in config_lib.to_dict(finetune_cfg).items() if k not in ignored}
    # The dataset's files (paths, sizes, mtimes) and ratings: an edited image or MOS gets a new teacher.
    dataset = load_dataset(data)
    files = [cache_key(dataset, PreprocessSpec()), ratings_key(dataset)]
    digest = hashlib.sha256(json.dumps([settings, files], sort_keys=True, default=str).encode()).hexdigest()
    name = f"{data.name}-{finetune_cfg.teacher.replace(':', '-').replace('/', '-')}-{digest[:16]}"
    return Path(root or paths.cache_dir() / "teacher-runs") / name


def ensure_teacher(cfg: DistillConfig, data: DatasetSpec, ctx, log=print) -> Path:
    """The fine-tuned teacher's checkpoint dir: reused if done, resumed if interrupted, else trained now."""
    from kdiqa_edge.data.readers import absolute_spec
    from kdiqa_edge.train.finetune import run_finetune
    from kdiqa_edge.train.state import TRAIN_STATE

    data = absolute_spec(data)  # the teacher run is keyed by the files, not by how a path was spelt
    finetune_cfg = teacher_finetune_config(cfg, data)
    run_dir = teacher_run_dir(finetune_cfg, data)
    # Another distill (another student on the same data) may be fine-tuning this teacher: its rank 0 holds the
    # lock until the run is done, and this one then reuses it. Only rank 0 locks: the ranks of one job train
    # together, and they act on rank 0's look at the run dir.
    waiting = (lambda who: log(f"teacher: another process{who} is fine-tuning this teacher into {run_dir}: "
                               "waiting for it, to reuse it"))
    with waiting_lock(teacher_lock(run_dir), waiting) if ctx.is_main else contextlib.nullcontext():
        done, interrupted = broadcast_object(ctx, (
            (run_dir / "summary.json").is_file() and (run_dir / "checkpoints" / "best").is_dir(),
            (run_dir / "checkpoints" / "last" / TRAIN_STATE).is_file()))  # every rank has looked: none wrote yet
        if done:
            log(f"teacher: reusing the fine-tuned {finetune_cfg.teacher} in {run_dir}")
        else:
            log(f"teacher: fine-tuning {finetune_cfg.teacher} for {plural(finetune_cfg.epochs, 'epoch')} -> "
                f"{run_dir}" + (" (resuming)" if interrupted else ""))
            run_finetune(finetune_cfg, data, run_dir, resume=interrupted)
            barrier(ctx)  # rank 0 writes the feature cache after training; the others wait for it
    return run_dir / "checkpoints" / "best"


def check_teacher_source(cfg: DistillConfig, variant: Variant) -> None:
    """The teacher a run scores through, refused in one line before any work: a --teacher-checkpoint that is
    no teacher checkpoint, or a --teacher (with its weights) that cannot be built."""
    if not variant.uses_teacher_head:
        return
    if cfg.teacher_checkpoint:
        from kdiqa_edge.models.checkpoint import read_meta

        kind = read_meta(cfg.teacher_checkpoint).get("kind")
        if kind != "teacher":
            raise ConfigError(f"--teacher-checkpoint {cfg.teacher_checkpoint} holds a {kind}, not a teacher")
        return
    from kdiqa_edge.models.teacher import check_teacher

    check_teacher(cfg.teacher, cfg.teacher_weights)


def teacher_lock(run_dir: Path) -> Path:
    """The lock a cached teacher run is trained under (beside it: the run dir may not exist yet)."""
    return run_dir.with_name(f".{run_dir.name}.lock")


def check_teacher_split(teacher_dir: Path, split, rated_train=None) -> None:
    """A teacher fine-tuned on this image list must have seen only this run's rated training images
    (`rated_train`, default the split's: --rated-fraction hides the other ratings from the teacher too)."""
    run_dir = teacher_dir.parent.parent if teacher_dir.parent.name == "checkpoints" else None
    if run_dir is None or not (run_dir / "split.json").is_file():
        return
    saved = read_json(run_dir / "split.json")
    if saved.get("index") and saved.get("index") != split.index:
        return  # another image list (another dataset): no test image of ours can have been trained on
    trained = set(saved.get("train", []))
    if sorted(saved.get("test", [])) != sorted(split.test) or trained & set(split.val):
        raise ConfigError(f"the teacher in {run_dir} was fine-tuned on another split of this dataset (its "
                          f"training images include test images here): use the same --split-seed / "
                          f"fractions, or no --teacher-checkpoint to fine-tune a matching teacher")
    hidden = trained - set(split.train if rated_train is None else rated_train)
    if hidden:
        raise ConfigError(f"the teacher in {run_dir} was fine-tuned on {len(hidden)} training images whose "
                          f"ratings this run leaves out (--rated-fraction): give a teacher fine-tuned on "
                          f"the rated ones only")


def student_preprocess(cfg: DistillConfig, teacher) -> PreprocessSpec:
    """The teacher's preprocessing (the student sees what CLIP sees); a regression student has no teacher."""
    if teacher is not None:
        return teacher.preprocess
    if cfg.teacher_checkpoint:
        from kdiqa_edge.models.checkpoint import read_meta

        return PreprocessSpec.from_dict(read_meta(cfg.teacher_checkpoint)["preprocess"])
    from kdiqa_edge.models.teacher import TEACHER_CONFIGS, load_teacher, parse_teacher

    if parse_teacher(cfg.teacher)[0] in TEACHER_CONFIGS:  # a registered config: cheap, no download
        return load_teacher(cfg.teacher).preprocess
    return PreprocessSpec()  # CLIP's 224 px preprocessing (ViT-B-32, the paper's teacher)


# ----------------------------------------------------------------------------------------------------------
# Model facts for the summary


def model_facts(model, preprocess: PreprocessSpec) -> dict[str, Any]:
    """Parameters and FLOPs of one forward pass on one image (torch's flop counter: 2 FLOPs per MAC)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    params = sum(p.numel() for p in model.parameters())
    x = torch.zeros(1, 3, preprocess.size, preprocess.size, device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
        flops: int | None = int(counter.get_total_flops())
    except Exception:  # noqa: BLE001 - FLOPs are informative; an op the counter cannot trace must not fail a run
        flops = None
    finally:
        model.train(was_training)
    return {"params": int(params), "flops": flops, "input": [1, 3, preprocess.size, preprocess.size]}


def _ratio(a, b) -> float | None:
    return round(a / b, 3) if a and b else None


def distill_figure(history: list[dict], variant: Variant, total_steps: int, steps_per_epoch: int,
                   title: str = ""):
    """The loss and its weighted terms per epoch, lambda per optimizer step, PLCC/SRCC (a matplotlib Figure).

    One x axis for the three panels: epoch e at x = e, where metrics.csv's row of epoch e was measured (its
    end); lambda's optimizer step s is at x = s / steps_per_epoch, so its epoch means sit at the epoch ends.
    """
    from kdiqa_edge.train.plots import _pyplot, correlation_panel, epoch_axis

    plt = _pyplot()
    epochs = [row["epoch"] for row in history]
    last = max(epochs, default=1)
    fig, (ax_loss, ax_lambda, ax_corr) = plt.subplots(1, 3, figsize=(15, 4))
    for name in ("loss", "soft", "hard"):
        if name in history[0]:
            ax_loss.plot(epochs, [row[name] for row in history], marker=".", label=name,
                         linewidth=2 if name == "loss" else 1)
    epoch_axis(ax_loss, last)
    ax_loss.set_title("training loss (weighted terms)")
    ax_loss.legend()
    steps = list(range(total_steps + 1))
    ax_lambda.plot([s / steps_per_epoch for s in steps], [variant.lam(s, total_steps) for s in steps],
                   label="lambda(t) per step")
    ax_lambda.plot(epochs, [row.get("lambda", float("nan")) for row in history], "o",
                   label="epoch mean (metrics.csv)")
    epoch_axis(ax_lambda, last)
    ax_lambda.set_ylim(-0.05, 1.05)
    ax_lambda.set_title(f"lambda: soft weight ({variant.spec})")
    ax_lambda.legend()
    correlation_panel(ax_corr, history)
    if title:
        fig.suptitle(title)
    return fig


def write_distill_plots(run_dir: Path, history: list[dict], variant: Variant, total_steps: int,
                        steps_per_epoch: int, title: str = "") -> list[Path]:
    """plots/distill.png: `distill_figure`, written.

    (The engine writes plots/curves.png and the test scatter plots/scatter_test.png beside it.)
    """
    if not history:
        return []
    from kdiqa_edge.train.plots import _pyplot, _save

    fig = distill_figure(history, variant, total_steps, steps_per_epoch, title)
    path = _save(fig, Path(run_dir) / "plots" / "distill.png")
    _pyplot().close(fig)
    return [path]


# ----------------------------------------------------------------------------------------------------------
# The recipe


def run_distill(cfg: DistillConfig, data: DatasetSpec | None = None, out: str | Path | None = None,
                resume: bool = False, log=None) -> dict[str, Any]:
    """Distil a student (fine-tuning the teacher first if needed); returns summary.json's content.

    `resume`: continue the run in `out` wherever it stopped (the teacher's fine-tune, or the student's
    epochs); a finished run is reported as it is. Ctrl-C raises `train.state.RunInterrupted` naming the run.
    """
    import torch

    from kdiqa_edge.data import load_dataset
    from kdiqa_edge.models.student import check_student
    from kdiqa_edge.train.distributed import init_distributed
    from kdiqa_edge.train.finetune import dataset_spec
    from kdiqa_edge.train.loop import TrainConfig
    from kdiqa_edge.train.state import RunInterrupted, run_finished

    if resume:
        require_run(out)  # first: a wrong --out is said as such, not as a default config's problem
    variant: Variant = parse_variant(cfg.variant)
    from kdiqa_edge.data.unlabeled import check_source

    for source in cfg.unlabeled:
        check_source(source)  # before the student's weights or any teacher work
    check_unlabeled(cfg, variant)
    check_split_options(cfg.test_fraction, cfg.val_fraction, cfg.split_by)
    check_teacher_source(cfg, variant)
    check_student(cfg.student, cfg.pretrained, cfg.student_weights)  # fail before any teacher work
    cfg = dataclasses.replace(cfg, variant=variant.spec)
    train_cfg = TrainConfig.from_any(cfg).check()
    data = dataset_spec(cfg, data, Path(out) if resume else None)
    cfg = dataclasses.replace(cfg, dataset=data.to_dict(), workdir=str(Path.cwd()),
                              unlabeled=[absolute_source(s) for s in cfg.unlabeled])
    if resume:
        check_resume(Path(out), cfg, data, VOLATILE)
        if run_finished(Path(out)):
            (log or print)(f"{out} is finished: nothing to resume (its summary follows)")
            return {**read_json(Path(out) / "summary.json"), "run_dir": str(out), "already_finished": True}
    else:
        if out is not None:
            refuse_existing_run(Path(out))
        load_dataset(data)  # a dataset that cannot be read fails here, leaving no run dir behind

    # One process group for both stages (the engine leaves a group it did not create alone).
    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    ctx, device = init_distributed(cfg.device)
    run_dir = Path(out) if out else broadcast_object(ctx, default_run_dir(cfg, data))
    say = (log or print) if ctx.is_main else (lambda *_: None)
    if not resume and ctx.is_main:  # first: an interrupt in the teacher stage leaves a run --resume continues
        make_run_dir(run_dir)
        config_lib.save(cfg, run_dir / "config.yaml")
    elif ctx.is_main:  # a resume's --logger / --mlflow-uri are the run's from now on
        config_lib.save(load_config(run_dir / "config.yaml", loggers=cfg.loggers, mlflow_uri=cfg.mlflow_uri),
                        run_dir / "config.yaml")
    stage = "before the student's first epoch"
    try:
        teacher, teacher_dir = None, None
        if variant.uses_teacher_head:
            stage = "while fine-tuning the teacher"
            teacher, teacher_dir = _teacher(cfg, data, ctx, say, run_dir if resume else None)
        stage = "before the student's first epoch"
        return _distill(cfg, data, variant, train_cfg, teacher, teacher_dir, run_dir, ctx, device, say, resume)
    except RunInterrupted as exc:
        if exc.run_dir == run_dir:
            raise
        raise RunInterrupted(run_dir, f"{stage} ({exc.where})") from exc
    except KeyboardInterrupt as exc:
        raise RunInterrupted(run_dir, stage) from exc
    finally:
        if ctx.enabled and owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _teacher(cfg: DistillConfig, data: DatasetSpec, ctx, say, resumed: Path | None):
    """The teacher model and its checkpoint dir: --teacher-checkpoint, the one a resumed run trained with,
    or the cached fine-tune (trained now if needed)."""
    from kdiqa_edge.models.checkpoint import load_checkpoint

    teacher_dir = Path(cfg.teacher_checkpoint) if cfg.teacher_checkpoint else None
    if teacher_dir is None and resumed is not None:
        teacher_dir = resumed_teacher(resumed)
        if teacher_dir is not None:
            say(f"teacher: the one this run trained with, {teacher_dir}")
    if teacher_dir is None:
        teacher_dir = ensure_teacher(cfg, data, ctx, say)
    teacher = load_checkpoint(teacher_dir)
    if teacher.kind != "teacher":
        raise ConfigError(f"--teacher-checkpoint {teacher_dir} holds a {teacher.kind}, not a teacher")
    return teacher.requires_grad_(False).eval(), teacher.checkpoint_dir  # frozen in code, not by convention


def _distill(cfg: DistillConfig, data: DatasetSpec, variant: Variant, train_cfg, teacher, teacher_dir,
             run_dir: Path, ctx, device, say, resume: bool) -> dict[str, Any]:
    """The student stage: data, teacher features, student, the engine, then summary and plots."""
    import torch

    from kdiqa_edge.data import prepare
    from kdiqa_edge.models.student import create_student
    from kdiqa_edge.train.features import teacher_features
    from kdiqa_edge.train.losses import DistillLoss
    from kdiqa_edge.train.state import TRAIN_STATE, check_same_data

    # -- setup: data, teacher features, student
    preprocess = student_preprocess(cfg, teacher)
    say(f"student: {cfg.student} at {preprocess.size} px (the teacher's preprocessing), "
        f"{plural(cfg.epochs, 'epoch')} -> {run_dir}")
    # a run interrupted before the student's first saved epoch starts the student afresh
    student_resume = resume and (run_dir / "checkpoints" / "last" / TRAIN_STATE).is_file()
    recorded = recorded_data(run_dir) if student_resume else {}
    if student_resume:
        if teacher is not None:  # the epochs to come learn from the same teacher's features as those saved
            check_same_data(run_dir, recorded, {"teacher": teacher.meta["content_hash"]})
        check_resumed_images(run_dir, recorded, data, preprocess)
    with main_process_first(ctx):
        cache, split = prepare(data, preprocess, seed=cfg.split_seed, val_fraction=cfg.val_fraction,
                               test_fraction=cfg.test_fraction, split_by=cfg.split_by,
                               progress=cfg.progress and ctx.is_main)
    rated_train = rated_subset(split.train, cfg.rated_fraction, cfg.split_seed)
    if teacher_dir is not None:
        check_teacher_split(teacher_dir, split, rated_train)
    unlabeled = unlabeled_data(cfg, cache, split, rated_train, teacher_dir, preprocess, ctx, device, say,
                                run_dir, recorded) if cfg.unlabeled else None
    extras = {}
    if variant.uses_teacher_features:
        with main_process_first(ctx):
            extras["teacher_features"] = teacher_features(
                teacher_dir, cache, device=str(device), batch_size=cfg.eval_batch_size,
                progress=cfg.progress and ctx.is_main, amp=cfg.amp)
    torch.manual_seed(cfg.seed)  # the student's random init (projection, or the whole encoder)
    student = create_student(cfg.student, teacher.head if teacher is not None else None, preprocess,
                             pretrained=cfg.pretrained, weights=cfg.student_weights)
    meta = {
        "stage": "distill", "label": f"{student.label} <- {teacher.label if teacher else 'no teacher'} "
        f"({variant.spec})", "student": student.label, "variant": variant.spec,
        "teacher": teacher.label if teacher is not None else None,
        "teacher_checkpoint": str(teacher_dir) if teacher_dir else None,
        "teacher_content_hash": teacher.meta["content_hash"] if teacher is not None else None,
        "dataset": data.to_dict(), "image_cache": cache.key,
    }
    if unlabeled is not None or cfg.rated_fraction < 1:
        meta["rated_train"] = {"images": len(rated_train), "fraction": cfg.rated_fraction}
    if unlabeled is not None:
        meta["unlabeled"] = {"sources": list(cfg.unlabeled), "images": len(unlabeled.rows),
                             "fraction": cfg.unlabeled_fraction, "pool": unlabeled.key}
    mixed = unlabeled is not None or rated_train != list(split.train)
    trainer_cls = MixedTrainer if mixed else Trainer
    trainer = trainer_cls(student, DistillLoss(variant), cache, split, train_cfg, run_dir, extras=extras,
                          scalars_fn=lambda step, total: {"lambda": variant.lam(step, total)},
                          extra_meta=meta, resume=student_resume, label="student train")
    if mixed:
        trainer.mix(rated_train, unlabeled, cfg.unlabeled_fraction, cfg.workers)
    trainer.write_summary = False  # written below, last, with the recipe's part: it marks the run finished
    trainer.setup()

    # -- train
    try:
        started = time.perf_counter()
        summary = trainer.train()
        summary["wall_seconds"] = time.perf_counter() - started

        # -- save: model facts, plots, summary
        if ctx.is_main:
            summary.update(_facts(student, teacher, preprocess))
            if "teacher_features" in extras:
                summary["teacher_features"] = str(Path(extras["teacher_features"].filename).parent)
            summary["lambda_schedule"] = {"variant": variant.spec, "total_steps": trainer.total_steps}
            if unlabeled is not None:
                summary["unlabeled"] = unlabeled.report
            summary["run_dir"] = str(run_dir)
            plots = write_distill_plots(run_dir, trainer.history, variant, trainer.total_steps,
                                        trainer.steps_per_epoch, meta["label"])
            summary["plots"] = [str(p) for p in plots]
            write_json(run_dir / "summary.json", summary)
        barrier(ctx)
    finally:
        trainer.cleanup()  # ends the trackers with the summary and plots; the process group stays run_distill's
    summary["run_dir"] = str(run_dir)
    return summary


def _facts(student, teacher, preprocess: PreprocessSpec) -> dict[str, Any]:
    facts = {"student_facts": model_facts(student, preprocess)}
    if teacher is not None:
        facts["teacher_facts"] = model_facts(teacher, teacher.preprocess)
        # teacher / student: above 1 the student is that many times smaller; below 1 it is the larger one
        # (a tiny teacher, a large student)
        facts["compression"] = {"teacher_over_student": {
            "params": _ratio(facts["teacher_facts"]["params"], facts["student_facts"]["params"]),
            "flops": _ratio(facts["teacher_facts"]["flops"], facts["student_facts"]["flops"]),
        }}
    return facts
