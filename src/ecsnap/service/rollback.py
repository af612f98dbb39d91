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

On a backend that reverts by clone and swap (`CloneRevert`: Ceph RBD; service/volumes.py)
step 2 is two steps, and no disk's data is ever rewritten:

2a. `clone`   clone each target snapshot into a new volume of its disk, `{disk}.{task}`,
              side by side (O(1): no data copied; idempotent: a clone a crash left is made
              again);
2b. `swap`    one transaction switches every disk to its new volume: all disks or none
              (idempotent). The safety snapshots are on the old volumes, which are kept
              as they were: undoing through the safety group is a clone again. With
              SafetySnapshot=false no safety snapshot is taken at all (`items` is
              empty): the old volumes are the undo log.

Before `swap` undoing removes the clones; after it, the disks are switched back to their
old volumes (never modified) and the clones removed. Recovery goes forward once the safety
snapshots exist, as above: `clone` is redone, `swap` is one transaction. Once the task is
finished, a CollectVolumes task flattens deep clone chains and removes the volumes nothing
needs any more.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from ecsnap.adapters.storage.base import StorageBackend
from ecsnap.adapters.store.base import UnitOfWork
from ecsnap.domain import errors, ids, rules
from ecsnap.domain.errors import CheckFailure, EcsError
from ecsnap.domain.model import (
    GIB,
    DiskType,
    GroupPurpose,
    InstanceStatus,
    StoppedMode,
    iso,
    utcnow,
)
from ecsnap.service import inspect, placement, quotas, snapshot_records, volumes
from ecsnap.service.context import ServiceContext, attached_disks, get_group, get_region
from ecsnap.service.operation import Lock, Operation, Pair, Plan, Resume, Step
from ecsnap.service.snapshot_records import GroupSpec
from ecsnap.service.space import require_free_space
from ecsnap.service.tasks import SHORT_TASK_S
from ecsnap.service.vms import boot, vm_running

SAFETY_TAG = "ecsnap:safety-for"


@dataclass
class DiskPreview:
    disk_id: str
    snapshot_id: str
    disk_type: str
    failures: list[CheckFailure] = field(default_factory=list)
    bytes_written_since: int | None = None
    files: inspect.FileChanges | None = None  # the file level, when asked for

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
    if inst is None:  # deleted meanwhile (PostgreSQL: each statement sees the last commits)
        raise errors.not_found("instance", instance_id)
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
                        items: Sequence[tuple[str, str]], *,
                        file_changes: int | None = None) -> ResetPreview:
    """Every failed check per disk and the bytes each disk has had written since its
    snapshot (what a rollback would lose); with `file_changes` (how many paths to list),
    the files it would change too (service.inspect). Changes nothing."""
    with ctx.uow() as uow:
        preview, targets = _check(uow, account_id, region_id, items)
        inst = uow.instances.load(preview.instance_id)
        storage = ctx.storage(uow, inst.region_id)
    for disk_preview, target in zip(preview.disks, targets, strict=True):
        if target.disk is not None and target.snapshot is not None and \
                not target.disk.released and target.snapshot.source_disk_id == target.disk_id:
            try:
                disk_preview.bytes_written_since = storage.bytes_written_since(
                    target.disk.current_volume, target.snapshot_id)
            except Exception:  # a preview never fails for want of a figure
                disk_preview.bytes_written_since = None
    if file_changes is not None:
        inspect.add_file_changes(ctx, storage, preview.instance_status, preview.disks,
                                 targets, limit=file_changes)
    return preview


def preview_group_rollback(ctx: ServiceContext, account_id: str, group_id: str,
                           disk_ids: Sequence[str] | None = None, *,
                           file_changes: int | None = None) -> ResetPreview:
    """The preview of rolling back (some of) the disks of an instance snapshot."""
    with ctx.uow(readonly=True) as uow:
        group = get_group(uow, account_id, group_id)
        snaps = sorted(uow.snapshots.find(group_id=group.id),
                       key=lambda s: (s.source_disk_type.value != "system", s.created, s.id))
    items = [(s.source_disk_id, s.id) for s in snaps
             if disk_ids is None or s.source_disk_id in disk_ids]
    return preview_reset_disks(ctx, account_id, None, items, file_changes=file_changes)


@dataclass(frozen=True)
class ResetDisksPlan(Plan):
    instance_id: str
    pairs: tuple[Pair, ...]  # (disk, the snapshot to roll it back to)
    items: tuple[Pair, ...]  # (disk, its safety snapshot, taken first)
    safety_group_id: str
    keep_safety: bool
    auto_start: bool
    # clone and swap (a CloneRevert backend): (disk, its volume now, the new volume the
    # snapshot is cloned into); empty: the disks are reverted in place
    volumes: tuple[tuple[str, str, str], ...] = ()


class ResetDisks(Operation[ResetDisksPlan]):
    """ResetDisks / ResetDisk (module docstring: the steps and why they are safe)."""

    action = "ResetDisks"
    plan_type = ResetDisksPlan

    @classmethod
    def check(cls, ctx: ServiceContext, uow: UnitOfWork, account_id: str,
              region_id: str | None, items: Sequence[tuple[str, str]], *, keep_safety: bool,
              auto_start: bool, task_id: str = "") -> ResetDisksPlan:
        """The plan; `task_id` (the task it will be journaled as) names the new volumes
        on a backend that reverts by clone and swap."""
        preview, targets = _check(uow, account_id, region_id, items)
        rules.require(preview.failures)
        disks = [t.disk for t in targets if t.disk is not None]
        # kept safety snapshots count against the quota; the undo log of SafetySnapshot=false
        # (dropped at the end) does not
        used = quotas.check(ctx, uow, account_id, {"snapshots": len(disks) if keep_safety else 0})
        snapshot_records.check_snapshot_quota(uow, disks, used.get("snapshots"))
        region = uow.instances.load(preview.instance_id).region_id
        clone = bool(task_id) and volumes.clone_revert(ctx.storage(uow, region)) is not None
        return ResetDisksPlan(
            instance_id=preview.instance_id,
            pairs=tuple((t.disk_id, t.snapshot_id) for t in targets),
            # on the clone path the old volumes, never written, are the undo log
            items=snapshot_records.new_items(disks) if keep_safety or not clone else (),
            safety_group_id=ids.new_id(
                "snapshot_group"), keep_safety=keep_safety, auto_start=auto_start,
            volumes=tuple((d.id, d.current_volume, volumes.new_volume(d.id, task_id))
                          for d in disks) if clone else ())

    @classmethod
    def locks(cls, plan: ResetDisksPlan) -> list[Lock]:
        return [("instance", plan.instance_id), *(("disk", d) for d, _ in plan.items)]

    @classmethod
    def runs_on(cls, plan: ResetDisksPlan, uow: UnitOfWork) -> str | None:
        """With AutoStartInstance, the `start` step boots the VM where the task runs, so
        the task goes where the instance can start: the host holding its claim, or (one
        on RBD that gave its compute back, or whose host is gone) a host with room now, as
        StartInstance would place it; the step claims it there (`on=`), or answers
        NoStock. Without it, the instance's host (its storage steps may run anywhere)."""
        host = super().runs_on(plan, uow)
        inst = uow.instances.get(plan.instance_id)
        if not plan.auto_start or inst is None or not placement.clustered(uow):
            return host
        try:
            return placement.room_to_start(uow, get_region(uow, inst.region_id), inst)
        except EcsError:
            return host  # no room now: the start step tries again where it runs

    def steps(self) -> list[Step]:
        steps = [Step("safety", self.safety)]
        if self.plan.volumes:
            steps += [Step("clone", self.clone), Step("swap", self.swap)]
        else:
            steps.append(Step("revert", self.revert))
        if not self.plan.keep_safety:
            steps.append(Step("drop_safety", self.drop_safety))
        if self.plan.auto_start:
            steps += [Step("start", self.start), Step("health_gate", self.health_gate)]
        return steps

    def _storage(self) -> StorageBackend:
        return self.ctx.storage_of(self.task.region_id)

    def _on_volumes(self, pairs: Sequence[Pair]) -> list[Pair]:
        """(disk, snapshot) pairs with each disk's current volume (the disks are locked)."""
        current = volumes.current_volumes(self.ctx, [d for d, _ in pairs])
        return [(current[d], s) for d, s in pairs]

    def safety(self) -> None:
        if vm_running(self.ctx, self.plan.instance_id):
            raise errors.incorrect_instance_status(self.plan.instance_id, "Running", "Stopped")
        old = {d: v for d, v, _ in self.plan.volumes}
        if old:  # the volumes the disks are on until `swap`
            self._storage().create_snapshots([(old[d], s) for d, s in self.plan.items])
        else:
            self._storage().create_snapshots(self._on_volumes(self.plan.items))
        if not self.plan.items:  # clone and swap without SafetySnapshot: none to take
            return
        with self.ctx.uow() as uow:
            snapshot_records.complete(uow, self.plan.items, self.plan.safety_group_id)
            uow.commit()

    def revert(self) -> None:
        self._storage().revert_many(self._on_volumes(self.plan.pairs))

    def clone(self) -> None:
        capable = volumes.clone_revert(self._storage())
        assert capable is not None, "a plan to clone on a backend that cannot"
        target = dict(self.plan.pairs)
        with self.ctx.uow(readonly=True) as uow:  # disks never shrink: the size they have
            size = {d: uow.disks.load(d).size_gib * GIB for d, _, _ in self.plan.volumes}
        capable.clone_many([(d, target[d], new, size[d]) for d, _, new in self.plan.volumes])

    def swap(self) -> None:
        volumes.switch(self.ctx, self.plan.volumes)

    def drop_safety(self) -> None:
        storage = self._storage()
        for disk_id, snap_id in self.plan.items:
            storage.delete_snapshot(disk_id, snap_id)

    def start(self) -> None:
        refused: EcsError | None = None
        with self.ctx.uow() as uow:
            inst = uow.instances.load(self.plan.instance_id)
            try:  # a cluster: only on the host whose agent runs this step (boots the VM)
                inst.host_id = placement.room_to_start(
                    uow, get_region(uow, inst.region_id), inst, on=self.task.owner or None)
            except EcsError as exc:
                refused = exc
            if refused is None:
                inst.mark_starting()
                uow.commit()
        if refused is not None:
            self.note(start_error={"Code": refused.code, "Message": refused.message})
            return
        boot(self.ctx, self.plan.instance_id)

    def health_gate(self) -> None:
        instance_id = self.plan.instance_id
        if self.task.result.get("start_error") or not vm_running(self.ctx, instance_id):
            return
        timeout = self.ctx.settings.health_gate_timeout_s
        started = time.monotonic()
        deadline = started + timeout
        healthy = False
        while time.monotonic() < deadline and not healthy:
            left = deadline - time.monotonic()
            healthy = self.ctx.compute.guest_ping(instance_id, timeout=min(5.0, max(0.5, left)))
        elapsed = round(time.monotonic() - started, 1)
        if healthy:
            self.note(health={"GuestAgent": "Ok", "Seconds": elapsed})
            return
        undo = self.plan.safety_group_id if self.plan.keep_safety else None
        self.note(health={
            "GuestAgent": "NoResponse", "Seconds": elapsed,
            "Message": f"The guest agent did not answer within {timeout:.0f} s after the "
                       "rollback." + (f" Roll back to the safety snapshot group {undo} to "
                                      "undo the rollback." if undo else "")})

    def finish(self, uow: UnitOfWork) -> None:
        if not self.plan.keep_safety:
            snapshot_records.drop(uow, self.plan.items, self.plan.safety_group_id,
                                  group_too=True)
        if self.plan.volumes:
            collect = volumes.schedule_collect(self.ctx, uow, self.task,
                                               [d for d, _, _ in self.plan.volumes])
            self.follow_ups += [collect] if collect else []
        if self.plan.auto_start and not self.task.result.get("start_error"):
            uow.instances.load(self.plan.instance_id).mark_running()
        self.task.note(SafetySnapshotGroupId=self.plan.safety_group_id
                       if self.plan.keep_safety else "")

    def compensate(self, error: BaseException) -> None:
        storage = self._storage()
        if self.plan.volumes:
            if self.done("start") or vm_running(self.ctx, self.plan.instance_id):
                self.ctx.compute.stop(self.plan.instance_id, force=True)
            # back to the old volumes, which nothing wrote; then the clones go
            volumes.switch(self.ctx, [(d, new, old) for d, old, new in self.plan.volumes])
            capable = volumes.clone_revert(storage)
            assert capable is not None
            capable.remove_volumes([new for _, _, new in self.plan.volumes])
        elif self.done("safety"):
            if self.done("start") or vm_running(self.ctx, self.plan.instance_id):
                self.ctx.compute.stop(self.plan.instance_id, force=True)
            # back to the state before the rollback
            storage.revert_many(self._on_volumes(self.plan.items))
        if not self.done("safety") or not self.plan.keep_safety:
            for disk_id, snap_id in self.plan.items:
                storage.delete_snapshot(disk_id, snap_id)

    def failed(self, uow: UnitOfWork) -> None:
        inst = uow.instances.get(self.plan.instance_id)
        if inst is not None and inst.status == InstanceStatus.STARTING:
            inst.mark_stopped()
        if not (self.done("safety") and self.plan.keep_safety):
            # a group the user was never told of (SafetySnapshot=false) goes; one that was
            # named in the answer stays, failed
            snapshot_records.drop(uow, self.plan.items, self.plan.safety_group_id,
                                  group_too=not self.plan.keep_safety)

    def resume(self) -> Resume:
        # No disk is reverted before the journal says every safety snapshot exists: before
        # that, undoing is safe (and drops the partial safety snapshots); after it, only
        # going forward restores "all disks at the snapshot" for the whole request.
        return Resume.FORWARD if self.done("safety") else Resume.UNDO


def reset_disks(ctx: ServiceContext, account_id: str, region_id: str | None,
                items: Sequence[tuple[str, str]], *, auto_start: bool = False,
                safety_snapshot: bool = True, dry_run: bool = False) -> ResetResult:
    """ResetDisks: roll the disks back to their snapshots, all or none."""
    task_id = ids.new_id("task")
    with ctx.uow() as uow:
        plan = ResetDisks.check(ctx, uow, account_id, region_id, items,
                                keep_safety=safety_snapshot,
                                auto_start=auto_start, task_id=task_id)
        require_free_space(ctx, uow, uow.instances.load(plan.instance_id).region_id,
                           [d for d, _ in plan.items], snapshots_per_disk=2)
        if dry_run:
            raise errors.dry_run_passed()
        inst = uow.instances.load(plan.instance_id)
        disks = [uow.disks.load(d) for d, _ in plan.items]
        sources = [uow.snapshots.load(s) for _, s in plan.pairs]
        source_group = next((s.group_id for s in sources if s.group_id), None)
        stamp = utcnow().strftime("%Y%m%d%H%M%S")
        spec = GroupSpec(
            name=f"ecsnap-safety-{stamp}",
            description=f"Safety snapshot taken by ecsnap before rolling back {inst.id} "
                        f"from {source_group or 'its snapshots'} at {iso(utcnow())}. "
                        "Roll back to this group to undo that rollback.",
            purpose=GroupPurpose.SAFETY,
            tags={SAFETY_TAG: source_group or ",".join(s for _, s in plan.pairs)})
        if plan.items:
            snapshot_records.add_rows(uow, account_id, inst.id, disks, plan.items,
                                      group=spec, group_id=plan.safety_group_id)
        task = ctx.runner.journal(uow, ResetDisks, plan, account_id=account_id,
                                  region_id=inst.region_id, resource_id=inst.id,
                                  task_id=task_id)
        uow.commit()
    # with AutoStartInstance the VM boots: that goes on in the background
    ctx.runner.submit(task, wait_up_to=0.0 if auto_start else SHORT_TASK_S)
    return ResetResult(task.id, plan.instance_id,
                       plan.safety_group_id if safety_snapshot else None, list(plan.pairs))


def reset_disk(ctx: ServiceContext, account_id: str, disk_id: str, snapshot_id: str, *,
               auto_start: bool = False, safety_snapshot: bool = True) -> ResetResult:
    """ResetDisk: one disk back to one of its own snapshots."""
    return reset_disks(ctx, account_id, None, [(disk_id, snapshot_id)], auto_start=auto_start,
                       safety_snapshot=safety_snapshot)
