"""Instances: create, run, start, stop, reboot, delete, describe."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ecsnap.adapters.store.base import Criteria, Row, UnitOfWork
from ecsnap.domain import errors, ids, rules
from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import (
    Disk,
    DiskType,
    Image,
    Instance,
    InstanceStatus,
    StoppedMode,
    Task,
)
from ecsnap.service import idempotency, placement, quotas
from ecsnap.service.context import (
    ServiceContext,
    attached_disks,
    get_image,
    get_instance,
    get_region,
)
from ecsnap.service.disk_files import (
    make_disk_file,
    mark_released,
    release_disk_file,
    source_snapshot,
)
from ecsnap.service.listing import Page, paginate
from ecsnap.service.operation import Lock, Operation, P, Plan, Resume, Step
from ecsnap.service.vms import boot, check_room_to_start, vm_running


@dataclass
class DataDiskSpec:
    size_gib: int | None = 20  # None: the snapshot's disk size (with snapshot_id)
    category: str = "cloud_essd"
    name: str = ""
    description: str = ""
    delete_with_instance: bool = True
    snapshot_id: str = ""  # a data disk's snapshot: the new disk has its content


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
        if spec.size_gib is None and not spec.snapshot_id:
            raise errors.missing_parameter("DataDisk.N.Size")
        if spec.size_gib is not None:
            rules.check_disk_size(spec.size_gib, category=spec.category, system=False)
        rules.check_name(spec.name, code="InvalidDiskName.Malformed", field="DiskName")
        rules.check_description(spec.description)


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
    tasks: list[Task] = []
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
        hosts = placement.place_new(uow, region, itype.vcpus, itype.memory_mib, amount)
        fit = len(hosts)
        wanted = amount if min_amount is None else min_amount
        if fit < wanted:
            raise EcsError("OperationDenied.NoStock",
                           f"Only {fit} of the {wanted} instances of type {itype.name} fit "
                           "on the hosts now; try again later or ask for fewer.", 403)
        data_sizes = [_data_disk_size(uow, account_id, region_id, d) for d in req.data_disks]
        each = {"instances": 1, "vcpus": itype.vcpus, "memory_mib": itype.memory_mib,
                "disks": 1 + len(req.data_disks),
                "disk_gib": sys_size + sum(data_sizes)}
        needed = fit if min_amount is None else min_amount  # without MinAmount: all of them
        fit = quotas.how_many_fit(ctx, uow, account_id, each, fit)
        if fit < needed:  # the error of the quota that `needed` instances would exceed
            quotas.check(ctx, uow, account_id, {k: v * needed for k, v in each.items()})
        if dry_run:
            raise errors.dry_run_passed()
        for _ in range(fit):
            inst = Instance(id=ids.new_id("instance"), account_id=account_id,
                            region_id=region_id, zone_id=zone_id,
                            instance_type=itype.name, vcpus=itype.vcpus,
                            memory_mib=itype.memory_mib, image_id=image.id,
                            description=req.description, tags=dict(req.tags),
                            host_name=req.host_name, host_id=hosts[len(created)],
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
                                  region_id=region_id, zone_id=zone_id,
                                  size_gib=data_sizes[n], source_snapshot_id=spec.snapshot_id,
                                  category=spec.category, name=spec.name,
                                  description=spec.description, instance_id=inst.id,
                                  device=f"/dev/xvd{'bcdefghijklmnopq'[n]}",
                                  delete_with_instance=spec.delete_with_instance,
                                  tags=dict(req.tags)))
            for disk in disks:
                uow.disks.add(disk)
            plan = RunInstancePlan(inst.id, tuple(d.id for d in disks), start,
                                   image.template_path)
            task = ctx.runner.journal(uow, RunInstance, plan, account_id=account_id,
                                      region_id=region_id, resource_id=inst.id)
            created.append(inst.id)
            tasks.append(task)
        idempotency.respond(uow, {"InstanceIds": created})  # with the tasks: one commit
        uow.commit()
    for task in tasks:
        ctx.runner.submit(task)
    return created


def _data_disk_size(uow: UnitOfWork, account_id: str, region_id: str,
                    spec: DataDiskSpec) -> int:
    """A data disk's size in GiB; one from a snapshot: the snapshot's disk size, or Size
    if larger. Its snapshot must be the account's, of a data disk, accomplished. (Unlike
    CreateDisk, RunInstances does not lock the snapshot's disk: the instances of one call
    may share a snapshot. DeleteSnapshot refuses one that created disks, without Force.)"""
    if not spec.snapshot_id:
        return spec.size_gib or 20
    try:
        snap = source_snapshot(uow, account_id, region_id, spec.snapshot_id)
    except EcsError as exc:
        if exc.code == "InvalidSnapshotId.NotFound":
            raise EcsError("InvalidDataDiskSnapshotId.NotFound",
                           f"The data disk snapshot {spec.snapshot_id} does not exist.",
                           404) from exc
        raise
    if snap.source_disk_type != DiskType.DATA:
        raise EcsError("InvalidSnapshotId.NotDataDiskSnapshot",
                       f"The snapshot {snap.id} is not a data disk's snapshot.", 403)
    if spec.size_gib is not None and spec.size_gib < snap.source_disk_size:
        raise EcsError("InvalidDiskSize.TooSmall",
                       f"DataDisk Size ({spec.size_gib} GiB) is smaller than the snapshot's "
                       f"disk ({snap.source_disk_size} GiB).", 403)
    return max(spec.size_gib or 0, snap.source_disk_size)


@dataclass(frozen=True)
class RunInstancePlan(Plan):
    instance_id: str
    disk_ids: tuple[str, ...]  # the system disk first
    start: bool
    template: str  # the image's template the system disk is an overlay on

    @classmethod
    def upgrade(cls, data: dict[str, Any], version: int, resource_id: str) -> dict[str, Any]:
        return {**data, "instance_id": resource_id, "disk_ids": [
            s.partition(":")[2] for s in data.get("steps", ()) if s.startswith("create_disk:")]}


class RunInstance(Operation[RunInstancePlan]):
    """RunInstances / CreateInstance, one task per instance: its disk files, then its VM."""

    action = "RunInstance"
    plan_type = RunInstancePlan

    @classmethod
    def locks(cls, plan: RunInstancePlan) -> list[Lock]:
        return [("instance", plan.instance_id)]

    def steps(self) -> list[Step]:
        steps = [Step(f"create_disk:{d}", functools.partial(self.create_disk, d))
                 for d in self.plan.disk_ids]
        return steps + ([Step("boot", self.boot)] if self.plan.start else [])

    def create_disk(self, disk_id: str) -> None:
        with self.ctx.uow(readonly=True) as uow:
            disk = uow.disks.load(disk_id)
        # the disk is new: whatever a crash left of it is discarded and made again
        make_disk_file(self.ctx, disk, self.plan.template if disk.type == DiskType.SYSTEM
                       else None)

    def boot(self) -> None:
        with self.ctx.uow() as uow:
            inst = uow.instances.load(self.plan.instance_id)
            here = self.task.owner or None  # a cluster: the agent that boots the VM
            if here is not None and inst.host_id != here:
                # taken over from a fenced host (its disks on shared storage): the VM boots
                # here, so its claim moves here, if there is room (NoStock: undone)
                inst.host_id = placement.place(uow, get_region(uow, inst.region_id), inst,
                                               on=here)
            for disk in attached_disks(uow, inst.id):
                disk.attach(inst.id, disk.device)
            inst.mark_starting()
            uow.commit()
        boot(self.ctx, self.plan.instance_id)

    def finish(self, uow: UnitOfWork) -> None:
        inst = uow.instances.load(self.plan.instance_id)
        for disk in attached_disks(uow, inst.id):
            disk.attach(inst.id, disk.device)
        if self.plan.start:
            inst.mark_running()
        else:
            inst.mark_stopped()

    def compensate(self, error: BaseException) -> None:
        self.ctx.compute.stop(self.plan.instance_id, force=True)
        storage = self.ctx.storage_of(self.task.region_id)
        for disk_id in self.plan.disk_ids:
            storage.delete(disk_id)

    def failed(self, uow: UnitOfWork) -> None:
        inst = uow.instances.get(self.plan.instance_id)
        if inst is None:
            return
        for disk in attached_disks(uow, inst.id):
            uow.disks.delete(disk)
        uow.instances.delete(inst)


def _on_instance(ctx: ServiceContext, account_id: str, instance_id: str,
                 region_id: str | None, op_type: type[Operation[P]],
                 check: Callable[[UnitOfWork, Instance], P], *, dry_run: bool) -> str:
    """An operation on one instance: load, check, journal (one transaction), run. Returns
    the task ID; with `dry_run`, DryRunOperation once the checks pass."""
    with ctx.uow() as uow:
        inst = get_instance(uow, account_id, instance_id, region_id)
        plan = check(uow, inst)
        if dry_run:
            raise errors.dry_run_passed()
        task = ctx.runner.journal(uow, op_type, plan, account_id=account_id,
                                  region_id=inst.region_id, resource_id=inst.id)
        uow.commit()
    ctx.runner.submit(task)
    return task.id


def journal_start(ctx: ServiceContext, uow: UnitOfWork, inst: Instance) -> Task:
    """StartInstance's checks and journal in the caller's open transaction, as
    `start_instance` makes them in its own (the fence's automatic restart: service/cluster.py
    `settle`). The caller commits, then submits the task to the runner."""
    plan = StartInstance.check(uow, inst)
    return ctx.runner.journal(uow, StartInstance, plan, account_id=inst.account_id,
                              region_id=inst.region_id, resource_id=inst.id)


@dataclass(frozen=True)
class InstancePlan(Plan):
    """The plan of an operation on one instance's VM."""

    instance_id: str

    @classmethod
    def upgrade(cls, data: dict[str, Any], version: int, resource_id: str) -> dict[str, Any]:
        return {**data, "instance_id": resource_id}


class _OnInstance(Operation[Any]):
    @classmethod
    def locks(cls, plan: InstancePlan) -> list[Lock]:
        return [("instance", plan.instance_id)]


@dataclass(frozen=True)
class StartInstancePlan(InstancePlan):
    previous_mode: str = StoppedMode.KEEP_CHARGING.value
    host_id: str = ""  # where its compute is claimed ("": as before placement existed)


class StartInstance(_OnInstance):
    action = "StartInstance"
    plan_type = StartInstancePlan

    @classmethod
    def check(cls, uow: UnitOfWork, inst: Instance) -> StartInstancePlan:
        rules.check_not_locked(inst)
        rules.require_instance_status(inst, InstanceStatus.STOPPED)
        host_id = check_room_to_start(uow, inst)
        return StartInstancePlan(inst.id, inst.stopped_mode.value, host_id)

    def accept(self, uow: UnitOfWork) -> None:
        inst = uow.instances.load(self.plan.instance_id)
        inst.host_id = self.plan.host_id or inst.host_id  # the claim, in this transaction
        inst.mark_starting()

    def steps(self) -> list[Step]:
        return [Step("boot", lambda: boot(self.ctx, self.plan.instance_id))]

    def finish(self, uow: UnitOfWork) -> None:
        uow.instances.load(self.plan.instance_id).mark_running()

    def compensate(self, error: BaseException) -> None:
        self.ctx.compute.stop(self.plan.instance_id, force=True)

    def failed(self, uow: UnitOfWork) -> None:
        uow.instances.load(self.plan.instance_id).mark_stopped(
            StoppedMode(self.plan.previous_mode))

    def resume(self) -> Resume:
        return Resume.FORWARD if vm_running(self.ctx, self.plan.instance_id) else Resume.UNDO


def start_instance(ctx: ServiceContext, account_id: str, instance_id: str, *,
                   region_id: str | None = None, dry_run: bool = False) -> str:
    """StartInstance: Stopped -> Starting -> Running. Returns the task ID.

    An instance stopped in StopCharging mode gave its compute back: the start fails with
    OperationDenied.NoStock when the region has no room for it now."""
    return _on_instance(ctx, account_id, instance_id, region_id, StartInstance,
                        StartInstance.check, dry_run=dry_run)


@dataclass(frozen=True)
class StopInstancePlan(InstancePlan):
    force: bool = False
    mode: str = StoppedMode.KEEP_CHARGING.value


class StopInstance(_OnInstance):
    """StopInstance: Running -> Stopping -> Stopped, in KeepCharging or StopCharging mode."""

    action = "StopInstance"
    plan_type = StopInstancePlan

    @classmethod
    def check(cls, inst: Instance, *, force: bool, mode: StoppedMode) -> StopInstancePlan:
        rules.check_not_locked(inst)
        rules.require_instance_status(inst, InstanceStatus.RUNNING)
        return StopInstancePlan(inst.id, force, mode.value)

    def accept(self, uow: UnitOfWork) -> None:
        uow.instances.load(self.plan.instance_id).mark_stopping()

    def steps(self) -> list[Step]:
        return [Step("shutdown", self.shutdown)]

    def shutdown(self) -> None:
        self.ctx.compute.stop(self.plan.instance_id, force=self.plan.force,
                              timeout=self.ctx.settings.stop_timeout_s)

    def finish(self, uow: UnitOfWork) -> None:
        uow.instances.load(self.plan.instance_id).mark_stopped(StoppedMode(self.plan.mode))

    def failed(self, uow: UnitOfWork) -> None:
        after_failed_stop_or_reboot(self.ctx, uow, self.plan.instance_id)


def after_failed_stop_or_reboot(ctx: ServiceContext, uow: UnitOfWork, instance_id: str) -> None:
    """The instance is what its VM is: Running if it runs, else Stopped."""
    uow.instances.load(instance_id).reconcile(vm_running(ctx, instance_id))


def stop_instance(ctx: ServiceContext, account_id: str, instance_id: str, *,
                  region_id: str | None = None, force: bool = False,
                  stopped_mode: str | None = None, dry_run: bool = False) -> str:
    """StopInstance: Running -> Stopping -> Stopped, in KeepCharging (default) or StopCharging
    mode. StopCharging gives the instance's vCPUs and memory back to the region."""
    if (stopped_mode or StoppedMode.KEEP_CHARGING) not in (StoppedMode.KEEP_CHARGING,
                                                           StoppedMode.STOP_CHARGING):
        raise errors.invalid_parameter("StoppedMode", "Use KeepCharging or StopCharging.")
    mode = StoppedMode(stopped_mode or StoppedMode.KEEP_CHARGING)
    return _on_instance(ctx, account_id, instance_id, region_id, StopInstance,
                        lambda u, i: StopInstance.check(i, force=force, mode=mode),
                        dry_run=dry_run)


@dataclass(frozen=True)
class RebootInstancePlan(InstancePlan):
    force: bool = False


class RebootInstance(_OnInstance):
    action = "RebootInstance"
    plan_type = RebootInstancePlan

    @classmethod
    def check(cls, inst: Instance, *, force: bool) -> RebootInstancePlan:
        rules.check_not_locked(inst)
        rules.require_instance_status(inst, InstanceStatus.RUNNING)
        return RebootInstancePlan(inst.id, force)

    def accept(self, uow: UnitOfWork) -> None:
        uow.instances.load(self.plan.instance_id).mark_starting()

    def steps(self) -> list[Step]:
        return [Step("reboot", self.reboot)]

    def reboot(self) -> None:
        if vm_running(self.ctx, self.plan.instance_id):
            self.ctx.compute.reboot(self.plan.instance_id, force=self.plan.force)
        else:
            boot(self.ctx, self.plan.instance_id)

    def finish(self, uow: UnitOfWork) -> None:
        uow.instances.load(self.plan.instance_id).mark_running()

    def failed(self, uow: UnitOfWork) -> None:
        after_failed_stop_or_reboot(self.ctx, uow, self.plan.instance_id)


def reboot_instance(ctx: ServiceContext, account_id: str, instance_id: str, *,
                    region_id: str | None = None, force: bool = False,
                    dry_run: bool = False) -> str:
    return _on_instance(ctx, account_id, instance_id, region_id, RebootInstance,
                        lambda u, i: RebootInstance.check(i, force=force),
                        dry_run=dry_run)


@dataclass(frozen=True)
class DeleteInstancePlan(InstancePlan):
    disk_ids: tuple[str, ...] = ()  # every attached disk (locked)
    release_disk_ids: tuple[str, ...] = ()  # those deleted with the instance

    @classmethod
    def upgrade(cls, data: dict[str, Any], version: int, resource_id: str) -> dict[str, Any]:
        return {**data, "instance_id": resource_id,
                "disk_ids": [i for kind, i in data.get("locks", ()) if kind == "disk"],
                "release_disk_ids": [s.partition(":")[2] for s in data.get("steps", ())
                                     if s.startswith("release_disk:")]}


class DeleteInstance(Operation[DeleteInstancePlan]):
    """DeleteInstance: power off, release the DeleteWithInstance disks, detach the others."""

    action = "DeleteInstance"
    plan_type = DeleteInstancePlan

    @classmethod
    def check(cls, uow: UnitOfWork, inst: Instance, *, force: bool) -> DeleteInstancePlan:
        rules.check_not_locked(inst)
        if not force:
            rules.require_instance_status(inst, InstanceStatus.STOPPED)
        elif inst.status not in (InstanceStatus.STOPPED, InstanceStatus.RUNNING):
            rules.require_instance_status(inst, InstanceStatus.STOPPED, InstanceStatus.RUNNING)
        disks = attached_disks(uow, inst.id)
        rules.check_not_locked(*disks)
        return DeleteInstancePlan(inst.id, tuple(d.id for d in disks),
                                  tuple(d.id for d in disks if d.delete_with_instance))

    @classmethod
    def locks(cls, plan: DeleteInstancePlan) -> list[Lock]:
        return [("instance", plan.instance_id), *(("disk", d) for d in plan.disk_ids)]

    def steps(self) -> list[Step]:
        return [Step("poweroff", lambda: self.ctx.compute.stop(self.plan.instance_id,
                                                                 force=True)),
                *(Step(f"release_disk:{d}", functools.partial(release_disk_file, self.ctx, d))
                  for d in self.plan.release_disk_ids)]

    def finish(self, uow: UnitOfWork) -> None:
        inst = uow.instances.load(self.plan.instance_id)
        for disk in attached_disks(uow, inst.id):
            if disk.id in self.plan.release_disk_ids:
                mark_released(uow, disk)
            else:
                disk.detach()
        uow.instances.delete(inst)


def delete_instance(ctx: ServiceContext, account_id: str, instance_id: str, *,
                    region_id: str | None = None, force: bool = False,
                    dry_run: bool = False) -> str:
    """DeleteInstance: release the instance and its DeleteWithInstance disks. Snapshots stay."""
    return _on_instance(ctx, account_id, instance_id, region_id, DeleteInstance,
                        lambda u, i: DeleteInstance.check(u, i, force=force),
                        dry_run=dry_run)


def describe_instances(ctx: ServiceContext, account_id: str, region_id: str, *,
                       instance_ids: Sequence[str] | None = None, status: str | None = None,
                       zone_id: str | None = None, name: str | None = None,
                       image_id: str | None = None, instance_type: str | None = None,
                       tags: dict[str, str] | None = None, page_number: int | None = None,
                       page_size: int | None = None, next_token: str | None = None,
                       max_results: int | None = None,
                       images: dict[str, Image] | None = None) -> Page[Row]:
    """A page of the account's instances (rows: every field of an Instance, as a named
    tuple). `images`, when given, is filled with the images of the page's instances
    (DescribeInstances shows each one's OS), read in the same unit of work."""
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
        ctx.check_region(uow, region_id)
        page = paginate(uow.instances, criteria, page_number=page_number, page_size=page_size,
                        next_token=next_token, max_results=max_results, as_rows=True)
        if images is not None and page.items:
            wanted = sorted({i.image_id for i in page.items})
            images.update((m.id, m) for m in uow.images.find(Criteria(within={"id": wanted})))
        return page


def wait_task(ctx: ServiceContext, task_id: str, timeout: float | None = None) -> Task:
    return ctx.runner.wait(task_id, timeout)


def statuses(ctx: ServiceContext, account_id: str, instance_ids: Sequence[str]) -> dict[str, str]:
    """The status of each of the account's instances ("" for unknown ones)."""
    with ctx.uow(readonly=True) as uow:
        found = {i.id: i.status.value for i in uow.instances.find(
            Criteria(within={"id": list(instance_ids)}), account_id=account_id)}
    return {i: found.get(i, "") for i in instance_ids}
