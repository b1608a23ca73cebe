"""A training run on disk: checkpoints `last` and `best`, the resume state, RNG state, metrics.csv, steps.csv.

`last` holds the weights and `train_state.pt` (optimizer, scheduler, grad scaler, RNG, step, history) in one
checkpoint dir, replaced as a whole; `best` is a hard-linked copy of the weights of the best `last`.
Reproducible bytes: checkpoints carry no wall-clock figures (WALL_CLOCK: in metrics.csv and summary.json
only), so a killed-and-resumed run writes the uninterrupted run's model.safetensors and model.json.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdiqa_edge.errors import CheckpointError, ConfigError, DataError
from kdiqa_edge.io import REPLACED, atomic_path, write_text

TRAIN_STATE = "train_state.pt"
# Measurements of the machine, not of the model: metrics.csv and summary.json keep them, checkpoints do not
# (the same training gives the same checkpoint bytes, resumed or not).
WALL_CLOCK = ("train_seconds", "images_per_s")
# Config fields a resumed run may change: they do not change what is trained.
RESUMABLE_CHANGES = frozenset({"progress", "compile", "device", "eval_batch_size", "loggers", "mlflow_uri"})
# What a run records about its data (train_state's `data`; distill's model.json holds the first and the last):
# a resume that reads other data is refused, naming which. The image cache's key covers each file's size and
# mtime (a file's pixels, without reading them again), the ratings key the MOS values the cache aligns with.
DATA_KEYS = {
    "image_cache": ("its images", "a file's pixels, size or date, or the image list", "image cache key"),
    "ratings": ("its ratings", "a MOS edited", "ratings key"),
    "unlabeled_pool": ("its unlabeled images", "one added, removed or changed", "pool key"),
    # distill: the soft targets (model.json's teacher_content_hash; a cached teacher removed, trained again)
    "teacher": ("its teacher", "the teacher checkpoint it learned from is gone or was replaced",
                "content hash"),
}


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped a training run: where, so that the command can say how to resume it.

    A KeyboardInterrupt still (whatever catches those still does); `str()` is "interrupted at epoch 3/6".
    """

    def __init__(self, run_dir: Path, where: str):
        super().__init__(f"interrupted {where}")
        self.run_dir, self.where = Path(run_dir), where


def run_finished(run_dir: Path) -> bool:
    """A run dir whose training completed (summary.json is written last)."""
    return (Path(run_dir) / "summary.json").is_file()


def run_interrupted(run_dir: Path) -> bool:
    """A run dir that `resume=True` can continue: a saved train state, no summary yet."""
    return (Path(run_dir) / "checkpoints" / "last" / TRAIN_STATE).is_file() and not run_finished(run_dir)


# ----------------------------------------------------------------------------------------------------------
# RNG state


def rng_state() -> dict[str, Any]:
    """torch, CUDA, Python and NumPy generator states, as tensors and lists torch.load(weights_only) reads."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }


def set_rng_state(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    random.setstate(_as_tuple(rng["python"]))
    np.random.set_state((rng["numpy"][0], rng["numpy"][1].numpy().astype(np.uint32), *rng["numpy"][2:]))


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


# ----------------------------------------------------------------------------------------------------------
# Checkpoints


def save_last(model: nn.Module, run_dir: Path, meta: dict, train_state: dict, best: bool) -> Path:
    """Write checkpoints/last (weights + train_state) and, if `best`, link checkpoints/best to it."""
    from kdiqa_edge.models.checkpoint import save_checkpoint

    buffer = io.BytesIO()
    torch.save(train_state, buffer)
    # the resume state goes in with the weights: a kill between two writes cannot leave weights
    # without the state that resumes from them
    last = save_checkpoint(model, run_dir / "checkpoints" / "last", meta,
                           extra_files={TRAIN_STATE: buffer.getvalue()})
    if best:
        link_checkpoint(last, run_dir / "checkpoints" / "best")
    return last


def recover_last(run_dir: Path) -> int | None:
    """Finish the save of `last` that a kill interrupted after the old `last` was removed and before the new
    one was renamed in (`io.atomic_path` replaces a folder in two steps): the complete staged copy
    (`checkpoints/.last.RANDOM.tmp`, its writer gone) becomes `last`. Returns its epoch, or None when there was
    nothing to recover. Without this the next run's sweep removed the staged copy: every epoch was lost, and a
    re-run trained again from the first epoch. Safe for several processes at once (torchrun's ranks)."""
    from kdiqa_edge.models.checkpoint import read_meta

    folder = Path(run_dir) / "checkpoints"
    last = folder / "last"
    if _complete_checkpoint(last) or not folder.is_dir():
        return None
    with _folder_lock(folder):
        if _complete_checkpoint(last):  # another process recovered it meanwhile
            return None
        staged = []
        for entry in folder.iterdir():
            if not (entry.name.startswith(".last.") and entry.name.endswith(".tmp") and entry.is_dir()):
                continue
            claim = entry.with_name(entry.name[: -len(".tmp")] + ".claim")
            if not _complete_checkpoint(entry) or _writer_alive(claim):
                continue
            try:
                meta, state = read_meta(entry), _read_train_state(entry)
            except CheckpointError:  # killed while writing it: the old `last` is then still in place
                continue
            if meta.get("step") == state["step"]:
                staged.append((state["step"], entry, claim, meta.get("epoch")))
        if not staged:
            return None
        _, entry, claim, epoch = max(staged, key=lambda item: item[0])
        if last.exists():  # what the interrupted removal left of the old `last`
            shutil.rmtree(last)
        os.replace(entry, last)
        # the old `last`, renamed aside by the interrupted replace (io's REPLACED): its claim goes next, after
        # which no sweep would ever remove it (a whole checkpoint's bytes)
        shutil.rmtree(entry.with_name(entry.name[: -len(".tmp")] + REPLACED), ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            claim.unlink()
    return epoch


def _complete_checkpoint(folder: Path) -> bool:
    from kdiqa_edge.models.checkpoint import META_FILE, WEIGHTS_FILE

    return all((folder / name).is_file() for name in (WEIGHTS_FILE, META_FILE, TRAIN_STATE))


def _writer_alive(claim: Path) -> bool:
    """Whether the process that staged a checkpoint still holds its claim (io's claim files)."""
    from kdiqa_edge.data._lock import lock_held_file

    try:
        fd = os.open(claim, os.O_RDONLY)
    except OSError:  # no claim: its writer is done with it
        return False
    try:
        return lock_held_file(fd, claim, wait=False) is False
    finally:
        os.close(fd)  # drops the lock this check may have taken


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """An exclusive flock on the folder itself (no lock file left behind); a no-op where flock is missing."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def load_train_state(last: Path, config: dict, world_size: int, data: dict | None = None) -> dict:
    """The train state in `last`, checked against its weights and against this run's config, processes and
    `data` (`DATA_KEYS`: what this resume reads; a state saved before they were recorded has none)."""
    from kdiqa_edge.models.checkpoint import read_meta

    state = _read_train_state(last)
    meta = read_meta(last)
    if meta.get("step") != state["step"]:
        raise CheckpointError(f"{last}: weights (step {meta.get('step')}) and {TRAIN_STATE} (step "
                              f"{state['step']}) disagree; the run was interrupted while saving")
    saved = {k: v for k, v in state["config"].items() if k not in RESUMABLE_CHANGES}
    current = {k: v for k, v in config.items() if k not in RESUMABLE_CHANGES}
    if saved != current:
        changed = sorted(k for k in current if saved.get(k) != current[k])
        raise ConfigError(f"cannot resume with a different training config (changed: {', '.join(changed)})")
    if state.get("world_size", 1) != world_size:
        raise ConfigError(f"the run was trained with {state.get('world_size')} processes; resume with the same number")
    check_same_data(last.parent.parent, state.get("data") or {}, data or {})
    return state


def _read_train_state(last: Path) -> dict:
    path = last / TRAIN_STATE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or "step" not in state or "config" not in state:
            raise ValueError("not a kdiqa-edge train state")
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        # torch's messages run to several sentences of advice: the first says what is wrong
        why = ((str(exc).splitlines() or [""])[0].split(". ")[0] or type(exc).__name__)[:160]
        raise CheckpointError(f"corrupt {path}: {why}; the run cannot resume from it: remove {last} to train "
                              f"again from the first epoch, or start a new run with --out NEW") from None
    return state


def ratings_key(dataset) -> str:
    """sha256 of the images' names and MOS values (float32, as trained): an edited rating changes it."""
    digest = hashlib.sha256("\n".join(record.image for record in dataset.records).encode())
    digest.update(np.ascontiguousarray(dataset.mos, dtype=np.float32).tobytes())
    return digest.hexdigest()


def check_same_data(run_dir: Path, recorded: dict, current: dict) -> None:
    """Refuse to resume `run_dir` on other data than it trained on: each `DATA_KEYS` entry both name."""
    changed = [name for name in DATA_KEYS if recorded.get(name) and current.get(name)
               and recorded[name] != current[name]]
    if not changed:
        return
    what = "; ".join(f"{DATA_KEYS[n][0]} changed since ({DATA_KEYS[n][2]} {str(recorded[n])[:12]} vs "
                     f"{str(current[n])[:12]}: {DATA_KEYS[n][1]})" for n in changed)
    raise DataError(f"{run_dir} was trained on other data: {what}; resuming would train on data no uninterrupted "
                    f"run saw: restore the data, or start a new run with --out NEW")


def complete_saved_epoch(run_dir: Path, last: Path, best_epoch: int | None, epoch: int,
                         history: list[dict]) -> None:
    """Finish the save a kill interrupted after `last` was in place: `best` and metrics.csv."""
    from kdiqa_edge.models.checkpoint import read_meta

    best_dir = run_dir / "checkpoints" / "best"
    if best_epoch == epoch:
        try:
            linked = read_meta(best_dir).get("epoch")
        except CheckpointError:
            linked = None
        if linked != epoch:
            link_checkpoint(last, best_dir)
    write_metrics_csv(run_dir / "metrics.csv", history)


def link_checkpoint(source: Path, target: Path) -> Path:
    """`target` = the checkpoint files of `source` (not its train_state), hard-linked where possible.

    Saving never rewrites a file in place (a checkpoint dir is replaced as a whole), so a link stays the
    content it was made with; for ViT-B/32 this saves serializing and hashing 350 MB once more per epoch.
    """
    from kdiqa_edge.models.checkpoint import META_FILE, WEIGHTS_FILE

    with atomic_path(target) as tmp:
        tmp.mkdir(parents=True)
        for name in (WEIGHTS_FILE, META_FILE):
            try:
                os.link(source / name, tmp / name)
            except OSError:  # a filesystem without hard links
                shutil.copy2(source / name, tmp / name)
    return target


# ----------------------------------------------------------------------------------------------------------
# Logs


def step_rows(step_log: list[tuple[dict, dict[str, torch.Tensor]]]) -> list[dict[str, Any]]:
    """steps.csv's rows: lr, the scalars (e.g. lambda) and this process's loss terms at every optimizer step.

    The tensors are read once per epoch (one device sync, not one per step).
    """
    if not step_log:
        return []
    names = list(step_log[0][1])
    values = torch.stack([torch.stack([terms[n] for n in names]) for _, terms in step_log]).cpu().tolist()
    return [{**info, **dict(zip(names, row))} for (info, _), row in zip(step_log, values)]


def write_step_log(path: Path, rows: list[dict[str, Any]]) -> None:
    """Add an epoch's `step_rows` to steps.csv. Rows of steps at or past this epoch's first step are replaced,
    so a resumed run never duplicates them."""
    if not rows:
        return
    first = rows[0]["step"]
    kept = []
    if path.is_file():
        with open(path, newline="") as handle:
            kept = [row for row in csv.DictReader(handle) if int(row["step"]) < first]
    write_metrics_csv(path, kept + rows)


def write_metrics_csv(path: Path, history: list[dict]) -> Path:
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return write_text(path, buffer.getvalue())
