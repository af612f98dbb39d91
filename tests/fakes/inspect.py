"""An in-memory file-system reader and writer (`FileSystemWriter`) for fast tests: no
qemu-nbd, no debugfs.

Each disk point (a disk's label, i.e. its ID, and a snapshot ID or None for the current
state) has a tree: a dict of path -> `FakeFile`, directories included (the root is
implied). A test puts trees in with `put_tree`; a point without a tree is `Unsupported`
(as a disk with no file system the reader knows). `put_file` writes into the current
state's tree, as the real writer does: its directory must exist and be a directory, a
directory at the name is `NotAFile`; every call is recorded in `puts`. `opened` records
every open (point, writable), so a test sees that a snapshot was read and only the
current state written.
"""

from __future__ import annotations

import stat
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import BinaryIO

from ecsnap.adapters.inspect.base import (
    Budget,
    DirPage,
    DiskImage,
    FileEntry,
    FileType,
    InspectError,
    NotADirectory,
    NotAFile,
    NotFound,
    OpenDisk,
    Path,
    Unsupported,
    Walk,
    display_path,
    file_type,
)

Point = tuple[str, str | None]  # (disk ID, snapshot ID or None)


@dataclass
class FakeFile:
    content: bytes = b""
    mode: int = stat.S_IFREG | 0o644  # st_mode: type and permission bits
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 1_700_000_000 * 10**9
    target: bytes | None = None  # a symlink's


def directory(mode: int = 0o755) -> FakeFile:
    return FakeFile(mode=stat.S_IFDIR | mode)


@dataclass(frozen=True)
class FakeOpenDisk:
    image: DiskImage
    writable: bool = False


@dataclass
class InMemoryFileSystems:
    trees: dict[Point, dict[Path, FakeFile]] = field(default_factory=dict)
    opened: list[tuple[Point, bool]] = field(default_factory=list)
    # (disk ID, directory, name, content, mode, uid, gid, mtime_ns) of every put_file
    puts: list[tuple[str, Path, bytes, bytes, int, int, int, int | None]] = \
        field(default_factory=list)
    checks: list[str] = field(default_factory=list)  # the disk IDs `check` was run on
    _lock: threading.RLock = field(default_factory=threading.RLock)

    def put_tree(self, disk_id: str, snapshot_id: str | None,
                 tree: dict[Path, FakeFile]) -> None:
        self.trees[(disk_id, snapshot_id)] = {p: FakeFile(**vars(f)) for p, f in tree.items()}

    def tree(self, disk_id: str, snapshot_id: str | None = None) -> dict[Path, FakeFile]:
        return self.trees[(disk_id, snapshot_id)]

    # ------------------------------------------------------------ reading

    def _tree(self, disk: OpenDisk) -> dict[Path, FakeFile]:
        found = self.trees.get((disk.image.label, disk.image.snapshot_id))
        if found is None:
            raise Unsupported(f"{disk.image.label}: no file system the fake knows")
        return found

    @contextmanager
    def _open(self, image: DiskImage, writable: bool) -> Iterator[FakeOpenDisk]:
        point = (image.label, image.snapshot_id)
        with self._lock:
            self.opened.append((point, writable))
        if point not in self.trees:
            raise Unsupported(f"{image.label}: no file system the fake knows")
        yield FakeOpenDisk(image, writable)

    def open(self, image: DiskImage) -> AbstractContextManager[OpenDisk]:
        return self._open(image, False)

    def _get(self, disk: OpenDisk, path: Path) -> FakeFile:
        tree = self._tree(disk)
        if not path:
            return directory()
        for n in range(1, len(path)):
            above = tree.get(path[:n])
            if above is None or file_type(above.mode) == FileType.SYMLINK:
                raise NotFound(f"{display_path(path)}: not found")
            if file_type(above.mode) != FileType.DIRECTORY:
                raise NotADirectory(f"{display_path(path[:n])} is not a directory")
        found = tree.get(path)
        if found is None:
            raise NotFound(f"{display_path(path)}: not found")
        return found

    @staticmethod
    def _entry(path: Path, f: FakeFile) -> FileEntry:
        return FileEntry(path, hash(path) & 0xFFFF, file_type(f.mode), f.mode, f.uid, f.gid,
                         len(f.content), f.mtime_ns, f.target)

    def stat(self, disk: OpenDisk, path: Path) -> FileEntry:
        return self._entry(path, self._get(disk, path))

    def list_dir(self, disk: OpenDisk, path: Path, *,
                 after: bytes | None = None, limit: int = 1000) -> DirPage:
        here = self._get(disk, path)
        if file_type(here.mode) != FileType.DIRECTORY:
            raise NotADirectory(f"{display_path(path)} is not a directory")
        names = sorted(p[-1] for p in self._tree(disk) if p[:-1] == path and len(p) > 0)
        rest = [n for n in names if after is None or n > after]
        page = rest[:limit]
        return DirPage(self._entry(path, here),
                       [self.stat(disk, (*path, n)) for n in page], len(names),
                       len(rest) > len(page))

    def read_file(self, disk: OpenDisk, path: Path, *,
                  offset: int = 0, length: int = 1 << 20) -> bytes:
        found = self._get(disk, path)
        if file_type(found.mode) != FileType.FILE:
            raise NotAFile(f"{display_path(path)} is not a regular file")
        return found.content[offset:offset + length]

    def walk(self, disk: OpenDisk, budget: Budget) -> Walk:
        tree = self._tree(disk)
        walk = Walk({p: self._entry(p, f) for p, f in tree.items()})
        walk.listed = {()} | {p for p, f in tree.items()
                              if file_type(f.mode) == FileType.DIRECTORY}
        return walk

    def same_content(self, before: OpenDisk, after: OpenDisk,
                     pairs: Sequence[tuple[FileEntry, FileEntry]],
                     budget: Budget) -> list[bool | None]:
        return [self._get(before, a.path).content == self._get(after, b.path).content
                for a, b in pairs]

    # ------------------------------------------------------------ writing

    def open_writable(self, image: DiskImage) -> AbstractContextManager[OpenDisk]:
        if image.snapshot_id is not None:
            raise InspectError("a snapshot is never opened for writing")
        return self._open(image, True)

    def put_file(self, disk: OpenDisk, directory_path: Path,
                 name: bytes, source: BinaryIO, *, mode: int, uid: int, gid: int,
                 mtime_ns: int | None = None) -> None:
        if not getattr(disk, "writable", False):
            raise InspectError("the disk is open read-only")
        here = self._get(disk, directory_path)
        if file_type(here.mode) != FileType.DIRECTORY:
            raise NotADirectory(f"{display_path(directory_path)} is not a directory")
        path = (*directory_path, name)
        tree = self._tree(disk)
        current = tree.get(path)
        if current is not None and file_type(current.mode) not in (FileType.FILE,
                                                                    FileType.SYMLINK):
            raise NotAFile(f"{display_path(path)} is a {file_type(current.mode).value}")
        content = source.read()
        with self._lock:
            self.puts.append((disk.image.label, directory_path, name, content, mode, uid,
                              gid, mtime_ns))
            tree[path] = FakeFile(content, stat.S_IFREG | (mode & 0o7777), uid, gid,
                                  mtime_ns if mtime_ns is not None else 0)

    def check(self, disk: OpenDisk) -> None:
        with self._lock:
            self.checks.append(disk.image.label)
