"""`score --out`: scores written in chunks that a kill, a full disk or a re-run never tear (torch-free).

    scores.csv | scores.jsonl        the rows, as `score --format csv|json` prints them
    scores.parquet/part-000000.parquet ...   the rows as Parquet parts (pyarrow; one folder, read as one table)
    scores.csv.kdiqa.json            the state: the model's sha256, the decode, the committed rows and bytes
    scores.csv.kdiqa.index           one JSON line per row: [path, size, mtime_ns], what a re-run matches
                                     ([path, size, mtime_ns, 0|1, key] where the file's key is not the path)
    .scores.csv.kdiqa.lock           held (flock) by the one process writing

A chunk is committed in three steps: its rows are appended to the data file (or written as a new part, an
atomic rename), its index lines appended, then the state, which names how many bytes of each are whole, is
replaced atomically. Whatever lies past the state's lengths (a chunk a kill or a full disk cut short) is cut
off before anything else is written, so the rows written before stay byte for byte, and a re-run with the
same model and decode skips every file whose key, size and mtime the index holds. A file's key is its path
made absolute with its folder's symlinks resolved (`file_key`): `photos/a.jpg` typed in /data and
`/data/photos/a.jpg` are one file; `b.jpg`, a symlink to `a.jpg` beside it, is a name of its own (a row each,
as the walk gives). A row keeps the path as typed, the first time its file was scored: a file scored again
under another spelling keeps its row's path, so the last-row-per-path rewrite below drops its old row.

Each image has one row. A file that changed since it was scored (or a missing path that now exists) is
scored again, and its new row replaces the old one: at the end of the run the data file and the index are
rewritten keeping the last row of each path, each replaced atomically under a state marked "compacting",
so a kill in between is finished by the next run (keeping the last row of each path is idempotent).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import errno
import io
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kdiqa_edge.errors import ConfigError, KdiqaError

STATE_FORMAT = "kdiqa-edge/scores/1"
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".parquet": "parquet"}
COLUMNS = ("image", "score", "error")
CHUNK_ROWS = 1024  # rows per committed chunk (a kill loses at most the chunk in flight)
CHUNK_SECONDS = 30.0  # and at least this often, so a slow run never holds minutes of work in memory


class OutputLocked(KdiqaError):
    """Another process is writing the same --out."""


class OutputMismatch(KdiqaError):
    """--out holds other scores (another model or decode, or a file score did not write)."""


class OutputFull(KdiqaError):
    """A write failed (a full disk, a quota, a folder that cannot be made or written): the rows committed
    before are kept."""


@dataclasses.dataclass(frozen=True)
class Row:
    image: str
    score: float | None
    error: str | None
    stamp: tuple[int, int] | None  # (size, mtime_ns) of the file scored, None for an entry without one


def output_kind(path: Path) -> str:
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ConfigError(f"--out {path}: name a .csv, .jsonl or .parquet file (the format follows the suffix)")
    return kind


def model_sha256(path: str | os.PathLike) -> str:
    """sha256 of what a model is: its file (an OpenVINO .xml with its .bin), a package or checkpoint folder,
    or a run dir's best checkpoint."""
    from kdiqa_edge.io import sha256_file

    path = Path(path)
    if path.is_dir():
        best = path / "checkpoints" / "best"
        return sha256_file(best if best.is_dir() else path)
    weights = path.with_suffix(".bin")
    if path.suffix.lower() == ".xml" and weights.is_file():
        import hashlib

        return hashlib.sha256((sha256_file(path) + sha256_file(weights)).encode()).hexdigest()
    return sha256_file(path)


def file_key(path: str, folders: dict[str, str] | None = None) -> str:
    """What says two paths name one file across runs: the path made absolute, its folder's symlinks resolved,
    the name itself kept (a symlinked file in a folder is a row of its own, as the walk lists it). `folders`:
    a cache of resolved folders."""
    folder, name = os.path.split(path)
    folder = folder or "."
    if folders is None:
        return os.path.join(os.path.realpath(folder), name)
    if folder not in folders:
        folders[folder] = os.path.realpath(folder)
    return os.path.join(folders[folder], name)


class ScoresOutput:
    """`with ScoresOutput(out, model={...}, decode="draft") as output:` then `output.seen(path, stamp)` to
    skip a file scored before, `output.add(row)` per row; rows are committed every `chunk_rows` rows, every
    CHUNK_SECONDS and at the end. `model` must hold "sha256"; it and `decode` are what a re-run must match.
    `retry_errors`: a file whose row is an error (unreadable then) is not `seen`, so it is tried again; its new
    row replaces the old one as a changed file's does."""

    def __init__(self, path: str | os.PathLike, model: dict[str, Any], decode: str, overwrite: bool = False,
                 chunk_rows: int = CHUNK_ROWS, retry_errors: bool = False):
        self.path = Path(path)
        self.kind = output_kind(self.path)
        self.model, self.decode, self.overwrite, self.retry_errors = dict(model), decode, overwrite, retry_errors
        self.chunk_rows = max(1, chunk_rows)
        self.state_path = self.path.with_name(self.path.name + ".kdiqa.json")
        self.index_path = self.path.with_name(self.path.name + ".kdiqa.index")
        self.lock_path = self.path.with_name(f".{self.path.name}.kdiqa.lock")
        self.state: dict[str, Any] = {}
        self.resumed = 0  # rows found from an earlier run
        self.added = 0  # rows committed by this run
        self.replaced = 0  # rows of this run that replace an earlier row of the same path (the file changed)
        self.retried = 0  # rows of this run that replace an earlier error row (retry_errors)
        self.recovered = 0  # of those, the rows that are a score now
        self._stale = 0  # rows a later row of the same path supersedes, until _compact() drops them
        # by file_key: the stamp of the file scored, the keys whose last row is an error, the path of its rows
        self._done: dict[str, tuple[int, int] | None] = {}
        self._failed: set[str] = set()
        self._images: dict[str, str] = {}
        self._folders: dict[str, str] = {}  # file_key's cache
        self._pending: list[tuple[Row, str]] = []
        self._last_commit = time.monotonic()
        self._held: contextlib.ExitStack | None = None  # the lock on lock_path, while open

    # --- open / close -------------------------------------------------------------------------------

    def __enter__(self):
        if self.kind == "parquet":
            from kdiqa_edge.errors import require

            require("pyarrow", "parquet")  # before anything is written
        if self.kind != "parquet" and self.path.is_dir():
            raise OutputMismatch(f"{self.path} is a folder: name a {self.kind} file for --out (a folder is never "
                                 "replaced, --overwrite or not)")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock()
        except OSError as exc:  # a read-only folder, a file where a folder should be, a full disk
            raise OutputFull(f"cannot write {self.path}: {_why(exc)}") from None
        try:
            if self.overwrite:
                self._remove_all()
            self._open_state()
        except OSError as exc:
            self._unlock()
            raise OutputFull(f"cannot write {self.path}: {_why(exc)}") from None
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None or issubclass(exc_type, KeyboardInterrupt):
                self.commit()  # Ctrl-C keeps what was scored
                if self._stale:
                    self._compact()
            elif not issubclass(exc_type, (OutputFull, OSError)):  # not a failed write of ours: the rows are good
                with contextlib.suppress(Exception):  # the run's own error is the one to report
                    self.commit()  # a model or decoder that failed mid-run: what was scored before it stays
        finally:
            self._unlock()

    def _lock(self) -> None:
        from kdiqa_edge.data._lock import waiting_lock

        def refuse(who: str) -> None:  # one writer: a second is refused, not queued behind a long run
            raise OutputLocked(f"{self.path} is being written by another kdiqa-edge score{who}: wait for it, "
                               "or pass another --out")

        self._held = contextlib.ExitStack()
        self._held.enter_context(waiting_lock(self.lock_path, refuse))

    def _unlock(self) -> None:
        if self._held is not None:
            self._held.close()  # drops the flock; the file stays (removing it would race a new writer)
            self._held = None

    def _remove_all(self) -> None:
        if self.path.is_dir() and not self.path.is_symlink():  # a Parquet folder: its parts, nothing of the user's
            ours = [entry for entry in self.path.iterdir() if _is_part(entry) or _is_temporary(entry)]
            others = sorted({entry.name for entry in self.path.iterdir()} - {entry.name for entry in ours})
            if others:
                raise OutputMismatch(f"{self.path} holds files score did not write ({', '.join(others[:3])}"
                                     f"{', ...' if len(others) > 3 else ''}): --overwrite replaces score's parts "
                                     "only; pass another --out")
            for entry in ours:
                entry.unlink()
            self.path.rmdir()
        else:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        for sidecar in (self.state_path, self.index_path):
            with contextlib.suppress(FileNotFoundError):
                sidecar.unlink()

    def _identity(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "output": self.kind, "columns": list(COLUMNS), "model": self.model,
                "decode": self.decode}

    def _open_state(self) -> None:
        from kdiqa_edge.io import read_json, sweep_temporaries

        sweep_temporaries(self.path.parent, self.path.name)  # a state or compaction write a kill cut short
        if not self.state_path.exists():
            if self.path.exists():
                raise OutputMismatch(f"{self.path} exists and was not written by kdiqa-edge score (no "
                                     f"{self.state_path.name}): pass --overwrite to replace it, or another --out")
            self.state = {**self._identity(), "rows": 0, "bytes": 0, "index_bytes": 0, "parts": 0}
            self._write_state()
        else:
            try:
                self.state = read_json(self.state_path)
            except (OSError, ValueError) as exc:
                raise OutputMismatch(f"{self.state_path} cannot be read ({exc}): pass --overwrite to start "
                                     "over") from None
            self._check_identity()
            if self.state.get("compacting"):
                self._compact()  # one a kill cut short: finished before anything else
            else:
                self._cut_to_committed()
            self._read_index()
            if self._stale:  # a run killed before its compaction, or a version that kept both rows
                self._compact()
        if self.kind == "parquet":
            self.path.mkdir(exist_ok=True)
            sweep_temporaries(self.path)  # a part a kill cut short
        elif self.kind == "csv" and self.state["bytes"] == 0:
            self._commit_bytes(_csv_bytes([COLUMNS]), b"", 0)  # the header, its own commit

    def _check_identity(self) -> None:
        state = self.state
        if state.get("format") != STATE_FORMAT or state.get("output") != self.kind:
            raise OutputMismatch(f"{self.state_path} is not a {self.kind} score state this version writes: "
                                 "pass --overwrite to start over, or another --out")
        theirs = state.get("model") or {}
        if theirs.get("sha256") != self.model["sha256"]:
            raise OutputMismatch(
                f"{self.path} holds scores of another model ({theirs.get('name', '?')}, sha256 "
                f"{str(theirs.get('sha256'))[:12]}, this one {self.model['sha256'][:12]}): pass --overwrite to "
                "replace them, or another --out")
        if state.get("decode") != self.decode:
            raise OutputMismatch(f"{self.path} holds scores made with --decode {state.get('decode')}, this run "
                                 f"decodes {self.decode}: pass the same --decode, --overwrite, or another --out")

    def _cut_to_committed(self) -> None:
        """Drop what lies past the committed lengths: the chunk a kill or a full disk cut short."""
        for path, length in ((self.index_path, self.state["index_bytes"]),
                             *(((self.path, self.state["bytes"]),) if self.kind != "parquet" else ())):
            size = path.stat().st_size if path.exists() else 0
            if size < length:
                raise OutputMismatch(f"{path} is shorter than the {length} bytes score wrote ({size}): it was "
                                     "changed by something else; pass --overwrite to start over")
            if size > length:
                os.truncate(path, length)
        if self.kind == "parquet" and self.path.is_dir():
            for part in self.path.glob("part-*.parquet"):
                if _part_number(part) >= self.state["parts"]:
                    part.unlink()

    def _read_index(self) -> None:
        if not self.index_path.exists():
            return
        with open(self.index_path, encoding="utf-8") as handle:
            for line in handle:
                # [image, size, mtime], a 1 after it for an error, then the key where it is not the image
                # (a line of an earlier version has none: its relative path is taken from here)
                image, size, mtime, *rest = json.loads(line)
                key = rest[1] if len(rest) > 1 else file_key(image, self._folders)
                self._stale += key in self._done
                self._done[key] = None if size is None else (size, mtime)
                self._images[key] = image
                (self._failed.add if rest and rest[0] else self._failed.discard)(key)
        self.resumed = self.state["rows"] - self._stale

    # --- rows ---------------------------------------------------------------------------------------

    def seen(self, path: str, stamp: tuple[int, int] | None) -> bool:
        """Whether `path` has a row already, made from a file of this size and mtime (and, with retry_errors,
        not an error). `path` as typed: its file_key is what is matched."""
        key = file_key(path, self._folders)
        if key not in self._done or self._done[key] != stamp:
            return False
        return not (self.retry_errors and key in self._failed)

    def failed(self, path: str) -> bool:
        """Whether the row `path` has is an error (the file could not be read or scored then)."""
        return file_key(path, self._folders) in self._failed

    def add(self, row: Row) -> None:
        key = file_key(row.image, self._folders)
        image = self._images.setdefault(key, row.image)  # the path its rows already name, or this one
        self._pending.append((row if image == row.image else dataclasses.replace(row, image=image), key))
        if len(self._pending) >= self.chunk_rows or time.monotonic() - self._last_commit >= CHUNK_SECONDS:
            self.commit()

    def commit(self) -> None:
        """Append the pending rows as one chunk (data, index, then the state that makes them count)."""
        rows, self._pending = self._pending, []
        self._last_commit = time.monotonic()
        if not rows:
            return
        index = "".join(json.dumps(_index_entry(r, key)) + "\n" for r, key in rows).encode()
        if self.kind == "parquet":
            self._commit_part([r for r, _ in rows], index)
        else:
            data = _csv_bytes([_csv_row(r) for r, _ in rows]) if self.kind == "csv" else \
                "".join(json.dumps(_json_row(r)) + "\n" for r, _ in rows).encode()
            self._commit_bytes(data, index, len(rows))
        for row, key in rows:
            if key in self._done:
                self._stale += 1
                if key in self._failed and self._done[key] == row.stamp:  # the same file, tried again
                    self.retried += 1
                    self.recovered += not row.error
                elif self._done[key] != row.stamp:  # not a file named twice in this run
                    self.replaced += 1
            self._done[key] = row.stamp
            (self._failed.add if row.error else self._failed.discard)(key)
        self.added += len(rows)

    def _commit_bytes(self, data: bytes, index: bytes, rows: int) -> None:
        state = self.state
        try:
            _append(self.path, data)
            _append(self.index_path, index)
            self._write_state(rows=state["rows"] + rows, bytes=state["bytes"] + len(data),
                              index_bytes=state["index_bytes"] + len(index))
        except OSError as exc:
            self._roll_back(exc)

    def _commit_part(self, rows: list[Row], index: bytes) -> None:
        from kdiqa_edge.io import atomic_path

        part = self.path / f"part-{self.state['parts']:06d}.parquet"
        try:
            with atomic_path(part) as tmp:
                _write_parquet(tmp, rows, self.model["sha256"])
            _append(self.index_path, index)
            self._write_state(rows=self.state["rows"] + len(rows), parts=self.state["parts"] + 1,
                              index_bytes=self.state["index_bytes"] + len(index))
        except OSError as exc:
            with contextlib.suppress(OSError):
                part.unlink()
            self._roll_back(exc)

    def _roll_back(self, exc: OSError) -> None:
        """Cut the data and index back to the last commit, then say so in one line."""
        with contextlib.suppress(OSError):
            self._cut_to_committed()
        why = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else \
            "the file size limit was reached" if exc.errno == errno.EFBIG else exc.strerror or type(exc).__name__
        raise OutputFull(f"cannot write {self.path}: {why} ({errno.errorcode.get(exc.errno, exc.errno)}); the "
                         f"{self.state['rows']} rows written before are kept: free some space and run the "
                         "same command again to go on") from exc

    def _compact(self) -> None:
        """Keep the last row of each path in the data and the index, each rewritten and replaced atomically.
        The state says "compacting" until both are done, and the next open finishes a compaction a kill cut
        short (the data done, the index not): keeping the last row of each path twice changes nothing."""
        try:
            if not self.state.get("compacting"):
                self._cut_to_committed()  # a chunk a Ctrl-C cut short in its commit is not the compaction's to keep
                self._write_state(compacting=True)
            if self.kind == "parquet":
                rows = _keep_last_parts(self.path, self.state["parts"])
                data = {}
            else:
                rows = _keep_last_lines(self.path, self.kind)
                data = {"bytes": self.path.stat().st_size}
            _keep_last_lines(self.index_path, "index")
            self.state = {key: value for key, value in self.state.items() if key != "compacting"}
            self._write_state(rows=rows, index_bytes=self.index_path.stat().st_size, **data)
        except OSError as exc:
            why = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc.strerror or str(exc)
            raise OutputFull(f"cannot rewrite {self.path} to drop the old rows of files scored again: {why}; "
                             "every row is kept: free some space and run the same command again to finish") \
                from exc
        self._stale = 0

    def _write_state(self, **changes) -> None:
        from kdiqa_edge.io import write_json

        state = {**self.state, **changes, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_json(self.state_path, state)
        self.state = state


def _why(exc: OSError) -> str:
    """An OSError in a few words, for a one-line error about --out."""
    from kdiqa_edge.runtime.files import reason

    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full"
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):
        return f"a file stands where a folder should be ({exc.filename})"
    return f"{reason(exc)} ({exc.filename})" if exc.filename else reason(exc)


def _append(path: Path, data: bytes) -> None:
    """Append all of `data` and flush it to the disk (a partial write raises: the caller cuts it back)."""
    if not data:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)  # before the state names these bytes, so a power cut cannot leave the state ahead
    finally:
        os.close(fd)


def _index_entry(row: Row, key: str) -> list:
    """[image, size, mtime], then 1 for an error row, then the file's key where it is not the image."""
    entry = [row.image, *(row.stamp or (None, None))]
    if key != row.image:
        return [*entry, int(bool(row.error)), key]
    return [*entry, 1] if row.error else entry


def _csv_row(row: Row) -> list[str]:
    return [row.image, "" if row.score is None else f"{round(row.score, 6):.6f}", row.error or ""]


def _json_row(row: Row) -> dict[str, Any]:
    return {"image": row.image, "score": None if row.score is None else round(row.score, 6), "error": row.error}


def _csv_bytes(rows) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue().encode("utf-8", "surrogateescape")  # a file name's non-UTF-8 bytes, as they are


def _write_parquet(path: Path, rows: list[Row], sha256: str) -> None:
    from kdiqa_edge.errors import require

    pa = require("pyarrow", "parquet")
    import pyarrow.parquet as pq

    # Parquet strings are UTF-8: a file name's other bytes as \\xNN (the index keeps the name itself)
    images = [r.image.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") for r in rows]
    table = pa.table({"image": pa.array(images, pa.string()),
                      "score": pa.array([None if r.score is None else round(r.score, 6) for r in rows], pa.float64()),
                      "error": pa.array([r.error for r in rows], pa.string())})
    pq.write_table(table.replace_schema_metadata({"kdiqa_edge.model_sha256": sha256}), path)


def _keep_last(images: list[str]) -> list[bool]:
    """Which rows to keep: the last of each image."""
    last = {image: position for position, image in enumerate(images)}
    return [last[image] == position for position, image in enumerate(images)]


def _keep_last_lines(path: Path, kind: str) -> int:
    """Rewrite a CSV, JSONL or index file with the last row of each image, streaming (a file of millions of
    rows is read twice, never held); returns the rows kept."""
    from kdiqa_edge.io import atomic_path

    if not path.exists():
        return 0
    with open(path, "rb") as handle:
        keep = _keep_last([image for image, _ in _entries(handle, kind)])
    if all(keep):
        return len(keep)
    with open(path, "rb") as source, atomic_path(path) as tmp, open(tmp, "wb") as target:
        if kind == "csv":
            text = io.TextIOWrapper(target, encoding="utf-8", errors="surrogateescape", newline="")
            writer = csv.writer(text, lineterminator="\n")
            writer.writerow(COLUMNS)
            writer.writerows(row for (_, row), wanted in zip(_entries(source, kind), keep) if wanted)
            text.flush()
            text.detach()
        else:
            target.writelines(line for (_, line), wanted in zip(_entries(source, kind), keep) if wanted)
        target.flush()
        os.fsync(target.fileno())
    return sum(keep)


def _entries(handle, kind: str) -> Iterator[tuple[str, Any]]:
    """(image, row) of each row of a CSV (its header skipped), JSONL or index file opened in binary."""
    if kind == "csv":  # a quoted path may hold a newline: rows are csv's, not lines
        reader = csv.reader(io.TextIOWrapper(handle, encoding="utf-8", errors="surrogateescape", newline=""))
        next(reader, None)
        yield from ((row[0], row) for row in reader)
    else:
        for line in handle:
            entry = json.loads(line)
            yield (entry["image"] if kind == "jsonl" else entry[0]), line


def _keep_last_parts(folder: Path, parts: int) -> int:
    """Rewrite the Parquet parts that hold a row some later row of the same image supersedes; a part left
    empty is removed. Returns the rows kept."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kdiqa_edge.io import atomic_path

    files = sorted((p for p in folder.glob("part-*.parquet") if 0 <= _part_number(p) < parts), key=_part_number)
    columns = [pq.read_table(part, columns=["image"]).column("image").to_pylist() for part in files]
    keep = _keep_last([image for images in columns for image in images])
    start = 0
    for part, images in zip(files, columns):
        wanted, start = keep[start:start + len(images)], start + len(images)
        if all(wanted):
            continue
        if not any(wanted):
            part.unlink()
            continue
        table = pq.read_table(part).filter(pa.array(wanted))
        with atomic_path(part) as tmp:
            pq.write_table(table, tmp)
    return sum(keep)


def _is_part(entry: Path) -> bool:
    """Whether `entry` is a part score writes (part-NNNNNN.parquet, a file)."""
    return entry.name.startswith("part-") and entry.suffix == ".parquet" and _part_number(entry) >= 0 \
        and entry.is_file()


def _is_temporary(entry: Path) -> bool:
    """Whether `entry` is a part a kill cut short, or its claim (`io.atomic_path`'s hidden .NAME.RANDOM.SUFFIX)."""
    from kdiqa_edge.io import is_temporary

    return is_temporary(entry.name) and entry.is_file()


def _part_number(part: Path) -> int:
    try:
        return int(part.stem.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def read_rows(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """The rows of a `score --out` file, as dicts of COLUMNS (for tests and scripts)."""
    path = Path(path)
    kind = output_kind(path)
    if kind == "csv":
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as handle:
            yield from csv.DictReader(handle)
    elif kind == "jsonl":
        with open(path, encoding="utf-8") as handle:
            yield from (json.loads(line) for line in handle)
    else:
        import pyarrow.parquet as pq

        yield from pq.read_table(path).to_pylist()
