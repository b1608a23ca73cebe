"""The content-hash index: every unlabeled image's sha256 remembered on disk, so a second run reads only
what changed.

Content hashes are what the teacher-feature shards and the test-split exclusion key on, and computing them
reads every byte of every image: at a million photos, a full pass over the data set before any work. The
index keeps each one under the cache (`paths.cache_dir() / "hash-index"`), keyed by

- a file: its resolved path, size and mtime_ns;
- a tar member: its shard's resolved path, size and mtime_ns, and its name and offset in the shard;

so an image is read again only when its file (or shard) changed. A tar shard's header scan is kept the same
way, keyed by the shard's size and mtime_ns. The outcome of a read that failed for a reason of the bytes
(empty, not an image) is kept too; one that failed for a reason of the moment (an I/O error) is not.

Storage: one bucket per folder (its files) or tar shard (its scan and members), a compact JSON file in
`hash-index/<2 hex>/<id>.json` (the id: sha256 of the resolved folder or shard path). A bucket is written
atomically (`kdiqa_edge.io`), under its own lock (`data/_lock.py`): read again, merged with what this run
found, written, so two processes hashing at once both keep their work. Buckets are saved every FLUSH_S and
when the work ends, however it ends, so an interrupted run keeps what it hashed. An unreadable bucket is
rebuilt, with a one-line note.

Racily clean files (git's term): a file modified in the same clock tick as the stat this run keyed it by
would keep its size and mtime, and its old hash would be trusted. So an entry whose mtime is within RACY_NS
of the moment it was hashed is used but not recorded; the next run reads it again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from stat import S_ISLNK

from kdiqa_edge.data._lock import file_lock

FORMAT = "kdiqa-edge/hash-index/1"
RACY_NS = 2_000_000_000  # 2 s: FAT's mtime granularity, the coarsest in common use
FLUSH_S = 60.0  # save the buckets that changed at least this often during a long hashing pass


@dataclasses.dataclass(frozen=True)
class Identity:
    sha256: str | None  # of the bytes (None: they could not be read)
    problem: str | None  # why it is not a usable image (None: it is one)


@dataclasses.dataclass(frozen=True)
class Place:
    """Where an entry's identity lives in the index: which bucket, under which key, valid for which stat."""

    bucket: str  # the resolved folder or tar shard
    key: str  # a file's name, or a member's OFFSET:NAME
    size: int  # the file's or the shard's
    mtime_ns: int
    tar: bool = False  # a tar shard's bucket


def _note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr, flush=True)


class HashIndex:
    """`with HashIndex() as index:` look entries up (`get`), record what was hashed (`put`), read tar scans
    (`scan`); the buckets that changed are saved when the block ends."""

    def __init__(self, root: str | os.PathLike | None = None, note: Callable[[str], None] | None = None):
        from kdiqa_edge import paths

        self.root = Path(root) if root is not None else paths.cache_dir() / "hash-index"
        self.note = note or _note
        self._buckets: dict[str, dict] = {}  # resolved folder or shard -> its bucket as loaded (and grown)
        self._dirty: dict[str, dict] = {}  # bucket -> {key: record} this run added
        self._scans: dict[str, dict] = {}  # shard -> its scan, recorded this run
        self._tars: dict[str, tuple[int, int]] = {}  # shard -> its (size, mtime_ns) now
        self._real_dirs: dict[str, str] = {}
        self._saved_at = time.monotonic()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.save()

    # -- keys

    def place_file(self, path: str) -> Place | None:
        """A file's place, from a stat now (None: it cannot be stat'ed; it is hashed and not recorded)."""
        try:
            stat = os.lstat(path)  # one call for a plain file; a link is resolved to its target
            if S_ISLNK(stat.st_mode):
                real = os.path.realpath(path)
                stat = os.stat(real)
            else:
                real = os.path.join(self._real_dir(os.path.dirname(path) or "."), os.path.basename(path))
        except OSError:
            return None
        folder, name = os.path.split(real)
        return Place(folder, name, stat.st_size, stat.st_mtime_ns)

    def place_member(self, shard: Place, name: str, offset: int) -> Place:
        return Place(shard.bucket, f"{offset}:{name}", shard.size, shard.mtime_ns, tar=True)

    def place_shard(self, path: str) -> Place | None:
        try:
            real = os.path.realpath(path)
            stat = os.stat(real)
        except OSError:
            return None
        return Place(real, "", stat.st_size, stat.st_mtime_ns, tar=True)

    def _real_dir(self, folder: str) -> str:
        if folder not in self._real_dirs:
            self._real_dirs[folder] = os.path.realpath(folder)
        return self._real_dirs[folder]

    # -- entries

    def get(self, place: Place | None) -> Identity | None:
        """The identity recorded for `place` at its current size and mtime, else None (read it)."""
        if place is None:
            return None
        record = self._bucket(place.bucket)["entries"].get(place.key)
        if record is None or record[0] != place.size or record[1] != place.mtime_ns:
            return None
        return Identity(record[2], record[3])

    def put(self, place: Place | None, identity: Identity, hashed_ns: int) -> None:
        """Record `identity` (read after `place`'s stat, finished at `hashed_ns`), unless it may be racy."""
        if place is None or hashed_ns - place.mtime_ns < RACY_NS:
            return
        record = [place.size, place.mtime_ns, identity.sha256, identity.problem]
        self._bucket(place.bucket)["entries"][place.key] = record
        self._dirty.setdefault(place.bucket, {})[place.key] = record
        if place.tar:
            self._tars[place.bucket] = (place.size, place.mtime_ns)
        if time.monotonic() - self._saved_at > FLUSH_S:
            self.save()

    # -- tar scans

    def scan(self, shard: Place, scan_fn):
        """The shard's `tarshards.TarScan`: recorded, or `scan_fn()` now (and recorded)."""
        from kdiqa_edge.data.tarshards import TarMember, TarScan

        saved = self._bucket(shard.bucket).get("scan")
        if saved and saved["size"] == shard.size and saved["mtime_ns"] == shard.mtime_ns:
            return TarScan([TarMember(*m) for m in saved["members"]], [tuple(r) for r in saved["refused"]],
                           saved["truncated"])
        scan = scan_fn()
        if time.time_ns() - shard.mtime_ns >= RACY_NS:
            record = {"size": shard.size, "mtime_ns": shard.mtime_ns, "truncated": scan.truncated,
                      "members": [[m.name, m.offset, m.size] for m in scan.members],
                      "refused": [list(r) for r in scan.refused]}
            self._bucket(shard.bucket)["scan"] = self._scans[shard.bucket] = record
            self._dirty.setdefault(shard.bucket, {})
            self._tars[shard.bucket] = (shard.size, shard.mtime_ns)
        return scan

    # -- storage

    def bucket_file(self, bucket: str) -> Path:
        ident = hashlib.sha256(bucket.encode("utf-8", "surrogateescape")).hexdigest()[:32]
        return self.root / ident[:2] / f"{ident}.json"

    def _bucket(self, bucket: str) -> dict:
        if bucket not in self._buckets:
            self._buckets[bucket] = self._load(bucket, quiet=False)
        return self._buckets[bucket]

    def _load(self, bucket: str, quiet: bool) -> dict:
        path = self.bucket_file(bucket)
        try:
            data = json.loads(path.read_bytes())
            if not (isinstance(data, dict) and data.get("format") == FORMAT and data.get("path") == bucket
                    and isinstance(data.get("entries"), dict)):
                raise ValueError("not a hash-index bucket of this version")
            return data
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if not quiet:
                why = (str(exc).splitlines() or [""])[0][:120]
                self.note(f"the hash index {path} was unreadable ({type(exc).__name__}: {why}): rebuilt; "
                          f"its images are read again")
        return {"format": FORMAT, "path": bucket, "entries": {}}

    def save(self) -> None:
        """Merge what this run found into each changed bucket on disk, under its lock, atomically."""
        from kdiqa_edge.io import sweep_temporaries, write_bytes

        for bucket, added in self._dirty.items():
            path = self.bucket_file(bucket)
            with file_lock(path.with_suffix(".lock")):
                sweep_temporaries(path.parent, path.name)  # a save a kill cut short (megabytes, maybe)
                bucket_now = self._load(bucket, quiet=True)  # with what another process saved meanwhile
                if bucket in self._scans:
                    bucket_now["scan"] = self._scans[bucket]
                entries = {**bucket_now["entries"], **added}
                if bucket in self._tars:  # a member is valid at the shard's size and mtime only
                    entries = {k: r for k, r in entries.items() if (r[0], r[1]) == self._tars[bucket]}
                else:  # a deleted image's entry goes
                    entries = {k: r for k, r in entries.items()
                               if k in added or os.path.exists(os.path.join(bucket, k))}
                bucket_now["entries"] = entries
                write_bytes(path, json.dumps(bucket_now, separators=(",", ":")).encode())
        self._dirty, self._scans, self._tars = {}, {}, {}
        self._saved_at = time.monotonic()

