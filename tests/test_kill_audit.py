"""Kills at any moment, then the same command again: the re-run finishes what the first run would have
written and leaves no temporary behind. The kills are real signals to real subprocesses
(as in tests/test_temporaries.py)."""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kdiqa_edge.io import is_temporary
from tests.cli_helpers import run_cli

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock and POSIX signals")


def _spawn(code: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_line(process: subprocess.Popen, marker: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    for line in process.stdout:
        if marker in line:
            return
        if time.monotonic() > deadline:
            break
    process.kill()
    raise AssertionError(f"no {marker!r} from the child ({process.wait()}): {process.stderr.read()[-3000:]}")


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if is_temporary(p.name))


@pytest.fixture(scope="module")
def map_model(tmp_path_factory, tiny_student) -> Path:
    """An FP32 ONNX of the tiny student with its score_map output (`score --map` reads fast maps there)."""
    from kdiqa_edge.export import ExportConfig
    from kdiqa_edge.export import onnx as onnx_target
    from kdiqa_edge.export.pipeline import artifact_meta

    scored = onnx_target.score_model(tiny_student, ExportConfig(with_map=True))
    path = onnx_target.export_fp32(scored, tmp_path_factory.mktemp("map-model") / "model.fp32.onnx", 17)
    onnx_target.set_metadata(path, {**artifact_meta(tiny_student), "target": "onnx", "precision": "fp32",
                                    "input": scored.input_spec(), "outputs": scored.output_names})
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("kill-photos")
    rng = np.random.default_rng(0)
    for index in range(6):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folder / f"p{index}.png")
    return folder


# A score --map run whose fourth overlay takes long: the fifth waits, queued, in the one render thread,
# with its row scored and its name claimed in maps.csv, when Ctrl-C comes.
SLOW_MAPS = """
    import sys, time
    from kdiqa_edge.runtime import maps
    render = maps.render_overlay
    def slow(photo, result, path, label=""):
        if path.name.startswith("p3."):
            print("rendering p3", flush=True)
            time.sleep(4)
        return render(photo, result, path, label)
    maps.render_overlay = slow
    from kdiqa_edge.cli import main
    main(sys.argv[1:])
"""


def test_ctrl_c_with_maps_queued_keeps_no_row_without_its_map(map_model, photos, tmp_path, capsys):
    args = ["score", map_model, photos, "--out", tmp_path / "scores.csv", "--map", tmp_path / "maps",
            "--workers", "1", "--batch-size", "1", "--chunk", "1"]
    child = _spawn(SLOW_MAPS, *args)
    _wait_line(child, "rendering p3")
    time.sleep(1.5)  # the scoring loop runs on and waits for p3's overlay, p4 and p5 queued behind it
    child.send_signal(signal.SIGINT)
    assert child.wait(timeout=60) == 130, child.stderr.read()[-3000:]

    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    with open(tmp_path / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6
    maps = tmp_path / "maps"
    names = sorted(p.name for p in maps.glob("*.map.png"))
    # a row kept whose map was cancelled (its name claimed, no files): mapped again
    assert names == [f"p{index}.map.png" for index in range(6)]
    assert sorted(p.name for p in maps.glob("*.map.npy")) == [n.replace(".png", ".npy") for n in names]


WRITER = """
    import sys, time
    from pathlib import Path
    from kdiqa_edge.io import atomic_path
    with atomic_path(Path(sys.argv[1])) as tmp:
        tmp.write_bytes(b"half a png")
        print("writing", flush=True)
        time.sleep(600)
"""


def test_a_map_a_kill_cut_short_is_swept_by_the_next_score_map(map_model, photos, tmp_path, capsys):
    maps = tmp_path / "maps"
    child = _spawn(WRITER, maps / "p0.map.png")  # as render_overlay writes it
    _wait_line(child, "writing")
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert len(_temporaries(maps)) == 2  # the temporary and its claim

    code, _, err = run_cli(["score", map_model, photos, "--map", maps], capsys)
    assert code == 0, err
    assert _temporaries(maps) == [] and (maps / "p0.map.png").is_file()


def test_sigterm_stops_a_command_as_ctrl_c_does(map_model, photos, tmp_path, capsys):
    """What a scheduler sends: the rows scored so far are committed (one chunk, not yet due) and the command
    says it was interrupted; the process did not just vanish, as SIGKILL's would."""
    out = tmp_path / "scores.csv"
    args = ["score", map_model, photos, "--out", out, "--map", tmp_path / "maps", "--workers", "1",
            "--batch-size", "1", "--chunk", "100"]
    child = _spawn(SLOW_MAPS, *args)
    _wait_line(child, "rendering p3")
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=60) == 130
    assert "rows kept" in child.stderr.read()
    with open(out, newline="") as handle:
        assert len(list(csv.DictReader(handle))) >= 3  # p0..p2 at least: scored before p3's overlay
    assert _temporaries(tmp_path) == []

    code, _, err = run_cli(args, capsys)
    assert code == 0 and "rows from an earlier run kept" in err, err


def test_a_report_a_kill_cut_short_is_swept_by_the_next_bench(map_model, tmp_path, capsys):
    """A kill inside `bench --plot`'s savefig (the one report write that takes a while) left the plot's
    temporary in the user's folder for good: nothing else sweeps that folder."""
    plot = tmp_path / "reports" / "bench.png"
    child = _spawn(WRITER, plot)
    _wait_line(child, "writing")
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    (plot.parent / "notes.txt").write_text("the user's")
    assert len(_temporaries(plot.parent)) == 2

    code, _, err = run_cli(["bench", map_model, "--no-accuracy", "--batch-sizes", "1", "--warmup", "0",
                            "--runs", "1", "--rounds", "1", "--plot", plot,
                            "--json-out", plot.with_suffix(".json")], capsys)
    assert code == 0, err
    assert _temporaries(plot.parent) == [] and plot.is_file()
    assert sorted(p.name for p in plot.parent.iterdir()) == ["bench.json", "bench.png", "notes.txt"]


def test_a_registry_download_a_kill_cut_short_is_swept_by_the_next(tmp_path, monkeypatch):
    """models:/NAME/N is downloaded once into the cache, atomically; a kill mid-download left the partial copy
    (a model's size) there for good: the next download went to a fresh temporary beside it."""
    import hashlib

    import mlflow.artifacts

    from kdiqa_edge.runtime import registry_uri

    monkeypatch.setenv("KDIQA_CACHE", str(tmp_path))
    store = "sqlite:///mlflow.db"
    parent = tmp_path / "mlflow-models" / hashlib.sha256(store.encode()).hexdigest()[:12] / "iqa"
    child = _spawn(WRITER, parent / "3")
    _wait_line(child, "writing")
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert len(_temporaries(parent)) == 2

    def download(artifact_uri, dst_path):
        (Path(dst_path) / "model.onnx").write_bytes(b"onnx")

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", download)
    assert registry_uri._download("iqa", "3", store) == parent / "3"
    assert _temporaries(parent) == [] and (parent / "3" / "model.onnx").is_file()


def _deadlocked() -> None:
    """Blocked for good in native code, as a forked worker on a lock its parent's threads held at the fork: a
    Python signal handler never runs there."""
    import ctypes

    libc = ctypes.CDLL(None)
    mutex = ctypes.create_string_buffer(64)
    libc.pthread_mutex_init(mutex, None)
    libc.pthread_mutex_lock(mutex)
    libc.pthread_mutex_lock(mutex)


@pytest.mark.skipif(sys.platform != "linux", reason="fork, pthread in libc")
def test_sigterm_still_ends_a_forked_worker_blocked_in_native_code():
    """The CLI's SIGTERM handler is not inherited by a forked worker (the unlabeled pool's decoders):
    Pool.terminate SIGTERMs its workers and joins them; a worker that kept the handler outlived it, and the
    command hung."""
    import multiprocessing

    from kdiqa_edge.cli import _terminate_as_interrupt

    with _terminate_as_interrupt():
        worker = multiprocessing.get_context("fork").Process(target=_deadlocked)
        worker.start()
        time.sleep(0.5)
        worker.terminate()
        worker.join(10)
        alive = worker.is_alive()
        if alive:
            worker.kill()
            worker.join()
    assert not alive and worker.exitcode == -signal.SIGTERM


def test_a_hash_index_bucket_a_kill_cut_short_is_swept_by_the_next_save(tmp_path):
    """The unlabeled pool's hash index saves a folder's bucket (an entry per image: megabytes for a big
    folder) in the cache; a kill mid-save left the partial copy there for good."""
    from kdiqa_edge.data.hashindex import HashIndex, Identity

    photo = tmp_path / "photos" / "a.jpg"
    photo.parent.mkdir()
    photo.write_bytes(b"jpeg")
    index = HashIndex(tmp_path / "index")
    place = index.place_file(str(photo))
    bucket = index.bucket_file(place.bucket)
    child = _spawn(WRITER, bucket)
    _wait_line(child, "writing")
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert len(_temporaries(bucket.parent)) == 2

    with index:
        index.put(place, Identity("0" * 64, None), place.mtime_ns + 10**10)
    assert _temporaries(bucket.parent) == [] and bucket.is_file()
