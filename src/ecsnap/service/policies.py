"""Automatic snapshot policies: create, modify, list, delete, apply to disks, cancel; and
what the scheduler (service/scheduler.py) does at each tick: take the snapshots that are
due, and delete the automatic snapshots past their retention.

Time points are hours of the region's time zone (settings `snapshot_policy_timezones`, a
region ID -> IANA name map, else `snapshot_policy_timezone`, UTC by default).

Exactly once: the last time point of a policy taken of a disk is a row (`PolicyRun`) written
in the transaction that journals the snapshot (a `TakeSnapshots` task, the operation of
CreateSnapshot) by one conditional statement, `UnitOfWork.advance_policy_run` (insert, or
move `last_due` forward only where it is earlier): of two schedulers racing, on SQLite
(one writer) or on PostgreSQL (READ COMMITTED: the second waits on the row, then re-checks
it), one journals the snapshot, the other sees it taken. After downtime only the latest
missed time point is taken (one catch-up snapshot per disk), and the log says how many were
missed.

Retention deletes automatic snapshots only (`snapshot_type == "auto"`), never one of a
snapshot group, never one a disk was created from (`Disk.source_snapshot_id`), through the
DeleteSnapshots operation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ecsnap.adapters.store.base import Criteria, UnitOfWork
from ecsnap.domain import errors, ids, rules
from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import (
    HOURS,
    MAX_AUTO_SNAPSHOTS_PER_DISK,
    MAX_POLICIES_PER_REGION,
    WEEKDAYS,
    AutoSnapshotPolicy,
    Disk,
    DiskStatus,
    InstanceStatus,
    PolicyRun,
    Snapshot,
    SnapshotStatus,
    Task,
    utcnow,
)
from ecsnap.service.context import ServiceContext, get_disk
from ecsnap.service.listing import Page, paginate
from ecsnap.service.snapshots import DeleteSnapshots, TakeSnapshots
from ecsnap.service.space import require_free_space

log = logging.getLogger("ecsnap.policies")

AUTO = "auto"
MAX_DISKS_PER_CALL = 1000


# ------------------------------------------------------------------ the user's actions


def get_policy(uow: UnitOfWork, account_id: str, policy_id: str | None,
               region_id: str | None = None) -> AutoSnapshotPolicy:
    if not policy_id:
        raise errors.missing_parameter("AutoSnapshotPolicyId")
    policy = uow.auto_snapshot_policies.get(policy_id)
    if policy is None or policy.account_id != account_id or \
            (region_id and policy.region_id != region_id):
        raise errors.not_found("auto_snapshot_policy", policy_id)
    return policy


def _check_name(name: str | None) -> None:
    rules.check_name(name, code="InvalidAutoSnapshotPolicyName.Malformed",
                     field="AutoSnapshotPolicyName")


def _time_points(values: Sequence[str] | None) -> list[int] | None:
    return rules.check_policy_values(values, HOURS, code="InvalidTimePoints.Malformed",
                                     field="TimePoints")


def _weekdays(values: Sequence[str] | None) -> list[int] | None:
    return rules.check_policy_values(values, WEEKDAYS, code="InvalidRepeatWeekdays.Malformed",
                                     field="RepeatWeekdays")


def create_policy(ctx: ServiceContext, account_id: str, region_id: str, *,
                  time_points: Sequence[str] | None, repeat_weekdays: Sequence[str] | None,
                  retention_days: int | None, name: str = "",
                  tags: dict[str, str] | None = None, now: datetime | None = None) -> str:
    """CreateAutoSnapshotPolicy: returns the policy ID (sp-...)."""
    if time_points is None:
        raise errors.missing_parameter("TimePoints")
    if repeat_weekdays is None:
        raise errors.missing_parameter("RepeatWeekdays")
    if retention_days is None:
        raise errors.missing_parameter("RetentionDays")
    _check_name(name)
    hours, days = _time_points(time_points), _weekdays(repeat_weekdays)
    rules.check_policy_retention(retention_days)
    rules.check_tags(tags or {})
    with ctx.uow() as uow:
        ctx.check_region(uow, region_id)
        if uow.auto_snapshot_policies.count(account_id=account_id,
                                            region_id=region_id) >= MAX_POLICIES_PER_REGION:
            raise EcsError("QuotaExceed.AutoSnapshotPolicy",
                           f"An account has at most {MAX_POLICIES_PER_REGION} automatic "
                           "snapshot policies in a region.", 403)
        policy = AutoSnapshotPolicy(
            id=ids.new_id("auto_snapshot_policy"), account_id=account_id, region_id=region_id,
            name=name, time_points=hours or [], repeat_weekdays=days or [],
            retention_days=retention_days, tags=dict(tags or {}), created=now or utcnow())
        uow.auto_snapshot_policies.add(policy)
        uow.commit()
    return policy.id


def modify_policy(ctx: ServiceContext, account_id: str, region_id: str, policy_id: str, *,
                  name: str | None = None, time_points: Sequence[str] | None = None,
                  repeat_weekdays: Sequence[str] | None = None,
                  retention_days: int | None = None, now: datetime | None = None) -> None:
    """ModifyAutoSnapshotPolicyEx. New time points apply from the next one: the disks'
    last runs move to the newest time point already past, so no snapshot is taken at once."""
    _check_name(name)
    hours, days = _time_points(time_points), _weekdays(repeat_weekdays)
    rules.check_policy_retention(retention_days)
    with ctx.uow() as uow:
        ctx.check_region(uow, region_id)
        policy = get_policy(uow, account_id, policy_id, region_id)
        if name is not None:
            policy.name = name
        if hours is not None:
            policy.time_points = hours
        if days is not None:
            policy.repeat_weekdays = days
        if retention_days is not None:
            policy.retention_days = retention_days
        if hours is not None or days is not None:
            due = last_due_utc(ctx, policy, now or utcnow())
            for run in uow.policy_runs.find(policy_id=policy.id):
                if due is not None and run.last_due < due:  # never moves one back
                    uow.advance_policy_run(policy.id, run.disk_id, due)
        uow.commit()


@dataclass
class PolicyView:
    policy: AutoSnapshotPolicy
    disk_nums: int


def describe_policies(ctx: ServiceContext, account_id: str, region_id: str, *,
                      policy_ids: Sequence[str] | None = None, name: str | None = None,
                      tags: dict[str, str] | None = None, page_number: int | None = None,
                      page_size: int | None = None) -> Page[PolicyView]:
    """DescribeAutoSnapshotPolicyEx: newest first, PageNumber/PageSize (as ECS)."""
    criteria = Criteria(equals={"account_id": account_id, "region_id": region_id},
                        tags=tags or {})
    if policy_ids:
        criteria.within["id"] = list(policy_ids)
    if name:
        criteria.equals["name"] = name
    with ctx.uow(readonly=True) as uow:
        ctx.check_region(uow, region_id)
        page = paginate(uow.auto_snapshot_policies, criteria, page_number=page_number,
                        page_size=page_size)
        counts = {p.id: 0 for p in page.items}
        if counts:
            for disk in uow.disks.find(Criteria(
                    equals={"released": False},
                    within={"auto_snapshot_policy_id": list(counts)})):
                counts[disk.auto_snapshot_policy_id] += 1
        views = [PolicyView(p, counts[p.id]) for p in page.items]
    return Page(views, page.total, page.page_number, page.page_size, page.next_token)


def delete_policy(ctx: ServiceContext, account_id: str, region_id: str,
                  policy_id: str) -> list[str]:
    """DeleteAutoSnapshotPolicy: the disks it was applied to are left without a policy
    (their automatic snapshots stay, until deleted by hand). Returns those disks' IDs."""
    with ctx.uow() as uow:
        ctx.check_region(uow, region_id)
        policy = get_policy(uow, account_id, policy_id, region_id)
        detached = []
        for disk in uow.disks.find(auto_snapshot_policy_id=policy.id):
            disk.auto_snapshot_policy_id = ""
            detached.append(disk.id)
        for run in uow.policy_runs.find(policy_id=policy.id):
            uow.policy_runs.delete(run)
        uow.auto_snapshot_policies.delete(policy)
        uow.commit()
    return detached


def _disk_ids(disk_ids: Sequence[str] | None) -> list[str]:
    if not disk_ids:
        raise errors.missing_parameter("DiskIds")
    if len(disk_ids) > MAX_DISKS_PER_CALL or any(not isinstance(d, str) or not d
                                                  for d in disk_ids):
        # ECS's code for it (CancelAutoSnapshotPolicy's documented errors)
        raise EcsError("ParameterInvalid", "The specified DiskIds are invalid: a JSON array "
                       f"of 1 to {MAX_DISKS_PER_CALL} disk IDs.", 403)
    return list(dict.fromkeys(disk_ids))


def apply_policy(ctx: ServiceContext, account_id: str, region_id: str, policy_id: str,
                 disk_ids: Sequence[str] | None, *, now: datetime | None = None) -> None:
    """ApplyAutoSnapshotPolicy: the policy replaces any other of these disks. The first
    snapshot is at the policy's next time point."""
    wanted = _disk_ids(disk_ids)
    with ctx.uow() as uow:
        ctx.check_region(uow, region_id)
        policy = get_policy(uow, account_id, policy_id, region_id)
        disks = [get_disk(uow, account_id, d, region_id) for d in wanted]
        due = last_due_utc(ctx, policy, now or utcnow())
        for disk in disks:
            disk.auto_snapshot_policy_id = policy.id
            if due is not None:  # the time point already past is not taken
                uow.advance_policy_run(policy.id, disk.id, due)
        uow.commit()


def cancel_policy(ctx: ServiceContext, account_id: str, region_id: str,
                  disk_ids: Sequence[str] | None, *, policy_id: str | None = None) -> None:
    """CancelAutoSnapshotPolicy: these disks have no policy any more (given a policy ID,
    it must exist; disks that have another policy keep it)."""
    wanted = _disk_ids(disk_ids)
    with ctx.uow() as uow:
        ctx.check_region(uow, region_id)
        if policy_id:
            get_policy(uow, account_id, policy_id, region_id)
        for disk in [get_disk(uow, account_id, d, region_id) for d in wanted]:
            if not policy_id or disk.auto_snapshot_policy_id == policy_id:
                disk.auto_snapshot_policy_id = ""
        uow.commit()


def policy_names(ctx: ServiceContext, policy_ids: set[str]) -> dict[str, str]:
    """The names of these policies (the console's disk list)."""
    ids_ = [p for p in policy_ids if p]
    if not ids_:
        return {}
    with ctx.uow(readonly=True) as uow:
        return {p.id: p.name for p in uow.auto_snapshot_policies.find(
            Criteria(within={"id": ids_}))}


# ------------------------------------------------------------------ time


def region_timezone(ctx: ServiceContext, region_id: str) -> ZoneInfo:
    s = ctx.settings
    name = (s.snapshot_policy_timezones or {}).get(region_id) or s.snapshot_policy_timezone
    try:
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        log.error("time zone %r of region %s is unknown: its policies run in UTC", name,
                  region_id)
        return ZoneInfo("UTC")


def _local(now_utc: datetime, tz: ZoneInfo) -> datetime:
    return now_utc.replace(tzinfo=UTC).astimezone(tz).replace(tzinfo=None)


def _utc(local: datetime, tz: ZoneInfo) -> datetime:
    return local.replace(tzinfo=tz).astimezone(UTC).replace(tzinfo=None)


def last_due_utc(ctx: ServiceContext, policy: AutoSnapshotPolicy,
                 now: datetime) -> datetime | None:
    """The policy's latest time point at or before `now` (UTC, naive), in UTC."""
    tz = region_timezone(ctx, policy.region_id)
    due = policy.last_due(_local(now, tz))
    return None if due is None else _utc(due, tz)


# ------------------------------------------------------------------ the scheduler's tick


@dataclass
class TickReport:
    taken: list[str] = field(default_factory=list)  # snapshot IDs journaled
    caught_up: list[str] = field(default_factory=list)  # disks that had missed time points
    expired: list[str] = field(default_factory=list)  # snapshot IDs whose deletion began
    skipped: list[str] = field(default_factory=list)  # disks busy or refused: next tick


def run_due(ctx: ServiceContext, now: datetime | None = None) -> TickReport:
    """One pass of the scheduler at `now` (UTC, naive; the injected clock's time)."""
    now = now or utcnow()
    report = TickReport()
    with ctx.uow(readonly=True) as uow:
        policies = uow.auto_snapshot_policies.find(Criteria(newest_first=False))
        work: list[tuple[AutoSnapshotPolicy, datetime, list[str]]] = []
        for policy in policies:
            due = last_due_utc(ctx, policy, now)
            if due is None:
                continue
            runs = {r.disk_id: r.last_due for r in uow.policy_runs.find(policy_id=policy.id)}
            disks = [d.id for d in uow.disks.find(
                Criteria(equals={"auto_snapshot_policy_id": policy.id, "released": False},
                         newest_first=False)) if runs.get(d.id, datetime.min) < due]
            if disks:
                work.append((policy, due, disks))
    for policy, due, disk_ids in work:
        for disk_id in disk_ids:
            task = _take(ctx, policy.id, disk_id, due, report)
            if task is not None:
                ctx.runner.submit(task)
    expire(ctx, now, report)
    return report


def _auto_name(uow: UnitOfWork, disk: Disk, local_day: str) -> str:
    """ECS's names of automatic snapshots: auto_YYYYMMDD_N, N counting that disk's automatic
    snapshots of the day (the region's day) from 1."""
    taken = uow.snapshots.count(Criteria(
        equals={"source_disk_id": disk.id, "snapshot_type": AUTO},
        wildcard={"name": f"auto_{local_day}_*"}))
    return f"auto_{local_day}_{taken + 1}"


def _take(ctx: ServiceContext, policy_id: str, disk_id: str, due: datetime,
          report: TickReport) -> Task | None:
    """Journal the snapshot of `disk_id` for the time point `due`, and record it as the
    pair's last run, in one transaction; None when another scheduler did, or when the disk
    cannot be snapshotted now (busy: tried again at the next tick)."""
    key = PolicyRun.key(policy_id, disk_id)
    try:
        with ctx.uow() as uow:
            policy = uow.auto_snapshot_policies.get(policy_id)
            disk = uow.disks.get(disk_id)
            if policy is None or disk is None or disk.released or \
                    disk.auto_snapshot_policy_id != policy_id:
                return None  # cancelled or deleted meanwhile
            run = uow.policy_runs.get(key)
            if run is not None and run.last_due >= due:
                return None  # taken already (another scheduler, or before a restart)
            last_due = run.last_due if run is not None else None
            busy = _busy(uow, disk)
            if busy:
                report.skipped.append(disk_id)
                log.info("policy %s: disk %s is %s; its snapshot waits for the next tick",
                         policy_id, disk_id, busy)
                return None
            inst = uow.instances.get(disk.instance_id) if disk.instance_id else None
            plan = TakeSnapshots.check(ctx, uow, disk.account_id, inst, [disk], group=False)
            require_free_space(ctx, uow, disk.region_id, [disk.id])
            [(_, snap_id)] = plan.items
            # the claim of the time point: atomic on every store (a conditional upsert),
            # so of two schedulers racing (two serve processes on PostgreSQL, READ
            # COMMITTED) one journals it; the other waits for its commit and sees it taken
            if not uow.advance_policy_run(policy_id, disk_id, due, snap_id):
                return None
            tz = region_timezone(ctx, policy.region_id)
            local_due = _local(due, tz)
            uow.snapshots.add(Snapshot(
                id=snap_id, account_id=disk.account_id, region_id=disk.region_id,
                source_disk_id=disk.id, source_disk_type=disk.type,
                source_disk_size=disk.size_gib, instance_id=disk.instance_id or "",
                name=_auto_name(uow, disk, local_due.strftime("%Y%m%d")),
                retention_days=policy.retention_days if policy.retention_days > 0 else None,
                snapshot_type=AUTO, policy_id=policy.id))
            missed = _missed(policy, last_due, local_due, tz)
            task = ctx.runner.journal(uow, TakeSnapshots, plan, account_id=disk.account_id,
                                      region_id=disk.region_id, resource_id=snap_id)
            uow.commit()
    except EcsError as exc:
        if exc.code == "Operation.Conflict":  # a task took the disk meanwhile
            report.skipped.append(disk_id)
            return None
        # refused (a quota, no free space): this time point is not taken; say so
        log.warning("policy %s: no automatic snapshot of disk %s at %s: %s %s", policy_id,
                    disk_id, due.isoformat(), exc.code, exc.message)
        _skip_time_point(ctx, policy_id, disk_id, due)
        report.skipped.append(disk_id)
        return None
    report.taken.append(snap_id)
    if missed:
        report.caught_up.append(disk_id)
        log.warning("policy %s: disk %s missed %s time point(s) while ecsnap was down; one "
                    "catch-up snapshot %s for the latest (%s UTC)", policy_id, disk_id,
                    missed, snap_id, due.isoformat())
    return task


def _busy(uow: UnitOfWork, disk: Disk) -> str:
    if disk.status not in (DiskStatus.IN_USE, DiskStatus.AVAILABLE):
        return disk.status.value
    if disk.lock_task_id:
        return f"locked by {disk.lock_task_id}"
    if disk.instance_id:
        inst = uow.instances.get(disk.instance_id)
        if inst is not None and (inst.lock_task_id or inst.status not in (
                InstanceStatus.RUNNING, InstanceStatus.STOPPED)):
            return f"on instance {inst.id} ({inst.status.value})"
    return ""


def _missed(policy: AutoSnapshotPolicy, last_due: datetime | None, local_due: datetime,
            tz: ZoneInfo) -> int:
    """How many time points after the last run and before `local_due` were not taken."""
    if last_due is None:
        return 0
    missed, at = 0, policy.previous_due(local_due)
    while at is not None and _utc(at, tz) > last_due and missed < 10_000:
        missed += 1
        at = policy.previous_due(at)
    return missed


def _skip_time_point(ctx: ServiceContext, policy_id: str, disk_id: str,
                     due: datetime) -> None:
    with ctx.uow() as uow:
        uow.advance_policy_run(policy_id, disk_id, due)
        uow.commit()


# ------------------------------------------------------------------ retention


def needed_by_disks(uow: UnitOfWork, snapshot_ids: Sequence[str]) -> set[str]:
    """The snapshots a disk was created from (`Disk.source_snapshot_id`), which retention
    must keep. The hook for any other user of a snapshot (a custom image made from one)."""
    if not snapshot_ids:
        return set()
    return {d.source_snapshot_id for d in uow.disks.find(Criteria(
        equals={"released": False}, within={"source_snapshot_id": list(snapshot_ids)}))}


def expirable(snap: Snapshot, now: datetime) -> bool:
    """Automatic, finished, in no group, and past its retention."""
    return snap.snapshot_type == AUTO and snap.group_id is None and \
        snap.status == SnapshotStatus.ACCOMPLISHED and bool(snap.retention_days) and \
        snap.retention_days is not None and snap.retention_days > 0 and \
        (now - snap.created).total_seconds() >= snap.retention_days * 86400


def expire(ctx: ServiceContext, now: datetime, report: TickReport | None = None) -> list[str]:
    """Delete the automatic snapshots past their retention, and a disk's oldest automatic
    ones beyond ECS's 1,000; never a manual one, one of a group, or one a disk needs."""
    report = report if report is not None else TickReport()
    with ctx.uow(readonly=True) as uow:
        autos = uow.snapshots.find(Criteria(equals={"snapshot_type": AUTO},
                                            newest_first=False))
        doomed = [s for s in autos if expirable(s, now)]
        per_disk: dict[str, list[Snapshot]] = {}
        for s in autos:
            if s.status == SnapshotStatus.ACCOMPLISHED and s.group_id is None:
                per_disk.setdefault(s.source_disk_id, []).append(s)
        for snaps in per_disk.values():
            extra = len(snaps) - MAX_AUTO_SNAPSHOTS_PER_DISK
            doomed += [s for s in snaps[:max(extra, 0)] if s not in doomed]
        keep = needed_by_disks(uow, [s.id for s in doomed])
        doomed = [s for s in doomed if s.id not in keep]
    for snap in doomed:
        _delete(ctx, snap.id, report)
    return report.expired


def _delete(ctx: ServiceContext, snap_id: str, report: TickReport) -> None:
    try:
        with ctx.uow() as uow:
            snap = uow.snapshots.get(snap_id)
            if snap is None or snap.snapshot_type != AUTO or snap.group_id is not None or \
                    needed_by_disks(uow, [snap.id]):
                return  # checked again in the transaction that journals the deletion
            plan = DeleteSnapshots.check(uow, [snap], None)
            task = ctx.runner.journal(uow, DeleteSnapshots, plan, account_id=snap.account_id,
                                      region_id=snap.region_id, resource_id=snap.id)
            uow.commit()
    except EcsError as exc:  # the disk is busy: the next tick tries again
        log.info("retention: snapshot %s not deleted now: %s", snap_id, exc.code)
        return
    report.expired.append(snap_id)
    log.info("retention: automatic snapshot %s is past its retention; deleting it", snap_id)
    ctx.runner.submit(task)

