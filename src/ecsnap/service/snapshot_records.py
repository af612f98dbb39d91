"""Building block: the rows of snapshots and snapshot groups, written Progressing when a
task is journaled and completed (or dropped) when it ends.

Used by the snapshot and rollback use cases (a rollback's safety snapshot group).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ecsnap.adapters.store.base import Criteria, UnitOfWork
from ecsnap.domain import ids
from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import (
    MAX_MANUAL_SNAPSHOTS_PER_DISK,
    Consistency,
    Disk,
    GroupPurpose,
    Snapshot,
    SnapshotGroup,
)


@dataclass
class GroupSpec:
    name: str = ""
    description: str = ""
    purpose: GroupPurpose = GroupPurpose.USER
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class SnapshotSpec:
    name: str = ""
    description: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    retention_days: int | None = None


def check_snapshot_quota(uow: UnitOfWork, disks: Sequence[Disk],
                         account_snapshots: int | None = None) -> None:
    """QuotaExceed.Snapshot if a disk has its maximum of snapshots. The usual case needs no
    count per disk: the account's own count (`account_snapshots`, when the caller has it),
    else one count over all the disks, is below one disk's maximum."""
    if account_snapshots is not None and account_snapshots < MAX_MANUAL_SNAPSHOTS_PER_DISK:
        return
    # manual snapshots only: automatic ones have their own limit (policies.expire)
    every = Criteria(within={"source_disk_id": [d.id for d in disks]},
                     equals={"snapshot_type": "user"})
    if uow.snapshots.count(every) < MAX_MANUAL_SNAPSHOTS_PER_DISK:
        return
    for disk in disks:
        if uow.snapshots.count(source_disk_id=disk.id,
                               snapshot_type="user") >= MAX_MANUAL_SNAPSHOTS_PER_DISK:
            raise EcsError("QuotaExceed.Snapshot",
                           f"The disk {disk.id} has {MAX_MANUAL_SNAPSHOTS_PER_DISK} snapshots "
                           "already; delete some first.", 403)


def new_items(disks: Sequence[Disk]) -> tuple[tuple[str, str], ...]:
    """A new snapshot ID for each disk: (disk ID, snapshot ID) pairs."""
    return tuple((d.id, ids.new_id("snapshot")) for d in disks)


def add_rows(uow: UnitOfWork, account_id: str, instance_id: str, disks: Sequence[Disk],
             items: Sequence[tuple[str, str]], *, group: GroupSpec | None = None,
             group_id: str | None = None, snapshot: SnapshotSpec | None = None) -> None:
    """The rows, Progressing, of snapshots `items` of `disks` (and of their group)."""
    spec = snapshot or SnapshotSpec()
    region_id = disks[0].region_id
    if group is not None and group_id is not None:
        uow.snapshot_groups.add(SnapshotGroup(
            id=group_id, account_id=account_id, region_id=region_id, instance_id=instance_id,
            name=group.name, description=group.description, purpose=group.purpose,
            tags=dict(group.tags)))
    for disk, (_, snap_id) in zip(disks, items, strict=True):
        uow.snapshots.add(Snapshot(
            id=snap_id, account_id=account_id, region_id=region_id, source_disk_id=disk.id,
            source_disk_type=disk.type, source_disk_size=disk.size_gib,
            instance_id=disk.instance_id or "", name=spec.name, description=spec.description,
            group_id=group_id, tags=dict(spec.tags), retention_days=spec.retention_days))


def complete(uow: UnitOfWork, items: Sequence[tuple[str, str]], group_id: str | None,
             consistency: Consistency = Consistency.CRASH,
             window_ms: float | None = None) -> None:
    snap_ids = [s for _, s in items]
    snaps = uow.snapshots.find(Criteria(within={"id": snap_ids}))
    if len(snaps) != len(snap_ids):
        raise RuntimeError("a journaled snapshot row is gone")
    for snap in snaps:
        snap.complete(consistency)
    if group_id:
        uow.snapshot_groups.load(group_id).complete(consistency, window_ms)


def drop(uow: UnitOfWork, items: Sequence[tuple[str, str]], group_id: str | None, *,
         group_too: bool) -> None:
    """Delete the snapshots' rows; the group's row too, or else mark it failed."""
    for _, snap_id in items:
        snap = uow.snapshots.get(snap_id)
        if snap is not None:
            uow.snapshots.delete(snap)
    group = uow.snapshot_groups.get(group_id) if group_id else None
    if group is not None:
        if group_too:
            uow.snapshot_groups.delete(group)
        else:
            group.mark_failed()
