"""`kdiqa-edge demo`: the whole path on the built-in synthetic set, ending in a report a newcomer can read.

synthetic data -> teacher fine-tune -> two students (a CNN and a mobile hybrid) -> ONNX FP32 / INT8,
CoreML, the TensorRT-ready ONNX -> bench against the teacher -> DIR/report.md. Every stage is skipped when
its output is already there, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

from kdiqa_edge.data.spec import DatasetSpec
from kdiqa_edge.errors import KdiqaError, TensorRTUnavailable
from kdiqa_edge.io import read_json, write_text

PRETRAINED_TEACHER = "ViT-B-32:openai"
TINY_TEACHER = "tiny"


@dataclasses.dataclass
class DemoConfig:
    students: tuple = ("resnet18", "mobilevit_s")  # one CNN, one mobile transformer hybrid
    teacher: Optional[str] = None  # None: ViT-B-32:openai if its weights are on disk, else tiny
    pretrained: Optional[bool] = None  # students ImageNet-pretrained; None: where the weights are on disk
    teacher_epochs: int = 8
    epochs: int = 5
    batch_size: int = 16  # small batches: more steps for the few hundred synthetic images
    tiny_teacher_lr: float = 3e-4  # a random-init teacher learns nothing at the paper's 5e-6 in a few epochs
    refs: Optional[int] = None  # synthetic set size in reference images (None: the built-in default)
    calib: int = 64  # INT8 calibration images (train split)
    bench_runs: int = 20  # timed runs per batch size
    batch_sizes: tuple = (1, 8)
    threads: Optional[int] = None
    progress: bool = True


def teacher_weights_on_disk(name: str = PRETRAINED_TEACHER) -> bool:
    """Are the open_clip weights for NAME:TAG in the local Hugging Face cache (no network is touched)?"""
    try:
        import open_clip
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    arch, _, tag = name.partition(":")
    cfg = open_clip.get_pretrained_cfg(arch, tag) or {}
    # "hf_hub" is "org/repo/" or "org/repo/filename"
    parts = (cfg.get("hf_hub") or "").strip("/").split("/")
    if len(parts) < 2:
        return False
    repo_id = "/".join(parts[:2])
    names = ["/".join(parts[2:])] if len(parts) > 2 else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    return any(isinstance(try_to_load_from_cache(repo_id, n), str) for n in names)


def student_weights_on_disk(arch: str) -> bool:
    try:
        import timm.models

        from kdiqa_edge.models.student import _cached_weights
    except ImportError:
        return False
    cfg = timm.models.get_pretrained_cfg(arch)
    return cfg is not None and _cached_weights(cfg) is not None


def run_demo(cfg: DemoConfig, out: str | Path, log: Callable[[str], None] = print) -> Path:
    """Run every stage (skipping finished ones); returns the path of report.md."""
    from kdiqa_edge.train.distill import DistillConfig, run_distill
    from kdiqa_edge.train.engine import run_finished, run_interrupted
    from kdiqa_edge.train.finetune import FinetuneConfig, run_finetune

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = DatasetSpec()  # the built-in synthetic set
    if cfg.refs is not None:
        from kdiqa_edge.data.synthetic import default_root

        data = DatasetSpec(root=default_root(cfg.refs))
    teacher = cfg.teacher or (PRETRAINED_TEACHER if teacher_weights_on_disk() else TINY_TEACHER)
    pretrained = {s: (cfg.pretrained if cfg.pretrained is not None else student_weights_on_disk(s))
                  for s in cfg.students}
    smoke = teacher == TINY_TEACHER or not all(pretrained.values())
    log(f"demo: teacher {teacher}, students "
        + ", ".join(f"{s} ({'ImageNet' if p else 'not pretrained'})" for s, p in pretrained.items()))
    timings: dict[str, float] = {}

    # 1. the teacher
    teacher_dir = out / "teacher"
    with _timed(timings, "teacher fine-tune"):
        if run_finished(teacher_dir):
            log(f"teacher: done ({teacher_dir})")
        else:
            lr = {"lr": cfg.tiny_teacher_lr} if teacher == TINY_TEACHER else {}
            run_finetune(FinetuneConfig(teacher=teacher, epochs=cfg.teacher_epochs, batch_size=cfg.batch_size,
                                        progress=cfg.progress, **lr), data, teacher_dir,
                         resume=run_interrupted(teacher_dir))

    # 2. the students
    student_dirs = {}
    for student in cfg.students:
        run_dir = out / "students" / student
        student_dirs[student] = run_dir
        with _timed(timings, f"distill {student}"):
            if run_finished(run_dir):
                log(f"{student}: done ({run_dir})")
                continue
            run_distill(DistillConfig(student=student, pretrained=pretrained[student],
                                      teacher_checkpoint=str(teacher_dir / "checkpoints" / "best"),
                                      epochs=cfg.epochs, batch_size=cfg.batch_size, progress=cfg.progress),
                        data, run_dir, resume=run_interrupted(run_dir))

    # 3. exports
    exports: dict[str, dict[str, Any]] = {}
    with _timed(timings, "export"):
        for name, run_dir in [("teacher", teacher_dir), *student_dirs.items()]:
            exports[name] = _export_all(name, run_dir, out / "exports" / name, cfg, data, log,
                                        full=name != "teacher")

    # 4. bench: the teacher's FP32 ONNX and every student artifact, the teacher's run as the reference
    with _timed(timings, "bench"):
        report = _bench(exports, teacher_dir, out, cfg, data)

    timings["total"] = time.perf_counter() - started
    path = write_report(out, teacher, pretrained, smoke, exports, report, student_dirs, teacher_dir, timings, cfg)
    log(f"report: {path}")
    return path


class _timed:
    def __init__(self, timings: dict[str, float], name: str):
        self.timings, self.name = timings, name

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.timings[self.name] = self.timings.get(self.name, 0.0) + time.perf_counter() - self.start


def _export_all(name: str, run_dir: Path, out: Path, cfg: DemoConfig, data: DatasetSpec, log, full: bool):
    """ONNX FP32 (+ INT8, CoreML FP16, the TensorRT-ready INT8 ONNX for the students)."""
    from kdiqa_edge.export import ExportConfig, export_checkpoint

    quiet = (lambda *_: None)
    requests = [("onnx", "fp32")]
    if full:
        requests += [("onnx", "int8"), ("coreml", "fp16"), ("tensorrt", "int8")]
    manifest: dict[str, Any] = {}
    failed: dict[str, str] = {}
    for target, precision in requests:
        export_cfg = ExportConfig(target=target, precision=precision, calib=cfg.calib,
                                  threads=cfg.threads or 2)
        try:
            manifest = export_checkpoint(run_dir, export_cfg, out, data, progress=cfg.progress, log=quiet)
        except TensorRTUnavailable:
            manifest = read_json(out / "manifest.json")  # the ONNX and the trtexec line are written
        except Exception as exc:  # one failing format must not sink the demo: the report says why
            if not isinstance(exc, KdiqaError) and os.environ.get("KDIQA_DEBUG"):
                raise
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log(f"{name}: {target} {precision} export failed: {reason}")
            failed[f"{target}-{precision}"] = f"{type(exc).__name__}: {reason}"
            continue
        log(f"{name}: exported {target} {precision}")
    return {**manifest, "failed": failed}


def artifacts(manifest: dict[str, Any], out: Path) -> dict[str, Path]:
    """label (e.g. onnx-int8) -> the artifact file (or .mlpackage) of each export in a manifest."""
    found = {}
    for label, entry in manifest.get("exports", {}).items():
        for file in entry.get("files", []):
            path = out / file["path"]
            if path.suffix in (".onnx", ".mlpackage", ".engine", ".plan"):
                found.setdefault(label, path)
    return found


def _bench(exports, teacher_dir: Path, out: Path, cfg: DemoConfig, data: DatasetSpec):
    from kdiqa_edge.bench.report import write_markdown, write_plot, write_report_json
    from kdiqa_edge.bench.runner import BenchConfig, run_bench

    models = []
    for name, manifest in exports.items():
        for label, path in artifacts(manifest, out / "exports" / name).items():
            if label.startswith("tensorrt"):
                continue  # a TensorRT-ready ONNX, benched on the device once it becomes an engine
            # a readable row label: copy-free symlink named after the model and format
            alias = out / "bench" / "models" / f"{name}.{label}{path.suffix}"
            alias.parent.mkdir(parents=True, exist_ok=True)
            if alias.is_symlink() or alias.exists():
                alias.unlink() if not alias.is_dir() or alias.is_symlink() else shutil.rmtree(alias)
            os.symlink(os.path.relpath(path, alias.parent), alias)
            models.append(alias)
    bench_cfg = BenchConfig(batch_sizes=tuple(cfg.batch_sizes), runs=cfg.bench_runs, warmup=3,
                            threads=cfg.threads)
    report = run_bench(models, reference=teacher_dir, data=data, cfg=bench_cfg, progress=cfg.progress)
    write_report_json(report, out / "bench" / "bench.json")
    write_markdown(report, out / "bench" / "bench.md")
    write_plot(report, out / "bench" / "latency_vs_srcc.png")
    return report


def write_report(out: Path, teacher: str, pretrained: dict[str, bool], smoke: bool, exports, report,
                 student_dirs: dict[str, Path], teacher_dir: Path, timings: dict[str, float], cfg: DemoConfig) -> Path:
    from kdiqa_edge.bench.report import markdown

    lines = ["# kdiqa-edge demo report", ""]
    if smoke:
        lines += ["> **Smoke test, not IQA results.** No pretrained weights were found on this machine, so the "
                  f"teacher is `{teacher}` (random init{', not pretrained' if teacher == TINY_TEACHER else ''}) "
                  "and the students are " + ", ".join(f"`{s}` ({'ImageNet' if p else 'not pretrained'})"
                                                       for s, p in pretrained.items())
                  + ". The figures show that every stage runs and what each format costs, not how well a "
                  "real teacher distils."
                  + (" The tiny teacher (64 px, about 0.15M parameters) is far smaller than the students, so "
                     "the students are slower than it here; with the real ViT-B/32 teacher the ratio reverses."
                     if teacher == TINY_TEACHER else "")
                  + (f" The tiny teacher was fine-tuned at lr {cfg.tiny_teacher_lr:g} instead of the paper's 5e-6."
                     if teacher == TINY_TEACHER else ""), ""]
    lines += ["## Summary", ""] + [f"- {line}" for line in summary_lines(report, exports, student_dirs,
                                                                          teacher_dir)]
    # the bench report's own sections sit under this report's "Benchmark" heading
    bench_md = markdown(report, title="Benchmark", environment=True).strip().replace("\n## ", "\n### ")
    lines += ["", "#" + bench_md, "",
              "![latency vs SRCC](bench/latency_vs_srcc.png)", "", "## Training", ""]
    for name, run_dir in [("teacher", teacher_dir), *student_dirs.items()]:
        for plot in sorted((run_dir / "plots").glob("*.png")):
            lines.append(f"![{name} {plot.stem}]({os.path.relpath(plot, out)})")
    lines += ["", "## Exports", ""]
    for name, manifest in exports.items():
        for label, entry in manifest.get("exports", {}).items():
            note = "; ".join(entry.get("notes") or [])
            lines.append(f"- {name} {label}: " + ", ".join(f"`{f['path']}` ({f['bytes'] / 1e6:.2f} MB)"
                                                           for f in entry.get("files", []))
                         + (f" — {note}" if note else ""))
        for label, reason in manifest.get("failed", {}).items():
            lines.append(f"- {name} {label}: FAILED — {reason}")
    lines += ["", "## Time", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    return write_text(out / "report.md", "\n".join(lines) + "\n")


def summary_lines(report, exports, student_dirs, teacher_dir) -> list[str]:
    rows = {r.name: r for r in report.results}
    teacher_row = next((r for r in report.results if r.name.startswith("teacher.onnx-fp32")), None)
    teacher_ms = teacher_row.latency_at(1).p50_ms if teacher_row and teacher_row.latency_at(1) else None
    teacher_test = read_json(teacher_dir / "summary.json").get("test") or {}
    lines = [f"Teacher (fine-tuned): test SRCC {teacher_test.get('srcc', float('nan')):.3f}, "
             f"PLCC {teacher_test.get('plcc', float('nan')):.3f}"
             + (f"; ONNX FP32 {teacher_row.size_mb:.1f} MB, {teacher_ms:.2f} ms at batch 1" if teacher_ms else "")]
    for student, run_dir in student_dirs.items():
        test = read_json(run_dir / "summary.json").get("test") or {}
        parts = [f"{student}: test SRCC {test.get('srcc', float('nan')):.3f}, PLCC {test.get('plcc', float('nan')):.3f}"]
        for label in ("onnx-fp32", "onnx-int8", "coreml-fp16"):
            row = next((r for n, r in rows.items() if n.startswith(f"{student}.{label}")), None)
            if row is None:
                continue
            if row.status != "ok":
                parts.append(f"{label}: {row.status} ({row.reason})")
                continue
            lat = row.latency_at(1)
            text = f"{label} {row.size_mb:.1f} MB"
            if lat:
                text += f", {lat.p50_ms:.2f} ms"
                if teacher_ms:
                    ratio = teacher_ms / lat.p50_ms
                    text += (f" ({ratio:.1f}x faster than the teacher)" if ratio >= 1
                             else f" ({1 / ratio:.1f}x slower than the teacher)")
            if row.metrics:
                text += f", SRCC {row.metrics.srcc:.3f}"
            parts.append(text)
        drift = (exports.get(student, {}).get("exports", {}).get("onnx-int8") or {}).get("drift") or {}
        if drift:
            parts.append("INT8 vs FP32 on the test split: " + ", ".join(
                f"{k} {v:+.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in drift.items()
                if isinstance(v, (int, float, str)) and not isinstance(v, bool)))
        lines.append("; ".join(parts))
    return lines
