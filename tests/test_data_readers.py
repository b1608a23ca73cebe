"""Every dataset reader on a tiny copy of its official layout, written here; checked through `data index`.

The layouts follow shared/datasets.md: the same file names, sheets, MATLAB variables and folder
conventions as the distributed datasets, with a handful of images instead of thousands.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.stats import spearmanr
from typer.testing import CliRunner

from kdiqa_edge.cli import app
from kdiqa_edge.data import DATASETS, DatasetSpec, load_dataset, make_split

runner = CliRunner()


def _image(path: Path, fmt: str | None = None, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)


def _csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _xlsx(path: Path, sheet: str, rows: list[list], start_row: int = 1, start_col: int = 1) -> None:
    import openpyxl

    path.parent.mkdir(parents=True, exist_ok=True)
    workbook = openpyxl.Workbook()
    worksheet = workbook.active
    worksheet.title = sheet
    for r, row in enumerate(rows):
        for c, value in enumerate(row):
            worksheet.cell(row=start_row + r, column=start_col + c, value=value)
    workbook.save(path)


def _cell(strings: list[str], shape: tuple[int, int]) -> np.ndarray:
    cell = np.empty(shape, dtype=object)
    for i, text in enumerate(strings):
        cell.flat[i] = text
    return cell


# Each builder writes a tiny official layout and returns (expected count, lower_better, extra CLI args).

def koniq(root: Path):
    names = [f"{1000 + i}.jpg" for i in range(6)]
    zscores = [71.2, 55.0, 33.3, 80.1, 12.5, 64.9]
    _csv(root / "koniq10k_scores_and_distributions.csv",
         ["image_name", "c1", "c2", "c3", "c4", "c5", "c_total", "MOS", "SD", "MOS_zscore"],
         [[n, 1, 2, 30, 40, 27, 100, 1 + z / 25, 0.6, z] for n, z in zip(names, zscores)])
    _csv(root / "koniq10k_distributions_sets.csv",
         ["image_name", "c1", "c2", "c3", "c4", "c5", "c_total", "MOS", "SD", "set"],
         [[n, 1, 2, 30, 40, 27, 100, z, 0.6, s] for n, z, s in
          zip(names, zscores, ["training"] * 4 + ["validation", "test"])])
    for i, name in enumerate(names):
        _image(root / "1024x768" / name, seed=i)
    return 6, False, []


def spaq(root: Path):
    scores = [42.0, 77.5, 12.0, 95.0, 60.25]
    header = ["Image name", "MOS", "Brightness", "Colorfulness", "Contrast", "Noisiness", "Sharpness"]
    _xlsx(root / "Annotations" / "MOS and Image attribute scores.xlsx", "Sheet1",
          [header] + [[f"{i + 1:05d}.jpg", s, 50, 50, 50, 50, 50] for i, s in enumerate(scores)])
    for i in range(len(scores)):
        _image(root / "TestImage" / f"{i + 1:05d}.jpg", seed=i)
    return 5, False, []


def live(root: Path):
    from scipy.io import savemat

    from kdiqa_edge.data.official import LIVE_FOLDERS

    total = sum(n for _, n in LIVE_FOLDERS)
    rng = np.random.default_rng(0)
    dmos = rng.uniform(5, 95, total)
    orgs = np.zeros(total)
    orgs[::25] = 1  # reference copies, dropped
    dmos[orgs == 1] = 0
    dmos[3] = 103.5  # LIVE's realigned DMOS runs a little past 100: kept, not skipped
    savemat(root / "dmos.mat", {"dmos": dmos[None, :], "orgs": orgs[None, :]})
    refs = [f"ref{i % 29}.bmp" for i in range(total)]
    savemat(root / "refnames_all.mat", {"refnames_all": _cell(refs, (1, total))})
    for folder, count in LIVE_FOLDERS:
        (root / folder).mkdir()
        for k in range(1, count + 1):
            Image.new("RGB", (4, 4), (k % 256, 0, 0)).save(root / folder / f"img{k}.bmp")
    return total - int(orgs.sum()), True, []


def csiq(root: Path):
    entries = [(1600, "noise", 1, 0.061, "awgn", "AWGN"), (1600, "jpeg 2000", 3, 0.402, "jpeg2000", "jpeg2000"),
               ("bridge", "blur", 5, 0.733, "blur", "BLUR"), ("bridge", "jpeg", 2, 0.154, "jpeg", "JPEG"),
               ("snow", "contrast", 4, 0.289, "contrast", "contrast"), ("snow", "fnoise", 2, 0.118, "fnoise", "fnoise")]
    header = ["image", "dst_idx", "dst_type", "dst_lev", "dmos_std", "dmos"]
    rows = [header] + [[image, i + 1, kind, level, 0.05, dmos] for i, (image, kind, level, dmos, _, _) in
                       enumerate(entries)]
    _xlsx(root / "csiq.DMOS.xlsx", "all_by_image", rows, start_row=4, start_col=4)  # header at D4
    for image, _, level, _, folder, token in entries:
        _image(root / "dst_imgs" / folder / f"{image}.{token}.{level}.png", fmt="PNG")
    for image in ("1600", "bridge", "snow"):
        _image(root / "src_imgs" / f"{image}.png")
    return len(entries), True, []


def kadid(root: Path):
    rows, k = [], 0
    for ref in (1, 2):
        for kind in (1, 7):
            for level in (1, 3, 5):
                k += 1
                name = f"I{ref:02d}_{kind:02d}_{level:02d}.png"
                rows.append([name, f"I{ref:02d}.png", round(4.8 - 0.7 * level + 0.1 * ref, 3), 0.5])
                _image(root / "images" / name, seed=k)
        _image(root / "images" / f"I{ref:02d}.png")
    _csv(root / "dmos.csv", ["dist_img", "ref_img", "dmos", "var"], rows)
    return len(rows), False, []


def clive(root: Path):
    from scipy.io import savemat

    names = [f"trainingImages/t{i}.bmp" for i in range(1, 8)] + ["3.bmp", "10.bmp", "101.bmp", "1002.bmp"]
    mos = [50.0] * 7 + [63.2, 27.9, 81.4, 45.0]
    (root / "Data").mkdir(parents=True)
    savemat(root / "Data" / "AllImages_release.mat", {"AllImages_release": _cell(names, (len(names), 1))})
    savemat(root / "Data" / "AllMOS_release.mat", {"AllMOS_release": np.array([mos])})
    savemat(root / "Data" / "AllStdDev_release.mat", {"AllStdDev_release": np.ones((1, len(names)))})
    for i, name in enumerate(names):
        _image(root / "Images" / name, fmt="BMP", seed=i)
    return 4, False, []


def tid2013(root: Path):
    entries = [("i01_01_1.bmp", 5.97), ("i01_08_5.bmp", 2.11), ("I02_03_4.BMP", 3.40), ("i02_24_2.bmp", 6.02)]
    (root / "mos_with_names.txt").write_text("".join(f"{m} {n.lower()}\n" for n, m in entries))
    for i, (name, _) in enumerate(entries):
        _image(root / "distorted_images" / name, fmt="BMP", seed=i)
    for ref in ("I01.BMP", "i02.bmp"):
        _image(root / "reference_images" / ref, fmt="BMP")
    return 4, False, []


def csv_reader(root: Path):
    rows = [[f"shots/{i}.jpg", 9.5 - i, f"scene{i // 2}"] for i in range(6)]
    _csv(root / "labels" / "dmos.csv", ["file", "score", "content"], rows)
    for i in range(6):
        _image(root / "pictures" / f"shots/{i}.jpg", seed=i)
    args = ["--csv", str(root / "labels" / "dmos.csv"), "--image-dir", str(root / "pictures"),
            "--image-col", "file", "--mos-col", "score", "--mos-range", "0,10", "--lower-better",
            "--ref-col", "content"]
    return 6, True, args


LAYOUTS = {"koniq": koniq, "spaq": spaq, "live": live, "csiq": csiq, "kadid": kadid, "clive": clive,
           "tid2013": tid2013, "csv": csv_reader}


def test_every_registered_reader_has_a_layout_test():
    assert set(DATASETS.names()) - {"synthetic"} == set(LAYOUTS)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_reader_reads_its_official_layout_through_data_index(name, tmp_path):
    root = tmp_path / name
    root.mkdir()
    count, lower_better, extra = LAYOUTS[name](root)
    out = tmp_path / "index.csv"
    result = runner.invoke(app, ["data", "index", "--dataset", name, "--root", str(root), "--out", str(out), *extra])
    assert result.exit_code == 0, result.output
    assert f"indexed {count} images" in result.output
    with open(out, newline="") as handle:
        index = list(csv.DictReader(handle))
    assert len(index) == count
    assert {"image", "mos", "raw", "ref", "split"} <= set(index[0])
    mos = np.array([float(r["mos"]) for r in index])
    raw = np.array([float(r["raw"]) for r in index])
    assert mos.min() >= 1 and mos.max() <= 5
    rho = spearmanr(mos, raw).statistic
    assert rho == pytest.approx(-1.0 if lower_better else 1.0), (mos, raw)
    dataset = load_dataset(DatasetSpec.from_cli(dataset=name, root=root, **_spec_kwargs(extra)))
    for record in dataset.records:
        assert (dataset.root / record.image).is_file() and not Path(record.image).is_absolute()
    assert not (tmp_path / "skipped.csv").exists()


def _spec_kwargs(args: list[str]) -> dict:
    kwargs, i = {}, 0
    while i < len(args):
        key = args[i][2:].replace("-", "_")
        if key == "lower_better":
            kwargs[key] = True
            i += 1
        else:
            kwargs[key] = args[i + 1]
            i += 2
    return kwargs


def test_live_drops_reference_copies_and_keeps_content_ids(tmp_path):
    count, _, _ = live(tmp_path)
    dataset = load_dataset(DatasetSpec(name="live", root=tmp_path))
    assert len(dataset) == count and dataset.dropped == 982 - count and not dataset.skipped
    first = dataset.records[0]
    assert first.image == "jp2k/img2.bmp" and first.ref == "ref1" and first.distortion == "jp2k"
    assert dataset.records[-1].image == "fastfading/img174.bmp"
    assert len(dataset.refs) == 29
    assert min(r.mos for r in dataset.records) == pytest.approx(1.0)  # the 103.5 outlier maps to 1, not out


def test_csiq_matches_type_names_case_insensitively_and_reads_numeric_names(tmp_path):
    csiq(tmp_path)
    dataset = load_dataset(DatasetSpec(name="csiq", root=tmp_path))
    images = {r.image for r in dataset.records}
    assert "dst_imgs/awgn/1600.AWGN.1.png" in images and "dst_imgs/blur/bridge.BLUR.5.png" in images
    assert {r.ref for r in dataset.records} == {"1600", "bridge", "snow"}
    by_image = {r.image: r for r in dataset.records}
    assert by_image["dst_imgs/jpeg2000/1600.jpeg2000.3.png"].level == 3


def test_koniq_official_split_and_split_by_reference_for_synthetic_sets(tmp_path):
    koniq(tmp_path / "koniq")
    dataset = load_dataset(DatasetSpec(name="koniq", root=tmp_path / "koniq"))
    assert make_split(dataset, by="official").sizes() == {"train": 4, "val": 1, "test": 1}
    assert make_split(dataset).by == "image"  # authentic set: no refs
    result = runner.invoke(app, ["data", "info", "--dataset", "koniq", "--root", str(tmp_path / "koniq"), "--json",
                                 "--split-by", "official"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["images"] == 6 and info["split"]["test"] == 1 and info["raw_range"] == [0.0, 100.0]
    kadid(tmp_path / "kadid")
    kadid_set = load_dataset(DatasetSpec(name="kadid", root=tmp_path / "kadid"))
    split = make_split(kadid_set, seed=0)
    assert split.by == "ref"
    assert not {kadid_set.records[i].ref for i in split.train} & {kadid_set.records[i].ref for i in split.test}
