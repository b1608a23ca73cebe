"""The teacher in its fastest runtime here (`bench --teacher`), so "x times faster than the teacher" compares
the best student against the best teacher, not against the teacher in PyTorch eager.

A teacher checkpoint (or run dir) is benched in every CPU runtime installed here: the checkpoint itself
(PyTorch eager) and its exports, made once through `kdiqa_edge.export` into the cache and reused while the
checkpoint and options are unchanged: ONNX Runtime FP32, OpenVINO f32, OpenVINO bf16 where the CPU has BF16
kernels (OpenVINO's own default there; no calibration), ExecuTorch/XNNPACK FP32. Each is a row
(`teacher:torch`, `teacher:onnx-fp32`, ...), loaded and timed side by side with the students like any row;
the fastest at batch 1 is the teacher the speed-ups are against, and the report says which runtime that was.
An artifact given as `--teacher` is one form as it is. INT8 teachers are not made: the comparison is against
the teacher as distilled, at its full accuracy (bf16 is the one exception, OpenVINO's default inference
precision on a BF16 CPU, whose drift the bench shows in its row).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kdiqa_edge.errors import ConfigError, KdiqaError, first_line

RUNTIMES = ("torch", "onnx", "openvino", "executorch")  # --teacher-runtimes; torch: the checkpoint, eager
TORCH = "torch"


@dataclasses.dataclass(frozen=True)
class TeacherForm:
    path: str  # what bench loads
    label: str  # the row is named teacher:<label> (torch, onnx-fp32, openvino-bf16, or the artifact's name)


def parse_runtimes(text: str | None) -> tuple[str, ...] | None:
    """'torch,onnx' -> ("torch", "onnx"); None: every runtime installed here."""
    if text is None:
        return None
    names = tuple(dict.fromkeys(name.strip().lower() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in RUNTIMES]
    if unknown or not names:
        raise ConfigError(f"--teacher-runtimes takes a comma-separated list of {', '.join(RUNTIMES)}; "
                          f"got {text!r}")
    return names


def exports_here(runtimes: Sequence[str] | None = None) -> tuple[list[tuple[str, str]], list[str]]:
    """The (target, precision) exports of a teacher checkpoint for the runtimes asked (all by default) that
    this machine runs, and a line for each runtime or precision left out, saying why."""
    from kdiqa_edge.export.cpu import runtime_missing

    wanted = [name for name in (runtimes or RUNTIMES) if name != TORCH]
    found, left_out = [], []
    for name in wanted:
        missing = runtime_missing(name)
        if missing is not None:
            left_out.append(f"teacher: no {name} row ({missing})")
            continue
        found.append((name, "fp32"))
        if name == "openvino":
            from kdiqa_edge.export.openvino import bf16_here

            if bf16_here():
                found.append((name, "bf16"))
            else:
                left_out.append("teacher: no openvino-bf16 row: this CPU has neither AVX512-BF16 nor AMX-BF16")
    return found, left_out


def exports_folder(checkpoint: Path) -> Path:
    """Where a teacher checkpoint's exports for bench are kept: the cache, one folder per checkpoint content."""
    from kdiqa_edge.models.checkpoint import read_meta
    from kdiqa_edge.paths import cache_dir

    key = read_meta(checkpoint).get("content_hash") or hashlib.sha256(
        str(Path(checkpoint).resolve()).encode()).hexdigest()
    return cache_dir() / "bench-teacher" / key[:16]


def teacher_forms(teachers: Sequence[str | Path], runtimes: Sequence[str] | None = None, data=None,
                  threads: int | None = None, progress: bool = True,
                  log: Callable[[str], None] | None = None) -> tuple[list[TeacherForm], list[str]]:
    """Every form of the teacher to bench, and notes (what was left out, and why; where the exports are).

    A checkpoint or run dir: itself (PyTorch eager, where `runtimes` has torch) and its exports (`exports_here`);
    an export that fails is a note, not an error. An artifact: itself."""
    from kdiqa_edge.runtime.base import backend_kind

    log = log or (lambda line: None)
    forms: list[TeacherForm] = []
    notes: list[str] = []
    for teacher in teachers:
        if backend_kind(teacher) != "torch":
            forms.append(TeacherForm(str(teacher), Path(teacher).name))
            continue
        if runtimes is None or TORCH in runtimes:
            forms.append(TeacherForm(str(teacher), TORCH))
        exports, left_out = exports_here(runtimes)
        notes += left_out
        if exports:
            made, failed = export_teacher(Path(teacher), exports, data, threads, progress, log)
            forms += made
            notes += failed
    if not forms:
        raise ConfigError("--teacher: no form of the teacher to bench (check --teacher-runtimes)")
    return forms, notes


def export_teacher(checkpoint: Path, exports: list[tuple[str, str]], data, threads: int | None, progress: bool,
                   log: Callable[[str], None]) -> tuple[list[TeacherForm], list[str]]:
    """Export the teacher checkpoint per (target, precision) into its cache folder (an export up to date there
    is reused); the artifact of each, and a note for each that failed."""
    from kdiqa_edge.export import ExportConfig, export_checkpoint

    out = exports_folder(checkpoint)
    forms, notes = [], []
    for target, precision in exports:
        label = f"{target}-{precision}"
        cfg = ExportConfig(target=target, precision=precision, threads=threads or ExportConfig.threads)
        try:
            manifest = export_checkpoint(checkpoint, cfg, out, data=data, progress=progress, force=False,
                                         log=lambda line, label=label: log(f"teacher: {line}"))
        except KdiqaError as exc:
            notes.append(f"teacher: its {label} export failed here, so no {label} row: {first_line(exc)}")
            continue
        entry = manifest["exports"][label]
        artifact = next(out / f["path"] for f in entry["files"]
                        if Path(f["path"]).suffix in (".onnx", ".xml", ".pte"))
        forms.append(TeacherForm(str(artifact), label))
    notes.append(f"teacher: exported to {out} (reused while the checkpoint is unchanged)")
    return forms, notes


def same_path(a: str | Path, b: str | Path) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


def versus_teacher(results: Sequence[Any], batch: int) -> dict[str, Any] | None:
    """The teacher's fastest form at `batch` (p50) and every other working row against it: the report's
    `teacher` entry. A reduced-precision form (OpenVINO bf16) counts only where its SRCC is within the export
    drift bound (`ExportConfig.max_drift`) of the teacher's FP32 form's: the speed-ups are against the teacher
    at its own accuracy. None without a teacher row that ran."""
    forms = [r for r in results if r.teacher is not None]
    exact = _fp32_srcc(forms)
    timed = [r for r in forms if _unfit(r, exact, batch) is None]
    if not timed:
        return None
    best = min(timed, key=lambda r: r.latency_at(batch).p50_ms)
    t_ms = best.latency_at(batch).p50_ms
    versus = [{"row": r.name, "p50_ms": r.latency_at(batch).p50_ms, "speedup": t_ms / r.latency_at(batch).p50_ms,
               "smaller": (best.size_mb / r.size_mb) if best.size_mb and r.size_mb else None}
              for r in results if r.teacher is None and not r.reference and r.status == "ok"
              and r.latency_at(batch) is not None]
    return {"row": best.name, "format": best.format, "backend": best.backend, "precision": best.precision,
            "batch": batch, "p50_ms": t_ms, "size_mb": best.size_mb,
            "forms": [{"row": r.name, "format": r.format, "precision": r.precision, "status": r.status,
                       "p50_ms": r.latency_at(batch).p50_ms if r.latency_at(batch) else None,
                       "left_out": _unfit(r, exact, batch)} for r in forms],
            "versus": sorted(versus, key=lambda v: v["p50_ms"])}


def _fp32_srcc(forms: Sequence[Any]) -> float | None:
    """The SRCC of the teacher's first FP32 form that was scored, the yardstick of the reduced ones."""
    return next((r.metrics.srcc for r in forms if r.precision == "fp32" and r.metrics is not None), None)


def _unfit(r, exact: float | None, batch: int) -> str | None:
    """Why this teacher form is not the teacher at its own accuracy, timed at `batch`; None where it is."""
    from kdiqa_edge.export.base import ExportConfig

    if r.status != "ok" or r.latency_at(batch) is None:
        return f"{r.status}" if r.status != "ok" else f"not timed at batch {batch}"
    if r.precision == "fp32":
        return None
    if r.metrics is None:
        return f"{r.precision}: its drift from the FP32 teacher is not measured (accuracy off), so left out"
    if exact is None:
        return (f"{r.precision}: its drift from the FP32 teacher is not measured (no FP32 form of the teacher was "
                "scored here: give its checkpoint or FP32 artifact as --teacher too), so left out")
    delta = r.metrics.srcc - exact
    if not abs(delta) <= ExportConfig.max_drift:
        return f"{r.precision}: ΔSRCC {delta:+.4f} vs the FP32 teacher, over {ExportConfig.max_drift:g}, so left out"
    return None


def no_teacher_note(results: Sequence[Any], batch: int) -> str:
    """What the report says where no form of the teacher could be compared against (versus_teacher is None)."""
    forms = [r for r in results if r.teacher is not None]
    exact = _fp32_srcc(forms)
    why = "; ".join(f"{r.name}: {_unfit(r, exact, batch)}" for r in forms)
    return f"teacher: no speed-ups against the teacher: none of its forms is comparable ({why})"


def teacher_lines(teacher: dict[str, Any]) -> list[str]:
    """The teacher's runtime and the fastest model against it, in words."""
    batch = teacher["batch"]
    others = [f"{f['format']} {f['precision']}" + (f" {f['p50_ms']:.2f} ms" if f["p50_ms"] is not None else "")
              + (f" ({f['left_out']})" if f["left_out"] else "") for f in teacher["forms"] if f["row"] != teacher["row"]]
    lines = [f"teacher: fastest here in {teacher['format']} {teacher['precision']} ({teacher['row']}, "
             f"{teacher['p50_ms']:.2f} ms p50 at batch {batch})"
             + (f"; also measured: {', '.join(others)}" if others else "")]
    if teacher["versus"]:
        best = teacher["versus"][0]
        how = (f"{best['speedup']:.1f}x faster than" if best["speedup"] >= 1
               else f"{1 / best['speedup']:.1f}x slower than")
        lines.append(f"{best['row']} is {how} the teacher in its fastest runtime here ({teacher['format']} "
                     f"{teacher['precision']}): {best['p50_ms']:.2f} vs {teacher['p50_ms']:.2f} ms at batch {batch}")
    return lines
