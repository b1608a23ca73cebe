"""Accuracy on the eval split and drift against a reference model, torch-free (numpy + scipy)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kdiqa_edge.data.spec import DatasetSpec
from kdiqa_edge.errors import ConfigError, DataError
from kdiqa_edge.metrics import IQAMetrics, evaluate
from kdiqa_edge.preprocess import PreprocessSpec

# where the eval images come from (EvalSource.origin)
FROM_RUN = "run"  # the reference run's dataset, and the test part of its own split.json
FROM_OPTIONS = "options"  # the dataset options given to bench
SYNTHETIC = "synthetic"  # the built-in synthetic set: no run and no options named a dataset
NOT_YOUR_DATA = "accuracy on the built-in synthetic set, NOT your data"

# what a model not trained in the run whose test split bench scores gets (EvalSource.foreign, LeakCheck)
REFUSE = "refuse"  # the run chose the data: its test split may hold the model's training images, so no figures
NOTE = "note"  # the dataset options named the run's dataset: the user chose it, a note says the risk


@dataclasses.dataclass(frozen=True)
class EvalSource:
    """Which images bench scores for accuracy, the split whose test part they are, and why these."""

    dataset: DatasetSpec
    origin: str  # FROM_RUN | FROM_OPTIONS | SYNTHETIC
    split_seed: int = 0  # the seed of a fresh split (where no split file applies)
    split_file: Path | None = None  # the run's split.json: its test part holds the images the run never saw
    val_fraction: float = 0.0
    test_fraction: float = 0.2
    split_by: str = "auto"
    run_dir: Path | None = None  # the run whose data this is, or whose data the options overrode
    reason: str = ""  # why SYNTHETIC: what named no dataset
    notes: tuple[str, ...] = ()
    foreign: str = ""  # FROM_RUN on the run's own split: REFUSE or NOTE a model not trained in run_dir
    # (LeakCheck); "": no check (no run, or a fresh split, whose note already says the risk)

    @property
    def headline(self) -> str | None:
        """The line bench prints first, before anything else, when its accuracy is not on the user's data."""
        if self.origin != SYNTHETIC:
            return None
        return (f"{NOT_YOUR_DATA}: {self.reason}; pass --reference RUN_DIR (its dataset and split) or the "
                "dataset options (--dataset ...)")

    @property
    def where(self) -> str:
        """'the data runs/x trained on', 'the dataset options' or 'the built-in set, NOT your data'."""
        return {FROM_RUN: f"the data {self.run_dir} trained on", FROM_OPTIONS: "the dataset options",
                SYNTHETIC: "the built-in set, NOT your data"}[self.origin]

    def describe(self) -> str:
        """'csv (the data runs/x trained on)': the dataset and where bench got it, for the report."""
        return f"{self.dataset.name} ({self.where})"


def eval_source(reference: str | Path | None, data: DatasetSpec | None = None, split_seed: int | None = None,
                models: Sequence[str | Path] = ()) -> EvalSource:
    """Where bench measures accuracy. Dataset options given explicitly win over the run's (with a note);
    without them, the run of `reference` (else, where the reference is none or not in a run, of the first
    model that is a run dir or a checkpoint in one) gives the dataset and its saved split; without a run,
    the built-in synthetic set, and a headline that says so. `split_seed` None: the run's own split (its
    split.json), else seed 0."""
    from kdiqa_edge.data.readers import absolute_spec
    from kdiqa_edge.data.runs import run_data

    data = data or DatasetSpec()
    given = dataclasses.replace(data, strict=False) != DatasetSpec()  # --strict alone names no dataset
    candidates = ([reference] if reference is not None else []) + list(models)
    run = next((found for path in candidates if (found := run_data(path)) is not None), None)
    same = run is not None and (dataclasses.replace(absolute_spec(data), strict=False)  # run.dataset: absolute
                                == dataclasses.replace(run.dataset, strict=False))
    if run is not None and (not given or same):
        dataset = dataclasses.replace(run.dataset, strict=data.strict or run.dataset.strict)
        split = {"val_fraction": run.val_fraction, "test_fraction": run.test_fraction, "split_by": run.split_by}
        if split_seed is None or split_seed == run.split_seed:
            return EvalSource(dataset, FROM_RUN, run.split_seed, run.split_file, run_dir=run.run_dir, **split,
                              foreign=NOTE if given else REFUSE, notes=() if run.split_file else (
                                  f"{run.run_dir} has no split.json: its dataset split again with its seed "
                                  f"{run.split_seed}",))
        return EvalSource(dataset, FROM_RUN, split_seed, None, run_dir=run.run_dir, **split, notes=(
            f"--split-seed {split_seed}: a fresh split of the dataset of {run.run_dir}, not its own split (seed "
            f"{run.split_seed}): some test images may be ones the run trained on",))
    seed = 0 if split_seed is None else split_seed
    if given:
        notes = () if run is None else (
            f"the dataset options given here win over the dataset of {run.run_dir} ({run.dataset.name}"
            f"{f' at {run.dataset.root}' if run.dataset.root else ''}); its split.json does not apply: split with "
            f"seed {seed}",)
        return EvalSource(data, FROM_OPTIONS, seed, run_dir=run.run_dir if run else None, notes=notes)
    if reference is not None:
        reason = (f"the reference {reference} is not a run dir (no config.yaml with a dataset beside it)"
                  f"{', nor is any model' if models else ''}")
    else:
        reason = "no --reference run and no dataset options"
    return EvalSource(data, SYNTHETIC, seed, reason=reason)


def run_dir_of(path: str | Path) -> Path | None:
    """The run a model comes from: the run dir it is (or a checkpoint in), else the run of the checkpoint its
    export manifest names (OUT/<target>-<precision>/FILE beside OUT/manifest.json), else None."""
    from kdiqa_edge.data.runs import find_run_dir
    from kdiqa_edge.runtime.registry_uri import is_registry_uri

    if is_registry_uri(path):
        return None
    found = find_run_dir(path)
    if found is not None:
        return found
    manifest = Path(os.path.realpath(path)).parent.parent / "manifest.json"  # realpath: an alias to an export
    try:
        checkpoint = json.loads(manifest.read_text(encoding="utf-8"))["checkpoint"]["path"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    # export records the checkpoint's absolute path; an older manifest, as given on its command line: relative
    # to where it ran, which is most often here or a folder above OUT
    for base in (Path.cwd(), *manifest.parent.parents):
        found = find_run_dir(base / checkpoint)
        if found is not None:
            return found
    return None


def same_test_split(run: Path, other: Path) -> bool:
    """Whether two runs held out the same test images: their split.json agree (image list and test part),
    or, where either has none, they split one dataset with one seed and the same fractions."""
    from kdiqa_edge.data.runs import run_data

    if Path(run).resolve() == Path(other).resolve():
        return True
    files = [Path(run) / "split.json", Path(other) / "split.json"]
    if all(f.is_file() for f in files):
        try:
            first, second = (json.loads(f.read_text(encoding="utf-8")) for f in files)
            return (first.get("index") == second.get("index")
                    and sorted(first.get("test", [])) == sorted(second.get("test", [])))
        except (OSError, ValueError, AttributeError):
            return False
    found = run_data(run), run_data(other)
    keys = ("dataset", "split_seed", "val_fraction", "test_fraction", "split_by")
    return None not in found and all(getattr(found[0], k) == getattr(found[1], k) for k in keys)


class LeakCheck:
    """A model scored on a run's test split must not have trained on it: it must come from that run (its
    recorded checkpoint hash is one of the run's checkpoints'), or from a run that held out the same test
    images (found through the model's run dir or its export manifest). Any other model is refused in one
    line (`source.foreign` REFUSE) or noted (NOTE); one that records no checkpoint hash is noted. Each run's
    checkpoint hashes are read once, from their model.json: the hash export records (`source.checkpoint_hash`)."""

    def __init__(self, source: EvalSource):
        self.source = source
        self.notes: list[str] = []
        self._hashes: dict[Path, dict[str, str]] = {}  # run dir -> {content hash: checkpoint name}

    def run_hashes(self, run_dir: Path) -> dict[str, str]:
        run_dir = Path(run_dir)
        if run_dir not in self._hashes:
            found: dict[str, str] = {}
            folder = run_dir / "checkpoints"
            for checkpoint in sorted(folder.iterdir()) if folder.is_dir() else ():
                try:
                    value = json.loads((checkpoint / "model.json").read_text(encoding="utf-8")).get("content_hash")
                except (OSError, ValueError, AttributeError):
                    continue
                if isinstance(value, str) and value:
                    found.setdefault(value, checkpoint.name)  # best is often a link to last: one hash
            self._hashes[run_dir] = found
        return self._hashes[run_dir]

    def check(self, path: str | Path, source: dict) -> None:
        """Pass, note or refuse (ConfigError) the model at `path`, whose artifact records `source`."""
        run = self.source.run_dir
        if run is None or not self.source.foreign:
            return
        recorded = source.get("checkpoint_hash") if isinstance(source, dict) else None
        if not isinstance(recorded, str) or not recorded:
            self._note(f"{path} records no checkpoint hash: bench cannot tell whether the test split of {run} "
                       "holds images it trained on")
            return
        if recorded in self.run_hashes(run):
            return
        own = run_dir_of(path)
        if own is not None and recorded in self.run_hashes(own) and same_test_split(own, run):
            return
        ours = ", ".join(f"{name} {value[:12]}" for value, name in self.run_hashes(run).items()) or "none recorded"
        what = (f"{path} records checkpoint {recorded[:12]}, none of the checkpoints of {run} ({ours}): the "
                f"test split of {run} may hold images it trained on")
        if self.source.foreign == NOTE:
            self._note(f"{what} (the dataset options named this dataset, so it is scored there anyway)")
            return
        raise ConfigError(f"{what}, so its accuracy there would read too high: pass the run it was distilled "
                          "in as --reference, or name a dataset with --dataset/--root")

    def _note(self, line: str) -> None:
        if line not in self.notes:  # a path given twice (as the reference and a model) is said once
            self.notes.append(line)


@dataclasses.dataclass
class EvalSet:
    """The eval split's preprocessed pixels, for one preprocessing spec."""

    names: list[str]  # record image paths (relative to the dataset root): the alignment key across specs
    files: list[Path]  # absolute paths, for preprocessing timing
    images: np.ndarray  # uint8 [N, S, S, 3]
    mos: np.ndarray  # float32 [N]
    dataset: str
    split: str  # "test" (or "all" when the dataset is too small to hold one out)


class EvalData:
    """Prepares the eval split once per preprocessing spec (models may differ in input size)."""

    def __init__(self, source: EvalSource, max_images: int | None = None, progress: bool = True):
        self.source, self.max_images, self.progress = source, max_images, progress
        self.notes: list[str] = []  # what happened to the split (a saved one that no longer fits)
        self._sets: dict[str, EvalSet] = {}

    @property
    def spec(self) -> DatasetSpec:
        return self.source.dataset

    def get(self, preprocess: PreprocessSpec) -> EvalSet:
        if preprocess.key not in self._sets:
            self._sets[preprocess.key] = self._build(preprocess)
        return self._sets[preprocess.key]

    def _build(self, preprocess: PreprocessSpec) -> EvalSet:
        from kdiqa_edge.data import Split, prepare

        source = self.source
        cache, split = prepare(source.dataset, preprocess, seed=source.split_seed, val_fraction=source.val_fraction,
                               test_fraction=source.test_fraction, split_by=source.split_by, progress=self.progress)
        if source.split_file is not None:
            try:
                split = Split.load(source.split_file).check(cache.dataset)
            except DataError as exc:
                note = (f"not using {source.split_file} ({exc}): the run's dataset split again with its seed "
                        f"{source.split_seed}")
                if note not in self.notes:
                    self.notes.append(note)
        indices, which = (list(split.test), "test") if len(split.test) >= 3 else (list(range(len(cache))), "all")
        if which == "all":
            note = (f"the test split holds {len(split.test)} image(s): scored on all {len(indices)} images, training "
                    "images included, so the accuracy figures do not say how well a model generalises")
            if note not in self.notes:
                self.notes.append(note)
        if self.max_images and len(indices) > self.max_images:  # spread over the split: every content, not the first
            indices = [indices[i] for i in np.linspace(0, len(indices) - 1, self.max_images).round().astype(int)]
        records = cache.dataset.records
        root = Path(cache.dataset.root)
        return EvalSet(names=[records[i].image for i in indices], files=[root / records[i].image for i in indices],
                       images=np.asarray(cache.images[indices]), mos=np.asarray(cache.mos[indices], np.float32),
                       dataset=cache.dataset.name, split=which)


@dataclasses.dataclass(frozen=True)
class Drift:
    delta_plcc: float  # model - reference
    delta_srcc: float
    mean_abs_diff: float  # mean |score - reference score|, MOS units
    max_abs_diff: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def drift(metrics: IQAMetrics, scores: np.ndarray, ref_metrics: IQAMetrics, ref_scores: np.ndarray) -> Drift:
    diff = np.abs(np.asarray(scores, np.float64) - np.asarray(ref_scores, np.float64))
    return Drift(delta_plcc=metrics.plcc - ref_metrics.plcc, delta_srcc=metrics.srcc - ref_metrics.srcc,
                 mean_abs_diff=float(diff.mean()), max_abs_diff=float(diff.max()))


def score_eval_set(model, eval_set: EvalSet, batch_size: int = 32) -> tuple[np.ndarray, IQAMetrics]:
    scores = model.predict(eval_set.images, batch_size=batch_size)
    return scores, evaluate(scores, eval_set.mos)
