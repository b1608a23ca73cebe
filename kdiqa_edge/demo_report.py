"""The demo's report.md (`kdiqa-edge demo`, kdiqa_edge/demo.py): what was built, the students against the
teacher in its fastest runtime, their exports, quality maps and where the time went, each figure read from the
files the demo wrote (bench's JSON, the export manifests, the runs' summaries).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

from kdiqa_edge.io import read_json, write_text
from kdiqa_edge.runtime.base import ARTIFACT_SUFFIXES


def artifacts(manifest: dict[str, Any], out: Path) -> dict[str, Path]:
    """label (e.g. onnx-int8) -> the artifact file (or .mlpackage) of each export in a manifest."""
    found = {}
    for label, entry in manifest.get("exports", {}).items():
        for file in entry.get("files", []):
            path = out / file["path"]
            if path.suffix in ARTIFACT_SUFFIXES:
                found.setdefault(label, path)
    return found


class Timings:
    """Wall and CPU seconds per stage, with the load average when each ended: on a shared machine the wall
    time says how busy it was as much as how long the stage takes, and CPU time is the steadier estimate."""

    def __init__(self, earlier: dict[str, Any] | None = None):
        self.started, self.started_cpu = time.perf_counter(), time.process_time()
        self.stages: dict[str, dict[str, float]] = {}
        self.start_load = _load()
        self.earlier = (earlier or {}).get("stages", {})  # an earlier run's timings.json: its stages

    def done_earlier(self, name: str) -> None:
        """A stage this run skips (finished before): its figures are the run's that did it, marked so."""
        if name in self.earlier:
            self.stages[name] = {**self.earlier[name], "earlier": True}

    def stage(self, name: str) -> Stage:
        return Stage(self, name)

    def add(self, name: str, seconds: float, cpu_seconds: float) -> None:
        entry = self.stages.setdefault(name, {"seconds": 0.0, "cpu_seconds": 0.0})
        if entry.get("earlier"):
            return
        entry["seconds"] += seconds
        entry["cpu_seconds"] += cpu_seconds
        entry["load_1min"] = _load()

    def finish(self) -> None:
        self.add("total", time.perf_counter() - self.started, time.process_time() - self.started_cpu)

    def to_dict(self) -> dict[str, Any]:
        return {"stages": self.stages, "load_1min_at_start": self.start_load, "cpu_count": os.cpu_count()}


class Stage:
    def __init__(self, timings: Timings, name: str):
        self.timings, self.name = timings, name

    def __enter__(self):
        self.start, self.start_cpu = time.perf_counter(), time.process_time()

    def __exit__(self, *exc):
        self.timings.add(self.name, time.perf_counter() - self.start, time.process_time() - self.start_cpu)


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


@dataclasses.dataclass
class Versus:
    """One student artifact against the teacher in its fastest runtime here, both at batch 1 on this CPU."""

    student: str
    label: str  # e.g. onnx-int8
    ms: float
    size_mb: float
    params: int | None
    speedup: float  # teacher ms / student ms
    smaller: float  # teacher MB / student MB


def teacher_row(report):
    """The bench row of the teacher's fastest form at its own accuracy (bench/teacher.py), or None."""
    if not report.teacher:
        return None
    return next((r for r in report.results if r.name == report.teacher["row"]), None)


def teacher_words(report) -> str:
    """Which runtime the teacher row is, in words: "OpenVINO bf16"."""
    row = teacher_row(report)
    return f"{row.backend} {row.precision}" if row is not None else "its fastest runtime"


def versus_teacher(report, students) -> tuple[Any, list[Versus]]:
    """(the teacher's fastest row or None, every benched student artifact against it), fastest first."""
    t_row = teacher_row(report)
    if t_row is None or not t_row.latency_at(1) or not t_row.size_mb:
        return None, []
    rows = [r for r in report.results if r.status == "ok" and r.latency_at(1) and r.size_mb and r.teacher is None]
    t_ms, t_mb = t_row.latency_at(1).p50_ms, t_row.size_mb
    found = []
    for student in students:
        for row in rows:
            if row.name.startswith(f"{student}."):
                ms = row.latency_at(1).p50_ms
                label = row.name[len(student) + 1:].rsplit(".", 1)[0]
                found.append(Versus(student, label, ms, row.size_mb, row.params, t_ms / ms, t_mb / row.size_mb))
    return t_row, sorted(found, key=lambda v: v.ms)


def ratio(x: float, more: str, less: str) -> str:
    """'8.1x faster', '24.8x slower': a ratio below 1 in the other word, never '0.0x'."""
    return f"{x:.1f}x {more}" if x >= 1 else f"{1 / x:.1f}x {less}"


def headline(teacher: str, teacher_row, versus: list[Versus], random_weights: bool, tiny: bool,
             epochs: str, teacher_runtime: str = "its fastest runtime",
             random_why: str = "no pretrained weights were found on this machine") -> list[str]:
    """The report's first lines: the speed and size ratios in plain words, then what the accuracy means."""
    lines = []
    best = {}
    for v in versus:  # sorted fastest first: each student's first is its fastest export
        best.setdefault(v.student, v)
    if teacher_row is not None and best:
        t_ms, t_mb = teacher_row.latency_at(1).p50_ms, teacher_row.size_mb
        for v in best.values():
            lines.append(f"On this CPU the student `{v.student}` is **{ratio(v.speedup, 'faster', 'slower')}** and "
                         f"**{ratio(v.smaller, 'smaller', 'larger')}** than the `{teacher}` teacher ({v.label} against "
                         f"the teacher in its fastest runtime here, {teacher_runtime}, at batch 1: {_short(v.ms)} vs "
                         f"{_short(t_ms)} ms, "
                         f"{_short(v.size_mb)} vs {_short(t_mb)} MB).")
        if tiny:
            lines.append("The `--quick` demo's teacher is the 64 px `tiny` CLIP (about 0.15M parameters), far smaller "
                         "than the students; run `kdiqa-edge demo` without `--quick` for the real ViT-B/32 ratios.")
    else:
        lines.append("Every form of the teacher or every student export failed to bench: no speed-up to report "
                     "(see Failures below).")
    if random_weights:
        lines.append("The accuracy figures (SRCC, PLCC, drift) are a **smoke test**: the weights are random "
                     f"({random_why}), trained for {epochs} on the synthetic set. "
                     "They show that every stage runs, not how well a real teacher distils.")
    else:
        lines.append("The accuracy figures (SRCC, PLCC, drift) are a **smoke test**: pretrained weights, but only "
                     f"{epochs} on the small synthetic set.")
    return lines


def write_report(out: Path, teacher: str, pretrained: dict[str, bool], exports, report,
                 student_dirs: dict[str, Path], teacher_dir: Path, timings: Timings, cfg,
                 maps: list | None = None, tiny: bool = False,
                 random_why: str = "no pretrained weights were found on this machine") -> Path:
    """DIR/report.md. `cfg`: the demo's `DemoConfig`; `tiny`: the teacher is the tiny random-init test one;
    `random_why`: why some weights are random (--no-pretrained, the --quick teacher, none on disk)."""
    from kdiqa_edge.bench.report import markdown

    random_weights = tiny or teacher.endswith(":random") or not all(pretrained.values())
    t_row, versus = versus_teacher(report, list(student_dirs))
    epochs = f"{cfg.teacher_epochs} teacher and {cfg.epochs} student epoch{'s' if cfg.epochs != 1 else ''}"
    lines = ["# kdiqa-edge demo report", ""]
    for line in headline(teacher, t_row, versus, random_weights, tiny, epochs, teacher_words(report), random_why):
        lines += [line, ""]
    lines += [f"Teacher `{teacher}`{' (random init, not pretrained)' if tiny or teacher.endswith(':random') else ''}; "
              "students " + ", ".join(f"`{s}` ({'ImageNet' if p else 'not pretrained'})" for s, p in pretrained.items())
              + (f"; the random-init teacher was fine-tuned at lr {cfg.random_teacher_lr:g} instead of the paper's 5e-6"
                 if tiny or teacher.endswith(":random") else "") + ".", ""]
    if versus:
        lines += ["## Students vs the teacher", "",
                  (f"Teacher `{t_row.name}` ({teacher_words(report)}, its fastest form here of "
                   f"{', '.join(f['row'] for f in report.teacher['forms'])}): {t_row.latency_at(1).p50_ms:.2f} ms "
                   f"at batch 1, {t_row.size_mb:.1f} MB, {_millions(t_row.params)} parameters."), "",
                  "| student | format | p50 ms (batch 1) | vs the teacher | size (MB) | vs the teacher | params |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {v.student} | {v.label} | {v.ms:.2f} | {ratio(v.speedup, 'faster', 'slower')} | {v.size_mb:.1f} | "
                  f"{ratio(v.smaller, 'smaller', 'larger')} | "
                  f"{_millions(v.params)} |" for v in versus]
        lines.append("")
    lines += ["## Summary", ""] + [f"- {line}" for line in summary_lines(report, exports, student_dirs,
                                                                          teacher_dir)]
    # the bench report's own sections sit under this report's "Benchmark" heading
    bench_md = markdown(report, title="Benchmark", environment=True).strip().replace("\n## ", "\n### ")
    lines += ["", "#" + bench_md, "",
              "![latency vs SRCC](bench/latency_vs_srcc.png)", "", "## Training", ""]
    for name, run_dir in [("teacher", teacher_dir), *student_dirs.items()]:
        for plot in sorted((run_dir / "plots").glob("*.png")):
            lines.append(f"![{name} {plot.stem}]({os.path.relpath(plot, out)})")
    lines += maps_section(maps or [], out)
    lines += ["", "## Exports", ""] + exports_section(exports)
    lines += ["", "## Time", ""] + time_section(timings)
    return write_text(out / "report.md", "\n".join(lines) + "\n")


def _short(value: float) -> str:
    """Three significant figures at most, never fewer than one decimal: 0.184, 11.2, 351.5."""
    return f"{value:.3g}" if value < 10 else f"{value:.1f}"


def _millions(count: int | None) -> str:
    return f"{count / 1e6:.2f}M" if count else "—"


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def summary_lines(report, exports, student_dirs, teacher_dir) -> list[str]:
    rows = {r.name: r for r in report.results}
    t_row = teacher_row(report)
    teacher_ms = t_row.latency_at(1).p50_ms if t_row and t_row.latency_at(1) else None
    teacher_test = read_json(teacher_dir / "summary.json").get("test") or {}
    lines = [f"Teacher (fine-tuned): test SRCC {teacher_test.get('srcc', float('nan')):.3f}, "
             f"PLCC {teacher_test.get('plcc', float('nan')):.3f}"
             + (f"; fastest here in {teacher_words(report)}: {t_row.size_mb:.1f} MB, {teacher_ms:.2f} ms at batch 1"
                if teacher_ms else "")]
    for student, run_dir in student_dirs.items():
        test = read_json(run_dir / "summary.json").get("test") or {}
        parts = [f"{student}: test SRCC {test.get('srcc', float('nan')):.3f}, PLCC {test.get('plcc', float('nan')):.3f}"]
        for label in sorted(artifacts(exports.get(student, {}), Path())):
            row = next((r for n, r in rows.items() if n.startswith(f"{student}.{label}.")), None)
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
            parts.append(int8_drift_text(drift))
        lines.append("; ".join(parts))
    return lines


def maps_section(maps: list, out: Path) -> list[str]:
    """The quality maps: one row per test image, the fast and patches overlays side by side."""
    if not maps:
        return []
    kinds = list(dict.fromkeys(kind for _, kind, _, _ in maps))
    student = maps[0][0]
    lines = ["", "## Where the quality is lost", "",
             f"Local quality maps of `{student}` (1 = bad ... 5 = perfect, the global score in the corner) on test "
             "images from the lowest to the highest MOS: `fast` is the head at every position of the student's "
             "last feature map (one pass), `patches` the model on a 4x4 grid of overlapping crops. "
             "`kdiqa-edge score MODEL IMAGES --map DIR` makes them for any image.", "",
             "| image | MOS | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
    by_image: dict[str, dict[str, Any]] = {}
    for _, kind, mos, row in maps:
        by_image.setdefault(row.path, {"mos": mos})[kind] = row
    for path, cells in by_image.items():
        shown = [f"![{kind}]({os.path.relpath(cells[kind].overlay, out)})" if kind in cells and cells[kind].overlay
                 else (cells[kind].error if kind in cells else "—") for kind in kinds]
        lines.append(f"| {Path(path).name} | {cells['mos']:.2f} | " + " | ".join(shown) + " |")
    return lines


def int8_drift_text(drift: dict[str, Any]) -> str:
    """An INT8 export's drift against its FP32 model in words, not the manifest's keys."""
    figures = [(label, drift.get(key), fmt) for label, key, fmt in (
        ("ΔSRCC", "delta_srcc", "+.4f"), ("ΔPLCC", "delta_plcc", "+.4f"),
        ("mean |Δscore|", "mean_abs_diff_vs_fp32", ".4f"), ("max |Δscore|", "max_abs_diff_vs_fp32", ".4f"),
        ("rank agreement with FP32 (SRCC)", "srcc_vs_fp32", ".3f"))]
    images = drift.get("images")
    return (f"INT8 vs FP32 on {images} test images: " if images else "INT8 vs FP32 on the test split: ") + ", ".join(
        f"{label} {value:{fmt}}" for label, value, fmt in figures if isinstance(value, (int, float)))


def exports_section(exports: dict[str, dict[str, Any]]) -> list[str]:
    """Per model, one bullet per export with its files and notes; auto's candidates as a table."""
    lines: list[str] = []
    for name, manifest in exports.items():
        lines += [f"### {name}", ""]
        tables: list[str] = []
        for label, entry in manifest.get("exports", {}).items():
            auto = (entry.get("details") or {}).get("auto")
            lines.append(f"- **{label}**: " + ", ".join(f"`{f['path']}` ({f['bytes'] / 1e6:.2f} MB)"
                                                        for f in entry.get("files", [])))
            for note in entry.get("notes") or []:
                if auto and _in_auto_table(note, auto):
                    continue  # the console's text table and its verdict: the table below has them
                lines.append(f"  - {' '.join(note.split())}")
            if auto:
                tables += auto_table(f"{name} {label}", auto)
        for label, reason in manifest.get("failed", {}).items():
            lines.append(f"- **{label}**: FAILED — {reason}")
        lines += ["", *tables]
    return lines


def _in_auto_table(note: str, auto: dict[str, Any]) -> bool:
    """Is this note a line of auto's text table (its header, a candidate's row) or its verdict?"""
    words = note.lstrip("* ").split()
    names = {row.get("name") for row in auto.get("candidates", [])} | {"candidate"}
    return bool(words) and words[0] in names or note.strip() == (auto.get("why") or "").strip()


def auto_table(title: str, auto: dict[str, Any]) -> list[str]:
    """`--precision auto`'s candidates as a markdown table: what was measured, and which one shipped."""
    batches = sorted({int(b) for row in auto.get("candidates", []) for b in (row.get("latency") or {})})
    header = (["candidate", "precision", *[f"p50 ms @{b}" for b in batches], "MB", "ΔSRCC", "mean \\|Δscore\\|",
               "max \\|Δscore\\|", "within bound", "status"])
    rows = []
    for row in auto.get("candidates", []):
        latency, drift = row.get("latency") or {}, row.get("drift") or {}
        name = f"**{row['name']}** (shipped)" if row["name"] == auto.get("pick") else row["name"]
        rows.append([name, row.get("precision", ""),
                     *[_cell((latency.get(str(b)) or {}).get("p50_ms"), ".3f") for b in batches],
                     _cell(row["bytes"] / 1e6 if row.get("bytes") else None, ".2f"),
                     "ref" if row.get("reference") else _cell(drift.get("delta_srcc"), "+.4f"),
                     _cell(drift.get("mean_abs_diff_vs_fp32"), ".4f"), _cell(drift.get("max_abs_diff_vs_fp32"), ".4f"),
                     "yes" if row.get("within_bound") else "no",
                     row.get("status", "") + (f": {row['reason']}" if row.get("reason") else "")])
    cpu = auto.get("cpu") or {}
    where = ", ".join(str(x) for x in (cpu.get("model"), " ".join(cpu.get("isa") or []) or None,
                                        f"{auto.get('threads')} threads" if auto.get("threads") else None) if x)
    lines = [f"#### {title}: the candidates" + (f" ({where})" if where else ""), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return lines + ["", f"Why: {auto['why']}" if auto.get("why") else "", ""]


def time_section(timings: Timings) -> list[str]:
    """The stages in the order they ran and their total; each export's own time in a second table (the
    export stages above include them)."""
    stages = {k: v for k, v in timings.stages.items() if k != "total"}
    per_export = {k: v for k, v in stages.items() if k.startswith("export ") and len(k.split()) == 3}
    top = {k: v for k, v in stages.items() if k not in per_export}
    earlier = [k for k, v in top.items() if v.get("earlier")]
    lines = ["Load average (1 min) when each stage ended: other jobs on the machine slow every stage."
             + (" A stage marked *earlier* was done by an earlier run of the demo into this folder; its figures "
                "are that run's, and the total is this run's." if earlier else ""), "",
             "| stage | seconds | CPU seconds | load |", "|---|---|---|---|"]
    lines += [f"| {k}{' (*earlier*)' if v.get('earlier') else ''} | {v['seconds']:.1f} | {v['cpu_seconds']:.1f} | "
              f"{_num(v.get('load_1min'))} |" for k, v in top.items()]
    total = timings.stages.get("total")
    if total:
        lines.append(f"| **total{' (this run)' if earlier else ''}** | **{total['seconds']:.1f}** | "
                     f"**{total['cpu_seconds']:.1f}** | {_num(total.get('load_1min'))} |")
    if per_export:
        lines += ["", "Each export (part of its model's export stage above):", "",
                  "| model | export | seconds | CPU seconds |", "|---|---|---|---|"]
        lines += [f"| {k.split()[1]} | {k.split()[2]} | {v['seconds']:.1f} | {v['cpu_seconds']:.1f} |"
                  for k, v in per_export.items()]
    return lines


def _cell(value: float | None, fmt: str) -> str:
    return "—" if value is None else f"{value:{fmt}}"
