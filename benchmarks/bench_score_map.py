"""What `score --map` costs over `score`: end-to-end seconds of the CLI on a folder of JPEGs, with and without
fast maps, each run a fresh process, rounds alternated, the fastest round of each kept.

    python benchmarks/bench_score_map.py [--work /tmp/bench-score-map] [--images 60] [--rounds 3] \\
        [--arch test_resnet] [--out benchmarks/results/score-map-<machine>.md]

Model: a random-init student (`--arch`, under the tiny CLIP teacher's head and 64 px preprocessing; the speed
is real, the scores are not image quality) exported with `kdiqa-edge export --target onnx --with-map`. Images:
`--images` 1024x768 JPEGs (quality 90) of a synthetic pattern. Each configuration is `kdiqa-edge score MODEL
DIR` (rows to /dev/null), with `--map DIR2` for the map rows; the process start (imports, model load) is in
every figure alike, and `--images 0` would time it alone.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(work: Path, arch: str, count: int) -> tuple[Path, Path]:
    import torch
    from PIL import Image

    from kdiqa_edge.models import save_checkpoint
    from kdiqa_edge.models.student import create_student
    from kdiqa_edge.models.teacher import load_teacher

    teacher = load_teacher("tiny")
    torch.manual_seed(0)
    checkpoint = save_checkpoint(create_student(arch, teacher.head, teacher.preprocess, pretrained=False),
                                 work / "checkpoint")
    subprocess.run([sys.executable, "-m", "kdiqa_edge", "export", str(checkpoint), "--target", "onnx", "--with-map",
                    "--out", str(work / "exports")], check=True, stdout=subprocess.DEVNULL)
    folder = work / "images"
    folder.mkdir(exist_ok=True)
    y, x = np.mgrid[0:768, 0:1024]
    for i in range(count):
        base = (128 + 100 * np.sin(x / (7 + i % 5)) * np.cos(y / (11 + i % 3))).astype(np.uint8)
        Image.fromarray(np.stack([base, np.roll(base, i, 1), np.roll(base, 2 * i, 0)], -1)).save(
            folder / f"p{i:03d}.jpg", quality=90)
    return work / "exports" / "onnx-fp32" / "model.fp32.onnx", folder


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    from kdiqa_edge.bench.environment import cpu_info, machine_slug, versions

    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-score-map"))
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--arch", default="test_resnet")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    model, folder = build(args.work, args.arch, args.images)
    score = [sys.executable, "-m", "kdiqa_edge", "score", str(model), str(folder)]
    configs = {"score": score, "score --map": [*score, "--map", str(args.work / "maps")]}
    times: dict[str, list[float]] = {name: [] for name in configs}
    for round_index in range(args.rounds):
        for name in (list(configs) if round_index % 2 == 0 else list(configs)[::-1]):
            shutil.rmtree(args.work / "maps", ignore_errors=True)
            times[name].append(timed(configs[name]))
    cpu = cpu_info()
    best = {name: min(t) for name, t in times.items()}
    lines = [f"# `score --map` against `score`: {args.images} JPEGs 1024x768, {args.arch} (random init, 64 px)", "",
             f"CPU: {cpu.get('model')}; ISA: {' '.join(cpu.get('isa') or []) or 'unknown'}; "
             f"{os.cpu_count()} cores; load at the end: {os.getloadavg()[0]:.2f}; {args.rounds} alternated "
             "rounds, each run a fresh process, fastest kept; threads: `score`'s defaults. Versions: python "
             f"{platform.python_version()}, "
             + ", ".join(f"{k} {v}" for k, v in versions().items() if k in ("onnxruntime", "pillow", "numpy"))
             + ".", "",
             "| command | seconds (fastest) | all rounds | images/s |", "|---|---|---|---|"]
    for name, values in times.items():
        lines.append(f"| {name} | {best[name]:.2f} | {', '.join(f'{v:.2f}' for v in values)} | "
                     f"{args.images / best[name]:.1f} |")
    lines += ["", f"`--map` costs {best['score --map'] / best['score']:.2f}x the time of `score` alone."]
    text = "\n".join(lines) + "\n"
    print(text)
    out = args.out or Path(__file__).parent / "results" / f"score-map-{machine_slug()}.md"
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
