"""Building block: disk files and their internal snapshots in a region's storage pool.

Every new disk gets an internal snapshot named `INITIAL` at birth: ReInitDisk reverts to
it in O(1) and the disk's own snapshots survive (they live inside the disk's file).
A released disk keeps its file while any of its snapshots exist, as ECS keeps snapshots
(with their SourceDiskId) after the disk is gone.
"""

from __future__ import annotations

from ecsnap.adapters.storage.base import CloneRevert
from ecsnap.adapters.store.base import UnitOfWork
from ecsnap.domain.model import GIB, Disk
from ecsnap.service.context import ServiceContext
from ecsnap.service.vms import vm_running

INITIAL = "ecsnap-initial"


def make_disk_file(ctx: ServiceContext, disk: Disk, template: str | None) -> None:
    """Create (or re-create, after a crash) a new disk's file with its INITIAL snapshot."""
    with ctx.uow(readonly=True) as uow:
        storage = ctx.storage(uow, disk.region_id)
    storage.delete(disk.id)
    if template:
        storage.create_from_image(disk.id, template, disk.size_gib * GIB)
    else:
        storage.create_blank(disk.id, disk.size_gib * GIB)
    storage.create_snapshots([(disk.id, INITIAL)])


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
        if not isinstance(storage, CloneRevert):
            return
    storage.delete_snapshot(disk_id, snapshot_id)
