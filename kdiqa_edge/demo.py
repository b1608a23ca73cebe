"""`kdiqa-edge demo`: the whole path on the built-in synthetic set, ending in a report a newcomer can read.

synthetic data -> teacher fine-tune -> two students (a CNN and a mobile hybrid) -> ONNX FP32 / INT8 (and
`auto` where that precision exists), CoreML, the TensorRT-ready ONNX (and ExecuTorch where that target
exists) -> bench against the teacher -> DIR/report.md. Every stage is skipped when its output is already
there, so an interrupted demo continues where it stopped.

The default runs the paper's architectures at 224 px (CLIP ViT-B/32 -> resnet18, mobilevit_s), so the
speed and size ratios in the report are the ones a user sees on their own CPU; with no pretrained weights
on disk the weights are random and the accuracy figures are a smoke test. `DemoConfig.quick()` is the tiny
64 px path (tests, impatient users).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kdiqa_edge.data.spec import DatasetSpec
from kdiqa_edge.demo_report import Timings, artifacts, write_report
from kdiqa_edge.errors import ConfigError, KdiqaError, TensorRTUnavailable, first_line
from kdiqa_edge.io import read_json, sweep_temporaries, write_json

PRETRAINED_TEACHER = "ViT-B-32:openai"
RANDOM_TEACHER = "ViT-B-32:random"  # the same architecture, random init, when the weights are not on disk
TINY_TEACHER = "tiny"

# (target, precision) per model. A target or precision this installation does not have (the registry and
# PRECISIONS say) is left out, so new ones (auto, executorch) join the demo when they are built.
# The teacher is not exported here: bench times it in each runtime below (bench/teacher.py: its exports made
# once into the cache), and the fastest at its own accuracy is the one the students are compared against.
# ExecuTorch is left out of the demo's teacher forms for time (lowering ViT-B/32 costs the 12-minute demo about
# two minutes); `kdiqa-edge bench --teacher RUN` times it too.
TEACHER_RUNTIMES = ("torch", "onnx", "openvino")
MAP_IMAGES = 4  # test images whose local quality maps the report shows, lowest to highest MOS
# ExecuTorch INT8 only: its export builds and times the FP32 program beside it anyway (drift and latency in its
# notes), and a second FP32 program would cost the 12-minute demo about a minute
STUDENT_EXPORTS = (("onnx", "fp32"), ("onnx", "int8"), ("onnx", "auto"), ("coreml", "fp16"), ("tensorrt", "int8"),
                   ("executorch", "int8"))


@dataclasses.dataclass
class DemoConfig:
    students: tuple = ("resnet18", "mobilevit_s")  # one CNN, one mobile transformer hybrid (the paper's)
    teacher: str | None = None  # None: ViT-B-32:openai if its weights are on disk, else ViT-B-32:random
    pretrained: bool | None = None  # students ImageNet-pretrained; None: where the weights are on disk
    teacher_epochs: int = 1  # ViT-B/32 trains at about 5 images/s on 2 CPU cores
    epochs: int = 1  # student epochs (mobilevit_s trains at about 4 images/s on 2 CPU cores)
    batch_size: int = 16  # small batches: more steps for the few hundred synthetic images
    random_teacher_lr: float = 3e-4  # a random-init teacher learns nothing at the paper's 5e-6 in a few epochs
    refs: int | None = 6  # synthetic set size in reference images, 30 images each (None: the built-in 12)
    calib: int = 32  # INT8 calibration images (train split)
    bench_runs: int = 10  # timed runs per batch size
    batch_sizes: tuple = (1, 8)
    threads: int | None = None
    progress: bool = True
    verbose: bool = False  # stream the converters' output too (it always goes to each export.log)

    @classmethod
    def quick(cls) -> DemoConfig:
        """The tiny path: the 64 px random-init `tiny` CLIP (0.15M parameters), a few minutes on a CPU."""
        return cls(teacher=TINY_TEACHER, teacher_epochs=8, epochs=5, refs=None, calib=64, bench_runs=20)


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


def available_exports(requests) -> list[tuple[str, str]]:
    """The (target, precision) pairs whose target is registered and whose precision exists here."""
    from kdiqa_edge.export.base import PRECISIONS, TARGETS

    return [(target, precision) for target, precision in requests if target in TARGETS and precision in PRECISIONS]


def run_demo(cfg: DemoConfig, out: str | Path, log: Callable[[str], None] = print) -> Path:
    """Run every stage (skipping finished ones); returns the path of report.md."""
    from kdiqa_edge.models.student import check_student
    from kdiqa_edge.train.distill import DistillConfig, run_distill
    from kdiqa_edge.train.finetune import FinetuneConfig, run_finetune
    from kdiqa_edge.train.state import run_finished, run_interrupted

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings = Timings(read_json(out / "timings.json") if (out / "timings.json").is_file() else None)
    data = DatasetSpec()  # the built-in synthetic set
    if cfg.refs is not None:
        from kdiqa_edge.data.synthetic import default_root

        with timings.stage("synthetic set"):
            data = DatasetSpec(root=default_root(cfg.refs))
    teacher = cfg.teacher or (PRETRAINED_TEACHER if teacher_weights_on_disk() else RANDOM_TEACHER)
    pretrained = {s: (cfg.pretrained if cfg.pretrained is not None else student_weights_on_disk(s))
                  for s in cfg.students}
    for student in cfg.students:  # a typo in --students is one line now, not after the teacher's fine-tune
        check_student(student, pretrained[student], verify=False)
    random_teacher = teacher == TINY_TEACHER or teacher.endswith(":random")
    teacher_cfg = FinetuneConfig(teacher=teacher, epochs=cfg.teacher_epochs, batch_size=cfg.batch_size,
                                 progress=cfg.progress, **({"lr": cfg.random_teacher_lr} if random_teacher else {}))
    student_cfgs = {s: DistillConfig(student=s, pretrained=pretrained[s], epochs=cfg.epochs, batch_size=cfg.batch_size,
                                     progress=cfg.progress) for s in cfg.students}
    _check_finished(out, data, teacher_cfg, student_cfgs)
    log(f"demo: teacher {teacher}{' (not pretrained)' if random_teacher else ''}, students "
        + ", ".join(f"{s} ({'ImageNet' if p else 'not pretrained'})" for s, p in pretrained.items()))

    # 1. the teacher
    teacher_dir = out / "teacher"
    with timings.stage("teacher fine-tune"):
        if run_finished(teacher_dir):
            log(f"teacher: done ({teacher_dir})")
            timings.done_earlier("teacher fine-tune")
        else:
            log(f"teacher: fine-tuning {teacher} for {cfg.teacher_epochs} epoch(s) -> {teacher_dir}")
            run_finetune(teacher_cfg, data, teacher_dir, resume=run_interrupted(teacher_dir))
            shutil.rmtree(out / "exports" / "teacher", ignore_errors=True)  # stale: another training's

    # 2. the students
    student_dirs = {}
    for student in cfg.students:
        run_dir = out / "students" / student
        student_dirs[student] = run_dir
        with timings.stage(f"distill {student}"):
            if run_finished(run_dir):
                log(f"{student}: done ({run_dir})")
                timings.done_earlier(f"distill {student}")
                continue
            log(f"{student}: distilling for {cfg.epochs} epoch(s) -> {run_dir}")
            run_distill(dataclasses.replace(student_cfgs[student],
                                            teacher_checkpoint=str(teacher_dir / "checkpoints" / "best")),
                        data, run_dir, resume=run_interrupted(run_dir))
            # exports of an earlier training of this student are stale now (export refuses to mix the two)
            shutil.rmtree(out / "exports" / student, ignore_errors=True)

    # 3. exports
    exports: dict[str, dict[str, Any]] = {}
    for name, run_dir in student_dirs.items():
        requests = available_exports(STUDENT_EXPORTS)
        log(f"{name}: exporting to " + ", ".join(f"{t}-{p}" for t, p in requests))
        with timings.stage(f"export {name}"):
            exports[name] = _export_all(name, run_dir, out / "exports" / name, requests, cfg, data, log, timings)

    # 4. bench: the teacher in each of its runtimes and every student artifact, the teacher's run as the reference
    with timings.stage("bench"):
        sweep_temporaries(out / "bench")  # what a kill during an earlier bench left (a plot's claim)
        report = _bench(exports, teacher_dir, out, cfg, data)

    # 5. where the quality is lost: the first student's local quality maps of a few test images
    with timings.stage("quality maps"):
        maps = _maps(next(iter(student_dirs.items())), out, log) if student_dirs else []

    timings.finish()
    write_json(out / "timings.json", timings.to_dict())
    path = write_report(out, teacher, pretrained, exports, report, student_dirs, teacher_dir, timings, cfg, maps,
                        tiny=teacher == TINY_TEACHER, random_why=_random_why(cfg, teacher, pretrained))
    log(f"report: {path}")
    return path


def _random_why(cfg: DemoConfig, teacher: str, pretrained: dict[str, bool]) -> str:
    """Why the report's weights are random, in words: what the user asked, or what is not on disk."""
    reasons = []
    if teacher == TINY_TEACHER:
        reasons.append("the teacher is the random-init `tiny` CLIP" + (" of `--quick`" if cfg.teacher is None else ""))
    elif teacher.endswith(":random"):
        reasons.append(f"no {PRETRAINED_TEACHER} weights were found on this machine" if cfg.teacher is None
                       else f"the teacher `{teacher}` is random init")
    untrained = [s for s, p in pretrained.items() if not p]
    if untrained:
        reasons.append("students not pretrained (`--no-pretrained`)" if cfg.pretrained is False
                       else f"no ImageNet weights for {', '.join(untrained)} were found on this machine")
    return "; ".join(reasons) or "no pretrained weights"


def _check_finished(out: Path, data: DatasetSpec, teacher_cfg, student_cfgs: dict[str, Any]) -> None:
    """Refuse an OUT whose finished runs were trained otherwise (another teacher, epochs, data): the demo skips
    a finished stage, and the report would state this run's options for that run's models."""
    from kdiqa_edge import config as config_lib
    from kdiqa_edge.data.readers import absolute_spec
    from kdiqa_edge.train.distill import VOLATILE
    from kdiqa_edge.train.state import run_finished

    # what a finished run's config.yaml may hold otherwise and still be this demo's stage: how it ran (what a
    # resume may change), where its data is (compared below) and its teacher's path (the teacher is compared)
    how = (*VOLATILE, "dataset", "teacher_checkpoint")
    root = absolute_spec(data).root
    changed = []
    for name, run_dir, wanted in [("teacher", out / "teacher", teacher_cfg),
                                  *((s, out / "students" / s, c) for s, c in student_cfgs.items())]:
        if not run_finished(run_dir):
            continue
        saved = config_lib.as_saved(config_lib.load_file(run_dir / "config.yaml"))
        now = config_lib.as_saved(wanted)
        fields = [f"{k} {saved.get(k)} -> {v}" for k, v in now.items() if k not in how and saved.get(k) != v]
        before = DatasetSpec.from_dict(saved.get("dataset") or {}).root
        if before != root:
            fields.append(f"dataset {before or 'the built-in set'} -> {root or 'the built-in set'}")
        if fields:
            changed.append(f"{name}: {', '.join(fields)}")
    if changed:
        raise ConfigError(f"{out} holds a demo trained with other options ({'; '.join(changed)}): its finished "
                          "stages would be reported as this run's; pass the same options, or another --out")


def _export_all(name: str, run_dir: Path, out: Path, requests, cfg: DemoConfig, data: DatasetSpec, log,
                timings: Timings):
    """Each (target, precision) of `requests`, one line per artifact; a failing one is reported, not fatal."""
    from kdiqa_edge.export import ExportConfig, export_checkpoint

    quiet = (lambda *_: None)
    manifest: dict[str, Any] = {}
    failed: dict[str, str] = {}
    for target, precision in requests:
        label = f"{target}-{precision}"
        export_cfg = ExportConfig(target=target, precision=precision, calib=cfg.calib, threads=cfg.threads or 2)
        started, started_cpu = time.perf_counter(), time.process_time()
        try:
            manifest = export_checkpoint(run_dir, export_cfg, out, data, progress=cfg.progress, log=quiet,
                                         verbose=cfg.verbose)
        except TensorRTUnavailable:
            manifest = read_json(out / "manifest.json")  # the ONNX and the trtexec line are written
        except Exception as exc:  # one failing format must not sink the demo: the report says why
            if not isinstance(exc, KdiqaError) and os.environ.get("KDIQA_DEBUG"):
                raise
            log(f"{name}: {label} export failed: {first_line(exc, limit=500)}")
            failed[label] = first_line(exc, limit=500, typed=True)
            continue
        finally:
            timings.add(f"export {name} {label}", time.perf_counter() - started, time.process_time() - started_cpu)
        for file in (manifest.get("exports", {}).get(label) or {}).get("files", []):
            log(f"{name}: {label:16s} {out / file['path']} ({file['bytes'] / 1e6:.1f} MB)")
    return {**manifest, "failed": failed}


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
    report = run_bench(models, reference=teacher_dir, data=data, cfg=bench_cfg, progress=cfg.progress,
                       teacher=[teacher_dir], teacher_runtimes=TEACHER_RUNTIMES)
    write_report_json(report, out / "bench" / "bench.json")
    write_markdown(report, out / "bench" / "bench.md")
    write_plot(report, out / "bench" / "latency_vs_srcc.png")
    return report


def _maps(student: tuple[str, Path], out: Path, log) -> list:
    """The student's `fast` and `patches` maps of MAP_IMAGES test images spread over the MOS range, from its
    checkpoint (runtime/maps.py): OUT/maps/<kind>/NAME.map.png and .npy. A model without a feature map (a
    transformer's token sequence) has no `fast` map: said in one line, the patches map still made."""
    from kdiqa_edge.bench.accuracy import EvalData, eval_source
    from kdiqa_edge.runtime import QualityModel
    from kdiqa_edge.runtime.maps import write_maps

    name, run_dir = student
    model = QualityModel.load(run_dir)
    eval_set = EvalData(eval_source(run_dir), progress=False).get(model.preprocess)
    order = np.argsort(eval_set.mos, kind="stable")
    picks = order[np.unique(np.linspace(0, len(order) - 1, MAP_IMAGES).round().astype(int))]
    rows = []
    for kind in ("fast", "patches"):
        try:
            written = list(write_maps(model, [eval_set.files[i] for i in picks], out / "maps" / kind, kind=kind))
        except KdiqaError as exc:
            log(f"maps: no {kind} map for {name} ({first_line(exc)})")
            continue
        rows += [(name, kind, float(eval_set.mos[i]), row) for i, row in zip(picks, written)]
    log(f"maps: {sum(r.error is None for *_, r in rows)} quality maps of {name} -> {out / 'maps'}")
    return rows
