"""The IQA data layer: dataset readers, splits, the synthetic set and the uint8 image cache.

    from kdiqa_edge.data import DatasetSpec, prepare
    cache, split = prepare(DatasetSpec(), PreprocessSpec(), seed=0)
    cache.images[split.train]   # uint8 [N, 224, 224, 3], CLIP-preprocessed, not normalized
    cache.mos[split.train]      # float32, 1..5, higher is better

Torch-free.
"""

from __future__ import annotations

import logging

from kdiqa_edge.data import official as _official  # noqa: F401 - registers the public datasets' readers
from kdiqa_edge.data.cache import ImageCache, cache_key
from kdiqa_edge.data.readers import DATASETS, dataset_root, load_dataset
from kdiqa_edge.data.records import Dataset, Record, Skip, skip_summary, write_skipped
from kdiqa_edge.data.spec import DatasetSpec
from kdiqa_edge.data.split import Split, SplitBy, make_split
from kdiqa_edge.preprocess import PreprocessSpec

log = logging.getLogger(__name__)

__all__ = [
    "DATASETS", "Dataset", "DatasetSpec", "ImageCache", "PreprocessSpec", "Record", "Skip", "Split",
    "cache_key", "dataset_root", "load_dataset", "make_split", "prepare", "skip_summary", "write_skipped",
]


def prepare(spec: DatasetSpec, preprocess_spec: PreprocessSpec = PreprocessSpec(), seed: int = 0,
            val_fraction: float = 0.0, test_fraction: float = 0.2, split_by: SplitBy = "auto",
            progress: bool = True, workers: int | None = None) -> tuple[ImageCache, Split]:
    """Read the dataset, decode it into the image cache (once), split what decoded.

    The split indexes `cache.dataset.records` / `cache.images`. Skipped files are logged as one summary
    line (a warning) and listed with their reasons in `<cache.path>/skipped.csv`.
    """
    dataset = load_dataset(spec)
    cache = ImageCache.build(dataset, preprocess_spec, progress=progress, workers=workers, strict=spec.strict)
    if cache.skipped:  # every command that trains or evaluates says what it left out, and where the list is
        listing = write_skipped(cache.path / "skipped.csv", cache.skipped)
        log.warning("%s: %s (the list with reasons: %s)", spec.name, skip_summary(cache.skipped), listing)
    split = make_split(cache.dataset, seed=seed, test_fraction=test_fraction, val_fraction=val_fraction,
                       by=split_by)
    return cache, split
