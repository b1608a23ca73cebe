"""Seeded train/val/test splits: by reference content where the dataset has refs, else by image.

Splitting by reference keeps every content on one side (no distorted copy of a test image in training),
the convention for synthetic-distortion sets (LIVE, CSIQ, KADID, TID). KonIQ's official split is taken
from its own file on request. A split is saved with the run as JSON and checked against the index it
is applied to.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Literal

import numpy as np

from kdiqa_edge.data.records import Dataset
from kdiqa_edge.errors import ConfigError, DataError
from kdiqa_edge.io import read_json, write_json

SplitBy = Literal["auto", "ref", "image", "official"]
OFFICIAL_SETS = {"training": "train", "train": "train", "validation": "val", "val": "val", "test": "test"}


@dataclasses.dataclass
class Split:
    train: list[int]  # indices into the dataset's records
    val: list[int]
    test: list[int]
    seed: int = 0
    by: str = "ref"  # ref | image | official
    index: str = ""  # fingerprint of the image list the indices refer to

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}

    def assignment(self, count: int) -> list[str]:
        """Per record: 'train', 'val' or 'test'."""
        names = [""] * count
        for part in ("train", "val", "test"):
            for i in getattr(self, part):
                names[i] = part
        return names

    def check(self, dataset: Dataset) -> Split:
        """Refuse a split made for another image list (a changed dataset, a different cache)."""
        if self.index and self.index != index_fingerprint(dataset):
            raise DataError("this split was made for a different image list; make a new split for this dataset")
        return self

    def save(self, path: str | Path) -> Path:
        return write_json(path, dataclasses.asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> Split:
        try:
            data = read_json(path)
            return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})
        except (OSError, ValueError, TypeError) as exc:
            raise DataError(f"cannot read split {path}: {exc}") from None


def index_fingerprint(dataset: Dataset) -> str:
    digest = hashlib.sha256()
    for record in dataset.records:
        digest.update(record.image.encode() + b"\n")
    return digest.hexdigest()[:16]


def check_split_options(test_fraction: float, val_fraction: float, by: str = "auto") -> None:
    """The split's options, refused in one line: what a recipe checks before any work."""
    if not 0 < test_fraction < 1 or not 0 <= val_fraction < 1 or test_fraction + val_fraction >= 1:
        raise ConfigError(f"bad split fractions: test {test_fraction}, val {val_fraction} (each within 0..1, "
                          f"test above 0, together below 1)")
    if by not in ("auto", "ref", "image", "official"):
        raise ConfigError(f"unknown split mode {by!r}; choose auto, ref, image or official")


def make_split(dataset: Dataset, seed: int = 0, test_fraction: float = 0.2, val_fraction: float = 0.0,
               by: SplitBy = "auto") -> Split:
    """Seeded split of `dataset.records`. `auto`: by reference where the records carry refs, else by image."""
    check_split_options(test_fraction, val_fraction, by)
    if by == "official":
        return _official(dataset, seed)
    if by == "auto":
        by = "ref" if len(dataset.refs) >= 2 else "image"
    if by == "ref" and len(dataset.refs) < 2:
        raise DataError(f"cannot split by reference: dataset {dataset.name!r} has {len(dataset.refs)} reference(s)")
    if len(dataset.records) < 2:
        raise DataError("need at least 2 images to split")
    groups: dict[str, list[int]] = {}
    for i, record in enumerate(dataset.records):
        # records without a ref (mixed datasets) are their own group
        key = record.ref if by == "ref" and record.ref is not None else f"\0image:{record.image}"
        groups.setdefault(key, []).append(i)
    names = sorted(groups)
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    total = len(dataset.records)
    test, order = _take(order, groups, test_fraction * total)
    val, order = _take(order, groups, val_fraction * total) if val_fraction > 0 else ([], order)
    train = sorted(i for name in order for i in groups[name])
    if not train:
        raise DataError("split left no training image; use a smaller test/val fraction or more data")
    return Split(train=train, val=val, test=test, seed=seed, by=by, index=index_fingerprint(dataset))


def _take(order: list[str], groups: dict[str, list[int]], target: float) -> tuple[list[int], list[str]]:
    """Take whole groups (at least one) until they hold about `target` images; keep one group back."""
    taken: list[int] = []
    count = 0
    while count < len(order) - 1 and (not taken or len(taken) + len(groups[order[count]]) / 2 <= target):
        taken.extend(groups[order[count]])
        count += 1
    return sorted(taken), order[count:]


def _official(dataset: Dataset, seed: int) -> Split:
    parts: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for i, record in enumerate(dataset.records):
        part = OFFICIAL_SETS.get((record.official or "").strip().lower())
        if part is None:
            raise DataError(f"dataset {dataset.name!r} has no official split for {record.image}"
                            + ("" if record.official is None else f" (set {record.official!r})"))
        parts[part].append(i)
    if not parts["train"] or not parts["test"]:
        raise DataError("the official split has an empty train or test part")
    return Split(**parts, seed=seed, by="official", index=index_fingerprint(dataset))
