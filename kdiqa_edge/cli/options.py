"""Shared CLI option aliases. Every command that takes a dataset takes the same dataset options."""

from __future__ import annotations

import functools
import inspect
import typing
from pathlib import Path
from typing import Annotated

import typer

DATASET_PANEL = "Dataset"

Dataset = Annotated[
    str | None,
    typer.Option(
        "--dataset",
        help="Dataset reader: koniq, spaq, live, csiq, kadid, clive, tid2013, csv, synthetic (default).",
        rich_help_panel=DATASET_PANEL,
    ),
]
Root = Annotated[
    Path | None,
    typer.Option("--root", help="The dataset's root folder, exactly as distributed.", rich_help_panel=DATASET_PANEL),
]
CsvFile = Annotated[
    Path | None,
    typer.Option("--csv", help="csv reader: the score file (default <root>/scores.csv).", rich_help_panel=DATASET_PANEL),
]
ImageDir = Annotated[
    Path | None,
    typer.Option("--image-dir", help="csv reader: images are relative to this folder (default the root).",
                 rich_help_panel=DATASET_PANEL),
]
ImageCol = Annotated[
    str | None, typer.Option("--image-col", help="csv reader: image column (default image).",
                                rich_help_panel=DATASET_PANEL)
]
MosCol = Annotated[
    str | None, typer.Option("--mos-col", help="csv reader: score column (default mos).",
                                rich_help_panel=DATASET_PANEL)
]
MosRange = Annotated[
    str | None,
    typer.Option("--mos-range", help="csv reader: nominal score range LO,HI (default 1,5).",
                 rich_help_panel=DATASET_PANEL),
]
LowerBetter = Annotated[
    bool, typer.Option("--lower-better", help="csv reader: lower scores are better (DMOS).",
                       rich_help_panel=DATASET_PANEL)
]
RefCol = Annotated[
    str | None, typer.Option("--ref-col", help="csv reader: reference (content) id column.",
                                rich_help_panel=DATASET_PANEL)
]
Strict = Annotated[
    bool, typer.Option("--strict", help="Turn any skipped file into an error.", rich_help_panel=DATASET_PANEL)
]

_DATASET_PARAMS = {
    "dataset": (Dataset, None),
    "root": (Root, None),
    "csv": (CsvFile, None),
    "image_dir": (ImageDir, None),
    "image_col": (ImageCol, None),
    "mos_col": (MosCol, None),
    "mos_range": (MosRange, None),
    "lower_better": (LowerBetter, False),
    "ref_col": (RefCol, None),
    "strict": (Strict, False),
}


def dataset_options(fn):
    """Add the shared dataset options to a command; it receives them as one `data: DatasetSpec` argument.

    typer reads `__signature__`, so the options are declared once here for every command.
    """
    signature = inspect.signature(fn)
    hints = typing.get_type_hints(fn, include_extras=True)  # resolve string annotations in fn's module
    params = [p.replace(annotation=hints.get(name, p.annotation))
              for name, p in signature.parameters.items() if name != "data"]
    extra = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)
        for name, (annotation, default) in _DATASET_PARAMS.items()
    ]
    # keyword-only parameters must follow the positional ones
    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.kind == p.POSITIONAL_OR_KEYWORD else p
              for p in params]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from kdiqa_edge.data.spec import DatasetSpec

        values = {name: kwargs.pop(name) for name in _DATASET_PARAMS}
        return fn(*args, data=DatasetSpec.from_cli(**values), **kwargs)

    wrapper.__signature__ = signature.replace(parameters=params + extra)
    wrapper.__annotations__ = {
        **{k: v for k, v in hints.items() if k != "data"},
        **{name: annotation for name, (annotation, _) in _DATASET_PARAMS.items()},
    }
    return wrapper


# One name, one meaning, in every command. `--split-seed` is the seed of the train/test split everywhere
# (`--seed` is a generator's seed: the student's init in distill, the crops in data synth).
SplitSeed = Annotated[int, typer.Option("--split-seed", help="Train/test split seed.")]
OldSeed = Annotated[int | None, typer.Option("--seed", hidden=True, help="Deprecated: --split-seed.")]


def renamed(old_flag: str, new_flag: str, old_value, new_value, why: str = ""):
    """The value of an option that was renamed: the new spelling's, unless the old (hidden) one was given,
    which still works with one deprecation line on stderr."""
    if old_value is None or old_value is False:
        return new_value
    reason = f" ({why})" if why else ""
    typer.secho(f"warning: {old_flag} is deprecated here, use {new_flag}{reason}", err=True, fg="yellow")
    return old_value


# Training trackers (kdiqa_edge/train/trackers/): the same two options on every command that trains.
TRACK_PANEL = "Tracking"
Logger = Annotated[list[str] | None, typer.Option(
    "--logger", help="Also log the run, as it goes, to tensorboard (RUN/tb/), mlflow (--mlflow-uri or "
    "MLFLOW_TRACKING_URI) or wandb (WANDB_PROJECT; WANDB_MODE=offline needs no network); repeat for several. "
    "--resume continues the same tracker runs. Needs the [track] extra.", rich_help_panel=TRACK_PANEL)]
MlflowUri = Annotated[str | None, typer.Option(
    "--mlflow-uri", help="--logger mlflow: a tracking server (http://host:5000) or a database "
    "(sqlite:///mlflow.db); a folder only with MLFLOW_ALLOW_FILE_STORE=true (MLflow 3 deprecates its file "
    "store). Checked before any work. Default MLFLOW_TRACKING_URI, else MLflow's own default (mlflow.db in "
    "the current folder). Given on --resume, the run goes on as a new MLflow run in that store.",
    rich_help_panel=TRACK_PANEL)]


# The release gate (bench/gate.py): the same bounds on bench's rows and on export --precision auto's pick.
GATE_PANEL = "Release gate"
FailUnder = Annotated[str | None, typer.Option(
    "--fail-under", help="Gate: SRCC/PLCC floors on the test split, e.g. srcc=0.85,plcc=0.85 (exit 1 below).",
    rich_help_panel=GATE_PANEL)]
MaxLatencyMs = Annotated[float | None, typer.Option(
    "--max-latency-ms", min=0.0, help="Gate: the largest p50 latency at batch 1 here, ms.", rich_help_panel=GATE_PANEL)]
MaxSizeMb = Annotated[float | None, typer.Option(
    "--max-size-mb", min=0.0, help="Gate: the largest artifact size (an IR with its .bin), MB (1e6 bytes).",
    rich_help_panel=GATE_PANEL)]
