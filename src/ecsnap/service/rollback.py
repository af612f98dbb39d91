"""Rollback: ResetDisks / ResetDisk, its preview, and the safety snapshot that undoes it.

`reset_disks` checks the whole request first and reports every failed check at once. Then,
in one transaction, it locks the instance and the disks and journals a task whose steps are:

1. `safety`   take a safety snapshot of every disk it will overwrite (one snapshot group,
              tagged so users recognise it); with SafetySnapshot=false the snapshots are
              still taken, as the undo log that makes the rollback all-or-nothing, and
              dropped at the end;
2. `revert`   revert every disk to its snapshot, side by side (idempotent: after a crash
              it is simply run again);
3. `drop_safety` (SafetySnapshot=false only);
4. `start`, `health_gate` (AutoStartInstance only): start the VM, wait for its agent.

If a revert fails, the disks are restored from the safety snapshots and the task fails.
After a crash, recovery drives the task forward once every safety snapshot exists (all
disks end at the snapshot's data), and undoes it otherwise (no disk was touched yet).
Rolling back never deletes a snapshot.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from ecsnap.adapters.storage.base import StorageBackend
from ecsnap.adapters.store.base import UnitOfWork
from ecsnap.domain import errors, rules
from ecsnap.domain.errors import CheckFailure, EcsError
from ecsnap.domain.model import (
    DiskType,
    GroupPurpose,
    InstanceStatus,
    SnapshotStatus,
    StoppedMode,
    Task,
    iso,
    utcnow,
)
from ecsnap.service.context import ServiceContext, attached_disks, get_region
from ecsnap.service.snapshots import GroupSpec, journal_snapshots
from ecsnap.service.tasks import SHORT_TASK_S, TaskHandler, handler

SAFETY_TAG = "ecsnap:safety-for"


@dataclass
class DiskPreview:
    disk_id: str
    snapshot_id: str
    disk_type: str
    failures: list[CheckFailure] = field(default_factory=list)
    bytes_written_since: int | None = None

    @property
    def ok(self) -> bool:
        return not self.failures


@dataclass
class ResetPreview:
    instance_id: str
    instance_status: str
    stopped_mode: str
    instance_failures: list[CheckFailure]
    disks: list[DiskPreview]

    @property
    def failures(self) -> list[CheckFailure]:
        return [*self.instance_failures, *(f for d in self.disks for f in d.failures)]

    @property
    def stop_charging_warning(self) -> str:
        if self.stopped_mode != StoppedMode.STOP_CHARGING:
            return ""
        return ("The instance was stopped in StopCharging mode: its vCPUs and memory were "
                "released, so starting it after the rollback may fail for lack of capacity "
                "(OperationDenied.NoStock).")


@dataclass
class ResetResult:
    task_id: str
    instance_id: str
    safety_group_id: str | None
    items: list[tuple[str, str]]


def _targets(uow: UnitOfWork, account_id: str, items: Sequence[tuple[str, str]],
             ) -> list[rules.ResetTarget]:
    targets = []
    for disk_id, snap_id in items:
        disk = uow.disks.get(disk_id) if disk_id else None
        snap = uow.snapshots.get(snap_id) if snap_id else None
        if disk is not None and disk.account_id != account_id:
            disk = None
        if snap is not None and snap.account_id != account_id:
            snap = None
        targets.append(rules.ResetTarget(disk_id, snap_id, disk, snap))
    return targets


def _instance_of(uow: UnitOfWork, account_id: str, targets: Sequence[rules.ResetTarget]) -> str:
    owners = {t.snapshot.instance_id for t in targets if t.snapshot and t.snapshot.instance_id}
    if not owners:
        owners = {t.disk.instance_id for t in targets if t.disk and t.disk.instance_id}
    if len(owners) > 1:
        raise errors.invalid_parameter("Disk", "All disks of one rollback must belong to one "
                                       "instance.")
    if not owners:
        failures = [f for t in targets for f in (rules.check_snapshot_exists(t),
                                                 rules.check_disk_exists(t)) if f]
        rules.require(failures or [CheckFailure("disk_exists", "InvalidDiskId.NotFound",
                                                "No disk of the request is attached.", 404)])
    instance_id = owners.pop()
    inst = uow.instances.get(instance_id)
    if inst is None or inst.account_id != account_id:
        raise errors.not_found("instance", instance_id)
    return instance_id


def _check(uow: UnitOfWork, account_id: str, region_id: str | None,
           items: Sequence[tuple[str, str]]) -> tuple[ResetPreview, list[rules.ResetTarget]]:
    if not items:
        raise errors.missing_parameter("Disk.1.DiskId")
    for disk_id, snap_id in items:
        if not disk_id:
            raise errors.missing_parameter("Disk.N.DiskId")
        if not snap_id:
            raise errors.missing_parameter("Disk.N.SnapshotId")
    if region_id is not None:
        get_region(uow, region_id)
    targets = _targets(uow, account_id, items)
    instance_id = _instance_of(uow, account_id, targets)
    inst = uow.instances.get(instance_id)
    assert inst is not None
    system = next((d.id for d in attached_disks(uow, inst.id) if d.type == DiskType.SYSTEM), None)
    failures = rules.check_reset(inst, targets, system_disk_id=system)
    previews = [DiskPreview(t.disk_id, t.snapshot_id,
                            (t.snapshot.source_disk_type.value if t.snapshot else
                             t.disk.type.value if t.disk else ""),
                            [f for f in failures if f.disk_id == t.disk_id]) for t in targets]
    preview = ResetPreview(inst.id, inst.status.value, inst.stopped_mode.value,
                           [f for f in failures if f.disk_id is None], previews)
    return preview, targets


def preview_reset_disks(ctx: ServiceContext, account_id: str, region_id: str | None,
                        items: Sequence[tuple[str, str]]) -> ResetPreview:
    """Every failed check per disk and the bytes each disk has had written since its
    snapshot (what a rollback would lose). Changes nothing."""
    with ctx.uow() as uow:
        preview, targets = _check(uow, account_id, region_id, items)
        inst = uow.instances.get(preview.instance_id)
        assert inst is not None
        storage = ctx.storage(uow, inst.region_id)
    for disk_preview, target in zip(preview.disks, targets, strict=True):
        if target.disk is not None and target.snapshot is not None and \
                not target.disk.released and target.snapshot.source_disk_id == target.disk_id:
            try:
                disk_preview.bytes_written_since = storage.bytes_written_since(
                    target.disk_id, target.snapshot_id)
            except Exception:  # a preview never fails for want of a figure
                disk_preview.bytes_written_since = None
    return preview


def preview_group_rollback(ctx: ServiceContext, account_id: str, group_id: str,
                           disk_ids: Sequence[str] | None = None) -> ResetPreview:
    """The preview of rolling back (some of) the disks of an instance snapshot."""
    from ecsnap.service.snapshots import get_snapshot_group

    view = get_snapshot_group(ctx, account_id, group_id)
    items = [(s.source_disk_id, s.id) for s in view.snapshots
             if disk_ids is None or s.source_disk_id in disk_ids]
    return preview_reset_disks(ctx, account_id, None, items)


def reset_disks(ctx: ServiceContext, account_id: str, region_id: str | None,
                items: Sequence[tuple[str, str]], *, auto_start: bool = False,
                safety_snapshot: bool = True, dry_run: bool = False) -> ResetResult:
    """ResetDisks: roll the disks back to their snapshots, all or none."""
    with ctx.uow() as uow:
        preview, targets = _check(uow, account_id, region_id, items)
        rules.require(preview.failures)
        if dry_run:
            raise errors.dry_run_passed()
        inst = uow.instances.get(preview.instance_id)
        assert inst is not None
        disks = [t.disk for t in targets if t.disk is not None]
        source_group = next((t.snapshot.group_id for t in targets
                             if t.snapshot and t.snapshot.group_id), None)
        stamp = utcnow().strftime("%Y%m%d%H%M%S")
        spec = GroupSpec(
            name=f"ecsnap-safety-{stamp}",
            description=f"Safety snapshot taken by ecsnap before rolling back {inst.id} "
                        f"from {source_group or 'its snapshots'} at {iso(utcnow())}. "
                        "Roll back to this group to undo that rollback.",
            purpose=GroupPurpose.SAFETY,
            tags={SAFETY_TAG: source_group or ",".join(t.snapshot_id for t in targets)})
        task, safety_id, _ = journal_snapshots(uow, account_id, inst.id, disks, spec)
        # the safety snapshots become the first step of the rollback task
        pairs = [(t.disk_id, t.snapshot_id) for t in targets]
        steps = ["safety", "revert"]
        if not safety_snapshot:
            steps.append("drop_safety")
        if auto_start:
            steps += ["start", "health_gate"]
        task.action, task.resource_id = "ResetDisks", inst.id
        task.plan = {**task.plan, "steps": steps, "pairs": [list(p) for p in pairs],
                     "safety_group_id": safety_id, "keep_safety": safety_snapshot,
                     "auto_start": auto_start, "stopped_mode": inst.stopped_mode.value}
        uow.commit()
    # with AutoStartInstance the VM boots: that goes on in the background
    ctx.runner.submit(task.id, wait_up_to=0.0 if auto_start else SHORT_TASK_S)
    return ResetResult(task.id, preview.instance_id, safety_id if safety_snapshot else None,
                       pairs)


def reset_disk(ctx: ServiceContext, account_id: str, disk_id: str, snapshot_id: str, *,
               auto_start: bool = False, safety_snapshot: bool = True) -> ResetResult:
    """ResetDisk: one disk back to one of its own snapshots."""
    return reset_disks(ctx, account_id, None, [(disk_id, snapshot_id)], auto_start=auto_start,
                       safety_snapshot=safety_snapshot)


@handler
class ResetDisksTask(TaskHandler):
    action = "ResetDisks"

    def _storage(self, ctx: ServiceContext, task: Task) -> StorageBackend:
        with ctx.uow(readonly=True) as uow:
            return ctx.storage(uow, task.region_id)

    def step_safety(self, ctx: ServiceContext, task: Task, _: str) -> None:
        if ctx.compute.state(task.resource_id).running:
            raise errors.incorrect_instance_status(task.resource_id, "Running", "Stopped")
        self._storage(ctx, task).create_snapshots([(d, s) for d, s in task.plan["items"]])
        with ctx.uow() as uow:
            group = uow.snapshot_groups.get(task.plan["safety_group_id"])
            assert group is not None
            group.status = SnapshotStatus.ACCOMPLISHED
            for _, snap_id in task.plan["items"]:
                snap = uow.snapshots.get(snap_id)
                assert snap is not None
                snap.status, snap.progress = SnapshotStatus.ACCOMPLISHED, 100
            uow.commit()

    def step_revert(self, ctx: ServiceContext, task: Task, _: str) -> None:
        self._storage(ctx, task).revert_many([(d, s) for d, s in task.plan["pairs"]])

    def step_drop_safety(self, ctx: ServiceContext, task: Task, _: str) -> None:
        storage = self._storage(ctx, task)
        for disk_id, snap_id in task.plan["items"]:
            storage.delete_snapshot(disk_id, snap_id)

    def step_start(self, ctx: ServiceContext, task: Task, _: str) -> None:
        from ecsnap.service.instances import boot

        refused: EcsError | None = None
        with ctx.uow() as uow:
            inst = uow.instances.get(task.resource_id)
            assert inst is not None
            if not inst.holds_reservation():
                region = get_region(uow, inst.region_id)
                others = [i for i in uow.instances.find(region_id=inst.region_id)
                          if i.id != inst.id]
                itype = region.instance_type(inst.instance_type)
                try:
                    rules.check_capacity(region, others, [itype] if itype else [])
                except EcsError as exc:
                    refused = exc
            if refused is None:
                inst.status = InstanceStatus.STARTING
                uow.commit()
        if refused is not None:
            self._note(ctx, task, start_error={"Code": refused.code, "Message": refused.message})
            return
        boot(ctx, task.resource_id)

    def step_health_gate(self, ctx: ServiceContext, task: Task, _: str) -> None:
        if task.result.get("start_error") or not ctx.compute.state(task.resource_id).running:
            return
        timeout = ctx.settings.health_gate_timeout_s
        deadline = time.monotonic() + timeout
        started = time.monotonic()
        healthy = False
        while time.monotonic() < deadline and not healthy:
            left = deadline - time.monotonic()
            healthy = ctx.compute.guest_ping(task.resource_id, timeout=min(5.0, max(0.5, left)))
        elapsed = round(time.monotonic() - started, 1)
        if healthy:
            self._note(ctx, task, health={"GuestAgent": "Ok", "Seconds": elapsed})
        else:
            undo = task.plan["safety_group_id"] if task.plan["keep_safety"] else None
            self._note(ctx, task, health={
                "GuestAgent": "NoResponse", "Seconds": elapsed,
                "Message": f"The guest agent did not answer within {timeout:.0f} s after the "
                           "rollback." + (f" Roll back to the safety snapshot group {undo} to "
                                          "undo the rollback." if undo else "")})

    def _note(self, ctx: ServiceContext, task: Task, **values: object) -> None:
        with ctx.uow() as uow:
            fresh = uow.tasks.get(task.id)
            assert fresh is not None
            fresh.result.update(values)
            uow.commit()
        task.result.update(values)

    def finish(self, ctx: ServiceContext, uow: UnitOfWork, task: Task) -> None:
        if not task.plan["keep_safety"]:
            for _, snap_id in task.plan["items"]:
                snap = uow.snapshots.get(snap_id)
                if snap is not None:
                    uow.snapshots.delete(snap)
            group = uow.snapshot_groups.get(task.plan["safety_group_id"])
            if group is not None:
                uow.snapshot_groups.delete(group)
        if task.plan["auto_start"] and not task.result.get("start_error"):
            inst = uow.instances.get(task.resource_id)
            assert inst is not None
            inst.status, inst.started = InstanceStatus.RUNNING, utcnow()
        task.result["SafetySnapshotGroupId"] = task.plan["safety_group_id"] \
            if task.plan["keep_safety"] else ""

    def compensate(self, ctx: ServiceContext, task: Task, error: BaseException) -> None:
        storage = self._storage(ctx, task)
        if "safety" in task.done:
            if any(s.startswith("start") for s in task.done) or \
                    ctx.compute.state(task.resource_id).running:
                ctx.compute.stop(task.resource_id, force=True)
            # back to the state before the rollback
            storage.revert_many([(d, s) for d, s in task.plan["items"]])
        if "safety" not in task.done or not task.plan["keep_safety"]:
            for disk_id, snap_id in task.plan["items"]:
                storage.delete_snapshot(disk_id, snap_id)

    def failed(self, ctx: ServiceContext, uow: UnitOfWork, task: Task) -> None:
        inst = uow.instances.get(task.resource_id)
        if inst is not None and inst.status == InstanceStatus.STARTING:
            inst.status = InstanceStatus.STOPPED
        keep = "safety" in task.done and task.plan["keep_safety"]
        for _, snap_id in task.plan["items"]:
            snap = uow.snapshots.get(snap_id)
            if snap is not None and not keep:
                uow.snapshots.delete(snap)
        group = uow.snapshot_groups.get(task.plan["safety_group_id"])
        if group is not None and not keep:
            group.status = SnapshotStatus.FAILED

    def recover_forward(self, ctx: ServiceContext, task: Task) -> bool:
        # No disk is reverted before the journal says every safety snapshot exists: before
        # that, undoing is safe (and drops the partial safety snapshots); after it, only
        # going forward restores "all disks at the snapshot" for the whole request.
        return "safety" in task.done
