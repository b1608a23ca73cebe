"""distill --unlabeled on the files an audit found a run stumbling over: a decompression bomb, a file name
that is not UTF-8, an empty or garbage tar shard, files of other types, a float TIFF, and the rated set's
own reference images (the pristine image of each test content), which must not train the student."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch")

from test_data_readers import csiq, kadid, live, tid2013

from kdiqa_edge.data import DatasetSpec, load_dataset, make_split
from kdiqa_edge.data.records import Dataset, Record
from kdiqa_edge.data.split import Split
from kdiqa_edge.data.unlabeled import build_pool, rated_hashes


def _photo(path: Path, seed: int, fmt: str | None = None) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (72, 96, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path.read_bytes()


def _bomb(path: Path) -> None:
    """A 20000 x 20000 PNG (48 KB): over twice Pillow's pixel limit, so opening it raises, not warns."""
    Image.new("1", (20000, 20000)).save(path)


def _skipped(run: Path) -> dict[str, str]:
    path = run / "unlabeled_skipped.csv"
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as handle:
        return {row["image"]: row["reason"] for row in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def bare_teacher(tmp_path_factory):
    """The tiny teacher (random init) as a bare checkpoint: no fine-tune, any split may use it."""
    import torch

    from kdiqa_edge.models import save_checkpoint
    from kdiqa_edge.models.teacher import load_teacher

    torch.manual_seed(0)
    return save_checkpoint(load_teacher("tiny"), tmp_path_factory.mktemp("teacher") / "tiny")


def _distill(small_synthetic, teacher, out: Path, *sources, extra=()) -> tuple[int, str, str]:
    """`distill --unlabeled SOURCE...` on the small synthetic set, 1 epoch: (exit code, stdout, stderr)."""
    from kdiqa_edge.cli import main

    args = ["distill", "--root", small_synthetic.root, "--teacher-checkpoint", teacher, "--student",
            "test_resnet", "--no-pretrained", "--epochs", "1", "--batch-size", "32", "--workers", "0",
            "--quiet", "--out", out, *extra]
    for source in sources:
        args += ["--unlabeled", source]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), \
            pytest.raises(SystemExit) as done:
        main([str(a) for a in args])
    return done.value.code or 0, stdout.getvalue(), stderr.getvalue()


def _shards(folder: Path) -> str:
    """web-000.tar (one image), web-001.tar (empty: a failed download), web-002.tar (not a tar), and a pattern
    naming web-003.tar too, which is missing."""
    folder.mkdir()
    data = _photo(folder / "src.jpg", 3, fmt="JPEG")
    (folder / "src.jpg").unlink()
    with tarfile.open(folder / "web-000.tar", "w") as tar:
        info = tarfile.TarInfo("0.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    (folder / "web-001.tar").write_bytes(b"")
    (folder / "web-002.tar").write_bytes(np.random.default_rng(0).bytes(3000))
    return str(folder / "web-{000..003}.tar")


@pytest.fixture(scope="module")
def messy_run(small_synthetic, bare_teacher, tmp_path_factory):
    """One distill on a folder holding a good photo, a decompression bomb and a file whose name is not UTF-8,
    and on tar shards of which one is good, one empty, one garbage and one missing: (code, out, err, run dir,
    folder, shard folder)."""
    root = tmp_path_factory.mktemp("messy")
    folder = root / "photos"
    _photo(folder / "ok.jpg", 0)
    _bomb(folder / "huge.png")
    (folder / os.fsdecode(b"bad\xff.jpg")).write_bytes(b"junk")
    shards = _shards(root / "sh")
    code, out, err = _distill(small_synthetic, bare_teacher, root / "run", folder, shards)
    return code, out, err, root / "run", folder, root / "sh"


# -- D1: a decompression bomb is a skip row, unlabeled or rated


def test_decompression_bomb_in_unlabeled_folder_is_a_skip_row(messy_run):
    code, out, err, run, folder, _ = messy_run
    assert code == 0, err
    reason = _skipped(run)[str(folder / "huge.png")]
    assert reason.startswith("decompression bomb refused: ") and "pixels" in reason
    assert "2 of 4 unlabeled images used" in out and "2 unreadable" in out  # the bomb and the junk


def test_decompression_bomb_among_rated_images_is_hashed_not_a_crash(tmp_path):
    _photo(tmp_path / "a.png", 1)
    _bomb(tmp_path / "huge.png")
    dataset = Dataset("csv", tmp_path, [Record("a.png", 3.0, 3.0), Record("huge.png", 2.0, 2.0)])
    found = rated_hashes(dataset, Split(train=[0], val=[], test=[1]))
    assert sorted(found.values()) == ["test", "train"]  # its bytes are known: a copy is still excluded


# -- D2: a file name that is not UTF-8


def test_skipped_file_name_not_utf8_is_written_as_its_bytes(messy_run):
    code, _, err, run, folder, _ = messy_run
    assert code == 0, err
    bad = str(folder / os.fsdecode(b"bad\xff.jpg"))
    assert bad.encode("utf-8", "surrogateescape") in (run / "unlabeled_skipped.csv").read_bytes()
    assert _skipped(run)[bad] == "not an image (unidentified format)"


# -- D4: an empty or garbage tar shard is a skip row, the other shards go on


def test_empty_and_garbage_tar_shards_are_skip_rows(messy_run):
    code, out, err, run, _, shards = messy_run
    assert code == 0, err
    skipped = _skipped(run)
    assert skipped[str(shards / "web-001.tar")] == "not a readable tar (empty file)"
    assert skipped[str(shards / "web-002.tar")].startswith("not a readable tar (")
    assert skipped[str(shards / "web-003.tar")] == "tar shard not found"
    assert "3 tar shards, folders or listed paths not read" in out


def test_one_source_with_nothing_usable_is_one_line_naming_why(messy_run, small_synthetic, bare_teacher,
                                                                tmp_path):
    shards = messy_run[5]
    code, _, err = _distill(small_synthetic, bare_teacher, tmp_path / "run", shards / "web-001.tar")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "no usable unlabeled image in" in err and "web-001.tar: not a readable tar (empty file)" in err


# -- D3: the reference images of test (and validation) contents stay out of the pool


def test_synthetic_references_of_test_and_val_contents_are_excluded(small_synthetic, bare_teacher, tmp_path):
    code, out, err = _distill(small_synthetic, bare_teacher, tmp_path / "run", small_synthetic.root,
                              extra=["--val-fraction", "0.2"])
    assert code == 0, err
    run = tmp_path / "run"
    split = json.loads((run / "split.json").read_text())
    dataset = load_dataset(small_synthetic)
    refs = {part: {dataset.records[i].ref for i in split[part]} for part in ("train", "val", "test")}
    assert len(refs["test"]) == len(refs["val"]) == 1 and len(refs["train"]) == 2
    skipped = _skipped(run)
    folder = Path(small_synthetic.root) / "refs"
    for ref in refs["test"]:
        assert "reference image of a rated test content" in skipped[str(folder / f"{ref}.png")]
    for ref in refs["val"]:
        assert "reference image of a rated validation content" in skipped[str(folder / f"{ref}.png")]
    for ref in refs["train"]:  # training content: usable
        assert str(folder / f"{ref}.png") not in skipped
    assert "1 reference images of rated test contents (excluded)" in out
    assert "1 reference images of rated validation contents (excluded)" in out
    summary = json.loads((run / "summary.json").read_text())["unlabeled"]
    assert (summary["test_references"], summary["val_references"], summary["used"]) == (1, 1, 2)


def _distinct_references(root: Path, folder: str, names: list[str]) -> None:
    """The layout builders write every reference from one seed; here each gets its own bytes."""
    for seed, name in enumerate(names, start=100):
        _photo(root / folder / name, seed, fmt="BMP" if name.lower().endswith(".bmp") else "PNG")


def _live(root: Path) -> None:
    live(root)
    _distinct_references(root, "refimgs", [f"ref{i}.bmp" for i in range(29)])


LAYOUTS = {
    "kadid": (kadid, "images", ["I01.png", "I02.png"]),
    "csiq": (csiq, "src_imgs", ["1600.png", "bridge.png", "snow.png"]),
    "tid2013": (tid2013, "reference_images", ["I01.BMP", "i02.bmp"]),
    "live": (_live, "refimgs", None),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_official_layout_references_of_test_contents_are_excluded(name, tmp_path):
    from kdiqa_edge.data.readers import reference_files

    build, folder, names = LAYOUTS[name]
    root = tmp_path / name
    root.mkdir()
    build(root)
    if names:
        _distinct_references(root, folder, names)
    dataset = load_dataset(DatasetSpec(name=name, root=root))
    files = reference_files(dataset, dataset.refs)
    assert sorted(files) == dataset.refs and all(len(paths) == 1 for paths in files.values())

    split = make_split(dataset, seed=0)
    assert split.by == "ref"
    test_refs = {dataset.records[i].ref for i in split.test}
    pool = build_pool([root / folder], rated_hashes(dataset, split), progress=False)
    reasons = {s.image: s.reason for s in pool.skipped}
    for ref, (path,) in files.items():
        if ref in test_refs:
            assert reasons[str(path)].startswith("the reference image of a rated test content"), ref
        else:
            assert str(path) in {e.name for e in pool.entries}, ref  # a training content's: usable
    assert pool.counts["test_references"] == len(test_refs)


def test_layout_without_reference_images_excludes_none(tmp_path):
    from kdiqa_edge.data.readers import reference_files

    root = tmp_path / "kadid"
    root.mkdir()
    kadid(root)
    for ref in ("I01.png", "I02.png"):
        (root / "images" / ref).unlink()
    dataset = load_dataset(DatasetSpec(name="kadid", root=root))
    assert reference_files(dataset, dataset.refs) == {}
    assert set(rated_hashes(dataset, make_split(dataset, seed=0)).values()) == {"train", "test"}


# -- D5: honest counts, files of other types, float TIFFs


def test_skipped_shards_and_list_entries_are_not_counted_as_images(tmp_path):
    _photo(tmp_path / "good.jpg", 0)
    (tmp_path / "a folder.jpg").mkdir()
    (tmp_path / "list.txt").write_text("good.jpg\na folder.jpg\nmissing.jpg\n")
    data = _photo(tmp_path / "member.png", 1)
    with tarfile.open(tmp_path / "sh-0.tar", "w") as tar:
        info = tarfile.TarInfo("0.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    pool = build_pool([tmp_path / "list.txt", str(tmp_path / "sh-{0..1}.tar")], progress=False)  # no sh-1
    c = pool.counts
    assert (c["found"], c["used"], c["unreadable"], c["not_read"]) == (2, 2, 0, 3)
    assert pool.summary() == "2 of 2 unlabeled images used, 3 tar shards, folders or listed paths not read"


def test_files_of_other_types_in_a_folder_are_listed_and_counted(tmp_path):
    folder = tmp_path / "photos"
    _photo(folder / "ok.jpg", 0)
    for name in ("IMG_1.heic", "IMG_2.avif", "scan", "ok.xmp", "sub/other.xmp"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x")
    pool = build_pool([folder], progress=False)
    reasons = {Path(s.image).relative_to(folder).as_posix(): s.reason for s in pool.skipped}
    assert set(reasons) == {"IMG_1.heic", "IMG_2.avif", "scan", "ok.xmp", "sub/other.xmp"}
    assert reasons["IMG_1.heic"] == "not read: its suffix is no image type read here (.heic)"
    assert reasons["scan"] == "not read: its suffix is no image type read here (no suffix)"
    assert (pool.counts["found"], pool.counts["other_files"]) == (1, 5)
    assert pool.summary() == ("1 of 1 unlabeled images used, 5 other files not read for their suffix "
                              "(2 .xmp, 1 .avif, 1 .heic, 1 no suffix)")


def test_float_tiff_in_0_1_is_not_black(tmp_path):
    from kdiqa_edge.data.unlabeled import Entry, decode_entry
    from kdiqa_edge.preprocess import PreprocessSpec

    ramp = np.tile(np.linspace(0.0, 1.0, 96, dtype=np.float32), (72, 1))
    Image.fromarray(ramp).save(tmp_path / "unit.tif")
    Image.fromarray(ramp * 255.0).save(tmp_path / "bytes.tif")
    spec = PreprocessSpec(size=32)
    unit, scaled = (decode_entry(Entry(str(tmp_path / name), str(tmp_path / name)), spec)
                    for name in ("unit.tif", "bytes.tif"))
    assert Image.open(tmp_path / "unit.tif").mode == "F"
    assert 120 < unit.mean() < 135 and np.abs(unit.astype(int) - scaled.astype(int)).max() <= 1


def test_a_plugins_own_error_on_a_malformed_header_is_a_reason_not_a_traceback(tmp_path, monkeypatch):
    """Pillow's plugins raise struct.error, EOFError, IndexError... on headers they cannot parse: none of them
    an OSError. A scored file and an unlabeled one each get a reason."""
    import struct

    from PIL import Image

    from kdiqa_edge.data.unlabeled import build_pool
    from kdiqa_edge.preprocess import ImageLoadError, PreprocessSpec, load_preprocessed

    folder = tmp_path / "pool"
    folder.mkdir()
    Image.new("RGB", (40, 30), (90, 120, 30)).save(folder / "odd.png")
    opened = Image.open

    def malformed(source, *args, **kwargs):
        if "odd" in str(getattr(source, "name", source)) or not isinstance(source, (str, Path)):
            raise struct.error("unpack requires a buffer of 4 bytes")
        return opened(source, *args, **kwargs)

    monkeypatch.setattr(Image, "open", malformed)
    with pytest.raises(ImageLoadError, match=r"unreadable image \(struct\.error: unpack requires"):
        load_preprocessed(folder / "odd.png", PreprocessSpec(size=32))
    pool = build_pool([str(folder)], {}, progress=False)
    assert len(pool) == 0 and [s.reason for s in pool.skipped] == [
        "unreadable image (struct.error: unpack requires a buffer of 4 bytes)"]
