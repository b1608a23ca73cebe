"""`score` at the scale of a million photos, second audit: what a user meets on paths, --out places, Ctrl-C,
--workers and damaged files (each test fails on the code before its fix)."""

from __future__ import annotations

import errno
import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run_cli
from PIL import Image
from test_runtime_helpers import export_tiny_onnx, noise_jpegs

from kdiqa_edge.runtime.output import Row, ScoresOutput, read_rows


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return export_tiny_onnx(tmp_path_factory.mktemp("audit2-model") / "a.onnx")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return noise_jpegs(tmp_path_factory.mktemp("audit2-photos"), 12)


def _one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], err


def test_a_named_file_the_user_cannot_read_is_a_row_not_the_whole_run_refused(model, photos, capsys,
                                                                               monkeypatch):
    """Click's Path(readable=True) refused the whole command (a usage error, nothing scored) when one named
    path failed os.access; unreadable files are rows with their reason, as in a folder's walk."""
    denied = str(photos / "p03.jpg")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: False if str(path) == denied
                        else real_access(path, mode, *a, **k))
    code, out, err = run_cli(["score", model, photos / "p01.jpg", denied, "--format", "csv"], capsys)
    assert code == 0, err
    rows = out.splitlines()[1:]
    assert [row.split(",")[0] for row in rows] == [str(photos / "p01.jpg"), denied]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_named_fifo_or_device_is_not_a_regular_file_not_an_empty_one(model, tmp_path, capsys):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    code, out, err = run_cli(["score", model, fifo, os.devnull, "--format", "json"], capsys)
    rows = [json.loads(line) for line in out.splitlines()]
    assert [row["error"] for row in rows] == ["not a regular file"] * 2  # was "empty file (0 bytes)"
    assert code == 1 and "no image was scored" in err


def test_an_out_that_cannot_be_created_is_one_line(model, photos, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, _, err = run_cli(["score", model, photos, "--out", blocker / "scores.csv"], capsys)
    _one_line_error(code, err, "cannot write", "a file stands where a folder should be")


def test_a_full_disk_when_out_is_opened_is_one_line(model, photos, tmp_path, capsys, monkeypatch):
    import kdiqa_edge.io

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(kdiqa_edge.io, "write_json", full)
    code, _, err = run_cli(["score", model, photos, "--out", tmp_path / "scores.csv"], capsys)
    _one_line_error(code, err, "the disk is full")


def test_overwrite_never_removes_a_folder_of_the_users(model, photos, tmp_path, capsys):
    folder = tmp_path / "results.csv"  # a folder that happens to be named like the file asked for
    folder.mkdir()
    (folder / "precious.txt").write_text("keep me")
    code, _, err = run_cli(["score", model, photos, "--out", folder, "--overwrite"], capsys)
    _one_line_error(code, err, "is a folder")
    assert (folder / "precious.txt").read_text() == "keep me"

    pytest.importorskip("pyarrow")
    table = tmp_path / "mine.parquet"  # the user's own dataset, not score's parts
    table.mkdir()
    (table / "notes.txt").write_text("keep me")
    code, _, err = run_cli(["score", model, photos, "--out", table, "--overwrite"], capsys)
    _one_line_error(code, err, "holds files score did not write", "notes.txt")
    assert (table / "notes.txt").read_text() == "keep me"


def test_overwrite_still_replaces_scores_own_parquet_parts(model, photos, tmp_path, capsys):
    pytest.importorskip("pyarrow")
    out = tmp_path / "scores.parquet"
    other = export_tiny_onnx(tmp_path / "b.onnx", seed=1)
    assert run_cli(["score", model, photos, "--out", out, "--chunk", "5", "-q"], capsys)[0] == 0
    code, _, err = run_cli(["score", other, photos, "--out", out, "--overwrite", "-q"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["part-000000.parquet"]
    assert len(list(read_rows(out))) == 12


def test_ctrl_c_in_a_commit_never_commits_the_torn_chunk(tmp_path, monkeypatch):
    """A Ctrl-C between a chunk's data and its index lines, in a run with rows to compact: the compaction at
    exit took the uncommitted rows in as committed, rows the index lacks, so a re-run scored them again and
    the file kept two rows of those images."""
    from kdiqa_edge.runtime import output

    out = tmp_path / "scores.csv"
    identity = {"sha256": "0" * 64, "name": "m.onnx"}
    real_append = output._append
    with pytest.raises(KeyboardInterrupt), ScoresOutput(out, identity, "draft", chunk_rows=100) as target:
        target.add(Row("a.jpg", 1.0, None, (1, 1)))
        target.add(Row("b.jpg", 2.0, None, (1, 1)))
        target.commit()
        target.add(Row("a.jpg", 1.5, None, (2, 2)))  # a changed since: a row to compact at exit
        target.commit()

        def cut(path, data):
            if path == target.index_path:  # the data went out, then Ctrl-C
                raise KeyboardInterrupt
            real_append(path, data)

        monkeypatch.setattr(output, "_append", cut)
        target.add(Row("c.jpg", 3.0, None, (1, 1)))
        target.commit()
    monkeypatch.setattr(output, "_append", real_append)
    assert [row["image"] for row in read_rows(out)] == ["b.jpg", "a.jpg"]
    index = [json.loads(line)[0] for line in target.index_path.read_text().splitlines()]
    assert index == ["b.jpg", "a.jpg"]
    with ScoresOutput(out, identity, "draft") as again:  # the re-run scores c once
        assert not again.seen("c.jpg", (1, 1))
        again.add(Row("c.jpg", 3.0, None, (1, 1)))
    assert [row["image"] for row in read_rows(out)] == ["b.jpg", "a.jpg", "c.jpg"]


def test_ctrl_c_says_how_many_rows_are_kept_and_how_to_go_on(model, photos, tmp_path, capsys, monkeypatch):
    out = tmp_path / "scores.csv"
    real_add = ScoresOutput.add

    def add(self, row):
        if self.added + len(self._pending) == 5:
            raise KeyboardInterrupt
        real_add(self, row)

    monkeypatch.setattr(ScoresOutput, "add", add)
    code, _, err = run_cli(["score", model, photos, "--out", out, "--chunk", "2", "-q", "--workers", "1"], capsys)
    assert code == 130, err
    assert "5 rows kept; run the same command again to go on" in err, err
    assert len(list(read_rows(out))) == 5


def test_workers_beyond_the_bound_are_refused(model, photos, capsys):
    """--workers 100000 started a thread per file and kept 4 x workers decoded images waiting: a folder of a
    million photos held in memory."""
    from kdiqa_edge.runtime.pipeline import MAX_WORKERS, decode_files, walk

    code, _, err = run_cli(["score", model, photos, "--workers", "100000"], capsys)
    assert code == 2 and "--workers" in err and str(MAX_WORKERS) in err, err
    assert run_cli(["score", model, photos, "--workers", str(MAX_WORKERS), "--format", "csv"], capsys)[0] == 0
    with pytest.raises(ValueError, match="workers"):
        list(decode_files(walk([photos / "p00.jpg"]), np.load, workers=MAX_WORKERS + 1))


def test_the_default_workers_stay_within_the_bound_on_a_machine_of_many_cores(model, photos, monkeypatch):
    from kdiqa_edge.runtime import QualityModel, pipeline

    monkeypatch.setattr(pipeline, "usable_cores", lambda: 4 * pipeline.MAX_WORKERS)
    assert pipeline.default_workers() == pipeline.default_workers(8) == pipeline.MAX_WORKERS
    results = list(QualityModel.load(model).score_files(sorted(photos.iterdir())))
    assert len(results) == 12 and all(r.error is None for r in results)


def _damaged_tiff_pillow_warns_on(folder: Path) -> Path:
    """A TIFF whose ImageDescription tag claims a million bytes: Pillow skips the tag with a UserWarning ("Tag
    data larger than file") and decodes the image."""
    import struct

    from PIL import TiffImagePlugin

    buffer, info = io.BytesIO(), TiffImagePlugin.ImageFileDirectory_v2()
    info[270] = "a photo" * 20  # stored out of line: its entry holds a count and an offset
    Image.fromarray(np.zeros((40, 50, 3), dtype=np.uint8)).save(buffer, "TIFF", tiffinfo=info)
    data = bytearray(buffer.getvalue())
    assert data[:4] == b"II*\x00"  # little-endian: the first IFD's offset, then 12-byte entries after a count
    (ifd,) = struct.unpack_from("<I", data, 4)
    (entries,) = struct.unpack_from("<H", data, ifd)
    for entry in range(ifd + 2, ifd + 2 + 12 * entries, 12):
        if struct.unpack_from("<H", data, entry)[0] == 270:
            struct.pack_into("<I", data, entry + 4, 10**6)  # the count
    path = folder / "damaged.tif"
    path.write_bytes(bytes(data))
    return path


def test_pillows_warnings_on_a_damaged_file_are_not_printed(model, tmp_path, capsys):
    """Pillow's 'Tag data larger than file' / 'Corrupt EXIF data' name no file, and a folder of wild photos
    printed them by the hundred; the file is scored."""
    from kdiqa_edge.preprocess import PreprocessSpec, load_preprocessed

    damaged = _damaged_tiff_pillow_warns_on(tmp_path)
    with warnings.catch_warnings(record=True) as raw:  # Pillow does warn on it, outside score
        warnings.simplefilter("always")
        load_preprocessed(damaged, PreprocessSpec(size=32))
    assert any(issubclass(w.category, UserWarning) and "/PIL/" in w.filename.replace(os.sep, "/") for w in raw)
    with warnings.catch_warnings(record=True) as shown:  # what would reach stderr (pytest captures warnings)
        warnings.simplefilter("always")
        code, out, err = run_cli(["score", model, damaged, "--format", "csv"], capsys)
    assert code == 0, err
    assert not [w for w in shown if issubclass(w.category, UserWarning)], [str(w.message) for w in shown]
    assert "Warning" not in err, err
    assert out.splitlines()[1].startswith(f"{damaged},")


def test_rows_scored_before_an_unexpected_error_are_kept(tmp_path):
    """A model or decoder that fails mid-run (not Ctrl-C, not a failed write) dropped the rows of the chunk in
    flight: they were scored again. They are committed; a re-run skips them."""
    out = tmp_path / "scores.csv"
    identity = {"sha256": "0" * 64, "name": "m.onnx"}
    with pytest.raises(RuntimeError, match="the model broke"), \
            ScoresOutput(out, identity, "draft", chunk_rows=100) as target:
        target.add(Row("a.jpg", 1.0, None, (1, 1)))
        target.add(Row("b.jpg", 2.0, None, (1, 1)))
        raise RuntimeError("the model broke")
    assert [row["image"] for row in read_rows(out)] == ["a.jpg", "b.jpg"]
    with ScoresOutput(out, identity, "draft") as again:
        assert again.seen("a.jpg", (1, 1)) and again.seen("b.jpg", (1, 1))
