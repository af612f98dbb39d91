"""Snapshots and instance snapshots (snapshot groups): take, list, rename, delete.

A snapshot is a qcow2 internal snapshot named by its ID, inside its disk's file. A Running
instance's disks are snapshotted by the hypervisor in one atomic transaction (frozen or
paused guest); a Stopped instance's through the storage backend in one step, all disks
side by side, undone as a whole if one fails.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ecsnap.adapters.store.base import Criteria, UnitOfWork
from ecsnap.domain import ids, rules
from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import (
    MAX_MANUAL_SNAPSHOTS_PER_DISK,
    Consistency,
    Disk,
    DiskStatus,
    GroupPurpose,
    InstanceStatus,
    Snapshot,
    SnapshotGroup,
    SnapshotStatus,
    Task,
    utcnow,
)
from ecsnap.service.context import (
    ServiceContext,
    attached_disks,
    get_disk,
    get_group,
    get_instance,
    get_region,
    get_snapshot,
)
from ecsnap.service.listing import Page, paginate
from ecsnap.service.tasks import SHORT_TASK_S, TaskHandler, handler, new_task

FS_TAG = "FsConsistent"


@dataclass
class GroupSpec:
    name: str = ""
    description: str = ""
    purpose: GroupPurpose = GroupPurpose.USER
    tags: dict[str, str] | None = None


def journal_snapshots(uow: UnitOfWork, account_id: str, instance_id: str, disks: Sequence[Disk],
                      group: GroupSpec | None, *, quiesce: bool = True,
                      snapshot_name: str = "", description: str = "",
                      tags: dict[str, str] | None = None) -> tuple[Task, str | None, list[str]]:
    """Write the rows (progressing) and the task that takes snapshots of `disks` together."""
    inst = uow.instances.get(instance_id) if instance_id else None
    region_id = disks[0].region_id
    group_id = None
    if group is not None:
        assert inst is not None
        g = SnapshotGroup(id=ids.new_id("snapshot_group"), account_id=account_id,
                          region_id=region_id, instance_id=inst.id, name=group.name,
                          description=group.description, purpose=group.purpose,
                          tags=dict(group.tags or {}))
        uow.snapshot_groups.add(g)
        group_id = g.id
    _check_snapshot_quota(uow, disks)
    snap_ids = []
    for disk in disks:
        snap = Snapshot(id=ids.new_id("snapshot"), account_id=account_id, region_id=region_id,
                        source_disk_id=disk.id, source_disk_type=disk.type,
                        source_disk_size=disk.size_gib, instance_id=disk.instance_id or "",
                        name=snapshot_name, description=description, group_id=group_id,
                        tags=dict(tags or {}))
        uow.snapshots.add(snap)
        snap_ids.append(snap.id)
    live = inst is not None and inst.status == InstanceStatus.RUNNING
    items = [[d.id, s] for d, s in zip(disks, snap_ids, strict=True)]
    steps = ["transaction" if live else "snapshot"]
    locks = [("disk", d.id) for d in disks]
    if inst is not None:
        locks.insert(0, ("instance", inst.id))
    task = new_task(uow, account_id=account_id, region_id=region_id,
                    action="TakeSnapshots", resource_id=group_id or snap_ids[0], steps=steps,
                    locks=locks, instance_id=inst.id if inst else "", group_id=group_id,
                    items=items, quiesce=quiesce)
    return task, group_id, snap_ids


def _check_snapshot_quota(uow: UnitOfWork, disks: Sequence[Disk]) -> None:
    """QuotaExceed.Snapshot if a disk has its maximum of snapshots. One count over all the
    disks answers the usual case (all of them together are below one disk's maximum)."""
    every = Criteria(within={"source_disk_id": [d.id for d in disks]})
    if uow.snapshots.count(every) < MAX_MANUAL_SNAPSHOTS_PER_DISK:
        return
    for disk in disks:
        if uow.snapshots.count(source_disk_id=disk.id) >= MAX_MANUAL_SNAPSHOTS_PER_DISK:
            raise EcsError("QuotaExceed.Snapshot",
                           f"The disk {disk.id} has {MAX_MANUAL_SNAPSHOTS_PER_DISK} snapshots "
                           "already; delete some first.", 403)


def _vm_running(ctx: ServiceContext, instance_id: str) -> bool:
    return bool(instance_id) and ctx.compute.state(instance_id).running


def delete_internal_snapshot(ctx: ServiceContext, region_id: str, disk_id: str,
                             snapshot_id: str) -> None:
    """Remove an internal snapshot wherever the disk is open (idempotent)."""
    with ctx.uow(readonly=True) as uow:
        disk = uow.disks.get(disk_id)
        storage = ctx.storage(uow, region_id)
        instance_id = disk.instance_id if disk and disk.instance_id else ""
    if _vm_running(ctx, instance_id):
        ctx.compute.delete_disk_snapshot(instance_id, disk_id, snapshot_id)
    else:
        storage.delete_snapshot(disk_id, snapshot_id)


@handler
class TakeSnapshotsTask(TaskHandler):
    action = "TakeSnapshots"

    def step_snapshot(self, ctx: ServiceContext, task: Task, _: str) -> None:
        """Every disk of a stopped instance (or an unattached disk): all or nothing."""
        with ctx.uow(readonly=True) as uow:
            storage = ctx.storage(uow, task.region_id)
        if _vm_running(ctx, task.plan["instance_id"]):
            raise EcsError("IncorrectInstanceStatus",
                           "The instance was started while its disks were being snapshotted.",
                           403)
        storage.create_snapshots([(d, s) for d, s in task.plan["items"]])

    def step_transaction(self, ctx: ServiceContext, task: Task, _: str) -> None:
        items = [(d, s) for d, s in task.plan["items"]]
        result = ctx.compute.snapshot_disks(task.plan["instance_id"], items,
                                            quiesce=bool(task.plan["quiesce"]))
        with ctx.uow() as uow:
            fresh = uow.tasks.get(task.id)
            assert fresh is not None
            fresh.result.update(consistency=result.consistency, window_ms=result.window_ms,
                                method=result.method)
            uow.commit()
        task.result.update(fresh.result)

    def finish(self, ctx: ServiceContext, uow: UnitOfWork, task: Task) -> None:
        consistency = Consistency(task.result.get("consistency", Consistency.CRASH))
        snap_ids = [s for _, s in task.plan["items"]]
        snaps = uow.snapshots.find(Criteria(within={"id": snap_ids}))
        assert len(snaps) == len(snap_ids), "a journaled snapshot row is gone"
        for snap in snaps:
            snap.status, snap.progress, snap.consistency = SnapshotStatus.ACCOMPLISHED, 100, \
                consistency
            snap.last_modified = utcnow()
            if consistency == Consistency.FILE_SYSTEM:
                snap.tags = {**snap.tags, FS_TAG: "True"}
        if task.plan["group_id"]:
            group = uow.snapshot_groups.get(task.plan["group_id"])
            assert group is not None
            group.status, group.consistency = SnapshotStatus.ACCOMPLISHED, consistency
            group.window_ms = task.result.get("window_ms")
            if consistency == Consistency.FILE_SYSTEM:
                group.tags = {**group.tags, FS_TAG: "True"}

    def compensate(self, ctx: ServiceContext, task: Task, error: BaseException) -> None:
        for disk_id, snap_id in task.plan["items"]:
            delete_internal_snapshot(ctx, task.region_id, disk_id, snap_id)

    def failed(self, ctx: ServiceContext, uow: UnitOfWork, task: Task) -> None:
        for _, snap_id in task.plan["items"]:
            snap = uow.snapshots.get(snap_id)
            if snap is not None:
                uow.snapshots.delete(snap)
        if task.plan["group_id"]:
            group = uow.snapshot_groups.get(task.plan["group_id"])
            if group is not None:
                group.status = SnapshotStatus.FAILED

    def recover_forward(self, ctx: ServiceContext, task: Task) -> bool:
        # All disks taken: finishing is safe. Otherwise the VM may have written since some
        # disks were taken, so the remaining ones would not be of the same instant.
        return all(step in task.done for step in task.plan["steps"])


def create_snapshot_group(ctx: ServiceContext, account_id: str, region_id: str,
                          instance_id: str, *, exclude_disk_ids: Sequence[str] = (),
                          disk_ids: Sequence[str] = (), name: str = "", description: str = "",
                          tags: dict[str, str] | None = None, quiesce: bool = True,
                          ) -> tuple[str, str]:
    """CreateSnapshotGroup: an instance snapshot of all (or chosen) disks at one instant.

    Returns (snapshot group ID, task ID)."""
    rules.check_name(name, code="InvalidParameter.Name", field="Name", digit_first=True)
    rules.check_description(description)
    rules.check_tags(tags or {})
    with ctx.uow() as uow:
        get_region(uow, region_id)
        inst = get_instance(uow, account_id, instance_id, region_id)
        disks = rules.select_group_disks(inst, attached_disks(uow, inst.id), disk_ids=disk_ids,
                                         exclude_disk_ids=exclude_disk_ids)
        task, group_id, _ = journal_snapshots(uow, account_id, inst.id, disks,
                                              GroupSpec(name, description, tags=tags),
                                              quiesce=quiesce)
        uow.commit()
    ctx.runner.submit(task.id, wait_up_to=SHORT_TASK_S)
    assert group_id is not None
    return group_id, task.id


def create_snapshot(ctx: ServiceContext, account_id: str, disk_id: str, *, name: str = "",
                    description: str = "", tags: dict[str, str] | None = None,
                    retention_days: int | None = None, client_token: str | None = None,
                    ) -> str:
    """CreateSnapshot: one disk, In_use (Running or Stopped instance) or Available."""
    from ecsnap.service import idempotency

    rules.check_name(name, code="InvalidSnapshotName.Malformed", field="SnapshotName",
                     allow_dot=False, reserved_prefix="auto")
    rules.check_description(description)
    rules.check_tags(tags or {})
    if retention_days is not None and not 1 <= retention_days <= 65536:
        raise EcsError("InvalidRetentionDays.Malformed", "RetentionDays is 1 to 65536.", 400)

    def run() -> dict[str, str]:
        with ctx.uow() as uow:
            disk = get_disk(uow, account_id, disk_id)
            if disk.status not in (DiskStatus.IN_USE, DiskStatus.AVAILABLE):
                raise EcsError("IncorrectDiskStatus",
                               f"The disk {disk.id} is {disk.status.value}.", 403)
            rules.check_not_locked(disk)
            if disk.instance_id:
                inst = uow.instances.get(disk.instance_id)
                assert inst is not None
                rules.require_instance_status(inst, InstanceStatus.RUNNING,
                                              InstanceStatus.STOPPED, http_status=400)
                rules.check_not_locked(inst)
            task, _, snap_ids = journal_snapshots(
                uow, account_id, disk.instance_id or "", [disk], None, snapshot_name=name,
                description=description, tags=tags)
            snap = uow.snapshots.get(snap_ids[0])
            assert snap is not None
            snap.retention_days = retention_days
            uow.commit()
        ctx.runner.submit(task.id, wait_up_to=SHORT_TASK_S)
        return {"SnapshotId": snap_ids[0]}

    params = {"disk": disk_id, "name": name, "description": description, "tags": tags,
              "retention": retention_days}
    return idempotency.once(ctx, account_id, "CreateSnapshot", client_token, params,
                            run)["SnapshotId"]


def _journal_deletes(uow: UnitOfWork, account_id: str, snaps: Sequence[Snapshot],
                     group_id: str | None) -> Task:
    locks: list[tuple[str, str]] = []
    for snap in snaps:
        if snap.status == SnapshotStatus.PROGRESSING:
            raise EcsError("IncorrectSnapshotStatus" if group_id else "Operation.Conflict",
                           f"The snapshot {snap.id} is still being taken.", 403)
        disk = uow.disks.get(snap.source_disk_id)
        if disk is not None and not disk.released and ("disk", disk.id) not in locks:
            locks.append(("disk", disk.id))
    return new_task(uow, account_id=account_id, region_id=snaps[0].region_id if snaps else "",
                    action="DeleteSnapshots", resource_id=group_id or snaps[0].id,
                    steps=[f"delete:{s.id}" for s in snaps], locks=locks, group_id=group_id,
                    items=[[s.source_disk_id, s.id] for s in snaps])


@handler
class DeleteSnapshotsTask(TaskHandler):
    action = "DeleteSnapshots"

    def step_delete(self, ctx: ServiceContext, task: Task, snap_id: str) -> None:
        disk_id = {s: d for d, s in task.plan["items"]}[snap_id]
        delete_internal_snapshot(ctx, task.region_id, disk_id, snap_id)
        with ctx.uow(readonly=True) as uow:
            disk = uow.disks.get(disk_id)
            others = [s for s in uow.snapshots.find(source_disk_id=disk_id) if s.id != snap_id
                      and [disk_id, s.id] not in task.plan["items"]]
            storage = ctx.storage(uow, task.region_id)
        if (disk is None or disk.released) and not others:
            storage.delete(disk_id)  # the last snapshot of a released disk held its file

    def finish(self, ctx: ServiceContext, uow: UnitOfWork, task: Task) -> None:
        for disk_id, snap_id in task.plan["items"]:
            snap = uow.snapshots.get(snap_id)
            if snap is not None:
                uow.snapshots.delete(snap)
            disk = uow.disks.get(disk_id)
            if disk is not None and disk.released and \
                    uow.snapshots.count(source_disk_id=disk_id) <= 1:
                uow.disks.delete(disk)
        if task.plan["group_id"]:
            group = uow.snapshot_groups.get(task.plan["group_id"])
            if group is not None:
                uow.snapshot_groups.delete(group)
        task.result["deleted"] = [s for _, s in task.plan["items"]]


def delete_snapshot(ctx: ServiceContext, account_id: str, snapshot_id: str, *,
                    force: bool = False) -> str | None:
    """DeleteSnapshot: an unknown ID is ignored, as ECS does. Returns the task ID."""
    with ctx.uow() as uow:
        snap = uow.snapshots.get(snapshot_id)
        if snap is None or snap.account_id != account_id:
            return None
        task = _journal_deletes(uow, account_id, [snap], None)
        uow.commit()
    ctx.runner.submit(task.id, wait_up_to=SHORT_TASK_S)
    return task.id


def delete_snapshot_group(ctx: ServiceContext, account_id: str, region_id: str,
                          group_id: str) -> tuple[list[str], str]:
    """DeleteSnapshotGroup: the group and its snapshots. Returns (snapshot IDs, task ID)."""
    with ctx.uow() as uow:
        group = get_group(uow, account_id, group_id, region_id)
        snaps = uow.snapshots.find(group_id=group.id)
        if group.status == SnapshotStatus.PROGRESSING:
            raise EcsError("IncorrectSnapshotGroupStatus",
                           f"The snapshot group {group.id} is still being taken.", 403)
        if not snaps:
            uow.snapshot_groups.delete(group)
            uow.commit()
            return [], ""
        task = _journal_deletes(uow, account_id, snaps, group.id)
        uow.commit()
    ctx.runner.submit(task.id, wait_up_to=SHORT_TASK_S)
    return [s.id for s in snaps], task.id


def modify_snapshot(ctx: ServiceContext, account_id: str, snapshot_id: str, *,
                    name: str | None = None, description: str | None = None) -> None:
    if name is None and description is None:
        raise EcsError("NoAttributeToModify", "Nothing to modify was given.", 400)
    rules.check_name(name, code="InvalidSnapshotName.Malformed", field="SnapshotName",
                     allow_dot=False, reserved_prefix="auto")
    rules.check_description(description)
    with ctx.uow() as uow:
        snap = get_snapshot(uow, account_id, snapshot_id)
        if name is not None:
            snap.name = name
        if description is not None:
            snap.description = description
        snap.last_modified = utcnow()
        uow.commit()


def modify_snapshot_group(ctx: ServiceContext, account_id: str, region_id: str, group_id: str,
                          *, name: str | None = None, description: str | None = None) -> None:
    rules.check_name(name, code="InvalidParameter.Name", field="Name")
    rules.check_description(description)
    with ctx.uow() as uow:
        group = get_group(uow, account_id, group_id, region_id)
        if name is not None:
            group.name = name
        if description is not None:
            group.description = description
        uow.commit()


def describe_snapshots(ctx: ServiceContext, account_id: str, region_id: str, *,
                       snapshot_ids: Sequence[str] | None = None, disk_id: str | None = None,
                       instance_id: str | None = None, status: str | None = None,
                       name: str | None = None, source_disk_type: str | None = None,
                       tags: dict[str, str] | None = None, page_number: int | None = None,
                       page_size: int | None = None, next_token: str | None = None,
                       max_results: int | None = None) -> Page[Snapshot]:
    criteria = Criteria(equals={"account_id": account_id, "region_id": region_id},
                        tags=tags or {})
    if status and status != "all":
        if status not in {s.value for s in SnapshotStatus}:
            raise EcsError("InvalidStatus.NotFound", f"The Status \"{status}\" is not valid.", 404)
        criteria.equals["status"] = status
    if source_disk_type:
        if source_disk_type.lower() not in ("system", "data"):
            raise EcsError("InvalidSourceDiskType", "SourceDiskType is System or Data.", 404)
        criteria.equals["source_disk_type"] = source_disk_type.lower()
    for column, value in (("source_disk_id", disk_id), ("instance_id", instance_id),
                          ("name", name)):
        if value:
            criteria.equals[column] = value
    if snapshot_ids is not None:
        criteria.within["id"] = list(snapshot_ids)
    with ctx.uow(readonly=True) as uow:
        get_region(uow, region_id)
        return paginate(uow.snapshots, criteria, page_number=page_number, page_size=page_size,
                        next_token=next_token, max_results=max_results)


@dataclass
class GroupView:
    group: SnapshotGroup
    snapshots: list[Snapshot]

    @property
    def progress(self) -> int:
        if not self.snapshots:
            return 100 if self.group.status != SnapshotStatus.PROGRESSING else 0
        return sum(s.progress for s in self.snapshots) // len(self.snapshots)


def describe_snapshot_groups(ctx: ServiceContext, account_id: str, region_id: str, *,
                             group_ids: Sequence[str] | None = None,
                             instance_id: str | None = None, name: str | None = None,
                             statuses: Sequence[str] | None = None,
                             next_token: str | None = None, max_results: int | None = None,
                             ) -> Page[GroupView]:
    criteria = Criteria(equals={"account_id": account_id, "region_id": region_id})
    if group_ids:
        criteria.within["id"] = list(group_ids)
    if statuses:
        bad = [s for s in statuses if s not in {v.value for v in SnapshotStatus}]
        if bad:
            raise EcsError("InvalidStatus.ValueNotSupported",
                           f"The Status \"{bad[0]}\" is not valid.", 403)
        criteria.within["status"] = list(statuses)
    if instance_id:
        criteria.equals["instance_id"] = instance_id
    if name:
        criteria.equals["name"] = name
    with ctx.uow(readonly=True) as uow:
        get_region(uow, region_id)
        page = paginate(uow.snapshot_groups, criteria, next_token=next_token,
                        max_results=max_results, token_only=True)
        members: dict[str, list[Snapshot]] = {g.id: [] for g in page.items}
        if members:
            for snap in uow.snapshots.find(Criteria(within={"group_id": list(members)},
                                                    newest_first=False)):
                members[snap.group_id or ""].append(snap)
        views = [GroupView(g, _system_first(members[g.id])) for g in page.items]
        return Page(views, page.total, page.page_number, page.page_size, page.next_token)


def get_snapshot_group(ctx: ServiceContext, account_id: str, group_id: str) -> GroupView:
    with ctx.uow(readonly=True) as uow:
        group = get_group(uow, account_id, group_id)
        return GroupView(group, _system_first(uow.snapshots.find(group_id=group.id)))


def _system_first(snaps: list[Snapshot]) -> list[Snapshot]:
    return sorted(snaps, key=lambda s: (s.source_disk_type.value != "system", s.created, s.id))
