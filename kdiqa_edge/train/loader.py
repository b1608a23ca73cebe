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
