"""Disks: create, attach, detach, delete, resize, re-initialise, replace the system disk.

Every new disk gets an internal snapshot named `INITIAL` at birth: ReInitDisk reverts to
it in O(1) and the disk's own snapshots survive (they live inside the disk's file).
A released disk keeps its file while any of its snapshots exist, as ECS keeps snapshots
(with their SourceDiskId) after the disk is gone.
"""

from __future__ import annotations

from collections.abc import Sequence

from ecsnap.adapters.compute.base import VmDisk
from ecsnap.adapters.store.base import Criteria, UnitOfWork
from ecsnap.domain import errors, ids, rules
from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import (
    GIB,
    Disk,
    DiskStatus,
    DiskType,
    InstanceStatus,
    Task,
    utcnow,
)
from ecsnap.service.context import (
    ServiceContext,
    attached_disks,
    get_disk,
    get_image,
    get_instance,
    get_region,
)
from ecsnap.service.listing import Page, paginate
from ecsnap.service.tasks import TaskHandler, handler, new_task

INITIAL = "ecsnap-initial"


def make_disk_file(ctx: ServiceContext, disk: Disk, template: str | None) -> None:
    """Create (or re-create, after a crash) a new disk's file with its INITIAL snapshot."""
    with ctx.uow() as uow:
        storage = ctx.storage(uow, disk.region_id)
    storage.delete(disk.id)
    if template:
        storage.create_from_image(disk.id, template, disk.size_gib * GIB)
    else:
        storage.create_blank(disk.id, disk.size_gib * GIB)
    storage.create_snapshots([(disk.id, INITIAL)])


def release_disk_file(ctx: ServiceContext, disk_id: str) -> None:
    """Delete a released disk's file, unless snapshots of it still live inside it."""
    with ctx.uow() as uow:
        disk = uow.disks.get(disk_id)
        if disk is None:
            return
        storage = ctx.storage(uow, disk.region_id)
        keep = uow.snapshots.count(source_disk_id=disk_id) > 0
    if not keep:
        storage.delete(disk_id)


def mark_released(uow: UnitOfWork, disk: Disk) -> None:
    disk.released, disk.released_time = True, utcnow()
    disk.status, disk.instance_id, disk.device = DiskStatus.AVAILABLE, None, ""
    if uow.snapshots.count(source_disk_id=disk.id) == 0:
        uow.disks.delete(disk)


def create_disk(ctx: ServiceContext, account_id: str, region_id: str, *, size_gib: int | None,
                zone_id: str | None = None, category: str = "cloud_essd", name: str = "",
                description: str = "", tags: dict[str, str] | None = None,
                snapshot_id: str | None = None, client_token: str | None = None) -> str:
    """CreateDisk: a blank pay-as-you-go data disk, Available."""
    from ecsnap.service import idempotency

    if snapshot_id:
        raise EcsError("UnsupportedParameter",
                       "ecsnap cannot create a disk from a snapshot yet (SnapshotId).", 400)
    if size_gib is None:
        raise errors.missing_parameter("Size")
    rules.check_disk_size(size_gib, category=category, system=False)
    rules.check_name(name, code="InvalidDiskName.Malformed", field="DiskName")
    rules.check_description(description)
    rules.check_tags(tags or {})

    def run() -> dict[str, str]:
        with ctx.uow() as uow:
            get_region(uow, region_id)
            zone = zone_id or f"{region_id}-a"
            z = uow.zones.get(zone)
            if z is None or z.region_id != region_id:
                raise errors.not_found("zone", zone)
            disk = Disk(id=ids.new_id("disk"), account_id=account_id, region_id=region_id,
                        zone_id=zone, size_gib=size_gib, category=category, name=name,
                        description=description, tags=dict(tags or {}),
                        delete_with_instance=False)
            uow.disks.add(disk)
            task = new_task(uow, account_id=account_id, region_id=region_id,
                            action="CreateDisk", resource_id=disk.id, steps=["create"],
                            locks=[("disk", disk.id)])
            uow.commit()
        ctx.runner.submit(task.id)
        return {"DiskId": disk.id}

    params = {"region": region_id, "size": size_gib, "zone": zone_id, "category": category,
              "name": name, "description": description, "tags": tags}
    return idempotency.once(ctx, account_id, "CreateDisk", client_token, params, run)["DiskId"]


@handler
class CreateDiskTask(TaskHandler):
    action = "CreateDisk"

    def step_create(self, ctx: ServiceContext, task: Task, _: str) -> None:
        with ctx.uow() as uow:
            disk = uow.disks.get(task.resource_id)
            assert disk is not None
        make_disk_file(ctx, disk, None)

    def finish(self, ctx: ServiceContext, uow: UnitOfWork, task: Task) -> None:
        disk = uow.disks.get(task.resource_id)
        assert disk is not None
        disk.status = DiskStatus.AVAILABLE

    def compensate(self, ctx: ServiceContext, task: Task, error: BaseException) -> None:
        release_disk_file(ctx, task.resource_id)

    def failed(self, ctx: ServiceContext, uow: UnitOfWork, task: Task) -> None:
        disk = uow.disks.get(task.resource_id)
        if disk is not None:
            uow.disks.delete(disk)


def attach_disk(ctx: ServiceContext, account_id: str, instance_id: str, disk_id: str, *,
                delete_with_instance: bool = False) -> str:
    """AttachDisk: an Available data disk onto a Running or Stopped instance (hot plug)."""
    with ctx.uow() as uow:
        inst = get_instance(uow, account_id, instance_id)
        disk = get_disk(uow, account_id, disk_id)
        if disk.status == DiskStatus.IN_USE:
            raise EcsError("InvalidDisk.InUse", f"The disk {disk.id} is already attached.", 404)
        if disk.status != DiskStatus.AVAILABLE:
            raise EcsError("IncorrectDiskStatus",
                           f"The disk {disk.id} is {disk.status.value}.", 403)
        if disk.type == DiskType.SYSTEM:
            raise EcsError("DiskTypeViolation", "Only data disks can be attached.", 403)
        if disk.zone_id != inst.zone_id:
            raise EcsError("ResourcesNotInSameZone",
                           "The disk and the instance are not in the same zone.", 403)
        rules.require_instance_status(inst, InstanceStatus.RUNNING, InstanceStatus.STOPPED,
                                      http_status=400)
        rules.check_not_locked(inst, disk)
        attached = attached_disks(uow, inst.id)
        rules.check_data_disk_count(len([d for d in attached if d.type == DiskType.DATA]) + 1)
        device = rules.next_device(d.device for d in attached)
        live = inst.status == InstanceStatus.RUNNING
        task = new_task(uow, account_id=account_id, region_id=inst.region_id,
                        action="AttachDisk", resource_id=disk.id,
                        steps=["hotplug"] if live else [],
                        locks=[("instance", inst.id), ("disk", disk.id)],
                        instance_id=inst.id, device=device,
                        delete_with_instance=delete_with_instance)
        disk.status = DiskStatus.ATTACHING
        uow.commit()
    ctx.runner.submit(task.id)
    return task.id


@handler
class AttachDiskTask(TaskHandler):
    action = "AttachDisk"

    def step_hotplug(self, ctx: ServiceContext, task: Task, _: str) -> None:
        with ctx.uow() as uow:
            storage = ctx.storage(uow, task.region_id)
        ctx.compute.attach_disk(task.plan["instance_id"],
                                VmDisk(task.resource_id, storage.path(task.resource_id), False))

    def finish(self, ctx: ServiceContext, uow: UnitOfWork, task: Task) -> None:
        disk = uow.disks.get(task.resource_id)
        assert disk is not None
        disk.status, disk.instance_id = DiskStatus.IN_USE, task.plan["instance_id"]
        disk.device, disk.attached_time = task.plan["device"], utcnow()
        disk.delete_with_instance = bool(task.plan["delete_with_instance"])

    def failed(self, ctx: ServiceContext, uow: UnitOfWork, task: Task) -> None:
        disk = uow.disks.get(task.resource_id)
        assert disk is not None
        disk.status = DiskStatus.AVAILABLE


def detach_disk(ctx: ServiceContext, account_id: str, instance_id: str, disk_id: str) -> str:
    """DetachDisk: In_use -> Detaching -> Available (hot unplug when Running)."""
    with ctx.uow() as uow:
        inst = get_instance(uow, account_id, instance_id)
        disk = get_disk(uow, account_id, disk_id)
        if disk.status == DiskStatus.AVAILABLE:
            raise EcsError("InvalidDisk.AlreadyDetached",
                           f"The disk {disk.id} is not attached.", 404)
        if disk.instance_id != inst.id:
            raise EcsError("DependencyViolation",
                           f"The disk {disk.id} is not attached to {inst.id}.", 403)
        if disk.type == DiskType.SYSTEM:
            raise EcsError("DiskTypeViolation", "The system disk cannot be detached.", 403)
        rules.require_instance_status(inst, InstanceStatus.RUNNING, InstanceStatus.STOPPED)
        rules.check_not_locked(inst, disk)
        live = inst.status == InstanceStatus.RUNNING
        task = new_task(uow, account_id=account_id, region_id=inst.region_id,
                        action="DetachDisk", resource_id=disk.id,
                        steps=["unplug"] if live else [],
                        locks=[("instance", inst.id), ("disk", disk.id)], instance_id=inst.id)
        disk.status = DiskStatus.DETACHING
        uow.commit()
    ctx.runner.submit(task.id)
    return task.id


@handler
class DetachDiskTask(TaskHandler):
    action = "DetachDisk"

    def step_unplug(self, ctx: ServiceContext, task: Task, _: str) -> None:
        ctx.compute.detach_disk(task.plan["instance_id"], task.resource_id)

    def finish(self, ctx: ServiceContext, uow: UnitOfWork, task: Task) -> None:
        disk = uow.disks.get(task.resource_id)
        assert disk is not None
        disk.status, disk.instance_id, disk.device = DiskStatus.AVAILABLE, None, ""
        disk.detached_time, disk.delete_with_instance = utcnow(), False

    def failed(self, ctx: ServiceContext, uow: UnitOfWork, task: Task) -> None:
        disk = uow.disks.get(task.resource_id)
        assert disk is not None
        disk.status = DiskStatus.IN_USE


def delete_disk(ctx: ServiceContext, account_id: str, disk_id: str) -> None:
    """DeleteDisk: release an Available disk. Its snapshots stay (and so does its file)."""
    with ctx.uow() as uow:
        disk = uow.disks.get(disk_id)
        if disk is None or disk.released or disk.account_id != account_id:
            return  # ECS ignores an unknown DiskId
        if disk.status != DiskStatus.AVAILABLE:
            raise EcsError("DiskStillAttached" if disk.instance_id else "IncorrectDiskStatus",
                           f"The disk {disk.id} is {disk.status.value}; only an Available "
                           "disk can be released.", 403)
        rules.check_not_locked(disk)
        task = new_task(uow, account_id=account_id, region_id=disk.region_id,
                        action="DeleteDisk", resource_id=disk.id,
                        steps=[f"release_disk:{disk.id}"], locks=[("disk", disk.id)])
        uow.commit()
    ctx.runner.submit(task.id)


@handler
class DeleteDiskTask(TaskHandler):
    action = "DeleteDisk"

    def step_release_disk(self, ctx: ServiceContext, task: Task, disk_id: str) -> None:
        release_disk_file(ctx, disk_id)

    def finish(self, ctx: ServiceContext, uow: UnitOfWork, task: Task) -> None:
        disk = uow.disks.get(task.resource_id)
        if disk is not None:
            mark_released(uow, disk)


def resize_disk(ctx: ServiceContext, account_id: str, disk_id: str, new_size_gib: int, *,
                resize_type: str = "offline") -> None:
    """ResizeDisk: grow a disk whose instance is Stopped (or that is Available)."""
    if resize_type not in ("offline", "online"):
        raise EcsError("InvalidParam.Type", "Type must be offline or online.", 400)
    with ctx.uow() as uow:
        disk = get_disk(uow, account_id, disk_id)
        rules.check_not_locked(disk)
        if new_size_gib <= disk.size_gib:
            raise EcsError("InvalidDiskSize.TooSmall",
                           f"The new size must be larger than {disk.size_gib} GiB.", 403)
        rules.check_disk_size(new_size_gib, category=disk.category,
                              system=disk.type == DiskType.SYSTEM)
        if disk.instance_id:
            inst = uow.instances.get(disk.instance_id)
            assert inst is not None
            rules.check_not_locked(inst)
            if inst.status != InstanceStatus.STOPPED:
                raise EcsError("IncorrectInstanceStatus",
                               f"The instance {inst.id} is {inst.status.value}; ecsnap grows "
                               "disks of Stopped instances only.", 403)
        task = new_task(uow, account_id=account_id, region_id=disk.region_id,
                        action="ResizeDisk", resource_id=disk.id, steps=["resize"],
                        locks=[("disk", disk.id)], size_gib=new_size_gib)
        uow.commit()
    ctx.runner.submit(task.id)


@handler
class ResizeDiskTask(TaskHandler):
    action = "ResizeDisk"

    def step_resize(self, ctx: ServiceContext, task: Task, _: str) -> None:
        with ctx.uow() as uow:
            storage = ctx.storage(uow, task.region_id)
        wanted = int(task.plan["size_gib"]) * GIB
        if storage.virtual_size(task.resource_id) < wanted:
            storage.resize(task.resource_id, wanted)

    def finish(self, ctx: ServiceContext, uow: UnitOfWork, task: Task) -> None:
        disk = uow.disks.get(task.resource_id)
        assert disk is not None
        disk.size_gib = int(task.plan["size_gib"])


def reinit_disk(ctx: ServiceContext, account_id: str, disk_id: str, *,
                auto_start: bool = False) -> str:
    """ReInitDisk: back to the disk's content at creation (image or blank); snapshots stay."""
    with ctx.uow() as uow:
        disk = get_disk(uow, account_id, disk_id)
        if disk.status != DiskStatus.IN_USE or not disk.instance_id:
            raise EcsError("IncorrectDiskStatus",
                           f"The disk {disk.id} must be In_use to be re-initialised.", 403)
        inst = get_instance(uow, account_id, disk.instance_id)
        rules.require_instance_status(inst, InstanceStatus.STOPPED)
        rules.check_not_locked(inst, disk)
        if disk.image_id and uow.images.get(disk.image_id) is None:
            raise EcsError("InvalidImageId.NotFound",
                           f"The source image {disk.image_id} of the disk is gone.", 404)
        task = new_task(uow, account_id=account_id, region_id=disk.region_id,
                        action="ReInitDisk", resource_id=disk.id,
                        steps=["reinit", *(["start"] if auto_start else [])],
                        locks=[("instance", inst.id), ("disk", disk.id)], instance_id=inst.id)
        disk.status = DiskStatus.REINITING
        uow.commit()
    ctx.runner.submit(task.id)
    return task.id


@handler
class ReInitDiskTask(TaskHandler):
    action = "ReInitDisk"

    def step_reinit(self, ctx: ServiceContext, task: Task, _: str) -> None:
        with ctx.uow() as uow:
            storage = ctx.storage(uow, task.region_id)
        storage.revert(task.resource_id, INITIAL)

    def step_start(self, ctx: ServiceContext, task: Task, _: str) -> None:
        from ecsnap.service.instances import boot

        boot(ctx, task.plan["instance_id"])

    def finish(self, ctx: ServiceContext, uow: UnitOfWork, task: Task) -> None:
        disk = uow.disks.get(task.resource_id)
        assert disk is not None
        disk.status = DiskStatus.IN_USE
        if "start" in task.plan["steps"]:
            inst = uow.instances.get(task.plan["instance_id"])
            assert inst is not None
            inst.status, inst.started = InstanceStatus.RUNNING, utcnow()

    def failed(self, ctx: ServiceContext, uow: UnitOfWork, task: Task) -> None:
        disk = uow.disks.get(task.resource_id)
        assert disk is not None
        disk.status = DiskStatus.IN_USE


def replace_system_disk(ctx: ServiceContext, account_id: str, instance_id: str, image_id: str,
                        *, size_gib: int | None = None, client_token: str | None = None) -> str:
    """ReplaceSystemDisk: a new system disk (new DiskId) from an image; the old one is released.

    Snapshots of the old disk stay, but can no longer roll the instance's system disk back."""
    from ecsnap.service import idempotency

    def run() -> dict[str, str]:
        with ctx.uow() as uow:
            inst = get_instance(uow, account_id, instance_id)
            rules.require_instance_status(inst, InstanceStatus.STOPPED)
            rules.check_not_locked(inst)
            image = get_image(uow, account_id, image_id, inst.region_id)
            old = next((d for d in attached_disks(uow, inst.id) if d.type == DiskType.SYSTEM),
                       None)
            if old is None:
                raise EcsError("InvalidInstance.NotFoundSystemDisk",
                               f"The instance {inst.id} has no system disk.", 400)
            rules.check_not_locked(old)
            size = size_gib or max(old.size_gib, image.size_gib)
            rules.check_disk_size(size, category=old.category, system=True)
            if size < image.size_gib:
                raise EcsError("InvalidSystemDiskSize.LessThanImageSize",
                               "The system disk is smaller than the image.", 404)
            new = Disk(id=ids.new_id("disk"), account_id=account_id, region_id=inst.region_id,
                       zone_id=inst.zone_id, size_gib=size, type=DiskType.SYSTEM,
                       category=old.category, image_id=image.id, instance_id=None,
                       device="")
            uow.disks.add(new)
            task = new_task(uow, account_id=account_id, region_id=inst.region_id,
                            action="ReplaceSystemDisk", resource_id=inst.id,
                            steps=[f"create_disk:{new.id}", f"release_disk:{old.id}"],
                            locks=[("instance", inst.id), ("disk", old.id), ("disk", new.id)],
                            new_disk=new.id, old_disk=old.id, template=image.template_path,
                            image_id=image.id)
            uow.commit()
        ctx.runner.submit(task.id)
        return {"DiskId": new.id, "TaskId": task.id}

    params = {"instance": instance_id, "image": image_id, "size": size_gib}
    return idempotency.once(ctx, account_id, "ReplaceSystemDisk", client_token, params,
                            run)["DiskId"]


@handler
class ReplaceSystemDiskTask(TaskHandler):
    action = "ReplaceSystemDisk"

    def step_create_disk(self, ctx: ServiceContext, task: Task, disk_id: str) -> None:
        with ctx.uow() as uow:
            disk = uow.disks.get(disk_id)
            assert disk is not None
        make_disk_file(ctx, disk, task.plan["template"])

    def step_release_disk(self, ctx: ServiceContext, task: Task, disk_id: str) -> None:
        release_disk_file(ctx, disk_id)

    def finish(self, ctx: ServiceContext, uow: UnitOfWork, task: Task) -> None:
        inst = uow.instances.get(task.resource_id)
        new = uow.disks.get(task.plan["new_disk"])
        old = uow.disks.get(task.plan["old_disk"])
        assert inst is not None and new is not None and old is not None
        mark_released(uow, old)
        new.status, new.instance_id, new.device = DiskStatus.IN_USE, inst.id, "/dev/xvda"
        new.attached_time = utcnow()
        inst.image_id = task.plan["image_id"]

    def recover_forward(self, ctx: ServiceContext, task: Task) -> bool:
        return True

    def compensate(self, ctx: ServiceContext, task: Task, error: BaseException) -> None:
        if f"release_disk:{task.plan['old_disk']}" in task.done:
            return  # the old disk is gone; only forward is possible (never reached: see drive)
        with ctx.uow() as uow:
            storage = ctx.storage(uow, task.region_id)
        storage.delete(task.plan["new_disk"])

    def failed(self, ctx: ServiceContext, uow: UnitOfWork, task: Task) -> None:
        new = uow.disks.get(task.plan["new_disk"])
        if new is not None:
            uow.disks.delete(new)


def describe_disks(ctx: ServiceContext, account_id: str, region_id: str, *,
                   disk_ids: Sequence[str] | None = None, instance_id: str | None = None,
                   disk_type: str | None = None, status: str | None = None,
                   category: str | None = None, zone_id: str | None = None,
                   name: str | None = None, tags: dict[str, str] | None = None,
                   page_number: int | None = None, page_size: int | None = None,
                   next_token: str | None = None, max_results: int | None = None,
                   ) -> Page[Disk]:
    criteria = Criteria(equals={"account_id": account_id, "region_id": region_id,
                                "released": False}, tags=tags or {})
    if disk_type and disk_type != "all":
        if disk_type not in ("system", "data"):
            raise EcsError("InvalidDiskType.ValueNotSupported",
                           f"The DiskType \"{disk_type}\" is not valid.", 400)
        criteria.equals["type"] = disk_type
    if status and status != "All":
        if status not in {s.value for s in DiskStatus}:
            raise EcsError("InvalidStatus.ValueNotSupported",
                           f"The Status \"{status}\" is not valid.", 400)
        criteria.equals["status"] = status
    if category and category != "all":
        criteria.equals["category"] = category
    for column, value in (("instance_id", instance_id), ("zone_id", zone_id), ("name", name)):
        if value:
            criteria.equals[column] = value
    if disk_ids is not None:
        criteria.within["id"] = list(disk_ids)
    with ctx.uow(readonly=True) as uow:
        get_region(uow, region_id)
        return paginate(uow.disks, criteria, page_number=page_number, page_size=page_size,
                        next_token=next_token, max_results=max_results,
                        max_page_size=500 if next_token or max_results else 100)
