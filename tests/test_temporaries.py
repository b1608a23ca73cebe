"""Nothing left after a kill: every atomic write's temporary is claimed by a lock its writer holds, and the
next export, cache build or checkpoint save in that folder removes exactly the temporaries of dead writers.

The kills are real: a subprocess is SIGKILLed in the middle of the write (no `finally`, no atexit runs).
A killed checkpoint write: test_distill.py (resumed to the same bytes); a killed export: test_reproducible.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kdiqa_edge.io import atomic_path, is_temporary, sweep_temporaries

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock and SIGKILL are POSIX")


def _spawn(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"the child exited ({process.returncode}) first: {process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for the child")
        time.sleep(0.01)


def _kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL


def _temporaries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if is_temporary(p.name))


WRITER = """
    import sys, time
    from pathlib import Path
    from kdiqa_edge.io import atomic_path
    with atomic_path(Path(sys.argv[1])) as tmp:
        tmp.write_bytes(b"half of it")
        print("writing", flush=True)
        time.sleep(600)
"""


def test_sweep_removes_the_temporaries_of_dead_writers_only(tmp_path):
    live, dead = _spawn(WRITER, str(tmp_path / "live.bin")), _spawn(WRITER, str(tmp_path / "dead.bin"))
    try:
        for child in (live, dead):
            assert child.stdout.readline().strip() == "writing"
        _kill(dead)
        (tmp_path / ".old.bin.abcd1234.tmp").write_bytes(b"x")  # unclaimed, as before claims existed, idle
        os.utime(tmp_path / ".old.bin.abcd1234.tmp", (time.time() - 7200,) * 2)
        (tmp_path / ".new.bin.abcd1234.tmp").write_bytes(b"x")  # unclaimed and fresh: perhaps an old version's live write
        (tmp_path / ".notes.abcd1234.txt").write_bytes(b"x")  # a stranger's dotfile: not ours to remove
        assert len(_temporaries(tmp_path)) == 7  # live and dead: temporary + claim each; the three above

        removed = {p.name for p in sweep_temporaries(tmp_path)}
        assert len(removed) == 3 and all(n.startswith((".dead.bin.", ".old.bin.")) for n in removed)
        left = {p.name for p in _temporaries(tmp_path)}
        assert {n.split(".")[1] for n in left} == {"live", "new", "notes"}  # the live writer's work is untouched

        _kill(live)
        sweep_temporaries(tmp_path)
        assert [p.name for p in _temporaries(tmp_path)] == [".new.bin.abcd1234.tmp", ".notes.abcd1234.txt"]
        assert not (tmp_path / "live.bin").exists() and not (tmp_path / "dead.bin").exists()
    finally:
        for child in (live, dead):
            child.kill()
            child.wait()


def test_an_atomic_write_leaves_no_claim_behind(tmp_path):
    with atomic_path(tmp_path / "a.json") as tmp:
        tmp.write_text("{}")
        assert len(_temporaries(tmp_path)) == 2  # the temporary and its claim
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "b.json") as tmp:
        tmp.write_text("{")
        raise RuntimeError("the writer failed")
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


CACHE_BUILDER = """
    import sys, time
    from pathlib import Path
    from kdiqa_edge.data import DatasetSpec, load_dataset
    from kdiqa_edge.data import cache
    from kdiqa_edge.preprocess import PreprocessSpec

    decode = cache.load_preprocessed
    def slow_decode(path, spec):  # a slow disk: the kill lands mid-build
        time.sleep(0.02)
        return decode(path, spec)
    cache.load_preprocessed = slow_decode
    dataset = load_dataset(DatasetSpec(name="synthetic", root=Path(sys.argv[1])))
    cache.ImageCache.build(dataset, PreprocessSpec(size=32), cache_root=Path(sys.argv[2]), workers=1, progress=False)
"""


def test_a_killed_image_cache_build_is_swept_by_the_next_build(small_synthetic, tmp_path):
    from kdiqa_edge.data import ImageCache, load_dataset
    from kdiqa_edge.preprocess import PreprocessSpec

    root = tmp_path / "images"
    child = _spawn(CACHE_BUILDER, str(small_synthetic.root), str(root))
    try:
        _wait_for(lambda: any(p.suffix == ".tmp" for p in root.glob(".synthetic-*")), child)
        time.sleep(0.2)  # some images decoded into the half-built cache
        _kill(child)
    finally:
        child.kill()
    assert len(_temporaries(root)) == 2  # the half-built cache folder and its claim

    cache = ImageCache.build(load_dataset(small_synthetic), PreprocessSpec(size=32), cache_root=root, workers=1,
                             progress=False)
    assert len(cache) == 120 and cache.images.shape == (120, 32, 32, 3)
    assert _temporaries(root) == []


FOLDER_REPLACER = """
    import os, sys, time
    from pathlib import Path
    from kdiqa_edge import io
    renames = []
    def replace(src, dst):
        renames.append((src, dst))
        os.rename(src, dst)
        if len(renames) == 1:  # the old folder is aside, the new one not yet in: the kill comes here
            print("aside", flush=True)
            time.sleep(600)
    io.os.replace = replace
    with io.atomic_path(Path(sys.argv[1])) as tmp:
        tmp.mkdir()
        (tmp / "weights").write_text("new")
"""


def test_a_kill_between_a_folders_two_renames_is_finished_by_the_next_sweep(tmp_path):
    """A folder is replaced in two renames. Before, the old folder was removed first: a kill inside the
    removal left a half-deleted folder under the target's name, and the complete new one was swept away."""
    target = tmp_path / "last"
    target.mkdir()
    (target / "weights").write_text("old")
    child = _spawn(FOLDER_REPLACER, str(target))
    try:
        assert child.stdout.readline().strip() == "aside"
        assert not target.exists()  # what a reader sees in this window: nothing, never half of either
        assert sweep_temporaries(tmp_path) == []  # its writer lives: nothing is touched
        _kill(child)
    finally:
        child.kill()
        child.wait()
    sweep_temporaries(tmp_path)
    assert (target / "weights").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["last"]  # the old folder and the claim are gone


def test_a_folder_replaced_whole_leaves_nothing_aside(tmp_path):
    target = tmp_path / "model.mlpackage"
    for text in ("one", "two"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "data").write_text(text)
    assert (target / "data").read_text() == "two" and [p.name for p in tmp_path.iterdir()] == [target.name]
