"""`kdiqa-edge score MODEL IMAGE|DIR...`: one line per image, torch-free."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}

Provider = Annotated[
    Optional[str],
    typer.Option("--provider", help="onnxruntime execution provider (cpu, cuda, tensorrt, coreml; default the "
                                    "best available), cpu/cuda for a checkpoint, cpu/gpu/ane for CoreML."),
]
Threads = Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads for inference (ONNX Runtime, "
                                                                         "ExecuTorch's pool, torch).")]


def expand_images(inputs: list[Path]) -> Iterator[Path]:
    """Files as given (even with odd suffixes: they get reported if unreadable); directories recursively."""
    for item in inputs:
        if item.is_dir():
            yield from sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            yield item


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

    Examples:

      kdiqa-edge score student.onnx photo.jpg

      kdiqa-edge score student.onnx photos/ --csv > scores.csv
    """
    from kdiqa_edge.errors import ConfigError
    from kdiqa_edge.runtime import QualityModel

    if as_csv and as_json:
        raise ConfigError("--csv and --json are exclusive: pick one output format")
    quality_model = QualityModel.load(model, provider=provider, threads=threads)
    writer = csv.writer(sys.stdout, lineterminator="\n") if as_csv else None
    if writer:
        writer.writerow(["image", "score", "error"])
    scored = failed = 0
    for result in quality_model.score_files(expand_images(images), batch_size=batch_size):
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
    if failed or not scored:
        typer.secho(f"{scored} scored, {failed} unreadable", err=True, fg="yellow")


def register(app: typer.Typer) -> None:
    app.command("score", no_args_is_help=True)(score)
