"""Building block: disk files and their internal snapshots in a region's storage pool.

Every new disk gets an internal snapshot named `INITIAL` at birth: ReInitDisk reverts to
it in O(1) and the disk's own snapshots survive (they live inside the disk's file).
A released disk keeps its file while any of its snapshots exist, as ECS keeps snapshots
(with their SourceDiskId) after the disk is gone.
"""

from __future__ import annotations

from ecsnap.adapters.storage.base import StorageError
from ecsnap.adapters.store.base import UnitOfWork
from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import GIB, Disk, Snapshot, SnapshotStatus
from ecsnap.service.context import ServiceContext, get_snapshot
from ecsnap.service.vms import vm_running

INITIAL = "ecsnap-initial"


def make_disk_file(ctx: ServiceContext, disk: Disk, template: str | None) -> None:
    """Create (or re-create, after a crash) a new disk's file with its INITIAL snapshot:
    from the image `template`, from the disk's source snapshot (`Disk.source_snapshot_id`,
    whose disk the operation holds locked), or blank."""
    with ctx.uow(readonly=True) as uow:
        storage = ctx.storage(uow, disk.region_id)
        source = uow.snapshots.get(disk.source_snapshot_id) if disk.source_snapshot_id \
            else None
    if disk.source_snapshot_id and source is None:
        raise StorageError(f"{disk.id}: its source snapshot {disk.source_snapshot_id} is "
                           "gone")
    storage.delete(disk.id)
    if source is not None:
        storage.create_from_snapshot(disk.id, source.source_disk_id, source.id,
                                     disk.size_gib * GIB)
    elif template:
        storage.create_from_image(disk.id, template, disk.size_gib * GIB)
    else:
        storage.create_blank(disk.id, disk.size_gib * GIB)
    storage.create_snapshots([(disk.id, INITIAL)])


def source_snapshot(uow: UnitOfWork, account_id: str, region_id: str,
                    snapshot_id: str) -> Snapshot:
    """The snapshot a new disk is made from: the account's, in the region (another
    account's or region's is NotFound), accomplished (NotReady while it is being taken)."""
    snap = get_snapshot(uow, account_id, snapshot_id, region_id)
    if snap.status != SnapshotStatus.ACCOMPLISHED:
        raise EcsError("InvalidSnapshotId.NotReady",
                       f"The snapshot {snap.id} is {snap.status.value}, not accomplished.",
                       403)
    return snap


def release_disk_file(ctx: ServiceContext, disk_id: str) -> None:
    """Delete a released disk's file, unless snapshots of it still live inside it."""
    with ctx.uow(readonly=True) as uow:
        disk = uow.disks.get(disk_id)
        if disk is None:
            return
        storage = ctx.storage(uow, disk.region_id)
        keep = uow.snapshots.count(source_disk_id=disk_id) > 0
    if not keep:
        storage.delete(disk_id)


def mark_released(uow: UnitOfWork, disk: Disk) -> None:
    """The disk is released for the user; its row goes once no snapshot refers to it."""
    disk.release()
    if uow.snapshots.count(source_disk_id=disk.id) == 0:
        uow.disks.delete(disk)


def delete_internal_snapshot(ctx: ServiceContext, region_id: str, disk_id: str,
                             snapshot_id: str) -> None:
    """Remove an internal snapshot wherever the disk is open (idempotent). On a backend
    that reverts by clone and swap the snapshot may be on an older volume of the disk,
    which the VM does not have open: the backend removes it from there."""
    with ctx.uow(readonly=True) as uow:
        disk = uow.disks.get(disk_id)
        storage = ctx.storage(uow, region_id)
        instance_id = disk.instance_id if disk and disk.instance_id else ""
    if vm_running(ctx, instance_id):
        ctx.compute.delete_disk_snapshot(instance_id, disk_id, snapshot_id)
    # on qcow2 it is gone from the file by now: this drops what the pool kept beside it
    # (the base a disk from the snapshot was exported into)
    storage.delete_snapshot(disk_id, snapshot_id)
