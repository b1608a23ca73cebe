"""Accuracy on the eval split and drift against a reference model, torch-free (numpy + scipy)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from kdiqa_edge.metrics import IQAMetrics, evaluate
from kdiqa_edge.preprocess import PreprocessSpec


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

    def __init__(self, spec, seed: int = 0, max_images: int | None = None, progress: bool = True):
        self.spec, self.seed, self.max_images, self.progress = spec, seed, max_images, progress
        self._sets: dict[str, EvalSet] = {}

    def get(self, preprocess: PreprocessSpec) -> EvalSet:
        if preprocess.key not in self._sets:
            self._sets[preprocess.key] = self._build(preprocess)
        return self._sets[preprocess.key]

    def _build(self, preprocess: PreprocessSpec) -> EvalSet:
        from kdiqa_edge.data import prepare

        cache, split = prepare(self.spec, preprocess, seed=self.seed, progress=self.progress)
        indices, which = (list(split.test), "test") if len(split.test) >= 3 else (list(range(len(cache))), "all")
        if self.max_images:
            indices = indices[:self.max_images]
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
