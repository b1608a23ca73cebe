"""The one training recipe shared by the teacher fine-tune and distillation.

Shape: `Trainer.setup()` / `train()` / `save_checkpoint()` / `cleanup()` (torchtune's recipe interface),
with the model-specific part a pluggable `loss_fn(model, batch, step, total_steps) -> {name: term}`
whose sum is the loss. The rooms it draws on, each readable alone:

- `train/loader.py`: batches of uint8 pixels from the ImageCache, gathered in a background thread (pinned on
  CUDA), moved to the device, normalized and augmented THERE; extra per-image arrays (cached teacher
  features) ride along, looked up by image index; the per-epoch permutation;
- `train/step.py`: the model + loss as one module, AdamW, cosine decay of the learning rate per optimizer
  step to `min_lr_ratio` x lr, bf16 autocast where supported (fp16 + GradScaler otherwise), torch.compile
  of the image encoder;
- `train/distributed.py`: torch DDP when launched by torchrun (gloo on CPU, nccl on CUDA): each process
  trains on its shard of a shared per-epoch permutation; rank 0 writes; losses and predictions are
  gathered before metrics;
- `train/predict.py`: scores for evaluation every epoch (kdiqa_edge.metrics.evaluate);
- `train/state.py`: checkpoints `last` and `best`, metrics.csv, steps.csv, and `--resume`: model,
  optimizer, scheduler, grad scaler, RNG, step and history restored from `last`. The data order and the
  augmentation of epoch e depend only on (seed, e), so a resumed run replays exactly the batches the
  uninterrupted run would have seen.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdiqa_edge.config import to_dict
from kdiqa_edge.errors import CheckpointError, ConfigError, KdiqaError
from kdiqa_edge.io import read_json, sweep_temporaries, write_json
from kdiqa_edge.metrics import IQAMetrics, evaluate
from kdiqa_edge.train.distributed import (
    all_reduce_sum,
    barrier,
    broadcast_object,
    destroy_process_group,
    init_distributed,
    process_group_exists,
)
from kdiqa_edge.train.loader import BatchLoader, DeviceTransform, epoch_order
from kdiqa_edge.train.predict import predict
from kdiqa_edge.train.state import (
    TRAIN_STATE,
    WALL_CLOCK,
    RunInterrupted,
    complete_saved_epoch,
    load_train_state,
    ratings_key,
    recover_last,
    rng_state,
    save_last,
    set_rng_state,
    step_rows,
    write_metrics_csv,
    write_step_log,
)
from kdiqa_edge.train.step import (
    LossFn,
    LossStep,
    ScalarsFn,
    autocast_for,
    build_optimizer,
    compile_encoder,
    cosine_factor,
)

METRIC_NAMES = ("plcc", "plcc_fit", "srcc", "krcc", "rmse")


class TrainingError(KdiqaError):
    """Training cannot go on (a diverged loss, an inconsistent run dir)."""


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 100  # passes over the training split
    batch_size: int = 64  # images per optimizer step, all processes and accumulation steps together
    lr: float = 5e-6  # peak AdamW learning rate
    min_lr_ratio: float = 0.1  # the cosine schedule ends at lr * min_lr_ratio
    weight_decay: float = 0.05  # AdamW decay on weight matrices (not on biases, norms, embeddings' scales)
    grad_accum: int = 1  # micro-batches per optimizer step
    grad_clip: float | None = None  # clip the global gradient norm to this, if set
    augment: str = "hflip"  # on-device train augmentation: hflip | none (crops would change quality)
    seed: int = 0  # data order, augmentation and init noise
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # CUDA: bf16 autocast where supported, else fp16 with a grad scaler
    channels_last: bool = True  # CUDA: channels_last memory format
    compile: bool = False  # torch.compile the image encoder (CUDA: 1.25-1.3x for 20-60 s of compile)
    eval_batch_size: int = 128  # images per forward pass at evaluation
    select: str = "plcc+srcc"  # which eval metric picks `best`: plcc+srcc | srcc | plcc
    progress: bool = True  # progress: a rich bar in a terminal, plain periodic lines in a log
    loggers: list = dataclasses.field(default_factory=list)  # trackers fed as the run goes: tensorboard, mlflow, wandb
    mlflow_uri: str | None = None  # MLflow tracking URI (else MLFLOW_TRACKING_URI, else MLflow's default)

    @classmethod
    def from_any(cls, cfg) -> TrainConfig:
        """The training fields of a larger recipe config (fine-tune, distill) that shares their names."""
        values = to_dict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})

    def check(self) -> TrainConfig:
        if self.epochs < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("epochs, batch_size and grad_accum must be at least 1")
        if not 0 < self.lr < math.inf or not 0 <= self.min_lr_ratio <= 1:  # NaN fails both
            raise ConfigError(f"lr must be a positive number and min_lr_ratio within [0, 1], got {self.lr} "
                              f"and {self.min_lr_ratio}")
        if not 0 <= self.weight_decay < math.inf:  # negative decay grows the weights; NaN poisons them
            raise ConfigError(f"weight_decay must be a number of at least 0, got {self.weight_decay}")
        if self.grad_clip is not None and not 0 < self.grad_clip < math.inf:
            raise ConfigError(f"grad_clip must be a positive number (or unset), got {self.grad_clip}")
        if self.eval_batch_size < 1:
            raise ConfigError(f"eval_batch_size must be at least 1, got {self.eval_batch_size}")
        if self.augment not in ("hflip", "none"):
            raise ConfigError(f"augment must be hflip or none, got {self.augment!r}")
        if self.select not in ("plcc+srcc", "srcc", "plcc"):
            raise ConfigError(f"select must be plcc+srcc, srcc or plcc, got {self.select!r}")
        from kdiqa_edge.train.trackers import check_loggers

        # a missing package, an MLflow store that cannot work: one line, before any work
        self.loggers = check_loggers(self.loggers, self.mlflow_uri)
        return self



@dataclasses.dataclass
class EpochResult:
    row: dict[str, Any]
    metrics: IQAMetrics


class Trainer:
    """Generic train loop over an ImageCache and a Split. `fit()` = setup + train + cleanup.

    model: an IQA model (`encode`, `head`, `preprocess`, `forward`, `kind`, `checkpoint_meta()`); only its
      parameters with requires_grad train. loss_fn(model, batch, step, total_steps) -> {name: scalar tensor};
      batch = {"image": float NCHW normalized, "mos": [B], "index": [B], **extras rows}.
    scalars_fn(step, total_steps) -> {name: float}: logged per epoch (mean), e.g. the distillation lambda.
    extra_meta: stored in every checkpoint's model.json and in summary.json (dataset, teacher, config...).
    label: what the progress lines are called (`teacher train`, `student train`: distill runs two stages).
    Ctrl-C during `train()` raises `RunInterrupted` (a KeyboardInterrupt) naming the run dir and the epoch.
    cfg.loggers: trackers (train/trackers/) fed by rank 0 as the run goes, ended by `cleanup()`.
    """

    interrupt_after_steps: int | None = None  # tests: simulate a crash after this many steps
    # finish() writes summary.json, which marks the run finished; a recipe that adds to the summary after
    # finish() sets this False and writes it itself, last (else a kill in between leaves a "finished" run
    # without the recipe's part)
    write_summary: bool = True

    def __init__(self, model: nn.Module, loss_fn: LossFn, cache, split, cfg: TrainConfig, run_dir: str | Path,
                 *, extras: Mapping[str, np.ndarray] | None = None, scalars_fn: ScalarsFn | None = None,
                 extra_meta: dict | None = None, resume: bool = False, label: str = "train"):
        self.model = model
        self.loss_fn = loss_fn
        self.cache = cache
        self.split = split
        self.cfg = cfg.check()
        self.run_dir = Path(run_dir)
        self.extras = extras or {}
        self.scalars_fn = scalars_fn
        self.extra_meta = dict(extra_meta or {})
        self.resume = resume
        self.label = label
        self.scalar_names: set[str] = set()  # scalars_fn's names (the lambda schedule): not loss terms
        self.history: list[dict] = []
        self.best: dict[str, Any] = {"epoch": None, "value": -math.inf}
        self.epoch = 0  # epochs completed
        self.step = 0  # optimizer steps completed
        self.trackers = None  # trackers.run.TrackedRun, on rank 0 with cfg.loggers, from train() to cleanup()
        self._epoch_steps: list[dict] = []  # this epoch's steps.csv rows
        # benchmarks: time data (gather + copy + normalize/augment), forward/backward/step and the rest of
        # each step, synchronizing the device at every boundary (slows CUDA a little; off by default)
        self.profile_steps = False
        self.step_timings: dict[str, float] = {}
        self._last_tick: float | None = None

    # -- setup ------------------------------------------------------------------------------------------
    def setup(self) -> Trainer:
        cfg = self.cfg
        # A process group that already exists (a pipeline running several stages, e.g. distill's teacher
        # fine-tune) belongs to the caller: cleanup() leaves it alone.
        self._owns_process_group = not process_group_exists()
        self.ctx, self.device = init_distributed(cfg.device)
        self.eval_split, self.eval_indices = ("val", self.split.val) if self.split.val else ("test", self.split.test)
        if len(self.eval_indices) < 3:  # every epoch correlates on it: said now, not after the first epoch
            larger = "--val-fraction" if self.split.val else "test_fraction (a --config field)"
            raise ConfigError(f"the {self.eval_split} split has {len(self.eval_indices)} image(s), too few to "
                              f"evaluate an epoch on (at least 3): use more images or a larger {larger}")
        per_process = cfg.batch_size // (self.ctx.world_size * cfg.grad_accum)
        if per_process < 1 or cfg.batch_size % (self.ctx.world_size * cfg.grad_accum):
            raise ConfigError(f"batch_size {cfg.batch_size} must be a multiple of processes x grad_accum "
                              f"({self.ctx.world_size} x {cfg.grad_accum})")
        self.micro_batch = per_process
        self.steps_per_epoch = len(self._epoch_batches(0))  # a recipe that mixes in other images counts them
        if not self.steps_per_epoch:
            raise ConfigError("the training split is empty")
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if self.scalars_fn is not None:
            self.scalar_names = set(self.scalars_fn(0, self.total_steps))

        cuda = self.device.type == "cuda"
        self.model.to(self.device)
        if cuda and cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not self.params:
            raise ConfigError("the model has no trainable parameters")
        self.optimizer = build_optimizer(self.params, cfg, fused=cuda)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, functools.partial(cosine_factor, total_steps=self.total_steps, min_ratio=cfg.min_lr_ratio))
        self.autocast, amp_dtype = autocast_for(self.device, cfg.amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
        self.transform = DeviceTransform(self.model.preprocess, self.device, channels_last=cuda and cfg.channels_last)
        self.loader = BatchLoader(self.cache.images, self.cache.mos, self.extras, pin_memory=cuda)

        step_module: nn.Module = LossStep(self.model, self.loss_fn)
        if self.ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel

            step_module = DistributedDataParallel(step_module, device_ids=[self.device] if cuda else None)
        self.ddp_module = step_module if self.ctx.enabled else None
        self.train_step_module = step_module
        if cfg.compile:
            compile_encoder(self.model)

        self.trained_on = self.data_keys()
        self._prepare_run_dir()
        return self

    def data_keys(self) -> dict[str, str]:
        """What this run trains on (`state.DATA_KEYS`), recorded in every train state: a resume that reads
        other images or ratings is refused. A recipe that trains on more (unlabeled images) adds its key."""
        dataset = getattr(self.cache, "dataset", None)  # an in-memory cache (the benchmarks') names no dataset
        return {"image_cache": self.cache.key, **({"ratings": ratings_key(dataset)} if dataset is not None else {})}

    def _prepare_run_dir(self) -> None:
        last = self.run_dir / "checkpoints" / "last"
        problem = None  # decided on rank 0, raised on every rank (one rank raising alone hangs the others)
        if self.ctx.is_main:
            # first: a save of `last` killed between removing the old one and renaming the new one in left
            # the new one staged, which the sweep below would remove
            recovered = recover_last(self.run_dir)
            for folder in (self.run_dir, self.run_dir / "checkpoints", last, self.run_dir / "plots"):
                sweep_temporaries(folder)  # what a run killed mid-write left behind (never a live process's)
            if recovered is not None and not self.resume:
                problem = (f"{self.run_dir}: a kill interrupted the save of epoch {recovered}; that checkpoint is "
                           "recovered as checkpoints/last: pass --resume to continue from it")
        if problem := broadcast_object(self.ctx, problem):
            raise CheckpointError(problem)
        if self.resume:
            if not (last / TRAIN_STATE).is_file():
                raise CheckpointError(f"nothing to resume: {last / TRAIN_STATE} not found")
            self._load_state(last)
        elif last.exists():
            raise ConfigError(f"{self.run_dir} already holds a run; pass --resume to continue it or choose another --out")
        if self.ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            split_path = self.run_dir / "split.json"
            if self.resume and split_path.is_file():
                saved = read_json(split_path)
                if [saved["train"], saved["val"], saved["test"]] != [list(self.split.train), list(self.split.val),
                                                                     list(self.split.test)]:
                    problem = f"{split_path} differs from this run's split: resume with the same dataset and seed"
            else:
                self.split.save(split_path)
        if problem := broadcast_object(self.ctx, problem):  # also the barrier: the run dir is ready
            raise ConfigError(problem)

    # -- train ------------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        self._start_trackers()
        try:
            self._train_epochs()
        except RunInterrupted:
            raise
        except KeyboardInterrupt as exc:  # Ctrl-C: `last` holds every completed epoch
            raise RunInterrupted(self.run_dir, f"at epoch {self.epoch + 1}/{self.cfg.epochs}") from exc
        return self.finish()

    def _train_epochs(self) -> None:
        from kdiqa_edge.console import Progress

        # on stdout, with the epoch lines: `distill > log` keeps the training's story in one file
        with Progress(self.label, self.total_steps, unit="steps", stream="stdout", completed=self.step,
                      enabled=self.cfg.progress and self.ctx.is_main) as progress:
            while self.epoch < self.cfg.epochs:
                result = self._train_epoch(progress)
                self.history.append(result.row)
                improved = self._score(result.metrics) > self.best["value"]
                if improved:
                    self.best = {"epoch": self.epoch, "value": self._score(result.metrics)}
                self.save_checkpoint(best=improved)
                if self.trackers is not None:  # what the checkpoint holds: a resume never sends an epoch twice
                    self.trackers.epoch(self._epoch_steps, result.row)
                # printed once, as an event line (not also as the bar's trailing info, which a log
                # file's final progress line would repeat)
                progress.print(f"{self.label}: epoch {self.epoch}/{self.cfg.epochs} loss {result.row['loss']:.4f} "
                               f"{self.eval_split} PLCC {result.metrics.plcc:.4f} SRCC {result.metrics.srcc:.4f}"
                               + (" (best)" if improved else ""))

    def _score(self, m: IQAMetrics) -> float:
        return {"plcc+srcc": m.plcc + m.srcc, "srcc": m.srcc, "plcc": m.plcc}[self.cfg.select]

    def _epoch_batches(self, epoch: int) -> list[list[np.ndarray]]:
        """Optimizer steps of this epoch, each a list of micro-batch index arrays."""
        order = epoch_order(self.split.train, self.cfg.seed, epoch, self.ctx.rank, self.ctx.world_size)
        micro = [order[i:i + self.micro_batch] for i in range(0, len(order), self.micro_batch)]
        return [micro[i:i + self.cfg.grad_accum] for i in range(0, len(micro), self.cfg.grad_accum)]

    def _seed_epoch(self, epoch: int) -> torch.Generator | None:
        """Everything random in epoch e follows from (seed, e, rank): resume replays it exactly."""
        seed = (self.cfg.seed * 1_000_003 + epoch * 7919 + self.ctx.rank) % (2 ** 63)
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % (2 ** 32))
        if self.cfg.augment == "none":
            return None
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed)
        return generator

    def _train_epoch(self, progress) -> EpochResult:
        epoch = self.epoch
        self.step_timings, self._last_tick = {}, None  # profile_steps: this epoch's phases only
        flip_generator = self._seed_epoch(epoch)
        steps = self._epoch_batches(epoch)
        self.model.train()
        sums: dict[str, torch.Tensor] = {}
        scalar_sums: dict[str, float] = {}
        step_log: list[tuple[dict, dict[str, torch.Tensor]]] = []  # per optimizer step; read once per epoch
        images = 0
        start = time.perf_counter()
        micro_batches = [m for step in steps for m in step]
        batches = self.loader(micro_batches)
        for group in steps:
            group_images = sum(len(m) for m in group)
            for i, _ in enumerate(group):
                self._tick("other")
                batch = self.transform(next(batches), flip_generator)
                self._tick("data")
                sync = self.ddp_module.no_sync() if self.ddp_module is not None and i < len(group) - 1 \
                    else contextlib.nullcontext()
                with sync:
                    with self.autocast():
                        terms = self.train_step_module(batch, self.step, self.total_steps)
                        loss = sum(terms.values())
                    self.scaler.scale(loss * (batch["mos"].shape[0] / group_images)).backward()
                self._tick("forward_backward")
                weight = batch["mos"].shape[0]
                for name, value in {"loss": loss, **terms}.items():
                    sums[name] = sums.get(name, 0.0) + value.detach().float() * weight
                images += weight
            scalars = self.scalars_fn(self.step, self.total_steps) if self.scalars_fn is not None else {}
            for name, value in scalars.items():
                scalar_sums[name] = scalar_sums.get(name, 0.0) + float(value)
            step_log.append(({"epoch": epoch + 1, "step": self.step, "lr": self.optimizer.param_groups[0]["lr"],
                              **{k: float(v) for k, v in scalars.items()}},
                             {name: value.detach().float() for name, value in {"loss": loss, **terms}.items()}))
            self._tick("other")
            self._optimizer_step()
            self._tick("forward_backward")
            progress.advance(1, images=group_images * self.ctx.world_size)
            if self.interrupt_after_steps is not None and self.step >= self.interrupt_after_steps:
                raise KeyboardInterrupt(f"interrupted after step {self.step} (test hook)")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        self._write_step_log(step_log)
        self.epoch += 1
        row = {"epoch": self.epoch, "step": self.step, "lr": self.optimizer.param_groups[0]["lr"]}
        row.update(self._reduce_means(sums, images))
        for name, total in scalar_sums.items():
            row[name] = total / len(steps)
        metrics = self._evaluate(self.eval_indices)
        row.update({"eval_split": self.eval_split, **{k: getattr(metrics, k) for k in METRIC_NAMES},
                    "train_seconds": seconds, "images_per_s": images * self.ctx.world_size / max(seconds, 1e-9)})
        return EpochResult(row, metrics)

    def _write_step_log(self, step_log) -> None:
        if self.ctx.is_main:
            self._epoch_steps = step_rows(step_log)
            with self._writing(f"epoch {self.epoch + 1}'s steps.csv rows"):
                write_step_log(self.run_dir / "steps.csv", self._epoch_steps)

    # -- trackers -----------------------------------------------------------------------------------------
    def _start_trackers(self) -> None:
        """Open cfg.loggers' runs (reopen them on resume, and send what they missed) on rank 0."""
        if not self.cfg.loggers or not self.ctx.is_main or self.trackers is not None:
            return
        from kdiqa_edge.train.trackers.base import RunInfo, experiment_name, run_name, run_tags
        from kdiqa_edge.train.trackers.run import TrackedRun

        config = self._run_config()
        stage = str(self.extra_meta.get("stage", "train"))
        run_dir = self.run_dir.resolve()
        run = RunInfo(run_dir=run_dir, name=run_name(run_dir), experiment=experiment_name(config, stage), stage=stage,
                      config=config, eval_split=self.eval_split, tags=run_tags(config, stage),
                      mlflow_uri=self.cfg.mlflow_uri)
        # held before they start: cleanup() ends whatever started, a Ctrl-C inside start() included
        self.trackers = TrackedRun(self.cfg.loggers, run, METRIC_NAMES)
        self.trackers.start(self.step)
        if self.step:
            self.trackers.catch_up(self.run_dir / "steps.csv", self.history, self.step)

    def _run_config(self) -> dict[str, Any]:
        """The recipe's config as run (config.yaml, which both recipes write before training), else the
        training config and the dataset; without the trackers' own settings."""
        from kdiqa_edge.config import load_file

        path = self.run_dir / "config.yaml"
        config = load_file(path) if path.is_file() else {**to_dict(self.cfg), "dataset": self.extra_meta.get("dataset") or {}}
        return {k: v for k, v in config.items() if k not in ("loggers", "mlflow_uri")}

    def _tick(self, phase: str) -> None:
        """With `profile_steps` set, charge the time since the last tick to `phase` (device synchronized)."""
        if not self.profile_steps:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        if self._last_tick is not None:
            self.step_timings[phase] = self.step_timings.get(phase, 0.0) + now - self._last_tick
        self._last_tick = now

    def _optimizer_step(self) -> None:
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for _, p in self.params], self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1

    def _reduce_means(self, sums: dict[str, torch.Tensor], images: int) -> dict[str, float]:
        names = sorted(sums)
        packed = torch.stack([sums[n] for n in names] + [torch.tensor(float(images), device=self.device)])
        values = all_reduce_sum(self.ctx, packed).cpu().tolist()
        means = {name: values[i] / values[-1] for i, name in enumerate(names)}
        if not math.isfinite(means["loss"]):
            raise TrainingError(f"the training loss is {means['loss']} at epoch {self.epoch}: lower --lr, or check the data")
        return means

    def _evaluate(self, indices: Sequence[int]) -> IQAMetrics:
        pred = predict(self.model, self.cache.images, indices, self.model.preprocess, self.device,
                       self.cfg.eval_batch_size, self.cfg.amp, self.ctx)
        return evaluate(pred, self.cache.mos[np.asarray(indices, dtype=np.int64)])

    # -- checkpoints --------------------------------------------------------------------------------------
    def save_checkpoint(self, best: bool = False) -> None:
        """`last` (weights + train_state for --resume) every epoch, `best` when the eval metric improved."""
        if self.ctx.is_main:
            metrics = {k: v for k, v in self.history[-1].items() if k not in WALL_CLOCK}
            meta = {**self.extra_meta, "epoch": self.epoch, "step": self.step, "metrics": metrics}
            with self._writing(f"epoch {self.epoch}'s checkpoint"):
                save_last(self.model, self.run_dir, meta, self._train_state(), best)
                write_metrics_csv(self.run_dir / "metrics.csv", self.history)
        barrier(self.ctx)

    @contextlib.contextmanager
    def _writing(self, what: str):
        """A full disk, a quota, a read-only or vanished run dir: one line saying what was kept (the writes are
        atomic: the last saved epoch is intact) and how to go on, not an OSError's traceback."""
        try:
            yield
        except OSError as exc:
            last = self.run_dir / "checkpoints" / "last"
            saved = read_json(last / "model.json").get("epoch") if (last / "model.json").is_file() else None
            kept = f"checkpoints/last holds epoch {saved}: resume with --resume" if saved else "no epoch was saved"
            raise CheckpointError(f"cannot write {what} in {self.run_dir} ({exc.strerror or exc}); {kept} once "
                                  "there is room, or choose another --out") from exc

    def _train_state(self) -> dict:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "history": self.history,
            "best": self.best,
            "config": to_dict(self.cfg),
            "world_size": self.ctx.world_size,
            "data": self.trained_on,
        }

    def _load_state(self, last: Path) -> None:
        from kdiqa_edge.models.checkpoint import load_state_dict

        state = load_train_state(last, to_dict(self.cfg), self.ctx.world_size, self.trained_on)
        self.model.load_state_dict({k: v.to(self.device) for k, v in load_state_dict(last).items()})
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.history, self.best = list(state["history"]), dict(state["best"])
        if self.ctx.is_main:
            complete_saved_epoch(self.run_dir, last, self.best.get("epoch"), self.epoch, self.history)

    # -- end of run -------------------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        """Best weights -> test metrics, predictions, plots and summary.json."""
        from kdiqa_edge.models.checkpoint import load_state_dict

        barrier(self.ctx)
        best_dir = self.run_dir / "checkpoints" / "best"
        if best_dir.is_dir():
            self.model.load_state_dict({k: v.to(self.device) for k, v in load_state_dict(best_dir).items()})
        test = np.asarray(self.split.test, dtype=np.int64)
        pred = predict(self.model, self.cache.images, test, self.model.preprocess, self.device,
                       self.cfg.eval_batch_size, self.cfg.amp, self.ctx)
        test_metrics = evaluate(pred, self.cache.mos[test]) if len(test) >= 3 else None
        last_row = self.history[-1] if self.history else {}
        summary = {
            **self.extra_meta,
            "best_epoch": self.best["epoch"],
            "select": f"{self.eval_split} {self.cfg.select}",
            "epochs": self.epoch,
            "steps": self.step,
            "world_size": self.ctx.world_size,
            "device": str(self.device),
            "test": test_metrics.to_dict() if test_metrics else None,
            "best_eval": next((r for r in self.history if r["epoch"] == self.best["epoch"]), None),
            "images_per_s": last_row.get("images_per_s"),
        }
        if self.ctx.is_main:
            with self._writing("the run's plots and summary.json"):
                try:
                    from kdiqa_edge.train.plots import write_plots

                    write_plots(self.run_dir, self.history, pred, self.cache.mos[test],
                                title=str(self.extra_meta.get("label", "")), scalars=self.scalar_names)
                except ImportError as exc:  # matplotlib is part of [train]; say so rather than fail a finished run
                    summary["plots"] = f"skipped: {exc}"
                # last: summary.json marks the run finished (`state.run_finished`), so a kill or a full disk
                # before it leaves a run --resume completes, not a "finished" one without its plots
                if self.write_summary:
                    write_json(self.run_dir / "summary.json", summary)
        barrier(self.ctx)
        return summary

    def cleanup(self) -> None:
        """End the trackers (summary.json and the plots, as the recipe left them) and the process group this
        trainer made. Called from a `finally`: a run stopped by Ctrl-C ends its trackers' runs as KILLED."""
        if self.trackers is not None:
            from kdiqa_edge.train.trackers.run import status_now

            self.trackers.end(status_now())
            self.trackers = None
        if self.ctx.enabled and getattr(self, "_owns_process_group", True):
            destroy_process_group()

    def fit(self) -> dict[str, Any]:
        self.setup()
        try:
            return self.train()
        finally:
            self.cleanup()


