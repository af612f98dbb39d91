"""Operations on an instance while a snapshot or a rollback of it is really in progress.

No lock is planted by hand: a real ResetDisks or TakeSnapshots task runs in the background
task runner and is held in the middle of its step (the storage backend's revert or
snapshot, or the hypervisor double's live snapshot, blocks on a threading.Event). Every
other operation on that instance is refused with the exact ECS code it should give, and
changes nothing; once the step is let go, the held task finishes as it would have, and the
instance takes operations again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from ecsnap import bootstrap, config
from ecsnap.adapters.compute.base import LiveSnapshotResult
from ecsnap.adapters.storage.qcow2 import Qcow2Backend
from ecsnap.domain.errors import EcsError, RuleViolations
from ecsnap.domain.model import (
    Consistency,
    GroupPurpose,
    Image,
    InstanceStatus,
    SnapshotStatus,
    TaskStatus,
)
from ecsnap.service import disks, images, instances, regions, rollback, snapshots
from ecsnap.service.context import ServiceContext, attached_disks
from tests import qcow
from tests.conftest import ACCOUNT, REGION
from tests.doubles import FileBackedCompute

OLD, NEW = 0xA1, 0xB2
DEADLINE_S = 60.0


class Gate:
    """Holds whoever calls `pass_through` until `release` (and says when one arrived)."""

    def __init__(self) -> None:
        self.armed = False
        self.entered = threading.Event()
        self.released = threading.Event()

    def pass_through(self) -> None:
        if not self.armed:
            return
        self.entered.set()
        assert self.released.wait(DEADLINE_S), "the test never released the held step"

    def release(self) -> None:
        self.released.set()


class HeldCompute(FileBackedCompute):
    """The compute double, whose live snapshot (the `transaction` step) can be held."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = Gate()

    def snapshot_disks(self, instance_id: str, items: Sequence[tuple[str, str]], *,
                       quiesce: bool = True) -> LiveSnapshotResult:
        self.gate.pass_through()
        return super().snapshot_disks(instance_id, items, quiesce=quiesce)


class StorageGates:
    """The qcow2 backend's revert (ResetDisks' `revert`) and its snapshots of a stopped
    instance's disks (TakeSnapshots' `snapshot`, ResetDisks' `safety`), each held while
    its gate is armed."""

    def __init__(self) -> None:
        self.revert = Gate()
        self.snapshot = Gate()

    def release(self) -> None:
        self.revert.release()
        self.snapshot.release()


@pytest.fixture
def storage(monkeypatch: pytest.MonkeyPatch) -> StorageGates:
    gates = StorageGates()
    revert, create = Qcow2Backend.revert_many, Qcow2Backend.create_snapshots

    def held_revert(self: Qcow2Backend, pairs: list[tuple[str, str]]) -> None:
        gates.revert.pass_through()
        revert(self, pairs)

    def held_create(self: Qcow2Backend, items: list[tuple[str, str]]) -> None:
        if not any(snap.startswith("ecsnap-") for _, snap in items):  # not a disk's birth
            gates.snapshot.pass_through()
        create(self, items)

    monkeypatch.setattr(Qcow2Backend, "revert_many", held_revert)
    monkeypatch.setattr(Qcow2Backend, "create_snapshots", held_create)
    return gates


@pytest.fixture
def compute() -> HeldCompute:
    return HeldCompute()


@pytest.fixture
def bg(tmp_path: Path, compute: HeldCompute, storage: StorageGates,
       template: Path) -> Iterator[ServiceContext]:
    """A context whose tasks run in the background runner, as `ecsnap serve` runs them."""
    settings = config.load(tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'db'}",
                           background_tasks=True, health_gate_timeout_s=2.0)
    ctx = bootstrap.build(settings, compute=compute, background=True)
    regions.ensure_region(ctx, REGION, vcpus=16, memory_mib=16384)
    try:
        yield ctx
    finally:
        compute.gate.release()
        storage.release()
        ctx.runner.shutdown()


@pytest.fixture
def bg_image(bg: ServiceContext, template: Path) -> Image:
    return images.register_image(bg, REGION, name="tiny", os_name="Tiny Linux",
                                 template=template, size_gib=1)


# ---------------------------------------------------------------- helpers


def until(what: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {DEADLINE_S:.0f} s"
        time.sleep(0.05)


def status(ctx: ServiceContext, instance_id: str) -> InstanceStatus:
    with ctx.uow(readonly=True) as uow:
        return uow.instances.load(instance_id).status


def finished(ctx: ServiceContext, task_id: str | None) -> None:
    assert task_id
    task = ctx.runner.wait(task_id, timeout=DEADLINE_S)
    assert task.status == TaskStatus.FINISHED, (task.error_code, task.error_message)


def make_instance(ctx: ServiceContext, image: Image) -> tuple[str, dict[str, str]]:
    """A Running instance with two data disks, OLD on every disk; its disk paths."""
    req = instances.InstanceRequest(image_id=image.id, instance_type="ecs.t5-lc2m1.nano",
                                    data_disks=[instances.DataDiskSpec(20) for _ in range(2)])
    [instance_id] = instances.run_instances(ctx, ACCOUNT, REGION, req)
    until("Running", lambda: status(ctx, instance_id) == InstanceStatus.RUNNING)
    with ctx.uow(readonly=True) as uow:
        storage = ctx.storage(uow, REGION)
        paths = {d.id: storage.path(d.id) for d in attached_disks(uow, instance_id)}
    for path in paths.values():
        qcow.write(path, OLD)
    return instance_id, paths


def snapshot_group(ctx: ServiceContext, instance_id: str) -> tuple[str, list[tuple[str, str]]]:
    group_id, task_id = snapshots.create_snapshot_group(ctx, ACCOUNT, REGION, instance_id)
    finished(ctx, task_id)
    return group_id, items_of(ctx, group_id)


def items_of(ctx: ServiceContext, group_id: str) -> list[tuple[str, str]]:
    view = snapshots.get_snapshot_group(ctx, ACCOUNT, group_id)
    return [(s.source_disk_id, s.id) for s in view.snapshots]


def stop(ctx: ServiceContext, instance_id: str) -> None:
    finished(ctx, instances.stop_instance(ctx, ACCOUNT, instance_id))
    assert status(ctx, instance_id) == InstanceStatus.STOPPED


def rows(ctx: ServiceContext) -> list[str]:
    """Every row ecsnap keeps about instances, disks, snapshots, groups and tasks."""
    with ctx.uow(readonly=True) as uow:
        out = []
        for repo in (uow.instances, uow.disks, uow.snapshots, uow.snapshot_groups, uow.tasks):
            for obj in repo.find():
                out.append(repr(sorted((k, repr(v)) for k, v in vars(obj).items()
                                       if not k.startswith("_"))))
    return sorted(out)


def refused(ctx: ServiceContext, call: Callable[[], object]) -> EcsError:
    before = rows(ctx)
    with pytest.raises(EcsError) as caught:
        call()
    assert rows(ctx) == before, f"the refused call ({caught.value!r}) changed something"
    return caught.value


def failures(error: EcsError) -> list[tuple[str, str | None]]:
    assert isinstance(error, RuleViolations), error
    return [(f.code, f.disk_id) for f in error.failures]


def locks(ctx: ServiceContext, instance_id: str) -> list[str | None]:
    with ctx.uow(readonly=True) as uow:
        inst = uow.instances.load(instance_id)
        return [inst.lock_task_id] + [d.lock_task_id for d in attached_disks(uow, inst.id)]


def task_of(ctx: ServiceContext, task_id: str) -> Any:
    with ctx.uow(readonly=True) as uow:
        return uow.tasks.load(task_id)


CONFLICT = ("Operation.Conflict", 403)


def code(error: EcsError) -> tuple[str, int]:
    return error.code, error.http_status


# ---------------------------------------------------------------- a rollback in progress


def test_a_rollback_in_progress_refuses_every_other_operation(
        bg: ServiceContext, bg_image: Image, storage: StorageGates) -> None:
    ctx = bg
    instance_id, paths = make_instance(ctx, bg_image)
    group_id, items = snapshot_group(ctx, instance_id)
    for path in paths.values():
        qcow.write(path, NEW)
    stop(ctx, instance_id)
    system, data1, data2 = paths

    storage.revert.armed = True
    result = rollback.reset_disks(ctx, ACCOUNT, REGION, items)  # answers after 2 s
    assert storage.revert.entered.wait(DEADLINE_S), "the rollback never reached its revert"
    task = task_of(ctx, result.task_id)
    assert (task.status, list(task.done)) == (TaskStatus.PROCESSING, ["safety"])
    safety = result.safety_group_id
    assert safety

    assert code(refused(ctx, lambda: instances.start_instance(ctx, ACCOUNT,
                                                              instance_id))) == CONFLICT
    assert code(refused(ctx, lambda: instances.stop_instance(ctx, ACCOUNT,
                                                             instance_id))) == CONFLICT
    again = refused(ctx, lambda: rollback.reset_disks(ctx, ACCOUNT, REGION, items))
    assert code(again) == CONFLICT
    assert failures(again) == [("Operation.Conflict", None)] + [
        ("Operation.Conflict", d) for d, _ in items]
    assert code(refused(ctx, lambda: snapshots.delete_snapshot_group(
        ctx, ACCOUNT, REGION, group_id))) == CONFLICT
    # the safety group is the undo log of the rollback under way: it cannot go either
    assert code(refused(ctx, lambda: snapshots.delete_snapshot_group(
        ctx, ACCOUNT, REGION, safety))) == CONFLICT
    assert code(refused(ctx, lambda: instances.delete_instance(ctx, ACCOUNT,
                                                               instance_id))) == CONFLICT
    assert code(refused(ctx, lambda: snapshots.create_snapshot_group(
        ctx, ACCOUNT, REGION, instance_id))) == CONFLICT
    assert code(refused(ctx, lambda: snapshots.create_snapshot(ctx, ACCOUNT, data1))) == \
        CONFLICT
    assert code(refused(ctx, lambda: disks.detach_disk(ctx, ACCOUNT, instance_id,
                                                       data2))) == CONFLICT
    assert code(refused(ctx, lambda: disks.reinit_disk(ctx, ACCOUNT, system))) == CONFLICT
    assert code(refused(ctx, lambda: disks.resize_disk(ctx, ACCOUNT, data1, 40))) == CONFLICT
    assert locks(ctx, instance_id) == [result.task_id] * 4  # held by the rollback
    # the held step was never disturbed: no disk was written by anyone yet
    assert all(qcow.holds(p, NEW) for p in paths.values())

    storage.revert.release()
    finished(ctx, result.task_id)
    assert all(qcow.holds(p, OLD) for p in paths.values()), "not rolled back"
    assert locks(ctx, instance_id) == [None] * 4
    view = snapshots.get_snapshot_group(ctx, ACCOUNT, safety)
    assert (view.group.status, view.group.purpose) == (SnapshotStatus.ACCOMPLISHED,
                                                       GroupPurpose.SAFETY)
    assert sorted(s.source_disk_id for s in view.snapshots) == sorted(paths)
    for disk_id, snap_id in items_of(ctx, safety):
        assert snap_id in qcow.snapshots(paths[disk_id])
    # the instance takes operations again
    finished(ctx, instances.start_instance(ctx, ACCOUNT, instance_id))
    assert status(ctx, instance_id) == InstanceStatus.RUNNING


# ---------------------------------------------------------------- snapshots in progress


def test_a_live_snapshot_in_progress_refuses_every_other_operation(
        bg: ServiceContext, bg_image: Image, compute: HeldCompute) -> None:
    ctx = bg
    instance_id, paths = make_instance(ctx, bg_image)
    earlier, _ = snapshot_group(ctx, instance_id)
    earlier_items = items_of(ctx, earlier)

    compute.gate.armed = True
    group_id, task_id = snapshots.create_snapshot_group(ctx, ACCOUNT, REGION, instance_id)
    assert compute.gate.entered.wait(DEADLINE_S), "the snapshot never reached its transaction"
    assert task_of(ctx, task_id).status == TaskStatus.PROCESSING
    assert snapshots.get_snapshot_group(ctx, ACCOUNT, group_id).group.status == \
        SnapshotStatus.PROGRESSING

    assert code(refused(ctx, lambda: instances.start_instance(ctx, ACCOUNT,
                                                              instance_id))) == CONFLICT
    assert code(refused(ctx, lambda: instances.stop_instance(ctx, ACCOUNT,
                                                             instance_id))) == CONFLICT
    assert code(refused(ctx, lambda: instances.stop_instance(
        ctx, ACCOUNT, instance_id, force=True, stopped_mode="StopCharging"))) == CONFLICT
    assert code(refused(ctx, lambda: instances.reboot_instance(ctx, ACCOUNT,
                                                               instance_id))) == CONFLICT
    # a rollback: the instance runs (the first failure) and is busy, both reported
    reset = refused(ctx, lambda: rollback.reset_disks(ctx, ACCOUNT, REGION, earlier_items))
    assert code(reset) == ("IncorrectInstanceStatus", 403)
    assert failures(reset) == [("IncorrectInstanceStatus", None),
                               ("Operation.Conflict", None)] + [
        ("Operation.Conflict", d) for d, _ in earlier_items]
    assert code(refused(ctx, lambda: snapshots.delete_snapshot_group(
        ctx, ACCOUNT, REGION, group_id))) == ("IncorrectSnapshotGroupStatus", 403)
    assert code(refused(ctx, lambda: snapshots.delete_snapshot_group(
        ctx, ACCOUNT, REGION, earlier))) == CONFLICT
    assert code(refused(ctx, lambda: instances.delete_instance(ctx, ACCOUNT, instance_id,
                                                               force=True))) == CONFLICT
    assert code(refused(ctx, lambda: snapshots.create_snapshot_group(
        ctx, ACCOUNT, REGION, instance_id))) == CONFLICT
    assert locks(ctx, instance_id) == [task_id] * 4  # held by the snapshot

    compute.gate.release()
    finished(ctx, task_id)
    view = snapshots.get_snapshot_group(ctx, ACCOUNT, group_id)
    assert view.group.status == SnapshotStatus.ACCOMPLISHED
    assert view.group.consistency == Consistency.FILE_SYSTEM
    assert sorted(s.source_disk_id for s in view.snapshots) == sorted(paths)
    for disk_id, snap_id in items_of(ctx, group_id):
        assert snap_id in qcow.snapshots(paths[disk_id])
    assert locks(ctx, instance_id) == [None] * 4
    stop(ctx, instance_id)  # the instance takes operations again


def test_a_stopped_instances_snapshot_in_progress_refuses_a_start(
        bg: ServiceContext, bg_image: Image, storage: StorageGates) -> None:
    """A Stopped instance's disks are snapshotted by the storage backend, one by one: a
    start in the middle would make the snapshots of different instants."""
    ctx = bg
    instance_id, paths = make_instance(ctx, bg_image)
    earlier, earlier_items = snapshot_group(ctx, instance_id)
    stop(ctx, instance_id)

    storage.snapshot.armed = True
    group_id, task_id = snapshots.create_snapshot_group(ctx, ACCOUNT, REGION, instance_id)
    assert storage.snapshot.entered.wait(DEADLINE_S), "the snapshot never reached its step"
    assert task_of(ctx, task_id).status == TaskStatus.PROCESSING

    assert code(refused(ctx, lambda: instances.start_instance(ctx, ACCOUNT,
                                                              instance_id))) == CONFLICT
    assert code(refused(ctx, lambda: instances.stop_instance(ctx, ACCOUNT,
                                                             instance_id))) == CONFLICT
    reset = refused(ctx, lambda: rollback.reset_disks(ctx, ACCOUNT, REGION, earlier_items))
    assert code(reset) == CONFLICT
    assert failures(reset) == [("Operation.Conflict", None)] + [
        ("Operation.Conflict", d) for d, _ in earlier_items]
    assert code(refused(ctx, lambda: snapshots.delete_snapshot_group(
        ctx, ACCOUNT, REGION, group_id))) == ("IncorrectSnapshotGroupStatus", 403)
    assert code(refused(ctx, lambda: snapshots.delete_snapshot_group(
        ctx, ACCOUNT, REGION, earlier))) == CONFLICT
    assert code(refused(ctx, lambda: instances.delete_instance(ctx, ACCOUNT,
                                                               instance_id))) == CONFLICT
    assert code(refused(ctx, lambda: snapshots.create_snapshot_group(
        ctx, ACCOUNT, REGION, instance_id))) == CONFLICT
    assert instance_id not in ctx.compute.running()

    storage.snapshot.release()
    finished(ctx, task_id)
    view = snapshots.get_snapshot_group(ctx, ACCOUNT, group_id)
    assert view.group.status == SnapshotStatus.ACCOMPLISHED
    for disk_id, snap_id in items_of(ctx, group_id):
        assert snap_id in qcow.snapshots(paths[disk_id])
    assert locks(ctx, instance_id) == [None] * 4
    finished(ctx, instances.start_instance(ctx, ACCOUNT, instance_id))
