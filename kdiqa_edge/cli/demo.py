"""`kdiqa-edge demo`: what `make demo` runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("demo", epilog="Example: kdiqa-edge demo --out runs/demo")(demo_command)


def demo_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the runs, exports and report.md go.")]
    = Path("runs/demo"),
    students: Annotated[Optional[str], typer.Option(
        "--students", help="Comma-separated timm names (default resnet18,mobilevit_s).")] = None,
    teacher: Annotated[Optional[str], typer.Option(
        "--teacher", help="open_clip NAME:TAG or tiny (default: ViT-B-32:openai if on disk, else tiny).")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1, help="Student epochs (5).")] = None,
    teacher_epochs: Annotated[Optional[int], typer.Option("--teacher-epochs", min=1,
                                                          help="Teacher epochs (8).")] = None,
    refs: Annotated[Optional[int], typer.Option(
        "--refs", min=1, help="Size of the synthetic set in reference images (default: the built-in set).")] = None,
    no_pretrained: Annotated[bool, typer.Option(
        "--no-pretrained", help="Random-init students even where ImageNet weights are on disk.")] = False,
) -> None:
    """The whole path on the built-in synthetic set, offline: fine-tune the teacher, distil two students,
    export each to ONNX FP32 and INT8, CoreML and the TensorRT-ready ONNX, bench them against the teacher,
    and write DIR/report.md. Finished stages are skipped when it is run again."""
    from kdiqa_edge.config import override
    from kdiqa_edge.demo import DemoConfig, run_demo

    cfg = override(DemoConfig(), students=tuple(s.strip() for s in students.split(",")) if students else None,
                   teacher=teacher, epochs=epochs, teacher_epochs=teacher_epochs, refs=refs,
                   pretrained=False if no_pretrained else None)
    report = run_demo(cfg, out, log=typer.echo)
    typer.echo(report.read_text())
