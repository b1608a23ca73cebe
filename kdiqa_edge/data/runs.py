"""A training run's data, read back from its folder: the dataset it was trained on and its split. Torch-free.

`export` and `bench` both measure a model on the data its run was trained on (the test split it never saw),
so both read it here. Runs record absolute dataset paths and the folder they ran in (`workdir`); a run made
before that recorded paths relative to wherever the command ran, so a relative path is tried against the
run's recorded `workdir`, then the folders above the run dir, then the current folder.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from kdiqa_edge.data.spec import DatasetSpec


@dataclasses.dataclass(frozen=True)
class RunData:
    run_dir: Path
    dataset: DatasetSpec  # paths resolved (absolute where they could be found)
    split_file: Path | None  # the run's split.json
    split_seed: int  # the seed the run split with (what a fresh split must use where split.json is unusable)
    val_fraction: float = 0.0
    test_fraction: float = 0.2
    split_by: str = "auto"


def find_run_dir(path: str | Path) -> Path | None:
    """The run dir of a run dir or of a checkpoint inside one (RUN/checkpoints/best), else None."""
    path = Path(path)
    for candidate in (path, path.parent.parent):
        if (candidate / "config.yaml").is_file():
            return candidate
    return None


def run_bases(run_dir: str | Path, workdir: str | None) -> list[Path]:
    """Where an older run's relative dataset paths may be relative to, in order: the folder it ran in, the
    folders above the run dir, the current folder."""
    return ([Path(workdir)] if workdir else []) + list(Path(run_dir).resolve().parents) + [Path.cwd()]


def run_data(path: str | Path) -> RunData | None:
    """What the run that made `path` (a run dir or a checkpoint in one) was trained on; None for a bare
    checkpoint or artifact, or a run whose config has no usable dataset."""
    from kdiqa_edge.config import load_file

    run_dir = find_run_dir(path)
    if run_dir is None:
        return None
    saved = load_file(run_dir / "config.yaml")
    dataset = saved.get("dataset")
    try:
        spec = DatasetSpec.from_dict(dataset) if isinstance(dataset, dict) and dataset else DatasetSpec()
    except TypeError:
        return None
    from kdiqa_edge.data.readers import absolute_spec

    split_file = run_dir / "split.json"
    return RunData(run_dir=run_dir, dataset=absolute_spec(spec, run_bases(run_dir, saved.get("workdir"))),
                   split_file=split_file if split_file.is_file() else None,
                   split_seed=int(saved.get("split_seed", 0) or 0),
                   val_fraction=float(saved.get("val_fraction", 0.0) or 0.0),
                   test_fraction=float(saved.get("test_fraction", 0.2) or 0.2),
                   split_by=str(saved.get("split_by", "auto") or "auto"))
