"""`kdiqa-edge demo`: what `make demo` runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    app.command("demo", epilog="Examples: kdiqa-edge demo --out runs/demo; kdiqa-edge demo --quick --out runs/quick"
                )(demo_command)


def demo_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the runs, exports and report.md go.")]
    = Path("runs/demo"),
    quick: Annotated[bool, typer.Option(
        "--quick", help="The tiny path: a 64 px random-init CLIP (0.15M parameters) instead of ViT-B/32, 8 + 5 "
                        "epochs; minutes fewer, but the students are then slower than the teacher.")] = False,
    students: Annotated[str | None, typer.Option(
        "--students", help="Comma-separated timm names (default resnet18,mobilevit_s).")] = None,
    teacher: Annotated[str | None, typer.Option(
        "--teacher", help="open_clip NAME:TAG, NAME:random or tiny (default: ViT-B-32:openai if on disk, "
                          "else ViT-B-32:random; --quick: tiny).")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", min=1, help="Student epochs (1; --quick 5).")] = None,
    teacher_epochs: Annotated[int | None, typer.Option("--teacher-epochs", min=1,
                                                          help="Teacher epochs (1; --quick 8).")] = None,
    refs: Annotated[int | None, typer.Option(
        "--refs", min=1, help="Size of the synthetic set in reference images, 30 images each (6, within the "
                              "demo's 12 minutes; --quick: the built-in 12).")] = None,
    no_pretrained: Annotated[bool, typer.Option(
        "--no-pretrained", help="Random-init students even where ImageNet weights are on disk.")] = False,
    verbose: Annotated[bool, typer.Option(
        "--verbose", help="Stream the converters' own output (always kept in each export's export.log).")] = False,
) -> None:
    """The whole path on the built-in synthetic set, offline: fine-tune the CLIP ViT-B/32 teacher, distil
    resnet18 and mobilevit_s at 224 px, export each to ONNX FP32 and INT8, CoreML and the TensorRT-ready ONNX,
    bench them against the teacher, and write DIR/report.md. Finished stages are skipped when it is run again
    with the same options (a DIR trained with others is refused)."""
    from kdiqa_edge.config import override
    from kdiqa_edge.demo import DemoConfig, run_demo

    base = DemoConfig.quick() if quick else DemoConfig()
    cfg = override(base, students=tuple(s.strip() for s in students.split(",")) if students else None,
                   teacher=teacher, epochs=epochs, teacher_epochs=teacher_epochs, refs=refs,
                   pretrained=False if no_pretrained else None, verbose=verbose or None)
    report = run_demo(cfg, out, log=typer.echo)
    typer.echo(report.read_text())
