"""Disks: create, attach, detach, delete, resize, re-initialise, replace the system disk.

Disk files and their INITIAL snapshot are made and released by `disk_files` (a building
block shared with the instance use cases).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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
)
from ecsnap.service import idempotency, quotas
from ecsnap.service.context import (
    ServiceContext,
    attached_disks,
    get_disk,
    get_image,
    get_instance,
    )
from ecsnap.service.disk_files import (
    INITIAL,
    make_disk_file,
    mark_released,
    release_disk_file,
    source_snapshot,
)
from ecsnap.service.listing import Page, paginate
from ecsnap.service.operation import Lock, Operation, Plan, Step
from ecsnap.service.vms import boot
from ecsnap.service.volumes import (
    clone_revert,
    current_volumes,
    new_volume,
    schedule_collect,
    switch,
)


@dataclass(frozen=True)
class DiskPlan(Plan):
    """The plan of an operation on one disk."""

    disk_id: str

    @classmethod
    def upgrade(cls, data: dict[str, Any], version: int, resource_id: str) -> dict[str, Any]:
        return {**data, "disk_id": resource_id}


class _OnDisk(Operation[Any]):
    @classmethod
    def locks(cls, plan: DiskPlan) -> list[Lock]:
        return [("disk", plan.disk_id)]


def create_disk(ctx: ServiceContext, account_id: str, region_id: str, *, size_gib: int | None,
                zone_id: str | None = None, category: str = "cloud_essd", name: str = "",
                description: str = "", tags: dict[str, str] | None = None,
                snapshot_id: str | None = None, client_token: str | None = None) -> str:
    """CreateDisk: a pay-as-you-go data disk, Available: blank, or with `snapshot_id` the
    snapshot's content (a restore that leaves the snapshot's disk untouched; any snapshot
    of the account in the region, a system disk's too, as ECS allows), of max(snapshot's
    disk size, `size_gib`) GiB, in O(1) (storage `create_from_snapshot`)."""
    if size_gib is None and not snapshot_id:
        raise errors.missing_parameter("Size")
    if size_gib is not None:
        rules.check_disk_size(size_gib, category=category, system=False)
    rules.check_name(name, code="InvalidDiskName.Malformed", field="DiskName")
    rules.check_description(description)
    rules.check_tags(tags or {})

    def run() -> dict[str, str]:
        with ctx.uow() as uow:
            ctx.check_region(uow, region_id)
            zone = zone_id or f"{region_id}-a"
            z = uow.zones.get(zone)
            if z is None or z.region_id != region_id:
                raise errors.not_found("zone", zone)
            source = source_snapshot(uow, account_id, region_id, snapshot_id) \
                if snapshot_id else None
            size = max(size_gib or 0, source.source_disk_size if source else 0)
            rules.check_disk_size(size, category=category, system=False)
            quotas.check(ctx, uow, account_id, {"disks": 1, "disk_gib": size})
            disk = Disk(id=ids.new_id("disk"), account_id=account_id, region_id=region_id,
                        zone_id=zone, size_gib=size, category=category, name=name,
                        description=description, tags=dict(tags or {}),
                        delete_with_instance=False,
                        source_snapshot_id=source.id if source else "")
            uow.disks.add(disk)
            plan = CreateDiskPlan(disk.id, source.source_disk_id if source else "")
            task = ctx.runner.journal(uow, CreateDisk, plan, account_id=account_id,
                                      region_id=region_id, resource_id=disk.id)
            idempotency.respond(uow, {"DiskId": disk.id})  # with the task: one commit
            uow.commit()
        ctx.runner.submit(task)
        return {"DiskId": disk.id}

    params = {"region": region_id, "size": size_gib, "zone": zone_id, "category": category,
              "name": name, "description": description, "tags": tags,
              "snapshot": snapshot_id}
    return idempotency.once(ctx, account_id, "CreateDisk", client_token, params, run)["DiskId"]


@dataclass(frozen=True)
class CreateDiskPlan(DiskPlan):
    # a disk from a snapshot: the snapshot's disk, locked so that the snapshot stays while
    # the new disk is made from it
    source_disk_id: str = ""


class CreateDisk(Operation[CreateDiskPlan]):
    action = "CreateDisk"
    plan_type = CreateDiskPlan

    @classmethod
    def locks(cls, plan: CreateDiskPlan) -> list[Lock]:
        return [("disk", plan.disk_id)] + \
            ([("disk", plan.source_disk_id)] if plan.source_disk_id else [])

    def steps(self) -> list[Step]:
        return [Step("create", self.create)]

    def create(self) -> None:
        with self.ctx.uow(readonly=True) as uow:
            disk = uow.disks.load(self.plan.disk_id)
        make_disk_file(self.ctx, disk, None)

    def finish(self, uow: UnitOfWork) -> None:
        uow.disks.load(self.plan.disk_id).mark_available()

    def compensate(self, error: BaseException) -> None:
        release_disk_file(self.ctx, self.plan.disk_id)

    def failed(self, uow: UnitOfWork) -> None:
        disk = uow.disks.get(self.plan.disk_id)
        if disk is not None:
            uow.disks.delete(disk)


@dataclass(frozen=True)
class AttachDiskPlan(DiskPlan):
    instance_id: str = ""
    device: str = ""
    delete_with_instance: bool = False
    live: bool = False  # the instance runs: hot plug

    @classmethod
    def upgrade(cls, data: dict[str, Any], version: int, resource_id: str) -> dict[str, Any]:
        return {**data, "disk_id": resource_id, "live": bool(data.get("steps"))}


class AttachDisk(Operation[AttachDiskPlan]):
    action = "AttachDisk"
    plan_type = AttachDiskPlan

    @classmethod
    def locks(cls, plan: AttachDiskPlan) -> list[Lock]:
        return [("instance", plan.instance_id), ("disk", plan.disk_id)]

    def accept(self, uow: UnitOfWork) -> None:
        uow.disks.load(self.plan.disk_id).mark_attaching()

    def steps(self) -> list[Step]:
        return [Step("hotplug", self.hotplug)] if self.plan.live else []

    def hotplug(self) -> None:
        storage = self.ctx.storage_of(self.task.region_id)
        [volume] = current_volumes(self.ctx, [self.plan.disk_id]).values()
        self.ctx.compute.attach_disk(self.plan.instance_id, VmDisk(
            self.plan.disk_id, storage.path(volume), False))

    def finish(self, uow: UnitOfWork) -> None:
        uow.disks.load(self.plan.disk_id).attach(
            self.plan.instance_id, self.plan.device,
            delete_with_instance=self.plan.delete_with_instance)

    def failed(self, uow: UnitOfWork) -> None:
        uow.disks.load(self.plan.disk_id).mark_available()


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
        plan = AttachDiskPlan(disk.id, inst.id, rules.next_device(d.device for d in attached),
                              delete_with_instance, inst.status == InstanceStatus.RUNNING)
        task = ctx.runner.journal(uow, AttachDisk, plan, account_id=account_id,
                                  region_id=inst.region_id, resource_id=disk.id)
        uow.commit()
    ctx.runner.submit(task)
    return task.id


@dataclass(frozen=True)
class DetachDiskPlan(DiskPlan):
    instance_id: str = ""
    live: bool = False  # the instance runs: hot unplug

    @classmethod
    def upgrade(cls, data: dict[str, Any], version: int, resource_id: str) -> dict[str, Any]:
        return {**data, "disk_id": resource_id, "live": bool(data.get("steps"))}


class DetachDisk(Operation[DetachDiskPlan]):
    action = "DetachDisk"
    plan_type = DetachDiskPlan

    @classmethod
    def locks(cls, plan: DetachDiskPlan) -> list[Lock]:
        return [("instance", plan.instance_id), ("disk", plan.disk_id)]

    def accept(self, uow: UnitOfWork) -> None:
        uow.disks.load(self.plan.disk_id).mark_detaching()

    def steps(self) -> list[Step]:
        return [Step("unplug", self.unplug)] if self.plan.live else []

    def unplug(self) -> None:
        self.ctx.compute.detach_disk(self.plan.instance_id, self.plan.disk_id)

    def finish(self, uow: UnitOfWork) -> None:
        uow.disks.load(self.plan.disk_id).detach()

    def failed(self, uow: UnitOfWork) -> None:
        uow.disks.load(self.plan.disk_id).mark_in_use()


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
        plan = DetachDiskPlan(disk.id, inst.id, inst.status == InstanceStatus.RUNNING)
        task = ctx.runner.journal(uow, DetachDisk, plan, account_id=account_id,
                                  region_id=inst.region_id, resource_id=disk.id)
        uow.commit()
    ctx.runner.submit(task)
    return task.id


class DeleteDisk(_OnDisk):
    """DeleteDisk: release an Available disk. Its snapshots stay (and so does its file)."""

    action = "DeleteDisk"
    plan_type = DiskPlan

    def steps(self) -> list[Step]:
        return [Step(f"release_disk:{self.plan.disk_id}",
                     functools.partial(release_disk_file, self.ctx, self.plan.disk_id))]

    def finish(self, uow: UnitOfWork) -> None:
        disk = uow.disks.get(self.plan.disk_id)
        if disk is not None:
            mark_released(uow, disk)


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
        task = ctx.runner.journal(uow, DeleteDisk, DiskPlan(disk.id), account_id=account_id,
                                  region_id=disk.region_id, resource_id=disk.id)
        uow.commit()
    ctx.runner.submit(task)


@dataclass(frozen=True)
class ResizeDiskPlan(DiskPlan):
    size_gib: int = 0


class ResizeDisk(_OnDisk):
    action = "ResizeDisk"
    plan_type = ResizeDiskPlan

    def steps(self) -> list[Step]:
        return [Step("resize", self.resize)]

    def resize(self) -> None:
        storage = self.ctx.storage_of(self.task.region_id)
        wanted = self.plan.size_gib * GIB
        [volume] = current_volumes(self.ctx, [self.plan.disk_id]).values()
        if storage.virtual_size(volume) < wanted:
            storage.resize(volume, wanted)

    def finish(self, uow: UnitOfWork) -> None:
        uow.disks.load(self.plan.disk_id).size_gib = self.plan.size_gib


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
            inst = uow.instances.load(disk.instance_id)
            rules.check_not_locked(inst)
            if inst.status != InstanceStatus.STOPPED:
                raise EcsError("IncorrectInstanceStatus",
                               f"The instance {inst.id} is {inst.status.value}; ecsnap grows "
                               "disks of Stopped instances only.", 403)
        quotas.check(ctx, uow, account_id, {"disk_gib": new_size_gib - disk.size_gib})
        task = ctx.runner.journal(uow, ResizeDisk, ResizeDiskPlan(disk.id, new_size_gib),
                                  account_id=account_id, region_id=disk.region_id,
                                  resource_id=disk.id)
        uow.commit()
    ctx.runner.submit(task)


@dataclass(frozen=True)
class ReInitDiskPlan(DiskPlan):
    instance_id: str = ""
    auto_start: bool = False
    # clone and swap (a CloneRevert backend): the disk's volume now and the new volume
    # INITIAL is cloned into; "": INITIAL is reverted to in place
    old_volume: str = ""
    new_volume: str = ""

    @classmethod
    def upgrade(cls, data: dict[str, Any], version: int, resource_id: str) -> dict[str, Any]:
        return {**data, "disk_id": resource_id, "auto_start": "start" in data.get("steps", ())}


class ReInitDisk(Operation[ReInitDiskPlan]):
    """ReInitDisk: back to the disk's content at creation, an O(1) revert to INITIAL; on a
    backend that reverts by clone and swap, INITIAL (on the disk's first volume) is cloned
    into a new volume and the disk switched to it, as a rollback does (service/volumes.py):
    an undo switches it back and removes the clone."""

    action = "ReInitDisk"
    plan_type = ReInitDiskPlan

    @classmethod
    def locks(cls, plan: ReInitDiskPlan) -> list[Lock]:
        return [("instance", plan.instance_id), ("disk", plan.disk_id)]

    def accept(self, uow: UnitOfWork) -> None:
        uow.disks.load(self.plan.disk_id).mark_reiniting()

    def steps(self) -> list[Step]:
        steps = [Step("clone", self.clone), Step("swap", self.swap)] if self.plan.new_volume \
            else [Step("reinit", self.reinit)]
        return steps + ([Step("start", self.start)] if self.plan.auto_start else [])

    def reinit(self) -> None:
        storage = self.ctx.storage_of(self.task.region_id)
        storage.revert(self.plan.disk_id, INITIAL)

    def clone(self) -> None:
        storage = self.ctx.storage_of(self.task.region_id)
        capable = clone_revert(storage)
        assert capable is not None, "a plan to clone on a backend that cannot"
        capable.clone_to_volume(self.plan.disk_id, INITIAL, self.plan.new_volume,
                                storage.virtual_size(self.plan.old_volume))

    def swap(self) -> None:
        switch(self.ctx, [(self.plan.disk_id, self.plan.old_volume, self.plan.new_volume)])

    def start(self) -> None:
        with self.ctx.uow() as uow:
            uow.disks.load(self.plan.disk_id).mark_in_use()
            uow.instances.load(self.plan.instance_id).mark_starting()
            uow.commit()
        boot(self.ctx, self.plan.instance_id)

    def finish(self, uow: UnitOfWork) -> None:
        uow.disks.load(self.plan.disk_id).mark_in_use()
        if self.plan.auto_start:
            uow.instances.load(self.plan.instance_id).mark_running()
        if self.plan.new_volume:
            collect = schedule_collect(self.ctx, uow, self.task, [self.plan.disk_id])
            self.follow_ups += [collect] if collect else []

    def compensate(self, error: BaseException) -> None:
        if self.done("start"):
            self.ctx.compute.stop(self.plan.instance_id, force=True)
        if self.plan.new_volume:
            switch(self.ctx, [(self.plan.disk_id, self.plan.new_volume, self.plan.old_volume)])
            capable = clone_revert(self.ctx.storage_of(self.task.region_id))
            assert capable is not None
            capable.remove_volumes([self.plan.new_volume])

    def failed(self, uow: UnitOfWork) -> None:
        disk = uow.disks.load(self.plan.disk_id)
        if disk.status != DiskStatus.IN_USE:
            disk.mark_in_use()
        inst = uow.instances.load(self.plan.instance_id)
        if inst.status == InstanceStatus.STARTING:
            inst.mark_stopped()


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
        task_id = ids.new_id("task")
        clone = clone_revert(ctx.storage(uow, disk.region_id)) is not None
        plan = ReInitDiskPlan(disk.id, inst.id, auto_start,
                              disk.current_volume if clone else "",
                              new_volume(disk.id, task_id) if clone else "")
        task = ctx.runner.journal(uow, ReInitDisk, plan, account_id=account_id,
                                  region_id=disk.region_id, resource_id=disk.id,
                                  task_id=task_id)
        uow.commit()
    ctx.runner.submit(task)
    return task.id


@dataclass(frozen=True)
class ReplaceSystemDiskPlan(Plan):
    instance_id: str
    new_disk: str
    old_disk: str
    template: str
    image_id: str

    @classmethod
    def upgrade(cls, data: dict[str, Any], version: int, resource_id: str) -> dict[str, Any]:
        return {**data, "instance_id": resource_id}


class ReplaceSystemDisk(Operation[ReplaceSystemDiskPlan]):
    """ReplaceSystemDisk: a new system disk (new ID) from an image; the old one released.

    Once the old disk's file is released only forward is possible: the steps make the new
    one first, so an undo before that point only has the new file to remove."""

    action = "ReplaceSystemDisk"
    plan_type = ReplaceSystemDiskPlan

    @classmethod
    def locks(cls, plan: ReplaceSystemDiskPlan) -> list[Lock]:
        return [("instance", plan.instance_id), ("disk", plan.old_disk),
                ("disk", plan.new_disk)]

    def steps(self) -> list[Step]:
        return [Step(f"create_disk:{self.plan.new_disk}", self.create_disk),
                Step(f"release_disk:{self.plan.old_disk}",
                     functools.partial(release_disk_file, self.ctx, self.plan.old_disk))]

    def create_disk(self) -> None:
        with self.ctx.uow(readonly=True) as uow:
            disk = uow.disks.load(self.plan.new_disk)
        make_disk_file(self.ctx, disk, self.plan.template)

    def finish(self, uow: UnitOfWork) -> None:
        inst = uow.instances.load(self.plan.instance_id)
        mark_released(uow, uow.disks.load(self.plan.old_disk))
        uow.disks.load(self.plan.new_disk).attach(inst.id, "/dev/xvda")
        inst.image_id = self.plan.image_id

    def compensate(self, error: BaseException) -> None:
        if self.done(f"release_disk:{self.plan.old_disk}"):
            return  # the old disk is gone; only forward is possible (never reached: see drive)
        storage = self.ctx.storage_of(self.task.region_id)
        storage.delete(self.plan.new_disk)

    def failed(self, uow: UnitOfWork) -> None:
        new = uow.disks.get(self.plan.new_disk)
        if new is not None:
            uow.disks.delete(new)


def replace_system_disk(ctx: ServiceContext, account_id: str, instance_id: str, image_id: str,
                        *, size_gib: int | None = None, client_token: str | None = None) -> str:
    """ReplaceSystemDisk: a new system disk (new DiskId) from an image; the old one is released.

    Snapshots of the old disk stay, but can no longer roll the instance's system disk back."""

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
            quotas.check(ctx, uow, account_id, {"disk_gib": size - old.size_gib})
            new = Disk(id=ids.new_id("disk"), account_id=account_id, region_id=inst.region_id,
                       zone_id=inst.zone_id, size_gib=size, type=DiskType.SYSTEM,
                       category=old.category, image_id=image.id, instance_id=None,
                       device="")
            uow.disks.add(new)
            plan = ReplaceSystemDiskPlan(inst.id, new.id, old.id, image.template_path, image.id)
            task = ctx.runner.journal(uow, ReplaceSystemDisk, plan, account_id=account_id,
                                      region_id=inst.region_id, resource_id=inst.id)
            idempotency.respond(uow, {"DiskId": new.id, "TaskId": task.id})
            uow.commit()
        ctx.runner.submit(task)
        return {"DiskId": new.id, "TaskId": task.id}

    params = {"instance": instance_id, "image": image_id, "size": size_gib}
    return idempotency.once(ctx, account_id, "ReplaceSystemDisk", client_token, params,
                            run)["DiskId"]


def describe_disks(ctx: ServiceContext, account_id: str, region_id: str, *,
                   disk_ids: Sequence[str] | None = None, instance_id: str | None = None,
                   disk_type: str | None = None, status: str | None = None,
                   category: str | None = None, zone_id: str | None = None,
                   name: str | None = None, tags: dict[str, str] | None = None,
                   page_number: int | None = None, page_size: int | None = None,
                   next_token: str | None = None, max_results: int | None = None,
                   auto_snapshot_policy_id: str | None = None, with_policy: bool | None = None,
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
    if auto_snapshot_policy_id:
        criteria.equals["auto_snapshot_policy_id"] = auto_snapshot_policy_id
    if with_policy is False:
        criteria.equals["auto_snapshot_policy_id"] = ""
    with ctx.uow(readonly=True) as uow:
        ctx.check_region(uow, region_id)
        if with_policy:  # any of the account's policies in the region
            criteria.within["auto_snapshot_policy_id"] = [
                p.id for p in uow.auto_snapshot_policies.find(account_id=account_id,
                                                              region_id=region_id)]
        return paginate(uow.disks, criteria, page_number=page_number, page_size=page_size,
                        next_token=next_token, max_results=max_results,
                        max_page_size=500 if next_token or max_results else 100)
