"""Image-cache build speed on 1024x768 JPEGs: Pillow draft-mode decoding vs a plain open+convert+resize.

    python benchmarks/bench_image_cache.py --images 200 --out benchmarks/results/image_cache.md

Reports images/s per core (one process decoding one file after another) for both paths, and the real
`ImageCache.build` (process pool, all cores) end to end. Target (issue 2): draft >= 2x plain and
>= 150 images/s per core. The JPEGs are views of scikit-image's bundled photographs, quality 90 with
4:2:0 chroma subsampling (what cameras and KonIQ's 1024x768 files use).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, features

from kdiqa_edge.data.records import Dataset, Record
from kdiqa_edge.preprocess import PreprocessSpec, load_preprocessed, resize_crop


def make_jpegs(folder: Path, count: int, seed: int = 0) -> list[Path]:
    from kdiqa_edge.data.synthetic import PHOTOS, _photo

    rng = np.random.default_rng(seed)
    photos = [_photo(name) for name in PHOTOS]
    paths = []
    for i in range(count):
        photo = Image.fromarray(photos[i % len(photos)])
        scale = rng.uniform(1.0, 1.3)  # a different view each time, so the files differ
        big = photo.resize((int(1024 * scale), int(768 * scale)), Image.Resampling.BICUBIC)
        left, top = int(rng.integers(0, big.width - 1024 + 1)), int(rng.integers(0, big.height - 768 + 1))
        path = folder / f"{i:05d}.jpg"
        big.crop((left, top, left + 1024, top + 768)).save(path, quality=90, subsampling="4:2:0")
        paths.append(path)
    return paths


def plain(path: Path, spec: PreprocessSpec) -> np.ndarray:
    """The obvious path: full-size decode, convert, resize, crop."""
    with Image.open(path) as img:
        return resize_crop(img.convert("RGB"), spec)


def rate(fn, paths: list[Path], spec: PreprocessSpec, repeats: int) -> list[tuple[float, float]]:
    """(images per wall second, images per CPU second) of one process, per repeat, after a warm-up."""
    for path in paths[:5]:
        fn(path, spec)
    rates = []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        for path in paths:
            fn(path, spec)
        rates.append((len(paths) / (time.perf_counter() - wall), len(paths) / (time.process_time() - cpu)))
    return rates


def cache_build_rate(paths: list[Path], workers: int, folder: Path) -> tuple[float, float]:
    """(images per wall second, images per CPU second of parent + workers) of a real ImageCache.build."""
    from kdiqa_edge.data.cache import ImageCache

    dataset = Dataset(name="bench", root=paths[0].parent,
                      records=[Record(image=p.name, mos=3.0, raw=3.0) for p in paths])
    wall, cpu = time.perf_counter(), _cpu_with_children()
    cache = ImageCache.build(dataset, PreprocessSpec(), cache_root=folder, workers=workers, progress=False)
    wall, cpu = time.perf_counter() - wall, _cpu_with_children() - cpu
    assert cache.images.shape[0] == len(paths)
    return len(paths) / wall, len(paths) / cpu


def _cpu_with_children() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def environment() -> dict[str, str]:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown"
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return {"cpu": cpu, "cores": str(cores), "load average (1/5/15 min) at start": load,
            "python": sys.version.split()[0], "pillow": Image.__version__,
            "libjpeg-turbo": str(features.check_feature("libjpeg_turbo")), "numpy": np.__version__,
            "platform": platform.platform()}


def _loaded(env: dict[str, str]) -> bool:
    try:
        return float(env["load average (1/5/15 min) at start"].split(",")[0]) > float(env["cores"])
    except ValueError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="number of 1024x768 JPEGs")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per path (median reported)")
    parser.add_argument("--out", type=Path, help="write a markdown report here")
    args = parser.parse_args()

    env = environment()
    spec = PreprocessSpec()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "jpegs").mkdir()
        paths = make_jpegs(Path(tmp) / "jpegs", args.images)
        same = np.abs(load_preprocessed(paths[0], spec).astype(int) - plain(paths[0], spec).astype(int))
        draft_rates = rate(load_preprocessed, paths, spec, args.repeats)
        plain_rates = rate(plain, paths, spec, args.repeats)
        workers = int(env["cores"])
        build = cache_build_rate(paths, workers, Path(tmp) / "cache")

    draft_wall, draft_cpu = (statistics.median(r[k] for r in draft_rates) for k in (0, 1))
    plain_wall, plain_cpu = (statistics.median(r[k] for r in plain_rates) for k in (0, 1))
    rows = [
        ("plain open + convert + resize, 1 process", plain_wall, plain_cpu),
        ("draft-mode load_preprocessed, 1 process", draft_wall, draft_cpu),
        (f"ImageCache.build, {workers} worker processes (incl. start-up)", build[0], build[1]),
    ]
    lines = [
        "# Image cache build speed (1024x768 JPEG -> 224x224 uint8)",
        "",
        f"`python benchmarks/bench_image_cache.py --images {args.images} --repeats {args.repeats}`; "
        f"median of {args.repeats} passes over {args.images} JPEGs (quality 90, 4:2:0), after a warm-up.",
        "Per core = images per CPU-second used (process time; for the pool, parent + workers), which does not",
        "depend on what else the machine runs; wall-clock images/s does (see the load average below).",
        "",
        "| path | images/s (wall) | images/s per core (CPU time) |",
        "|---|---:|---:|",
        *[f"| {name} | {wall:.0f} | {cpu:.0f} |" for name, wall, cpu in rows],
        "",
        f"Draft vs plain per core: **{draft_cpu / plain_cpu:.2f}x** (wall: {draft_wall / plain_wall:.2f}x; "
        f"target >= 2x); draft per core: **{draft_cpu:.0f} images/s** (target >= 150).",
        f"Draft vs plain pixels on the first image: mean |diff| {same.mean():.2f}, max {same.max()} grey levels "
        "(libjpeg's DCT-domain 1/2 downscale before the bicubic resize).",
        "All passes, images/s per core: draft " + ", ".join(f"{r[1]:.0f}" for r in draft_rates)
        + "; plain " + ", ".join(f"{r[1]:.0f}" for r in plain_rates) + ".",
        *([f"The machine was shared while this ran (load average {env['load average (1/5/15 min) at start']} on "
           f"{env['cores']} cores): wall-clock rates are lower bounds; CPU-time rates suffer less, but still "
           "include cache and memory-bandwidth contention."] if _loaded(env) else []),
        "",
        "Environment:",
        "",
        *[f"- {key}: {value}" for key, value in env.items()],
        "",
    ]
    report = "\n".join(lines)
    print(report)
    if args.out:
        from kdiqa_edge.io import write_text

        write_text(args.out, report)


if __name__ == "__main__":
    main()
