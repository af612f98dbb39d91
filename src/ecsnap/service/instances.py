"""Instances: create, run, start, stop, reboot, delete, describe."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ecsnap.adapters.compute.base import VmDisk, VmSpec
from ecsnap.adapters.store.base import Criteria, UnitOfWork
from ecsnap.domain import errors, ids, rules
from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import (
    Disk,
    DiskStatus,
    DiskType,
    Instance,
    InstanceStatus,
    StoppedMode,
    Task,
    utcnow,
)
from ecsnap.service import idempotency
from ecsnap.service.context import (
    ServiceContext,
    attached_disks,
    get_image,
    get_instance,
    get_region,
)
from ecsnap.service.listing import Page, paginate
from ecsnap.service.tasks import TaskHandler, handler, new_task


@dataclass
class DataDiskSpec:
    size_gib: int = 20
    category: str = "cloud_essd"
    name: str = ""
    description: str = ""
    delete_with_instance: bool = True


@dataclass
class InstanceRequest:
    image_id: str
    instance_type: str
    zone_id: str = ""
    name: str = ""
    description: str = ""
    system_disk_size_gib: int | None = None
    system_disk_category: str = "cloud_essd"
    system_disk_name: str = ""
    data_disks: list[DataDiskSpec] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    host_name: str = ""


def _check_request(req: InstanceRequest) -> None:
    rules.check_name(req.name, code="InvalidInstanceName.Malformed", field="InstanceName")
    rules.check_description(req.description)
    rules.check_tags(req.tags)
    rules.check_data_disk_count(len(req.data_disks))
    if req.system_disk_size_gib is not None:
        rules.check_disk_size(req.system_disk_size_gib, category=req.system_disk_category,
                              system=True)
    else:
        rules.check_disk_size(20, category=req.system_disk_category, system=True)
    for spec in req.data_disks:
        rules.check_disk_size(spec.size_gib, category=spec.category, system=False)
        rules.check_name(spec.name, code="InvalidDiskName.Malformed", field="DiskName")
        rules.check_description(spec.description)


def _holding(uow: UnitOfWork, region_id: str, exclude: str | None = None) -> list[Instance]:
    return [i for i in uow.instances.find(region_id=region_id) if i.id != exclude]


def run_instances(ctx: ServiceContext, account_id: str, region_id: str, req: InstanceRequest, *,
                  amount: int = 1, min_amount: int | None = None, start: bool = True,
                  dry_run: bool = False, client_token: str | None = None) -> list[str]:
    """RunInstances (start=True) and CreateInstance (start=False, amount 1)."""
    action = "RunInstances" if start else "CreateInstance"
    params = {"region": region_id, "req": req.__dict__ | {"data_disks": [
        d.__dict__ for d in req.data_disks]}, "amount": amount, "min": min_amount}

    def run() -> dict[str, Any]:
        return {"InstanceIds": _run_instances(ctx, account_id, region_id, req, amount=amount,
                                              min_amount=min_amount, start=start,
                                              dry_run=dry_run)}

    if dry_run:
        return list(run()["InstanceIds"])
    return list(idempotency.once(ctx, account_id, action, client_token, params, run)
                ["InstanceIds"])


def _run_instances(ctx: ServiceContext, account_id: str, region_id: str, req: InstanceRequest,
                   *, amount: int, min_amount: int | None, start: bool,
                   dry_run: bool) -> list[str]:
    if not 1 <= amount <= 100:
        raise EcsError("InvalidParam.Amount", "Amount must be between 1 and 100.", 403)
    if min_amount is not None and not 1 <= min_amount <= amount:
        raise EcsError("InvalidMinAmount.Malformed",
                       "MinAmount must be between 1 and Amount.", 400)
    _check_request(req)
    created: list[str] = []
    task_ids: list[str] = []
    with ctx.uow() as uow:
        region = get_region(uow, region_id)
        zone_id = req.zone_id or f"{region_id}-a"
        zone = uow.zones.get(zone_id)
        if zone is None or zone.region_id != region_id:
            raise errors.not_found("zone", zone_id)
        image = get_image(uow, account_id, req.image_id, region_id)
        if image.status != "Available":
            raise EcsError("OperationDenied.ImageNotValid",
                           f"The image {image.id} is {image.status}.", 403)
        itype = region.instance_type(req.instance_type)
        if itype is None:
            raise errors.not_found("instance_type", req.instance_type)
        sys_size = req.system_disk_size_gib or max(20, image.size_gib)
        if sys_size < image.size_gib:
            raise EcsError("InvalidSystemDiskSize.LessThanImageSize",
                           f"The system disk ({sys_size} GiB) is smaller than the image "
                           f"({image.size_gib} GiB).", 404)
        others = _holding(uow, region_id)
        fit = amount
        while fit > 0:
            try:
                rules.check_capacity(region, others, [itype] * fit)
                break
            except EcsError:
                if min_amount is None or fit <= min_amount:
                    raise
                fit -= 1
        if dry_run:
            raise errors.dry_run_passed()
        for _ in range(fit):
            inst = Instance(id=ids.new_id("instance"), account_id=account_id,
                            region_id=region_id, zone_id=zone_id,
                            instance_type=itype.name, vcpus=itype.vcpus,
                            memory_mib=itype.memory_mib, image_id=image.id,
                            description=req.description, tags=dict(req.tags),
                            host_name=req.host_name,
                            stopped_mode=StoppedMode.KEEP_CHARGING)
            inst.name = req.name or inst.id
            uow.instances.add(inst)
            disks = [Disk(id=ids.new_id("disk"), account_id=account_id, region_id=region_id,
                          zone_id=zone_id, size_gib=sys_size, type=DiskType.SYSTEM,
                          category=req.system_disk_category, name=req.system_disk_name,
                          instance_id=inst.id, device="/dev/xvda", image_id=image.id,
                          tags=dict(req.tags))]
            for n, spec in enumerate(req.data_disks):
                disks.append(Disk(id=ids.new_id("disk"), account_id=account_id,
                                  region_id=region_id, zone_id=zone_id, size_gib=spec.size_gib,
                                  category=spec.category, name=spec.name,
                                  description=spec.description, instance_id=inst.id,
                                  device=f"/dev/xvd{'bcdefghijklmnopq'[n]}",
                                  delete_with_instance=spec.delete_with_instance,
                                  tags=dict(req.tags)))
            for disk in disks:
                uow.disks.add(disk)
            steps = [f"create_disk:{d.id}" for d in disks] + (["boot"] if start else [])
            task = new_task(uow, account_id=account_id, region_id=region_id,
                            action="RunInstance", resource_id=inst.id, steps=steps,
                            locks=[("instance", inst.id)], start=start,
                            template=image.template_path)
            created.append(inst.id)
            task_ids.append(task.id)
        uow.commit()
    for task_id in task_ids:
        ctx.runner.submit(task_id)
    return created


def vm_spec(uow: UnitOfWork, ctx: ServiceContext, inst: Instance) -> VmSpec:
    image = uow.images.get(inst.image_id)
    storage = ctx.storage(uow, inst.region_id)
    disks = [VmDisk(d.id, storage.path(d.id), d.type == DiskType.SYSTEM)
             for d in attached_disks(uow, inst.id) if d.status == DiskStatus.IN_USE]
    boot = dict(boot_mode=image.boot_mode, kernel_path=image.kernel_path,
                initrd_path=image.initrd_path, kernel_args=image.kernel_args) if image else {}
    return VmSpec(instance_id=inst.id, vcpus=inst.vcpus, memory_mib=inst.memory_mib,
                  disks=disks, **boot)


def boot(ctx: ServiceContext, instance_id: str) -> None:
    """Start the instance's VM unless it already runs (idempotent)."""
    if ctx.compute.state(instance_id).running:
        return
    with ctx.uow() as uow:
        inst = uow.instances.get(instance_id)
        assert inst is not None
        spec = vm_spec(uow, ctx, inst)
    ctx.compute.start(spec)


@handler
class RunInstanceTask(TaskHandler):
    action = "RunInstance"

    def step_create_disk(self, ctx: ServiceContext, task: Task, disk_id: str) -> None:
        from ecsnap.service.disks import make_disk_file

        with ctx.uow() as uow:
            disk = uow.disks.get(disk_id)
            assert disk is not None
        # the disk is new: whatever a crash left of it is discarded and made again
        make_disk_file(ctx, disk, task.plan["template"] if disk.type == DiskType.SYSTEM
                       else None)

    def step_boot(self, ctx: ServiceContext, task: Task, _: str) -> None:
        with ctx.uow() as uow:
            inst = uow.instances.get(task.resource_id)
            assert inst is not None
            for disk in attached_disks(uow, inst.id):
                disk.status = DiskStatus.IN_USE
                disk.attached_time = disk.attached_time or utcnow()
            inst.status = InstanceStatus.STARTING
            uow.commit()
        boot(ctx, task.resource_id)

    def finish(self, ctx: ServiceContext, uow: UnitOfWork, task: Task) -> None:
        inst = uow.instances.get(task.resource_id)
        assert inst is not None
        for disk in attached_disks(uow, inst.id):
            disk.status = DiskStatus.IN_USE
            disk.attached_time = disk.attached_time or utcnow()
        if task.plan["start"]:
            inst.status, inst.started = InstanceStatus.RUNNING, utcnow()
        else:
            inst.status = InstanceStatus.STOPPED

    def compensate(self, ctx: ServiceContext, task: Task, error: BaseException) -> None:
        ctx.compute.stop(task.resource_id, force=True)
        with ctx.uow() as uow:
            inst = uow.instances.get(task.resource_id)
            if inst is None:
                return
            storage = ctx.storage(uow, inst.region_id)
            for disk in attached_disks(uow, inst.id):
                storage.delete(disk.id)

    def failed(self, ctx: ServiceContext, uow: UnitOfWork, task: Task) -> None:
        inst = uow.instances.get(task.resource_id)
        if inst is None:
            return
        for disk in attached_disks(uow, inst.id):
            uow.disks.delete(disk)
        uow.instances.delete(inst)


def _instance_for_action(uow: UnitOfWork, account_id: str, instance_id: str | None,
                         region_id: str | None) -> Instance:
    inst = get_instance(uow, account_id, instance_id, region_id)
    rules.check_not_locked(inst)
    return inst


def start_instance(ctx: ServiceContext, account_id: str, instance_id: str, *,
                   region_id: str | None = None, dry_run: bool = False) -> str:
    """StartInstance: Stopped -> Starting -> Running. Returns the task ID.

    An instance stopped in StopCharging mode gave its compute back: the start fails with
    OperationDenied.NoStock when the region has no room for it now."""
    with ctx.uow() as uow:
        inst = _instance_for_action(uow, account_id, instance_id, region_id)
        rules.require_instance_status(inst, InstanceStatus.STOPPED)
        if not inst.holds_reservation():
            region = get_region(uow, inst.region_id)
            itype = region.instance_type(inst.instance_type)
            rules.check_capacity(region, _holding(uow, inst.region_id, inst.id),
                                 [itype] if itype else [])
        if dry_run:
            raise errors.dry_run_passed()
        task = new_task(uow, account_id=account_id, region_id=inst.region_id,
                        action="StartInstance", resource_id=inst.id, steps=["boot"],
                        locks=[("instance", inst.id)], previous_mode=inst.stopped_mode.value)
        inst.status = InstanceStatus.STARTING
        uow.commit()
    ctx.runner.submit(task.id)
    return task.id


@handler
class StartInstanceTask(TaskHandler):
    action = "StartInstance"

    def step_boot(self, ctx: ServiceContext, task: Task, _: str) -> None:
        boot(ctx, task.resource_id)

    def finish(self, ctx: ServiceContext, uow: UnitOfWork, task: Task) -> None:
        inst = uow.instances.get(task.resource_id)
        assert inst is not None
        inst.status, inst.started = InstanceStatus.RUNNING, utcnow()

    def compensate(self, ctx: ServiceContext, task: Task, error: BaseException) -> None:
        ctx.compute.stop(task.resource_id, force=True)

    def failed(self, ctx: ServiceContext, uow: UnitOfWork, task: Task) -> None:
        inst = uow.instances.get(task.resource_id)
        assert inst is not None
        inst.status = InstanceStatus.STOPPED
        inst.stopped_mode = StoppedMode(task.plan.get("previous_mode", "KeepCharging"))

    def recover_forward(self, ctx: ServiceContext, task: Task) -> bool:
        return ctx.compute.state(task.resource_id).running


def stop_instance(ctx: ServiceContext, account_id: str, instance_id: str, *,
                  region_id: str | None = None, force: bool = False,
                  stopped_mode: str | None = None, dry_run: bool = False) -> str:
    """StopInstance: Running -> Stopping -> Stopped, in KeepCharging (default) or StopCharging
    mode. StopCharging gives the instance's vCPUs and memory back to the region."""
    mode = StoppedMode(stopped_mode or StoppedMode.KEEP_CHARGING)
    if mode == StoppedMode.NOT_APPLICABLE:
        raise errors.invalid_parameter("StoppedMode", "Use KeepCharging or StopCharging.")
    with ctx.uow() as uow:
        inst = _instance_for_action(uow, account_id, instance_id, region_id)
        rules.require_instance_status(inst, InstanceStatus.RUNNING)
        if dry_run:
            raise errors.dry_run_passed()
        task = new_task(uow, account_id=account_id, region_id=inst.region_id,
                        action="StopInstance", resource_id=inst.id, steps=["shutdown"],
                        locks=[("instance", inst.id)], force=force, mode=mode.value)
        inst.status = InstanceStatus.STOPPING
        uow.commit()
    ctx.runner.submit(task.id)
    return task.id


@handler
class StopInstanceTask(TaskHandler):
    action = "StopInstance"

    def step_shutdown(self, ctx: ServiceContext, task: Task, _: str) -> None:
        ctx.compute.stop(task.resource_id, force=bool(task.plan["force"]),
                         timeout=ctx.settings.stop_timeout_s)

    def finish(self, ctx: ServiceContext, uow: UnitOfWork, task: Task) -> None:
        inst = uow.instances.get(task.resource_id)
        assert inst is not None
        inst.status = InstanceStatus.STOPPED
        inst.stopped_mode = StoppedMode(task.plan["mode"])

    def failed(self, ctx: ServiceContext, uow: UnitOfWork, task: Task) -> None:
        inst = uow.instances.get(task.resource_id)
        assert inst is not None
        running = ctx.compute.state(inst.id).running
        inst.status = InstanceStatus.RUNNING if running else InstanceStatus.STOPPED


def reboot_instance(ctx: ServiceContext, account_id: str, instance_id: str, *,
                    region_id: str | None = None, force: bool = False,
                    dry_run: bool = False) -> str:
    with ctx.uow() as uow:
        inst = _instance_for_action(uow, account_id, instance_id, region_id)
        rules.require_instance_status(inst, InstanceStatus.RUNNING)
        if dry_run:
            raise errors.dry_run_passed()
        task = new_task(uow, account_id=account_id, region_id=inst.region_id,
                        action="RebootInstance", resource_id=inst.id, steps=["reboot"],
                        locks=[("instance", inst.id)], force=force)
        inst.status = InstanceStatus.STARTING
        uow.commit()
    ctx.runner.submit(task.id)
    return task.id


@handler
class RebootInstanceTask(TaskHandler):
    action = "RebootInstance"

    def step_reboot(self, ctx: ServiceContext, task: Task, _: str) -> None:
        if ctx.compute.state(task.resource_id).running:
            ctx.compute.reboot(task.resource_id, force=bool(task.plan["force"]))
        else:
            boot(ctx, task.resource_id)

    def finish(self, ctx: ServiceContext, uow: UnitOfWork, task: Task) -> None:
        inst = uow.instances.get(task.resource_id)
        assert inst is not None
        inst.status, inst.started = InstanceStatus.RUNNING, utcnow()

    failed = StopInstanceTask.failed


def delete_instance(ctx: ServiceContext, account_id: str, instance_id: str, *,
                    region_id: str | None = None, force: bool = False,
                    dry_run: bool = False) -> str:
    """DeleteInstance: release the instance and its DeleteWithInstance disks. Snapshots stay."""
    with ctx.uow() as uow:
        inst = _instance_for_action(uow, account_id, instance_id, region_id)
        if not force:
            rules.require_instance_status(inst, InstanceStatus.STOPPED)
        elif inst.status not in (InstanceStatus.STOPPED, InstanceStatus.RUNNING):
            rules.require_instance_status(inst, InstanceStatus.STOPPED, InstanceStatus.RUNNING)
        disks = attached_disks(uow, inst.id)
        rules.check_not_locked(*disks)
        if dry_run:
            raise errors.dry_run_passed()
        task = new_task(uow, account_id=account_id, region_id=inst.region_id,
                        action="DeleteInstance", resource_id=inst.id,
                        steps=["poweroff", *[f"release_disk:{d.id}" for d in disks
                                             if d.delete_with_instance]],
                        locks=[("instance", inst.id), *[("disk", d.id) for d in disks]])
        uow.commit()
    ctx.runner.submit(task.id)
    return task.id


@handler
class DeleteInstanceTask(TaskHandler):
    action = "DeleteInstance"

    def step_poweroff(self, ctx: ServiceContext, task: Task, _: str) -> None:
        ctx.compute.stop(task.resource_id, force=True)

    def step_release_disk(self, ctx: ServiceContext, task: Task, disk_id: str) -> None:
        from ecsnap.service.disks import release_disk_file

        release_disk_file(ctx, disk_id)

    def finish(self, ctx: ServiceContext, uow: UnitOfWork, task: Task) -> None:
        from ecsnap.service.disks import mark_released

        inst = uow.instances.get(task.resource_id)
        assert inst is not None
        for disk in attached_disks(uow, inst.id):
            if f"release_disk:{disk.id}" in task.plan["steps"]:
                mark_released(uow, disk)
            else:
                disk.status, disk.instance_id, disk.device = DiskStatus.AVAILABLE, None, ""
                disk.detached_time = utcnow()
        uow.instances.delete(inst)


def describe_instances(ctx: ServiceContext, account_id: str, region_id: str, *,
                       instance_ids: Sequence[str] | None = None, status: str | None = None,
                       zone_id: str | None = None, name: str | None = None,
                       image_id: str | None = None, instance_type: str | None = None,
                       tags: dict[str, str] | None = None, page_number: int | None = None,
                       page_size: int | None = None, next_token: str | None = None,
                       max_results: int | None = None) -> Page[Instance]:
    if status and status not in {s.value for s in InstanceStatus}:
        raise EcsError("InvalidStatus.NotFound", f"The status \"{status}\" is not valid.", 404)
    criteria = Criteria(equals={"account_id": account_id, "region_id": region_id}, tags=tags or {})
    for column, value in (("status", status), ("zone_id", zone_id), ("image_id", image_id),
                          ("instance_type", instance_type)):
        if value:
            criteria.equals[column] = value
    if instance_ids is not None:
        criteria.within["id"] = list(instance_ids)
    if name:
        criteria.wildcard["name"] = name
    with ctx.uow(readonly=True) as uow:
        get_region(uow, region_id)
        return paginate(uow.instances, criteria, page_number=page_number, page_size=page_size,
                        next_token=next_token, max_results=max_results)


def wait_task(ctx: ServiceContext, task_id: str, timeout: float | None = None) -> Task:
    return ctx.runner.wait(task_id, timeout)


def statuses(ctx: ServiceContext, account_id: str, instance_ids: Sequence[str]) -> dict[str, str]:
    """The status of each of the account's instances ("" for unknown ones)."""
    with ctx.uow(readonly=True) as uow:
        found = {i.id: i.status.value for i in uow.instances.find(
            Criteria(within={"id": list(instance_ids)}), account_id=account_id)}
    return {i: found.get(i, "") for i in instance_ids}
