"""The scoring pipeline (torch-free): images decode and resize in a pool of workers while the model runs.

    found -> decode_files (workers, in walk order, a bounded window ahead) -> score_decoded (batches) -> rows

Opening an image costs as much as a fast model on a 512 px JPEG and 20 times more on a 12 MP photo, so a
scorer that decodes in its own thread runs at the decoder's speed. Here `workers` threads decode ahead of
the model: PIL releases the GIL in the JPEG decoder and in the resize, the model's runtime in its run, so
they overlap. Threads, not processes: measured on the 2-vCPU EPYC (benchmarks/bench_score.py), processes
were no faster and a pixel array would have to cross a pipe; threads also leave the caller's process as it
is (a test's monkeypatch, an open runtime session that a fork would copy mid-flight).

Results come out in the order the files went in, each a `Decoded` (pixels, or the one-line reason it could
not be read); at most `ahead` of them are in flight or waiting, so memory stays flat over millions of files.
`decode_files` takes any `load(path) -> array`: a writer that needs other pixels (a quality map's larger
view) runs the same pool with its own loader.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np

from kdiqa_edge.preprocess import ImageLoadError, PreprocessSpec, load_preprocessed

EXECUTORS = ("thread", "process")  # how decode workers run; "process" is kept for the benchmark's comparison
# The most decode workers: each keeps up to 4 decoded images waiting (`decode_files`' window), so 256 hold
# 1024 (150 MB at 224 px); a million would start a thread per file and hold the folder in memory
MAX_WORKERS = 256


@dataclasses.dataclass(frozen=True)
class ScoreResult:
    path: str
    score: float | None  # None when the image could not be read
    error: str | None = None  # the one-line reason
    score_map: np.ndarray | None = None  # its fast map, from the same run (`score_paths(run=...)`)


class Scorer(Protocol):
    """What the pipeline needs of a model (`QualityModel`): its preprocessing and batched scoring."""

    preprocess: PreprocessSpec

    def predict(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class Decoded:
    """One walked entry after its decode: pixels (uint8 [S, S, 3]) or the reason it has none."""

    path: str
    pixels: np.ndarray | None
    error: str | None = None
    stamp: tuple[int, int] | None = None  # (size, mtime_ns) when decoding began: what a resumed run matches


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


def default_workers(inference_threads: int | None = None) -> int:
    """The cores inference does not use: all of them when its threads are not set (the runtime's own pool
    then shares the cores with the decoders; the decode is the larger part on photos), at least one, at
    most MAX_WORKERS."""
    return min(MAX_WORKERS, max(1, usable_cores() - (inference_threads or 0)))


def file_stamp(path: str | os.PathLike) -> tuple[int, int] | None:
    """(size, mtime_ns) of a file, None where it cannot be stat'ed: what says a file is the one scored before."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_size, info.st_mtime_ns


def decode_one(path: str, load: Callable[[str], np.ndarray]) -> Decoded:
    """Decode one file (a worker's job); an unreadable file is a Decoded with its reason, never a raise."""
    stamp = file_stamp(path)
    try:
        return Decoded(path, load(path), None, stamp)
    except ImageLoadError as exc:
        return Decoded(path, None, exc.reason, stamp)


def preprocessed(spec: PreprocessSpec) -> Callable[[str], np.ndarray]:
    """The loader of a model's input pixels: `load_preprocessed` with `spec` (a picklable partial)."""
    import functools

    return functools.partial(_load, spec=spec)


def _load(path: str, spec: PreprocessSpec) -> np.ndarray:
    return load_preprocessed(path, spec)


def decode_files(found: Iterable[tuple[str | os.PathLike, str | None]], load: Callable[[str], np.ndarray],
                 workers: int = 1, ahead: int | None = None, executor: str = "thread") -> Iterator[Decoded]:
    """`Decoded` for each (path, problem) of `found`, in its order: files decoded by `workers` in parallel,
    at most `ahead` (default 4 per worker, at least 8) decoded or decoding before the consumer takes them.
    An entry with a problem (a dangling symlink...) passes through as a Decoded with that reason."""
    if not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"workers must be 1 to {MAX_WORKERS}, got {workers}")
    ahead = max(ahead, workers) if ahead else max(8, 4 * workers)
    window: collections.deque[Future | Decoded] = collections.deque()
    with _pool(executor, workers) as pool:
        try:
            for path, problem in found:
                if problem is not None:
                    window.append(Decoded(str(path), None, problem, None))
                else:
                    window.append(pool.submit(decode_one, str(path), load))
                while len(window) > ahead:
                    yield _take(window)
            while window:
                yield _take(window)
        finally:  # a consumer that stops early (an error, a full disk) leaves no decode running on
            for item in window:
                if isinstance(item, Future):
                    item.cancel()


def _take(window: collections.deque) -> Decoded:
    item = window.popleft()
    return item.result() if isinstance(item, Future) else item


def _pool(executor: str, workers: int) -> Executor:
    if executor == "thread":
        return ThreadPoolExecutor(workers, thread_name_prefix="kdiqa-decode")
    if executor == "process":
        import multiprocessing

        # forkserver, not fork: the parent holds a runtime's thread pool, which a fork would copy mid-run
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method))
    raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")


# a batch's pixels (uint8 [N, S, S, 3]) -> (scores [N], fast maps [N, h, w] or None): what a batch is run with
Run = Callable[[np.ndarray], "tuple[np.ndarray, np.ndarray | None]"]


def score_decoded(model: Scorer, decoded: Iterable[Decoded], batch_size: int,
                  run: Run | None = None) -> Iterator[tuple[Decoded, ScoreResult]]:
    """(Decoded, ScoreResult) for each decoded entry, in order: pixels go to the model `batch_size` at a time
    (unreadable entries wait in line with them and keep their place), while the workers decode on. `run`:
    how a batch is run (default `model.predict`; `score --map` gets each image's fast map from the same run)."""
    run = run or (lambda pixels: (model.predict(pixels, batch_size=len(pixels)), None))
    waiting: list[Decoded] = []
    images = 0
    for item in decoded:
        waiting.append(item)
        images += item.pixels is not None
        if images == batch_size or len(waiting) >= 4 * batch_size:  # bounded, a folder of broken files too
            yield from _flush(run, waiting)
            waiting, images = [], 0
    yield from _flush(run, waiting)


def _flush(run: Run, waiting: list[Decoded]) -> Iterator[tuple[Decoded, ScoreResult]]:
    good = [item.pixels for item in waiting if item.pixels is not None]
    scores, maps = run(np.stack(good)) if good else ((), None)
    scores, maps = iter(scores), iter(maps if maps is not None else ())
    for item in waiting:
        if item.pixels is None:
            yield item, ScoreResult(item.path, None, item.error)
        else:
            yield item, ScoreResult(item.path, float(next(scores)), score_map=next(maps, None))


def score_paths(model: Scorer, found: Iterable[tuple[str | os.PathLike, str | None]], batch_size: int = 32,
                workers: int | None = None, decode: str | None = None, executor: str = "thread",
                run: Run | None = None) -> Iterator[tuple[Decoded, ScoreResult]]:
    """The whole pipeline: (Decoded, ScoreResult) per entry of `found`, in order. `decode` ("draft" or
    "exact") overrides the model's recorded decode; `workers` defaults to `default_workers()`; `run`: how a
    batch is run (`score_decoded`)."""
    spec = model.preprocess.with_decode(decode)
    workers = workers or default_workers()
    ahead = max(2 * batch_size, 4 * workers)  # a batch waiting for the model and the next one decoding
    yield from score_decoded(model, decode_files(found, preprocessed(spec), workers, ahead, executor), batch_size,
                             run)


def walk(paths: Iterable[str | Path]) -> Iterator[tuple[str, None]]:
    """Named files as `found` entries, each to be tried."""
    return ((str(path), None) for path in paths)
