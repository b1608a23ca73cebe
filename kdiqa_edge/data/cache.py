"""The image cache: every image decoded ONCE to the model's uint8 input, memory-mapped.

Training reads `cache.images[i]` (uint8 [S, S, 3], CLIP-preprocessed, not normalized) at memory speed;
normalization happens later on the training device. The cache is keyed by the index (image paths, file
sizes and mtimes) and the PreprocessSpec, so a changed file list, a touched file or a different
preprocessing builds a new one. It is built in a temporary folder and renamed into place only when
complete (meta.json is written last), so a crash mid-build never leaves a cache that looks complete, and
the next build removes what a killed build left (`io.sweep_temporaries`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from kdiqa_edge import paths
from kdiqa_edge.data._lock import file_lock
from kdiqa_edge.data._progress import Progress
from kdiqa_edge.data.records import Dataset, Skip, require_usable
from kdiqa_edge.io import atomic_path, read_json, sweep_temporaries, write_json
from kdiqa_edge.preprocess import ImageLoadError, PreprocessSpec, load_preprocessed

FORMAT = "kdiqa-edge/image-cache/2"  # 2: the window resize of issue 13 (within a grey level of 1)
IMAGES_FILE = "images.u8"
META_FILE = "meta.json"
POOL_MIN_IMAGES = 64  # below this, a process pool costs more than it saves


@dataclasses.dataclass
class ImageCache:
    path: Path  # the cache folder
    key: str  # hash of index + preprocessing; feature caches key on it
    dataset: Dataset  # the images that decoded, aligned with `images`; decode failures in .skipped
    images: np.ndarray  # np.memmap uint8 [N, S, S, 3], read-only
    preprocess: PreprocessSpec

    def __len__(self) -> int:
        return len(self.dataset.records)

    @functools.cached_property
    def mos(self) -> np.ndarray:
        """float32 [N], 1..5, higher is better, aligned with `images`."""
        return self.dataset.mos

    @property
    def skipped(self) -> list[Skip]:
        return self.dataset.skipped

    @classmethod
    def build(cls, dataset: Dataset, spec: PreprocessSpec = PreprocessSpec(), cache_root: Path | None = None,
              workers: int | None = None, progress: bool = True, strict: bool = False) -> ImageCache:
        """Open the cache for (dataset, spec), decoding the images first if no complete cache exists."""
        key = cache_key(dataset, spec)
        folder = Path(cache_root or paths.cache_dir() / "images") / f"{dataset.name}-{key[:20]}"
        meta = _complete_meta(folder, key, spec)
        if meta is None:
            with file_lock(folder.parent / f".{folder.name}.lock"):
                meta = _complete_meta(folder, key, spec)  # another process may have built it meanwhile
                if meta is None:
                    sweep_temporaries(folder.parent)  # half-built caches of killed builds (not live ones)
                    _build(folder, dataset, spec, key, workers, progress)
                    meta = _complete_meta(folder, key, spec)
                    _remove_stale(folder, dataset, spec)
            assert meta is not None, f"image cache at {folder} did not complete"
        return cls._open(folder, dataset, spec, key, meta, strict)

    @classmethod
    def _open(cls, folder: Path, dataset: Dataset, spec: PreprocessSpec, key: str, meta: dict,
              strict: bool) -> ImageCache:
        failed = {image: reason for image, reason in meta["skipped"]}
        keep = [i for i, record in enumerate(dataset.records) if record.image not in failed]
        decoded = dataclasses.replace(
            dataset.subset(keep),
            skipped=list(dataset.skipped) + [Skip(image, reason) for image, reason in meta["skipped"]],
        )
        require_usable(decoded, strict, what="after decoding")
        shape = tuple(meta["shape"])
        images = np.memmap(folder / IMAGES_FILE, dtype=np.uint8, mode="r", shape=shape)
        return cls(path=folder, key=key, dataset=decoded, images=images, preprocess=spec)


def cache_key(dataset: Dataset, spec: PreprocessSpec) -> str:
    """sha256 of the index (root, image paths, sizes, mtimes) and the preprocessing."""
    digest = hashlib.sha256()
    digest.update(json.dumps([FORMAT, dataset.name, str(Path(dataset.root).resolve()), spec.key]).encode())
    for record in dataset.records:
        try:
            stat = (dataset.root / record.image).stat()
            signature = f"{stat.st_size}:{stat.st_mtime_ns}"
        except OSError:
            signature = "missing"
        digest.update(f"\n{record.image}\t{signature}".encode())
    return digest.hexdigest()


def _complete_meta(folder: Path, key: str, spec: PreprocessSpec) -> dict | None:
    """The cache's meta.json if the cache is complete and matches; None means (re)build."""
    try:
        meta = read_json(folder / META_FILE)
        shape = tuple(meta["shape"])
        if meta.get("format") != FORMAT or meta.get("key") != key:
            return None
        if shape[1:] != (spec.size, spec.size, 3):
            return None
        if (folder / IMAGES_FILE).stat().st_size != int(np.prod(shape)):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta


def _build(folder: Path, dataset: Dataset, spec: PreprocessSpec, key: str, workers: int | None,
           progress: bool) -> None:
    count, size = len(dataset.records), spec.size
    files = [str(dataset.root / record.image) for record in dataset.records]
    with atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)
        raw = tmp / IMAGES_FILE
        shape = (count, size, size, 3)
        with open(raw, "wb") as handle:
            handle.truncate(count * size * size * 3)
        failures = _decode_all(raw, shape, files, spec, workers, progress)
        skipped = [[dataset.records[i].image, failures[i]] for i in sorted(failures)]
        if failures:  # compact: keep only the rows that decoded, in order
            keep = [i for i in range(count) if i not in failures]
            full = np.memmap(raw, dtype=np.uint8, mode="r", shape=shape)
            compact_path = tmp / (IMAGES_FILE + ".compact")
            compact = np.memmap(compact_path, dtype=np.uint8, mode="w+", shape=(max(len(keep), 1),) + shape[1:])
            for row, index in enumerate(keep):
                compact[row] = full[index]
            compact.flush()
            del full, compact
            os.replace(compact_path, raw)
            with open(raw, "r+b") as handle:
                handle.truncate(len(keep) * size * size * 3)
            shape = (len(keep),) + shape[1:]
        with open(raw, "rb+") as handle:  # on disk before meta.json says the cache is complete
            os.fsync(handle.fileno())
        write_json(tmp / META_FILE, {
            "format": FORMAT, "key": key, "shape": list(shape), "dataset": dataset.name,
            "root": str(dataset.root), "preprocess": spec.to_dict(), "images": _image_list_hash(dataset),
            "skipped": skipped,
        })  # written last: a folder without it (or with a wrong key or size) is rebuilt


def _remove_stale(current: Path, dataset: Dataset, spec: PreprocessSpec) -> None:
    """Delete older caches of the same images under the same root and preprocessing, made before some of
    the files changed: without this, every touched file would leave a full-size copy behind."""
    import shutil

    same = {"root": str(dataset.root), "preprocess": json.loads(json.dumps(spec.to_dict())),
            "images": _image_list_hash(dataset)}
    for folder in current.parent.glob(f"{dataset.name}-*"):
        if folder == current or not folder.is_dir():
            continue
        try:
            meta = read_json(folder / META_FILE)
        except (OSError, ValueError):
            continue
        if all(meta.get(k) == v for k, v in same.items()):
            shutil.rmtree(folder, ignore_errors=True)  # a process that has it mapped keeps its view


def _image_list_hash(dataset: Dataset) -> str:
    return hashlib.sha256("\n".join(r.image for r in dataset.records).encode()).hexdigest()


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


def _decode_all(raw: Path, shape: tuple, files: list[str], spec: PreprocessSpec, workers: int | None,
                progress: bool) -> dict[int, str]:
    """Decode every file into row i of the raw uint8 file; returns {index: reason} for the failures."""
    workers = workers or default_workers()
    count = len(files)
    chunk = max(8, min(256, count // (workers * 8) or 1))
    jobs = [(str(raw), shape, start, files[start:start + chunk], spec.to_dict()) for start in range(0, count, chunk)]
    failures: dict[int, str] = {}
    with Progress(progress, count, "decoding images") as advance:
        if workers == 1 or count < POOL_MIN_IMAGES:
            for job in jobs:
                failures.update(_decode_chunk(job))
                advance(len(job[3]))
        else:
            import multiprocessing
            import sys

            # fork on Linux, as torch's DataLoader does: workers start in milliseconds and a user's script
            # needs no `if __name__ == "__main__"` guard; the workers only run PIL and numpy.
            context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                futures = {pool.submit(_decode_chunk, job): len(job[3]) for job in jobs}
                for future in as_completed(futures):
                    failures.update(future.result())
                    advance(futures[future])
    return failures


def _decode_chunk(job) -> dict[int, str]:
    """Worker: decode files[start:start+n] into their rows of the shared raw file; {index: reason} for failures."""
    raw, shape, start, files, spec_dict = job
    spec = PreprocessSpec.from_dict(spec_dict)
    row_bytes = int(np.prod(shape[1:]))
    failures = {}
    fd = os.open(raw, os.O_WRONLY)
    try:
        for offset, file in enumerate(files):
            try:
                pixels = load_preprocessed(file, spec)
            except ImageLoadError as exc:
                failures[start + offset] = exc.reason  # the file is its row's
                continue
            os.pwrite(fd, np.ascontiguousarray(pixels, dtype=np.uint8).tobytes(), (start + offset) * row_bytes)
    finally:
        os.close(fd)
    return failures
