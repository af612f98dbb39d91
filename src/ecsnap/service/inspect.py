"""Looking inside disks without booting their guests: the files a rollback would change
(the file level of PreviewResetDisks) and a snapshot's files (DescribeSnapshotFiles).

Everything here reads; nothing changes a disk or a snapshot. The file-system reader
(`ServiceContext.inspector`, `adapters/inspect/base.FileSystemReader`) opens each disk
read-only, at a snapshot or at its current state, and reads the guest's file system in
user space: guest names are data (shown escaped: `\\xNN` for bytes that are not printable
UTF-8, for the backslash and for a `/` inside a name), symlinks are never followed.

The file level of a preview compares the snapshot with the disk's current state, so it is
given for a stopped instance only (a running guest's disk changes under the reader). Every
path that differs is counted, by kind:
- `added`: there now, not in the snapshot (the rollback removes it);
- `deleted`: in the snapshot, not there now (the rollback brings it back);
- `modified`: in both, with another type, size, mtime, content (compared when the size and
  mtime agree), symlink target, device number, permission bits or owner.
The first `limit` paths (by path) are listed. Large trees are bounded by a time and an
entry budget; a comparison cut short says `partial` and why.

Restoring chosen files of a snapshot (RestoreSnapshotFiles) is `service/restore_files.py`:
it reads them through the same reader and writes them into a running guest through the
guest agent, or onto a stopped instance's disk through the reader's writing side
(`FileSystemWriter`).
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Protocol

from ecsnap.adapters.inspect.base import (
    Budget,
    DiskImage,
    FileEntry,
    FileSystemReader,
    FileType,
    InspectError,
    NotADirectory,
    NotFound,
    Path,
    Unsupported,
    Walk,
    display_path,
    escape_name,
    parse_path,
)
from ecsnap.adapters.storage.base import CloneRevert, StorageBackend
from ecsnap.domain import errors, rules
from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import InstanceStatus, SnapshotStatus
from ecsnap.service.context import ServiceContext, get_snapshot

DEFAULT_MAX_FILES = 200  # paths listed per disk in a preview
MAX_FILES = 10_000
PREVIEW_SECONDS = 120.0  # per disk: both walks and the content comparison
PREVIEW_MAX_ENTRIES = 500_000  # per walk
PREVIEW_MAX_BYTES = 1 << 30  # content read to compare files whose size and mtime agree
MAX_READ_BYTES = 1 << 20  # FileContent per call
DEFAULT_LIST = 100
MAX_LIST = 1000


class FileLevel(StrEnum):
    SUPPORTED = "Supported"
    UNSUPPORTED = "Unsupported"  # the disk's file system cannot be read (Reason says why)
    UNAVAILABLE = "Unavailable"  # not for this disk now (not stopped, not its snapshot...)


class Change(StrEnum):
    ADDED = "added"
    DELETED = "deleted"
    MODIFIED = "modified"


@dataclass(frozen=True)
class FileChange:
    path: str  # escaped (display_path)
    change: Change
    type: str  # FileType value: the current one, the snapshot's for a deleted path
    what: tuple[str, ...] = ()  # for modified: type, size, mtime, content, target, ...
    size_before: int | None = None  # in the snapshot
    size_after: int | None = None  # now
    mtime_before: int | None = None  # ns since the epoch
    mtime_after: int | None = None


@dataclass
class FileChanges:
    file_level: FileLevel
    reason: str = ""
    added: int = 0
    deleted: int = 0
    modified: int = 0
    files: list[FileChange] = field(default_factory=list)  # the first `limit`, by path
    partial: str = ""  # why the comparison is incomplete; "" when it is complete
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return self.added + self.deleted + self.modified


def unavailable(reason: str) -> FileChanges:
    return FileChanges(FileLevel.UNAVAILABLE, reason)


# ---------------------------------------------------------------- comparing two points


def _differences(before: FileEntry, after: FileEntry) -> tuple[str, ...]:
    if before.type != after.type:
        return ("type",)
    what = []
    if before.type == FileType.FILE:
        if before.size != after.size:
            what.append("size")
        if before.mtime_ns != after.mtime_ns:
            what.append("mtime")
    elif before.type == FileType.SYMLINK:
        if before.target != after.target or before.size != after.size:
            what.append("target")
    elif before.type in (FileType.CHAR_DEVICE, FileType.BLOCK_DEVICE) and \
            before.layout != after.layout:
        what.append("device")
    if before.mode & 0o7777 != after.mode & 0o7777:
        what.append("mode")
    if (before.uid, before.gid) != (after.uid, after.gid):
        what.append("owner")
    return tuple(what)


def _change(path: Path, kind: Change, before: FileEntry | None, after: FileEntry | None,
            what: tuple[str, ...] = ()) -> FileChange:
    shown = after or before
    assert shown is not None
    return FileChange(display_path(path), kind, shown.type.value, what,
                      before.size if before else None, after.size if after else None,
                      before.mtime_ns if before else None, after.mtime_ns if after else None)


def diff(reader: FileSystemReader, before: DiskImage, after: DiskImage, *,
         limit: int = DEFAULT_MAX_FILES, seconds: float = PREVIEW_SECONDS,
         max_entries: int = PREVIEW_MAX_ENTRIES,
         max_bytes: int = PREVIEW_MAX_BYTES) -> FileChanges:
    """The paths that differ between two points of a disk (a snapshot and the current
    state). `Unsupported` when the file system cannot be read; InspectError otherwise."""
    started = time.monotonic()
    result = FileChanges(FileLevel.SUPPORTED)
    with reader.open(before) as old, reader.open(after) as new:
        # both walks side by side, each within 80 % of the time (the comparison needs the
        # rest)
        with ThreadPoolExecutor(2) as pool:
            walking = [pool.submit(reader.walk, disk, Budget(seconds * 0.8, max_entries))
                       for disk in (old, new)]
            walk_old, walk_new = (w.result() for w in walking)
        changes: list[tuple[Path, FileChange]] = []
        unknown = 0
        candidates: list[tuple[Path, FileEntry, FileEntry]] = []
        for path in sorted(walk_old.entries.keys() | walk_new.entries.keys()):
            was, now = walk_old.entries.get(path), walk_new.entries.get(path)
            if was is None:
                if walk_old.exists(path) is False:
                    changes.append((path, _change(path, Change.ADDED, None, now)))
                else:
                    unknown += 1
            elif now is None:
                if walk_new.exists(path) is False:
                    changes.append((path, _change(path, Change.DELETED, was, None)))
                else:
                    unknown += 1
            elif what := _differences(was, now):
                changes.append((path, _change(path, Change.MODIFIED, was, now, what)))
            elif was.type == FileType.FILE:
                candidates.append((path, was, now))
        budget = Budget(max(1.0, seconds - (time.monotonic() - started)),
                        max_bytes=max_bytes)
        same = reader.same_content(old, new, [(b, a) for _, b, a in candidates], budget)
    undecided = 0
    for (path, was, now), equal in zip(candidates, same, strict=True):
        if equal is False:
            changes.append((path, _change(path, Change.MODIFIED, was, now, ("content",))))
        elif equal is None:
            undecided += 1
    changes.sort(key=lambda item: item[0])
    for _, c in changes:
        if c.change == Change.ADDED:
            result.added += 1
        elif c.change == Change.DELETED:
            result.deleted += 1
        else:
            result.modified += 1
    result.files = [c for _, c in changes[:max(0, limit)]]
    result.partial = _partial(walk_old, walk_new, unknown, undecided)
    result.notes = [*(f"snapshot: {n}" for n in walk_old.notes),
                    *(f"now: {n}" for n in walk_new.notes)][:50]
    result.seconds = round(time.monotonic() - started, 3)
    return result


def _partial(old: Walk, new: Walk, unknown: int, undecided: int) -> str:
    why = [f"snapshot: {old.partial}" if old.partial else "",
           f"now: {new.partial}" if new.partial else "",
           f"{unknown} paths under directories not read on both sides" if unknown else "",
           f"{undecided} files of equal size and mtime not compared within the budget"
           if undecided else ""]
    return "; ".join(w for w in why if w)


def file_changes(ctx: ServiceContext, storage: StorageBackend, disk_id: str, volume: str,
                 snapshot_id: str, *, limit: int = DEFAULT_MAX_FILES) -> FileChanges:
    """The file level of one disk's preview: its snapshot against its current state."""
    if ctx.inspector is None:
        return unavailable("no file-system reader is configured")
    try:
        location = storage.path(volume)
        return diff(ctx.inspector, DiskImage(snapshot_location(storage, disk_id, snapshot_id),
                                             snapshot_id, disk_id),
                    DiskImage(location, None, disk_id), limit=limit)
    except Unsupported as exc:
        return FileChanges(FileLevel.UNSUPPORTED, str(exc))
    except (InspectError, OSError) as exc:
        return unavailable(f"the disk could not be read: {exc}")


def snapshot_location(storage: StorageBackend, disk_id: str, snapshot_id: str) -> str:
    """Where a reader opens a disk's snapshot: the disk's location, or on a backend that
    reverts by clone and swap (Ceph RBD) the location of the disk's volume holding it."""
    if isinstance(storage, CloneRevert):
        return storage.path(storage.snapshot_volume(disk_id, snapshot_id) or disk_id)
    return storage.path(disk_id)


class DiskWithFiles(Protocol):
    """A disk of a rollback preview (`rollback.DiskPreview`)."""

    files: FileChanges | None


def add_file_changes(ctx: ServiceContext, storage: StorageBackend, instance_status: str,
                     disks: Sequence[DiskWithFiles], targets: Sequence[rules.ResetTarget], *,
                     limit: int) -> None:
    """Set `files` on each disk of a rollback preview: what the rollback would change,
    file by file. Only a stopped instance's disks are read."""
    for disk_preview, t in zip(disks, targets, strict=True):
        if instance_status != InstanceStatus.STOPPED.value:
            disk_preview.files = unavailable(
                f"the instance is {instance_status}: files are compared on a stopped "
                "instance only (a running guest changes them)")
        elif t.disk is None or t.snapshot is None or t.disk.released:
            disk_preview.files = unavailable("the disk or the snapshot does not exist")
        elif t.snapshot.source_disk_id != t.disk_id:
            disk_preview.files = unavailable("the snapshot is not one of this disk")
        elif t.snapshot.status != SnapshotStatus.ACCOMPLISHED:
            disk_preview.files = unavailable("the snapshot is not accomplished")
        else:
            disk_preview.files = file_changes(ctx, storage, t.disk_id, t.disk.current_volume,
                                              t.snapshot_id, limit=limit)


# ---------------------------------------------------------------- a snapshot's files


@dataclass(frozen=True)
class EntryView:
    name: str  # escaped (escape_name)
    path: str  # escaped (display_path)
    type: str  # FileType value
    size: int
    mode: int  # st_mode
    uid: int
    gid: int
    modified: datetime | None
    link_target: str | None  # a symlink's target, escaped; never followed


@dataclass
class SnapshotFiles:
    snapshot_id: str
    disk_id: str
    entry: EntryView  # what Path names
    entries: list[EntryView] = field(default_factory=list)  # a directory's, this page
    total: int = 0  # a directory's entries
    next_token: str = ""
    content: bytes | None = None  # a regular file's bytes from `offset`
    offset: int = 0

    @property
    def truncated(self) -> bool:
        return self.content is not None and self.offset + len(self.content) < self.entry.size


def _view(entry: FileEntry) -> EntryView:
    modified = None
    if entry.mtime_ns is not None:
        try:
            modified = datetime.fromtimestamp(entry.mtime_ns / 1e9, UTC).replace(tzinfo=None)
        except (OverflowError, OSError, ValueError):
            modified = None
    return EntryView(escape_name(entry.name) if entry.path else "/", display_path(entry.path),
                     entry.type.value, entry.size, entry.mode, entry.uid, entry.gid, modified,
                     escape_name(entry.target) if entry.target is not None else None)


def _token(name: bytes) -> str:
    return base64.urlsafe_b64encode(name).decode()


def _after(token: str | None) -> bytes | None:
    if not token:
        return None
    try:
        return base64.b64decode(token.encode("ascii"), altchars=b"-_", validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
        raise errors.invalid_parameter("NextToken", "It is not a token this call "
                                       "returned.") from exc


def describe_snapshot_files(ctx: ServiceContext, account_id: str, snapshot_id: str | None,
                            path: str | None = "/", *, region_id: str | None = None,
                            next_token: str | None = None, max_results: int | None = None,
                            offset: int | None = None,
                            max_bytes: int | None = None) -> SnapshotFiles:
    """What `path` is in a snapshot: a directory's entries (a page, by name), a regular
    file's content (up to `max_bytes` from `offset`), or a symlink's target; the snapshot
    is read, never changed (an instance may be running meanwhile)."""
    try:
        where = parse_path(path or "/")
    except ValueError as exc:
        raise errors.invalid_parameter("Path", str(exc) + ".") from exc
    limit = min(MAX_LIST, max_results or DEFAULT_LIST)
    want = min(MAX_READ_BYTES, max_bytes or MAX_READ_BYTES)
    after = _after(next_token)
    with ctx.uow(readonly=True) as uow:
        snap = get_snapshot(uow, account_id, snapshot_id, region_id)
        if snap.status != SnapshotStatus.ACCOMPLISHED:
            raise EcsError("InvalidSnapshotId.NotReady", f"The snapshot {snap.id} is "
                           f"{snap.status.value}; only an accomplished snapshot can be "
                           "read.", 403)
        storage = ctx.storage(uow, snap.region_id)
    if ctx.inspector is None:
        raise EcsError("OperationDenied.NoFileSystemReader", "No file-system reader is "
                       "configured on this server.", 403)
    reader = ctx.inspector
    image = DiskImage(snapshot_location(storage, snap.source_disk_id, snap.id), snap.id,
                      snap.source_disk_id)
    try:
        with reader.open(image) as disk:
            entry = reader.stat(disk, where)
            result = SnapshotFiles(snap.id, snap.source_disk_id, _view(entry))
            if entry.type == FileType.DIRECTORY:
                page = reader.list_dir(disk, where, after=after, limit=limit)
                result.entries = [_view(e) for e in page.entries]
                result.total = page.total
                if page.more and page.entries:
                    result.next_token = _token(page.entries[-1].name)
            elif entry.type == FileType.FILE:
                result.offset = max(0, offset or 0)
                result.content = reader.read_file(disk, where, offset=result.offset,
                                                  length=want)
            return result
    except (NotFound, NotADirectory) as exc:
        raise EcsError("InvalidPath.NotFound", f"{exc} (in snapshot {snap.id}).",
                       404) from exc
    except Unsupported as exc:
        raise EcsError("OperationDenied.UnsupportedFileSystem", f"The file system of "
                       f"snapshot {snap.id} cannot be read: {exc}", 403) from exc
    except (InspectError, OSError) as exc:
        raise EcsError("ServiceUnavailable", f"Snapshot {snap.id} could not be read: {exc}",
                       503) from exc
