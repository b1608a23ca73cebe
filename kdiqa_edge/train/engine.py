"""The one training recipe shared by the teacher fine-tune and distillation.

Shape: `Trainer.setup()` / `train()` / `save_checkpoint()` / `cleanup()` (torchtune's recipe interface),
with the model-specific part a pluggable `loss_fn(model, batch, step, total_steps) -> {name: term}`
whose sum is the loss. Everything else is here, once:

- batches of uint8 pixels from the ImageCache, gathered in a background thread (pinned on CUDA), moved to
  the device, normalized and augmented THERE; extra per-image arrays (cached teacher features) ride along,
  looked up by image index;
- AdamW, cosine decay of the learning rate per optimizer step to `min_lr_ratio` x lr, gradient accumulation;
- CUDA: bf16 autocast where supported (fp16 + GradScaler otherwise), channels_last, optional torch.compile
  of the image encoder;
- torch DDP when launched by torchrun (gloo on CPU, nccl on CUDA): each process trains on its shard of a
  shared per-epoch permutation; rank 0 writes; losses and predictions are gathered before metrics;
- evaluation every epoch (kdiqa_edge.metrics.evaluate), checkpoints `last` and `best`, metrics.csv;
- `--resume`: model, optimizer, scheduler, grad scaler, RNG, step and history restored from `last`. The data
  order and the augmentation of epoch e depend only on (seed, e), so a resumed run replays exactly the
  batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import io
import math
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdiqa_edge.config import to_dict
from kdiqa_edge.errors import CheckpointError, ConfigError, KdiqaError
from kdiqa_edge.io import atomic_path, read_json, sweep_temporaries, write_json, write_text
from kdiqa_edge.metrics import IQAMetrics, evaluate

LossFn = Callable[[nn.Module, dict, int, int], Mapping[str, torch.Tensor]]
ScalarsFn = Callable[[int, int], Mapping[str, float]]

TRAIN_STATE = "train_state.pt"
# Measurements of the machine, not of the model: metrics.csv and summary.json keep them, checkpoints do not
# (the same training gives the same checkpoint bytes, resumed or not).
WALL_CLOCK = ("train_seconds", "images_per_s")
METRIC_NAMES = ("plcc", "plcc_fit", "srcc", "krcc", "rmse")


def run_finished(run_dir: Path) -> bool:
    """A run dir whose training completed (summary.json is written last)."""
    return (Path(run_dir) / "summary.json").is_file()


def run_interrupted(run_dir: Path) -> bool:
    """A run dir that `resume=True` can continue: a saved train state, no summary yet."""
    return (Path(run_dir) / "checkpoints" / "last" / TRAIN_STATE).is_file() and not run_finished(run_dir)


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

    @classmethod
    def from_any(cls, cfg) -> TrainConfig:
        """The training fields of a larger recipe config (fine-tune, distill) that shares their names."""
        values = to_dict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})

    def check(self) -> TrainConfig:
        if self.epochs < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("epochs, batch_size and grad_accum must be at least 1")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("lr must be positive and min_lr_ratio within [0, 1]")
        if self.augment not in ("hflip", "none"):
            raise ConfigError(f"augment must be hflip or none, got {self.augment!r}")
        if self.select not in ("plcc+srcc", "srcc", "plcc"):
            raise ConfigError(f"select must be plcc+srcc, srcc or plcc, got {self.select!r}")
        return self


# ----------------------------------------------------------------------------------------------------------
# Devices and processes


@dataclasses.dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available here")
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def init_distributed(device_name: str = "auto") -> tuple[DistContext, torch.device]:
    """Join the process group torchrun set up (WORLD_SIZE > 1); otherwise a single process."""
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size <= 1:
        return DistContext(), device
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank), device


@contextlib.contextmanager
def main_process_first(ctx: DistContext):
    """Rank 0 runs the block first (building a cache); the others run it after (opening what rank 0 built)."""
    if ctx.enabled and not ctx.is_main:
        _barrier(ctx)
    yield
    if ctx.enabled and ctx.is_main:
        _barrier(ctx)


def _barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        dist.barrier()


def _all_gather_object(ctx: DistContext, obj):
    if not ctx.enabled:
        return [obj]
    import torch.distributed as dist

    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


# ----------------------------------------------------------------------------------------------------------
# Schedule and optimizer


def cosine_factor(step: int, total_steps: int, min_ratio: float) -> float:
    """lr multiplier: 1 at step 0, cosine down to min_ratio at the last step."""
    progress = min(step / max(total_steps, 1), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(params: Sequence[tuple[str, nn.Parameter]], cfg: TrainConfig, fused: bool = False):
    """AdamW; 1-D tensors (biases, norm gains, logit scales, class/position embeddings' scales) get no decay."""
    decay = [p for _, p in params if p.ndim >= 2]
    no_decay = [p for _, p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Data: uint8 batches from the image cache, normalized and augmented on the device


def epoch_order(indices: Sequence[int], seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """This process's share of epoch `epoch`'s permutation (DistributedSampler's padding and striding)."""
    indices = np.asarray(indices, dtype=np.int64)
    order = indices[np.random.default_rng([seed, epoch]).permutation(len(indices))]
    total = math.ceil(len(order) / world_size) * world_size
    if total > len(order):  # pad by wrapping so every process runs the same number of steps
        order = np.concatenate([order, order[: total - len(order)]])
    return order[rank:total:world_size]


class BatchLoader:
    """Gathers batches (uint8 images, mos, index, extras) from memory-mapped arrays in a background thread.

    `images` may be a np.memmap: each batch is one fancy-indexed copy, so the GPU never waits on Python.
    """

    def __init__(self, images: np.ndarray, mos: np.ndarray, extras: Mapping[str, np.ndarray] | None = None,
                 pin_memory: bool = False, prefetch: int = 3):
        self.images = images
        self.mos = np.asarray(mos, dtype=np.float32)
        self.extras = dict(extras or {})
        for name, array in self.extras.items():
            if len(array) != len(images):
                raise ConfigError(f"extra array {name!r} has {len(array)} rows for {len(images)} images")
        self.pin_memory = pin_memory
        self.prefetch = prefetch

    def gather(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        batch = {"image": self._take(self.images, idx), "mos": self._take(self.mos, idx),
                 "index": torch.from_numpy(np.asarray(idx, dtype=np.int64))}
        for name, array in self.extras.items():
            batch[name] = self._take(array, idx)
        return batch

    def _take(self, array: np.ndarray, idx: np.ndarray) -> torch.Tensor:
        if not self.pin_memory:
            return torch.from_numpy(np.ascontiguousarray(array[idx]))
        # Gather straight into page-locked memory (one copy, not two); torch's caching host allocator
        # keeps the buffer alive until the asynchronous host->device copy has used it.
        out = torch.empty((len(idx), *array.shape[1:]), dtype=torch.from_numpy(array[:0]).dtype, pin_memory=True)
        np.take(array, idx, axis=0, out=out.numpy(), mode="clip")  # "raise" would buffer `out`
        return out

    def __call__(self, batches: Sequence[np.ndarray]) -> Iterator[dict[str, torch.Tensor]]:
        if len(batches) <= 1 or self.prefetch <= 0:
            yield from (self.gather(idx) for idx in batches)
            return
        slots: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce():
            try:
                for idx in batches:
                    if stop.is_set():
                        return
                    slots.put(self.gather(idx))
                slots.put(None)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer thread
                slots.put(exc)

        worker = threading.Thread(target=produce, daemon=True, name="kdiqa-batches")
        worker.start()
        try:
            while (item := slots.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting on a full queue
                with contextlib.suppress(queue.Empty):
                    slots.get_nowait()
                worker.join(timeout=0.05)


class DeviceTransform:
    """uint8 NHWC on the host -> normalized float NCHW on the device (+ train-time horizontal flips)."""

    def __init__(self, preprocess, device: torch.device, channels_last: bool = False):
        self.device = device
        self.channels_last = channels_last
        self.mean = torch.tensor(preprocess.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(preprocess.std, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0

    def __call__(self, batch: Mapping[str, torch.Tensor], flip_generator: torch.Generator | None = None) -> dict:
        out = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        # NHWC uint8 permuted to NCHW is already channels_last in memory; .contiguous() makes it NCHW.
        x = out["image"].permute(0, 3, 1, 2).float()
        x = (x - self.mean) / self.std
        if flip_generator is not None:
            flip = torch.rand(x.shape[0], device=self.device, generator=flip_generator) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        out["image"] = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        for name, value in out.items():
            if name not in ("image", "index") and value.is_floating_point():
                out[name] = value.float()
        return out


def autocast_for(device: torch.device, amp: bool):
    """(autocast context factory, dtype or None). Mixed precision only on CUDA."""
    if not (amp and device.type == "cuda"):
        return contextlib.nullcontext, None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return functools.partial(torch.autocast, device_type="cuda", dtype=dtype), dtype


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, indices: Sequence[int], preprocess=None,
            device: torch.device | str = "cpu", batch_size: int = 128, amp: bool = True,
            ctx: DistContext = DistContext()) -> np.ndarray:
    """Scores of `images[indices]` (float64, in index order). Under DDP each process scores a share."""
    device = torch.device(device)
    indices = np.asarray(indices, dtype=np.int64)
    mine = np.arange(len(indices))[ctx.rank::ctx.world_size]
    transform = DeviceTransform(preprocess or model.preprocess, device, channels_last=device.type == "cuda")
    autocast, _ = autocast_for(device, amp)
    loader = BatchLoader(images, np.zeros(len(images), np.float32), pin_memory=device.type == "cuda")
    was_training = model.training
    model.eval()
    scores = []
    for batch in loader([indices[mine[i:i + batch_size]] for i in range(0, len(mine), batch_size)]):
        with autocast():
            scores.append(model(transform(batch)["image"]).float().cpu())
    model.train(was_training)
    local = (mine, torch.cat(scores).double().numpy() if scores else np.zeros(0))
    result = np.empty(len(indices), dtype=np.float64)
    for positions, values in _all_gather_object(ctx, local):
        result[positions] = values
    return result


# ----------------------------------------------------------------------------------------------------------
# The recipe


def compile_encoder(model: nn.Module) -> nn.Module:
    """torch.compile the image encoder in place (state_dict keys unchanged).

    Not the whole train step: the loss takes the step number, and dynamo would recompile for every new
    Python int. The encoder is where the time goes; the head is a few tiny ops.
    """
    for name in ("visual", "encoder", "backbone"):
        child = getattr(model, name, None)
        if isinstance(child, nn.Module):
            child.compile()
            return model
    model.compile()
    return model


class _LossStep(nn.Module):
    """The model and its loss as one module, so DDP (and torch.compile) see the whole train forward."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict, step: int, total_steps: int) -> dict[str, torch.Tensor]:
        return dict(self.loss_fn(self.model, batch, step, total_steps))


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
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, cache, split, cfg: TrainConfig, run_dir: str | Path,
                 *, extras: Mapping[str, np.ndarray] | None = None, scalars_fn: ScalarsFn | None = None,
                 extra_meta: dict | None = None, resume: bool = False):
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
        self.history: list[dict] = []
        self.best: dict[str, Any] = {"epoch": None, "value": -math.inf}
        self.epoch = 0  # epochs completed
        self.step = 0  # optimizer steps completed
        self.interrupt_after_steps: int | None = None  # tests: simulate a crash after this many steps
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
        self._owns_process_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        self.ctx, self.device = init_distributed(cfg.device)
        if not self.split.train:
            raise ConfigError("the training split is empty")
        self.eval_split, self.eval_indices = ("val", self.split.val) if self.split.val else ("test", self.split.test)
        per_process = cfg.batch_size // (self.ctx.world_size * cfg.grad_accum)
        if per_process < 1 or cfg.batch_size % (self.ctx.world_size * cfg.grad_accum):
            raise ConfigError(f"batch_size {cfg.batch_size} must be a multiple of processes x grad_accum "
                              f"({self.ctx.world_size} x {cfg.grad_accum})")
        self.micro_batch = per_process
        shard = math.ceil(len(self.split.train) / self.ctx.world_size)
        self.steps_per_epoch = math.ceil(shard / (per_process * cfg.grad_accum))
        self.total_steps = cfg.epochs * self.steps_per_epoch

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

        step_module: nn.Module = _LossStep(self.model, self.loss_fn)
        if self.ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel

            step_module = DistributedDataParallel(step_module, device_ids=[self.device] if cuda else None)
        self.ddp_module = step_module if self.ctx.enabled else None
        self.train_step_module = step_module
        if cfg.compile:
            compile_encoder(self.model)

        self._prepare_run_dir()
        return self

    def _prepare_run_dir(self) -> None:
        last = self.run_dir / "checkpoints" / "last"
        if self.ctx.is_main:  # what a run killed mid-write left behind (never a live process's)
            for folder in (self.run_dir, self.run_dir / "checkpoints", last, self.run_dir / "plots"):
                sweep_temporaries(folder)
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
                    raise ConfigError(f"{split_path} differs from this run's split: resume with the same dataset and seed")
            else:
                self.split.save(split_path)
        _barrier(self.ctx)

    # -- train ------------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        from kdiqa_edge.console import Progress

        # on stdout, with the epoch lines: `distill > log` keeps the training's story in one file
        with Progress("train", self.total_steps, unit="steps", stream="stdout", completed=self.step,
                      enabled=self.cfg.progress and self.ctx.is_main) as progress:
            while self.epoch < self.cfg.epochs:
                result = self._train_epoch(progress)
                self.history.append(result.row)
                improved = self._score(result.metrics) > self.best["value"]
                if improved:
                    self.best = {"epoch": self.epoch, "value": self._score(result.metrics)}
                self.save_checkpoint(best=improved)
                info = (f"epoch {self.epoch}/{self.cfg.epochs} loss {result.row['loss']:.4f} "
                        f"{self.eval_split} PLCC {result.metrics.plcc:.4f} SRCC {result.metrics.srcc:.4f}"
                        + (" (best)" if improved else ""))
                progress.update(info=info)
                progress.print(info)
        return self.finish()

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
        """steps.csv: lr, the scalars (e.g. lambda) and this process's loss terms at every optimizer step.

        The tensors are read once per epoch (one device sync, not one per step). Rows of steps at or past
        this epoch's first step are replaced, so a resumed run never duplicates them.
        """
        if not self.ctx.is_main or not step_log:
            return
        names = list(step_log[0][1])
        values = torch.stack([torch.stack([terms[n] for n in names]) for _, terms in step_log]).cpu().tolist()
        rows = [{**info, **dict(zip(names, row))} for (info, _), row in zip(step_log, values)]
        path = self.run_dir / "steps.csv"
        first = rows[0]["step"]
        kept = []
        if path.is_file():
            with open(path, newline="") as handle:
                kept = [row for row in csv.DictReader(handle) if int(row["step"]) < first]
        write_metrics_csv(path, kept + rows)

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
        if self.ctx.enabled:
            import torch.distributed as dist

            dist.all_reduce(packed)
        values = packed.cpu().tolist()
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
            from kdiqa_edge.models.checkpoint import save_checkpoint

            metrics = {k: v for k, v in self.history[-1].items() if k not in WALL_CLOCK}
            meta = {**self.extra_meta, "epoch": self.epoch, "step": self.step, "metrics": metrics}
            buffer = io.BytesIO()
            torch.save(self._train_state(), buffer)
            # the resume state goes in with the weights: a kill between two writes cannot leave weights
            # without the state that resumes from them
            last = save_checkpoint(self.model, self.run_dir / "checkpoints" / "last", meta,
                                   extra_files={TRAIN_STATE: buffer.getvalue()})
            if best:
                _link_checkpoint(last, self.run_dir / "checkpoints" / "best")
            write_metrics_csv(self.run_dir / "metrics.csv", self.history)
        _barrier(self.ctx)

    def _train_state(self) -> dict:
        np_state = np.random.get_state()
        return {
            "epoch": self.epoch,
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "python": random.getstate(),
                "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            },
            "history": self.history,
            "best": self.best,
            "config": to_dict(self.cfg),
            "world_size": self.ctx.world_size,
        }

    def _load_state(self, last: Path) -> None:
        from kdiqa_edge.models.checkpoint import load_state_dict, read_meta

        state = torch.load(last / TRAIN_STATE, map_location="cpu", weights_only=True)
        meta = read_meta(last)
        if meta.get("step") != state["step"]:
            raise CheckpointError(f"{last}: weights (step {meta.get('step')}) and {TRAIN_STATE} (step "
                                  f"{state['step']}) disagree; the run was interrupted while saving")
        volatile = {"progress", "compile", "device", "eval_batch_size"}
        saved = {k: v for k, v in state["config"].items() if k not in volatile}
        current = {k: v for k, v in to_dict(self.cfg).items() if k not in volatile}
        if saved != current:
            changed = sorted(k for k in current if saved.get(k) != current[k])
            raise ConfigError(f"cannot resume with a different training config (changed: {', '.join(changed)})")
        if state.get("world_size", 1) != self.ctx.world_size:
            raise ConfigError(f"the run was trained with {state.get('world_size')} processes; resume with the same number")
        self.model.load_state_dict({k: v.to(self.device) for k, v in load_state_dict(last).items()})
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        random.setstate(_as_tuple(rng["python"]))
        np.random.set_state((rng["numpy"][0], rng["numpy"][1].numpy().astype(np.uint32), *rng["numpy"][2:]))
        self.epoch, self.step = state["epoch"], state["step"]
        self.history, self.best = list(state["history"]), dict(state["best"])
        if self.ctx.is_main:
            self._complete_saved_epoch(last)

    def _complete_saved_epoch(self, last: Path) -> None:
        """Finish the save a kill interrupted after `last` was in place: `best` and metrics.csv."""
        from kdiqa_edge.models.checkpoint import read_meta

        best_dir = self.run_dir / "checkpoints" / "best"
        if self.best.get("epoch") == self.epoch:
            try:
                linked = read_meta(best_dir).get("epoch")
            except CheckpointError:
                linked = None
            if linked != self.epoch:
                _link_checkpoint(last, best_dir)
        write_metrics_csv(self.run_dir / "metrics.csv", self.history)

    # -- end of run -------------------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        """Best weights -> test metrics, predictions, plots and summary.json."""
        from kdiqa_edge.models.checkpoint import load_state_dict

        _barrier(self.ctx)
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
            write_json(self.run_dir / "summary.json", summary)
            try:
                from kdiqa_edge.train.plots import write_plots

                write_plots(self.run_dir, self.history, pred, self.cache.mos[test],
                            title=str(self.extra_meta.get("label", "")))
            except ImportError as exc:  # matplotlib is part of [train]; say so rather than fail a finished run
                summary["plots"] = f"skipped: {exc}"
        _barrier(self.ctx)
        return summary

    def cleanup(self) -> None:
        if self.ctx.enabled and getattr(self, "_owns_process_group", True):
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    def fit(self) -> dict[str, Any]:
        self.setup()
        try:
            return self.train()
        finally:
            self.cleanup()


def _link_checkpoint(source: Path, target: Path) -> Path:
    """`target` = the checkpoint files of `source` (not its train_state), hard-linked where possible.

    Saving never rewrites a file in place (a checkpoint dir is replaced as a whole), so a link stays the
    content it was made with; for ViT-B/32 this saves serializing and hashing 350 MB once more per epoch.
    """
    import os
    import shutil

    from kdiqa_edge.models.checkpoint import META_FILE, WEIGHTS_FILE

    with atomic_path(target) as tmp:
        tmp.mkdir(parents=True)
        for name in (WEIGHTS_FILE, META_FILE):
            try:
                os.link(source / name, tmp / name)
            except OSError:  # a filesystem without hard links
                shutil.copy2(source / name, tmp / name)
    return target


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def write_metrics_csv(path: Path, history: list[dict]) -> Path:
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return write_text(path, buffer.getvalue())

