"""`kdiqa-edge score MODEL IMAGE|DIR...`: one line per image, torch-free."""

from __future__ import annotations

import csv
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
                                    "best available), cpu/cuda for a checkpoint, cpu/gpu/ane for CoreML."),
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


def score(
    model: Annotated[Path, typer.Argument(help=".onnx, .engine/.plan, .mlpackage, .pte, checkpoint dir or run dir.")],
    images: Annotated[list[Path], typer.Argument(help="Image files and/or directories (searched recursively).")],
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per inference call.")] = 16,
    as_csv: Annotated[bool, typer.Option("--csv", help="CSV output: image,score,error.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines: {image, score, error}.")] = False,
    provider: Provider = None,
    threads: Threads = None,
) -> None:
    """Score images with a quality model (1 = bad ... 5 = perfect). Unreadable images are reported, not fatal.

    Folders are searched recursively; every file that cannot be scored (unreadable, not an image, a dangling
    symlink, a folder that cannot be listed) gets a row with its error, and the summary counts it.

    Examples:

      kdiqa-edge score student.onnx photo.jpg

      kdiqa-edge score student.onnx photos/ --csv > scores.csv
    """
    from kdiqa_edge.errors import ConfigError
    from kdiqa_edge.runtime import QualityModel
    from kdiqa_edge.runtime.files import ImageFiles

    if as_csv and as_json:
        raise ConfigError("--csv and --json are exclusive: pick one output format")
    quality_model = QualityModel.load(model, provider=provider, threads=threads)
    for note in quality_model.notes:
        typer.secho(note, err=True, fg="yellow")
    writer = csv.writer(sys.stdout, lineterminator="\n") if as_csv else None
    if writer:
        writer.writerow(["image", "score", "error"])
    scored = failed = 0
    found = ImageFiles(images)
    for result in score_all(quality_model, iter(found), batch_size):
        scored += result.error is None
        failed += result.error is not None
        value = None if result.score is None else round(result.score, 6)
        if writer:
            writer.writerow([result.path, "" if value is None else f"{value:.6f}", result.error or ""])
        elif as_json:
            sys.stdout.write(json.dumps({"image": result.path, "score": value, "error": result.error}) + "\n")
        else:
            sys.stdout.write(f"{result.path}\t{value:.4f}\n" if result.error is None
                             else f"{result.path}\terror: {result.error}\n")
        sys.stdout.flush()
    ignored = f", {found.ignored} other files ignored (no image suffix)" if found.ignored else ""
    typer.secho(f"{scored} scored, {failed} unreadable{ignored}", err=True,
                fg="yellow" if failed or not scored else None)


def register(app: typer.Typer) -> None:
    app.command("score", no_args_is_help=True)(score)
