"""Bench output: one table across formats (Ultralytics-style), JSON, markdown and a latency-vs-SRCC plot."""

from __future__ import annotations

from pathlib import Path

from kdiqa_edge.bench.accuracy import NOT_YOUR_DATA
from kdiqa_edge.bench.runner import BenchReport, BenchResult
from kdiqa_edge.io import atomic_path, write_json, write_text

COLUMNS = ("Model", "Format", "Precision", "Status", "Size (MB)", "Params", "SRCC", "ΔSRCC", "p50 ms @1",
           "images/s")


def _num(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def _count(value: int | None) -> str:
    if value is None:
        return "—"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return str(value)


def summary_row(result: BenchResult, with_reason: bool = True) -> list[str]:
    at1 = result.latency_at(1)
    best = result.best_throughput
    status = "ok" if result.status == "ok" else f"failed ({result.stage})"
    if with_reason and result.reason:
        status += f": {result.reason}"
    delta = "ref" if result.reference else (_num(result.drift.delta_srcc, "+.4f") if result.drift else "—")
    return [result.name, result.format, result.precision, status, _num(result.size_mb, ".2f"),
            _count(result.params), _num(result.metrics.srcc if result.metrics else None, ".4f"), delta,
            _num(at1.p50_ms if at1 else None, ".2f"),
            f"{best.images_per_s:.1f} @{best.batch_size}" if best else "—"]


def environment_lines(report: BenchReport) -> list[str]:
    env = report.environment
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
    load = env.get("load_average")
    isa = env.get("cpu_isa")
    lines = [f"CPU: {env.get('cpu')} ({env.get('cpu_count')} logical cores), {env.get('os')} {env.get('machine')}"
             + (f"; ISA {' '.join(isa) or 'unknown'}" if isa is not None else "")
             + (f"; load average {load[0]:.2f} (1 min) at the end of the run" if load else ""),
             f"Threads: {env.get('threads')}; onnxruntime providers: {', '.join(env.get('onnxruntime_providers', []))}",
             f"Python {env.get('python')}; {versions}"]
    if env.get("gpus"):
        lines.append(f"GPU: {'; '.join(env['gpus'])}")
    if env.get("board") or env.get("l4t"):
        lines.append(f"Board: {env.get('board', '?')}; {env.get('l4t', '')}".rstrip("; "))
    cfg = report.config
    lines.append(f"Latency: batch sizes {', '.join(map(str, cfg.batch_sizes))}; {cfg.warmup} warm-up + "
                 f"{cfg.runs} timed runs each, in {cfg.timing_rounds} round(s), the models side by side in "
                 "rotated order; ms per batch, inference only (preprocessing timed separately)")
    if report.dataset:
        d = report.dataset
        split = (f"{d['split']} split of {d['split_file']}" if d.get("split_file")
                 else f"{d['split']} split (seed {d.get('split_seed')})")
        lines.append(f"Accuracy: {d.get('source', d['name'])}, {split}, {d['n']} images")
    return lines


def table_title(report: BenchReport) -> str:
    """The table's first line says it where the accuracy is not on the user's data (the built-in synthetic
    set), so no reader of the table misses it."""
    return f"kdiqa-edge bench ({NOT_YOUR_DATA})" if report.headline else "kdiqa-edge bench"


def print_table(report: BenchReport, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # piped into a file or CI log: do not fold the table at 80 columns
            console = Console(width=200)
    table = Table(title=table_title(report), caption="\n".join(environment_lines(report)), caption_justify="left")
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in ("Model", "Format", "Status") else "right",
                         overflow="fold")
    for result in report.results:
        style = None if result.status == "ok" else "red"
        table.add_row(*summary_row(result, with_reason=False), style=style)
    console.print(table)
    for result in report.results:
        if result.status != "ok":
            console.print(f"{result.name}: failed at {result.stage}: {result.reason}", style="red", soft_wrap=True)
    for note in report.notes:
        console.print(f"note: {note}", style="yellow")
    if report.teacher:
        from kdiqa_edge.bench.teacher import teacher_lines

        for line in teacher_lines(report.teacher):
            console.print(line, soft_wrap=True)


def _pretrained(value: bool | None) -> str:
    return "—" if value is None else ("yes" if value else "NO (random init)")


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    escape = lambda cell: str(cell).replace("|", "\\|")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def memory_note(report: BenchReport) -> str:
    """What the memory figures are: per model, what loading it added; the peak is the whole process's, once."""
    peaks = [r.peak_rss_mb for r in report.results if r.peak_rss_mb is not None]
    peak = (f" The bench process peaked at {max(peaks):.0f} MB resident, with every model loaded at once (the "
            "whole process: the runtimes, the eval images and all the models; not one model's)." if peaks else "")
    return ("RSS added: the resident memory each model added to the process when it was loaded, warmed up and "
            "scored the eval split (models loaded later share the runtime's libraries already in memory, so "
            "the first model of a runtime pays for them)." + peak)


def markdown(report: BenchReport, title: str = "kdiqa-edge benchmark", environment: bool = True) -> str:
    """The full report; `environment=False` leaves the environment lines out (a suite prints them once)."""
    header = [*[f"- {line}" for line in environment_lines(report)], ""] if environment else []
    parts = [f"# {title}", "", *([f"**{report.headline[0].upper()}{report.headline[1:]}.**", ""]
                                 if report.headline else []), *header,
             _md_table(list(COLUMNS), [summary_row(r) for r in report.results]), ""]
    latency = [[r.name, r.format, r.precision, str(s.batch_size), f"{s.mean_ms:.3f}", f"{s.p50_ms:.3f}",
                f"{s.p90_ms:.3f}", f"{s.p99_ms:.3f}", f"{s.std_ms:.3f}", f"{s.images_per_s:.1f}"]
               for r in report.results for s in r.latency]
    if latency:
        parts += ["## Latency (ms per batch, inference only; images/s = batch / mean)", "",
                  _md_table(["Model", "Format", "Precision", "Batch", "mean", "p50", "p90", "p99", "std", "images/s"],
                            latency), ""]
    accuracy = [[r.name, r.precision, f"{r.metrics.plcc:.4f}", f"{r.metrics.plcc_fit:.4f}", f"{r.metrics.srcc:.4f}",
                 f"{r.metrics.krcc:.4f}", f"{r.metrics.rmse:.4f}",
                 *(["ref"] * 4 if r.reference else
                   [_num(r.drift.delta_plcc, "+.5f"), _num(r.drift.delta_srcc, "+.5f"),
                    _num(r.drift.mean_abs_diff, ".5f"), _num(r.drift.max_abs_diff, ".5f")] if r.drift else ["—"] * 4)]
                for r in report.results if r.metrics]
    if accuracy:
        parts += ["## Accuracy and drift vs the reference", "",
                  _md_table(["Model", "Precision", "PLCC", "PLCC (fitted)", "SRCC", "KRCC", "RMSE", "ΔPLCC", "ΔSRCC",
                             "mean \\|Δscore\\|", "max \\|Δscore\\|"], accuracy), ""]
    model_facts = [[r.name, r.backend or "—", r.device or "—", r.input or "—", _pretrained(r.pretrained),
                    _num(r.size_mb, ".2f"), _count(r.params), _count(r.macs), _num(r.load_s, ".2f"),
                    _num(r.rss_delta_mb, ".0f")] for r in report.results if r.status == "ok"]
    if model_facts:
        parts += ["## Model facts", "",
                  _md_table(["Model", "Backend", "Device", "Input", "Pretrained", "Size (MB)", "Params", "MACs",
                             "Load (s)", "RSS added (MB)"], model_facts), "", memory_note(report), ""]
    prep = [[r.name, "on" if r.preprocessing.draft else "off", str(r.preprocessing.images),
             f"{r.preprocessing.mean_ms:.2f}", f"{r.preprocessing.p50_ms:.2f}", f"{r.preprocessing.images_per_s:.1f}"]
            for r in report.results if r.preprocessing]
    if prep:
        parts += ["## Preprocessing (file -> model input, one thread)", "",
                  _md_table(["Model", "JPEG draft", "Images", "mean ms", "p50 ms", "images/s"], prep), ""]
    if report.teacher:
        parts += teacher_section(report.teacher)
    if report.gate is not None:
        parts += gate_section(report)
    failed = [[r.name, r.format, r.stage or "", r.reason or ""] for r in report.results if r.status != "ok"]
    if failed:
        parts += ["## Failures", "", _md_table(["Model", "Format", "Stage", "Reason"], failed), ""]
    if report.notes:
        parts += ["## Notes", "", *[f"- {n}" for n in report.notes], ""]
    return "\n".join(parts)


def teacher_section(teacher: dict) -> list[str]:
    """Every model's speed against the teacher in its fastest runtime here."""
    from kdiqa_edge.bench.teacher import teacher_lines

    batch = teacher["batch"]
    rows = [[v["row"], f"{v['p50_ms']:.2f}", f"{v['speedup']:.3g}x", _num(v["smaller"], ".1f") + "x"
             if v["smaller"] else "—"] for v in teacher["versus"]]
    forms = [[f["row"], f["format"], f["precision"], _num(f["p50_ms"], ".2f"),
              "**the teacher's fastest**" if f["row"] == teacher["row"] else (f["left_out"] or "")]
             for f in teacher["forms"]]
    return ["## Against the teacher in its fastest runtime here", "", *teacher_lines(teacher), "",
            _md_table(["Teacher form", "Format", "Precision", f"p50 ms @{batch}", ""], forms), "",
            *([_md_table(["Model", f"p50 ms @{batch}", "speed-up vs the teacher", "smaller"], rows), ""]
              if rows else [])]


def gate_section(report: BenchReport) -> list[str]:
    gate = report.gate
    return ["## Release gate", "", gate.summary(), "",
            *([f"- {v.line()}" for v in gate.violations] + [""] if gate.violations else [])]


def write_markdown(report: BenchReport, path: str | Path, title: str = "kdiqa-edge benchmark") -> Path:
    return write_text(path, markdown(report, title))


def write_report_json(report: BenchReport, path: str | Path) -> Path:
    return write_json(path, report.to_dict())


def write_plot(report: BenchReport, path: str | Path) -> Path:
    """Latency (p50 at batch 1, log axis) against SRCC, one labelled point per working format; PNG, or SVG or
    PDF where the name ends so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(r, r.latency_at(1) or (r.latency[0] if r.latency else None)) for r in report.results]
    points = [(r, s) for r, s in points if s is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    with_srcc = [(r, s) for r, s in points if r.metrics]
    if with_srcc:
        for r, s in with_srcc:  # a legend, not annotations: equal-accuracy formats sit on top of each other
            ax.scatter(s.p50_ms, r.metrics.srcc, s=90 if r.reference else 50, marker="*" if r.reference else "o",
                       label=f"{r.name} ({r.format} {r.precision}{', reference' if r.reference else ''})", alpha=0.8)
        ax.set_ylabel("SRCC (eval split)")
        ax.legend(fontsize=7, loc="best")
    else:  # accuracy off: latency per format
        ax.barh([f"{r.name} ({r.precision})" for r, _ in points], [s.p50_ms for _, s in points])
        ax.set_ylabel("model")
    batch = points[0][1].batch_size if points else 1
    ax.set_xlabel(f"p50 latency (ms) at batch {batch}")
    if with_srcc and len({round(s.p50_ms, 6) for _, s in with_srcc}) > 1:
        from matplotlib.ticker import FuncFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # 0.3, 2, 40, not 3x10^-1
        ax.xaxis.set_minor_formatter(FuncFormatter(  # 2 and 5 between the decades, or the labels collide
            lambda value, _: f"{value:g}" if f"{value:.0e}"[0] in "25" else ""))
    ax.grid(True, alpha=0.3)
    env = report.environment
    ax.set_title(f"kdiqa-edge bench: {env.get('cpu', '')[:60]}, threads {env.get('threads')}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    kind = path.suffix.lower().lstrip(".") if path.suffix.lower() in (".svg", ".pdf") else "png"
    with atomic_path(path, suffix=path.suffix or ".png") as tmp:
        fig.savefig(tmp, format=kind)  # the format the name says: a .svg holds SVG, not PNG bytes
    plt.close(fig)
    return path
