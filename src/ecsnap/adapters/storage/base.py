"""The block-storage contract, split by capability (after OpenStack Cinder's interfaces).

A backend serves one storage pool (one region). Every method is idempotent: calling it
again after a crash, with the same arguments, converges to the same state. Errors are
raised as `StorageError`; the services turn them into ECS errors.

Volumes: a disk's content lives in a *volume*, at first the one named by the disk ID. A
backend with the `CloneRevert` capability reverts a disk by cloning the snapshot into a new
volume of the disk, `{disk_id}.{task_id}`, and the service switches the disk to it (the
disk's `current_volume`); the old volumes stay while their snapshots do. So wherever a
method below means "the disk's current content" (`path`, `exists`, `resize`,
`virtual_size`, `create_snapshots`, `revert`, `bytes_written_since`) the service passes
the current volume, which is the disk ID on a backend without the capability (qcow2).
Snapshot lookups (`delete_snapshot`, `has_snapshot`, `list_snapshots`) and `delete`,
`allocated_bytes` take the disk ID or any of its volumes and cover every volume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class StorageError(Exception):
    """A storage operation failed; the message says which and why (qemu-img's words)."""


@dataclass(frozen=True)
class SnapshotInfo:
    name: str  # the snapshot ID (s-...)
    vm_state_size: int
    date_sec: int


@dataclass(frozen=True)
class RbdLocation:
    """A disk of a Ceph RBD pool as `DiskLifecycle.path()` names it, in QEMU's own rbd
    filename syntax: `rbd:POOL/IMAGE[:id=CLIENT][:conf=PATH][:keyring=PATH]`, with `:` and
    backslash (and in POOL and IMAGE `/` and `@`) escaped by a backslash. A hypervisor
    driver reads it with `parse` and opens the image in its own terms (QEMU: an `rbd`
    blockdev node)."""

    pool: str
    image: str
    client: str = ""  # the cephx user without "client." (librados' default: admin)
    conf: str = ""  # ceph.conf (librados' default search path when empty)
    keyring: str = ""  # a keyring outside ceph.conf, when there is one

    PREFIX = "rbd:"

    def __str__(self) -> str:
        out = f"{self.PREFIX}{_escape(self.pool)}/{_escape(self.image)}"
        for key, value in (("id", self.client), ("conf", self.conf),
                           ("keyring", self.keyring)):
            if value:
                out += f":{key}={_escape(value, names=False)}"
        return out

    @classmethod
    def parse(cls, path: str) -> RbdLocation | None:
        """The location a `path()` names, None for a file path; ValueError when it starts
        with `rbd:` but is not one this class writes (a snapshot, an unknown option)."""
        if not path.startswith(cls.PREFIX):
            return None
        fields = _split(path[len(cls.PREFIX):], ":")
        head = _split(fields[0], "/")
        if len(head) != 2 or not all(head) or len(_split(head[1], "@")) != 1:
            raise ValueError(f"{path!r}: not rbd:POOL/IMAGE[:key=value...]")
        options: dict[str, str] = {}
        for field in fields[1:]:
            key, sep, value = field.partition("=")
            if not sep or key not in ("id", "conf", "keyring") or key in options:
                raise ValueError(f"{path!r}: option {field!r} is not id, conf or keyring")
            options[key] = _unescape(value)
        return cls(_unescape(head[0]), _unescape(head[1]), options.get("id", ""),
                   options.get("conf", ""), options.get("keyring", ""))


def _escape(value: str, *, names: bool = True) -> str:
    for char in "\\:@/" if names else "\\:":
        value = value.replace(char, "\\" + char)
    return value


def _unescape(value: str) -> str:
    out, escaped = [], False
    for char in value:
        if char == "\\" and not escaped:
            escaped = True
            continue
        out.append(char)
        escaped = False
    return "".join(out)


def _split(value: str, sep: str) -> list[str]:
    """`value` split at every unescaped `sep` (the escapes are kept, for `_unescape`)."""
    parts, current, escaped = [], "", False
    for char in value:
        if char == sep and not escaped:
            parts.append(current)
            current = ""
            continue
        current += char
        escaped = char == "\\" and not escaped
    parts.append(current)
    return parts


class DiskLifecycle(Protocol):
    """Create, grow and delete the disks of a pool."""

    def path(self, disk_id: str) -> str:
        """Where a hypervisor opens the disk: the absolute path of its file (a qcow2 file),
        or, for a disk of a Ceph RBD pool, QEMU's rbd filename
        `rbd:POOL/IMAGE[:id=CLIENT][:conf=PATH][:keyring=PATH]` (`RbdLocation` reads and
        writes it; qemu-img and qemu-io open it as it is)."""
        ...

    def exists(self, disk_id: str) -> bool: ...

    def create_blank(self, disk_id: str, size_bytes: int) -> None: ...

    def create_from_image(self, disk_id: str, image_path: str, size_bytes: int) -> None:
        """A disk whose content is the image's, as an O(1) overlay on it."""
        ...

    def resize(self, disk_id: str, size_bytes: int) -> None: ...

    def delete(self, disk_id: str) -> None:
        """Remove the disk and everything it holds; a missing disk is not an error."""
        ...

    def virtual_size(self, disk_id: str) -> int: ...

    def allocated_bytes(self, disk_id: str) -> int: ...


class DiskSnapshots(Protocol):
    """Point-in-time snapshots of disks that no VM has open."""

    def create_snapshots(self, items: Sequence[tuple[str, str]]) -> None:
        """Take snapshot `snapshot_id` of each (disk_id, snapshot_id), all or nothing.

        Snapshots that already exist are kept (idempotent); if one fails, those this call
        made are removed and StorageError is raised.
        """
        ...

    def delete_snapshot(self, disk_id: str, snapshot_id: str) -> None:
        """Remove a snapshot; a missing one (or a missing disk) is not an error."""
        ...

    def list_snapshots(self, disk_id: str) -> list[SnapshotInfo]: ...

    def has_snapshot(self, disk_id: str, snapshot_id: str) -> bool: ...


class RevertToSnapshot(Protocol):
    def revert(self, disk_id: str, snapshot_id: str) -> None:
        """Make the disk's content that of the snapshot; other snapshots are kept."""
        ...

    def revert_many(self, items: Sequence[tuple[str, str]]) -> None:
        """`revert` of every (disk_id, snapshot_id), side by side where the backend can."""
        ...


class ChangeTracking(Protocol):
    def bytes_written_since(self, disk_id: str, snapshot_id: str) -> int | None:
        """Guest bytes written on the disk since the snapshot, None when it cannot be told."""
        ...


class DiskFromSnapshot(Protocol):
    """Restore a snapshot to a new disk, leaving the snapshot's own disk untouched."""

    def create_from_snapshot(self, disk_id: str, source_disk_id: str, snapshot_id: str,
                             size_bytes: int) -> None:
        """Make the new disk `disk_id` whose content is the snapshot `snapshot_id` of the
        disk `source_disk_id` (the disk ID or any of its volumes), grown to `size_bytes`
        when the snapshot is smaller. In O(1) of the disk's size (qcow2: once per snapshot
        an export, then an overlay per disk; RBD: a clone). The new disk stands on its own
        for its users: deleting the snapshot, or the source disk, later never breaks it,
        and what it shared with them is freed when the last of them goes. Idempotent: a
        disk of that name left by a crash is made again. StorageError when the snapshot
        is not there."""
        ...


class ImageFromSnapshot(Protocol):
    """Make a custom image's template from a system disk's snapshot (CreateImage)."""

    def export_snapshot(self, source_disk_id: str, snapshot_id: str, target: str) -> int:
        """Write the content of the snapshot `snapshot_id` of the disk `source_disk_id` (the
        disk ID or any of its volumes) into the standalone qcow2 file `target` (overwritten
        if it exists; it names no backing file, so the snapshot, its disk and the pool may
        go later without breaking it), and return its virtual size. The same export as
        `create_from_snapshot`'s base (qcow2: `qemu-img convert -l`; RBD: `qemu-img
        convert` of the snapshot), O(the snapshot's data). StorageError when the snapshot
        is not there."""
        ...


class StorageBackend(DiskLifecycle, DiskSnapshots, RevertToSnapshot, ChangeTracking,
                     DiskFromSnapshot, ImageFromSnapshot, Protocol):
    """Everything the services need from a pool."""


def volume_name(disk_id: str, task_id: str) -> str:
    """The volume a task's clone of a disk's snapshot goes into."""
    return f"{disk_id}.{task_id}"


def disk_of_volume(volume: str) -> str:
    """The disk a volume belongs to (a disk ID is its own first volume)."""
    return volume.partition(".")[0]


@runtime_checkable
class CloneRevert(Protocol):
    """Revert in O(1) by clone and swap (Ceph RBD): a snapshot of a disk is cloned into a
    new volume of the disk, and the service switches the disk to it in one transaction. The
    old volumes are never written again; they stay while they hold snapshots or have clones.
    A backend without it reverts in place (`RevertToSnapshot`)."""

    def volumes(self, disk_id: str) -> list[str]:
        """The disk's volumes in the pool (the disk ID's own first, if it is there)."""
        ...

    def clone_to_volume(self, disk_id: str, snapshot_id: str, volume: str,
                        size_bytes: int) -> None:
        """Make `volume` a clone of the disk's snapshot (on whichever volume of the disk
        holds it), grown to `size_bytes` when the snapshot is smaller. Idempotent: a volume
        of that name left by a crash is removed and made again, if it holds no snapshot and
        has no clone; otherwise StorageError."""
        ...

    def clone_many(self, items: Sequence[tuple[str, str, str, int]]) -> None:
        """`clone_to_volume` of every (disk_id, snapshot_id, volume, size_bytes), side by
        side; raises the first failure after all ran."""
        ...

    def remove_volumes(self, volumes: Sequence[str]) -> list[str]:
        """Remove each volume that holds no snapshot (of any kind) and has no clone; the
        others are kept, a missing one is no error. Returns the ones removed. The caller
        names only volumes nothing refers to (neither a disk's current volume nor one a
        running task made)."""
        ...

    def clone_depth(self, volume: str) -> int:
        """How many parents the volume's data is read through (0: it holds all of it)."""
        ...

    def snapshot_volume(self, disk_id: str, snapshot_id: str) -> str | None:
        """The volume of the disk that holds the snapshot (where a reader opens it); None
        when none does."""
        ...

    def flatten(self, volume: str) -> None:
        """Copy into the volume (and its snapshots) what it reads from its parents, so it
        has none; nothing visible changes. A volume with no parent is left alone."""
        ...


@runtime_checkable
class PoolSpace(Protocol):
    """A backend whose disks are not files on a local file system (Ceph RBD) tells how
    much its pool can still take (service/space.py checks it before a snapshot)."""

    def free_bytes(self) -> int | None:
        """Bytes the pool can still store; None when the backend cannot tell."""
        ...


@runtime_checkable
class ClientFencing(Protocol):
    """A shared-storage backend (Ceph RBD) can shut a fenced host out, so that its VMs,
    still running, cannot write any more (service/cluster.py, when it fences a host)."""

    def blocklist(self, addrs: Sequence[str]) -> None:
        """Refuse every client at these addresses (`IP` or `IP:port/nonce`) from now on
        (Ceph's `osd blocklist add`); idempotent; StorageError if the cluster refused."""
        ...

    def break_locks(self, volumes: Sequence[str]) -> list[str]:
        """Shut out every client that has these volumes open (each QEMU has its own
        client): the exclusive-lock owner's lock broken with blocklisting, the other
        watchers blocklisted, this backend's own handle spared; the addresses shut out."""
        ...

    def client_addrs(self) -> list[str]:
        """This process's own client addresses on the storage (`IP:0/nonce`), which an
        agent registers so that a peer fencing it blocklists them."""
        ...


class ImageImport(Protocol):
    def import_image(self, source: str, target: str) -> int:
        """Convert a qcow2 or raw image file into a standalone qcow2 template at `target`;
        return its virtual size in bytes."""
        ...
