"""Atomic writes: a crash never leaves a half-written file behind, and re-runs never lose work.

Every write goes to a hidden temporary beside its target (`.NAME.RANDOM.tmp`, a file or a folder) and is
renamed over the target when complete. The temporary is *claimed*: its writer holds an flock on
`.NAME.RANDOM.claim` for as long as it writes. A process killed mid-write (SIGKILL, OOM, power loss) loses
its lock with its life, so `sweep_temporaries` (run by the next export, cache build or training run in
that folder) removes exactly the temporaries whose writer is gone, and never one a live process holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

CLAIM = ".claim"
REPLACED = ".replaced"  # the folder an atomic write is replacing, renamed aside until the new one is in
UNCLAIMED_IDLE_S = 3600.0  # an unclaimed temporary idle this long is a dead writer's
# `.NAME.RANDOM.SUFFIX`, RANDOM from tempfile's names (8 of [a-z0-9_]): a temporary or its claim
_TEMPORARY = re.compile(r"^(?P<stem>\..+\.[a-z0-9_]{8})(?P<suffix>\.[A-Za-z0-9]+)$")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed over `path`, else removed.

    Works for files and directories (an `.mlpackage` is a directory); a folder is replaced only by a folder
    (a file written over one is a ConfigError, the folder untouched). The temporary is claimed for the
    length of the `with` (see the module docstring), so a sweep after a crash knows it is not live.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _claim(path.parent, path.name) as stem:
        tmp_path = path.parent / (stem + (suffix or ".tmp"))
        try:
            yield tmp_path
            if path.is_dir() and not path.is_symlink():
                if not tmp_path.is_dir():  # a file never replaces a folder: it could hold anything of the user's
                    from kdiqa_edge.errors import ConfigError

                    raise ConfigError(f"cannot write {path}: it is a folder; name a file (inside it, or elsewhere)")
                _replace_folder(tmp_path, path, path.parent / (stem + REPLACED))
            else:
                os.replace(tmp_path, path)
        finally:
            _remove(tmp_path)


def _replace_folder(new: Path, path: Path, aside: Path) -> None:
    """Replace the folder `path` by the folder `new`. Folders cannot be swapped in one rename: the old one is
    renamed aside (still claimed), the new one renamed in, then the old one removed. A kill between the two
    renames leaves no `path` but both complete folders; the next sweep renames the new one in
    (`_sweep_group`). Removing the old folder first, as before, lost both to a kill inside the removal."""
    os.replace(path, aside)
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(aside, path)
        raise
    _remove(aside)


@contextlib.contextmanager
def scratch_dir(folder: str | os.PathLike, name: str = "scratch") -> Iterator[Path]:
    """A claimed hidden folder in `folder` for the block's scratch files, removed at its end; a kill leaves
    it to the next `sweep_temporaries(folder)`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with _claim(folder, name) as stem:
        scratch = folder / (stem + ".tmp")
        scratch.mkdir()
        try:
            yield scratch
        finally:
            _remove(scratch)


@contextlib.contextmanager
def temporaries_in(folder: str | os.PathLike) -> Iterator[Path]:
    """Point Python's default temporary directory at a scratch folder in `folder` for the block.

    Libraries write their own scratch files through `tempfile` (coremltools one .mlpackage per model it
    holds, ONNX Runtime's quantizer its calibration models): in /tmp, a kill leaves them forever; here the
    next run's sweep removes them. `tempfile.tempdir` is process-wide, so use this around a whole command,
    not beside other threads that make temporary files.
    """
    with scratch_dir(folder) as scratch:
        saved = tempfile.tempdir
        tempfile.tempdir = str(scratch)
        try:
            yield scratch
        finally:
            tempfile.tempdir = saved


@contextlib.contextmanager
def _claim(folder: Path, name: str) -> Iterator[str]:
    """A fresh `.NAME.RANDOM` stem whose claim file this process holds locked until the block ends."""
    from kdiqa_edge.data._lock import lock_held_file

    while True:
        fd, claim = tempfile.mkstemp(prefix=f".{name}.", suffix=CLAIM, dir=folder)
        if lock_held_file(fd, claim, wait=True) is not False:  # False: a sweep took it before the lock
            break
        os.close(fd)
    try:
        yield os.path.basename(claim)[: -len(CLAIM)]
    finally:
        with contextlib.suppress(OSError):
            os.unlink(claim)  # before the lock goes: a sweep never sees this claim unlocked and present
        os.close(fd)


def is_temporary(name: str) -> bool:
    """Whether a file or folder name is an atomic write's temporary or claim (never an artifact)."""
    return _TEMPORARY.match(name) is not None


def sweep_temporaries(folder: str | os.PathLike, name: str | None = None,
                      unclaimed: Sequence[str] | None = None) -> list[Path]:
    """Remove the temporaries in `folder` (only those for `name`, if given) whose writer is gone; returns
    what was removed.

    A claimed temporary goes only when its claim's lock can be taken (its writer died); an unclaimed
    `.NAME.RANDOM.tmp` (left by a version before claims) goes once idle for UNCLAIMED_IDLE_S, and in a
    folder that is not only ours (an export's OUT) only if NAME starts with one of `unclaimed`. Where flock
    does not exist (Windows), claimed temporaries are left alone: liveness cannot be told there.
    """
    folder = Path(folder)
    try:
        entries = os.listdir(folder)
    except OSError:
        return []
    groups: dict[str, list[str]] = {}
    for entry in entries:
        match = _TEMPORARY.match(entry)
        if match and (name is None or match["stem"].startswith(f".{name}.")):
            groups.setdefault(match["stem"], []).append(entry)
    removed: list[Path] = []
    for stem, members in sorted(groups.items()):
        ours = unclaimed is None or stem.startswith(tuple(f".{prefix}" for prefix in unclaimed))
        removed += _sweep_group(folder, stem, sorted(m for m in members if not m.endswith(CLAIM)), ours)
    return removed


def _sweep_group(folder: Path, stem: str, temporaries: list[str], ours: bool) -> list[Path]:
    from kdiqa_edge.data._lock import lock_held_file

    claim = folder / (stem + CLAIM)
    try:
        fd = os.open(claim, os.O_RDONLY)
    except FileNotFoundError:  # unclaimed: only the default suffix, so no stranger's dotfile is touched
        return [_remove(folder / t) for t in temporaries if ours and t.endswith(".tmp") and _idle(folder / t)]
    except OSError:
        return []
    try:
        if not lock_held_file(fd, claim, wait=False):  # live (or no way to know)
            return []
        _finish_replace(folder, stem, temporaries)
        removed = [_remove(folder / t) for t in temporaries if (folder / t).exists()]
        claim.unlink()  # while still locked: a new writer's mkstemp can then take the name afresh
        return removed + [claim]
    finally:
        os.close(fd)


def _finish_replace(folder: Path, stem: str, temporaries: list[str]) -> None:
    """A dead writer whose old folder is aside (`REPLACED`) had finished the new one: where the kill came
    before the new one was renamed in, rename it in now (`_replace_folder`)."""
    target = folder / stem[1:-9]  # `.NAME.RANDOM`: RANDOM is 8 characters
    new = [t for t in temporaries if not t.endswith(REPLACED)]
    if stem + REPLACED in temporaries and len(new) == 1 and not os.path.lexists(target):
        os.replace(folder / new[0], target)


def _idle(path: Path) -> bool:
    """Untouched for UNCLAIMED_IDLE_S (it and, for a folder, its entries): an unclaimed temporary cannot say
    whether its writer lives (a version before claims may still be writing it), its age can."""
    try:
        times = [path.stat().st_mtime]
        if path.is_dir():
            with os.scandir(path) as entries:
                times += [e.stat(follow_symlinks=False).st_mtime for e in entries]
    except OSError:
        return False
    return time.time() - max(times) > UNCLAIMED_IDLE_S


def _remove(path: Path) -> Path:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_script(path: str | os.PathLike, comments: list[str], commands: list[str]) -> Path:
    """An executable sh script (atomic) that runs from its own folder, wherever it is called from: its commands
    name the files beside it by name. `comments` without their '# '; lines of `commands` may be comments."""
    lines = ["#!/bin/sh", *(f"# {line}" for line in comments), "set -e",
             'cd "$(dirname "$0")"  # the files it names are beside it', *commands]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        tmp.chmod(0o755)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Keys sorted: the bytes depend on the content, never on the order a dict happened to be filled in."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file, or of a directory's files (sorted relative paths and contents)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file() and not is_temporary(p.name)) \
        if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
    return digest.hexdigest()
