"""Every refusal of a rollback with its ECS code, on the in-memory fakes: each one changes
nothing (story.refused checks every row, disk, snapshot and VM). Then what a rollback
that fails half-way, a live snapshot that fails, and the capacity rules do."""

from __future__ import annotations

from pathlib import Path

import pytest

from ecsnap.domain import ids
from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import (
    MAX_MANUAL_SNAPSHOTS_PER_DISK,
    Image,
    InstanceStatus,
    Snapshot,
    SnapshotStatus,
    TaskStatus,
)
from ecsnap.service import disks, images, instances, regions, rollback, snapshots
from ecsnap.service.context import ServiceContext
from tests.conftest import ACCOUNT, REGION
from tests.fakes.compute import InMemoryCompute
from tests.fakes.context import FastWorld
from tests.fakes.storage import InMemoryStorage
from tests.fast.story import (
    disks_of,
    finished,
    group_items,
    make_instance,
    refused,
    snapshot_everything,
    status,
    stop,
)

INITIAL = "ecsnap-initial"


def test_a_running_instance_is_refused(ctx: ServiceContext, image: Image) -> None:
    instance_id = make_instance(ctx, image)
    group_id = snapshot_everything(ctx, instance_id)
    assert refused(ctx, group_items(ctx, group_id)) == [("IncorrectInstanceStatus", None)]


def test_each_refusal_with_its_code(ctx: ServiceContext, image: Image,
                                    storage: InMemoryStorage) -> None:
    instance_id = make_instance(ctx, image)
    group_id = snapshot_everything(ctx, instance_id)
    items = group_items(ctx, group_id)
    (system, system_snap), (data1, _), (data2, data2_snap) = items
    stop(ctx, instance_id)

    # a detached disk
    finished(ctx, disks.detach_disk(ctx, ACCOUNT, instance_id, data2))
    assert refused(ctx, [items[2]]) == [("IncorrectDiskStatus", data2)]
    # a released disk: its snapshot is still listed with its SourceDiskId, and kept
    disks.delete_disk(ctx, ACCOUNT, data2)
    page = snapshots.describe_snapshots(ctx, ACCOUNT, REGION, disk_id=data2)
    assert [s.source_disk_id for s in page.items] == [data2]
    assert storage.snapshot_names(data2) == [INITIAL, data2_snap]
    assert refused(ctx, [items[2]]) == [("InvalidDiskId.NotFound", data2)]
    # a snapshot of another disk
    assert refused(ctx, [(data1, system_snap)]) == [("InvalidParameter.Mismatch", data1)]
    # the system disk replaced: a new disk ID, which the old snapshot cannot roll back
    with ctx.uow(readonly=True) as uow:
        image_id = uow.instances.load(instance_id).image_id
    new_system = disks.replace_system_disk(ctx, ACCOUNT, instance_id, image_id)
    assert new_system != system
    assert disks_of(ctx, instance_id) == [new_system, data1]
    assert refused(ctx, [items[0]]) == [("InvalidDiskId.NotFound", system),
                                        ("InvalidParameter.Mismatch", system)]
    assert refused(ctx, [(new_system, system_snap)]) == \
        [("InvalidParameter.Mismatch", new_system)]
    # the other data disk is still fine, and only it is rolled back
    storage.write(data1, b"written after the snapshot")
    before = storage.content(new_system)
    finished(ctx, rollback.reset_disks(ctx, ACCOUNT, REGION, [items[1]]).task_id)
    assert storage.content(data1) == b"" and storage.content(new_system) == before


def test_a_deleted_snapshot_is_not_found(ctx: ServiceContext, image: Image,
                                         storage: InMemoryStorage) -> None:
    instance_id = make_instance(ctx, image)
    items = group_items(ctx, snapshot_everything(ctx, instance_id))
    stop(ctx, instance_id)
    data1, snap = items[1]
    finished(ctx, snapshots.delete_snapshot(ctx, ACCOUNT, snap))
    assert storage.snapshot_names(data1) == [INITIAL]
    assert refused(ctx, [items[1]]) == [("InvalidSnapshotId.NotFound", data1)]
    assert refused(ctx, items) == [("InvalidSnapshotId.NotFound", data1)]


def test_every_failed_check_is_reported_at_once(ctx: ServiceContext, image: Image) -> None:
    instance_id = make_instance(ctx, image)
    items = group_items(ctx, snapshot_everything(ctx, instance_id))
    data1, data2 = items[1][0], items[2][0]
    finished(ctx, disks.detach_disk(ctx, ACCOUNT, instance_id, data1))
    finished(ctx, snapshots.delete_snapshot(ctx, ACCOUNT, items[2][1]))
    assert refused(ctx, items) == [("IncorrectInstanceStatus", None),
                                   ("IncorrectDiskStatus", data1),
                                   ("InvalidSnapshotId.NotFound", data2)]


def test_a_snapshot_not_ready_and_an_operation_in_progress(ctx: ServiceContext, image: Image,
                                                           ) -> None:
    instance_id = make_instance(ctx, image)
    items = group_items(ctx, snapshot_everything(ctx, instance_id))
    stop(ctx, instance_id)
    with ctx.uow() as uow:
        uow.snapshots.load(items[1][1]).status = SnapshotStatus.PROGRESSING
        uow.commit()
    assert refused(ctx, [items[1]]) == [("InvalidSnapshotId.NotReady", items[1][0])]

    with ctx.uow() as uow:
        assert uow.try_lock("instance", [instance_id], "t-other") is None
        uow.commit()
    assert refused(ctx, [items[0]]) == [("Operation.Conflict", None)]
    with pytest.raises(EcsError) as caught:
        instances.start_instance(ctx, ACCOUNT, instance_id)
    assert caught.value.code == "Operation.Conflict"
    with ctx.uow() as uow:
        uow.unlock("instance", [instance_id], "t-other")
        assert uow.try_lock("disk", [items[2][0]], "t-other") is None
        uow.commit()
    assert refused(ctx, [items[0], items[2]]) == [("Operation.Conflict", items[2][0])]


def test_a_revert_that_fails_half_way_restores_every_disk(ctx: ServiceContext, image: Image,
                                                           storage: InMemoryStorage) -> None:
    instance_id = make_instance(ctx, image)
    disk_ids = disks_of(ctx, instance_id)
    for disk in disk_ids:
        storage.write(disk, b"old " + disk.encode())
    items = group_items(ctx, snapshot_everything(ctx, instance_id))
    for disk in disk_ids:
        storage.write(disk, b"new " + disk.encode())
    stop(ctx, instance_id)
    storage.fail("revert", disk_ids[2])  # the other two disks are reverted, then undone

    result = rollback.reset_disks(ctx, ACCOUNT, REGION, items)
    task = instances.wait_task(ctx, result.task_id)
    assert (task.status, task.error_code) == (TaskStatus.FAILED, "InternalError")
    assert [storage.content(d) for d in disk_ids] == [b"new " + d.encode() for d in disk_ids]
    reverts = [c for c in storage.calls if c[0] == "revert_many"]
    assert len(reverts) == 2  # the rollback, then back to the safety snapshots
    with ctx.uow(readonly=True) as uow:
        assert uow.instances.load(instance_id).lock_task_id is None
        assert [uow.disks.load(d).lock_task_id for d in disk_ids] == [None, None, None]
    assert status(ctx, instance_id) == InstanceStatus.STOPPED
    # the safety group is kept (it holds the data as it was before the attempt)
    assert result.safety_group_id
    safety = snapshots.get_snapshot_group(ctx, ACCOUNT, result.safety_group_id)
    assert safety.group.status == SnapshotStatus.ACCOMPLISHED
    # and the same rollback goes through once the storage works
    finished(ctx, rollback.reset_disks(ctx, ACCOUNT, REGION, items).task_id)
    assert [storage.content(d) for d in disk_ids] == [b"old " + d.encode() for d in disk_ids]


def test_a_live_snapshot_that_fails_leaves_nothing(ctx: ServiceContext, image: Image,
                                                   storage: InMemoryStorage,
                                                   compute: InMemoryCompute) -> None:
    instance_id = make_instance(ctx, image)
    disk_ids = disks_of(ctx, instance_id)
    compute.fail_snapshot_of = disk_ids[2]
    group_id, task_id = snapshots.create_snapshot_group(ctx, ACCOUNT, REGION, instance_id)
    task = instances.wait_task(ctx, task_id)
    assert task.status == TaskStatus.FAILED
    view = snapshots.get_snapshot_group(ctx, ACCOUNT, group_id)
    assert view.group.status == SnapshotStatus.FAILED and view.snapshots == []
    assert [storage.snapshot_names(d) for d in disk_ids] == [[INITIAL]] * 3
    with ctx.uow(readonly=True) as uow:
        assert uow.instances.load(instance_id).lock_task_id is None


def test_a_disk_at_its_snapshot_quota_refuses_the_group(ctx: ServiceContext,
                                                         image: Image) -> None:
    instance_id = make_instance(ctx, image, start=False)
    first, full = disks_of(ctx, instance_id)[:2]
    with ctx.uow() as uow:  # rows only: the quota counts what the store holds
        disk = uow.disks.load(full)
        for _ in range(MAX_MANUAL_SNAPSHOTS_PER_DISK - 1):
            uow.snapshots.add(Snapshot(id=ids.new_id("snapshot"), account_id=ACCOUNT,
                                       region_id=REGION, source_disk_id=full,
                                       source_disk_type=disk.type,
                                       source_disk_size=disk.size_gib,
                                       instance_id=instance_id))
        uow.commit()
    snapshot_everything(ctx, instance_id)  # one below the maximum: taken
    with pytest.raises(EcsError) as caught:
        snapshots.create_snapshot_group(ctx, ACCOUNT, REGION, instance_id)
    assert caught.value.code == "QuotaExceed.Snapshot" and full in caught.value.message
    group_id, task_id = snapshots.create_snapshot_group(ctx, ACCOUNT, REGION, instance_id,
                                                        disk_ids=[first])
    finished(ctx, task_id)
    assert [d for d, _ in group_items(ctx, group_id)] == [first]


TIGHT = "tight-1"  # room for exactly one ecs.g6.large (2 vCPU, 8 GiB)


def test_stop_charging_gives_the_capacity_away(world: FastWorld, image: Image) -> None:
    ctx = world.ctx
    regions.ensure_region(ctx, TIGHT, vcpus=2, memory_mib=8192)
    tight_image = images.register_image(ctx, TIGHT, name="tiny", os_name="Tiny Linux",
                                        template=Path(image.template_path), size_gib=1)
    storage = world.storage(TIGHT)
    small = make_instance(ctx, tight_image, instance_type="ecs.g6.large", region_id=TIGHT)
    disk_ids = disks_of(ctx, small)
    for disk in disk_ids:
        storage.write(disk, b"before")
    group_id, task_id = snapshots.create_snapshot_group(ctx, ACCOUNT, TIGHT, small)
    finished(ctx, task_id)
    for disk in disk_ids:
        storage.write(disk, b"after")
    finished(ctx, instances.stop_instance(ctx, ACCOUNT, small, stopped_mode="StopCharging"))
    # someone else takes the freed compute
    other = make_instance(ctx, tight_image, instance_type="ecs.g6.large", region_id=TIGHT)
    assert status(ctx, other) == InstanceStatus.RUNNING
    with pytest.raises(EcsError) as caught:
        instances.start_instance(ctx, ACCOUNT, small)
    assert (caught.value.code, caught.value.http_status) == ("OperationDenied.NoStock", 403)
    assert status(ctx, small) == InstanceStatus.STOPPED

    # a rollback with AutoStart rolls back, then reports why it could not start
    preview = rollback.preview_group_rollback(ctx, ACCOUNT, group_id)
    assert preview.failures == [] and "OperationDenied.NoStock" in \
        preview.stop_charging_warning
    items = group_items(ctx, group_id)
    result = rollback.reset_disks(ctx, ACCOUNT, TIGHT, items, auto_start=True)
    task = instances.wait_task(ctx, result.task_id)
    assert task.status == TaskStatus.FINISHED
    assert task.result["start_error"]["Code"] == "OperationDenied.NoStock"
    assert status(ctx, small) == InstanceStatus.STOPPED
    assert small not in world.compute.vms
    assert [storage.content(d) for d in disk_ids] == [b"before"] * len(disk_ids)

    # KeepCharging keeps the reservation: nothing else fits while it is stopped
    finished(ctx, instances.stop_instance(ctx, ACCOUNT, other, stopped_mode="KeepCharging"))
    with pytest.raises(EcsError) as caught:
        make_instance(ctx, tight_image, instance_type="ecs.g6.large", region_id=TIGHT)
    assert caught.value.code == "OperationDenied.NoStock"
    finished(ctx, instances.start_instance(ctx, ACCOUNT, other))


def test_a_released_disk_keeps_its_storage_until_its_last_snapshot(
        ctx: ServiceContext, storage: InMemoryStorage) -> None:
    disk_id = disks.create_disk(ctx, ACCOUNT, REGION, size_gib=20)
    storage.write(disk_id, b"keep me")
    snap_id = snapshots.create_snapshot(ctx, ACCOUNT, disk_id, name="keep-me")
    disks.delete_disk(ctx, ACCOUNT, disk_id)
    assert storage.exists(disk_id) and storage.snapshot_names(disk_id) == [INITIAL, snap_id]
    page = snapshots.describe_snapshots(ctx, ACCOUNT, REGION, snapshot_ids=[snap_id])
    assert [(s.source_disk_id, s.source_disk_type.value) for s in page.items] == \
        [(disk_id, "data")]
    finished(ctx, snapshots.delete_snapshot(ctx, ACCOUNT, snap_id))
    assert not storage.exists(disk_id)
    with ctx.uow(readonly=True) as uow:
        assert uow.disks.get(disk_id) is None


def test_pagination_both_styles(ctx: ServiceContext, image: Image) -> None:
    instance_id = make_instance(ctx, image, data_disks=0)
    made = [snapshot_everything(ctx, instance_id, name=f"g{n}") for n in range(7)]
    seen: list[str] = []
    token: str | None = None
    while True:
        page = snapshots.describe_snapshot_groups(ctx, ACCOUNT, REGION, next_token=token,
                                                  max_results=3)
        assert page.total == 7
        seen += [v.group.id for v in page.items]
        if not page.next_token:
            break
        token = page.next_token
    assert sorted(seen) == sorted(made) and len(seen) == 7
    page2 = snapshots.describe_snapshots(ctx, ACCOUNT, REGION, page_number=2, page_size=5)
    assert (page2.total, len(page2.items)) == (7, 2)
