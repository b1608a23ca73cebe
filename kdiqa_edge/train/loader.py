"""Training data: uint8 batches gathered from the image cache, normalized and augmented on the device.

The data order of epoch e depends only on (seed, e) (`epoch_order`), so a resumed run replays exactly the
batches the uninterrupted run would have seen. Extra per-image arrays (cached teacher features) ride along,
looked up by image index.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch

from kdiqa_edge.errors import ConfigError


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


# ----------------------------------------------------------------------------------------------------------
# Rated and unlabeled images in one batch (distill --unlabeled)


def unlabeled_per_batch(micro_batch: int, fraction: float, has_rated: bool) -> int:
    """Unlabeled images in each micro-batch: `fraction` of it, at least one of each kind where both exist."""
    if not has_rated:
        return micro_batch
    if fraction <= 0:
        return 0
    return min(max(round(fraction * micro_batch), 1), micro_batch - 1)


def unlabeled_stream(positions: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Pool rows at stream `positions`: the pool in a fresh seeded permutation each pass (a function of
    (seed, pass) only, so a resumed run draws what the uninterrupted one drew)."""
    positions = np.asarray(positions, dtype=np.int64)
    rows = np.empty_like(positions)
    passes = positions // count
    for cycle in np.unique(passes):
        mask = passes == cycle
        permutation = np.random.default_rng([seed, 0x5EED, int(cycle)]).permutation(count)
        rows[mask] = permutation[positions[mask] % count]
    return rows


def mixed_epoch(rated: Sequence[int], unlabeled_count: int, offset: int, seed: int, epoch: int,
                micro_batch: int, fraction: float, rank: int = 0, world_size: int = 1) -> list[np.ndarray]:
    """This process's micro-batches of epoch e: rated images first (`epoch_order`'s shard), then unlabeled
    pool rows + `offset`.

    An epoch is one pass over the rated training images (over the pool when there are none); each
    micro-batch holds `unlabeled_per_batch` unlabeled images, drawn from a stream of seeded pool
    permutations that goes on across epochs (so a pool larger than an epoch's share is seen in turn).
    """
    unlabeled = unlabeled_per_batch(micro_batch, fraction, bool(len(rated))) if unlabeled_count else 0
    per_rated = micro_batch - unlabeled
    if len(rated):
        order = epoch_order(rated, seed, epoch, rank, world_size)
        count = math.ceil(len(order) / per_rated)
    else:
        order = np.zeros(0, np.int64)
        count = math.ceil(math.ceil(unlabeled_count / world_size) / micro_batch) if unlabeled_count else 0
    micro = [order[i * per_rated:(i + 1) * per_rated] for i in range(count)]
    if not unlabeled:
        return micro
    base = epoch * count * world_size * unlabeled
    positions = base + (np.arange(count)[:, None] * world_size + rank) * unlabeled + np.arange(unlabeled)[None, :]
    rows = unlabeled_stream(positions.ravel(), unlabeled_count, seed).reshape(count, unlabeled) + offset
    return [np.concatenate([m, r]) for m, r in zip(micro, rows)]


class MixedLoader(BatchLoader):
    """BatchLoader over the rated cache, plus unlabeled images for indices >= `offset`: index - offset is a
    position in `rows`, the pool rows that train (the pool less the images that did not decode).

    A batch is the rated rows (mos, teacher features from their caches) then the unlabeled ones (mos NaN,
    teacher features from the pool's shards), with `rated` (bool) saying which is which. Unlabeled pixels come
    from `images` (a decoded cache aligned with the pool) or are decoded from their source in worker
    processes, `ahead` micro-batches before they are needed.
    """

    def __init__(self, images: np.ndarray, mos: np.ndarray, extras: Mapping[str, np.ndarray] | None, *,
                 pool, rows: np.ndarray, features, preprocess, unlabeled_images: np.ndarray | None = None,
                 workers: int = 2,
                 ahead: int = 4, pin_memory: bool = False, prefetch: int = 3):
        super().__init__(images, mos, extras, pin_memory=False, prefetch=prefetch)
        self.offset = len(images)
        self.pool, self.rows, self.features, self.preprocess = pool, np.asarray(rows, np.int64), features, preprocess
        self.unlabeled_images, self.workers, self.ahead = unlabeled_images, workers, ahead
        self.pin = pin_memory
        self._decoder = None
        self._pending: list = []
        self._queued: list[np.ndarray] = []

    def __call__(self, batches: Sequence[np.ndarray]) -> Iterator[dict[str, torch.Tensor]]:
        from kdiqa_edge.data.unlabeled import DecodeWorkers

        streaming = self.unlabeled_images is None
        self._queued = [self._pool_rows(b) for b in batches]
        self._pending = []
        self._decoder = DecodeWorkers(self.preprocess, self.workers) if streaming else None
        try:
            for _ in range(self.ahead):
                self._submit_next()
            yield from super().__call__(batches)
        finally:
            if self._decoder is not None:
                self._decoder.close()
            self._decoder = None

    def _submit_next(self) -> None:
        if self._decoder is None or not self._queued:
            return
        rows = self._queued.pop(0)
        self._pending.append(self._decoder.submit([self.pool.entries[r] for r in rows]))

    def _pool_rows(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        return self.rows[idx[idx >= self.offset] - self.offset]

    def gather(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        idx = np.asarray(idx, dtype=np.int64)
        rated_idx, rows = idx[idx < self.offset], self._pool_rows(idx)
        batch = super().gather(rated_idx)
        if self._decoder is not None:
            pixels, failures = self._pending.pop(0).get()
            self._submit_next()
            if failures:
                row, why = next(iter(failures.items()))
                raise ConfigError(f"{self.pool.entries[rows[row]].name}: {why} (it decoded when its teacher "
                                  f"features were computed: did the file change?)")
        else:
            pixels = np.array(self.unlabeled_images[rows])
        unlabeled = {"image": torch.from_numpy(pixels), "mos": torch.full((len(rows),), float("nan")),
                     "index": torch.from_numpy(idx[idx >= self.offset])}
        if "teacher_features" in batch:
            unlabeled["teacher_features"] = torch.from_numpy(self.features.gather(rows))
        out = {name: torch.cat([batch[name], unlabeled[name]]) for name in batch}
        out["rated"] = torch.cat([torch.ones(len(rated_idx), dtype=torch.bool), torch.zeros(len(rows), dtype=torch.bool)])
        return {k: v.pin_memory() for k, v in out.items()} if self.pin else out
