"""Teacher fine-tuning (the paper's first stage) and zero-shot evaluation.

Only CLIP's image encoder trains: the text tower is used once for the anchors and never enters the
model, and the anchors and logit_scale are frozen buffers of the head. The loss is the MSE between the
predicted score (1..5) and the MOS. Paper defaults: AdamW lr 5e-6, cosine to 0.1x, 100 epochs, batch 64,
224 x 224 (the input size is the teacher's own; `tiny` uses 64 px).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from kdiqa_edge import config as config_lib
from kdiqa_edge.data.spec import DatasetSpec
from kdiqa_edge.errors import ConfigError
from kdiqa_edge.metrics import IQAMetrics, evaluate
from kdiqa_edge.models.head import DEFAULT_TEMPLATES
from kdiqa_edge.models.teacher import DEFAULT_TEACHER

if TYPE_CHECKING:
    from kdiqa_edge.bench.accuracy import EvalSource


@dataclasses.dataclass
class FinetuneConfig:
    teacher: str = DEFAULT_TEACHER  # open_clip NAME:TAG, or a registered random-init config (tiny)
    teacher_weights: str | None = None  # local open_clip weights file for NAME (offline machines)
    templates: list = dataclasses.field(default_factory=lambda: list(DEFAULT_TEMPLATES))  # averaged prompts
    dataset: dict = dataclasses.field(default_factory=dict)  # DatasetSpec fields; CLI dataset options win
    split_seed: int = 0  # seed of the train/val/test split
    val_fraction: float = 0.0  # held out for model selection; 0 = select on the test split (paper protocol)
    test_fraction: float = 0.2  # the paper's random 80/20 split
    split_by: str = "auto"  # auto | ref | image | official
    epochs: int = 100
    batch_size: int = 64
    lr: float = 5e-6
    min_lr_ratio: float = 0.1  # cosine decay to 0.1x
    weight_decay: float = 0.05  # not stated in the paper (torch's AdamW default: 0.01)
    grad_accum: int = 1
    grad_clip: float | None = None
    augment: str = "hflip"  # hflip | none
    seed: int = 0  # data order and augmentation
    device: str = "auto"
    amp: bool = True
    channels_last: bool = True
    compile: bool = False
    eval_batch_size: int = 128
    select: str = "plcc+srcc"
    progress: bool = True
    features: bool = True  # write the teacher feature cache for distillation after training
    loggers: list = dataclasses.field(default_factory=list)  # trackers: tensorboard, mlflow, wandb (train/trackers/)
    mlflow_uri: str | None = None  # MLflow tracking URI (else MLFLOW_TRACKING_URI, else MLflow's default)
    workdir: str | None = None  # the folder the command ran in (set by run_finetune; how, not what, is trained)


# Fields that may change between an interrupted fine-tune and its --resume (how, not what, is trained).
VOLATILE = ("progress", "device", "compile", "eval_batch_size", "workdir", "features", "loggers",
            "mlflow_uri")


def finetune_loss(model, batch, step: int, total_steps: int) -> dict[str, torch.Tensor]:
    """MSE between the predicted score and the MOS, both 1..5."""
    return {"mse": F.mse_loss(model(batch["image"]).float(), batch["mos"])}


def freeze_all_but_image_encoder(teacher) -> list[str]:
    """The image encoder trains; everything else (the head's buffers) is frozen. Returns the trainable names."""
    teacher.requires_grad_(False)
    teacher.visual.requires_grad_(True)
    return [name for name, p in teacher.named_parameters() if p.requires_grad]


def dataset_spec(cfg, cli_data: DatasetSpec | None, resumed: Path | None = None) -> DatasetSpec:
    """The CLI's dataset options when given, else the config's `dataset`, else the synthetic set; with its
    paths absolute, as a run records them (a run dir is then usable from any folder).

    `resumed`: the run dir being resumed. Its config may be an older run's, with paths relative to where
    that command ran: they resolve as `data.runs.run_data` resolves them (the recorded `workdir`, the
    folders above the run dir, then the current folder).
    """
    from kdiqa_edge.data.readers import absolute_spec
    from kdiqa_edge.data.runs import run_bases

    if cli_data is not None and cli_data != DatasetSpec():
        return absolute_spec(cli_data)
    if not cfg.dataset:
        return DatasetSpec()
    spec = DatasetSpec.from_dict(cfg.dataset)
    return absolute_spec(spec, run_bases(Path(resumed), cfg.workdir) if resumed is not None else ())


def prepare_teacher_data(cfg: FinetuneConfig, data: DatasetSpec, preprocess, progress: bool = True):
    from kdiqa_edge.data import prepare

    return prepare(data, preprocess, seed=cfg.split_seed, val_fraction=cfg.val_fraction,
                   test_fraction=cfg.test_fraction, split_by=cfg.split_by, progress=progress)


def zero_shot(model, cache, indices, device: str = "auto", batch_size: int = 128, amp: bool = True) -> IQAMetrics:
    """Metrics of the model's scores on `cache.images[indices]` (no training)."""
    import numpy as np

    from kdiqa_edge.train.distributed import resolve_device
    from kdiqa_edge.train.predict import predict

    device = resolve_device(device)
    model.to(device)
    pred = predict(model, cache.images, indices, model.preprocess, device, batch_size, amp)
    return evaluate(pred, cache.mos[np.asarray(indices, dtype=np.int64)])


def run_finetune(cfg: FinetuneConfig, data: DatasetSpec | None = None, out: str | Path | None = None,
                 resume: bool = False) -> dict[str, Any]:
    """Fine-tune the teacher's image encoder; returns summary.json's content. The run dir layout is in
    docs/ARCHITECTURE.md."""
    from kdiqa_edge.data.split import check_split_options
    from kdiqa_edge.models.head import prompts_for
    from kdiqa_edge.models.teacher import check_teacher, load_teacher
    from kdiqa_edge.train.distributed import broadcast_object, init_distributed, main_process_first
    from kdiqa_edge.train.loop import TrainConfig, Trainer
    from kdiqa_edge.train.resume import check_resume, make_run_dir, require_run
    from kdiqa_edge.train.state import TRAIN_STATE

    train_cfg = TrainConfig.from_any(cfg).check()
    check_split_options(cfg.test_fraction, cfg.val_fraction, cfg.split_by)
    check_teacher(cfg.teacher, cfg.teacher_weights)  # before any work: a name, tag or weights file
    prompts_for(tuple(cfg.templates))
    run_dir = Path(out) if out else None
    if resume:
        require_run(run_dir)
    elif run_dir is not None:
        make_run_dir(run_dir)  # an --out that is a file, or cannot be made: one line before any work
    data = dataset_spec(cfg, data, run_dir if resume else None)
    cfg = dataclasses.replace(cfg, dataset=data.to_dict(), workdir=os.getcwd())
    if resume:  # another teacher, template or split: one line (the engine checks the schedule only)
        check_resume(run_dir, cfg, data, VOLATILE)
    run_dir = run_dir or default_run_dir(cfg, data)

    import torch.distributed as dist

    owns_group = not (dist.is_available() and dist.is_initialized())
    ctx, _ = init_distributed(cfg.device)  # torchrun: one group for the cache build and the training
    if out is None:  # the default name has a timestamp: every process takes rank 0's
        run_dir = broadcast_object(ctx, run_dir)
    trainer = None
    try:
        with main_process_first(ctx):  # one process builds the weights and image caches, the others open them
            teacher = load_teacher(cfg.teacher, cfg.teacher_weights, tuple(cfg.templates))
            cache, split = prepare_teacher_data(cfg, data, teacher.preprocess, progress=cfg.progress and ctx.is_main)
        freeze_all_but_image_encoder(teacher)
        meta = {"label": teacher.label, "dataset": data.to_dict(), "image_cache": cache.key,
                "stage": "teacher-finetune"}
        # a run interrupted before its first saved epoch starts afresh
        resume_state = resume and (run_dir / "checkpoints" / "last" / TRAIN_STATE).is_file()
        trainer = Trainer(teacher, finetune_loss, cache, split, train_cfg, run_dir, extra_meta=meta,
                          resume=resume_state, label="teacher train")
        trainer.write_summary = False  # written below, last, with the recipe's part: it marks the run finished
        trainer.setup()
        if trainer.ctx.is_main and not resume:
            config_lib.save(cfg, run_dir / "config.yaml")
        elif trainer.ctx.is_main:  # a resume's --logger / --mlflow-uri are the run's from now on
            config_lib.save(load_config(run_dir / "config.yaml", loggers=cfg.loggers, mlflow_uri=cfg.mlflow_uri),
                            run_dir / "config.yaml")
        zero = zero_shot_before(trainer, cache, split, train_cfg, run_dir, resume_state)
        started = time.perf_counter()
        summary = trainer.train()
        summary["wall_seconds"] = time.perf_counter() - started
        if zero is not None:
            summary["zero_shot_test"] = zero
        if cfg.features and trainer.ctx.is_main:
            from kdiqa_edge.train.features import teacher_features

            features = teacher_features(run_dir / "checkpoints" / "best", cache, device=str(trainer.device),
                                        batch_size=train_cfg.eval_batch_size, progress=cfg.progress,
                                        amp=train_cfg.amp)
            summary["teacher_features"] = {"path": str(Path(features.filename).parent),
                                           "shape": list(features.shape), "dtype": str(features.dtype)}
        if trainer.ctx.is_main:
            from kdiqa_edge.io import write_json

            write_json(run_dir / "summary.json", summary)
        summary["run_dir"] = str(run_dir)
        return summary
    except KeyboardInterrupt as exc:
        from kdiqa_edge.train.state import RunInterrupted

        if isinstance(exc, RunInterrupted):
            raise
        raise RunInterrupted(run_dir, "before the first epoch" if trainer is None or not trainer.epoch
                             else "after training") from exc
    finally:
        if trainer is not None:
            trainer.cleanup()
        if owns_group and ctx.enabled and dist.is_initialized():
            dist.destroy_process_group()


ZERO_SHOT_FILE = "zero_shot.json"


def zero_shot_before(trainer, cache, split, train_cfg, run_dir: Path, resumed: bool) -> dict | None:
    """The teacher's zero-shot test metrics before any training (what fine-tuning must beat), as a dict. Kept
    in the run dir when measured, so a resumed fine-tune, whose model has trained since, still reports them."""
    import numpy as np

    from kdiqa_edge.io import read_json, write_json
    from kdiqa_edge.train.predict import predict

    kept = Path(run_dir) / ZERO_SHOT_FILE
    if resumed:
        return read_json(kept) if kept.is_file() else None
    test = np.asarray(split.test, dtype=np.int64)
    if len(test) < 3:
        return None
    pred = predict(trainer.model, cache.images, test, trainer.model.preprocess, trainer.device,
                   train_cfg.eval_batch_size, train_cfg.amp, trainer.ctx)
    metrics = evaluate(pred, cache.mos[test]).to_dict()
    if trainer.ctx.is_main:
        write_json(kept, metrics)
    return metrics


def default_run_dir(cfg: FinetuneConfig, data: DatasetSpec) -> Path:
    arch = cfg.teacher.replace(":", "-").replace("/", "-")
    return Path("runs") / f"teacher-{arch}-{data.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def load_config(config_file: str | Path | None = None, **overrides) -> FinetuneConfig:
    """Defaults <- YAML/JSON file (e.g. a run's saved config.yaml) <- CLI overrides (None never overrides)."""
    return config_lib.resolve(FinetuneConfig, config_file, **overrides)


NOT_YOUR_DATA = "scores on the built-in synthetic set, NOT your data"


def teacher_eval_source(data: DatasetSpec | None, checkpoint: str | Path | None = None,
                        seed: int | None = None) -> tuple[EvalSource, str | None]:
    """Which images `teacher eval` scores, decided as bench decides its own (`accuracy.eval_source`, the
    checkpoint's run as the reference), and the headline said first when they are the built-in set."""
    from kdiqa_edge.bench.accuracy import SYNTHETIC, eval_source

    source = eval_source(checkpoint, data, seed)
    if source.origin != SYNTHETIC:
        return source, None
    reason = (f"--checkpoint {checkpoint} is not in a run dir (no config.yaml beside it)" if checkpoint
              else "no dataset options")
    return source, f"{NOT_YOUR_DATA}: {reason}; pass the dataset options (--dataset, --root ...)"


def _split_beside(checkpoint: str | Path | None) -> Path | None:
    """The split.json two folders above a checkpoint (RUN/checkpoints/best) in a run dir without config.yaml."""
    if checkpoint is None:
        return None
    path = Path(checkpoint).parent.parent / "split.json"
    return path if path.is_file() else None


def evaluate_teacher(data: DatasetSpec | None = None, teacher: str | None = None, weights: str | Path | None = None,
                     checkpoint: str | Path | None = None, templates=None, split: str = "test",
                     seed: int | None = None, test_fraction: float | None = None, batch_size: int = 128,
                     device: str = "auto", progress: bool = True, log=None) -> dict[str, Any]:
    """Zero-shot (or fine-tuned, with `checkpoint`) metrics of a teacher on one split of a dataset: the
    dataset `teacher_eval_source` picks; `log` hears its headline and notes before the work."""
    import numpy as np

    from kdiqa_edge.bench.accuracy import FROM_RUN
    from kdiqa_edge.data import Split, prepare
    from kdiqa_edge.errors import DataError
    from kdiqa_edge.models.checkpoint import load_checkpoint
    from kdiqa_edge.models.teacher import load_teacher

    say = log or (lambda line: None)
    if checkpoint is not None:
        model = load_checkpoint(checkpoint)
        mode = f"fine-tuned checkpoint {model.checkpoint_dir}"
    else:
        model = load_teacher(teacher or DEFAULT_TEACHER, weights, tuple(templates or DEFAULT_TEMPLATES))
        mode = "zero-shot"
    source, headline = teacher_eval_source(data, checkpoint, seed)
    for line in ([headline] if headline else []) + [f"note: {note}" for note in source.notes]:
        say(line)
    cache, parts = prepare(source.dataset, model.preprocess, progress=progress, seed=source.split_seed,
                           val_fraction=source.val_fraction, split_by=source.split_by,
                           test_fraction=source.test_fraction if test_fraction is None else test_fraction)
    own_split = source.origin == FROM_RUN
    split_file = source.split_file if own_split else _split_beside(checkpoint)
    if split_file is not None:
        try:  # the fine-tune's own test images, never its training images
            parts = Split.load(split_file).check(cache.dataset)
            mode += " (the run's split)"
        except DataError as exc:  # another image list (cross-dataset evaluation): the fresh split applies
            if own_split:
                say(f"note: not using {split_file} ({exc}); split with seed {source.split_seed} instead")
    indices = np.arange(len(cache)) if split == "all" else getattr(parts, split)
    if len(indices) < 3:
        raise ConfigError(f"the {split} split has {len(indices)} images: too few to correlate" + (
            " (a val split is a run's own, made by its --val-fraction: pass --checkpoint of such a run)"
            if split == "val" and not len(indices) else ""))
    metrics = zero_shot(model, cache, indices, device, batch_size)
    return {
        "teacher": model.label, "pretrained": bool(model.pretrained), "mode": mode,
        "dataset": source.dataset.name, "source": source.where, "headline": headline,
        "notes": list(source.notes), "split": split, "metrics": metrics.to_dict(),
        "prompts": model.head.prompts, "logit_scale": float(model.head.logit_scale),
    }
