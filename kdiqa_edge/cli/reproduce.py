"""`kdiqa-edge reproduce`: the paper's protocol, Tables I and II beside the published figures."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from kdiqa_edge.cli.options import dataset_options
from kdiqa_edge.data.spec import DatasetSpec


def register(app: typer.Typer) -> None:
    app.command(
        "reproduce",
        epilog="Example: kdiqa-edge reproduce --dataset koniq --root /data/koniq10k --seeds 5 --out runs/koniq\n\n"
        "Smoke test: kdiqa-edge reproduce --students test_efficientnet --seeds 2 --epochs 1 --teacher tiny "
        "--no-pretrained --out runs/repro",
    )(reproduce_command)


def _csv_list(text: Optional[str]) -> Optional[list[str]]:
    return [item.strip() for item in text.split(",") if item.strip()] if text else None


@dataset_options
def reproduce_command(
    data: DatasetSpec,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the runs and the tables go.")],
    students: Annotated[Optional[str], typer.Option(
        "--students", help="Comma-separated timm names (default the paper's four).")] = None,
    variants: Annotated[Optional[str], typer.Option(
        "--variants", help="Comma-separated: full, soft, hard, fixed:X, regression (default full).")] = None,
    seeds: Annotated[Optional[int], typer.Option("--seeds", min=1, help="Number of random splits (5).")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1, help="Student epochs (100).")] = None,
    teacher_epochs: Annotated[Optional[int], typer.Option(
        "--teacher-epochs", min=1, help="Teacher epochs (default --epochs).")] = None,
    teacher: Annotated[Optional[str], typer.Option(
        "--teacher", help="open_clip NAME:TAG (default ViT-B-32:openai) or tiny.")] = None,
    teacher_weights: Annotated[Optional[Path], typer.Option(
        "--teacher-weights", help="Local open_clip weights file (offline machines).")] = None,
    no_pretrained: Annotated[bool, typer.Option(
        "--no-pretrained", help="Random-init students (labelled 'not pretrained').")] = False,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", min=1, help="Batch size (64).")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda, cuda:1 ...")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and its cost estimate; run nothing.")]
    = False,
) -> None:
    """Run the paper's protocol: N seeded 80/20 splits (by reference for synthetic-distortion sets), a
    teacher fine-tune and the distillations per split, median PLCC/SRCC per student and variant. Re-running
    skips finished runs and resumes interrupted ones."""
    from rich.console import Console
    from rich.table import Table

    from kdiqa_edge.config import override
    from kdiqa_edge.train.reproduce import ReproduceConfig, run_reproduce

    cfg = override(ReproduceConfig(), students=_csv_list(students), variants=_csv_list(variants), seeds=seeds,
                   epochs=epochs, teacher_epochs=teacher_epochs, teacher=teacher,
                   teacher_weights=str(teacher_weights) if teacher_weights else None,
                   pretrained=False if no_pretrained else None, batch_size=batch_size, device=device)
    console = Console(stderr=True)
    result = run_reproduce(cfg, data, out, dry_run=dry_run, log=console.print)
    if dry_run:
        table = Table(title=f"reproduce plan: {data.name}, {cfg.seeds} seeds")
        for column in ("seed", "run", "status", "dir"):
            table.add_column(column)
        for row in result["plan"]:
            table.add_row(str(row["seed"]), row["run"], row["status"], row["dir"])
        Console().print(table)
        est = result["estimate"]
        rates = ", ".join(f"{k} {v:.0f}/s" if v else f"{k} ?" for k, v in est["images_per_s"].items())
        typer.echo(f"{est['runs_todo']} of {est['runs_total']} runs to do on {est['device']}, "
                   f"{est['train_images']} training images each; train-step throughput: {rates or '-'}")
        hours = est["estimated_seconds"] / 3600
        typer.echo(f"estimated training time: {hours:.2f} h (excluding evaluation and data caching)"
                   + (f"; not estimated: {', '.join(est['unestimated'])}" if est["unestimated"] else ""))
        return
    typer.echo((Path(out) / "table1.md").read_text())
    typer.echo((Path(out) / "table2.md").read_text())
    typer.echo(f"results: {Path(out) / 'results.json'}")
