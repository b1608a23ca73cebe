"""The one small interface every training tracker follows, and the tracker registry.

A tracker mirrors, as the run goes, what the run dir records on its own: the config (as hyperparameters),
steps.csv's rows (per-step loss terms, lambda, learning rate), metrics.csv's rows (per-epoch eval metrics),
the plots and summary.json. One module per backend (`tensorboard.py`, `mlflow.py`, `wandb.py`) registers its
class here and imports its library only when a run starts; `run.TrackedRun` drives them all and keeps one
failing tracker from stopping the training. Torch-free.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

from kdiqa_edge.errors import MissingDependency
from kdiqa_edge.registry import Registry

EXTRA = "track"  # the pip extra that installs every tracker's library


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What every tracker is told about the run it opens."""

    run_dir: Path
    name: str  # the run's name in the tracker: `run_name(run_dir)`
    experiment: str  # the dataset and the model trained (`koniq-resnet18`): MLflow's experiment, W&B's group
    stage: str  # teacher-finetune | distill (W&B's job type)
    config: dict[str, Any]  # the run's config as run (config.yaml), nested
    eval_split: str  # test | val: where the per-epoch metrics (`test/srcc`) are measured
    tags: dict[str, str]  # split_seed, student, variant, teacher, dataset, stage: what a sweep compares
    mlflow_uri: str | None = None  # --mlflow-uri (else MLFLOW_TRACKING_URI, else MLflow's own default)

    @property
    def hparams(self) -> dict[str, Any]:
        """The config flattened to `a.b: value` with scalar values (lists as text): TensorBoard's and MLflow's
        hyperparameters."""
        return flatten(self.config)


class Tracker(Protocol):
    name: ClassVar[str]  # the --logger name
    package: ClassVar[str]  # the module it imports (installed by the [track] extra)

    def start(self, run: RunInfo, saved: Mapping[str, Any] | None, next_step: int) -> dict[str, Any]:
        """Open the run and log its config, or with `saved` (what an earlier start returned) reopen the same one,
        whose next logged step is `next_step`. Returns what reopens it (ids, folders): trackers.json keeps it.
        A returned `run_id` other than saved's is a new run (MLflow, told another store): it gets every step.
        Where it knows what reopens its run before that run exists (W&B picks its own id), it sets it as
        `self.state` first: a start interrupted (Ctrl-C) there is recorded, and --resume continues that run.
        A tracker may also have `preflight(mlflow_uri)`: `check_loggers` calls it before any work."""

    def held_step(self) -> int | None:
        """The last step this tracker's own store holds for a reopened run, where it can tell (None: unknown)."""

    def log(self, points: Sequence[tuple[int, Mapping[str, float]]]) -> None:
        """Scalars, each (step, {name: value}) at a global step (the optimizer step), steps ascending."""

    def images(self, images: Mapping[str, Path], step: int) -> None:
        """PNG files, by name."""

    def summary(self, summary: Mapping[str, Any], step: int) -> None:
        """The run's final summary (summary.json)."""

    def close(self, status: str) -> None:
        """FINISHED, KILLED (interrupted: --resume continues it) or FAILED."""


TRACKERS: Registry[type[Tracker]] = Registry("logger")


def run_name(run_dir: Path) -> str:
    """The run's name in the trackers: its folder's name, with the seed folder above it for a reproduce run
    (OUT/seed0/teacher -> seed0/teacher: every seed's runs would share a name otherwise)."""
    parent = run_dir.parent.name
    return f"{parent}/{run_dir.name}" if re.fullmatch(r"seed\d+", parent) else run_dir.name


def check_loggers(names, mlflow_uri: str | None = None) -> list[str]:
    """The --logger names, checked before any work: each registered, its package installed (one line naming
    the extra otherwise) and its own `preflight` passed (MLflow: the store `mlflow_uri` names, one line if
    MLflow cannot use it)."""
    names = list(dict.fromkeys(names or ()))
    for name in names:
        tracker = TRACKERS.get(name)
        if importlib.util.find_spec(tracker.package) is None:
            raise MissingDependency(f"--logger {name} needs {tracker.package}, which is not installed; install it "
                                    f"with: pip install 'kdiqa-edge[{EXTRA}]'")
    for name in names:
        getattr(TRACKERS.get(name), "preflight", lambda mlflow_uri: None)(mlflow_uri)
    return names


def note(name: str, line: str) -> None:
    """One line of a tracker's own (where its run is) on stderr, as `NAME: line` (the libraries' own lines are
    held back)."""
    from kdiqa_edge.console import stream

    print(f"{name}: {line}", file=stream("stderr"), flush=True)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def experiment_name(config: Mapping[str, Any], stage: str) -> str:
    """`<dataset>-<student>` for a distillation, `<dataset>-teacher-<teacher>` for a teacher fine-tune."""
    dataset = (config.get("dataset") or {}).get("name") or "synthetic"
    model = config.get("student") if stage == "distill" and config.get("student") else \
        f"teacher-{config.get('teacher', 'model')}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{dataset}-{model}")


TAG_FIELDS = ("split_seed", "student", "variant", "teacher")


def run_tags(config: Mapping[str, Any], stage: str) -> dict[str, str]:
    """What a sweep's runs differ in, as tags the trackers' tables group and filter by."""
    tags = {"stage": stage, "dataset": str((config.get("dataset") or {}).get("name") or "synthetic")}
    tags.update({name: str(config[name]) for name in TAG_FIELDS if config.get(name) is not None})
    if stage != "distill":
        tags.pop("student", None)
        tags.pop("variant", None)
    return tags



def final_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """The summary's headline figures as scalars: `summary/test_srcc`, `summary/zero_shot_test_srcc`..."""
    figures = {}
    for part in ("test", "zero_shot_test"):
        for key, value in (summary.get(part) or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                figures[f"summary/{part}_{key}"] = float(value)
    if isinstance(summary.get("best_epoch"), int):
        figures["summary/best_epoch"] = float(summary["best_epoch"])
    return figures
