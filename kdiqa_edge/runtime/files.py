"""The image files under paths and folders, and everything that could not be looked at, each with a reason.

Nothing is dropped without a word: a dangling symlink, a folder that cannot be listed, a symlink loop, a FIFO
named like an image, an entry whose stat fails: each comes out as (path, reason), for a row in the results.
Files without an image suffix inside folders are counted, not listed (a folder of photos holds sidecars).
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

# what a folder is searched for: the formats Pillow reads (AVIF built in since Pillow 11.2), and HEIC/HEIF (an
# iPhone's photos), which need pillow-heif: without it each is a row that says so, not a file ignored unsaid
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".tif", ".tiff", ".webp",
                            ".gif", ".ppm", ".pgm", ".avif", ".heic", ".heif"})


@dataclasses.dataclass
class ImageFiles:
    """Iterate (path, None) for each image file to score and (path, reason) for each entry that cannot be.

    A path given directly is always tried (the decoder reports it if it is no image), unless it does not
    exist: then it gets a row and is listed in `missing`, or, holding `*`, `?` or `[`, it is a pattern
    (`glob`, `**` recursive) whose matches are tried. Folders are walked depth first in name order,
    following symlinked folders once each, except the `exclude` folders (the run's own outputs, such as
    `score --map`'s overlays): met inside a folder, each is passed over and listed in `excluded`; named
    directly, it is searched. `ignored` counts the files without an image suffix met in folders. All three
    are complete once the iteration is."""

    inputs: Sequence[str | os.PathLike]
    suffixes: frozenset[str] = IMAGE_SUFFIXES
    exclude: Sequence[str | os.PathLike] = ()
    ignored: int = 0
    missing: list[Path] = dataclasses.field(default_factory=list)  # named paths that do not exist
    excluded: list[Path] = dataclasses.field(default_factory=list)

    def __iter__(self) -> Iterator[tuple[Path, str | None]]:
        self.ignored, self.missing, self.excluded = 0, [], []
        self._exclude = {os.path.realpath(folder) for folder in self.exclude}  # created by now, or later
        for item in map(Path, self.inputs):
            if item.is_dir():
                yield from self._walk(item, set())
                continue
            try:
                item.stat()
            except OSError as exc:
                if exc.errno == errno.ENOENT and glob.has_magic(str(item)):  # a pattern no shell expanded
                    yield from self._matches(item)
                    continue
                if exc.errno in (errno.ENOENT, errno.ENOTDIR):  # a typo, not an unreadable image
                    self.missing.append(item)
                    yield item, (f"dangling symlink (to {os.readlink(item)})" if item.is_symlink()
                                 else "no such file or directory")
                    continue
            yield item, None  # anything else (permission denied, a loop) is the decoder's to report

    def _matches(self, pattern: Path) -> Iterator[tuple[Path, str | None]]:
        """A quoted pattern (`'photos/*.jpg'`, `'photos/**/*.png'`), as Ultralytics' sources take: the files it
        matches in name order, a folder it matches searched; none is a missing path, as a typo is."""
        matches = sorted(glob.glob(str(pattern), recursive=True))
        if not matches:
            self.missing.append(pattern)
            yield pattern, "no file matches this pattern"
        for match in map(Path, matches):
            if match.is_dir():
                yield from self._walk(match, set())
            else:
                yield match, None

    def _walk(self, folder: Path, seen: set[tuple[int, int]]) -> Iterator[tuple[Path, str | None]]:
        try:
            info = folder.stat()
            if (info.st_dev, info.st_ino) in seen:
                yield folder, "already scanned (a symlink to a folder met before: a loop or a second way in)"
                return
            seen.add((info.st_dev, info.st_ino))
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as exc:
            yield folder, f"cannot list the folder: {reason(exc)}"
            return
        for entry in entries:
            yield from self._entry(Path(entry.path), entry, seen)

    def _entry(self, path: Path, entry: os.DirEntry, seen) -> Iterator[tuple[Path, str | None]]:
        try:
            if entry.is_dir():  # follows a symlink: a linked folder of photos is scanned (once)
                if self._exclude and os.path.realpath(path) in self._exclude:
                    self.excluded.append(path)
                else:
                    yield from self._walk(path, seen)
                return
            image = path.suffix.lower() in self.suffixes
            if entry.is_file():
                if image:
                    yield path, None
                else:
                    self.ignored += 1
            elif entry.is_symlink():  # its target is missing (or cannot be reached)
                target = os.readlink(path)
                if image or Path(target).suffix.lower() in self.suffixes:
                    yield path, f"dangling symlink (to {target}: {reason(_stat_error(path))})"
                else:
                    self.ignored += 1
            elif image:  # a FIFO, socket or device named like an image: opening it could block forever
                yield path, "not a regular file"
            else:
                self.ignored += 1
        except OSError as exc:  # ELOOP, EACCES on a symlinked folder...
            yield path, reason(exc)


def reason(exc: OSError) -> str:
    """A one-line reason from an OSError, without the path (the row already names it)."""
    names = {errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.ENOENT: "not found",
             errno.ELOOP: "symlink loop (too many levels of symbolic links)", errno.EIO: "I/O error",
             errno.ENAMETOOLONG: "name too long"}
    return names.get(exc.errno, exc.strerror or type(exc).__name__)


def _stat_error(path: Path) -> OSError:
    try:
        path.stat()
    except OSError as exc:
        return exc
    return FileNotFoundError(errno.ENOENT, "not found")
