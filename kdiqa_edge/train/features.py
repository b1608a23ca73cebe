"""The teacher feature cache: the fine-tuned teacher's image features of every image, computed once.

Distillation compares student features with the teacher's features of the same image every step; the
teacher is frozen, so its features are computed once, stored as an fp16 memmap [N, D] aligned with the
image cache, and read by index. The cache is keyed by the teacher checkpoint's content hash and the image
cache key: another checkpoint or another image set (or preprocessing) gets its own file. Unlabeled images
(data/unlabeled.py) get theirs in shards, below.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np

from kdiqa_edge import paths
from kdiqa_edge.errors import CheckpointError
from kdiqa_edge.io import atomic_path, read_json, sweep_temporaries, write_json

FORMAT = "kdiqa-edge/teacher-features/1"
NO_AMP_SUFFIX = "-fp32"  # the cache of a run without --amp: float32 features where CUDA would autocast
FEATURES_FILE = "features.f16"
META_FILE = "meta.json"


def _checkpoint_meta(checkpoint) -> tuple[dict, Path | None]:
    from kdiqa_edge.models.checkpoint import read_meta, resolve_checkpoint_dir

    if isinstance(checkpoint, (str, Path)):
        directory = resolve_checkpoint_dir(checkpoint)
        return read_meta(directory), directory
    meta = getattr(checkpoint, "meta", None)
    if not meta or "content_hash" not in meta:
        raise CheckpointError("teacher_features needs a checkpoint dir or a model loaded with load_checkpoint")
    return meta, getattr(checkpoint, "checkpoint_dir", None)


def feature_cache_path(checkpoint, cache, root: Path | None = None, amp: bool = True) -> Path:
    """Folder of the feature cache for (teacher checkpoint, image cache, `amp`: CUDA mixed precision allowed;
    without it the features are computed in float32, a cache of their own)."""
    meta, _ = _checkpoint_meta(checkpoint)
    name = f"{meta['content_hash'][:16]}-{cache.key[:16]}" + ("" if amp else NO_AMP_SUFFIX)
    return Path(root or paths.cache_dir() / "features") / name


def teacher_features(checkpoint, cache, device: str = "auto", batch_size: int = 128, progress: bool = True,
                     root: Path | None = None, amp: bool = True) -> np.ndarray:
    """fp16 [N, D] image features (before L2 norm) of every image in `cache`, in cache order (read-only memmap).

    `checkpoint`: a teacher checkpoint dir, a run dir, or a model from `load_checkpoint`. Computed on the
    first call (atomically: a crash leaves no partial cache), then read from disk. `amp`: the run's --amp
    (CUDA autocast); off, the teacher runs in float32 (the array's `filename` says which cache it is).
    """
    meta, _ = _checkpoint_meta(checkpoint)
    folder = feature_cache_path(checkpoint, cache, root, amp)
    shape = (len(cache), int(meta["embed_dim"]))
    if not _complete(folder, meta, cache, shape):
        _build(folder, checkpoint, meta, cache, shape, device, batch_size, progress, amp)
    return np.memmap(folder / FEATURES_FILE, dtype=np.float16, mode="r", shape=shape)


def _teacher_on(checkpoint, device: str, amp: bool):
    """(the teacher in eval mode on `device`, the device, its normalizing transform, autocast (CUDA with
    `amp` only), whether it was training): a checkpoint path is loaded, a model is used as given (and put
    back in its mode afterwards)."""
    from kdiqa_edge.models.checkpoint import load_checkpoint
    from kdiqa_edge.train.distributed import resolve_device
    from kdiqa_edge.train.loader import DeviceTransform
    from kdiqa_edge.train.step import autocast_for

    device = resolve_device(device)
    model = load_checkpoint(checkpoint, device=str(device)) if isinstance(checkpoint, (str, Path)) else checkpoint
    was_training = model.training
    model.to(device).eval()
    transform = DeviceTransform(model.preprocess, device, channels_last=device.type == "cuda")
    autocast, _ = autocast_for(device, amp)
    return model, device, transform, autocast, was_training


def _complete(folder: Path, meta: dict, cache, shape: tuple[int, int]) -> bool:
    try:
        saved = read_json(folder / META_FILE)
    except (OSError, ValueError):
        return False
    return (saved.get("format") == FORMAT and saved.get("content_hash") == meta["content_hash"]
            and saved.get("image_cache") == cache.key and tuple(saved.get("shape", ())) == shape)


def _build(folder: Path, checkpoint, meta: dict, cache, shape, device: str, batch_size: int, progress: bool,
           amp: bool) -> None:
    import torch

    from kdiqa_edge.train.loader import BatchLoader

    model, device, transform, autocast, was_training = _teacher_on(checkpoint, device, amp)
    loader = BatchLoader(cache.images, np.zeros(len(cache), np.float32), pin_memory=device.type == "cuda")
    batches = [np.arange(i, min(i + batch_size, shape[0])) for i in range(0, shape[0], batch_size)]
    from kdiqa_edge.console import Progress

    sweep_temporaries(folder.parent)  # feature caches a killed run left half-written
    with atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)
        features = np.memmap(tmp / FEATURES_FILE, dtype=np.float16, mode="w+", shape=shape)
        # stdout, beside the training it feeds
        with Progress("teacher features", shape[0], unit="images", stream="stdout", transient=True,
                      enabled=progress) as bar, torch.no_grad():
            for idx, batch in zip(batches, loader(batches)):
                with autocast():
                    encoded = model.encode(transform(batch)["image"])
                features[idx[0]:idx[-1] + 1] = encoded.float().cpu().numpy().astype(np.float16)
                bar.advance(len(idx))
        features.flush()
        del features
        write_json(tmp / META_FILE, {
            "format": FORMAT, "content_hash": meta["content_hash"], "image_cache": cache.key,
            "shape": list(shape), "dtype": "float16", "teacher": meta.get("label", meta.get("arch")),
            "amp": amp,
        })
    model.train(was_training)


# ----------------------------------------------------------------------------------------------------------
# Unlabeled images: features in shards, computed once per image and teacher checkpoint
#
# A pool of a million photos is too big to redo after a crash and too slow for one process, so its features
# live in shards of SHARD_IMAGES images (the pool is sorted by content hash; a shard is named by the teacher
# checkpoint, the preprocessing and its images' hashes). Each shard is written atomically as a folder
# (features.f16 [n, D] + meta.json), so a killed run leaves whole shards and a rerun computes only the missing
# ones; the bytes do not depend on which process computed them or when (fixed batches within a shard).
# Shard i belongs to worker i % workers, where the workers are the torchrun ranks of every SLURM array task
# (task t of T, rank r of R: worker t * R + r of T * R): no two compute the same shard, no scheduler of ours.

UNLABELED_FORMAT = "kdiqa-edge/unlabeled-features/1"
SHARD_IMAGES = 2048


@dataclasses.dataclass
class Shard:
    key: str
    start: int  # first pool row
    stop: int


@dataclasses.dataclass
class UnlabeledFeatures:
    """The pool's teacher features, one read-only memmap per shard, gathered by pool row."""

    folder: Path
    shards: list[Shard]
    arrays: list[np.ndarray]
    failed: dict[int, str]  # pool row -> why it did not decode (its features are zeros: leave it out)
    computed: list[str]  # shard keys this process computed (the rest were there)

    def __len__(self) -> int:
        return self.shards[-1].stop if self.shards else 0

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """fp16 [len(rows), D] for pool rows `rows`."""
        rows = np.asarray(rows, dtype=np.int64)
        dim = self.arrays[0].shape[1] if self.arrays else 0
        out = np.empty((len(rows), dim), np.float16)
        starts = np.array([s.start for s in self.shards])
        which = np.searchsorted(starts, rows, side="right") - 1
        for shard in np.unique(which):
            mask = which == shard
            out[mask] = self.arrays[shard][rows[mask] - self.shards[shard].start]
        return out


def unlabeled_folder(checkpoint, root: Path | None = None) -> Path:
    meta, _ = _checkpoint_meta(checkpoint)
    return Path(root or paths.cache_dir() / "features" / "unlabeled") / meta["content_hash"][:16]


def plan_shards(hashes, content_hash: str, preprocess, shard_images: int = SHARD_IMAGES,
                amp: bool = True) -> list[Shard]:
    """The pool (sorted by hash) cut into shards, each named by what determines its bytes (`amp` off: float32
    features, shards of their own)."""
    shards = []
    for start in range(0, len(hashes), shard_images):
        stop = min(start + shard_images, len(hashes))
        digest = hashlib.sha256(f"{UNLABELED_FORMAT}\n{content_hash}\n{preprocess.key}\n".encode())
        if not amp:
            digest.update(b"float32\n")
        for h in hashes[start:stop]:
            digest.update(h.encode())
        shards.append(Shard(digest.hexdigest()[:24], start, stop))
    return shards


def unlabeled_features(checkpoint, pool, *, device: str = "auto", batch_size: int = 128, progress: bool = True,
                       root: Path | None = None, shard_images: int = SHARD_IMAGES, workers: int = 2,
                       images: np.ndarray | None = None, ctx=None, task: int = 0, tasks: int = 1,
                       on_shard=None, share_only: bool = False, amp: bool = True) -> UnlabeledFeatures:
    """Teacher features of every image of `pool` (data/unlabeled.UnlabeledPool), in shards on disk.

    Computes the shards this worker owns that are missing (decoding in `workers` processes, or reading
    `images`, a decoded cache aligned with the pool), waits for the other ranks, and opens them all.
    `task`/`tasks`: this SLURM array task's share; `share_only`: compute it and return without opening the
    shards (the other tasks' may not exist yet). `on_shard(n)` is called after each shard written (tests).
    `amp`: the run's --amp (CUDA autocast); off, the teacher runs in float32, into shards of their own.
    """
    from kdiqa_edge.train.distributed import SINGLE_PROCESS, barrier

    ctx = ctx or SINGLE_PROCESS
    meta, _ = _checkpoint_meta(checkpoint)
    from kdiqa_edge.preprocess import PreprocessSpec

    preprocess = PreprocessSpec.from_dict(meta["preprocess"])
    folder = unlabeled_folder(checkpoint, root)
    shards = plan_shards(pool.hashes, meta["content_hash"], preprocess, shard_images, amp)
    worker, count = task * ctx.world_size + ctx.rank, tasks * ctx.world_size
    if ctx.is_main and task == 0:
        sweep_temporaries(folder)  # shards a killed run left half-written (never a live writer's)
    barrier(ctx)
    mine = [s for i, s in enumerate(shards) if i % count == worker and not _shard_done(folder / s.key, s)]
    if mine:
        _compute_shards(folder, mine, checkpoint, meta, preprocess, pool, device, batch_size, workers, images,
                        progress and ctx.is_main, on_shard, amp)
    barrier(ctx)
    if share_only:
        return UnlabeledFeatures(folder, shards, [], {}, [s.key for s in mine])
    return open_unlabeled(folder, shards, computed=[s.key for s in mine])


def open_unlabeled(folder: Path, shards: list[Shard], computed=()) -> UnlabeledFeatures:
    missing = [s.key for s in shards if not _shard_done(folder / s.key, s)]
    if missing:
        raise CheckpointError(f"{len(missing)} of {len(shards)} unlabeled feature shards are missing in {folder} "
                              f"(first {missing[0]}): run the feature tasks again")
    arrays, failed = [], {}
    for shard in shards:
        saved = read_json(folder / shard.key / META_FILE)
        arrays.append(np.memmap(folder / shard.key / FEATURES_FILE, np.float16, mode="r",
                                shape=tuple(saved["shape"])))
        failed.update({shard.start + int(row): why for row, why in saved["failed"].items()})
    return UnlabeledFeatures(folder, shards, arrays, failed, list(computed))


def _shard_done(path: Path, shard: Shard) -> bool:
    try:
        saved = read_json(path / META_FILE)
    except (OSError, ValueError):
        return False
    return saved.get("format") == UNLABELED_FORMAT and saved.get("shape", [0])[0] == shard.stop - shard.start


def _pixel_batches(shards: list[Shard], pool, preprocess, batch_size: int, workers: int, images):
    """(shard, first row in shard, uint8 pixels, {row in batch: reason}) for every batch of `shards`, in
    order; decoding runs `2 x workers` batches ahead."""
    from kdiqa_edge.data.unlabeled import DecodeWorkers

    jobs = [(shard, lo) for shard in shards for lo in range(shard.start, shard.stop, batch_size)]
    if images is not None:
        for shard, lo in jobs:
            hi = min(lo + batch_size, shard.stop)
            yield shard, lo, np.array(images[lo:hi]), {}
        return
    ahead = max(2, 2 * workers)
    with DecodeWorkers(preprocess, workers) as decoder:
        pending = []
        for n, (shard, lo) in enumerate(jobs):
            while len(pending) < ahead and n + len(pending) < len(jobs):
                s, start = jobs[n + len(pending)]
                pending.append(decoder.submit(pool.entries[start:min(start + batch_size, s.stop)]))
            pixels, failures = pending.pop(0).get()
            yield shard, lo, pixels, failures


def _compute_shards(folder: Path, shards: list[Shard], checkpoint, meta: dict, preprocess, pool, device: str,
                    batch_size: int, workers: int, images, progress: bool, on_shard, amp: bool) -> None:
    import torch

    from kdiqa_edge.console import Progress

    model, device, transform, autocast, was_training = _teacher_on(checkpoint, device, amp)
    dim = int(meta["embed_dim"])
    current, features, failed, done = None, None, {}, 0
    total = sum(s.stop - s.start for s in shards)
    with Progress("teacher features (unlabeled)", total, unit="images", stream="stdout",
                  enabled=progress) as bar, torch.no_grad():
        for shard, lo, pixels, failures in _pixel_batches(shards, pool, preprocess, batch_size, workers, images):
            if shard is not current:
                current, features, failed = shard, np.zeros((shard.stop - shard.start, dim), np.float16), {}
            with autocast():
                encoded = model.encode(transform({"image": torch.from_numpy(pixels)})["image"])
            rows = slice(lo - shard.start, lo - shard.start + len(pixels))
            features[rows] = encoded.float().cpu().numpy().astype(np.float16)
            for row, why in failures.items():
                features[lo - shard.start + row] = 0
                failed[str(lo - shard.start + row)] = why
            bar.advance(len(pixels))
            if lo + len(pixels) == shard.stop:
                _write_shard(folder / shard.key, shard, features, failed, meta, preprocess, pool)
                done += 1
                if on_shard is not None:
                    on_shard(done)
    model.train(was_training)


def _write_shard(path: Path, shard: Shard, features: np.ndarray, failed: dict, meta: dict, preprocess, pool) -> None:
    with atomic_path(path) as tmp:
        tmp.mkdir(parents=True)
        (tmp / FEATURES_FILE).write_bytes(np.ascontiguousarray(features).tobytes())
        write_json(tmp / META_FILE, {
            "format": UNLABELED_FORMAT, "content_hash": meta["content_hash"], "preprocess": preprocess.to_dict(),
            "shape": list(features.shape), "dtype": "float16", "images": pool.hashes[shard.start:shard.stop],
            "failed": failed, "teacher": meta.get("label", meta.get("arch")),
        })
