"""Inter-process locks: one process builds a cache while the others wait and reuse it, and a temporary
file is known to belong to a live process for as long as its writer holds the lock on its claim.

flock(2) locks belong to the open file: the kernel drops them when the process dies, however it dies
(SIGKILL included), which is what tells a crashed writer's leftovers from a live one's work in progress.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
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
