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

import numpy as np

from kdiqa_edge import config as config_lib
from kdiqa_edge import paths
from kdiqa_edge.console import plural
from kdiqa_edge.data.spec import DatasetSpec
from kdiqa_edge.errors import ConfigError
from kdiqa_edge.io import read_json, write_json
from kdiqa_edge.models.teacher import DEFAULT_TEACHER
from kdiqa_edge.preprocess import PreprocessSpec
from kdiqa_edge.train.loop import Trainer
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
    weight_decay: float = 0.05
    grad_accum: int = 1
    grad_clip: float | None = None
    augment: str = "hflip"  # hflip | none (on-device; the cached teacher features are of the unflipped image)
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
        grad_accum=cfg.grad_accum, grad_clip=cfg.grad_clip, augment=cfg.augment, seed=cfg.seed,
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
    done = (run_dir / "summary.json").is_file() and (run_dir / "checkpoints" / "best").is_dir()
    interrupted = (run_dir / "checkpoints" / "last" / TRAIN_STATE).is_file()
    _barrier(ctx)  # every process has looked before any of them writes
    if done:
        log(f"teacher: reusing the fine-tuned {finetune_cfg.teacher} in {run_dir}")
    else:
        log(f"teacher: fine-tuning {finetune_cfg.teacher} for {plural(finetune_cfg.epochs, 'epoch')} -> {run_dir}"
            + (" (resuming)" if interrupted else ""))
        run_finetune(finetune_cfg, data, run_dir, resume=interrupted)
        _barrier(ctx)  # rank 0 writes the feature cache after training; the others wait for it
    return run_dir / "checkpoints" / "best"


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


def rated_subset(train, fraction: float, seed: int) -> list[int]:
    """The training images whose ratings are used: a seeded `fraction` of them (all at 1, none at 0)."""
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"--rated-fraction must be within 0..1, got {fraction}")
    if fraction >= 1.0:
        return sorted(train)
    order = np.random.default_rng([seed, 0xA7ED]).permutation(np.asarray(sorted(train), dtype=np.int64))
    return sorted(int(i) for i in order[:round(fraction * len(order))])


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


def _barrier(ctx) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        dist.barrier()


@contextlib.contextmanager
def _main_first(ctx):
    """Rank 0 builds a cache first; the others then open it (no two processes write the same files)."""
    if ctx.enabled and not ctx.is_main:
        _barrier(ctx)
    yield
    if ctx.enabled and ctx.is_main:
        _barrier(ctx)


def _same_on_all_ranks(ctx, value):
    """Rank 0's value everywhere (a default run dir carries a timestamp that could differ across ranks)."""
    if not ctx.enabled:
        return value
    import torch.distributed as dist

    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _plain(value):
    """A config value as YAML/JSON reads it back (tuples are lists): a saved and a live config compare."""
    return json.loads(json.dumps(value, default=str))


def _check_resume(run_dir: Path, cfg: DistillConfig, data: DatasetSpec) -> None:
    """Refuse to resume `run_dir` with anything that changes what is trained (VOLATILE fields may change).

    Both sides are compared as saved: `cfg` through a JSON round trip, the saved dataset with its paths
    resolved as a resumed run resolves them (an older run's relative paths included) and made absolute.
    """
    from kdiqa_edge.data.runs import run_data

    saved = _plain(config_lib.load_file(run_dir / "config.yaml"))  # there: run_distill's `_require_run`
    current = _plain(config_lib.to_dict(cfg))
    changed = [k for k in current if k not in VOLATILE + ("dataset",) and k in saved and saved[k] != current[k]]
    run = run_data(run_dir) if saved.get("dataset") else None  # its dataset resolved as a resume resolves it
    if run is not None:
        before, after = run.dataset.to_dict(), data.to_dict()
        fields = [f"{k}: {before[k]} -> {after[k]}" for k in after if before.get(k) != after[k]]
        if fields:
            changed.append(f"dataset ({'; '.join(fields)})")
    if changed:
        raise ConfigError(f"cannot resume {run_dir} with a different config (changed: {', '.join(sorted(changed))})")


def _require_run(run_dir: Path) -> None:
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"nothing to resume in {run_dir} (no config.yaml)")


def _recorded_data(run_dir: Path) -> dict:
    """What the student's `last` recorded about its data (model.json: read before any cache is built)."""
    from kdiqa_edge.models.checkpoint import read_meta

    meta = read_meta(run_dir / "checkpoints" / "last")
    return {"image_cache": meta.get("image_cache"), "unlabeled_pool": (meta.get("unlabeled") or {}).get("pool")}


def _check_resumed_images(run_dir: Path, recorded: dict, data: DatasetSpec, preprocess: PreprocessSpec) -> None:
    """Refuse other images before the image cache is rebuilt for them (which would drop the run's own): the
    cache's key of the files now (a stat each, no decode) against the one the run trained on."""
    from kdiqa_edge.data import cache_key, load_dataset
    from kdiqa_edge.train.state import check_same_data

    check_same_data(run_dir, recorded, {"image_cache": cache_key(load_dataset(data), preprocess)})


def _resumed_teacher(run_dir: Path) -> Path | None:
    """The teacher checkpoint an interrupted student trained with (its `last` records it), if still there:
    the resumed run goes on with those features, whatever the teacher-run cache would pick today."""
    from kdiqa_edge.errors import CheckpointError
    from kdiqa_edge.models.checkpoint import read_meta

    try:
        meta = read_meta(run_dir / "checkpoints" / "last")
    except CheckpointError:
        return None
    recorded = meta.get("teacher_checkpoint")
    if not recorded or not Path(recorded).is_dir():
        return None
    try:
        same = read_meta(recorded).get("content_hash") == meta.get("teacher_content_hash")
    except CheckpointError:
        return None
    return Path(recorded) if same else None


# ----------------------------------------------------------------------------------------------------------
# Unlabeled images (--unlabeled): the soft loss needs no rating


def _absolute_source(source) -> str:
    """A SOURCE as a run records it: absolute (a brace pattern stays a pattern)."""
    return str(Path(str(source)).expanduser().absolute())


def check_unlabeled(cfg: DistillConfig, variant: Variant) -> None:
    """Refuse, before any work, the combinations that cannot train what they say."""
    if cfg.teacher_epochs is not None and cfg.teacher_epochs < 1:  # 0 would fall back to --epochs unsaid
        raise ConfigError(f"--teacher-epochs must be at least 1, got {cfg.teacher_epochs}")
    if cfg.workers < 0 or cfg.feature_shard_images < 1:
        raise ConfigError(f"--workers must be at least 0 and --feature-shard-images at least 1, got {cfg.workers} "
                          f"and {cfg.feature_shard_images}")
    if not 0.0 <= cfg.unlabeled_fraction < 1.0:
        raise ConfigError(f"--unlabeled-fraction must be within 0..1 (1 excluded: rated images train too), "
                          f"got {cfg.unlabeled_fraction}")
    if not 0.0 <= cfg.rated_fraction <= 1.0:
        raise ConfigError(f"--rated-fraction must be within 0..1, got {cfg.rated_fraction}")
    if cfg.unlabeled and not variant.uses_teacher_features:
        raise ConfigError(f"--unlabeled needs the soft loss (the teacher's features): --variant {variant.spec} "
                          f"has none, so unlabeled images would teach nothing")
    if cfg.rated_fraction == 0.0 and not cfg.unlabeled:
        raise ConfigError("--rated-fraction 0 leaves no training image: add --unlabeled SOURCE")
    if cfg.rated_fraction == 0.0 and not (variant.name == "soft" or variant.fixed == 1.0):
        raise ConfigError(f"--rated-fraction 0 trains on unlabeled images only: use --variant soft (--variant "
                          f"{variant.spec} has a hard loss, which needs ratings)")
    if cfg.rated_fraction < 1.0 and variant.uses_teacher_head and not cfg.teacher_checkpoint:
        raise ConfigError("--rated-fraction below 1 needs --teacher-checkpoint: a teacher fine-tuned on the rated "
                          "images only (the automatic fine-tune would read every training rating)")


@dataclasses.dataclass
class UnlabeledData:
    pool: Any  # data.unlabeled.UnlabeledPool: every image read, sorted by content hash
    rows: np.ndarray  # the pool rows that train (their features computed, the image decoded)
    features: Any  # train.features.UnlabeledFeatures, aligned with the pool
    images: np.ndarray | None  # the decoded cache (--image-cache), aligned with the pool; None: streamed
    key: str  # the pool's content key
    report: dict  # counts, sources, where the features are, who computed which shard


def _unlabeled_data(cfg: DistillConfig, cache, split, rated_train, teacher_dir, preprocess, ctx, device, say,
                    run_dir: Path, recorded: dict | None = None) -> UnlabeledData:
    """The pool (rank 0 reads and hashes it; the others get it), its decoded cache if asked, its teacher
    features (shards split over the ranks), and the skip report in the run dir. `recorded`: a resumed run's
    data (`_recorded_data`): another pool is refused before any of its features is computed."""
    from kdiqa_edge.data.records import write_skipped
    from kdiqa_edge.data.unlabeled import decoded_images, pool_key
    from kdiqa_edge.train.distributed import all_gather_object
    from kdiqa_edge.train.features import unlabeled_features
    from kdiqa_edge.train.state import check_same_data

    progress = cfg.progress and ctx.is_main
    pool = _same_on_all_ranks(ctx, _unlabeled_pool(cfg, cache, split, rated_train, progress) if ctx.is_main
                              else None)
    key = pool_key(pool, preprocess)
    check_same_data(run_dir, recorded or {}, {"unlabeled_pool": key})
    images, failed = None, {}
    if cfg.image_cache:
        with _main_first(ctx):
            images, failed = decoded_images(pool, preprocess, workers=cfg.workers, progress=progress)
    features = unlabeled_features(teacher_dir, pool, device=str(device), batch_size=cfg.eval_batch_size,
                                  progress=progress, workers=cfg.workers, images=images, ctx=ctx,
                                  shard_images=cfg.feature_shard_images)
    failed = {**features.failed, **failed}
    used = pool.without(failed, failed)
    if not len(used):
        raise ConfigError(f"no usable unlabeled image in {', '.join(cfg.unlabeled)}: {used.summary()}")
    report = {**used.counts, "sources": list(cfg.unlabeled), "fraction": cfg.unlabeled_fraction,
              "feature_shards": str(features.folder), "shards": len(features.shards),
              "computed_by_rank": all_gather_object(ctx, features.computed),
              "image_cache": cfg.image_cache}
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if used.skipped:
            report["skipped_csv"] = str(write_skipped(run_dir / "unlabeled_skipped.csv", used.skipped))
        say(f"unlabeled: {used.summary()}" + (f" (listed in {report['skipped_csv']})" if used.skipped else ""))
    rows = np.array([i for i in range(len(pool)) if i not in failed], dtype=np.int64)
    return UnlabeledData(pool, rows, features, images, key, report)


def _unlabeled_pool(cfg: DistillConfig, cache, split, rated_train, progress: bool):
    from kdiqa_edge.data.unlabeled import build_pool, rated_hashes

    # hidden ratings (--rated-fraction) are not rated: those images may come back as unlabeled
    exclude = rated_hashes(cache.dataset, dataclasses.replace(split, train=list(rated_train)))
    return build_pool(cfg.unlabeled, exclude, progress=progress)


def feature_task_config(cfg: DistillConfig) -> DistillConfig:
    """The config a feature task runs with: sources and teacher absolute (a task may start anywhere)."""
    return dataclasses.replace(cfg, unlabeled=[_absolute_source(s) for s in cfg.unlabeled],
                               teacher_checkpoint=_absolute_source(cfg.teacher_checkpoint), progress=False)


def unlabeled_feature_task(cfg: DistillConfig, data: DatasetSpec | None, task: int, tasks: int,
                           log=print) -> list[str]:
    """One SLURM array task's share of the unlabeled teacher features (shard i is task i % tasks's), for the
    pool `run_distill` would build with the same options; returns the shard keys it computed. A later
    `distill` with these options finds the shards done (and computes any a task left missing)."""
    from kdiqa_edge.data import prepare
    from kdiqa_edge.data.readers import absolute_spec
    from kdiqa_edge.models.checkpoint import read_meta
    from kdiqa_edge.train.features import unlabeled_features
    from kdiqa_edge.train.finetune import dataset_spec

    if not cfg.unlabeled or not cfg.teacher_checkpoint:
        raise ConfigError("feature tasks need --unlabeled and --teacher-checkpoint (every task must read the "
                          "same teacher)")
    if not 0 <= task < tasks:
        raise ConfigError(f"task {task} of {tasks}: the task must be within 0..{tasks - 1}")
    data = absolute_spec(dataset_spec(cfg, data))
    preprocess = PreprocessSpec.from_dict(read_meta(cfg.teacher_checkpoint)["preprocess"])
    cache, split = prepare(data, preprocess, seed=cfg.split_seed, val_fraction=cfg.val_fraction,
                           test_fraction=cfg.test_fraction, split_by=cfg.split_by, progress=cfg.progress)
    pool = _unlabeled_pool(cfg, cache, split, rated_subset(split.train, cfg.rated_fraction, cfg.split_seed),
                           cfg.progress)
    share = unlabeled_features(cfg.teacher_checkpoint, pool, device=cfg.device, batch_size=cfg.eval_batch_size,
                               progress=cfg.progress, workers=cfg.workers, task=task, tasks=tasks,
                               shard_images=cfg.feature_shard_images, share_only=True)
    log(f"feature task {task}/{tasks}: {len(share.computed)} shard(s) computed of {len(share.shards)} "
        f"({pool.summary()}) in {share.folder}")
    return share.computed


class MixedTrainer(Trainer):
    """The engine with its own batches: the rated training images (`rated_train`, a subset of the split's
    with --rated-fraction), and unlabeled images mixed into every batch (`loader.mixed_epoch`).

    The split (split.json, the test split, checkpoint selection) stays the rated dataset's.
    """

    def mix(self, rated_train, unlabeled: UnlabeledData | None, fraction: float, workers: int) -> MixedTrainer:
        self.rated_train, self.unlabeled, self.fraction, self.workers = list(rated_train), unlabeled, fraction, workers
        return self

    def _epoch_batches(self, epoch: int) -> list[list[np.ndarray]]:
        from kdiqa_edge.train.loader import mixed_epoch

        count = len(self.unlabeled.rows) if self.unlabeled is not None else 0
        micro = mixed_epoch(self.rated_train, count, len(self.cache), self.cfg.seed, epoch, self.micro_batch,
                            self.fraction, self.ctx.rank, self.ctx.world_size)
        return [micro[i:i + self.cfg.grad_accum] for i in range(0, len(micro), self.cfg.grad_accum)]

    def data_keys(self) -> dict[str, str]:
        keys = super().data_keys()
        if self.unlabeled is not None:
            keys["unlabeled_pool"] = self.unlabeled.key
        return keys

    def setup(self) -> MixedTrainer:
        from kdiqa_edge.train.loader import MixedLoader

        super().setup()
        if self.unlabeled is not None:
            u = self.unlabeled
            self.loader = MixedLoader(self.cache.images, self.cache.mos, self.extras, pool=u.pool, rows=u.rows,
                                      features=u.features, preprocess=self.model.preprocess,
                                      unlabeled_images=u.images, workers=self.workers,
                                      pin_memory=self.device.type == "cuda")
        return self


def _refuse_existing_run(run_dir: Path) -> None:
    if (run_dir / "checkpoints" / "last").exists():
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")


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

    if resume and out is None:
        raise ConfigError("--resume needs --out: the run dir to continue")
    if resume:
        _require_run(Path(out))  # first: a wrong --out is said as such, not as a default config's problem
    variant: Variant = parse_variant(cfg.variant)
    from kdiqa_edge.data.unlabeled import check_source

    for source in cfg.unlabeled:
        check_source(source)  # before the student's weights or any teacher work
    check_unlabeled(cfg, variant)
    check_student(cfg.student, cfg.pretrained, cfg.student_weights)  # fail before any teacher work
    cfg = dataclasses.replace(cfg, variant=variant.spec)
    train_cfg = TrainConfig.from_any(cfg).check()
    data = dataset_spec(cfg, data, Path(out) if resume else None)
    cfg = dataclasses.replace(cfg, dataset=data.to_dict(), workdir=str(Path.cwd()),
                              unlabeled=[_absolute_source(s) for s in cfg.unlabeled])
    if resume:
        _check_resume(Path(out), cfg, data)
        if run_finished(Path(out)):
            (log or print)(f"{out} is finished: nothing to resume (its summary follows)")
            return {**read_json(Path(out) / "summary.json"), "run_dir": str(out), "already_finished": True}
    else:
        if out is not None:
            _refuse_existing_run(Path(out))
        load_dataset(data)  # a dataset that cannot be read fails here, leaving no run dir behind

    # One process group for both stages (the engine leaves a group it did not create alone).
    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    ctx, device = init_distributed(cfg.device)
    run_dir = Path(out) if out else _same_on_all_ranks(ctx, default_run_dir(cfg, data))
    say = (log or print) if ctx.is_main else (lambda *_: None)
    if not resume and ctx.is_main:  # first: an interrupt in the teacher stage leaves a run --resume continues
        config_lib.save(cfg, run_dir / "config.yaml")
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
        teacher_dir = _resumed_teacher(resumed)
        if teacher_dir is not None:
            say(f"teacher: the one this run trained with, {teacher_dir}")
    if teacher_dir is None:
        teacher_dir = ensure_teacher(cfg, data, ctx, say)
    teacher = load_checkpoint(teacher_dir)
    if teacher.kind != "teacher":
        raise ConfigError(f"--teacher-checkpoint {teacher_dir} holds a {teacher.kind}, not a teacher")
    return teacher, teacher.checkpoint_dir


def _distill(cfg: DistillConfig, data: DatasetSpec, variant: Variant, train_cfg, teacher, teacher_dir,
             run_dir: Path, ctx, device, say, resume: bool) -> dict[str, Any]:
    """The student stage: data, teacher features, student, the engine, then summary and plots."""
    import torch

    from kdiqa_edge.data import prepare
    from kdiqa_edge.models.student import create_student
    from kdiqa_edge.train.features import feature_cache_path, teacher_features
    from kdiqa_edge.train.losses import DistillLoss
    from kdiqa_edge.train.state import TRAIN_STATE

    # -- setup: data, teacher features, student
    preprocess = student_preprocess(cfg, teacher)
    say(f"student: {cfg.student} at {preprocess.size} px (the teacher's preprocessing), "
        f"{plural(cfg.epochs, 'epoch')} -> {run_dir}")
    # a run interrupted before the student's first saved epoch starts the student afresh
    student_resume = resume and (run_dir / "checkpoints" / "last" / TRAIN_STATE).is_file()
    recorded = _recorded_data(run_dir) if student_resume else {}
    if student_resume:
        _check_resumed_images(run_dir, recorded, data, preprocess)
    with _main_first(ctx):
        cache, split = prepare(data, preprocess, seed=cfg.split_seed, val_fraction=cfg.val_fraction,
                               test_fraction=cfg.test_fraction, split_by=cfg.split_by,
                               progress=cfg.progress and ctx.is_main)
    rated_train = rated_subset(split.train, cfg.rated_fraction, cfg.split_seed)
    if teacher_dir is not None:
        check_teacher_split(teacher_dir, split, rated_train)
    unlabeled = _unlabeled_data(cfg, cache, split, rated_train, teacher_dir, preprocess, ctx, device, say,
                                run_dir, recorded) if cfg.unlabeled else None
    extras = {}
    if variant.uses_teacher_features:
        with _main_first(ctx):
            extras["teacher_features"] = teacher_features(
                teacher_dir, cache, device=str(device), batch_size=cfg.eval_batch_size,
                progress=cfg.progress and ctx.is_main)
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
                summary["teacher_features"] = str(feature_cache_path(teacher_dir, cache))
            summary["lambda_schedule"] = {"variant": variant.spec, "total_steps": trainer.total_steps}
            if unlabeled is not None:
                summary["unlabeled"] = unlabeled.report
            summary["run_dir"] = str(run_dir)
            plots = write_distill_plots(run_dir, trainer.history, variant, trainer.total_steps,
                                        trainer.steps_per_epoch, meta["label"])
            summary["plots"] = [str(p) for p in plots]
            write_json(run_dir / "summary.json", summary)
        _barrier(ctx)
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
