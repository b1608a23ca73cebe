"""The benchmark suite: the paper's four students and its CLIP teacher, exported to every format this machine
can export, benched against their PyTorch checkpoints; writes benchmarks/results/<machine>.md.

    python benchmarks/bench_suite.py [--models resnet18 efficientnet_b0 ...] [--work DIR] [--runs 20]

Weights are random init (no pretrained weights can be downloaded here; pass --pretrained where the timm and
open_clip caches hold them): latency, size, parameter counts and the drift each format costs are real,
accuracy is that of an untrained model and says nothing about the method. The eval set is the synthetic
dataset unless --dataset/--root name another. Default formats are those this machine can export and run:
ONNX FP32 and INT8 everywhere, OpenVINO IR f32 and INT8 where openvino is installed (bf16 too where
the CPU has AMX-BF16 or AVX512-BF16), ONNX FP16 with a CUDA execution provider, TensorRT FP16/INT8 engines where
tensorrt imports (`--formats tensorrt:fp16` elsewhere writes the TensorRT-ready ONNX and trtexec.sh, listed
in the notes), and CoreML FP16, which converts on Linux but runs on macOS only, so off macOS its row says so.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEACHER = "ViT-B-32"
STUDENTS = ("swin_tiny_patch4_window7_224", "resnet18", "mobilevit_s", "efficientnet_b0")


def default_formats() -> list[tuple[str, str]]:
    """What this machine can export AND run: FP16 ONNX and TensorRT only with a GPU runtime (FP16 on a CPU
    execution provider is emulated and slow); CoreML converts anywhere, and its row says where it runs."""
    import importlib.util

    import onnxruntime as ort

    formats = [("onnx", "fp32"), ("onnx", "int8")]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        formats.append(("onnx", "fp16"))
    if importlib.util.find_spec("tensorrt") is not None:
        formats += [("tensorrt", "fp16"), ("tensorrt", "int8")]
    if importlib.util.find_spec("executorch") is not None:  # runs here too (XNNPACK has x86 kernels)
        formats += [("executorch", "fp32"), ("executorch", "int8")]
    if importlib.util.find_spec("openvino") is not None:  # bf16 only where the CPU computes it natively
        from kdiqa_edge.export.openvino import bf16_here

        formats += [("openvino", "fp32"), *([("openvino", "bf16")] if bf16_here() else []), ("openvino", "int8")]
    return formats + [("coreml", "fp16")]


def build_teacher(pretrained: bool):
    """The paper's teacher, CLIP ViT-B/32 with the quality head (random init unless --pretrained)."""
    if pretrained:
        from kdiqa_edge.models.teacher import load_teacher

        return load_teacher(f"{TEACHER}:openai")
    import open_clip
    import torch

    from kdiqa_edge.models.teacher import ClipBuild, teacher_from_clip

    cfg = open_clip.get_model_config(TEACHER)
    cfg["quick_gelu"] = True
    torch.manual_seed(0)
    clip = open_clip.create_model(TEACHER, pretrained=None, force_quick_gelu=True)
    build = ClipBuild(TEACHER, cfg, False, f"{TEACHER} (random init)")
    return teacher_from_clip(clip, open_clip.get_tokenizer(TEACHER), build).eval()


def save_models(work: Path, names: list[str], pretrained: bool) -> dict[str, Path]:
    """A run dir (checkpoints/best) per model; reused when already there."""
    from kdiqa_edge.models import save_checkpoint
    from kdiqa_edge.models.student import create_student

    runs = {name: work / name for name in names}  # the run dir is named after the model: the reference row's label
    if all((run / "checkpoints" / "best" / "model.json").is_file() for run in runs.values()):
        return runs
    teacher = build_teacher(pretrained)
    for name, run in runs.items():
        if (run / "checkpoints" / "best" / "model.json").is_file():
            continue
        model = teacher if name == TEACHER else create_student(name, teacher.head, teacher.preprocess,
                                                               pretrained=pretrained).eval()
        save_checkpoint(model, run / "checkpoints" / "best")
    return runs


def export_all(run: Path, out: Path, data, formats, log, threads: int = 2) -> tuple[list[Path], list[str]]:
    """Every (target, precision) this machine can export; returns the artifacts and what could not be done."""
    from kdiqa_edge.errors import KdiqaError, TensorRTUnavailable, first_line
    from kdiqa_edge.export import ExportConfig, export_checkpoint

    artifacts, notes = [], []
    for target, precision in formats:
        cfg = ExportConfig(target=target, precision=precision, calib=32, parity_images=8, eval_images=32,
                           latency_runs=5, threads=threads)  # the export's own checks, at --threads
        label = f"{target}-{precision}"
        start = time.perf_counter()
        try:
            export_checkpoint(run, cfg, out, data=data, progress=False, log=lambda m: None)
        except TensorRTUnavailable as exc:
            notes.append(f"{label}: {exc}")
        except KdiqaError as exc:
            notes.append(f"{label}: export failed: {exc}")
            continue
        except Exception as exc:  # noqa: BLE001 - one failing export must not end the suite
            notes.append(f"{label}: export crashed: {first_line(exc, limit=500, typed=True)}")
            log(traceback.format_exc())
            continue
        folder = out / label
        found = sorted(p for p in folder.iterdir() if p.suffix in (".engine", ".mlpackage", ".pte", ".xml")) if folder.is_dir() else []
        if target == "onnx" or (not found and target != "tensorrt"):
            found += sorted(folder.glob("*.onnx"))
        artifacts += found
        log(f"  {label}: {', '.join(p.name for p in found) or 'nothing to bench'} ({time.perf_counter() - start:.0f} s)")
    return artifacts, notes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=[TEACHER, *STUDENTS])
    parser.add_argument("--work", type=Path, default=None, help="Checkpoints and exports (default: the cache dir).")
    parser.add_argument("--pretrained", action="store_true", help="Use cached pretrained weights (offline here).")
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--formats", nargs="+", default=None,
                        help="target:precision pairs, e.g. onnx:fp32 onnx:int8 (default: what this machine runs)")
    parser.add_argument("--runtime-figures", type=Path, default=None,
                        help="A markdown file from bench_runtime.py to append to the results.")
    parser.add_argument("--out", type=Path, default=None, help="Results markdown (default results/<machine>.md).")
    args = parser.parse_args(argv)

    from kdiqa_edge import paths
    from kdiqa_edge.bench import BenchConfig, run_bench
    from kdiqa_edge.bench.environment import machine_slug
    from kdiqa_edge.bench.report import environment_lines, markdown
    from kdiqa_edge.cli.bench import parse_batch_sizes
    from kdiqa_edge.data.spec import DatasetSpec
    from kdiqa_edge.io import write_text

    log = lambda message: print(message, flush=True)
    work = args.work or paths.cache_dir() / "bench-suite"
    data = DatasetSpec.from_cli(dataset=args.dataset, root=args.root)
    formats = [tuple(f.split(":")) for f in args.formats] if args.formats else default_formats()
    cfg = BenchConfig(batch_sizes=parse_batch_sizes(args.batch_sizes), threads=args.threads, warmup=args.warmup,
                      runs=args.runs, max_images=args.max_images)
    out = args.out or ROOT / "benchmarks" / "results" / f"{machine_slug()}.md"

    started = time.perf_counter()
    runs = save_models(work, args.models, args.pretrained)
    sections, first_report = [], None
    for name in args.models:
        log(f"{name}: exporting {', '.join(f'{t}-{p}' for t, p in formats)}")
        artifacts, notes = export_all(runs[name], work / name / "exports", data, formats, log, args.threads)
        log(f"{name}: benching {len(artifacts)} artifacts against the checkpoint")
        report = run_bench(artifacts, reference=runs[name], data=data, cfg=cfg, progress=False)
        report.notes = notes + report.notes
        first_report = first_report or report
        # per-model sections share the environment header written once at the top
        body = markdown(report, title=f"{name}", environment=False).split("\n")
        sections.append("\n".join(["#" + line if line.startswith("#") else line for line in body]))
        for row in report.results:
            at1 = row.latency_at(1)
            log(f"  {row.name:28s} {row.format:8s} {row.precision:5s} {row.status:7s} "
                f"{'' if at1 is None else f'{at1.p50_ms:8.2f} ms @1'}  {row.reason or ''}")
        write_text(out, _document(first_report, sections, environment_lines, args, time.perf_counter() - started))
    if args.runtime_figures and args.runtime_figures.is_file():
        sections.append(args.runtime_figures.read_text().replace("## ", "### ").strip())
        sections[-1] = "## Runtime overhead and preprocessing (benchmarks/bench_runtime.py)\n\n" + sections[-1]
    write_text(out, _document(first_report, sections, environment_lines, args, time.perf_counter() - started))
    log(f"wrote {out}")
    return 0


def _document(report, sections, environment_lines, args, seconds) -> str:
    head = [f"# kdiqa-edge benchmark suite: {report.environment.get('cpu')}", "",
            "The paper's teacher (CLIP ViT-B/32) and four students, random init (no pretrained weights on this "
            "offline machine): latency, size, parameters and format drift are real; accuracy is an untrained "
            "model's and only anchors the drift. Reference = the PyTorch checkpoint (first row of each table).", "",
            *[f"- {line}" for line in environment_lines(report)],
            f"- Command: `python benchmarks/bench_suite.py {' '.join(sys.argv[1:] if argv_is_cli() else [])}`".rstrip(),
            f"- Suite wall time: {seconds / 60:.1f} min; load average at the end {os.getloadavg()[0]:.2f} "
            "(above the core count, other jobs shared the CPU and latencies are noisy)", ""]
    return "\n".join(head + ["\n\n".join(sections), ""])


def argv_is_cli() -> bool:
    return Path(sys.argv[0]).name == Path(__file__).name


if __name__ == "__main__":
    sys.exit(main())
