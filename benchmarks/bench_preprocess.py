"""Decode + preprocess speed, before and after the window resize, and peak memory of scoring a 2 x 60000 image.

    python benchmarks/bench_preprocess.py [--images 100] [--rounds 7] [--out benchmarks/results/preprocess.md]

1. Images/s of `load_preprocessed` on 1024x768 JPEGs (JPEG draft mode on, the default, and off), one thread:
   "before" resizes the whole image along its shorter side, then crops (what the code did up to issue 13);
   "after" is `kdiqa_edge.preprocess.resize_crop`, which resizes only the crop's window. Rounds alternate
   before / after (the order flips every round) in this one process, so both see the same machine load;
   the per-round ratio is reported, and its median.
2. Peak RSS of `kdiqa-edge score MODEL tall.png` (a 2 x 60000 PNG) in a fresh process, with a random-init
   resnet18 student exported to ONNX (torch and timm only build it; scoring is torch-free). With
   `--before-rss` the same, once more with the old resize patched in (about 6 GB and 30 s).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_image_cache import environment, make_jpegs

from kdiqa_edge import preprocess
from kdiqa_edge.preprocess import PreprocessSpec, load_preprocessed, open_image


def resize_then_crop(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """The resize before issue 13: the whole image to its shorter-side size, then the centre crop."""
    _, (new_w, new_h) = preprocess.crop_box(img.width, img.height, spec.size)
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), preprocess._INTERPOLATION[spec.interpolation])
    top, left = round((new_h - spec.size) / 2.0), round((new_w - spec.size) / 2.0)
    return np.asarray(img.crop((left, top, left + spec.size, top + spec.size)), dtype=np.uint8)


def load_before(path: Path, spec: PreprocessSpec) -> np.ndarray:
    return resize_then_crop(open_image(path, draft_size=spec.size if spec.draft else None), spec)


def one_pass(fn, paths: list[Path], spec: PreprocessSpec) -> tuple[float, float]:
    """(images per wall second, images per CPU second) of one pass over the files."""
    wall, cpu = time.perf_counter(), time.process_time()
    for path in paths:
        fn(path, spec)
    return len(paths) / (time.perf_counter() - wall), len(paths) / (time.process_time() - cpu)


def speed(paths: list[Path], spec: PreprocessSpec, rounds: int) -> dict:
    for path in paths[:5]:  # warm-up: file cache, libjpeg, allocator
        load_before(path, spec), load_preprocessed(path, spec)
    before, after = [], []
    for i in range(rounds):
        order = ((before, load_before), (after, load_preprocessed))
        for results, fn in (order if i % 2 == 0 else order[::-1]):
            results.append(one_pass(fn, paths, spec))
    worst = max(int(np.abs(load_before(p, spec).astype(int) - load_preprocessed(p, spec).astype(int)).max())
                for p in paths)
    return {"before": before, "after": after, "ratios": [a[0] / b[0] for a, b in zip(after, before)],
            "cpu_ratios": [a[1] / b[1] for a, b in zip(after, before)], "max_pixel_diff": worst}


def window_first(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """`resize_crop` with its longer-side pass always on the window, even where that pass comes first (the
    road not taken: PIL's float32 box then rounds the intermediate, and the second pass can double that)."""
    saved = preprocess._full_pass_bytes
    preprocess._full_pass_bytes = lambda *args: 1 << 62
    try:
        return preprocess.resize_crop(img, spec)
    finally:
        preprocess._full_pass_bytes = saved


def resize_only(paths: list[Path], spec: PreprocessSpec, rounds: int) -> dict:
    """ms per image of the resize alone, on images decoded beforehand (draft mode), rounds alternating."""
    images = [open_image(p, draft_size=spec.size) for p in paths]
    variants = {"whole image, then crop": resize_then_crop, "resize_crop": preprocess.resize_crop,
                "window first (not used)": window_first}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(rounds):
        for name in (list(variants) if i % 2 == 0 else list(variants)[::-1]):
            start = time.perf_counter()
            for img in images:
                variants[name](img, spec)
            times[name].append((time.perf_counter() - start) / len(images) * 1e3)
    diff = {name: max(int(np.abs(fn(img, spec).astype(int) - resize_then_crop(img, spec).astype(int)).max())
                      for img in images) for name, fn in variants.items()}
    return {"ms": {name: statistics.median(t) for name, t in times.items()}, "max_diff": diff,
            "size": images[0].size}


RSS_SCRIPT = """
import resource, sys, time
if sys.argv[1] == "before":
    sys.path.insert(0, sys.argv[2])
    import bench_preprocess
    from kdiqa_edge import preprocess
    preprocess.resize_crop = bench_preprocess.resize_then_crop
from kdiqa_edge.cli import main
sys.argv = ["kdiqa-edge", "score", *sys.argv[3:], "--json"]
start = time.perf_counter()
try:
    main()
except SystemExit:
    pass
try:  # the peak of this process image: ru_maxrss also counts the parent's pages mapped between fork and exec
    peak_kb = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM"))
except OSError:
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"PEAK_RSS_KB {peak_kb} SECONDS {time.perf_counter() - start:.2f}", file=sys.stderr)
"""


def peak_rss(model: Path, image: Path, which: str) -> tuple[float, float, str]:
    """(peak RSS in MB, seconds, the score line) of scoring `image` in a fresh process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", RSS_SCRIPT, which, str(Path(__file__).resolve().parent),
                          str(model), str(image)], capture_output=True, text=True, env=env, timeout=600, check=False)
    line = next(x for x in run.stderr.splitlines() if x.startswith("PEAK_RSS_KB"))
    _, kb, _, seconds = line.split()
    return int(kb) / 1024, float(seconds), run.stdout.strip()


def _isa_flags() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next(line.split(":", 1)[1].split() for line in handle if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    return " ".join(f for f in flags if f.startswith(("sse4", "avx", "fma", "f16c", "bmi2", "vnni")))


def _median(values) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100, help="number of 1024x768 JPEGs")
    parser.add_argument("--rounds", type=int, default=7, help="alternating before/after rounds")
    parser.add_argument("--before-rss", action="store_true", help="also measure the old resize's peak RSS")
    parser.add_argument("--out", type=Path, help="write a markdown report here")
    args = parser.parse_args()

    env = environment()
    import PIL

    env["threads"] = "1 (one process, one file after another)"
    env["ISA flags"] = _isa_flags()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "jpegs").mkdir()
        paths = make_jpegs(tmp / "jpegs", args.images)
        results = {draft: speed(paths, PreprocessSpec(draft=draft), args.rounds) for draft in (True, False)}
        resize = resize_only(paths, PreprocessSpec(), args.rounds)
        tall = tmp / "tall_2x60000.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (60000, 2, 3), dtype=np.uint8)).save(tall)
        from bench_runtime import export_student

        model = export_student("resnet18", tmp)
        rss = {"after": peak_rss(model, tall, "after")}
        if args.before_rss:
            rss["before"] = peak_rss(model, tall, "before")
    env["load average (1/5/15 min) at end"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    env["pillow"] = PIL.__version__

    lines = [
        "# Decode + preprocess: window resize vs whole-image resize (1024x768 JPEG -> 224x224 uint8)",
        "",
        (f"`python benchmarks/bench_preprocess.py --images {args.images} --rounds {args.rounds}"
         f"{' --before-rss' if args.before_rss else ''}`. {args.rounds} rounds over {args.images} JPEGs "
         "(quality 90, 4:2:0), before and after alternating in one process (the order flips each round)."),
        "Before: open + (draft) decode + shorter-side resize of the whole image + centre crop. After: the same",
        "decode + `resize_crop`, which resizes only the crop's window (`kdiqa_edge/preprocess.py`).",
        "",
        "| JPEG draft mode | before, images/s (wall / CPU) | after, images/s (wall / CPU) | after / before, median (wall / CPU) |",
        "|---|---:|---:|---:|",
    ]
    for draft, r in results.items():
        lines.append(
            f"| {'on (default)' if draft else 'off'} | {_median(x[0] for x in r['before']):.0f} / "
            f"{_median(x[1] for x in r['before']):.0f} | {_median(x[0] for x in r['after']):.0f} / "
            f"{_median(x[1] for x in r['after']):.0f} | **{_median(r['ratios']):.2f}x** / "
            f"{_median(r['cpu_ratios']):.2f}x |")
    lines.append("")
    for draft, r in results.items():
        lines.append(f"Per-round wall ratios, draft {'on' if draft else 'off'}: "
                     + ", ".join(f"{x:.2f}" for x in r["ratios"])
                     + f"; max |after - before| over all files: {r['max_pixel_diff']} grey level(s).")
    base = resize["ms"]["whole image, then crop"]
    lines += [
        "",
        (f"The resize alone (images decoded beforehand in draft mode, {resize['size'][0]}x{resize['size'][1]}; "
         "median ms per image; max |difference| from the whole-image resize):"),
        "",
        "| resize | ms / image | vs whole image | max diff (grey levels) |",
        "|---|---:|---:|---:|",
        *[f"| {name} | {ms:.2f} | {base / ms:.2f}x | {resize['max_diff'][name]} |" for name, ms in resize["ms"].items()],
        "",
        "A landscape image's longer side (the one the crop cuts) is resized first by PIL, so `resize_crop` runs",
        "that pass at full length (the same cost as before) and saves only on the second pass; running it on the",
        "window too would be faster, but PIL's float32 box then rounds the intermediate, and the second pass can",
        "double that into 2 grey levels (seen on a few pixels of a few photos).",
    ]
    mb, seconds, score = rss["after"]
    lines += [
        "",
        "## Peak memory: scoring one 2 x 60000 PNG",
        "",
        "`kdiqa-edge score resnet18.fp32.onnx tall_2x60000.png --json` in a fresh process (random-init resnet18",
        "student, FP32 ONNX, onnxruntime CPU); peak RSS = that process's `VmHWM` (/proc/self/status),",
        "interpreter and onnxruntime included. Target: < 1.5 GB.",
        "",
        "| resize | peak RSS | wall time |",
        "|---|---:|---:|",
        *([f"| before (whole image, then crop) | {rss['before'][0]:.0f} MB | {rss['before'][1]:.1f} s |"]
          if "before" in rss else []),
        f"| after (window only) | **{mb:.0f} MB** | {seconds:.2f} s |",
        "",
        f"Score line: `{score}`",
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
