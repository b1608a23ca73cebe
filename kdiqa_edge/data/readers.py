"""Dataset readers, one per dataset, each reading the root exactly as its authors distribute it.

A reader is `reader(spec, root) -> Dataset`: it parses the score file into `Row`s and hands them to
`build_dataset`, which validates scores and paths and normalizes the MOS to 1..5 (higher = better).
Layouts, ranges and directions: shared/datasets.md.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable
from pathlib import Path

from kdiqa_edge.data.records import Dataset, Row, build_dataset, require_usable
from kdiqa_edge.data.spec import DatasetSpec
from kdiqa_edge.errors import ConfigError, DataError
from kdiqa_edge.registry import Registry

Reader = Callable[[DatasetSpec, Path], Dataset]
DATASETS: Registry[Reader] = Registry("dataset")


def load_dataset(spec: DatasetSpec) -> Dataset:
    """Read, validate and normalize a dataset. Bad entries are skipped (with reasons) unless `spec.strict`."""
    reader = DATASETS.get(spec.name)
    dataset = reader(spec, dataset_root(spec))
    return require_usable(dataset, spec.strict)


def dataset_root(spec: DatasetSpec) -> Path:
    if spec.root is None:
        if spec.name == "synthetic":
            from kdiqa_edge.data.synthetic import default_root

            return default_root()
        if spec.name == "csv" and spec.csv is not None:
            return Path(spec.csv).parent
        raise ConfigError(f"dataset {spec.name!r} needs --root (the dataset folder as distributed)")
    root = Path(spec.root).expanduser()
    if not root.exists():
        raise DataError(f"dataset root not found: {root}")
    if not root.is_dir():
        raise DataError(f"dataset root is not a folder: {root}")
    return root


def score_file(path: Path, what: str) -> Path:
    """The score file, or a one-line error saying which file the layout expects."""
    if not path.is_file():
        raise DataError(f"{what} score file not found: {path}")
    return path


def read_csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a CSV (comma, semicolon or tab; UTF-8 with or without BOM, else Latin-1).

    European CSVs (`;` or tab between fields, a comma as the decimal mark) parse: in a file not delimited
    by commas, a cell that is a number with one decimal comma (`3,5`) reads as `3.5`.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        text = path.read_text(encoding="latin-1")
    except OSError as exc:
        raise DataError(f"cannot read score file {path}: {exc}") from None
    if not text.strip():
        raise DataError(f"score file is empty: {path}")
    delimiter = _delimiter(text)
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    rows = list(reader)
    if delimiter != ",":
        rows = [{k: _decimal_point(v) for k, v in row.items()} for row in rows]
    return header, rows


def _delimiter(text: str) -> str:
    """The delimiter the header line uses (names hold no decimal commas), else csv.Sniffer's guess."""
    header = next(line for line in text.splitlines() if line.strip())
    counts = {d: header.count(d) for d in (",", ";", "\t")}
    most = max(counts.values())
    if most and list(counts.values()).count(most) == 1:
        return max(counts, key=counts.get)
    try:
        return csv.Sniffer().sniff(text[:4096], delimiters=",;\t").delimiter
    except csv.Error:
        return ","


_DECIMAL_COMMA = re.compile(r"^\s*[+-]?\d+,\d+\s*$")


def _decimal_point(value):
    return value.replace(",", ".") if isinstance(value, str) and _DECIMAL_COMMA.match(value) else value


def _need_columns(path: Path, header: list[str], *columns: str) -> None:
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"{path} has no column {', '.join(map(repr, missing))}; it has: {', '.join(header)}")


def _int_or_none(value: object) -> int | None:
    try:
        return int(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


@DATASETS.register("csv")
def read_csv(spec: DatasetSpec, root: Path) -> Dataset:
    """Any CSV: the user names the image and score columns, the nominal range and the direction."""
    path = _beside(root, spec.csv) if spec.csv is not None else root / "scores.csv"
    header, table = read_csv_rows(score_file(path, "csv"))
    _need_columns(path, header, spec.image_col, spec.mos_col, *([spec.ref_col] if spec.ref_col else []))
    image_root = _beside(root, spec.image_dir) if spec.image_dir is not None else root
    if not image_root.is_dir():
        raise DataError(f"image folder not found: {image_root}")
    has = set(header)
    rows = [
        Row(image=(row.get(spec.image_col) or "").strip(), raw=row.get(spec.mos_col),
            ref=(row.get(spec.ref_col) or None) if spec.ref_col else None,
            distortion=(row.get("distortion") or None) if "distortion" in has else None,
            level=_int_or_none(row.get("level")) if "level" in has else None)
        for row in table
    ]
    return build_dataset("csv", image_root, rows, spec.mos_range or (1.0, 5.0), spec.lower_better,
                         range_hint="" if spec.mos_range else " (the default; --mos-range LO,HI sets it)")


def _beside(root: Path, path: Path) -> Path:
    """A user path: as given (absolute, or relative to the working dir), else relative to the root."""
    path = Path(path).expanduser()
    if path.is_absolute() or path.exists() or not (root / path).exists():
        return path
    return root / path


@DATASETS.register("synthetic")
def read_synthetic(spec: DatasetSpec, root: Path) -> Dataset:
    """The built-in set (`kdiqa-edge data synth`): scores.csv with image, mos (1..5), ref, distortion, level."""
    path = root / "scores.csv"
    header, table = read_csv_rows(score_file(path, "synthetic"))
    _need_columns(path, header, "image", "mos", "ref")
    rows = [Row(image=row["image"], raw=row["mos"], ref=row["ref"] or None, distortion=row.get("distortion"),
                level=_int_or_none(row.get("level"))) for row in table]
    return build_dataset("synthetic", root, rows, (1.0, 5.0))
