"""Latency: warm-up, timed runs with device sync, percentiles (timm benchmark.py style), torch-free."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kdiqa_edge.preprocess import ImageLoadError, PreprocessSpec, load_preprocessed


@dataclasses.dataclass(frozen=True)
class LatencyStats:
    batch_size: int
    runs: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    std_ms: float
    images_per_s: float  # batch_size / mean

    @classmethod
    def from_times(cls, batch_size: int, seconds: Sequence[float]) -> LatencyStats:
        ms = np.asarray(seconds, np.float64) * 1000.0
        mean = float(ms.mean())
        return cls(batch_size=batch_size, runs=len(ms), mean_ms=mean, p50_ms=float(np.percentile(ms, 50)),
                   p90_ms=float(np.percentile(ms, 90)), p99_ms=float(np.percentile(ms, 99)),
                   std_ms=float(ms.std()), images_per_s=batch_size * 1000.0 / mean if mean > 0 else float("inf"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def latency_input(model, batch_size: int, seed: int = 0):
    """A prepared random batch in the artifact's input format (the model alone is timed, not preprocessing)."""
    size = model.preprocess.size
    pixels = np.random.default_rng(seed).integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
    return model.prepare(pixels)


def timed_run(model, x) -> float:
    """Seconds for one `model.run(x)`, the backend's synchronize() inside (queued GPU work is counted)."""
    start = time.perf_counter()
    model.run(x)
    model.backend.synchronize()
    return time.perf_counter() - start


def time_inference(model, batch_size: int, warmup: int = 10, runs: int = 50, seed: int = 0) -> LatencyStats:
    """Time `model.run` on a prepared random batch: the model alone, preprocessing excluded.

    `model` is a runtime QualityModel; its backend's synchronize() runs inside the timed region so queued
    GPU work is counted.
    """
    x = latency_input(model, batch_size, seed)
    for _ in range(max(warmup, 0)):
        model.run(x)
    model.backend.synchronize()
    return LatencyStats.from_times(batch_size, [timed_run(model, x) for _ in range(max(runs, 1))])


@dataclasses.dataclass(frozen=True)
class PreprocessStats:
    images: int
    mean_ms: float  # decode + resize + crop + normalize, one image
    p50_ms: float
    images_per_s: float
    draft: bool

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def time_preprocessing(paths: Sequence[str | Path], spec: PreprocessSpec, model=None) -> PreprocessStats | None:
    """Per-image time from file to model input (the model's prepare() when given), on one thread."""
    times = []
    for path in paths:
        start = time.perf_counter()
        try:
            pixels = load_preprocessed(path, spec)
        except ImageLoadError:
            continue
        if model is not None:
            model.prepare(pixels[None])
        times.append(time.perf_counter() - start)
    if not times:
        return None
    ms = np.asarray(times) * 1000.0
    return PreprocessStats(images=len(ms), mean_ms=float(ms.mean()), p50_ms=float(np.median(ms)),
                           images_per_s=1000.0 / float(ms.mean()), draft=spec.draft)
