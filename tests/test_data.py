"""The data layer's core: synthetic set, dataset loading, image cache, splits, prepare()."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest

from kdiqa_edge.data import (
    DatasetSpec,
    ImageCache,
    Record,
    Split,
    load_dataset,
    make_split,
    prepare,
    synthetic,
)
from kdiqa_edge.data import cache as cache_module
from kdiqa_edge.data.records import Dataset
from kdiqa_edge.errors import DataError
from kdiqa_edge.preprocess import PreprocessSpec, load_preprocessed


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    return synthetic.generate(tmp_path_factory.mktemp("synth") / "set", refs=2, seed=0)


def _scores(root: Path) -> list[dict[str, str]]:
    with open(root / "scores.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_synthetic_layout_and_pseudo_mos(synth_root):
    rows = _scores(synth_root)
    assert len(rows) == 2 * len(synthetic.DISTORTIONS) * synthetic.LEVELS
    assert set(rows[0]) >= {"image", "mos", "ref", "distortion", "level"}
    assert {r["ref"] for r in rows} == {"r00", "r01"}
    assert {r["distortion"] for r in rows} >= {"blur", "noise", "jpeg", "contrast", "saturation", "pixelate"}
    assert "SSIM" in (synth_root / "README").read_text()
    mos = np.array([float(r["mos"]) for r in rows])
    assert mos.min() >= 1 and mos.max() <= 5 and mos.std() > 0.5  # a spread, not a constant
    for row in rows:  # the score is the documented function of SSIM
        assert float(row["mos"]) == pytest.approx(synthetic.pseudo_mos(float(row["ssim"])), abs=1e-3)
        assert (synth_root / row["image"]).is_file()
    for distortion in synthetic.DISTORTIONS:
        by_level = {int(r["level"]): float(r["mos"]) for r in rows if r["distortion"] == distortion
                    and r["ref"] == "r00"}
        assert by_level[5] < by_level[1], distortion  # the strongest level scores worse than the mildest


def test_synthetic_is_deterministic_per_seed(synth_root, tmp_path):
    # the first reference does not depend on how many follow, so one reference is enough to compare
    again = synthetic.generate(tmp_path / "again", refs=1, seed=0)
    other = synthetic.generate(tmp_path / "other", refs=1, seed=1)
    lines = (again / "scores.csv").read_text().splitlines()
    assert lines == (synth_root / "scores.csv").read_text().splitlines()[: len(lines)] and len(lines) == 31
    image = "images/r00_noise_3.png"
    assert (again / image).read_bytes() == (synth_root / image).read_bytes()
    assert (again / "refs" / "r00.png").read_bytes() == (synth_root / "refs" / "r00.png").read_bytes()
    assert (other / "scores.csv").read_text().splitlines()[1:] != lines[1:]


def test_synthetic_set_at_a_small_model_resolution(tmp_path):
    from PIL import Image

    from kdiqa_edge.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["data", "synth", str(tmp_path / "small"), "--refs", "1", "--size", "86x64"])
    assert exit_info.value.code == 0
    rows = _scores(tmp_path / "small")
    assert len(rows) == 30 and "86x64 view" in (tmp_path / "small" / "README").read_text()
    assert {Image.open(tmp_path / "small" / r["image"]).size for r in rows} == {(86, 64)}
    noise = {int(r["level"]): float(r["mos"]) for r in rows if r["distortion"] == "noise"}
    assert noise[5] < noise[1]  # still a graded task at the small size


def test_default_synthetic_set_is_generated_once_into_the_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("KDIQA_CACHE", str(tmp_path))
    monkeypatch.setattr(synthetic, "DEFAULT_REFS", 1)
    dataset = load_dataset(DatasetSpec())
    assert Path(dataset.root).is_relative_to(tmp_path) and len(dataset) == 30
    stamp = (dataset.root / "scores.csv").stat().st_mtime_ns
    assert load_dataset(DatasetSpec()).root == dataset.root
    assert (dataset.root / "scores.csv").stat().st_mtime_ns == stamp


def test_load_synthetic_records(synth_root):
    dataset = load_dataset(DatasetSpec(root=synth_root))
    assert len(dataset) == 60 and not dataset.skipped
    record = dataset.records[0]
    assert isinstance(record, Record) and record.ref == "r00" and record.level in range(1, 6)
    assert 1 <= record.mos <= 5 and record.mos == record.raw
    assert dataset.refs == ["r00", "r01"]


def test_image_cache_matches_preprocessing_and_is_reused(synth_root, tmp_path):
    dataset = load_dataset(DatasetSpec(root=synth_root))
    spec = PreprocessSpec()
    cache = ImageCache.build(dataset, spec, cache_root=tmp_path, workers=1, progress=False)
    assert cache.images.shape == (60, 224, 224, 3) and cache.images.dtype == np.uint8
    for i in (0, 17, 59):
        np.testing.assert_array_equal(cache.images[i], load_preprocessed(synth_root / dataset.records[i].image, spec))
    np.testing.assert_allclose(cache.mos, [r.mos for r in dataset.records])
    stamp = (cache.path / cache_module.IMAGES_FILE).stat().st_mtime_ns
    again = ImageCache.build(dataset, spec, cache_root=tmp_path, workers=1, progress=False)
    assert again.path == cache.path and again.key == cache.key
    assert (cache.path / cache_module.IMAGES_FILE).stat().st_mtime_ns == stamp  # not rebuilt


def test_image_cache_parallel_build_equals_serial(synth_root, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "POOL_MIN_IMAGES", 16)
    dataset = load_dataset(DatasetSpec(root=synth_root))
    serial = ImageCache.build(dataset, cache_root=tmp_path / "a", workers=1, progress=False)
    parallel = ImageCache.build(dataset, cache_root=tmp_path / "b", workers=2, progress=True)
    assert len(dataset) >= cache_module.POOL_MIN_IMAGES  # so the process pool really ran
    np.testing.assert_array_equal(np.asarray(serial.images), np.asarray(parallel.images))


def _copy_set(src: Path, dst: Path, refs=("r00",)) -> Path:
    (dst / "images").mkdir(parents=True)
    rows = [r for r in _scores(src) if r["ref"] in refs]
    for row in rows:
        (dst / row["image"]).write_bytes((src / row["image"]).read_bytes())
    with open(dst / "scores.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return dst


def test_image_cache_rebuilds_when_index_or_preprocessing_changes(synth_root, tmp_path):
    root = _copy_set(synth_root, tmp_path / "set")
    dataset = load_dataset(DatasetSpec(root=root))
    cache = ImageCache.build(dataset, cache_root=tmp_path / "c", workers=1, progress=False)
    smaller = ImageCache.build(dataset, PreprocessSpec(size=64), cache_root=tmp_path / "c", workers=1,
                               progress=False)
    assert smaller.key != cache.key and smaller.images.shape == (30, 64, 64, 3)
    fewer = dataset.subset(range(10))
    assert ImageCache.build(fewer, cache_root=tmp_path / "c", workers=1, progress=False).key != cache.key
    # a file rewritten with other pixels: its size/mtime change the key, the cache follows
    first = root / dataset.records[0].image
    from PIL import Image

    Image.new("RGB", (300, 240), (10, 200, 30)).save(first)
    os.utime(first, ns=(1, 1))
    changed = ImageCache.build(load_dataset(DatasetSpec(root=root)), cache_root=tmp_path / "c", workers=1,
                               progress=False)
    assert changed.key != cache.key
    assert tuple(changed.images[0, 100, 100]) == (10, 200, 30)
    # the copy made before the file changed is gone; other preprocessing and image lists are kept
    assert not cache.path.exists() and smaller.path.exists()
    assert len([p for p in (tmp_path / "c").iterdir() if p.is_dir()]) == 3


def test_image_cache_crash_mid_build_leaves_nothing_that_looks_complete(synth_root, tmp_path, monkeypatch):
    dataset = load_dataset(DatasetSpec(root=synth_root))
    calls = {"n": 0}
    real = cache_module.load_preprocessed

    def crash_after_five(path, spec):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt  # the user pressed Ctrl-C half way
        return real(path, spec)

    monkeypatch.setattr(cache_module, "load_preprocessed", crash_after_five)
    with pytest.raises(KeyboardInterrupt):
        ImageCache.build(dataset, cache_root=tmp_path, workers=1, progress=False)
    assert [p.name for p in tmp_path.iterdir() if p.suffix != ".lock"] == []  # no folder, no temporary left
    monkeypatch.setattr(cache_module, "load_preprocessed", real)
    cache = ImageCache.build(dataset, cache_root=tmp_path, workers=1, progress=False)
    # a cache whose data file was cut short (killed writer, full disk) is detected and rebuilt
    with open(cache.path / cache_module.IMAGES_FILE, "r+b") as handle:
        handle.truncate(1000)
    rebuilt = ImageCache.build(dataset, cache_root=tmp_path, workers=1, progress=False)
    assert rebuilt.images.shape == (60, 224, 224, 3)
    np.testing.assert_array_equal(rebuilt.images[-1], load_preprocessed(dataset.path(59), PreprocessSpec()))


def test_image_cache_skips_undecodable_images_with_a_reason(synth_root, tmp_path):
    root = _copy_set(synth_root, tmp_path / "set")
    rows = _scores(root)
    (root / rows[3]["image"]).write_bytes(b"this is not a png")
    data = (root / rows[7]["image"]).read_bytes()
    (root / rows[7]["image"]).write_bytes(data[: len(data) // 3])  # truncated
    dataset = load_dataset(DatasetSpec(root=root))
    cache = ImageCache.build(dataset, cache_root=tmp_path / "c", workers=1, progress=False)
    assert len(cache) == 28 and cache.images.shape[0] == 28
    reasons = {s.image: s.reason for s in cache.skipped}
    assert set(reasons) == {rows[3]["image"], rows[7]["image"]}
    assert "not an image" in reasons[rows[3]["image"]]
    assert rows[3]["image"] not in [r.image for r in cache.dataset.records]
    # the rows stay aligned with the records that decoded
    np.testing.assert_array_equal(cache.images[3], load_preprocessed(cache.dataset.path(3), PreprocessSpec()))
    with pytest.raises(DataError, match="--strict"):
        ImageCache.build(dataset, cache_root=tmp_path / "c", workers=1, progress=False, strict=True)


def _toy(refs: int, per_ref: int) -> Dataset:
    records = [Record(image=f"{r}_{i}.png", mos=1 + (i % 5), raw=1 + (i % 5), ref=f"ref{r}")
               for r in range(refs) for i in range(per_ref)]
    return Dataset(name="toy", root=Path("/nonexistent"), records=records)


def test_split_by_reference_is_seeded_disjoint_and_about_80_20():
    dataset = _toy(refs=20, per_ref=6)
    split = make_split(dataset, seed=3)
    assert split.by == "ref"
    assert split == make_split(dataset, seed=3)
    assert split.test != make_split(dataset, seed=4).test
    train_refs = {dataset.records[i].ref for i in split.train}
    test_refs = {dataset.records[i].ref for i in split.test}
    assert not train_refs & test_refs
    assert sorted(split.train + split.test) == list(range(len(dataset)))
    assert len(split.test) == 24  # 4 of 20 references, 6 images each


def test_split_by_image_with_val_and_json_round_trip(tmp_path):
    records = [Record(image=f"{i}.jpg", mos=3.0, raw=3.0) for i in range(100)]
    dataset = Dataset(name="toy", root=tmp_path, records=records)
    split = make_split(dataset, seed=0, val_fraction=0.1)
    assert split.by == "image" and split.sizes() == {"train": 70, "val": 10, "test": 20}
    assert not set(split.train) & set(split.val) and not set(split.val) & set(split.test)
    split.save(tmp_path / "split.json")
    loaded = Split.load(tmp_path / "split.json")
    assert loaded == split and loaded.check(dataset) is loaded
    with pytest.raises(DataError, match="different image list"):
        loaded.check(dataset.subset(range(50)))


def test_official_split_on_request():
    sets = ["training"] * 7 + ["validation"] + ["test"] * 2
    records = [Record(image=f"{i}.jpg", mos=3.0, raw=3.0, official=s) for i, s in enumerate(sets)]
    split = make_split(Dataset(name="koniq", root=Path("."), records=records), by="official")
    assert split.sizes() == {"train": 7, "val": 1, "test": 2} and split.test == [8, 9]
    with pytest.raises(DataError, match="no official split"):
        make_split(_toy(3, 2), by="official")


def test_prepare_returns_an_aligned_cache_and_split(synth_root):
    cache, split = prepare(DatasetSpec(root=synth_root), PreprocessSpec(), seed=1, progress=False)
    assert len(cache) == 60 and sorted(split.train + split.test) == list(range(60))
    split.check(cache.dataset)
    assert {cache.dataset.records[i].ref for i in split.test} in ({"r00"}, {"r01"})
    assert cache.mos.dtype == np.float32 and cache.mos.shape == (60,)


def test_two_processes_share_one_default_synthetic_set(tmp_path):
    import subprocess
    import sys

    code = ("from kdiqa_edge.data import synthetic, load_dataset, DatasetSpec; synthetic.DEFAULT_REFS = 1; "
            "print(len(load_dataset(DatasetSpec())))")
    env = {**os.environ, "KDIQA_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert [out.strip() for out, _ in outputs] == ["30", "30"]
    left = [p.name for p in (tmp_path / "synthetic").iterdir() if p.suffix != ".lock"]
    assert left == [f"v{synthetic.VERSION}-refs1-seed0"]  # one set, no half-written temporaries


def test_cli_synth_then_info_and_index_on_it(tmp_path):
    from typer.testing import CliRunner

    from kdiqa_edge.cli import app

    runner = CliRunner()
    out = tmp_path / "synth"
    result = runner.invoke(app, ["data", "synth", str(out), "--refs", "1", "--seed", "5"])
    assert result.exit_code == 0, result.output
    assert "wrote 30 images from 1 reference to" in result.output and (out / "scores.csv").is_file()
    result = runner.invoke(app, ["data", "info", "--root", str(out)])
    assert result.exit_code == 0, result.output
    assert "images      30" in result.output and "references  1" in result.output
    assert "higher is better" in result.output and "0 skipped" in result.output
    result = runner.invoke(app, ["data", "index", "--root", str(out), "--out", str(tmp_path / "i.csv"),
                                 "--split-by", "image", "--seed", "2"])
    assert result.exit_code == 0, result.output
    with open(tmp_path / "i.csv", newline="") as handle:
        parts = [row["split"] for row in csv.DictReader(handle)]
    assert parts.count("test") == 6 and parts.count("train") == 24
