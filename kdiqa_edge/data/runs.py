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

PATH_FIELDS = ("root", "csv", "image_dir")


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


def absolute_paths(spec: DatasetSpec) -> DatasetSpec:
    """The spec with its paths absolute and resolved, as a run records it (valid from any folder)."""
    changes = {name: Path(getattr(spec, name)).expanduser().resolve() for name in PATH_FIELDS
               if getattr(spec, name) is not None}
    return dataclasses.replace(spec, **changes)


def resolve_paths(spec: DatasetSpec, bases: list[Path]) -> DatasetSpec:
    """Relative paths of an older run, tried against each base in turn; the first base under which the
    root (or the score file, for a csv set without a root) exists wins for every path."""
    relative = [name for name in PATH_FIELDS
                if getattr(spec, name) is not None and not Path(getattr(spec, name)).expanduser().is_absolute()]
    if not relative:
        return spec
    anchor = spec.root if spec.root is not None else (spec.csv if spec.csv is not None else spec.image_dir)
    for base in bases:
        if (base / anchor).exists():
            return dataclasses.replace(spec, **{name: (base / getattr(spec, name)).resolve() for name in relative})
    return spec  # not found anywhere: the reader's own error names the path


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
    bases = [Path(saved["workdir"])] if saved.get("workdir") else []
    bases += [parent for parent in run_dir.resolve().parents] + [Path.cwd()]
    split_file = run_dir / "split.json"
    return RunData(run_dir=run_dir, dataset=resolve_paths(spec, bases),
                   split_file=split_file if split_file.is_file() else None,
                   split_seed=int(saved.get("split_seed", 0) or 0),
                   val_fraction=float(saved.get("val_fraction", 0.0) or 0.0),
                   test_fraction=float(saved.get("test_fraction", 0.2) or 0.2),
                   split_by=str(saved.get("split_by", "auto") or "auto"))
