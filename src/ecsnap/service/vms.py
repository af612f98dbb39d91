"""Building block: an instance's VM, booted from its disks, and the room it needs.

Used by the instance, disk and rollback use cases; imports none of them.
"""

from __future__ import annotations

from ecsnap.adapters.compute.base import VmDisk, VmSpec
from ecsnap.adapters.store.base import UnitOfWork
from ecsnap.domain.model import DiskStatus, DiskType, Instance
from ecsnap.service import placement
from ecsnap.service.context import ServiceContext, attached_disks, get_region


def vm_spec(uow: UnitOfWork, ctx: ServiceContext, inst: Instance) -> VmSpec:
    image = uow.images.get(inst.image_id)
    storage = ctx.storage(uow, inst.region_id)
    disks = [VmDisk(d.id, storage.path(d.current_volume), d.type == DiskType.SYSTEM)
             for d in attached_disks(uow, inst.id) if d.status == DiskStatus.IN_USE]
    boot = dict(boot_mode=image.boot_mode, kernel_path=image.kernel_path,
                initrd_path=image.initrd_path, kernel_args=image.kernel_args) if image else {}
    return VmSpec(instance_id=inst.id, vcpus=inst.vcpus, memory_mib=inst.memory_mib,
                  disks=disks, **boot)


def vm_running(ctx: ServiceContext, instance_id: str) -> bool:
    return bool(instance_id) and ctx.compute.state(instance_id).running


def boot(ctx: ServiceContext, instance_id: str) -> None:
    """Start the instance's VM unless it already runs (idempotent)."""
    if vm_running(ctx, instance_id):
        return
    with ctx.uow(readonly=True) as uow:
        spec = vm_spec(uow, ctx, uow.instances.load(instance_id))
    ctx.compute.start(spec)


def check_room_to_start(uow: UnitOfWork, inst: Instance) -> str:
    """The host the instance starts on (service/placement.py): the one that holds its
    reservation, or for an instance that gave its compute back (StopCharging) one with room
    now (its own host when its disks are local): OperationDenied.NoStock when there is
    none. The caller sets `inst.host_id` to it in the same transaction."""
    return placement.room_to_start(uow, get_region(uow, inst.region_id), inst)
