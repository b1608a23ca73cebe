"""What every reader yields: records with a normalized MOS, and the files it had to skip (with why)."""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path

from kdiqa_edge.errors import DataError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Record:
    image: str  # path relative to the dataset root, '/'-separated
    mos: float  # normalized to 1..5, higher = better
    raw: float  # the score as the dataset gives it
    ref: str | None = None  # reference (content) id; splits keep one content on one side
    distortion: str | None = None  # distortion type, where the dataset says
    level: int | None = None  # distortion level, where the dataset says
    official: str | None = None  # the dataset's own split (KonIQ: training / validation / test)


@dataclasses.dataclass(frozen=True)
class Skip:
    image: str  # as named in the score file
    reason: str  # one line a user can act on


@dataclasses.dataclass
class Dataset:
    name: str  # reader name
    root: Path  # the folder `Record.image` is relative to
    records: list[Record]
    skipped: list[Skip] = dataclasses.field(default_factory=list)
    raw_range: tuple[float, float] = (1.0, 5.0)  # nominal range of the raw scores
    lower_better: bool = False  # DMOS-style raw scores (mos is flipped so higher is better)
    dropped: int = 0  # entries left out by the dataset's convention (LIVE reference copies, CLIVE t1..t7)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def mos(self):
        import numpy as np

        return np.asarray([r.mos for r in self.records], dtype=np.float32)

    @property
    def refs(self) -> list[str]:
        return sorted({r.ref for r in self.records if r.ref is not None})

    def subset(self, indices: Iterable[int]) -> Dataset:
        return dataclasses.replace(self, records=[self.records[i] for i in indices])

    def path(self, record: Record | int) -> Path:
        if isinstance(record, int):
            record = self.records[record]
        return self.root / record.image


@dataclasses.dataclass(frozen=True)
class Row:
    """One entry of a score file before validation: what a reader parses, nothing checked yet."""

    image: str  # as written in the score file, relative to the image root
    raw: object  # the score cell as read (may be empty, text, NaN)
    ref: str | None = None
    distortion: str | None = None
    level: int | None = None
    official: str | None = None
    problem: str | None = None  # why the entry cannot be trusted as read (a malformed line): skipped with it


def to_mos(raw: float, raw_range: tuple[float, float], lower_better: bool) -> float:
    """Linear map of the nominal range onto 1..5, flipped for DMOS."""
    lo, hi = raw_range
    unit = (raw - lo) / (hi - lo)
    return 1.0 + 4.0 * ((1.0 - unit) if lower_better else unit)


def parse_score(value: object) -> float | None:
    """A finite float, or None for empty / NaN / non-numeric cells."""
    if value is None:
        return None
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def inside(root: Path, relative: str) -> str | None:
    """`relative` normalized to a '/'-separated path under root, or None if it escapes the root."""
    if not relative or os.path.isabs(relative) or relative.startswith(("/", "\\")):
        return None
    normal = os.path.normpath(relative.replace("\\", "/"))
    if normal == ".." or normal.startswith("../") or normal == ".":
        return None
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(root, normal))
    if os.path.commonpath([real_root, real]) != real_root:  # a symlink pointing out of the root
        return None
    return normal.replace(os.sep, "/")


def build_dataset(name: str, root: Path, rows: Iterable[Row], raw_range: tuple[float, float],
                  lower_better: bool = False, hard_range: bool = True, dropped: int = 0,
                  check_files: bool = True) -> Dataset:
    """Validate rows into records: bad score, duplicate, conflict, escaping path, missing or empty file ->
    skipped, each with its reason. Scores are never clipped: one outside the range is skipped and says so.

    An image listed twice with the same score keeps its first row (the other is a duplicate); listed with
    different scores, none of its rows is used (which one is right is unknown) and each is a conflict.
    `hard_range=False` widens the nominal range to cover scores a little outside it instead of skipping
    them (LIVE's DMOS runs a little past its nominal 0..100; dropping those would lose real images), and
    logs that it did.
    """
    rows = list(rows)
    scores = [None if row.problem else parse_score(row.raw) for row in rows]
    finder = _CaseFinder(root) if check_files else None
    images = [inside(root, row.image) for row in rows]
    if finder is not None:  # the name as it is on disk, so two spellings of one file are one image
        images = [image if image is None else finder.resolve(image) for image in images]
    lo, hi = raw_range
    if not hard_range:  # widen by at most a quarter of the range; farther out is still an error
        lo, hi = _widened(name, scores, lo, hi)
    conflicts = _conflicts(images, scores)
    records: list[Record] = []
    skipped: list[Skip] = []
    kept: set[str] = set()
    for row, image, score in zip(rows, images, scores):
        if row.problem:
            skipped.append(Skip(row.image, row.problem))
        elif image is None:
            skipped.append(Skip(row.image, "path escapes the dataset root"))
        elif image in conflicts:
            skipped.append(Skip(row.image, conflicts[image]))
        elif score is None:
            skipped.append(Skip(row.image, f"score is empty or not a number ({row.raw!r})"))
        elif image in kept:
            skipped.append(Skip(row.image, "duplicate row (image already listed with this score)"))
        elif not lo <= score <= hi:
            skipped.append(Skip(row.image, f"outside the nominal range [{lo:g}, {hi:g}]: score {score:g}"))
        elif finder is not None and (reason := _file_problem(root / image)):
            skipped.append(Skip(row.image, finder.explain(image, reason)))
        else:
            records.append(Record(image=image, mos=to_mos(score, (lo, hi), lower_better), raw=score,
                                  ref=row.ref, distortion=row.distortion, level=row.level,
                                  official=row.official))
            kept.add(image)
    return Dataset(name=name, root=root, records=records, skipped=skipped, raw_range=(lo, hi),
                   lower_better=lower_better, dropped=dropped)


def _conflicts(images: list[str | None], scores: list[float | None]) -> dict[str, str]:
    """{image: reason} for the images listed with two or more different scores."""
    seen: dict[str, list[float]] = {}
    for image, score in zip(images, scores):
        if image is not None and score is not None:
            seen.setdefault(image, []).append(score)
    return {image: (f"conflicting scores: listed {len(values)} times, with "
                    f"{', '.join(f'{v:g}' for v in values)} (none used: which is right is unknown)")
            for image, values in seen.items() if len(set(values)) > 1}


def _widened(name: str, scores: list[float | None], lo: float, hi: float) -> tuple[float, float]:
    """The nominal range widened to the scores within a quarter of it beyond either end (said in the log)."""
    slack = 0.25 * (hi - lo)
    near = [s for s in scores if s is not None and lo - slack <= s <= hi + slack]
    if not near or (min(near) >= lo and max(near) <= hi):
        return lo, hi
    outside = sum(not lo <= s <= hi for s in near)
    wide = min(lo, min(near)), max(hi, max(near))
    log.warning("%s: %d scores lie a little outside the nominal range [%g, %g]: the 1..5 mapping uses [%g, %g] "
                "(not clipped)", name, outside, lo, hi, *wide)
    return wide


class _CaseFinder:
    """Finds a listed file whose name on disk differs in case only (`1.JPG` listed as `1.jpg`; `TestImage/`
    as `testimage/`), one folder listing at a time, read only for names not found as written."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._listings: dict[str, dict[str, list[str]]] = {}

    def _listing(self, folder: str) -> dict[str, list[str]]:
        if folder not in self._listings:
            names: dict[str, list[str]] = {}
            try:
                for entry in os.scandir(self.root / folder if folder else self.root):
                    names.setdefault(entry.name.lower(), []).append(entry.name)
            except OSError:
                pass
            self._listings[folder] = names
        return self._listings[folder]

    def resolve(self, image: str) -> str | None:
        """`image` spelled as on disk: as written where that exists, else the one name equal but for case
        (per path component); as written where none or several are. None where the match escapes the root."""
        if os.path.lexists(self.root / image):
            return image
        parts: list[str] = []
        for part in image.split("/"):
            folder = "/".join(parts)
            if not os.path.lexists(self.root / folder / part):
                matches = self._listing(folder).get(part.lower(), [])
                if len(matches) != 1:
                    return image
                part = matches[0]
            parts.append(part)
        return inside(self.root, "/".join(parts))

    def explain(self, image: str, reason: str) -> str:
        """`reason`, with why where the file is there under a name in another case or not in UTF-8."""
        if reason != "file not found":
            return reason
        folder, _, name = image.rpartition("/")
        listing = self._listing(folder)
        if len(listing.get(name.lower(), [])) > 1:
            return (f"{reason} as written; {' and '.join(listing[name.lower()])} differ from it in case only: "
                    "which is meant is unknown")
        for names in listing.values():
            for actual in names:
                raw = os.fsencode(actual)
                try:
                    raw.decode("utf-8")
                    continue  # a UTF-8 name
                except UnicodeDecodeError:
                    pass
                if any(raw.decode(codec, "replace").lower() == name.lower() for codec in ("cp1252", "latin-1")):
                    return (f"{reason} under this UTF-8 name: the file on disk is named {raw!r}, not UTF-8; "
                            f"rename it to UTF-8 (e.g. convmv -f cp1252 -t utf8)")
        return reason


def _file_problem(path: Path) -> str | None:
    try:
        stat = path.stat()
    except OSError:
        return "file not found"
    if not path.is_file():
        return "not a file"
    if stat.st_size == 0:
        return "empty file (0 bytes)"
    return None


def write_skipped(path: str | os.PathLike, skipped: Iterable[Skip]) -> Path:
    """`skipped.csv`: image, reason (atomic). A file name that is not UTF-8 goes out as its bytes, as
    `score`'s CSV writes it (runtime/output.py), so the row names the file the user has."""
    import io as _io

    from kdiqa_edge.io import write_bytes

    buffer = _io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", "reason"])
    for skip in skipped:
        writer.writerow([skip.image, skip.reason])
    return write_bytes(path, buffer.getvalue().encode("utf-8", "surrogateescape"))


def skip_summary(skipped: list[Skip]) -> str:
    """'3 skipped: 2 file not found, 1 empty file (0 bytes)' (reasons grouped by their first words)."""
    if not skipped:
        return "0 skipped"
    counts: dict[str, int] = {}
    for skip in skipped:
        key = skip.reason.split(" (")[0].split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    parts = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    return f"{len(skipped)} skipped: {parts}"


def require_usable(dataset: Dataset, strict: bool, what: str = "") -> Dataset:
    """An empty dataset is an error; with `strict`, so is any skip."""
    where = f" ({what})" if what else ""
    if strict and dataset.skipped:
        first = dataset.skipped[0]
        raise DataError(f"--strict: {skip_summary(dataset.skipped)}{where}; first: {first.image}: {first.reason}")
    if not dataset.records:
        detail = ""
        if dataset.skipped:
            first = dataset.skipped[0]
            detail = f"; {skip_summary(dataset.skipped)}; first: {first.image}: {first.reason}"
        raise DataError(f"dataset {dataset.name!r} at {dataset.root} has no usable image{detail}")
    return dataset
