"""Readers for the public IQA datasets, each taking the root folder exactly as its authors distribute it.

Layouts, nominal ranges and directions are in shared/datasets.md; each reader's docstring names its files.
SPAQ and CSIQ ship Excel sheets (openpyxl), LIVE and CLIVE MATLAB files (scipy.io).
"""

from __future__ import annotations

import re
from pathlib import Path

from kdiqa_edge.data.readers import (
    DATASETS,
    _decimal_point,
    _int_or_none,
    _listing,
    _need_columns,
    cell,
    read_csv_rows,
    row_problem,
    score_file,
)
from kdiqa_edge.data.records import Dataset, Row, build_dataset
from kdiqa_edge.data.spec import DatasetSpec
from kdiqa_edge.errors import DataError, require

# LIVE release 2: the 982 entries of dmos.mat are the folders in this order, img1.. restarting in each.
LIVE_FOLDERS = (("jp2k", 227), ("jpeg", 233), ("wn", 174), ("gblur", 174), ("fastfading", 174))
# CSIQ: dst_type in the sheet -> folder under dst_imgs/ (file names spell the type as the folder does,
# in varying case: AWGN, JPEG, jpeg2000, fnoise, BLUR, contrast).
CSIQ_FOLDERS = {"noise": "awgn", "awgn": "awgn", "jpeg": "jpeg", "jpeg 2000": "jpeg2000", "jpeg2000": "jpeg2000",
                "fnoise": "fnoise", "blur": "blur", "contrast": "contrast"}
# the 7 training images (trainingImages/t1..t7.bmp) lead CLIVE's lists and are left out by convention, by name
CLIVE_TRAINING_NAME = re.compile(r"(^|/)t[1-7]\.bmp$", re.IGNORECASE)


@DATASETS.register("koniq")
def read_koniq(spec: DatasetSpec, root: Path) -> Dataset:
    """KonIQ-10k: koniq10k_scores_and_distributions.csv, images in 1024x768/ (or 512x384/).

    Uses MOS_zscore (0..100, what most papers use) when present, else MOS (1..5). The official split
    comes from koniq10k_distributions_sets.csv when that file is there.
    """
    path = score_file(root / "koniq10k_scores_and_distributions.csv", "KonIQ-10k")
    header, table = read_csv_rows(path)
    _need_columns(path, header, "image_name")
    column, raw_range = ("MOS_zscore", (0.0, 100.0)) if "MOS_zscore" in header else ("MOS", (1.0, 5.0))
    _need_columns(path, header, column)
    images = _first_dir(root, "1024x768", "512x384")
    sets = _koniq_sets(root / "koniq10k_distributions_sets.csv")
    rows = [Row(image=f"{images}/{cell(row, 'image_name')}", raw=row.get(column),
                official=sets.get(cell(row, "image_name")), problem=row_problem(row, header)) for row in table]
    return build_dataset("koniq", root, rows, raw_range)


def _koniq_sets(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    header, table = read_csv_rows(path)
    _need_columns(path, header, "image_name", "set")
    return {cell(row, "image_name"): cell(row, "set") for row in table if not row_problem(row, header)}


@DATASETS.register("spaq")
def read_spaq(spec: DatasetSpec, root: Path) -> Dataset:
    """SPAQ: Annotations/MOS and Image attribute scores.xlsx (Image name, MOS 0..100), images in TestImage/."""
    path = score_file(root / "Annotations" / "MOS and Image attribute scores.xlsx", "SPAQ")
    table = read_xlsx(path, required=("Image name", "MOS"))
    images = _first_dir(root, "TestImage")
    rows = [Row(image=f"{images}/{_cell_text(row['Image name'])}", raw=row["MOS"]) for row in table]
    return build_dataset("spaq", root, rows, (0.0, 100.0))


@DATASETS.register("live")
def read_live(spec: DatasetSpec, root: Path) -> Dataset:
    """LIVE release 2: dmos.mat (dmos, orgs), refnames_all.mat; <folder>/img<k>.bmp. DMOS: lower is better.

    Entries with orgs == 1 are copies of the references and are dropped, as everyone does.
    """
    dmos_mat = load_mat(score_file(root / "dmos.mat", "LIVE"))
    refs_mat = load_mat(score_file(root / "refnames_all.mat", "LIVE"))
    dmos, orgs = _mat_vector(dmos_mat, "dmos", root / "dmos.mat"), _mat_vector(dmos_mat, "orgs", root / "dmos.mat")
    refnames = mat_strings(_mat_field(refs_mat, "refnames_all", root / "refnames_all.mat"))
    expected = sum(n for _, n in LIVE_FOLDERS)
    if not len(dmos) == len(orgs) == len(refnames) == expected:
        raise DataError(f"LIVE: dmos/orgs/refnames_all have {len(dmos)}/{len(orgs)}/{len(refnames)} entries; "
                        f"release 2 has {expected}")
    names = [(folder, k) for folder, count in LIVE_FOLDERS for k in range(1, count + 1)]
    rows, dropped = [], 0
    for (folder, k), score, original, ref in zip(names, dmos, orgs, refnames):
        if int(original) == 1:
            dropped += 1
            continue
        rows.append(Row(image=f"{folder}/img{k}.bmp", raw=float(score), ref=Path(ref).stem, distortion=folder))
    return build_dataset("live", root, rows, (0.0, 100.0), lower_better=True, hard_range=False, dropped=dropped)


@DATASETS.register("csiq")
def read_csiq(spec: DatasetSpec, root: Path) -> Dataset:
    """CSIQ: csiq.DMOS.xlsx sheet all_by_image (header row 4: image, dst_idx, dst_type, dst_lev, dmos_std,
    dmos); dst_imgs/<type>/<image>.<TYPE>.<lev>.png, matched case-insensitively. DMOS 0..1, lower is better.
    """
    path = score_file(root / "csiq.DMOS.xlsx", "CSIQ")
    table = read_xlsx(path, sheet="all_by_image", required=("image", "dst_type", "dst_lev", "dmos"))
    listings: dict[str, dict[str, str]] = {}
    rows = []
    for row in table:
        image, kind, level = _cell_text(row["image"]), _cell_text(row["dst_type"]).lower(), _int_or_none(row["dst_lev"])
        if not image and not kind:
            continue  # trailing blank rows
        folder = CSIQ_FOLDERS.get(kind, kind.replace(" ", ""))
        if folder not in listings:
            listings[folder] = _listing(root / "dst_imgs", folder)
        actual_folder, files = listings[folder].get("", folder), listings[folder]
        name = f"{image}.{folder}.{level}.png"
        rows.append(Row(image=f"dst_imgs/{actual_folder}/{files.get(name.lower(), name)}", raw=row["dmos"],
                        ref=image, distortion=kind, level=level))
    return build_dataset("csiq", root, rows, (0.0, 1.0), lower_better=True, hard_range=False)


@DATASETS.register("kadid")
def read_kadid(spec: DatasetSpec, root: Path) -> Dataset:
    """KADID-10k: dmos.csv (dist_img, ref_img, dmos 1..5 — higher is better despite the name), images/."""
    path = score_file(root / "dmos.csv", "KADID-10k")
    header, table = read_csv_rows(path)
    _need_columns(path, header, "dist_img", "ref_img", "dmos")
    rows = []
    for row in table:
        name = cell(row, "dist_img")
        parts = Path(name).stem.split("_")  # I01_01_01: reference, distortion type, level
        ref = Path(cell(row, "ref_img")).stem or (parts[0] if len(parts) == 3 else "")
        rows.append(Row(image=f"images/{name}", raw=row.get("dmos"), ref=ref or None,
                        distortion=parts[1] if len(parts) == 3 else None,
                        level=_int_or_none(parts[2]) if len(parts) == 3 else None, problem=row_problem(row, header)))
    return build_dataset("kadid", root, rows, (1.0, 5.0))


@DATASETS.register("clive")
def read_clive(spec: DatasetSpec, root: Path) -> Dataset:
    """LIVE In the Wild: Data/AllImages_release.mat, Data/AllMOS_release.mat (0..100); images in Images/.

    The 7 training images (trainingImages/t1..t7.bmp, the lists' first entries) are dropped by convention:
    by name, so a list without them loses no rated image.
    """
    images_path = score_file(root / "Data" / "AllImages_release.mat", "CLIVE")
    mos_path = score_file(root / "Data" / "AllMOS_release.mat", "CLIVE")
    names = mat_strings(_mat_field(load_mat(images_path), "AllImages_release", images_path))
    mos = _mat_vector(load_mat(mos_path), "AllMOS_release", mos_path)
    if len(names) != len(mos):
        raise DataError(f"CLIVE: {len(names)} image names but {len(mos)} scores")
    kept = [(name, score) for name, score in zip(names, mos) if not CLIVE_TRAINING_NAME.search(name.replace("\\", "/"))]
    rows = [Row(image=f"Images/{name}", raw=score) for name, score in kept]
    return build_dataset("clive", root, rows, (0.0, 100.0), dropped=len(names) - len(kept))


@DATASETS.register("tid2013")
def read_tid2013(spec: DatasetSpec, root: Path) -> Dataset:
    """TID2013: mos_with_names.txt ('<mos> <name>' lines, 0..9), distorted_images/ (names in any case).

    The score and the name may be separated by any run of spaces or tabs; a decimal comma reads as a point.
    """
    path = score_file(root / "mos_with_names.txt", "TID2013")
    files = _listing(root, "distorted_images")
    folder = files.get("", "distorted_images")
    rows = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        fields = line.split(None, 1)
        if not fields:
            continue
        if len(fields) < 2:
            rows.append(Row(image=f"{path.name} line {number}", raw=None,
                            problem=f"malformed line {line.strip()!r}: expected '<mos> <name>'"))
            continue
        score, name = _decimal_point(fields[0]), fields[1].strip()
        stem = Path(name).stem.split("_")  # i01_01_1: reference, distortion type, level
        rows.append(Row(image=f"{folder}/{files.get(name.lower(), name)}", raw=score,
                        ref=stem[0].upper() if stem[0] else None,
                        distortion=stem[1] if len(stem) == 3 else None,
                        level=_int_or_none(stem[2]) if len(stem) == 3 else None))
    return build_dataset("tid2013", root, rows, (0.0, 9.0))


# -- file formats -----------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    """A text score file: UTF-8 with or without a BOM, else Latin-1 (as `read_csv_rows`)."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        return path.read_text(encoding="latin-1")
    except OSError as exc:
        raise DataError(f"cannot read score file {path}: {exc}") from None


def read_xlsx(path: Path, sheet: str | None = None, required: tuple[str, ...] = ()) -> list[dict[str, object]]:
    """Rows of an Excel sheet as dicts, keyed by the first row (within the first 20) that names `required`.

    The header may sit below a title block and right of empty columns (CSIQ: row 4, columns D..I).
    """
    openpyxl = require("openpyxl", "train")
    try:
        workbook = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as exc:  # noqa: BLE001 - openpyxl raises many types for a bad file
        raise DataError(f"cannot read spreadsheet {path}: {exc}") from None
    try:
        if sheet is not None and sheet not in workbook.sheetnames:
            raise DataError(f"{path} has no sheet {sheet!r}; it has: {', '.join(workbook.sheetnames)}")
        rows = workbook[sheet] if sheet is not None else workbook.worksheets[0]
        values = [list(row) for row in rows.iter_rows(values_only=True)]
    finally:
        workbook.close()
    for index, row in enumerate(values[:20]):
        names = [_cell_text(v) for v in row]
        if all(r in names for r in required):
            columns = {name: col for col, name in enumerate(names) if name}
            return [{name: (_decimal_point(row[col]) if col < len(row) else None) for name, col in columns.items()}
                    for row in values[index + 1:] if any(v is not None and _cell_text(v) for v in row)]
    raise DataError(f"{path}: no header row with the columns {', '.join(required)}")


def load_mat(path: Path) -> dict:
    scipy_io = require("scipy.io", "train")
    try:
        return scipy_io.loadmat(path)
    except NotImplementedError:  # MATLAB v7.3 files are HDF5
        raise DataError(f"{path} is a MATLAB v7.3 (HDF5) file; re-save it with MATLAB's -v7 option") from None
    except Exception as exc:  # noqa: BLE001 - scipy raises many types for a corrupt .mat
        raise DataError(f"cannot read MATLAB file {path}: {exc}") from None


def _mat_field(mat: dict, name: str, path: Path):
    if name not in mat:
        fields = [k for k in mat if not k.startswith("__")]
        raise DataError(f"{path} has no variable {name!r}; it has: {', '.join(fields)}")
    return mat[name]


def _mat_vector(mat: dict, name: str, path: Path) -> list[float]:
    import numpy as np

    try:
        return [float(v) for v in np.asarray(_mat_field(mat, name, path), dtype=np.float64).ravel()]
    except (TypeError, ValueError):
        raise DataError(f"{path}: {name!r} is not an array of numbers") from None


def mat_strings(value) -> list[str]:
    """A MATLAB cell array of strings (any shape) as a flat list of str."""
    import numpy as np

    out = []
    for item in np.asarray(value, dtype=object).ravel():
        while isinstance(item, np.ndarray):
            item = item.ravel()[0] if item.size else ""
        out.append(str(item).strip())
    return out


def _cell_text(value: object) -> str:
    """Spreadsheet cell as text: 1600.0 -> '1600', None -> ''."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _first_dir(root: Path, *names: str) -> str:
    for name in names:
        if (root / name).is_dir():
            return name
    raise DataError(f"image folder not found: {root / names[0]}" + (f" (nor {', '.join(names[1:])})" if names[1:] else ""))
