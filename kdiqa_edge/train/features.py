"""The teacher feature cache: the fine-tuned teacher's image features of every image, computed once.

Distillation compares student features with the teacher's features of the same image every step; the
teacher is frozen, so its features are computed once, stored as an fp16 memmap [N, D] aligned with the
image cache, and read by index. The cache is keyed by the teacher checkpoint's content hash and the image
cache key: another checkpoint or another image set (or preprocessing) gets its own file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kdiqa_edge import paths
from kdiqa_edge.errors import CheckpointError
from kdiqa_edge.io import atomic_path, read_json, sweep_temporaries, write_json

FORMAT = "kdiqa-edge/teacher-features/1"
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


def feature_cache_path(checkpoint, cache, root: Path | None = None) -> Path:
    """Folder of the feature cache for (teacher checkpoint, image cache)."""
    meta, _ = _checkpoint_meta(checkpoint)
    return Path(root or paths.cache_dir() / "features") / f"{meta['content_hash'][:16]}-{cache.key[:16]}"


def teacher_features(checkpoint, cache, device: str = "auto", batch_size: int = 128, progress: bool = True,
                     root: Path | None = None) -> np.ndarray:
    """fp16 [N, D] image features (before L2 norm) of every image in `cache`, in cache order (read-only memmap).

    `checkpoint`: a teacher checkpoint dir, a run dir, or a model from `load_checkpoint`. Computed on the
    first call (atomically: a crash leaves no partial cache), then read from disk.
    """
    meta, _ = _checkpoint_meta(checkpoint)
    folder = feature_cache_path(checkpoint, cache, root)
    shape = (len(cache), int(meta["embed_dim"]))
    if not _complete(folder, meta, cache, shape):
        _build(folder, checkpoint, meta, cache, shape, device, batch_size, progress)
    return np.memmap(folder / FEATURES_FILE, dtype=np.float16, mode="r", shape=shape)


def _complete(folder: Path, meta: dict, cache, shape: tuple[int, int]) -> bool:
    try:
        saved = read_json(folder / META_FILE)
    except (OSError, ValueError):
        return False
    return (saved.get("format") == FORMAT and saved.get("content_hash") == meta["content_hash"]
            and saved.get("image_cache") == cache.key and tuple(saved.get("shape", ())) == shape)


def _build(folder: Path, checkpoint, meta: dict, cache, shape, device: str, batch_size: int, progress: bool) -> None:
    import torch

    from kdiqa_edge.models.checkpoint import load_checkpoint
    from kdiqa_edge.train.distributed import resolve_device
    from kdiqa_edge.train.loader import BatchLoader, DeviceTransform
    from kdiqa_edge.train.step import autocast_for

    device = resolve_device(device)
    model = load_checkpoint(checkpoint, device=str(device)) if isinstance(checkpoint, (str, Path)) else checkpoint
    was_training = model.training
    model.to(device).eval()
    transform = DeviceTransform(model.preprocess, device, channels_last=device.type == "cuda")
    autocast, _ = autocast_for(device, True)
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
        })
    model.train(was_training)
