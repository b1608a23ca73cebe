"""`kdiqa-edge bench MODEL...`: latency, size, params, accuracy and drift per format, torch-free."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from kdiqa_edge.cli.options import (
    GATE_PANEL,
    FailUnder,
    MaxLatencyMs,
    MaxSizeMb,
    OldSeed,
    SplitSeed,
    dataset_options,
)
from kdiqa_edge.cli.score import Provider, Threads
from kdiqa_edge.runtime.base import ARTIFACT_SUFFIXES

TEACHER_PANEL = "Teacher"


MAX_BATCH = 1024  # a batch at 224 px is 0.6 GB of float pixels: beyond, a typo is a kill for memory
MAX_THREADS = 256  # as export's: far beyond the cores, ONNX Runtime takes minutes to open a session


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    from kdiqa_edge.errors import ConfigError

    try:
        sizes = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--batch-sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"--batch-sizes needs positive integers, got {text!r}")
    if max(sizes) > MAX_BATCH:
        raise ConfigError(f"--batch-sizes: at most {MAX_BATCH} images a batch, got {max(sizes)}")
    return tuple(dict.fromkeys(sizes))  # 1,1,8: batch 1 is timed once, not two rows of it


def check_output(option: str, path: Path | None, example: str) -> None:
    """A report path is checked before any work: an existing folder ('.' included) is refused (a file written
    there would take the folder's place), and so is a path under a file. A missing parent folder is made when
    the report is written."""
    from kdiqa_edge.errors import ConfigError

    if path is None:
        return
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a folder: name a file, e.g. {path / example}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{option} {path}: {parent} is a file, not a folder")
    try:  # the report is written after the whole bench: a folder it cannot be written in is said now
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise ConfigError(f"{option} {path}: cannot write in {parent} ({exc.strerror or exc})") from None


# what an artifact, an IR's weights or a checkpoint's files end in: a report never takes the place of one
MODEL_SUFFIXES = (*ARTIFACT_SUFFIXES, ".bin", ".safetensors", ".pt", ".pth", ".ckpt")


PLOT_SUFFIXES = (".png", ".svg", ".pdf")  # what write_plot writes, each in its own format


def check_outputs(outputs: list[tuple[str, Path | None, str]], inputs: list[Path]) -> None:
    """Every report path (option, path, example) as `check_output` checks it; and none may be a model bench
    reads (`inputs`: models, --reference, --teacher), a file that exists inside one (a run dir's, an
    .mlpackage's; a new file there is fine), an existing model file (`--json-out exports/*/*.onnx` names the
    first artifact as the report), or another report's path: the report would overwrite it."""
    from kdiqa_edge.errors import ConfigError

    for option, path, example in outputs:
        check_output(option, path, example)
    taken: dict[str, str] = {}
    for option, path, example in outputs:
        if path is None:
            continue
        where = os.path.abspath(path)
        if where in taken:
            raise ConfigError(f"{option} {path}: {taken[where]} names the same file")
        taken[where] = option
        for model in inputs:
            model_at = os.path.abspath(model)
            inside = where.startswith(model_at.rstrip(os.sep) + os.sep) and Path(path).exists()  # a run's file
            if where == model_at or inside or (model_at.endswith(".xml") and where == model_at[:-4] + ".bin"):
                raise ConfigError(f"{option} {path} is (part of) the model {model}: the report would overwrite "
                                  f"it; name a report file, e.g. {example}")
        if option == "--plot" and Path(path).suffix.lower() not in PLOT_SUFFIXES:
            raise ConfigError(f"--plot {path}: the plot is written as {', '.join(PLOT_SUFFIXES)} (by the name's "
                              f"suffix), e.g. {Path(path).with_suffix('.png')}")
        if Path(path).suffix.lower() in MODEL_SUFFIXES and Path(path).exists():
            raise ConfigError(f"{option} {path} is a model file: the report would overwrite it; name a report "
                              "file (did a shell glob fill it in?)")


@dataset_options
def bench(
    models: Annotated[list[Path], typer.Argument(help="Artifacts to compare (.onnx, .engine, .mlpackage, .pte, "
                                                      "checkpoint or run dir).")],
    data,
    reference: Annotated[Path | None, typer.Option(
        "--reference", help="The FP32 model the drift is measured against (a run dir, checkpoint or artifact). "
                            "A run's dataset and split are the eval data, unless dataset options are given.")] = None,
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Latency batch sizes, e.g. 1,8,32.")] = "1,8,32",
    threads: Threads = None,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed runs per batch size.")] = 10,
    runs: Annotated[int, typer.Option("--runs", min=1, help="Timed runs per batch size.")] = 50,
    rounds: Annotated[int, typer.Option("--rounds", min=1, help=(
        "Spread the runs over this many rounds, every model timed in each, the order rotated: models compared "
        "side by side see the same machine load."))] = 5,
    provider: Provider = None,
    split_seed: SplitSeed = None,
    old_seed: OldSeed = None,
    max_images: Annotated[int | None, typer.Option("--max-images", min=3,
                                                      help="Score at most this many eval images.")] = None,
    accuracy: Annotated[bool, typer.Option("--accuracy/--no-accuracy",
                                           help="Score the eval split (off: latency and facts only).")] = True,
    json_path: Annotated[Path | None, typer.Option("--json-out", help="Write the full results as JSON.")] = None,
    old_json_path: Annotated[Path | None, typer.Option("--json", hidden=True, help="Deprecated: --json-out.")] = None,
    markdown_path: Annotated[Path | None, typer.Option("--markdown", help="Write a markdown report.")] = None,
    plot_path: Annotated[Path | None, typer.Option(
        "--plot", help="Write a latency-vs-SRCC plot (.png, .svg or .pdf).")] = None,
    teacher: Annotated[list[Path] | None, typer.Option(
        "--teacher", help="The teacher (run dir or checkpoint; or its artifacts, repeated): benched in every runtime "
                          "installed here (PyTorch eager, ONNX Runtime, OpenVINO f32 and bf16, ExecuTorch; exported "
                          "once into the cache), the fastest the one speed-ups are against.",
        rich_help_panel=TEACHER_PANEL)] = None,
    teacher_runtimes: Annotated[str | None, typer.Option(
        "--teacher-runtimes", help="Only these of torch, onnx, openvino, executorch for --teacher's checkpoint.",
        show_default="every one installed", rich_help_panel=TEACHER_PANEL)] = None,
    fail_under: FailUnder = None,
    max_drift: Annotated[float | None, typer.Option(
        "--max-drift", min=0.0, help="Gate: the largest |ΔSRCC| vs --reference.", rich_help_panel=GATE_PANEL)] = None,
    max_latency_ms: MaxLatencyMs = None,
    max_size_mb: MaxSizeMb = None,
) -> None:
    """Benchmark artifacts of one model: latency per batch size, size, params, MACs, accuracy, drift.

    A format that fails to load or run gets a row with the reason; the others still run, and bench exits 1.
    Rows are named by their export folder (onnx-auto, onnx-int8).

    A release gate for CI: with --fail-under, --max-drift, --max-latency-ms or --max-size-mb, every model (not
    the reference, not the teacher) is held to those bounds; bench exits 1 with one line per bound a model
    broke (a model that failed to run breaks the gate), and the JSON's `gate` lists the bounds and the rows
    that broke them.

    Accuracy is measured on the test part of the reference run's own split (its config.yaml and split.json;
    with a reference not in a run, the first model that is a run dir), as export does; a model distilled
    elsewhere, which may have trained on those images, is refused. Dataset options given here win over the
    run's (a note says so), and --split-seed makes a fresh split. With neither a run nor dataset options, it
    is the built-in synthetic set, and the first line of the output says so.

    Examples:

      kdiqa-edge bench out/student.onnx out/student.int8.onnx --reference runs/distill-resnet18

      kdiqa-edge bench model.engine --dataset koniq --root ~/data/koniq --batch-sizes 1,16 --json-out bench.json

      kdiqa-edge bench exports/android/*/model.*.pte --reference runs/distill --threads 2 --batch-sizes 1

      kdiqa-edge bench exports/cpu-auto/model.xml --reference runs/distill --fail-under srcc=0.85 --max-drift 0.01 --max-latency-ms 5 --max-size-mb 10

      kdiqa-edge bench exports/distill/*/model.*.onnx --reference runs/distill --teacher runs/teacher
    """
    from kdiqa_edge.bench import BenchConfig, run_bench
    from kdiqa_edge.bench.gate import Gate
    from kdiqa_edge.bench.report import print_table, write_markdown, write_plot, write_report_json
    from kdiqa_edge.bench.teacher import parse_runtimes
    from kdiqa_edge.cli.options import renamed

    split_seed = renamed("--seed", "--split-seed", old_seed, split_seed)
    json_path = renamed("--json PATH", "--json-out PATH", old_json_path, json_path,
                        "--json is an on/off switch in the other commands")
    check_outputs([("--json-out", json_path, "bench.json"), ("--markdown", markdown_path, "bench.md"),
                   ("--plot", plot_path, "bench.png")],
                  [*models, *([reference] if reference else []), *(teacher or ())])
    if threads is not None and threads > MAX_THREADS:
        from kdiqa_edge.errors import ConfigError

        raise ConfigError(f"--threads is at most {MAX_THREADS}, got {threads}")
    cfg = BenchConfig(batch_sizes=parse_batch_sizes(batch_sizes), threads=threads, warmup=warmup, runs=runs,
                      rounds=rounds, provider=provider, split_seed=split_seed, max_images=max_images,
                      accuracy=accuracy, gate=Gate.parse(fail_under, max_drift, max_latency_ms, max_size_mb))
    report = run_bench(models, reference=reference, data=data, cfg=cfg,
                       log=lambda line: typer.secho(f"note: {line}", err=True, fg="yellow"),
                       teacher=teacher or (), teacher_runtimes=parse_runtimes(teacher_runtimes))
    print_table(report)
    unwritten = write_reports(report, ((json_path, write_report_json), (markdown_path, write_markdown),
                                       (plot_path, write_plot)))
    if report.gate is not None:
        report_gate(report.gate)  # its lines already name a gated row that failed
    failed = [r for r in report.results if r.status != "ok"]
    if failed:  # CI must not read a broken format as a pass
        typer.secho(f"bench: {len(failed)} of {len(report.results)} model(s) failed: "
                    + "; ".join(f"{r.name} at {r.stage}" for r in failed), err=True, fg="red")
        raise typer.Exit(1)
    if unwritten:
        raise typer.Exit(2)


def write_reports(report, writers) -> int:
    """Write each report asked for; one that cannot be written (a full disk, a folder that went read-only) is an
    error line, and the others are still written. How many failed."""
    from kdiqa_edge.io import sweep_temporaries

    unwritten = 0
    for path, writer in writers:
        if path is None:
            continue
        try:
            sweep_temporaries(Path(path).parent, Path(path).name)  # a killed run's half-written report
            writer(report, path)
        except OSError as exc:
            typer.secho(f"error: cannot write {path}: {exc.strerror or exc}", err=True, fg="red")
            unwritten += 1
            continue
        typer.echo(f"wrote {path}")
    return unwritten


def report_gate(gate) -> None:
    """The gate's verdict: a line per broken bound on stderr and exit 1, or the passed line."""
    if gate.passed:
        typer.secho(gate.summary(), fg="green")
        return
    typer.secho(gate.summary(), fg="red")
    for violation in gate.violations:  # stderr: exactly one line per broken bound
        typer.secho(violation.line(), err=True, fg="red")
    raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("bench", no_args_is_help=True)(bench)
