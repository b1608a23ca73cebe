"""Unlabeled images for distillation: folders, path lists and tar shards, as one pool keyed by content.

The soft loss needs no rating, so any photo can teach the student. A SOURCE is a folder (recursive), a
text or CSV list of paths, or webdataset-style tar shards (`shards-{000..099}.tar`, read in place:
`data/tarshards.py`). Each yields `Entry`s (a file, or a tar member's place), read the same way.

`build_pool` hashes every entry: its sha256 is its identity (the teacher feature shards key on it), a
second copy of the same bytes is a duplicate, and an image whose bytes are also a rated image of the test
(or validation) split, or the pristine reference image of a test (or validation) content, is excluded and
counted, so nothing the student is scored on leaks into its training; one already rated for training is
skipped as such. Files that cannot be read, are empty or are not images get a skip report, as rated
datasets do, and so do a folder's files whose suffix is no image type read here, a tar shard that is no
readable tar, and a listed path that is not there; an image that does not decode is found (and skipped)
when its teacher features are computed. The pool is sorted by hash: the same images give the same pool
(and the same feature shards) whatever their sources and order. Hashes (and tar shards' header scans) are
remembered in the hash index (`data/hashindex.py`), keyed by path, size and mtime: a second run reads only
the images that changed.

Pixels come from `decode_entry`, the image cache's decode (`preprocess.load_preprocessed`) for files and
its same steps over the bytes for tar members, in worker processes (`DecodeWorkers`), or from a decoded
uint8 cache (`DecodedImages`, `--image-cache`) where the user has the disk for it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io as _io
import os
import sys
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from kdiqa_edge.data.hashindex import HashIndex, Identity
from kdiqa_edge.data.records import Skip
from kdiqa_edge.data.tarshards import ShardError, expand_braces, read_member, scan_tar
from kdiqa_edge.errors import ConfigError, DataError
from kdiqa_edge.preprocess import (
    DECODE_ERRORS,
    ImageLoadError,
    PreprocessSpec,
    load_preprocessed,
    resize_crop,
    unreadable,
)

# What `score` walks as images (runtime/files.py), without importing the runtime package.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"})
LIST_SUFFIXES = frozenset({".txt", ".lst", ".csv", ".tsv"})
PATH_COLUMNS = ("path", "image", "file", "filename", "filepath")  # a CSV list's path column, first found
HASH_THREADS = 8  # reading and hashing is I/O: threads (file reads and hashlib release the GIL)
OTHER_SUFFIX = "not read: its suffix is no image type read here"  # a folder's file, named in a skip row


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str  # as reports name it: the file, or SHARD.tar:MEMBER
    path: str  # the file, or the tar shard
    offset: int = -1  # a tar member's first byte (-1: a plain file)
    size: int = -1  # a tar member's length
    member: str = ""  # a tar member's name in its shard

    @property
    def in_tar(self) -> bool:
        return self.offset >= 0

    def read(self) -> bytes:
        return read_member(self.path, self.offset, self.size) if self.in_tar else Path(self.path).read_bytes()


# ----------------------------------------------------------------------------------------------------------
# Sources


def source_entries(source: str | os.PathLike, index: HashIndex | None = None) -> tuple[list[Entry], list[Skip]]:
    """The images one SOURCE names, and a skip per thing in it that cannot be one (a tar shard's scan read
    from `index` where it is recorded)."""
    text = str(source)
    if "{" in text or text.endswith(".tar"):
        return _tar_entries(text, index)
    path = Path(text).expanduser()
    if path.is_dir():
        return _folder_entries(path)
    if path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        return _list_entries(path)
    if path.is_file():
        raise ConfigError(f"--unlabeled {text}: not a folder, a list of paths (.txt, .csv) or a tar shard")
    raise ConfigError(f"--unlabeled {text}: no such folder or file")


def check_source(source: str | os.PathLike) -> None:
    """A one-line error for a SOURCE that names nothing (cheap: before any other work)."""
    text = str(source)
    if "{" in text or text.endswith(".tar"):
        shards = expand_braces(str(Path(text).expanduser()))
        if not any(Path(shard).is_file() for shard in shards):
            raise ConfigError(f"--unlabeled {text}: no tar shard found ({len(shards)} named)")
    elif not Path(text).expanduser().exists():
        raise ConfigError(f"--unlabeled {text}: no such folder or file")


def _tar_entries(pattern: str, index: HashIndex | None) -> tuple[list[Entry], list[Skip]]:
    entries, skipped = [], []
    shards = expand_braces(str(Path(pattern).expanduser()))
    for shard in shards:
        if not Path(shard).is_file():
            skipped.append(Skip(shard, "tar shard not found"))
            continue
        place = index.place_shard(shard) if index is not None else None
        try:
            scan = scan_tar(shard) if place is None else index.scan(place, functools.partial(scan_tar, shard))
        except ShardError as exc:  # empty, compressed, not a tar: the other shards go on
            skipped.append(Skip(shard, exc.reason))
            continue
        entries += [Entry(f"{shard}:{m.name}", shard, m.offset, m.size, m.name) for m in scan.members
                    if Path(m.name).suffix.lower() in IMAGE_SUFFIXES]
        skipped += [Skip(f"{shard}:{name}", reason) for name, reason in scan.refused]
        if scan.truncated:
            skipped.append(Skip(shard, f"truncated tar shard ({scan.truncated}); the images before it are used"))
    if not any(Path(s).is_file() for s in shards):
        raise ConfigError(f"--unlabeled {pattern}: no tar shard found ({len(shards)} named)")
    return entries, skipped


def _folder_entries(folder: Path) -> tuple[list[Entry], list[Skip]]:
    entries, skipped = [], []
    seen: set[tuple[int, int]] = set()  # (device, inode) of folders walked: a symlink loop is walked once

    def walk(directory: Path) -> None:
        try:
            stat = directory.stat()
            children = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            skipped.append(Skip(str(directory), f"folder cannot be listed: {exc.strerror or exc}"))
            return
        if (stat.st_dev, stat.st_ino) in seen:
            return
        seen.add((stat.st_dev, stat.st_ino))
        for child in children:
            path = Path(child.path)
            if child.is_dir():
                walk(path)
            elif path.suffix.lower() in IMAGE_SUFFIXES:
                entries.append(Entry(str(path), str(path)))
            else:  # sidecars (.xmp, .json) and image types not read here (.heic, .avif): listed, not read
                skipped.append(Skip(str(path), f"{OTHER_SUFFIX} ({path.suffix or 'no suffix'})"))

    walk(folder)
    return entries, skipped


def _list_entries(path: Path) -> tuple[list[Entry], list[Skip]]:
    """One path a line (.txt, .lst) or a CSV's path column; relative paths are the list's folder's."""
    if path.suffix.lower() in (".csv", ".tsv"):
        from kdiqa_edge.data.readers import read_csv_rows

        header, rows = read_csv_rows(path)
        column = next((c for c in header if c.strip().lower() in PATH_COLUMNS), header[0] if header else None)
        names = [(row.get(column) or "").strip() for row in rows] if column else []
    else:
        try:
            names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read the list {path}: {exc}") from None
        names = [n for n in names if n and not n.startswith("#")]
    entries, skipped = [], []
    for name in names:
        file = Path(name).expanduser()
        file = file if file.is_absolute() else path.parent / file
        if file.is_file():
            entries.append(Entry(str(file), str(file)))
        else:
            skipped.append(Skip(str(file), "a folder, not an image file" if file.is_dir() else "file not found"))
    return entries, skipped


# ----------------------------------------------------------------------------------------------------------
# The pool


@dataclasses.dataclass
class UnlabeledPool:
    entries: list[Entry]  # the usable images, sorted by content hash
    hashes: list[str]  # sha256 of each entry's bytes
    skipped: list[Skip]  # what was left out, and why
    counts: dict[str, int]  # found (images and refused tar members), used, duplicates, in_test_split,
    # in_val_split, test_references and val_references (reference images of test or validation contents),
    # already_rated, unreadable (images), unsafe (tar members refused), not_read (tar shards, folders or
    # listed paths), other_files (a folder's files whose suffix is no image type)

    def __len__(self) -> int:
        return len(self.entries)

    def without(self, rows: Iterable[int], reasons: Mapping[int, str]) -> UnlabeledPool:
        """The pool less `rows` (images that did not decode), each skipped with its reason."""
        drop = set(rows)
        keep = [i for i in range(len(self.entries)) if i not in drop]
        counts = {**self.counts, "unreadable": self.counts["unreadable"] + len(drop), "used": len(keep)}
        return UnlabeledPool([self.entries[i] for i in keep], [self.hashes[i] for i in keep],
                             self.skipped + [Skip(self.entries[i].name, reasons[i]) for i in sorted(drop)], counts)

    def summary(self) -> str:
        c = self.counts
        parts = [f"{c['used']} of {c['found']} unlabeled images used"]
        for key, what in SUMMARY:
            if c.get(key):
                parts.append(f"{c[key]} {what}")
        if c.get("other_files"):  # a row each in the skip list, here by suffix: a folder of sidecars is many
            kinds = _by_suffix(self.skipped)
            parts.append(f"{c['other_files']} other files not read for their suffix ({kinds})")
        text = ", ".join(parts)
        if not self.entries and self.skipped:  # what the one-line error of an empty pool says: why
            telling = [s for s in self.skipped if not s.reason.startswith(OTHER_SUFFIX)] or self.skipped
            text += f"; first: {telling[0].image}: {telling[0].reason}"
        return text


def _by_suffix(skipped: list[Skip]) -> str:
    """'2 .xmp, 1 .heic, 1 no suffix': the files skipped for their suffix, most common first."""
    counts: dict[str, int] = {}
    for skip in skipped:
        if skip.reason.startswith(OTHER_SUFFIX):
            suffix = Path(skip.image).suffix.lower() or "no suffix"
            counts[suffix] = counts.get(suffix, 0) + 1
    return ", ".join(f"{n} {suffix}" for suffix, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


SUMMARY = (("in_test_split", "also in the rated test split (excluded)"),
           ("test_references", "reference images of rated test contents (excluded)"),
           ("in_val_split", "also in the rated validation split (excluded)"),
           ("val_references", "reference images of rated validation contents (excluded)"),
           ("already_rated", "already rated for training"), ("duplicates", "duplicates"),
           ("unreadable", "unreadable"), ("unsafe", "unsafe tar members"),
           ("not_read", "tar shards, folders or listed paths not read"))


# What an unlabeled image's bytes may also be, first wins: a test exclusion is the count that matters most.
EXCLUSION_ORDER = ("test", "test_ref", "val", "val_ref", "train")


def rated_hashes(dataset, split, index: HashIndex | None = None) -> dict[str, str]:
    """sha256 of each rated image -> its split part (test, val, train), and of the reference image of each
    test or validation content -> test_ref or val_ref: what unlabeled images must not be.

    A content (a record's `ref`) is a test content where any of its images is in the test split (all of
    them, split by reference), else a validation content where any is in the validation split; its
    reference files are where the dataset's layout keeps them (`readers.reference_files`). Training contents'
    references are training content: not in the map, usable.
    """
    from kdiqa_edge.data.readers import reference_files

    parts = split.assignment(len(dataset.records))
    files = [(dataset.path(i), part) for i, part in enumerate(parts)]
    contents: dict[str, str] = {}
    for record, part in zip(dataset.records, parts):
        if record.ref is not None and part in ("test", "val") and contents.get(record.ref) != "test_ref":
            contents[record.ref] = f"{part}_ref"
    for ref, paths in reference_files(dataset, contents).items():
        files += [(path, contents[ref]) for path in paths]
    entries = [Entry(str(path), str(path)) for path, _ in files]
    with index or HashIndex() as hash_index:
        identities = identify(entries, hash_index)
    found: dict[str, str] = {}
    for identity, (_, part) in zip(identities, files):
        digest = identity.sha256
        if digest is not None and part and (digest not in found or _first(part, found[digest])):
            found[digest] = part
    return found


def _first(part: str, other: str) -> bool:
    return EXCLUSION_ORDER.index(part) < EXCLUSION_ORDER.index(other)


def _identify(entry: Entry) -> tuple[Identity, bool, int]:
    """(sha256 and why it is not a usable image, whether that outcome is the bytes' (worth recording), when
    the read ended): the bytes read once, their image header checked."""
    try:
        data = entry.read()
    except OSError as exc:
        return Identity(None, f"unreadable: {exc.strerror or exc}"), False, time.time_ns()
    hashed_ns = time.time_ns()
    if entry.in_tar and len(data) < entry.size:
        return Identity(None, "cut short: the tar shard changed since it was scanned"), False, hashed_ns
    digest = hashlib.sha256(data).hexdigest()
    if not data:
        return Identity(digest, "empty file (0 bytes)"), True, hashed_ns
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Image.open(_io.BytesIO(data))  # the header only
    except DECODE_ERRORS as exc:  # a bomb over twice Pillow's pixel limit, no image format, a malformed header
        return Identity(digest, unreadable(exc)), True, hashed_ns
    return Identity(digest, None), True, hashed_ns


def _hashed(entries: list[Entry]):
    """`_identify` of each entry, in order, in threads. Not worker processes: on the 2-core EPYC they were
    slower (`benchmarks/bench_unlabeled.py`'s hashing part), file reads and hashlib release the GIL."""
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        yield from pool.map(_identify, entries)


def identify(entries: Sequence[Entry], index: HashIndex, advance=None) -> list[Identity]:
    """Each entry's `Identity`: from `index` where its file (or shard) is unchanged, else read and hashed
    (in threads) and recorded. `advance(n)`: progress."""
    advance = advance or (lambda n: None)
    shards: dict[str, object] = {}
    places = []
    for entry in entries:
        if entry.in_tar:
            if entry.path not in shards:
                shards[entry.path] = index.place_shard(entry.path)
            shard = shards[entry.path]
            places.append(index.place_member(shard, entry.member, entry.offset) if shard is not None else None)
        else:
            places.append(index.place_file(entry.path))
    found = [index.get(place) for place in places]
    todo = [i for i, identity in enumerate(found) if identity is None]
    advance(len(entries) - len(todo))
    for i, (identity, lasting, hashed_ns) in zip(todo, _hashed([entries[i] for i in todo])):
        found[i] = identity
        if lasting:
            index.put(places[i], identity, hashed_ns)
        advance(1)
    return found


EXCLUDED = {"test": ("in_test_split", "also in the rated test split (same content): excluded, never trained on"),
            "test_ref": ("test_references", "the reference image of a rated test content (same content): "
                                            "excluded, never trained on"),
            "val": ("in_val_split", "also in the rated validation split (same content): excluded"),
            "val_ref": ("val_references", "the reference image of a rated validation content (same content): "
                                          "excluded"),
            "train": ("already_rated", "already a rated training image (same content)")}


def build_pool(sources: Sequence[str | os.PathLike], exclude: Mapping[str, str] | None = None,
               progress: bool = True, index: HashIndex | None = None) -> UnlabeledPool:
    """Every image of `sources`: hashed (or its hash read from the hash index), deduplicated, rated images
    excluded (`rated_hashes`)."""
    from kdiqa_edge.data._progress import Progress

    with index or HashIndex() as hash_index:
        entries, skipped = [], []
        for source in sources:
            found, bad = source_entries(source, hash_index)
            entries += found
            skipped += bad
        with Progress(progress, len(entries), "hashing unlabeled images") as advance:
            identities = identify(entries, hash_index, advance)
    exclude = exclude or {}
    counts = {"found": len(entries), "duplicates": 0, **{key: 0 for key, _ in EXCLUDED.values()},
              "unreadable": 0, "unsafe": 0, "not_read": 0, "other_files": 0}
    for skip in skipped:  # what the sources held besides images; a truncated shard's earlier images are used
        if not skip.reason.startswith("truncated tar shard"):
            counts[_source_skip_kind(skip.reason)] += 1
    counts["found"] += counts["unsafe"]
    first: dict[str, str] = {}
    kept: list[tuple[str, Entry]] = []
    for entry, identity in zip(entries, identities):
        digest = identity.sha256
        if identity.problem is not None:
            counts["unreadable"] += 1
            skipped.append(Skip(entry.name, identity.problem))
        elif digest in exclude:
            key, why = EXCLUDED[exclude[digest]]
            counts[key] += 1
            skipped.append(Skip(entry.name, why))
        elif digest in first:
            counts["duplicates"] += 1
            skipped.append(Skip(entry.name, f"duplicate of {first[digest]}"))
        else:
            first[digest] = entry.name
            kept.append((digest, entry))
    kept.sort(key=lambda pair: pair[0])
    counts["used"] = len(kept)
    return UnlabeledPool([e for _, e in kept], [h for h, _ in kept], skipped, counts)


def _source_skip_kind(reason: str) -> str:
    if reason.startswith("unsafe tar member"):
        return "unsafe"
    return "other_files" if reason.startswith(OTHER_SUFFIX) else "not_read"


def pool_key(pool: UnlabeledPool, spec: PreprocessSpec) -> str:
    """The pool's images (by content) at this preprocessing: what a decoded cache is keyed by."""
    digest = hashlib.sha256(spec.key.encode())
    for h in pool.hashes:
        digest.update(h.encode())
    return digest.hexdigest()[:24]


# ----------------------------------------------------------------------------------------------------------
# Pixels


def decode_bytes(data: bytes, spec: PreprocessSpec) -> np.ndarray:
    """`preprocess.load_preprocessed` over bytes (a tar member): preprocess's own opener (the same checks,
    draft rule, EXIF, RGB) and resize, so a member decodes to the pixels of the same file on disk."""
    from kdiqa_edge.preprocess import open_image_bytes

    return resize_crop(open_image_bytes(data, spec.size if spec.draft else None), spec)


def decode_entry(entry: Entry, spec: PreprocessSpec) -> np.ndarray:
    """uint8 HWC model input of one entry; raises ImageLoadError (its reason) for a bad one."""
    if not entry.in_tar:
        return load_preprocessed(entry.path, spec)
    try:
        data = entry.read()
    except OSError as exc:
        raise ImageLoadError(f"unreadable: {exc.strerror or exc}") from None
    return decode_bytes(data, spec)


def decode_chunk(job: tuple[list[Entry], dict]) -> tuple[np.ndarray, dict[int, str]]:
    """Worker: [n, S, S, 3] uint8 of `entries` (zeros where one fails) and {row: reason} of the failures."""
    entries, spec_dict = job
    spec = PreprocessSpec.from_dict(spec_dict)
    pixels = np.zeros((len(entries), spec.size, spec.size, 3), np.uint8)
    failures = {}
    for row, entry in enumerate(entries):
        try:
            pixels[row] = decode_entry(entry, spec)
        except ImageLoadError as exc:
            failures[row] = exc.reason
    return pixels, failures


class DecodeWorkers:
    """Worker processes that decode entries; `submit(entries)` -> a handle whose `.get()` gives
    `decode_chunk`'s result, in the caller's order whatever order the workers finish in.

    `workers=0` decodes in the calling thread (tests, tiny pools). Forked on Linux, as the image cache's
    workers are (no `__main__` guard needed; the workers run only PIL and numpy).
    """

    def __init__(self, spec: PreprocessSpec, workers: int = 2):
        self.spec, self.workers = spec.to_dict(), workers
        self._pool = None
        if workers > 0:
            import multiprocessing

            context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
            self._pool = context.Pool(workers)

    def submit(self, entries: Sequence[Entry]):
        """Decode `entries` split over the workers; returns a handle with `.get()`."""
        if self._pool is None or len(entries) <= 1:
            return _Ready(decode_chunk((list(entries), self.spec)))
        parts = np.array_split(np.arange(len(entries)), min(self.workers, len(entries)))
        handles = [self._pool.apply_async(decode_chunk, (([entries[i] for i in part], self.spec),))
                   for part in parts if len(part)]
        return _Joined(handles, [int(part[0]) for part in parts if len(part)])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Ready:
    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


class _Joined:
    def __init__(self, handles, starts: list[int]):
        self.handles, self.starts = handles, starts

    def get(self):
        results = [h.get() for h in self.handles]
        pixels = np.concatenate([p for p, _ in results]) if len(results) > 1 else results[0][0]
        failures = {start + row: why for start, (_, fails) in zip(self.starts, results) for row, why in fails.items()}
        return pixels, failures


# ----------------------------------------------------------------------------------------------------------
# The decoded cache (--image-cache)

DECODED_FILE = "images.u8"
DECODED_META = "meta.json"
DECODED_FORMAT = "kdiqa-edge/unlabeled-images/1"


def decoded_images(pool: UnlabeledPool, spec: PreprocessSpec, workers: int = 2, progress: bool = True,
                   root: Path | None = None) -> tuple[np.ndarray, dict[int, str]]:
    """uint8 memmap [N, S, S, 3] of the pool's images (built once, atomically; reused while the pool and
    preprocessing are the same) and {row: reason} of the images that did not decode."""
    from kdiqa_edge import paths
    from kdiqa_edge.data._progress import Progress
    from kdiqa_edge.io import atomic_path, read_json, sweep_temporaries, write_json

    folder = Path(root or paths.cache_dir() / "unlabeled-images") / pool_key(pool, spec)
    shape = (len(pool), spec.size, spec.size, 3)
    try:
        meta = read_json(folder / DECODED_META)
        if meta.get("format") == DECODED_FORMAT and tuple(meta.get("shape", ())) == shape:
            failures = {int(k): v for k, v in meta.get("failed", {}).items()}
            return np.memmap(folder / DECODED_FILE, np.uint8, mode="r", shape=shape), failures
    except (OSError, ValueError):
        pass
    sweep_temporaries(folder.parent)
    chunk = 64
    failures: dict[int, str] = {}
    with atomic_path(folder) as tmp, DecodeWorkers(spec, workers) as decoder, \
            Progress(progress, len(pool), "decoding unlabeled images") as advance:
        tmp.mkdir(parents=True)
        out = np.memmap(tmp / DECODED_FILE, np.uint8, mode="w+", shape=shape) if len(pool) else None
        starts = list(range(0, len(pool), chunk))
        pending = [decoder.submit(pool.entries[s:s + chunk]) for s in starts[:4]]
        for n, start in enumerate(starts):
            pixels, failed = pending.pop(0).get()
            if n + 4 < len(starts):
                pending.append(decoder.submit(pool.entries[starts[n + 4]:starts[n + 4] + chunk]))
            out[start:start + len(pixels)] = pixels
            failures.update({start + row: why for row, why in failed.items()})
            advance(len(pixels))
        if out is not None:
            out.flush()
            del out
        else:
            (tmp / DECODED_FILE).write_bytes(b"")
        write_json(tmp / DECODED_META, {"format": DECODED_FORMAT, "shape": list(shape),
                                        "preprocess": spec.to_dict(), "failed": {str(k): v for k, v in failures.items()}})
    if not len(pool):
        return np.zeros(shape, np.uint8), failures
    return np.memmap(folder / DECODED_FILE, np.uint8, mode="r", shape=shape), failures
