"""The block-storage contract, split by capability (after OpenStack Cinder's interfaces).

A backend serves one storage pool (one region). Every method is idempotent: calling it
again after a crash, with the same arguments, converges to the same state. Errors are
raised as `StorageError`; the services turn them into ECS errors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class StorageError(Exception):
    """A storage operation failed; the message says which and why (qemu-img's words)."""


@dataclass(frozen=True)
class SnapshotInfo:
    name: str  # the snapshot ID (s-...)
    vm_state_size: int
    date_sec: int


class DiskLifecycle(Protocol):
    """Create, grow and delete the disks of a pool."""

    def path(self, disk_id: str) -> str:
        """Where the disk's file lives (a hypervisor opens it from there)."""
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


class StorageBackend(DiskLifecycle, DiskSnapshots, RevertToSnapshot, ChangeTracking, Protocol):
    """Everything the services need from a pool."""


class ImageImport(Protocol):
    def import_image(self, source: str, target: str) -> int:
        """Convert a qcow2 or raw image file into a standalone qcow2 template at `target`;
        return its virtual size in bytes."""
        ...
