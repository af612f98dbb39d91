"""RestoreSnapshotFiles: chosen files of a snapshot put back onto the instance whose disk
it is, without rolling the disk back.

Where they go depends on the instance:
- **Running**: into the guest, through its agent. Each file is written to a temporary
  name beside its target (`<target>.ecsnap-restore`, removed first: the agent runs as root
  and a guest user could have left a symlink there), then given the snapshot's owner and
  mode (`chown`, then `chmod`: chown clears set-id bits) and renamed over the target with
  `mv -f` (a rename: a symlink at the target is replaced, never followed; a directory
  there is refused). The guest sees either the old file or the restored one. Paths are
  the guest's: a system disk's path as it is, a data disk's under `/mnt/<disk id>` (where
  the demo image mounts its data disks), unless a target path is given.
- **Stopped**: onto the disk itself, the disk's current state opened read-write by the
  file-system writer (`debugfs -w` on a writable qemu-nbd export through nbdfuse, the
  disk file locked meanwhile so that no VM opens it; `adapters/inspect/debugfs.py`),
  while the snapshot is read from its own read-only export. Nothing is mounted by the
  host kernel, as for reading. This is the simplest way that never boots the guest and
  never trusts its file system to the kernel; its risk is that debugfs writes without the
  journal, so a file system whose journal needs recovery is refused (start and stop the
  instance first, or restore while it runs), each file replaces its target in one
  debugfs run (written under a temporary name, then linked in place), and a last step
  runs `e2fsck -f -p`, which also repairs what a crash in the middle of a run can leave
  (blocks marked used by no file).

What is restored: regular files only, with their content, permission bits, owner
(uid/gid numbers) and modification time (onto a stopped disk to the nanosecond; into a
guest to the second, as busybox's `touch -d @SECONDS` takes it). A symlink, a device, a
FIFO or a directory of the snapshot is refused (`InvalidPath.NotAFile`): restoring them
"as what they are" would let a snapshot (guest data) plant a device node or a link, and
restoring through them would follow guest links.
Paths are absolute, without `.` or `..` (`adapters/inspect/base.parse_path`); guest names
are data (a stopped disk refuses names debugfs cannot take as they are). Bounds:
`MAX_PATHS` paths, `MAX_TOTAL_BYTES` in all.

The operation (`RestoreSnapshotFiles`) holds the instance and the disk; a step per file
(`copy:N`), and `fsck` on a stopped disk. Every step is idempotent (restoring a file twice
gives the same file); after a crash the task goes forward. A failed task keeps the files
restored before the failure (the task's result lists them) and removes its temporary files.
"""

from __future__ import annotations

import contextlib
import functools
import shlex
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO, cast

from ecsnap.adapters.compute.base import ComputeError
from ecsnap.adapters.inspect.base import (
    DiskImage,
    FileEntry,
    FileSystemReader,
    FileSystemWriter,
    FileType,
    InspectError,
    NotADirectory,
    NotAFile,
    NotFound,
    Path,
    Unsupported,
    display_path,
    parse_path,
)
from ecsnap.adapters.store.base import UnitOfWork
from ecsnap.domain import errors, ids, rules
from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import DiskType, InstanceStatus, SnapshotStatus
from ecsnap.service.context import ServiceContext, get_instance, get_snapshot
from ecsnap.service.operation import Lock, Operation, Plan, Resume, Step
from ecsnap.service.tasks import SHORT_TASK_S

MAX_PATHS = 20
MAX_TOTAL_BYTES = 64 << 20
READ_CHUNK = 1 << 20
GUEST = "guest"  # into the running guest, through its agent
DISK = "disk"  # onto the stopped instance's disk
TEMP_SUFFIX = ".ecsnap-restore"


@dataclass(frozen=True)
class RestoreFilesPlan(Plan):
    instance_id: str
    disk_id: str
    snapshot_id: str
    region_id: str
    mode: str  # GUEST or DISK
    # (path in the snapshot, where it goes: a guest path or a path on the disk), as text
    items: tuple[tuple[str, str], ...] = ()
    volume: str = ""  # the disk's current volume (DISK)


@dataclass(frozen=True)
class RestoreResult:
    task_id: str
    instance_id: str
    disk_id: str
    mode: str
    items: list[tuple[str, str]]
    status: str  # the task's, when the call returns


# ---------------------------------------------------------------- checking the request


def _parse(name: str, text: str) -> Path:
    try:
        return parse_path(text)
    except ValueError as exc:
        raise errors.invalid_parameter(name, str(exc) + ".") from exc


def _paths(paths: Sequence[str], target_path: str | None) -> list[tuple[Path, Path]]:
    if not paths:
        raise errors.missing_parameter("Path.1")
    if len(paths) > MAX_PATHS:
        raise EcsError("InvalidParameter.PathCount", f"At most {MAX_PATHS} paths are restored "
                       f"in one call; {len(paths)} were given.", 400)
    parsed = [_parse(f"Path.{n}", p) for n, p in enumerate(paths, 1)]
    if any(not p for p in parsed):
        raise errors.invalid_parameter("Path.N", "The root directory is not a file.")
    if len(set(parsed)) != len(parsed):
        raise errors.invalid_parameter("Path.N", "A path is given twice.")
    if target_path:
        if len(parsed) != 1:
            raise errors.invalid_parameter("TargetPath", "A target path is given with one "
                                           "path only.")
        target = _parse("TargetPath", target_path)
        if not target:
            raise errors.invalid_parameter("TargetPath", "The root directory is not a file.")
        return [(parsed[0], target)]
    return [(p, p) for p in parsed]


def _guest_text(path: Path) -> str:
    """A guest path for the agent (JSON strings: UTF-8 only)."""
    try:
        text = "/" + "/".join(c.decode("utf-8") for c in path)
    except UnicodeDecodeError as exc:
        raise EcsError("InvalidPath.Unsupported", f"{display_path(path)} is not UTF-8: the "
                       "guest agent takes UTF-8 paths only (restore it onto the stopped "
                       "instance's disk instead).", 400) from exc
    if "\0" in text:
        raise EcsError("InvalidPath.Unsupported", "A path may not hold a NUL byte.", 400)
    return text


def _stat_all(reader: FileSystemReader, image: DiskImage,
              paths: Sequence[Path]) -> list[FileEntry]:
    """Each path's entry in the snapshot: regular files only, within the size bound."""
    try:
        with reader.open(image) as disk:
            entries = [reader.stat(disk, p) for p in paths]
    except (NotFound, NotADirectory) as exc:
        raise EcsError("InvalidPath.NotFound", f"{exc} (in snapshot {image.snapshot_id}).",
                       404) from exc
    except Unsupported as exc:
        raise EcsError("OperationDenied.UnsupportedFileSystem", f"The file system of "
                       f"snapshot {image.snapshot_id} cannot be read: {exc}", 403) from exc
    except (InspectError, OSError) as exc:
        raise EcsError("ServiceUnavailable", f"Snapshot {image.snapshot_id} could not be "
                       f"read: {exc}", 503) from exc
    for e in entries:
        if e.type != FileType.FILE:
            raise EcsError("InvalidPath.NotAFile", f"{display_path(e.path)} is a "
                           f"{e.type.value} in snapshot {image.snapshot_id}: only regular "
                           "files are restored (a symlink, a device or a directory is not).",
                           400)
    total = sum(e.size for e in entries)
    if total > MAX_TOTAL_BYTES:
        raise EcsError("InvalidParameter.TooLarge", f"The files hold {total} bytes; at most "
                       f"{MAX_TOTAL_BYTES} bytes are restored in one call.", 400)
    return entries


class RestoreSnapshotFiles(Operation[RestoreFilesPlan]):
    action = "RestoreSnapshotFiles"
    plan_type = RestoreFilesPlan

    @classmethod
    def check(cls, ctx: ServiceContext, uow: UnitOfWork, account_id: str,
              instance_id: str | None, snapshot_id: str | None, region_id: str | None,
              pairs: Sequence[tuple[Path, Path]], *,
              target_given: bool = False) -> RestoreFilesPlan:
        """`target_given`: the target is the caller's (a guest path as it is); otherwise a
        data disk's path goes under /mnt/<disk id> in the guest."""
        inst = get_instance(uow, account_id, instance_id, region_id)
        snap = get_snapshot(uow, account_id, snapshot_id, region_id)
        if snap.status != SnapshotStatus.ACCOMPLISHED:
            raise EcsError("InvalidSnapshotId.NotReady", f"The snapshot {snap.id} is "
                           f"{snap.status.value}; only an accomplished snapshot is read.", 403)
        disk = uow.disks.get(snap.source_disk_id)
        if disk is None or disk.released or disk.instance_id != inst.id:
            raise EcsError("InvalidSnapshotId.NotBelongToInstance", f"The snapshot {snap.id} "
                           f"is of disk {snap.source_disk_id}, which is not attached to "
                           f"instance {inst.id}: files are restored onto the disk they were "
                           "taken from.", 403)
        rules.require_instance_status(inst, InstanceStatus.RUNNING, InstanceStatus.STOPPED)
        rules.check_not_locked(inst, disk)
        mode = GUEST if inst.status == InstanceStatus.RUNNING else DISK
        if mode == DISK and not isinstance(ctx.inspector, FileSystemWriter):
            raise EcsError("OperationDenied.NoFileSystemWriter", "No file-system writer is "
                           "configured on this server: files are restored into running "
                           "instances only.", 403)
        items = []
        for source, target in pairs:
            where = target
            if mode == GUEST:
                if disk.type != DiskType.SYSTEM and not target_given:
                    where = (b"mnt", disk.id.encode(), *target)
                _guest_text(where)
            items.append((display_path(source), display_path(where)))
        return RestoreFilesPlan(inst.id, disk.id, snap.id, inst.region_id, mode,
                                tuple(items), disk.current_volume)

    @classmethod
    def locks(cls, plan: RestoreFilesPlan) -> list[Lock]:
        return [("instance", plan.instance_id), ("disk", plan.disk_id)]

    def steps(self) -> list[Step]:
        steps = [Step(f"copy:{n}", functools.partial(self.copy, n))
                 for n in range(len(self.plan.items))]
        if self.plan.mode == DISK:
            steps.append(Step("fsck", self.fsck))
        return steps

    # -- the steps

    def _reader(self) -> FileSystemReader:
        if self.ctx.inspector is None:
            raise EcsError("OperationDenied.NoFileSystemReader", "No file-system reader is "
                           "configured on this server.", 403)
        return self.ctx.inspector

    def _writer(self) -> FileSystemWriter:
        reader = self._reader()
        if not isinstance(reader, FileSystemWriter):
            raise EcsError("OperationDenied.NoFileSystemWriter", "No file-system writer is "
                           "configured on this server.", 403)
        return reader

    def _snapshot_image(self) -> DiskImage:
        storage = self.ctx.storage_of(self.plan.region_id)
        return DiskImage(storage.path(self.plan.disk_id), self.plan.snapshot_id,
                         self.plan.disk_id)

    def _read(self, path: Path, spool: tempfile.SpooledTemporaryFile[bytes]) -> FileEntry:
        """The snapshot's file at `path` (its entry), its content into `spool`."""
        reader = self._reader()
        try:
            with reader.open(self._snapshot_image()) as disk:
                entry = reader.stat(disk, path)
                if entry.type != FileType.FILE:
                    raise EcsError("InvalidPath.NotAFile", f"{display_path(path)} is a "
                                   f"{entry.type.value} in the snapshot.", 400)
                offset = 0
                while offset < entry.size:
                    chunk = reader.read_file(disk, path, offset=offset, length=READ_CHUNK)
                    if not chunk:
                        break
                    spool.write(chunk)
                    offset += len(chunk)
                if offset != entry.size:
                    raise InspectError(f"{display_path(path)}: read {offset} of "
                                       f"{entry.size} bytes")
        except (NotFound, NotADirectory, NotAFile) as exc:
            raise EcsError("InvalidPath.NotFound", f"{exc} (in snapshot "
                           f"{self.plan.snapshot_id}).", 404) from exc
        except (InspectError, OSError) as exc:
            raise EcsError("ServiceUnavailable", f"Snapshot {self.plan.snapshot_id} could "
                           f"not be read: {exc}", 503) from exc
        spool.seek(0)
        return entry

    def copy(self, n: int) -> None:
        source_text, target_text = self.plan.items[n]
        source, target = parse_path(source_text), parse_path(target_text)
        with tempfile.SpooledTemporaryFile(max_size=READ_CHUNK * 4) as spool:
            entry = self._read(source, spool)
            if self.plan.mode == GUEST:
                self._into_guest(target, spool.read(), entry)
            else:
                self._onto_disk(target, cast(BinaryIO, spool), entry)
        done = list(self.task.result.get("restored", []))
        if target_text not in done:
            self.note(restored=[*done, target_text])

    def _into_guest(self, target: Path, data: bytes, entry: FileEntry) -> None:
        iid = self.plan.instance_id
        path = _guest_text(target)
        temp = path + TEMP_SUFFIX
        q = shlex.quote
        try:
            prepared = self.ctx.compute.guest_exec(iid, (
                f"if [ -d {q(path)} ] && [ ! -L {q(path)} ]; then "
                f"echo {q(path)} is a directory >&2; exit 3; fi; "
                f"rm -f -- {q(temp)} && mkdir -p -- \"$(dirname -- {q(path)})\""), timeout=30)
            if prepared.exit_code != 0:
                raise _guest_failed(path, prepared.stderr or prepared.stdout)
            self.ctx.compute.guest_write_file(iid, temp, data, timeout=300)
            touch = ""  # whole seconds: busybox's touch -d takes no fraction
            if entry.mtime_ns is not None and entry.mtime_ns >= 0:
                touch = f"touch -m -d @{entry.mtime_ns // 1_000_000_000} {q(temp)} && "
            placed = self.ctx.compute.guest_exec(iid, (
                f"chown {entry.uid}:{entry.gid} {q(temp)} && "
                f"chmod {entry.mode & 0o7777:o} {q(temp)} && {touch}"
                f"mv -f -- {q(temp)} {q(path)}"), timeout=30)
            if placed.exit_code != 0:
                raise _guest_failed(path, placed.stderr or placed.stdout)
        except ComputeError as exc:
            raise EcsError("InvalidInstance.GuestAgentError", f"The guest agent of {iid} could "
                           f"not restore {path}: {exc}", 403) from exc

    def _onto_disk(self, target: Path, content: BinaryIO, entry: FileEntry) -> None:
        writer = self._writer()
        storage = self.ctx.storage_of(self.plan.region_id)
        image = DiskImage(storage.path(self.plan.volume or self.plan.disk_id), None,
                          self.plan.disk_id)
        try:
            with writer.open_writable(image) as disk:
                writer.put_file(disk, target[:-1], target[-1], content,
                                mode=entry.mode & 0o7777, uid=entry.uid, gid=entry.gid,
                                mtime_ns=entry.mtime_ns)
        except (NotFound, NotADirectory) as exc:
            raise EcsError("InvalidPath.NotFound", f"{display_path(target[:-1])} is not a "
                           f"directory on disk {self.plan.disk_id}: {exc}", 404) from exc
        except NotAFile as exc:
            raise EcsError("InvalidPath.NotAFile", str(exc), 400) from exc
        except Unsupported as exc:
            raise EcsError("OperationDenied.UnsupportedFileSystem", f"Disk "
                           f"{self.plan.disk_id} cannot be written: {exc}", 403) from exc
        except (InspectError, OSError) as exc:
            raise EcsError("ServiceUnavailable", f"Disk {self.plan.disk_id} could not be "
                           f"written: {exc}", 503) from exc

    def fsck(self) -> None:
        writer = self._writer()
        storage = self.ctx.storage_of(self.plan.region_id)
        image = DiskImage(storage.path(self.plan.volume or self.plan.disk_id), None,
                          self.plan.disk_id)
        try:
            with writer.open_writable(image) as disk:
                writer.check(disk)
        except (InspectError, OSError) as exc:
            raise EcsError("ServiceUnavailable", f"Disk {self.plan.disk_id}: {exc}",
                           503) from exc

    # -- the end

    def compensate(self, error: BaseException) -> None:
        """The temporary files of a guest restore are removed (best effort: the guest may
        be gone); a stopped disk's temporary entries are replaced by the next restore of
        the same file and never visible under the target's name."""
        if self.plan.mode != GUEST:
            return
        temps = " ".join(shlex.quote(_guest_text(parse_path(t)) + TEMP_SUFFIX)
                         for _, t in self.plan.items)
        with contextlib.suppress(ComputeError, EcsError):
            self.ctx.compute.guest_exec(self.plan.instance_id, f"rm -f -- {temps}",
                                        timeout=30)

    def resume(self) -> Resume:
        return Resume.FORWARD


def _guest_failed(path: str, output: bytes) -> EcsError:
    said = output.decode("utf-8", "replace").strip()[:300]
    return EcsError("InvalidInstance.GuestCommandFailed", f"The guest could not restore "
                    f"{path}: {said or 'no reason given'}", 403)


def restore_snapshot_files(ctx: ServiceContext, account_id: str, instance_id: str | None,
                           snapshot_id: str | None, paths: Sequence[str], *,
                           target_path: str | None = None, region_id: str | None = None,
                           dry_run: bool = False,
                           wait_s: float = SHORT_TASK_S) -> RestoreResult:
    """RestoreSnapshotFiles: put the regular files at `paths` of the snapshot back onto its
    disk's instance (into the running guest, or onto the stopped disk), at the same paths
    or, for one path, at `target_path`. Returns once the task ended or after `wait_s`."""
    pairs = _paths(paths, target_path)
    with ctx.uow(readonly=True) as uow:  # the IDs first: a reader is not opened for nothing
        RestoreSnapshotFiles.check(ctx, uow, account_id, instance_id, snapshot_id, region_id,
                                   pairs, target_given=bool(target_path))
        snap = get_snapshot(uow, account_id, snapshot_id, region_id)
        storage = ctx.storage(uow, snap.region_id)
    if ctx.inspector is None:
        raise EcsError("OperationDenied.NoFileSystemReader", "No file-system reader is "
                       "configured on this server.", 403)
    _stat_all(ctx.inspector, DiskImage(storage.path(snap.source_disk_id), snap.id,
                                       snap.source_disk_id), [s for s, _ in pairs])
    if dry_run:
        raise errors.dry_run_passed()
    task_id = ids.new_id("task")
    with ctx.uow() as uow:
        plan = RestoreSnapshotFiles.check(ctx, uow, account_id, instance_id, snapshot_id,
                                          region_id, pairs, target_given=bool(target_path))
        task = ctx.runner.journal(uow, RestoreSnapshotFiles, plan, account_id=account_id,
                                  region_id=plan.region_id, resource_id=plan.instance_id,
                                  task_id=task_id)
        uow.commit()
    ctx.runner.submit(task, wait_up_to=wait_s)
    with ctx.uow(readonly=True) as uow:
        status = uow.tasks.load(task.id).status.value
    return RestoreResult(task.id, plan.instance_id, plan.disk_id, plan.mode,
                         [(s, t) for s, t in plan.items], status)


@dataclass(frozen=True)
class RestoreTarget:
    """Where a snapshot's files would be restored (for the console's Restore form)."""

    instance_id: str | None  # None: its disk is attached to no instance
    instance_status: str
    disk_id: str
    mode: str  # GUEST or DISK; "" when the instance can take no restore now
    prefix: str  # what a path of the snapshot becomes in the guest ("/mnt/<disk>" or "")


def restore_target(ctx: ServiceContext, account_id: str, snapshot_id: str,
                   region_id: str | None = None) -> RestoreTarget:
    """The instance a snapshot's files go back to: the one its disk is attached to."""
    with ctx.uow(readonly=True) as uow:
        snap = get_snapshot(uow, account_id, snapshot_id, region_id)
        disk = uow.disks.get(snap.source_disk_id)
        if disk is None or disk.released or disk.instance_id is None:
            return RestoreTarget(None, "", snap.source_disk_id, "", "")
        inst = uow.instances.load(disk.instance_id)
        mode = {InstanceStatus.RUNNING: GUEST, InstanceStatus.STOPPED: DISK}.get(inst.status,
                                                                                  "")
        prefix = f"/mnt/{disk.id}" if mode == GUEST and disk.type != DiskType.SYSTEM else ""
        return RestoreTarget(inst.id, inst.status.value, disk.id, mode, prefix)
