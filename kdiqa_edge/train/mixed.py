"""Distillation on rated and unlabeled images (`distill --unlabeled`, `--rated-fraction`): the soft loss needs
no rating, so the teacher's features of any image folder teach the student too.

The pool of unlabeled images (`data.unlabeled`), its teacher features (`train.features`, sharded, SLURM array
tasks included) and the engine whose batches mix both (`MixedTrainer`). The split, the test images and
checkpoint selection stay the rated dataset's. `cfg` here is a `train.distill.DistillConfig`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from kdiqa_edge.data.spec import DatasetSpec
from kdiqa_edge.errors import ConfigError
from kdiqa_edge.preprocess import PreprocessSpec
from kdiqa_edge.train.distributed import all_gather_object, broadcast_object, main_process_first
from kdiqa_edge.train.loop import Trainer
from kdiqa_edge.train.schedules import Variant


def rated_subset(train, fraction: float, seed: int) -> list[int]:
    """The training images whose ratings are used: a seeded `fraction` of them (all at 1, none at 0)."""
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"--rated-fraction must be within 0..1, got {fraction}")
    if fraction >= 1.0:
        return sorted(train)
    order = np.random.default_rng([seed, 0xA7ED]).permutation(np.asarray(sorted(train), dtype=np.int64))
    return sorted(int(i) for i in order[:round(fraction * len(order))])



def absolute_source(source) -> str:
    """A SOURCE as a run records it: absolute (a brace pattern stays a pattern)."""
    return str(Path(str(source)).expanduser().absolute())


def check_unlabeled(cfg, variant: Variant) -> None:
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


def unlabeled_data(cfg, cache, split, rated_train, teacher_dir, preprocess, ctx, device, say,
                    run_dir: Path, recorded: dict | None = None) -> UnlabeledData:
    """The pool (rank 0 reads and hashes it; the others get it), its decoded cache if asked, its teacher
    features (shards split over the ranks), and the skip report in the run dir. `recorded`: a resumed run's
    data (`resume.recorded_data`): another pool is refused before any of its features is computed."""
    from kdiqa_edge.data.records import write_skipped
    from kdiqa_edge.data.unlabeled import decoded_images, pool_key
    from kdiqa_edge.train.features import unlabeled_features
    from kdiqa_edge.train.state import check_same_data

    progress = cfg.progress and ctx.is_main
    pool = broadcast_object(ctx, _unlabeled_pool(cfg, cache, split, rated_train, progress) if ctx.is_main
                              else None)
    key = pool_key(pool, preprocess)
    check_same_data(run_dir, recorded or {}, {"unlabeled_pool": key})
    images, failed = None, {}
    if cfg.image_cache:
        with main_process_first(ctx):
            images, failed = decoded_images(pool, preprocess, workers=cfg.workers, progress=progress)
    features = unlabeled_features(teacher_dir, pool, device=str(device), batch_size=cfg.eval_batch_size,
                                  progress=progress, workers=cfg.workers, images=images, ctx=ctx,
                                  shard_images=cfg.feature_shard_images, amp=cfg.amp)
    failed = {**features.failed, **failed}
    used = pool.without(failed, failed)
    listed = None
    if ctx.is_main and used.skipped:  # first: a pool with nothing usable is refused with its reasons written
        run_dir.mkdir(parents=True, exist_ok=True)
        listed = str(write_skipped(run_dir / "unlabeled_skipped.csv", used.skipped))
    if not len(used):
        raise ConfigError(f"no usable unlabeled image in {', '.join(cfg.unlabeled)}: {used.summary()}"
                          + (f" (every file's reason: {listed})" if listed else ""))
    report = {**used.counts, "sources": list(cfg.unlabeled), "fraction": cfg.unlabeled_fraction,
              "feature_shards": str(features.folder), "shards": len(features.shards),
              "computed_by_rank": all_gather_object(ctx, features.computed),
              "image_cache": cfg.image_cache, **({"skipped_csv": listed} if listed else {})}
    if ctx.is_main:
        say(f"unlabeled: {used.summary()}" + (f" (listed in {listed})" if listed else ""))
    rows = np.array([i for i in range(len(pool)) if i not in failed], dtype=np.int64)
    return UnlabeledData(pool, rows, features, images, key, report)


def _unlabeled_pool(cfg, cache, split, rated_train, progress: bool):
    from kdiqa_edge.data.unlabeled import build_pool, rated_hashes

    # hidden ratings (--rated-fraction) are not rated: those images may come back as unlabeled
    exclude = rated_hashes(cache.dataset, dataclasses.replace(split, train=list(rated_train)))
    return build_pool(cfg.unlabeled, exclude, progress=progress)


def feature_task_config(cfg):
    """The config a feature task runs with: sources and teacher absolute (a task may start anywhere)."""
    return dataclasses.replace(cfg, unlabeled=[absolute_source(s) for s in cfg.unlabeled],
                               teacher_checkpoint=absolute_source(cfg.teacher_checkpoint), progress=False)


def unlabeled_feature_task(cfg, data: DatasetSpec | None, task: int, tasks: int,
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
                               shard_images=cfg.feature_shard_images, share_only=True, amp=cfg.amp)
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
