"""Inter-process locks: one process builds a cache while the others wait and reuse it, and a temporary
file is known to belong to a live process for as long as its writer holds the lock on its claim.

flock(2) locks belong to the open file: the kernel drops them when the process dies, however it dies
(SIGKILL included), which is what tells a crashed writer's leftovers from a live one's work in progress.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None  # type: ignore[assignment]

LOCKS_WORK = fcntl is not None


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if needed) so that two processes (five engineers'
    test runs, a training run and a `data info`) do not build the same cache at the same time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # no lock; the atomic rename still keeps caches whole
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def waiting_lock(path: Path, on_wait: Callable[[str], None]) -> Iterator[None]:
    """`file_lock` that writes the holder's pid into the file and, when another process holds it, calls
    `on_wait(" (pid N)")` once before waiting for it (a user should know why nothing happens)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if lock_held_file(fd, path, wait=False) is False:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            on_wait(f" (pid {holder})" if holder.isdigit() else "")
            lock_held_file(fd, path, wait=True)
        with contextlib.suppress(OSError):  # who holds it, for the line above (a full disk may refuse)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # drops the flock; the file stays (removing it would race the next holder)


def lock_held_file(fd: int, path: str | os.PathLike, wait: bool) -> bool | None:
    """Lock the open file `fd`, which was opened as `path`, exclusively.

    True: locked, and `path` is still that file (a sweep may have removed it while it was unlocked).
    False: another process holds it (only with wait=False), or `path` is no longer this file (unlocked again).
    None: this platform has no flock (nothing is known).
    """
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError:  # a filesystem without locks (some network mounts): nothing is known
        return None
    if _same_file(fd, path):
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def _same_file(fd: int, path: str | os.PathLike) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)
