"""`kdiqa-edge score MODEL IMAGE|DIR...`: one line per image, torch-free."""

from __future__ import annotations

import csv
import enum
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from kdiqa_edge.runtime.files import IMAGE_SUFFIXES  # noqa: F401 - where this module had it

if TYPE_CHECKING:
    from kdiqa_edge.runtime import ScoreResult

Provider = Annotated[
    str | None,
    typer.Option("--provider", help="onnxruntime execution provider (cpu, cuda, tensorrt, coreml; default the "
                                    "best available), cpu/cuda for a checkpoint, cpu/gpu/ane for CoreML, OpenVINO's "
                                    "device for an .xml (CPU, GPU, NPU, AUTO; default CPU)."),
]
Threads = Annotated[int | None, typer.Option("--threads", min=1, help="CPU threads for inference (ONNX Runtime, "
                                                                         "ExecuTorch's pool, torch).")]


def score_all(quality_model, found: Iterator[tuple[Path, str | None]], batch_size: int) -> Iterator[ScoreResult]:
    """Results in walk order: image files scored in batches, entries that cannot be read as rows with their
    reason (a dangling symlink, a folder that cannot be listed) between them."""
    from kdiqa_edge.runtime import ScoreResult

    pending: list[Path] = []
    for path, problem in found:
        if problem is None:
            pending.append(path)
            if len(pending) < batch_size:
                continue
        yield from quality_model.score_files(pending, batch_size=batch_size)
        pending = []
        if problem is not None:
            yield ScoreResult(str(path), None, problem)
    yield from quality_model.score_files(pending, batch_size=batch_size)


class OutputFormat(str, enum.Enum):
    text = "text"  # image<TAB>score, or image<TAB>error: reason
    csv = "csv"  # image,score,error with a header
    json = "json"  # one {"image", "score", "error"} object per line


NOTHING_SCORED = 1  # exit status when no image was scored or a named path does not exist


def score(
    model: Annotated[Path, typer.Argument(help=".onnx, .engine/.plan, .mlpackage, .pte, checkpoint dir or run dir.")],
    images: Annotated[list[Path], typer.Argument(help="Image files and/or directories (searched recursively).")],
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per inference call.")] = 16,
    output: Annotated[OutputFormat, typer.Option(
        "--format", help="text: image<TAB>score; csv: image,score,error; json: one object per line.")] = OutputFormat.text,
    as_json: Annotated[bool, typer.Option("--json", help="Shorthand for --format json.")] = False,
    old_csv: Annotated[bool, typer.Option("--csv", hidden=True, help="Deprecated: --format csv.")] = False,
    provider: Provider = None,
    threads: Threads = None,
) -> None:
    """Score images with a quality model (1 = bad ... 5 = perfect). Unreadable images are reported, not fatal.

    Folders are searched recursively; every file that cannot be scored (unreadable, not an image, a dangling
    symlink, a folder that cannot be listed) gets a row with its error, and the summary counts it.

    Exit status: 0 when at least one image was scored, even if others were unreadable; 1 when no image was
    scored, or when a path named here does not exist (the others are still scored first); 2 for a model or
    option that cannot be used.

    Examples:

      kdiqa-edge score student.onnx photo.jpg

      kdiqa-edge score student.onnx photos/ --format csv > scores.csv
    """
    import time

    from kdiqa_edge.cli.options import renamed
    from kdiqa_edge.errors import ConfigError
    from kdiqa_edge.runtime import QualityModel
    from kdiqa_edge.runtime.files import ImageFiles

    output = renamed("--csv", "--format csv", OutputFormat.csv if old_csv else None, output)
    if as_json and output not in (OutputFormat.text, OutputFormat.json):
        raise ConfigError(f"--json and --format {output.value} are exclusive: pick one output format")
    output = OutputFormat.json if as_json else output
    quality_model = QualityModel.load(model, provider=provider, threads=threads)
    for note in quality_model.notes:
        typer.secho(note, err=True, fg="yellow")
    if untrained := quality_model.info.not_pretrained_note(str(model)):
        typer.secho(f"note: {untrained}", err=True, fg="yellow")
    writer = csv.writer(sys.stdout, lineterminator="\n") if output is OutputFormat.csv else None
    if writer:
        writer.writerow(["image", "score", "error"])
    scored = failed = 0
    found = ImageFiles(images)
    start = time.perf_counter()
    for result in score_all(quality_model, iter(found), batch_size):
        scored += result.error is None
        failed += result.error is not None
        value = None if result.score is None else round(result.score, 6)
        if writer:
            writer.writerow([result.path, "" if value is None else f"{value:.6f}", result.error or ""])
        elif output is OutputFormat.json:
            sys.stdout.write(json.dumps({"image": result.path, "score": value, "error": result.error}) + "\n")
        else:
            sys.stdout.write(f"{result.path}\t{value:.4f}\n" if result.error is None
                             else f"{result.path}\terror: {result.error}\n")
        sys.stdout.flush()
    typer.secho(summary_line(scored, failed, found.ignored, time.perf_counter() - start), err=True,
                fg="yellow" if failed or not scored else None)
    if found.missing or not scored:
        missing = ", ".join(map(str, found.missing))
        why = f"no such file or directory: {missing}" if found.missing else "no image was scored"
        typer.secho(f"error: {why}", err=True, fg="red")
        raise typer.Exit(NOTHING_SCORED)


def summary_line(scored: int, failed: int, ignored: int, seconds: float) -> str:
    """'120 scored, 0 unreadable in 3.2 s, 37.5 images/s': what score did, on stderr after the rows."""
    rate = f", {scored / seconds:.1f} images/s" if scored and seconds > 0 else ""
    other = f"; {ignored} other files ignored (no image suffix)" if ignored else ""
    return f"{scored} scored, {failed} unreadable in {seconds:.1f} s{rate}{other}"


def register(app: typer.Typer) -> None:
    app.command("score", no_args_is_help=True)(score)
