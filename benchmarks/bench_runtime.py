"""Runtime speed checks: QualityModel overhead vs a bare InferenceSession.run, and JPEG draft-mode decoding.

    python benchmarks/bench_runtime.py [--arch resnet18] [--threads 2] [--runs 300] [--markdown F]

1. Overhead: the same session, the same prepared float array, batch 1. Calls alternate between
   `session.run` and `QualityModel.run` so both see the same machine load; medians are compared.
   Target: <= 5 %.
2. Preprocessing of 1024x768 JPEGs to the model's uint8 input on one thread: `load_preprocessed` with
   JPEG draft mode (libjpeg decodes at 1/2 scale) vs a plain full decode + the same resize and crop.
   Target: >= 2x.

Needs torch + timm only to build the random-init student it exports; the measurement itself is torch-free.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdiqa_edge.preprocess import PreprocessSpec, load_preprocessed


def export_student(arch: str, out: Path, size: int = 224) -> Path:
    """A random-init timm student with the folded quality head, as FP32 ONNX with the artifact metadata."""
    import warnings

    import torch

    from kdiqa_edge.export.onnx import set_metadata
    from kdiqa_edge.models import QualityHead
    from kdiqa_edge.models.student import create_student

    torch.manual_seed(0)
    head = QualityHead(torch.nn.functional.normalize(torch.randn(5, 512), dim=-1), 100.0)
    student = create_student(arch, head, PreprocessSpec(size=size), pretrained=False).eval()
    path = out / f"{arch}.fp32.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(student, (torch.randn(1, 3, size, size),), str(path), input_names=["image"],
                          output_names=["score"], dynamic_axes={"image": {0: "batch"}, "score": {0: "batch"}},
                          opset_version=17, dynamo=False)
    set_metadata(path, {"format": "1", "preprocess": student.preprocess.to_dict(), "precision": "fp32",
                        "target": "onnx", "input": {"name": "image", "dtype": "float32", "layout": "NCHW",
                                                    "size": size, "normalized": True},
                        "outputs": ["score"], "source": {"kind": "student", "arch": arch, "pretrained": False}})
    return path


def measure_overhead(path: Path, threads: int, runs: int, warmup: int = 20) -> dict:
    from kdiqa_edge.runtime import QualityModel

    model = QualityModel.load(path, provider="cpu", threads=threads)
    session = model.backend.session
    size = model.preprocess.size
    x = model.prepare(np.random.default_rng(0).integers(0, 256, (1, size, size, 3), dtype=np.uint8))
    feed = {session.get_inputs()[0].name: x}
    for _ in range(warmup):
        session.run(None, feed)
        model.run(x)
    bare, wrapped = [], []
    for i in range(runs):  # alternate the order too, so neither side always runs second
        pair = ((bare, lambda: session.run(None, feed)), (wrapped, lambda: model.run(x)))
        for times, call in (pair if i % 2 == 0 else pair[::-1]):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    bare_ms, wrapped_ms = np.median(bare) * 1e3, np.median(wrapped) * 1e3
    return {"model": path.name, "threads": threads, "runs": runs, "bare_p50_ms": float(bare_ms),
            "runtime_p50_ms": float(wrapped_ms), "overhead_pct": float((wrapped_ms / bare_ms - 1) * 100),
            "overhead_us": float((wrapped_ms - bare_ms) * 1e3)}


def make_jpegs(folder: Path, count: int = 12) -> list[Path]:
    """1024x768 JPEGs (quality 90) from scikit-image's photos, flipped and shifted for variety."""
    from PIL import Image
    from skimage import data

    sources = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    paths = []
    for i in range(count):
        image = Image.fromarray(np.asarray(sources[i % len(sources)])).convert("RGB")
        if i // len(sources) % 2:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image = image.resize((1024 + 8 * i, 768), Image.Resampling.BICUBIC).crop((4 * i, 0, 4 * i + 1024, 768))
        path = folder / f"photo{i:02d}_1024x768.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def measure_draft(paths: list[Path], repeats: int = 5, size: int = 224) -> dict:
    """Median wall time and thread CPU time per image; the two paths alternate image by image.

    CPU time is what one core spends on the image; on a shared machine it is the steadier figure
    (wall time also counts the waits for a core that other processes hold).
    """
    specs = {"plain": PreprocessSpec(size=size, draft=False), "draft": PreprocessSpec(size=size)}
    wall = {label: [] for label in specs}
    cpu = {label: [] for label in specs}
    for path in paths:  # warm the page cache
        load_preprocessed(path, specs["plain"])
    for _ in range(repeats):
        for path in paths:
            for label, spec in specs.items():
                start, start_cpu = time.perf_counter(), time.thread_time()
                load_preprocessed(path, spec)
                cpu[label].append(time.thread_time() - start_cpu)
                wall[label].append(time.perf_counter() - start)
    result = {"images": len(paths), "repeats": repeats}
    for label in specs:
        result[f"{label}_ms"] = float(np.median(wall[label]) * 1e3)
        result[f"{label}_cpu_ms"] = float(np.median(cpu[label]) * 1e3)
        result[f"{label}_images_per_s"] = float(1e3 / result[f"{label}_ms"])
    result["speedup"] = result["plain_ms"] / result["draft_ms"]
    result["speedup_cpu"] = result["plain_cpu_ms"] / result["draft_cpu_ms"]
    return result


def environment_line(threads: int) -> str:
    """The machine the figures were measured on (they may be appended to another run's results)."""
    from kdiqa_edge.bench.environment import environment

    env = environment(threads)
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items()
                         if k in ("onnxruntime", "pillow", "numpy"))
    return (f"Measured on {env['cpu']}, {env['cpu_count']} logical cores, ISA "
            f"{' '.join(env['cpu_isa']) or 'unknown'}; {threads} ONNX Runtime threads; python "
            f"{env['python']}, {versions}; load average {env.get('load_average')} at the end.")


def markdown(overheads: list[dict], draft: dict, threads: int) -> str:
    lines = [environment_line(threads), "",
             "## Runtime overhead vs a bare InferenceSession.run (batch 1, same session and array)", "",
             "| Model | Threads | Runs | bare p50 ms | QualityModel p50 ms | overhead | target |",
             "|---|---|---|---|---|---|---|"]
    for o in overheads:
        lines.append(f"| {o['model']} | {o['threads']} | {o['runs']} | {o['bare_p50_ms']:.3f} | "
                     f"{o['runtime_p50_ms']:.3f} | {o['overhead_pct']:+.2f} % ({o['overhead_us']:+.1f} us) | <= 5 % |")
    lines += ["", "## Preprocessing 1024x768 JPEG -> 224x224 uint8 (one thread, median per image)", "",
              "| Path | wall ms / image | CPU ms / image | images/s (wall) |", "|---|---|---|---|",
              f"| plain full decode + resize + crop | {draft['plain_ms']:.2f} | {draft['plain_cpu_ms']:.2f} | "
              f"{draft['plain_images_per_s']:.0f} |",
              f"| JPEG draft mode + resize + crop | {draft['draft_ms']:.2f} | {draft['draft_cpu_ms']:.2f} | "
              f"{draft['draft_images_per_s']:.0f} |",
              "", f"Draft-mode speed-up: **{draft['speedup']:.2f}x** wall, **{draft['speedup_cpu']:.2f}x** CPU time, "
              f"over {draft['images']} images x {draft['repeats']} (target >= 2x).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["resnet18", "efficientnet_b0"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--draft-only", action="store_true", help="Skip the overhead check (needs no torch).")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        overheads = []
        for arch in [] if args.draft_only else args.arch:
            overheads.append(measure_overhead(export_student(arch, tmp), args.threads, args.runs))
            print(f"{arch}: bare {overheads[-1]['bare_p50_ms']:.3f} ms, runtime {overheads[-1]['runtime_p50_ms']:.3f} ms, "
                  f"overhead {overheads[-1]['overhead_pct']:+.2f} %", flush=True)
        draft = measure_draft(make_jpegs(tmp))
        print(f"JPEG 1024x768 -> 224: plain {draft['plain_ms']:.2f} ms, draft {draft['draft_ms']:.2f} ms, "
              f"speed-up {draft['speedup']:.2f}x wall, {draft['speedup_cpu']:.2f}x CPU", flush=True)
    text = markdown(overheads, draft, args.threads)
    if args.markdown:
        from kdiqa_edge.io import write_text

        write_text(args.markdown, text)
    else:
        print(text)
    ok = all(o["overhead_pct"] <= 5.0 for o in overheads) and max(draft["speedup"], draft["speedup_cpu"]) >= 2.0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
