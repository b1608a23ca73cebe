"""webdataset-style tar shards, read in place: member offsets from the headers, bytes by seek + read.

A shard is never extracted: `scan_tar` walks the headers once and returns where each regular member's
bytes are (`TarMember`: name, offset, size), so a worker reads an image with one seek. Members that would
be unsafe to extract (an absolute path, a `..` component, a link, a device or FIFO entry) are skipped and
named with the reason. A truncated shard keeps the members whose bytes are all there and says where it
breaks; one that is no readable tar at all (empty, compressed, not a tar) is a `ShardError`, which the pool
makes that shard's skip row. `expand_braces` turns `shards-{000..099}.tar` into the shard names
(webdataset's brace notation).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import tarfile
from pathlib import Path, PurePosixPath

from kdiqa_edge.errors import ConfigError

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZ": "bzip2", b"\xfd7": "xz", b"\x28\xb5": "zstd"}


class ShardError(ConfigError):
    """A tar shard with nothing to read: empty, compressed, not a tar, or unreadable. The message names the
    shard; `reason` is the why alone, for a skip row that names it itself."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


@dataclasses.dataclass(frozen=True)
class TarMember:
    name: str  # the member's path inside the shard
    offset: int  # where its bytes start in the shard file
    size: int  # how many bytes


@dataclasses.dataclass
class TarScan:
    members: list[TarMember]  # regular files whose bytes are complete, in shard order
    refused: list[tuple[str, str]]  # (member name, why it was skipped)
    truncated: str | None = None  # where the shard breaks, if it does


def expand_braces(pattern: str) -> list[str]:
    """`a-{000..002}.tar` -> a-000.tar, a-001.tar, a-002.tar; `{x,y}` lists; several groups multiply.

    A numeric range keeps the zero padding of its first bound (webdataset's and bash's rule).
    """
    groups = _BRACE.findall(pattern)
    if not groups:
        return [pattern]
    choices = []
    for group in groups:
        match = _RANGE.match(group.strip())
        if match:
            lo, hi = match.group(1), match.group(2)
            width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
            step = 1 if int(hi) >= int(lo) else -1
            choices.append([str(n).zfill(width) for n in range(int(lo), int(hi) + step, step)])
        elif "," in group:
            choices.append(group.split(","))
        else:
            raise ConfigError(f"cannot expand {{{group}}} in {pattern!r}: use {{000..099}} or {{a,b}}")
    pieces = _BRACE.split(pattern)  # literal, group, literal, group, ..., literal
    return ["".join(p for pair in itertools.zip_longest(pieces[::2], combo, fillvalue="") for p in pair)
            for combo in itertools.product(*choices)]


def unsafe_reason(member: tarfile.TarInfo) -> str | None:
    """Why a member must not be read as an image (None: a plain file with a relative, contained path)."""
    name = member.name
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "unsafe tar member: an absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "unsafe tar member: '..' in its path"
    if member.issym() or member.islnk():
        return f"unsafe tar member: a link (to {member.linkname})"
    if member.ischr() or member.isblk() or member.isfifo() or member.isdev():
        return "unsafe tar member: a device or FIFO entry"
    if not member.isreg():
        return "unsafe tar member: not a regular file"
    return None


def scan_tar(path: str | os.PathLike) -> TarScan:
    """Every member's place in an uncompressed tar, without extracting anything; a `ShardError` for a shard
    with no member to read."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            kind = _COMPRESSED.get(handle.read(2))
    except OSError as exc:
        raise ShardError(path, f"tar shard cannot be read: {exc.strerror or exc}") from None
    if kind:
        raise ShardError(path, f"a {kind}-compressed tar; tar shards are read in place, so they must be "
                               f"uncompressed (webdataset's .tar)")
    members: list[TarMember] = []
    refused: list[tuple[str, str]] = []
    truncated = None
    try:
        with tarfile.open(path, mode="r:") as tar:
            while True:
                try:
                    member = tar.next()
                except (tarfile.ReadError, EOFError, OSError) as exc:
                    truncated = f"after {len(members)} members: {exc}"
                    break
                if member is None:
                    truncated = _missing_end(path, tar.offset, size, len(members))
                    break
                if member.isdir():
                    continue
                reason = unsafe_reason(member)
                if reason:
                    refused.append((member.name, reason))
                elif member.offset_data + member.size > size:
                    truncated = f"in member {member.name} ({member.size} bytes, {size - member.offset_data} there)"
                    break
                else:
                    members.append(TarMember(member.name, member.offset_data, member.size))
    except (tarfile.ReadError, OSError) as exc:  # not a tar at all, broken in its first header, or unreadable
        if members:
            truncated = f"after {len(members)} members: {exc}"
        else:
            raise ShardError(path, f"not a readable tar ({getattr(exc, 'strerror', None) or exc})") from None
    return TarScan(members, refused, truncated)


def _missing_end(path: Path, offset: int, size: int, count: int) -> str | None:
    """tarfile reads a header cut short as the end of the archive; a whole tar ends in zero blocks there."""
    with open(path, "rb") as handle:
        handle.seek(offset)
        block = handle.read(tarfile.BLOCKSIZE)
    if len(block) == tarfile.BLOCKSIZE and not block.strip(b"\0"):
        return None
    return f"after {count} members: {'no end-of-archive marker' if offset >= size else 'a header cut short'}"


def read_member(path: str | os.PathLike, offset: int, size: int) -> bytes:
    """One member's bytes (a seek and a read; short if the shard shrank since it was scanned)."""
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(size)
