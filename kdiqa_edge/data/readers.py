"""Dataset readers, one per dataset, each reading the root exactly as its authors distribute it.

A reader is `reader(spec, root) -> Dataset`: it parses the score file into `Row`s and hands them to
`build_dataset`, which validates scores and paths and normalizes the MOS to 1..5 (higher = better).
Layouts, ranges and directions: shared/datasets.md.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from kdiqa_edge.data.records import Dataset, Row, build_dataset, parse_score, require_usable
from kdiqa_edge.data.spec import DatasetSpec
from kdiqa_edge.errors import ConfigError, DataError
from kdiqa_edge.registry import Registry

Reader = Callable[[DatasetSpec, Path], Dataset]
DATASETS: Registry[Reader] = Registry("dataset")
CSV_DEFAULT_RANGE = (1.0, 5.0)  # the csv reader's nominal range when --mos-range is not given


def load_dataset(spec: DatasetSpec) -> Dataset:
    """Read, validate and normalize a dataset. Bad entries are skipped (with reasons) unless `spec.strict`."""
    reader = DATASETS.get(spec.name)
    dataset = reader(spec, dataset_root(spec))
    return require_usable(dataset, spec.strict)


# Where each dataset's layout keeps its pristine reference images, one per content, named by the records'
# `ref` (shared/datasets.md): refs/r00.png, KADID-10k's images/I01.png, LIVE's refimgs/<refname>.bmp, CSIQ's
# src_imgs/<image>.png, TID2013's reference_images/I01.BMP. KonIQ, SPAQ and CLIVE have none; a csv set's
# layout is the user's, unknown.
REFERENCE_FOLDERS = {"synthetic": "refs", "kadid": "images", "live": "refimgs", "csiq": "src_imgs",
                     "tid2013": "reference_images"}


def reference_files(dataset: Dataset, refs: Iterable[str]) -> dict[str, list[Path]]:
    """{ref: its reference image file(s)} for those of `refs` the dataset's layout holds: a file of the
    reference folder whose name, less its suffix, is the ref id, matched case-insensitively (TID2013 writes
    I01.BMP and i25.bmp). Empty for a layout without reference images or where the folder is missing."""
    name = REFERENCE_FOLDERS.get(dataset.name)
    if name is None:
        return {}
    try:
        files = _listing(Path(dataset.root), name)
    except OSError:
        return {}
    folder = Path(dataset.root) / files.pop("")
    wanted = {ref.lower(): ref for ref in refs}
    found: dict[str, list[Path]] = {}
    for actual in sorted(files.values()):
        ref = wanted.get(Path(actual).stem.lower())
        if ref is not None and (folder / actual).is_file():
            found.setdefault(ref, []).append(folder / actual)
    return found


def _listing(parent: Path, folder: str) -> dict[str, str]:
    """{lower-case file name: actual name} of parent/folder (folder matched case-insensitively too);
    the key '' holds the folder's actual name."""
    actual = folder
    if parent.is_dir() and not (parent / folder).is_dir():
        actual = next((p.name for p in parent.iterdir() if p.is_dir() and p.name.lower() == folder.lower()), folder)
    directory = parent / actual
    files = {p.name.lower(): p.name for p in directory.iterdir()} if directory.is_dir() else {}
    files[""] = actual
    return files


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
    # a file object, not lines: a quoted field may hold a line break (a comment column)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        rows = list(reader)
    except csv.Error as exc:
        raise DataError(f"cannot parse score file {path}: {exc}") from None
    if delimiter != ",":
        rows = [{k: _decimal_point(v) for k, v in row.items()} for row in rows]
    return header, rows


def row_problem(row: dict, header: list[str]) -> str | None:
    """Why a CSV row cannot be trusted as read, else None: more fields than the header names (an unquoted
    comma in a name, or `3,5` for 3.5 in a comma-delimited file) shifts every value after it, so none is
    used. Empty extra fields (a trailing delimiter) are harmless."""
    extra = [v for v in row.get(None) or [] if v and v.strip()]
    if not extra:
        return None
    fields = len(header) + len(row[None])
    return (f"row has {fields} fields, the header {len(header)} (extra: {', '.join(map(repr, extra))}): its values "
            "may be shifted; quote a field that holds the delimiter")


def cell(row: dict, column: str) -> str:
    """A CSV cell as stripped text; '' where the row ends before it."""
    return (row.get(column) or "").strip()


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
        Row(image=cell(row, spec.image_col), raw=row.get(spec.mos_col),
            ref=(cell(row, spec.ref_col) or None) if spec.ref_col else None,
            distortion=(row.get("distortion") or None) if "distortion" in has else None,
            level=_int_or_none(row.get("level")) if "level" in has else None, problem=row_problem(row, header))
        for row in table
    ]
    if spec.mos_range is None:
        _check_default_range(path, spec.mos_col, rows)
    return build_dataset("csv", image_root, rows, spec.mos_range or CSV_DEFAULT_RANGE, spec.lower_better)


def _check_default_range(path: Path, column: str, rows: list[Row]) -> None:
    """Ratings outside the default 1..5 are another scale, not bad rows: without an explicit --mos-range
    they are an error, never skipped (skipping would drop the lowest- or highest-quality images, silently).
    With --mos-range, a score outside it is a bad row, skipped and reported."""
    scores = [score for score in (parse_score(row.raw) for row in rows if not row.problem) if score is not None]
    lo, hi = CSV_DEFAULT_RANGE
    outside = sum(not lo <= score <= hi for score in scores)
    if outside:
        raise DataError(f"{path}: {column} holds ratings {min(scores):g}..{max(scores):g}, outside the default "
                        f"range {lo:g}..{hi:g} ({outside} of {len(scores)} rows): pass --mos-range LO,HI with "
                        f"the scale of your ratings")


def _beside(root: Path, path: Path) -> Path:
    """A user path: as given (absolute, or relative to the working dir), else relative to the root."""
    path = Path(path).expanduser()
    if path.is_absolute() or path.exists() or not (root / path).exists():
        return path
    return root / path


def absolute_spec(spec: DatasetSpec, bases: Sequence[Path] = ()) -> DatasetSpec:
    """The spec with its paths absolute and resolved, each where the readers would find it, as a run records
    it (valid from any folder), with the csv reader's rule below.

    Relative paths are taken from the first of `bases`, then the current folder, that holds the root (or
    the score file, for a csv set without a root): a resumed run's recorded folder first. There, a score
    file or image folder that is not under that folder but under the root is the root's, as `_beside`
    reads `--csv labels.csv` beside `--root set`.
    """
    fields = {"root": spec.root, "csv": spec.csv, "image_dir": spec.image_dir}
    paths = {name: Path(value).expanduser() for name, value in fields.items() if value is not None}
    if all(path.is_absolute() for path in paths.values()):
        return dataclasses.replace(spec, **{name: path.resolve() for name, path in paths.items()})
    anchor = paths.get("root") or paths.get("csv") or paths.get("image_dir")
    base = Path(next((b for b in [*bases, Path.cwd()] if (Path(b) / anchor).exists()), Path.cwd()))
    root = (base / paths["root"]).resolve() if "root" in paths else None

    def place(path: Path) -> Path:
        if path.is_absolute() or (base / path).exists() or root is None or not (root / path).exists():
            return (base / path).resolve()
        return (root / path).resolve()

    return dataclasses.replace(spec, **{name: place(path) if name != "root" else root
                                        for name, path in paths.items()})


@DATASETS.register("synthetic")
def read_synthetic(spec: DatasetSpec, root: Path) -> Dataset:
    """The built-in set (`kdiqa-edge data synth`): scores.csv with image, mos (1..5), ref, distortion, level."""
    path = root / "scores.csv"
    header, table = read_csv_rows(score_file(path, "synthetic"))
    _need_columns(path, header, "image", "mos", "ref")
    rows = [Row(image=cell(row, "image"), raw=row.get("mos"), ref=cell(row, "ref") or None,
                distortion=row.get("distortion"), level=_int_or_none(row.get("level")),
                problem=row_problem(row, header)) for row in table]
    return build_dataset("synthetic", root, rows, (1.0, 5.0))
