"""What `distill --resume` checks before it trains on: the same run, the same config (what is trained, not how)
and the same data (images, ratings, the unlabeled pool) as the run that was interrupted, and which teacher it
trained with. Each refusal is one line, said before any cache or feature is rebuilt.
"""

from __future__ import annotations

import os
from pathlib import Path

from kdiqa_edge import config as config_lib
from kdiqa_edge.data.spec import DatasetSpec
from kdiqa_edge.errors import ConfigError
from kdiqa_edge.preprocess import PreprocessSpec


def check_resume(run_dir: Path, cfg, data: DatasetSpec, volatile: tuple[str, ...]) -> None:
    """Refuse to resume `run_dir` with anything that changes what is trained (the `volatile` fields of the
    config `cfg` may change).

    Both sides are compared as saved: `cfg` through a JSON round trip, the saved dataset with its paths
    resolved as a resumed run resolves them (an older run's relative paths included) and made absolute.
    """
    from kdiqa_edge.data.runs import run_data

    saved = config_lib.as_saved(config_lib.load_file(run_dir / "config.yaml"))  # there: `require_run` said so
    current = config_lib.as_saved(cfg)
    changed = [k for k in current if k not in volatile + ("dataset",) and k in saved and saved[k] != current[k]]
    run = run_data(run_dir) if saved.get("dataset") else None  # its dataset resolved as a resume resolves it
    if run is not None:
        before, after = run.dataset.to_dict(), data.to_dict()
        fields = [f"{k}: {before[k]} -> {after[k]}" for k in after if before.get(k) != after[k]]
        if fields:
            changed.append(f"dataset ({'; '.join(fields)})")
    if changed:
        raise ConfigError(f"cannot resume {run_dir} with a different config (changed: {', '.join(sorted(changed))})")


def require_run(run_dir: str | Path | None) -> None:
    """--resume's run dir (--out) is given and holds a run (its config.yaml): one line otherwise. Teacher
    fine-tunes and distillations alike. A checkpoint save a kill interrupted is finished first
    (`state.recover_last`), so the recipe sees the `last` it resumes from."""
    if run_dir is None:
        raise ConfigError("--resume needs --out: the run dir to continue")
    if not (Path(run_dir) / "config.yaml").is_file():
        raise ConfigError(f"nothing to resume in {run_dir} (no config.yaml)")
    from kdiqa_edge.train.state import recover_last

    recover_last(Path(run_dir))  # a save killed half-way: its checkpoint is what the resume continues from


def recorded_data(run_dir: Path) -> dict:
    """What the student's `last` recorded about its data (model.json: read before any cache is built)."""
    from kdiqa_edge.models.checkpoint import read_meta

    meta = read_meta(run_dir / "checkpoints" / "last")
    return {"image_cache": meta.get("image_cache"), "teacher": meta.get("teacher_content_hash"),
            "unlabeled_pool": (meta.get("unlabeled") or {}).get("pool")}


def check_resumed_images(run_dir: Path, recorded: dict, data: DatasetSpec, preprocess: PreprocessSpec) -> None:
    """Refuse other images before the image cache is rebuilt for them (which would drop the run's own): the
    cache's key of the files now (a stat each, no decode) against the one the run trained on."""
    from kdiqa_edge.data import cache_key, load_dataset
    from kdiqa_edge.train.state import check_same_data

    check_same_data(run_dir, recorded, {"image_cache": cache_key(load_dataset(data), preprocess)})


def resumed_teacher(run_dir: Path) -> Path | None:
    """The teacher checkpoint an interrupted student trained with (its `last` records it), if still there:
    the resumed run goes on with those features, whatever the teacher-run cache would pick today."""
    from kdiqa_edge.errors import CheckpointError
    from kdiqa_edge.models.checkpoint import read_meta

    try:
        meta = read_meta(run_dir / "checkpoints" / "last")
    except CheckpointError:
        return None
    recorded = meta.get("teacher_checkpoint")
    if not recorded or not Path(recorded).is_dir():
        return None
    try:
        same = read_meta(recorded).get("content_hash") == meta.get("teacher_content_hash")
    except CheckpointError:
        return None
    return Path(recorded) if same else None


def make_run_dir(run_dir: Path) -> Path:
    """The run dir, made now (parents too): an --out that is a file, or lies where nothing can be written, is
    one line before any work, not a traceback where the first file is written."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is a file, not a run dir: choose another --out")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot make the run dir {run_dir}: {exc.strerror or exc}; choose another "
                          "--out") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write in the run dir {run_dir}: choose another --out")
    return run_dir


def refuse_existing_run(run_dir: Path) -> None:
    from kdiqa_edge.train.state import recover_last

    recover_last(run_dir)  # a run whose last save a kill cut short still holds a run: never train it over
    if (run_dir / "checkpoints" / "last").exists():
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
