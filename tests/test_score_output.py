"""`score --out`: chunked, resumable, locked output that a kill or a full disk never tears."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run_cli
from PIL import Image
from test_runtime_helpers import export_tiny_onnx, noise_jpegs

from kdiqa_edge.runtime.output import read_rows


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("out-models")
    return export_tiny_onnx(folder / "a.onnx", seed=0), export_tiny_onnx(folder / "b.onnx", seed=1)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """36 small JPEGs and a broken file: quick to score in process."""
    root = noise_jpegs(tmp_path_factory.mktemp("out-photos"), 36)
    (root / "p20_broken.jpg").write_bytes(b"\xff\xd8 cut short")
    return root


@pytest.fixture(scope="module")
def slow_photos(tmp_path_factory):
    """24 JPEGs of 1600x1200, each tens of ms to decode exactly with one worker: a run a test can stop midway."""
    root = tmp_path_factory.mktemp("out-slow")
    y, x = np.mgrid[0:1200, 0:1600]
    scene = (128 + 100 * np.sin(x / 9.0) * np.cos(y / 13.0)).astype(np.uint8)[..., None].repeat(3, axis=2)
    for index in range(24):
        Image.fromarray(np.roll(scene, 7 * index, axis=1)).save(root / f"s{index:02d}.jpg", quality=90)
    return root


def _cli_process(args) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "kdiqa_edge", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_rows(state: Path, rows: int, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the run ended before {rows} rows: {process.communicate()}"
        try:
            if json.loads(state.read_text())["rows"] >= rows:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)  # polling a file another process writes
    raise AssertionError(f"no {rows} rows in {state} after {timeout} s")


def _slow_run(model, photos_dir, out) -> list:
    return ["score", model, photos_dir, "--out", out, "--chunk", "4", "--batch-size", "2", "--workers", "1",
            "--decode", "exact"]


def test_kill_9_then_rerun_scores_every_image_once_and_keeps_written_rows(models, slow_photos, tmp_path, capsys):
    out = tmp_path / "scores.csv"
    process = _cli_process(_slow_run(models[0], slow_photos, out))
    _wait_for_rows(out.with_name("scores.csv.kdiqa.json"), 8, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = out.read_bytes()
    committed = json.loads(out.with_name("scores.csv.kdiqa.json").read_text())
    assert 8 <= committed["rows"] < 24
    kept = written[:committed["bytes"]]
    with open(out, "ab") as handle:  # what a kill in the middle of a chunk's write leaves behind
        handle.write(f"{slow_photos}/s23.jpg,3.14".encode())
    code, _, err = run_cli(_slow_run(models[0], slow_photos, out), capsys)
    assert code == 0, err
    assert f"{committed['rows']} rows from an earlier run kept" in err
    assert "skipped (in --out from an earlier run, unchanged)" in err
    assert f"; {committed['rows']} skipped" in err
    final = out.read_bytes()
    assert final.startswith(kept)  # rows written before the kill: byte for byte
    rows = list(read_rows(out))
    assert sorted(r["image"] for r in rows) == sorted(str(p) for p in slow_photos.iterdir())  # each once
    reference = tmp_path / "uninterrupted.csv"
    assert run_cli(_slow_run(models[0], slow_photos, reference), capsys)[0] == 0
    assert sorted(final.splitlines()) == sorted(reference.read_bytes().splitlines())


def test_a_second_writer_is_refused_in_one_line_and_nothing_interleaves(models, slow_photos, tmp_path, capsys):
    out = tmp_path / "scores.jsonl"
    first = _cli_process(_slow_run(models[0], slow_photos, out))
    _wait_for_rows(out.with_name("scores.jsonl.kdiqa.json"), 2, first)
    code, stdout, err = run_cli(_slow_run(models[0], slow_photos, out), capsys)
    assert code == 2 and stdout == ""
    lines = [line for line in err.splitlines() if not line.startswith("note:")]
    assert lines == [f"error: {out} is being written by another kdiqa-edge score (pid {first.pid}): wait for it, "
                     "or pass another --out"]
    assert first.wait(timeout=120) == 0, first.communicate()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in rows] == sorted(str(p) for p in slow_photos.iterdir())


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_another_model_is_refused_unless_overwrite(models, photos, tmp_path, capsys, suffix):
    out = tmp_path / f"scores{suffix}"
    code, stdout, err = run_cli(["score", models[0], photos, "--out", out, "--chunk", "5"], capsys)
    assert code == 0 and stdout == "", err
    first = list(read_rows(out))
    assert len(first) == 37 and [r["image"] for r in first] == sorted(str(p) for p in photos.iterdir())
    assert [r["image"] for r in first if r["error"]] == [str(photos / "p20_broken.jpg")]
    state = json.loads(out.with_name(out.name + ".kdiqa.json").read_text())
    assert state["rows"] == 37 and len(state["model"]["sha256"]) == 64 and state["decode"] == "draft"

    code, _, err = run_cli(["score", models[1], photos, "--out", out], capsys)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith(f"error: {out} holds scores of another model (a.onnx, sha256 ")
    assert list(read_rows(out)) == first  # untouched

    code, _, err = run_cli(["score", models[1], photos, "--out", out, "--overwrite"], capsys)
    assert code == 0, err
    second = list(read_rows(out))
    assert [r["image"] for r in second] == [r["image"] for r in first]
    assert [r["score"] for r in second] != [r["score"] for r in first]  # the other model's scores


def test_a_file_score_did_not_write_is_refused(models, photos, tmp_path, capsys):
    out = tmp_path / "mine.csv"
    out.write_text("my own notes\n")
    code, _, err = run_cli(["score", models[0], photos, "--out", out], capsys)
    assert code == 2 and "was not written by kdiqa-edge score" in err
    assert out.read_text() == "my own notes\n"
    code, _, err = run_cli(["score", models[0], photos, "--out", tmp_path / "scores.txt"], capsys)
    assert code == 2 and "name a .csv, .jsonl or .parquet file" in err


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_a_changed_file_is_scored_again_and_its_new_row_replaces_the_old(models, photos, tmp_path, capsys, suffix):
    folder = tmp_path / "photos"
    shutil.copytree(photos, folder)
    late = tmp_path / "late.jpg"  # named on the command line before it exists
    out = tmp_path / f"scores{suffix}"
    command = ["score", models[0], folder, late, "--out", out, "--chunk", "8"]
    assert run_cli(command, capsys)[0] == 1  # a missing path: its row, and exit 1
    before = {r["image"]: r for r in read_rows(out)}
    assert before[str(late)]["error"] == "no such file or directory"
    shutil.copy(folder / "p05.jpg", folder / "p03.jpg")  # other pixels
    shutil.copy(folder / "p07.jpg", late)
    code, _, err = run_cli(command, capsys)
    assert code == 0 and "2 scored, 0 unreadable" in err and "36 skipped" in err, err
    assert "2 files scored again (changed since an earlier run, or missing then)" in err
    rows = list(read_rows(out))
    images = [r["image"] for r in rows]
    assert len(images) == len(set(images)) == 38  # each image once
    after = {r["image"]: r for r in rows}
    assert after[str(folder / "p03.jpg")]["score"] == before[str(folder / "p05.jpg")]["score"]
    assert after[str(late)]["score"] == before[str(folder / "p07.jpg")]["score"] and not after[str(late)]["error"]
    assert {k: v for k, v in after.items() if Path(k).name not in ("p03.jpg", "late.jpg")} == \
        {k: v for k, v in before.items() if Path(k).name not in ("p03.jpg", "late.jpg")}
    state = json.loads(out.with_name(out.name + ".kdiqa.json").read_text())
    index = out.with_name(out.name + ".kdiqa.index").read_text().splitlines()
    assert state["rows"] == len(index) == 38 and "compacting" not in state
    code, _, err = run_cli(command, capsys)
    assert code == 0 and "38 skipped" in err and list(read_rows(out)) == rows


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_retry_errors_tries_again_the_unchanged_files_that_failed(models, photos, tmp_path, capsys, monkeypatch,
                                                                  suffix):
    """A file that failed for a reason outside it (an I/O error, a codec installed since) is unchanged, so a
    re-run skips it; --retry-errors tries it again, and its new row replaces the error row."""
    from kdiqa_edge.preprocess import ImageLoadError
    from kdiqa_edge.runtime import pipeline

    folder = tmp_path / "photos"
    shutil.copytree(photos, folder)
    out = tmp_path / f"scores{suffix}"
    command = ["score", models[0], folder, "--out", out, "--chunk", "8"]
    load = pipeline.load_preprocessed

    def failing(path, spec):
        if Path(path).name == "p05.jpg":
            raise ImageLoadError("input/output error", path)
        return load(path, spec)

    monkeypatch.setattr(pipeline, "load_preprocessed", failing)
    assert run_cli(command, capsys)[0] == 0
    monkeypatch.setattr(pipeline, "load_preprocessed", load)
    before = list(read_rows(out))
    assert {Path(r["image"]).name for r in before if r["error"]} == {"p05.jpg", "p20_broken.jpg"}

    code, _, err = run_cli(command, capsys)
    assert code == 0 and "37 skipped" in err and list(read_rows(out)) == before
    assert "2 files skipped with the error row of an earlier run (unchanged since): --retry-errors" in err

    code, _, err = run_cli([*command, "--retry-errors"], capsys)
    assert code == 0 and "1 scored, 1 unreadable" in err and "35 skipped" in err, err
    assert "--retry-errors: 2 files that failed before tried again, 1 scored now" in err
    rows = list(read_rows(out))
    images = [r["image"] for r in rows]
    assert len(images) == len(set(images)) == 37  # each image once: the new rows replaced the error rows
    after = {Path(r["image"]).name: r for r in rows}
    assert not after["p05.jpg"]["error"] and after["p05.jpg"]["score"] is not None
    assert after["p20_broken.jpg"]["error"]
    assert {k: v for k, v in after.items() if k != "p05.jpg"} == \
        {Path(r["image"]).name: r for r in before if Path(r["image"]).name != "p05.jpg"}
    code, _, err = run_cli([*command, "--retry-errors"], capsys)  # the broken one still fails; p05 is done
    assert code == 0 and "0 scored, 1 unreadable" in err and "36 skipped" in err, err
    assert run_cli(["score", models[0], folder, "--retry-errors"], capsys)[0] != 0  # without --out: refused


def test_a_rewrite_a_full_disk_stops_is_finished_by_the_next_run(models, photos, tmp_path, capsys, monkeypatch):
    from kdiqa_edge.runtime import output

    folder = tmp_path / "photos"
    shutil.copytree(photos, folder)
    out = tmp_path / "scores.csv"
    assert run_cli(["score", models[0], folder, "--out", out], capsys)[0] == 0
    shutil.copy(folder / "p05.jpg", folder / "p03.jpg")
    keep_last = output._keep_last_lines

    def full_at_the_index(path, kind):
        if kind == "index":  # the data is rewritten, the index not yet
            raise OSError(errno.ENOSPC, "No space left on device")
        return keep_last(path, kind)

    monkeypatch.setattr(output, "_keep_last_lines", full_at_the_index)
    code, _, err = run_cli(["score", models[0], folder, "--out", out], capsys)
    assert code == 2 and err.strip().splitlines()[-1] == (
        f"error: cannot rewrite {out} to drop the old rows of files scored again: the disk is full; every row "
        "is kept: free some space and run the same command again to finish")
    assert json.loads(out.with_name("scores.csv.kdiqa.json").read_text())["compacting"] is True
    monkeypatch.setattr(output, "_keep_last_lines", keep_last)
    code, _, err = run_cli(["score", models[0], folder, "--out", out], capsys)
    assert code == 0 and "37 skipped" in err, err
    images = [r["image"] for r in read_rows(out)]
    assert sorted(images) == sorted(str(p) for p in folder.iterdir())  # each once
    assert [json.loads(line)[0] for line in out.with_name("scores.csv.kdiqa.index").read_text().splitlines()] \
        == images


def test_a_failed_write_gives_one_line_and_keeps_every_written_row(models, photos, tmp_path, capsys, monkeypatch):
    """Simulated in process: the data file's os.write writes part of a chunk, then fails with ENOSPC."""
    out = tmp_path / "scores.csv"
    real_write, budget = os.write, [900]

    def write(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}") == str(out):
            if len(data) > budget[0]:
                real_write(fd, bytes(data[:budget[0]]))  # the part that fitted
                raise OSError(errno.ENOSPC, "No space left on device")
            budget[0] -= len(data)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    code, _, err = run_cli(["score", models[0], photos, "--out", out, "--chunk", "6"], capsys)
    assert code == 2
    state = json.loads(out.with_name("scores.csv.kdiqa.json").read_text())
    last = err.strip().splitlines()[-1]
    assert last == (f"error: cannot write {out}: the disk is full (ENOSPC); the {state['rows']} rows written "
                    "before are kept: free some space and run the same command again to go on")
    assert 0 < state["rows"] < 37 and out.stat().st_size == state["bytes"]  # the torn chunk cut off
    kept = out.read_bytes()
    assert len(list(read_rows(out))) == state["rows"]
    monkeypatch.setattr(os, "write", real_write)
    assert run_cli(["score", models[0], photos, "--out", out], capsys)[0] == 0
    assert out.read_bytes().startswith(kept) and len(list(read_rows(out))) == 37


@pytest.mark.skipif(shutil.which("unshare") is None or not sys.platform.startswith("linux"),
                    reason="a private tmpfs needs Linux's unshare")
def test_a_full_tmpfs_gives_one_line_and_keeps_every_written_row(models, photos, tmp_path):
    """A real full disk: a 256 KiB tmpfs, mounted in a private mount namespace, filled but for 5 pages (the
    state, its next version, the first page of the data and of the index); long names fill them fast."""
    mount, saved, folder = tmp_path / "small", tmp_path / "saved", tmp_path / "photos"
    for made in (mount, saved, folder):
        made.mkdir()
    for path in photos.iterdir():
        shutil.copy(path, folder / f"{'a-photo-with-a-long-descriptive-name-' * 3}{path.name}")
    score = f"{sys.executable} -m kdiqa_edge score {models[0]} {folder} --out {mount}/scores.csv --chunk 6"
    script = "\n".join([
        f"mount -t tmpfs -o size=256k tmpfs {mount} || exit 90",
        f"head -c {256 * 1024 - 20 * 1024} /dev/zero > {mount}/filler",
        f"{score} 2> {saved}/first.err; echo $? > {saved}/first.code",
        f"cp {mount}/scores.csv {saved}/first.csv; cp {mount}/scores.csv.kdiqa.json {saved}/first.json",
        f"rm {mount}/filler",
        f"{score} 2> {saved}/second.err; echo $? > {saved}/second.code",
        f"cp {mount}/scores.csv {saved}/second.csv",
    ])
    ran = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    if ran.returncode == 90 or "unshare failed" in ran.stderr:
        pytest.skip(f"no private tmpfs here: {ran.stderr.strip()[:200]}")
    first_err = (saved / "first.err").read_text()
    assert (saved / "first.code").read_text().strip() == "2", first_err
    assert "Traceback" not in first_err
    assert first_err.strip().splitlines()[-1].startswith(f"error: cannot write {mount}/scores.csv: the disk is full")
    state = json.loads((saved / "first.json").read_text())
    first = (saved / "first.csv").read_bytes()
    assert len(first) == state["bytes"] and 0 < state["rows"] < 37
    assert len(list(csv.reader(first.decode().splitlines()))) == state["rows"] + 1  # whole rows and the header
    assert (saved / "second.code").read_text().strip() == "0", (saved / "second.err").read_text()
    second = (saved / "second.csv").read_bytes()
    assert second.startswith(first)
    rows = list(csv.DictReader(second.decode().splitlines()))
    assert sorted(r["image"] for r in rows) == sorted(str(p) for p in folder.iterdir())
