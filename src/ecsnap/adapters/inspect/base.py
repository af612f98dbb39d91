"""The file-system reader contract: look inside a disk, at one of its snapshots or at its
current state, without booting its guest and without changing the disk.

A guest's file system is untrusted input. A reader never mounts it in the host kernel; it
reads it in user space, from an image opened read-only (the disk file and its snapshots are
never written, no journal is replayed). Names from the guest are data, never host paths:
a reader writes nothing to a host path derived from a guest name, follows no symlink (a
symlink is an entry whose `target` is reported), and reads no device.

Paths are tuples of raw name components (`bytes`, as the guest stored them), `()` being the
root. `display_path` and `parse_path` turn them into text and back, unambiguously: bytes
that are not printable UTF-8, the backslash and a `/` inside a name are written `\\xNN`.
"""

from __future__ import annotations

import re
import stat
import time
import unicodedata
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import BinaryIO, Protocol, runtime_checkable

Path = tuple[bytes, ...]  # name components from the root; () is the root

MAX_PATH_BYTES = 4096


class InspectError(Exception):
    """Reading the file system failed; the message says why (in the reader's words)."""


class Unsupported(InspectError):
    """The disk's file system cannot be read at all (not one the reader knows, a corrupted
    superblock, a storage backend the reader cannot open): the message says why."""


class NotFound(InspectError):
    """No entry at that path (a path through a symlink is not followed: also NotFound)."""


class NotADirectory(InspectError):
    pass


class NotAFile(InspectError):
    """The entry is not a regular file (a directory, a device, a FIFO...)."""


class FileType(StrEnum):
    FILE = "file"
    DIRECTORY = "directory"
    SYMLINK = "symlink"
    CHAR_DEVICE = "chardev"
    BLOCK_DEVICE = "blockdev"
    FIFO = "fifo"
    SOCKET = "socket"
    UNKNOWN = "unknown"


def file_type(mode: int) -> FileType:
    for test, kind in ((stat.S_ISREG, FileType.FILE), (stat.S_ISDIR, FileType.DIRECTORY),
                       (stat.S_ISLNK, FileType.SYMLINK), (stat.S_ISCHR, FileType.CHAR_DEVICE),
                       (stat.S_ISBLK, FileType.BLOCK_DEVICE), (stat.S_ISFIFO, FileType.FIFO),
                       (stat.S_ISSOCK, FileType.SOCKET)):
        if test(mode):
            return kind
    return FileType.UNKNOWN


@dataclass(frozen=True)
class DiskImage:
    """A disk at one point of its life: `location` is the storage backend's `path()` of the
    disk (a qcow2 file, or `rbd:…`), `snapshot_id` the snapshot to read (None: the disk's
    current state, which only a stopped disk holds still)."""

    location: str
    snapshot_id: str | None = None
    label: str = ""  # the disk ID, for messages


@dataclass(frozen=True)
class FileEntry:
    path: Path
    inode: int
    type: FileType
    mode: int  # st_mode: type and permission bits
    uid: int
    gid: int
    size: int
    mtime_ns: int | None = None  # None: not read (directories during a walk)
    target: bytes | None = None  # a symlink's target, as stored (never followed)
    # reader-defined: where the content lives; two entries of two points of one disk with
    # the same layout, whose blocks did not change in between, have the same content
    layout: str = ""

    @property
    def name(self) -> bytes:
        return self.path[-1] if self.path else b"/"


@dataclass
class Budget:
    """How far a walk or a comparison may go: a monotonic deadline, a number of entries
    (per walk) and a number of content bytes read (per comparison)."""

    seconds: float = 30.0
    max_entries: int = 200_000
    max_bytes: int = 1 << 30
    deadline: float = field(default=0.0)

    def __post_init__(self) -> None:
        if not self.deadline:
            self.deadline = time.monotonic() + self.seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def expired(self) -> bool:
        return self.left() <= 0


@dataclass
class Walk:
    """Every entry under the root, by path (the root itself not included). `listed`: the
    directories whose entries are all in `entries`; a directory not listed was cut off by
    the budget (`partial` says why) or could not be read (`notes` says which)."""

    entries: dict[Path, FileEntry] = field(default_factory=dict)
    listed: set[Path] = field(default_factory=set)
    partial: str = ""
    notes: list[str] = field(default_factory=list)

    def exists(self, path: Path) -> bool | None:
        """Whether the walk saw `path`: True, False, or None when it cannot tell (its
        directory was not listed)."""
        if path in self.entries:
            return True
        if not path:
            return True
        parent = path[:-1]
        if parent in self.listed:
            return False
        above = self.exists(parent)
        return False if above is False else None


@dataclass(frozen=True)
class DirPage:
    """A page of a directory's entries, sorted by name (bytes)."""

    directory: FileEntry
    entries: list[FileEntry]
    total: int  # entries in the directory ("." and ".." not counted)
    more: bool  # entries after this page


class OpenDisk(Protocol):
    """A disk image the reader opened (read-only) for the calls below."""

    @property
    def image(self) -> DiskImage: ...


class FileSystemReader(Protocol):
    """Read a disk's file system in user space, read-only. Every method raises
    `Unsupported` when the disk's file system cannot be read at all, `InspectError` for
    other failures; `stat`, `list_dir` and `read_file` raise `NotFound`, `NotADirectory`
    and `NotAFile` as they say."""

    def open(self, image: DiskImage) -> AbstractContextManager[OpenDisk]:
        """Open the disk at that point, read-only, for the duration of the `with`."""
        ...

    def stat(self, disk: OpenDisk, path: Path) -> FileEntry:
        """The entry at `path` (never following a symlink); the root for `()`."""
        ...

    def list_dir(self, disk: OpenDisk, path: Path, *, after: bytes | None = None,
                 limit: int = 1000) -> DirPage:
        """Up to `limit` entries of the directory, sorted by name, after the name `after`
        (paging), each with its metadata."""
        ...

    def read_file(self, disk: OpenDisk, path: Path, *, offset: int = 0,
                  length: int = 1 << 20) -> bytes:
        """Up to `length` bytes of the regular file at `path` from `offset` (a symlink's
        content is its `target`, from `stat`: it is never read through)."""
        ...

    def walk(self, disk: OpenDisk, budget: Budget) -> Walk:
        """Every entry of the file system with its metadata (`mtime_ns` and `layout` for
        everything but directories), within the budget."""
        ...

    def same_content(self, before: OpenDisk, after: OpenDisk,
                     pairs: Sequence[tuple[FileEntry, FileEntry]],
                     budget: Budget) -> list[bool | None]:
        """For pairs of regular files (one of each disk, from `walk`), whether their
        contents are equal; None where the budget ran out before it could tell."""
        ...


@runtime_checkable
class FileSystemWriter(FileSystemReader, Protocol):
    """A reader that can also put regular files onto a disk's current state (restoring
    files from a snapshot onto a stopped instance's disk). Only the current state is ever
    opened for writing, never a snapshot; guest names are still data (a name the writer
    cannot pass safely is refused with `Unsupported`, never reinterpreted)."""

    def open_writable(self, image: DiskImage) -> AbstractContextManager[OpenDisk]:
        """Open the disk's current state (`image.snapshot_id` None) read-write and
        exclusively (no VM may open it meanwhile). `Unsupported` when the file system
        cannot be written safely (a journal that needs recovery, a damaged superblock)."""
        ...

    def put_file(self, disk: OpenDisk, directory: Path, name: bytes, source: BinaryIO, *,
                 mode: int, uid: int, gid: int, mtime_ns: int | None = None) -> None:
        """Make `name` in `directory` (an existing directory, no symlink followed) a regular
        file with the content of `source` (read from its start), permission bits `mode`,
        owner `uid`:`gid` and, when given, modification time `mtime_ns`, replacing a
        regular file or symlink of that name (a directory or anything else: `NotAFile`).
        Idempotent: the same call twice leaves the same file."""
        ...

    def check(self, disk: OpenDisk) -> None:
        """Check the written file system (and repair what an interrupted write could have
        left, such as blocks marked used by no file); InspectError if it is not clean."""
        ...


# ---------------------------------------------------------------- paths as text

_ESCAPE = re.compile(r"\\x([0-9a-fA-F]{2})")


def escape_name(name: bytes) -> str:
    """A name as text: printable UTF-8 kept; every other byte, the backslash and `/` as
    `\\xNN` (so that the text is one line, shows no control or bidi character, and reads
    back to the same bytes)."""
    out: list[str] = []
    text = name.decode("utf-8", "surrogateescape")
    for char in text:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte
            out.append(f"\\x{code - 0xDC00:02x}")
        elif char in "\\/" or not char.isprintable() or \
                unicodedata.category(char) in ("Cf", "Zl", "Zp"):
            out.extend(f"\\x{b:02x}" for b in char.encode("utf-8"))
        else:
            out.append(char)
    return "".join(out)


def display_path(path: Path) -> str:
    return "/" + "/".join(escape_name(c) for c in path)


def unescape_name(text: str) -> bytes:
    """The name `escape_name` wrote; ValueError for a backslash not starting `\\xNN`."""
    out = bytearray()
    at = 0
    while at < len(text):
        if text[at] == "\\":
            match = _ESCAPE.match(text, at)
            if match is None:
                raise ValueError("a backslash must start an escape \\xNN")
            out.append(int(match.group(1), 16))
            at = match.end()
        else:
            out += text[at].encode("utf-8")
            at += 1
    return bytes(out)


def parse_path(text: str) -> Path:
    """A path from its text (`display_path`'s form): absolute, `/`-separated, empty
    components ignored; `.` and `..` refused (ValueError), as too long a path is."""
    if not text.startswith("/"):
        raise ValueError("the path must start with /")
    parts = []
    for piece in text.split("/"):
        if not piece:
            continue
        name = unescape_name(piece)
        if name in (b".", b"..") or not name:
            raise ValueError("the path may not contain . or .. components")
        parts.append(name)
    if sum(len(p) + 1 for p in parts) > MAX_PATH_BYTES:
        raise ValueError(f"the path is longer than {MAX_PATH_BYTES} bytes")
    return tuple(parts)


def under(path: Path, entries: dict[Path, FileEntry]) -> Iterator[FileEntry]:
    """The entries below `path` (for tests and callers that hold a walk)."""
    for key, entry in entries.items():
        if key[:len(path)] == path and len(key) > len(path):
            yield entry
