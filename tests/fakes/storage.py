"""An in-memory storage backend (`StorageBackend`, and `ImageImport`) for fast tests.

A disk is a dict entry: its content (bytes, or any str used as a version token), its
size, and its snapshots, each holding the content the disk had when it was taken. The
rules of the qcow2 backend are kept: every method is idempotent, `create_snapshots` is
all or nothing and keeps snapshots that exist, a revert keeps the other snapshots and
never shrinks the disk, snapshot names must not be empty or all digits, missing disks and
snapshots are no error for deletes, and errors are `StorageError`.

Bytes written since a snapshot are counted from the writes made with `write()`, each at
an offset: the disk and each snapshot remember which write last wrote each byte, and the
answer is the number of bytes where the disk and the snapshot differ in that, which is
what the qcow2 backend finds by comparing cluster tables (byte by byte here, cluster by
cluster there: the same for writes in whole clusters), after overwrites and reverts too.

`revert_many` checks every pair before it reverts any disk, so a missing disk or snapshot
changes nothing. An injected revert failure (`fail("revert", disk_id)`) happens in the
middle instead, after the other disks were reverted, as a qemu-img process that dies does
with the qcow2 backend: that is how the services' compensation is tested.

`InMemoryPools` hands out one backend per pool and resolves the `path()` of any disk back
to its backend, so the compute fake can "open" the disks of a VM.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

from ecsnap.adapters.storage.base import SnapshotInfo, StorageError

Content = bytes | str
SCHEME = "mem://"


Extents = tuple[tuple[int, int, int], ...]  # sorted (start, end, write serial), no overlap


def _overwrite(extents: Extents, start: int, end: int, serial: int) -> Extents:
    kept: list[tuple[int, int, int]] = []
    for s, e, w in extents:
        if e <= start or s >= end:
            kept.append((s, e, w))
            continue
        if s < start:
            kept.append((s, start, w))
        if e > end:
            kept.append((end, e, w))
    kept.append((start, end, serial))
    return tuple(sorted(kept))


def _writer_at(extents: Extents, offset: int) -> int | None:
    return next((w for s, e, w in extents if s <= offset < e), None)


def _differing(a: Extents, b: Extents) -> int:
    """The bytes that one of `a`, `b` has from another write than the other."""
    points = sorted({p for s, e, _ in (*a, *b) for p in (s, e)})
    return sum(hi - lo for lo, hi in pairwise(points)
               if _writer_at(a, lo) != _writer_at(b, lo))


@dataclass
class _Snapshot:
    content: Content
    extents: Extents
    size_bytes: int
    date_sec: int


@dataclass
class FakeDisk:
    size_bytes: int
    content: Content
    extents: Extents = ()
    snapshots: dict[str, _Snapshot] = field(default_factory=dict)  # in the order taken
    base_image: str = ""


@dataclass
class _Failure:
    method: str
    disk_id: str | None
    error: Exception
    times: int


_serials = itertools.count(1)


def _check_name(snapshot_id: str) -> None:
    if not snapshot_id or snapshot_id.isdigit():
        raise StorageError(f"{snapshot_id!r}: snapshot names must not be empty or all digits")


class InMemoryStorage:
    """One pool of in-memory disks."""

    def __init__(self, pool: str = "pool") -> None:
        self.pool = pool
        self.disks: dict[str, FakeDisk] = {}
        self.calls: list[tuple[str, ...]] = []  # (method, disk ID...) of every call
        self._failures: list[_Failure] = []
        self._lock = threading.RLock()

    # ------------------------------------------------------------ test hooks

    def fail(self, method: str, disk_id: str | None = None, *, times: int = 1,
             error: Exception | None = None) -> None:
        """Make the next `times` calls of `method` (on `disk_id`, or any disk) raise
        `error` (a StorageError by default). Methods: create_blank, create_from_image,
        create_from_snapshot, resize, delete, create_snapshots, delete_snapshot, revert,
        bytes_written_since."""
        self._failures.append(_Failure(method, disk_id, error or StorageError(
            f"injected failure of {method} on {disk_id or 'any disk'}"), times))

    def _maybe_fail(self, method: str, disk_id: str) -> None:
        for failure in self._failures:
            if failure.method == method and failure.disk_id in (None, disk_id) \
                    and failure.times > 0:
                failure.times -= 1
                raise failure.error

    def write(self, disk_id: str, content: Content, *, offset: int = 0,
              size: int | None = None) -> None:
        """What a guest writing to the disk does: the disk's content is now `content`,
        and `size` bytes were written at `offset` (default: the length of `content`)."""
        with self._lock:
            disk = self._disk(disk_id)
            if size is None:
                size = len(content.encode() if isinstance(content, str) else content)
            if offset < 0 or size < 0 or offset + size > disk.size_bytes:
                raise StorageError(f"{disk_id}: a write of {size} bytes at {offset} is "
                                   f"outside the disk ({disk.size_bytes} bytes)")
            disk.content = content
            if size:
                disk.extents = _overwrite(disk.extents, offset, offset + size, next(_serials))

    def content(self, disk_id: str) -> Content:
        return self._disk(disk_id).content

    def snapshot_content(self, disk_id: str, snapshot_id: str) -> Content:
        return self._snapshot(disk_id, snapshot_id).content

    def snapshot_names(self, disk_id: str) -> list[str]:
        return [s.name for s in self.list_snapshots(disk_id)]

    def state(self) -> dict[str, tuple[int, Content, tuple[tuple[str, Content], ...]]]:
        """Every disk's size, content and snapshots (compare two: did anything change?)."""
        with self._lock:
            return {d: (disk.size_bytes, disk.content,
                        tuple((name, s.content) for name, s in disk.snapshots.items()))
                    for d, disk in self.disks.items()}

    def _disk(self, disk_id: str) -> FakeDisk:
        disk = self.disks.get(disk_id)
        if disk is None:
            raise StorageError(f"{self.path(disk_id)}: no such disk file")
        return disk

    def _snapshot(self, disk_id: str, snapshot_id: str) -> _Snapshot:
        snap = self._disk(disk_id).snapshots.get(snapshot_id)
        if snap is None:
            raise StorageError(f"{disk_id}: no snapshot {snapshot_id}")
        return snap

    # ------------------------------------------------------------ DiskLifecycle

    def path(self, disk_id: str) -> str:
        return f"{SCHEME}{self.pool}/{disk_id}"

    def exists(self, disk_id: str) -> bool:
        return disk_id in self.disks

    def create_blank(self, disk_id: str, size_bytes: int) -> None:
        with self._lock:
            self.calls.append(("create_blank", disk_id))
            self._maybe_fail("create_blank", disk_id)
            if disk_id in self.disks:  # qemu-img create truncates an existing file
                del self.disks[disk_id]
            self.disks[disk_id] = FakeDisk(size_bytes, b"")

    def create_from_image(self, disk_id: str, image_path: str, size_bytes: int) -> None:
        """The disk's content is the image file's bytes (any file will do)."""
        with self._lock:
            self.calls.append(("create_from_image", disk_id))
            self._maybe_fail("create_from_image", disk_id)
            try:
                base = Path(image_path).read_bytes()
            except OSError as exc:
                raise StorageError(f"{image_path}: {exc}") from exc
            self.disks[disk_id] = FakeDisk(size_bytes, base, base_image=image_path)

    def resize(self, disk_id: str, size_bytes: int) -> None:
        with self._lock:
            self.calls.append(("resize", disk_id))
            self._maybe_fail("resize", disk_id)
            disk = self._disk(disk_id)
            if size_bytes < disk.size_bytes:
                raise StorageError(f"{disk_id}: disks only grow ({size_bytes} bytes asked)")
            disk.size_bytes = size_bytes

    def delete(self, disk_id: str) -> None:
        with self._lock:
            self.calls.append(("delete", disk_id))
            self._maybe_fail("delete", disk_id)
            self.disks.pop(disk_id, None)

    def virtual_size(self, disk_id: str) -> int:
        return self._disk(disk_id).size_bytes

    def allocated_bytes(self, disk_id: str) -> int:
        """The bytes of every write the disk or one of its snapshots holds."""
        disk = self.disks.get(disk_id)
        if disk is None:
            return 0
        held = set(disk.extents).union(*(s.extents for s in disk.snapshots.values()))
        return sum(e - s for s, e, _ in held)

    # ------------------------------------------------------------ DiskSnapshots

    def create_snapshots(self, items: Sequence[tuple[str, str]]) -> None:
        for _, snapshot_id in items:
            _check_name(snapshot_id)
        with self._lock:
            self.calls.append(("create_snapshots", *(f"{d}@{s}" for d, s in items)))
            made: list[tuple[str, str]] = []
            try:
                for disk_id, snapshot_id in items:
                    self._maybe_fail("create_snapshots", disk_id)
                    disk = self._disk(disk_id)
                    if snapshot_id not in disk.snapshots:
                        disk.snapshots[snapshot_id] = _Snapshot(
                            disk.content, disk.extents, disk.size_bytes, int(time.time()))
                        made.append((disk_id, snapshot_id))
            except Exception as exc:
                for disk_id, snapshot_id in made:
                    self.disks[disk_id].snapshots.pop(snapshot_id, None)
                if isinstance(exc, StorageError):
                    raise StorageError(f"snapshot of {len(items)} disk(s) undone: {exc}") \
                        from exc
                raise

    def delete_snapshot(self, disk_id: str, snapshot_id: str) -> None:
        with self._lock:
            self.calls.append(("delete_snapshot", disk_id, snapshot_id))
            self._maybe_fail("delete_snapshot", disk_id)
            disk = self.disks.get(disk_id)
            if disk is not None:
                disk.snapshots.pop(snapshot_id, None)

    def list_snapshots(self, disk_id: str) -> list[SnapshotInfo]:
        disk = self.disks.get(disk_id)
        if disk is None:
            return []
        return [SnapshotInfo(name, 0, s.date_sec) for name, s in disk.snapshots.items()]

    def has_snapshot(self, disk_id: str, snapshot_id: str) -> bool:
        disk = self.disks.get(disk_id)
        return disk is not None and snapshot_id in disk.snapshots

    # ------------------------------------------------------------ RevertToSnapshot

    def revert(self, disk_id: str, snapshot_id: str) -> None:
        _check_name(snapshot_id)
        with self._lock:
            self.calls.append(("revert", disk_id, snapshot_id))
            self._maybe_fail("revert", disk_id)
            self._revert(disk_id, snapshot_id)

    def _revert(self, disk_id: str, snapshot_id: str) -> None:
        disk = self._disk(disk_id)
        snap = self._snapshot(disk_id, snapshot_id)
        disk.content, disk.extents = snap.content, snap.extents
        disk.size_bytes = max(disk.size_bytes, snap.size_bytes)  # disks never shrink

    def revert_many(self, items: Sequence[tuple[str, str]]) -> None:
        if len({d for d, _ in items}) != len(items):
            raise StorageError("a disk can be reverted to one snapshot only")
        with self._lock:
            self.calls.append(("revert_many", *(f"{d}@{s}" for d, s in items)))
            for disk_id, snapshot_id in items:  # nothing changes unless every pair exists
                _check_name(snapshot_id)
                self._snapshot(disk_id, snapshot_id)
            first: Exception | None = None
            for disk_id, snapshot_id in items:  # side by side; the first failure after all
                try:
                    self._maybe_fail("revert", disk_id)
                    self._revert(disk_id, snapshot_id)
                except Exception as exc:
                    first = first or exc
            if first is not None:
                raise first

    # ------------------------------------------------------------ DiskFromSnapshot

    def create_from_snapshot(self, disk_id: str, source_disk_id: str, snapshot_id: str,
                             size_bytes: int) -> None:
        """The disk's content is the snapshot's (its writes too); it depends on nothing."""
        _check_name(snapshot_id)
        with self._lock:
            self.calls.append(("create_from_snapshot", disk_id, f"{source_disk_id}@"
                                                                f"{snapshot_id}"))
            self._maybe_fail("create_from_snapshot", disk_id)
            snap = self._snapshot(source_disk_id, snapshot_id)
            self.disks[disk_id] = FakeDisk(max(size_bytes, snap.size_bytes), snap.content,
                                           snap.extents)

    # ------------------------------------------------------------ ImageFromSnapshot

    def export_snapshot(self, source_disk_id: str, snapshot_id: str, target: str) -> int:
        """The snapshot's content as the bytes of the file `target` (an image template
        `create_from_image` reads back); its virtual size."""
        _check_name(snapshot_id)
        with self._lock:
            self.calls.append(("export_snapshot", f"{source_disk_id}@{snapshot_id}"))
            self._maybe_fail("export_snapshot", source_disk_id)
            snap = self._snapshot(source_disk_id, snapshot_id)
            content = snap.content
        Path(target).write_bytes(content.encode() if isinstance(content, str) else content)
        return snap.size_bytes

    # ------------------------------------------------------------ ChangeTracking

    def bytes_written_since(self, disk_id: str, snapshot_id: str) -> int | None:
        with self._lock:
            self._maybe_fail("bytes_written_since", disk_id)
            disk = self.disks.get(disk_id)
            if disk is None:
                return None
            snap = disk.snapshots.get(snapshot_id)
            if snap is None:
                return None
            return _differing(disk.extents, snap.extents)

    # ------------------------------------------------------------ ImageImport

    def import_image(self, source: str, target: str) -> int:
        """Copy the image file (any file) to `target`; its size is its virtual size."""
        try:
            data = Path(source).read_bytes()
            Path(target).write_bytes(data)
        except OSError as exc:
            raise StorageError(f"{source}: {exc}") from exc
        return len(data)


class InMemoryPools:
    """The in-memory backends of every pool, and the disk behind any of their paths."""

    def __init__(self) -> None:
        self.backends: dict[str, InMemoryStorage] = {}

    def for_pool(self, pool: str) -> InMemoryStorage:
        """The `storage_for` of a ServiceContext."""
        if pool not in self.backends:
            self.backends[pool] = InMemoryStorage(pool)
        return self.backends[pool]

    def open(self, path: str) -> tuple[InMemoryStorage, str]:
        """The backend and disk ID behind `path` (StorageError if no such disk)."""
        if not path.startswith(SCHEME):
            raise StorageError(f"{path}: not an in-memory disk")
        pool, _, disk_id = path.removeprefix(SCHEME).rpartition("/")
        backend = self.backends.get(pool)
        if backend is None or not backend.exists(disk_id):
            raise StorageError(f"{path}: no such disk file")
        return backend, disk_id

    def all(self) -> Iterable[InMemoryStorage]:
        return self.backends.values()
