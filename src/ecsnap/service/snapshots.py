"""Snapshots and instance snapshots (snapshot groups): take, list, rename, delete.

A snapshot is a qcow2 internal snapshot named by its ID, inside its disk's file. A Running
instance's disks are snapshotted by the hypervisor in one atomic transaction (frozen or
paused guest); a Stopped instance's through the storage backend in one step, all disks
side by side, undone as a whole if one fails.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, TypeVar

from ecsnap.adapters.store.base import Criteria, Row, UnitOfWork
from ecsnap.domain import ids, rules
from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import (
    Consistency,
    Disk,
    DiskStatus,
    DiskType,
    Instance,
    InstanceStatus,
    Snapshot,
    SnapshotGroup,
    SnapshotStatus,
    Task,
)
from ecsnap.service import idempotency, quotas, snapshot_records
from ecsnap.service.context import (
    ServiceContext,
    attached_disks,
    get_disk,
    get_group,
    get_instance,
    get_snapshot,
)
from ecsnap.service.disk_files import delete_internal_snapshot
from ecsnap.service.listing import Page, paginate
from ecsnap.service.operation import Lock, Operation, Pair, Plan, Resume, Step
from ecsnap.service.snapshot_records import GroupSpec, SnapshotSpec, check_snapshot_quota, new_items
from ecsnap.service.space import require_free_space
from ecsnap.service.tasks import SHORT_TASK_S
from ecsnap.service.vms import vm_running
from ecsnap.service.volumes import current_volumes, schedule_collect


@dataclass(frozen=True)
class TakeSnapshotsPlan(Plan):
    instance_id: str  # "" for a disk that no instance has
    group_id: str | None
    items: tuple[Pair, ...]  # (disk, new snapshot)
    quiesce: bool
    live: bool  # the instance was Running: the hypervisor takes them in one transaction

    @classmethod
    def upgrade(cls, data: dict[str, Any], version: int, resource_id: str) -> dict[str, Any]:
        return {**data, "live": "transaction" in data.get("steps", ())}


class TakeSnapshots(Operation[TakeSnapshotsPlan]):
    """Snapshots of disks taken together: a snapshot group, or one CreateSnapshot.

    Running instance: one step, a QMP transaction of all disks (guest frozen or paused).
    Otherwise one step through the storage backend, all disks side by side, all or none."""

    action = "TakeSnapshots"
    plan_type = TakeSnapshotsPlan

    @classmethod
    def check(cls, ctx: ServiceContext, uow: UnitOfWork, account_id: str,
              inst: Instance | None, disks: Sequence[Disk], *, group: bool,
              quiesce: bool = True) -> TakeSnapshotsPlan:
        used = quotas.check(ctx, uow, account_id, {"snapshots": len(disks)})
        check_snapshot_quota(uow, disks, used.get("snapshots"))
        return TakeSnapshotsPlan(
            instance_id=inst.id if inst else "",
            group_id=ids.new_id("snapshot_group") if group else None,
            items=new_items(disks), quiesce=quiesce,
            live=inst is not None and inst.status == InstanceStatus.RUNNING)

    @classmethod
    def locks(cls, plan: TakeSnapshotsPlan) -> list[Lock]:
        disks = [("disk", d) for d, _ in plan.items]
        return [("instance", plan.instance_id), *disks] if plan.instance_id else disks

    def steps(self) -> list[Step]:
        if self.plan.live:
            return [Step("transaction", self.transaction)]
        return [Step("snapshot", self.snapshot)]

    def snapshot(self) -> None:
        """Every disk of a stopped instance (or an unattached disk): all or nothing."""
        storage = self.ctx.storage_of(self.task.region_id)
        if vm_running(self.ctx, self.plan.instance_id):
            raise EcsError("IncorrectInstanceStatus",
                           "The instance was started while its disks were being snapshotted.",
                           403)
        current = current_volumes(self.ctx, [d for d, _ in self.plan.items])
        storage.create_snapshots([(current[d], s) for d, s in self.plan.items])

    def transaction(self) -> None:
        result = self.ctx.compute.snapshot_disks(self.plan.instance_id, list(self.plan.items),
                                                 quiesce=self.plan.quiesce)
        self.note(consistency=result.consistency, window_ms=result.window_ms,
                  method=result.method)

    def finish(self, uow: UnitOfWork) -> None:
        snapshot_records.complete(
            uow, self.plan.items, self.plan.group_id,
            Consistency(self.task.result.get("consistency", Consistency.CRASH)),
            self.task.result.get("window_ms"))

    def compensate(self, error: BaseException) -> None:
        for disk_id, snap_id in self.plan.items:
            delete_internal_snapshot(self.ctx, self.task.region_id, disk_id, snap_id)

    def failed(self, uow: UnitOfWork) -> None:
        snapshot_records.drop(uow, self.plan.items, self.plan.group_id, group_too=False)

    def before_resume(self) -> None:
        if self.plan.live:  # a crash inside the transaction may have left the guest frozen
            self.ctx.compute.resume_guest(self.plan.instance_id)

    def resume(self) -> Resume:
        # All disks taken: finishing is safe. Otherwise the VM may have written since some
        # disks were taken, so the remaining ones would not be of the same instant.
        return Resume.FORWARD if all(self.done(s.name) for s in self.steps()) else Resume.UNDO


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
        ctx.check_region(uow, region_id)
        inst = get_instance(uow, account_id, instance_id, region_id)
        disks = rules.select_group_disks(inst, attached_disks(uow, inst.id), disk_ids=disk_ids,
                                         exclude_disk_ids=exclude_disk_ids)
        plan = TakeSnapshots.check(ctx, uow, account_id, inst, disks, group=True,
                                  quiesce=quiesce)
        require_free_space(ctx, uow, inst.region_id, [d for d, _ in plan.items])
        assert plan.group_id is not None
        snapshot_records.add_rows(uow, account_id, inst.id, disks, plan.items,
                                  group=GroupSpec(name, description, tags=dict(tags or {})),
                                  group_id=plan.group_id)
        task = ctx.runner.journal(uow, TakeSnapshots, plan, account_id=account_id,
                                  region_id=inst.region_id, resource_id=plan.group_id)
        uow.commit()
    ctx.runner.submit(task, wait_up_to=SHORT_TASK_S)
    return plan.group_id, task.id


def create_snapshot(ctx: ServiceContext, account_id: str, disk_id: str, *, name: str = "",
                    description: str = "", tags: dict[str, str] | None = None,
                    retention_days: int | None = None, client_token: str | None = None,
                    ) -> str:
    """CreateSnapshot: one disk, In_use (Running or Stopped instance) or Available."""
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
            inst = uow.instances.load(disk.instance_id) if disk.instance_id else None
            if inst is not None:
                rules.require_instance_status(inst, InstanceStatus.RUNNING,
                                              InstanceStatus.STOPPED, http_status=400)
                rules.check_not_locked(inst)
            plan = TakeSnapshots.check(ctx, uow, account_id, inst, [disk], group=False)
            require_free_space(ctx, uow, disk.region_id, [disk.id])
            snapshot_records.add_rows(uow, account_id, disk.instance_id or "", [disk],
                                      plan.items, snapshot=SnapshotSpec(
                                          name, description, dict(tags or {}), retention_days))
            [(_, snap_id)] = plan.items
            task = ctx.runner.journal(uow, TakeSnapshots, plan, account_id=account_id,
                                      region_id=disk.region_id, resource_id=snap_id)
            uow.commit()
        ctx.runner.submit(task, wait_up_to=SHORT_TASK_S)
        return {"SnapshotId": snap_id}

    params = {"disk": disk_id, "name": name, "description": description, "tags": tags,
              "retention": retention_days}
    return idempotency.once(ctx, account_id, "CreateSnapshot", client_token, params,
                            run)["SnapshotId"]


@dataclass(frozen=True)
class DeleteSnapshotsPlan(Plan):
    group_id: str | None
    items: tuple[Pair, ...]  # (source disk, snapshot)
    disk_locks: tuple[str, ...] = ()

    @classmethod
    def upgrade(cls, data: dict[str, Any], version: int, resource_id: str) -> dict[str, Any]:
        return {**data, "disk_locks": [i for kind, i in data.get("locks", ())
                                       if kind == "disk"]}


class DeleteSnapshots(Operation[DeleteSnapshotsPlan]):
    """DeleteSnapshot and DeleteSnapshotGroup: one step per snapshot."""

    action = "DeleteSnapshots"
    plan_type = DeleteSnapshotsPlan

    @classmethod
    def check(cls, uow: UnitOfWork, snaps: Sequence[Snapshot],
              group_id: str | None) -> DeleteSnapshotsPlan:
        disks: list[str] = []
        for snap in snaps:
            if snap.status == SnapshotStatus.PROGRESSING:
                raise EcsError("IncorrectSnapshotStatus" if group_id else "Operation.Conflict",
                               f"The snapshot {snap.id} is still being taken.", 403)
            # a released disk is locked too: deletes of its last snapshots, which decide
            # when its file goes, must not run side by side
            disk = uow.disks.get(snap.source_disk_id)
            if disk is not None and disk.id not in disks:
                disks.append(disk.id)
        return DeleteSnapshotsPlan(group_id, tuple((s.source_disk_id, s.id) for s in snaps),
                                   tuple(disks))

    @classmethod
    def locks(cls, plan: DeleteSnapshotsPlan) -> list[Lock]:
        return [("disk", d) for d in plan.disk_locks]

    def steps(self) -> list[Step]:
        return [Step(f"delete:{snap_id}", functools.partial(self.delete, disk_id, snap_id))
                for disk_id, snap_id in self.plan.items]

    def delete(self, disk_id: str, snap_id: str) -> None:
        delete_internal_snapshot(self.ctx, self.task.region_id, disk_id, snap_id)
        with self.ctx.uow(readonly=True) as uow:
            disk = uow.disks.get(disk_id)
            others = [s for s in uow.snapshots.find(source_disk_id=disk_id) if s.id != snap_id
                      and (disk_id, s.id) not in self.plan.items]
            storage = self.ctx.storage(uow, self.task.region_id)
        if (disk is None or disk.released) and not others:
            storage.delete(disk_id)  # the last snapshot of a released disk held its file

    def finish(self, uow: UnitOfWork) -> None:
        for disk_id, snap_id in self.plan.items:
            snap = uow.snapshots.get(snap_id)
            if snap is not None:
                uow.snapshots.delete(snap)
            disk = uow.disks.get(disk_id)  # a released disk's row goes with its last snapshot
            if disk is not None and disk.released and \
                    uow.snapshots.count(source_disk_id=disk_id) == 0:
                uow.disks.delete(disk)
        if self.plan.group_id:
            _drop_group(uow, self.plan.group_id)
        self.task.note(deleted=[s for _, s in self.plan.items])
        # a disk that has moved to another volume may have left one with no snapshot now
        moved = [d.id for d in (uow.disks.get(i) for i in dict.fromkeys(
            disk_id for disk_id, _ in self.plan.items)) if d is not None and d.volume]
        collect = schedule_collect(self.ctx, uow, self.task, moved)
        self.follow_ups += [collect] if collect else []


def _journal_deletes(ctx: ServiceContext, uow: UnitOfWork, account_id: str,
                     snaps: Sequence[Snapshot], group_id: str | None) -> Task:
    plan = DeleteSnapshots.check(uow, snaps, group_id)
    return ctx.runner.journal(uow, DeleteSnapshots, plan, account_id=account_id,
                              region_id=snaps[0].region_id, resource_id=group_id or snaps[0].id)


def delete_snapshot(ctx: ServiceContext, account_id: str, snapshot_id: str, *,
                    force: bool = False) -> str | None:
    """DeleteSnapshot: an unknown ID is ignored, as ECS does. Returns the task ID."""
    with ctx.uow() as uow:
        snap = uow.snapshots.get(snapshot_id)
        if snap is None or snap.account_id != account_id:
            return None
        refusal = _in_use(uow, snap, force=force)
        if refusal is not None:
            raise refusal
        task = _journal_deletes(ctx, uow, account_id, [snap], None)
        uow.commit()
    ctx.runner.submit(task, wait_up_to=SHORT_TASK_S)
    return task.id


# The statuses of a custom image that needs its source snapshot (DeleteSnapshot refuses).
IMAGE_HOLDS = ("Creating", "Available")


def _in_use(uow: UnitOfWork, snap: Snapshot, *, force: bool) -> EcsError | None:
    """Why DeleteSnapshot refuses the snapshot, as ECS does: it backs a custom image
    (SnapshotCreatedImage, Force or not), or it created disks not released yet
    (SnapshotCreatedDisk, unless `force`: the disks keep their data)."""
    images = [i.id for i in uow.images.find(source_snapshot_id=snap.id)
              if i.status in IMAGE_HOLDS]
    if images:  # ECS: Force or not; the image's own template needs it no more
        return EcsError("SnapshotCreatedImage",
                        f"The snapshot {snap.id} is the source of the image {images[0]}; "
                        "delete the image first.", 403)
    if not force and uow.disks.count(source_snapshot_id=snap.id, released=False):
        return EcsError("SnapshotCreatedDisk",
                        f"The snapshot {snap.id} has created disks; delete it with Force "
                        "(the disks keep their data).", 403)
    return None


@dataclass(frozen=True)
class MemberOutcome:
    """One member snapshot of DeleteSnapshotGroup: deleted (`code` empty) or kept."""
    snapshot_id: str
    code: str = ""
    message: str = ""


def delete_snapshot_group(ctx: ServiceContext, account_id: str, region_id: str,
                          group_id: str) -> tuple[list[MemberOutcome], str]:
    """DeleteSnapshotGroup: the group and its snapshots, except, as ECS does, a member that
    backs a custom image (SnapshotCreatedImage) or created disks (SnapshotCreatedDisk: the
    group call has no Force): kept as a snapshot of its own, outside any group, for
    DeleteSnapshot later. Returns (one outcome per member, the task ID or "")."""
    with ctx.uow() as uow:
        group = get_group(uow, account_id, group_id, region_id)
        snaps = uow.snapshots.find(group_id=group.id)
        if group.status == SnapshotStatus.PROGRESSING:
            raise EcsError("IncorrectSnapshotGroupStatus",
                           f"The snapshot group {group.id} is still being taken.", 403)
        kept = {s.id: r for s in snaps if (r := _in_use(uow, s, force=False)) is not None}
        outcomes = [MemberOutcome(s.id, kept[s.id].code, kept[s.id].message)
                    if s.id in kept else MemberOutcome(s.id) for s in snaps]
        doomed = [s for s in snaps if s.id not in kept]
        if not doomed:
            _drop_group(uow, group.id)
            uow.commit()
            return outcomes, ""
        task = _journal_deletes(ctx, uow, account_id, doomed, group.id)
        uow.commit()
    ctx.runner.submit(task, wait_up_to=SHORT_TASK_S)
    return outcomes, task.id


def _drop_group(uow: UnitOfWork, group_id: str) -> None:
    """The group's row; the members still in it (kept: in use) become snapshots of their
    own."""
    for snap in uow.snapshots.find(group_id=group_id):
        snap.group_id = None
    group = uow.snapshot_groups.get(group_id)
    if group is not None:
        uow.snapshot_groups.delete(group)


def modify_snapshot(ctx: ServiceContext, account_id: str, snapshot_id: str, *,
                    name: str | None = None, description: str | None = None) -> None:
    if name is None and description is None:
        raise EcsError("NoAttributeToModify", "Nothing to modify was given.", 400)
    rules.check_name(name, code="InvalidSnapshotName.Malformed", field="SnapshotName",
                     allow_dot=False, reserved_prefix="auto")
    rules.check_description(description)
    with ctx.uow() as uow:
        get_snapshot(uow, account_id, snapshot_id).rename(name, description)
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


@dataclass
class SnapshotPage(Page[Row]):
    """A page of DescribeSnapshots (its items the snapshots' rows: every field of a
    Snapshot, as a named tuple), with each snapshot's `Usage` (by ID): image, disk,
    image_disk or none."""

    usage: dict[str, str] = field(default_factory=dict)


def describe_snapshots(ctx: ServiceContext, account_id: str, region_id: str, *,
                       snapshot_ids: Sequence[str] | None = None, disk_id: str | None = None,
                       instance_id: str | None = None, status: str | None = None,
                       name: str | None = None, source_disk_type: str | None = None,
                       tags: dict[str, str] | None = None, page_number: int | None = None,
                       page_size: int | None = None, next_token: str | None = None,
                       max_results: int | None = None, snapshot_type: str | None = None,
                       usage: str | None = None) -> SnapshotPage:
    criteria = Criteria(equals={"account_id": account_id, "region_id": region_id},
                        tags=tags or {})
    if usage and usage not in USAGES:
        raise EcsError("InvalidUsage", f"The Usage \"{usage}\" is not valid (image, disk, "
                       "image_disk or none).", 404)
    if snapshot_type and snapshot_type != "all":
        if snapshot_type not in ("auto", "user", "timer"):
            raise EcsError("InvalidSnapshotType.NotFound",
                           f"The SnapshotType \"{snapshot_type}\" is not valid (auto, user or "
                           "all).", 404)
        criteria.equals["snapshot_type"] = "auto" if snapshot_type == "timer" else snapshot_type
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
        ctx.check_region(uow, region_id)
        users = None
        if usage:
            users = imaged, disked = _users(uow, account_id, None)
            if usage == "none":
                criteria.without["id"] = sorted(imaged | disked)
            else:
                wanted = {"image": imaged - disked, "disk": disked - imaged,
                          "image_disk": imaged & disked}[usage]
                criteria.within["id"] = sorted(
                    wanted & set(criteria.within["id"]) if "id" in criteria.within else wanted)
        page = paginate(uow.snapshots, criteria, page_number=page_number, page_size=page_size,
                        next_token=next_token, max_results=max_results, as_rows=True)
        ids = [s.id for s in page.items]
        if ids and users is None:
            users = _users(uow, account_id, ids)
        return SnapshotPage(**vars(page), usage=_usage(ids, *users) if users else {})


# DescribeSnapshots' Usage: what the snapshot was used for (DeleteSnapshot's rules follow it)
USAGES = ("image", "disk", "image_disk", "none")


def _users(uow: UnitOfWork, account_id: str,
           snapshot_ids: Sequence[str] | None) -> tuple[set[str], set[str]]:
    """(the snapshots that back a custom image being made or available, the snapshots
    that created disks not released yet), among `snapshot_ids` (None: all the account's)."""
    return uow.snapshot_users(account_id, IMAGE_HOLDS, snapshot_ids)


def _usage(snapshot_ids: Sequence[str], imaged: set[str],
           disked: set[str]) -> dict[str, str]:
    return {s: "image_disk" if s in imaged and s in disked else "image" if s in imaged
            else "disk" if s in disked else "none" for s in snapshot_ids}


class GroupMember(Protocol):
    """What a listing of snapshot groups shows of each member snapshot (a Snapshot has
    it; DescribeSnapshotGroups reads only these columns of its members)."""

    @property
    def id(self) -> str: ...
    @property
    def group_id(self) -> str | None: ...
    @property
    def source_disk_id(self) -> str: ...
    @property
    def source_disk_type(self) -> DiskType: ...
    @property
    def progress(self) -> int: ...
    @property
    def status(self) -> SnapshotStatus: ...
    @property
    def created(self) -> datetime: ...


M = TypeVar("M", bound=GroupMember)
MEMBER_COLUMNS = ("id", "group_id", "source_disk_id", "source_disk_type", "progress", "status",
                  "created")


@dataclass
class GroupView:
    group: SnapshotGroup | Row  # (a listing's: the group's row, every field of it)
    snapshots: Sequence[GroupMember]

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
        ctx.check_region(uow, region_id)
        page = paginate(uow.snapshot_groups, criteria, as_rows=True, next_token=next_token,
                        max_results=max_results, token_only=True)
        members: dict[str, list[GroupMember]] = {g.id: [] for g in page.items}
        if members:
            for snap in uow.snapshots.rows(MEMBER_COLUMNS,
                                           Criteria(within={"group_id": list(members)},
                                                    newest_first=False)):
                members[snap.group_id or ""].append(snap)
        views = [GroupView(g, _system_first_of_ordered(members[g.id])) for g in page.items]
        return Page(views, page.total, page.page_number, page.page_size, page.next_token)


def get_snapshot_group(ctx: ServiceContext, account_id: str, group_id: str) -> GroupView:
    with ctx.uow(readonly=True) as uow:
        group = get_group(uow, account_id, group_id)
        return GroupView(group, _system_first(uow.snapshots.find(group_id=group.id)))


def _system_first(snaps: Sequence[M]) -> list[M]:
    system = DiskType.SYSTEM  # (compared by identity: an enum's .value is a slow property)
    return sorted(snaps, key=lambda s: (s.source_disk_type is not system, s.created, s.id))


def _system_first_of_ordered(snaps: list[M]) -> list[M]:
    """`_system_first` of a group's snapshots already in (created, id) order: its system
    disk's (a group has one at most) moved to the front, the rest kept in order (a page's
    100 groups need no sort each)."""
    system = DiskType.SYSTEM
    for n, s in enumerate(snaps):
        if s.source_disk_type is system:
            return [s, *snaps[:n], *snaps[n + 1:]] if n else snaps
    return snaps
