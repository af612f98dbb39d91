"""The seed story through the service functions, on real qcow2 files and a real database."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ecsnap.domain import ids
from ecsnap.domain.errors import EcsError, RuleViolations
from ecsnap.domain.model import (
    MAX_MANUAL_SNAPSHOTS_PER_DISK,
    Consistency,
    DiskType,
    GroupPurpose,
    Image,
    InstanceStatus,
    Snapshot,
    SnapshotStatus,
    TaskStatus,
)
from ecsnap.service import disks, instances, regions, rollback, snapshots
from ecsnap.service.context import ServiceContext, attached_disks
from tests import qcow
from tests.conftest import ACCOUNT, OTHER, REGION
from tests.doubles import FileBackedCompute

OLD, NEW = 0xA1, 0xB2


def make_instance(ctx: ServiceContext, image: Image, *, data_disks: int = 2,
                  instance_type: str = "ecs.t5-lc2m1.nano", start: bool = True) -> str:
    req = instances.InstanceRequest(image_id=image.id, instance_type=instance_type,
                                    data_disks=[instances.DataDiskSpec(20)
                                                for _ in range(data_disks)])
    [instance_id] = instances.run_instances(ctx, ACCOUNT, REGION, req, start=start)
    return instance_id


def disk_paths(ctx: ServiceContext, instance_id: str) -> dict[str, str]:
    with ctx.uow() as uow:
        storage = ctx.storage(uow, REGION)
        return {d.id: storage.path(d.id) for d in attached_disks(uow, instance_id)}


def status(ctx: ServiceContext, instance_id: str) -> InstanceStatus:
    with ctx.uow() as uow:
        inst = uow.instances.get(instance_id)
        assert inst is not None
        return inst.status


def snapshot_everything(ctx: ServiceContext, instance_id: str) -> str:
    group_id, task_id = snapshots.create_snapshot_group(ctx, ACCOUNT, REGION, instance_id,
                                                        name="before-upgrade")
    assert instances.wait_task(ctx, task_id).status == TaskStatus.FINISHED
    return group_id


def group_items(ctx: ServiceContext, group_id: str) -> list[tuple[str, str]]:
    """(disk, snapshot) of a group, in the order of the instance's disks (system first)."""
    view = snapshots.get_snapshot_group(ctx, ACCOUNT, group_id)
    order = list(disk_paths(ctx, view.group.instance_id))
    return sorted(((s.source_disk_id, s.id) for s in view.snapshots),
                  key=lambda item: (order.index(item[0]) if item[0] in order else 99, item))


@pytest.mark.parametrize("database_url", ["sqlite", "postgres"], indirect=True)
def test_seed_story_rolls_back_two_of_three_disks(ctx: ServiceContext, image: Image,
                                                  compute: FileBackedCompute) -> None:
    instance_id = make_instance(ctx, image)
    assert status(ctx, instance_id) == InstanceStatus.RUNNING
    paths = disk_paths(ctx, instance_id)
    assert len(paths) == 3
    system, data1, data2 = paths
    for path in paths.values():
        qcow.write(path, OLD)

    group_id = snapshot_everything(ctx, instance_id)
    view = snapshots.get_snapshot_group(ctx, ACCOUNT, group_id)
    assert view.group.status == SnapshotStatus.ACCOMPLISHED
    assert view.group.consistency == Consistency.FILE_SYSTEM
    assert view.group.tags["FsConsistent"] == "True"
    assert {s.source_disk_id for s in view.snapshots} == set(paths)

    for path in paths.values():
        qcow.write(path, NEW)
    stop_task = instances.stop_instance(ctx, ACCOUNT, instance_id)
    assert instances.wait_task(ctx, stop_task).status == TaskStatus.FINISHED
    assert status(ctx, instance_id) == InstanceStatus.STOPPED

    chosen = [item for item in group_items(ctx, group_id) if item[0] in (system, data1)]
    preview = rollback.preview_reset_disks(ctx, ACCOUNT, REGION, chosen)
    assert preview.failures == []
    assert all(d.bytes_written_since is not None and d.bytes_written_since >= qcow.MIB
               for d in preview.disks)

    result = rollback.reset_disks(ctx, ACCOUNT, REGION, chosen, auto_start=True)
    task = instances.wait_task(ctx, result.task_id)
    assert task.status == TaskStatus.FINISHED, task.error_message
    assert task.result["health"]["GuestAgent"] == "Ok"
    assert status(ctx, instance_id) == InstanceStatus.RUNNING
    assert qcow.holds(paths[system], OLD) and qcow.holds(paths[data1], OLD)
    assert qcow.holds(paths[data2], NEW)

    # newer snapshots survive; the safety group holds the pre-rollback data
    assert result.safety_group_id
    safety = snapshots.get_snapshot_group(ctx, ACCOUNT, result.safety_group_id)
    assert safety.group.purpose == GroupPurpose.SAFETY
    assert safety.group.status == SnapshotStatus.ACCOMPLISHED
    assert {s.source_disk_id for s in safety.snapshots} == {system, data1}
    for disk_id, snap_id in group_items(ctx, group_id):
        assert snap_id in qcow.snapshots(paths[disk_id])

    # undo the rollback with the safety group
    instances.wait_task(ctx, instances.stop_instance(ctx, ACCOUNT, instance_id))
    undo = rollback.reset_disks(ctx, ACCOUNT, REGION,
                                group_items(ctx, result.safety_group_id))
    assert instances.wait_task(ctx, undo.task_id).status == TaskStatus.FINISHED
    assert all(qcow.holds(p, NEW) for p in paths.values())


def refused(ctx: ServiceContext, items: list[tuple[str, str]]) -> list[tuple[str, str | None]]:
    with pytest.raises(RuleViolations) as caught:
        rollback.reset_disks(ctx, ACCOUNT, REGION, items)
    return [(f.code, f.disk_id) for f in caught.value.failures]


def test_rollback_of_a_running_instance_is_refused(ctx: ServiceContext, image: Image) -> None:
    instance_id = make_instance(ctx, image)
    group_id = snapshot_everything(ctx, instance_id)
    assert refused(ctx, group_items(ctx, group_id)) == [("IncorrectInstanceStatus", None)]


def test_every_failed_check_is_reported_at_once(ctx: ServiceContext, image: Image) -> None:
    instance_id = make_instance(ctx, image)
    group_id = snapshot_everything(ctx, instance_id)
    items = group_items(ctx, group_id)
    # a detached data disk, a deleted snapshot, and a running instance, all at once
    paths = list(disk_paths(ctx, instance_id))
    data1, data2 = paths[1], paths[2]
    instances.wait_task(ctx, disks.detach_disk(ctx, ACCOUNT, instance_id, data1))
    snap_of_data2 = dict(items)[data2]
    task = snapshots.delete_snapshot(ctx, ACCOUNT, snap_of_data2)
    assert task and instances.wait_task(ctx, task).status == TaskStatus.FINISHED
    codes = refused(ctx, items)
    assert ("IncorrectInstanceStatus", None) in codes
    assert ("IncorrectDiskStatus", data1) in codes
    assert ("InvalidSnapshotId.NotFound", data2) in codes
    assert len(codes) == 3


def test_refusals_each_with_its_code(ctx: ServiceContext, image: Image) -> None:
    instance_id = make_instance(ctx, image)
    group_id = snapshot_everything(ctx, instance_id)
    items = group_items(ctx, group_id)
    system, data1, data2 = (d for d, _ in items)
    instances.wait_task(ctx, instances.stop_instance(ctx, ACCOUNT, instance_id))

    # detached disk
    instances.wait_task(ctx, disks.detach_disk(ctx, ACCOUNT, instance_id, data2))
    assert refused(ctx, [items[2]]) == [("IncorrectDiskStatus", data2)]
    # released disk: its snapshot is still listed with its SourceDiskId
    disks.delete_disk(ctx, ACCOUNT, data2)
    page = snapshots.describe_snapshots(ctx, ACCOUNT, REGION, disk_id=data2)
    assert [s.source_disk_id for s in page.items] == [data2]
    assert refused(ctx, [items[2]]) == [("InvalidDiskId.NotFound", data2)]
    # a snapshot of another disk
    assert refused(ctx, [(data1, items[0][1])]) == [("InvalidParameter.Mismatch", data1)]
    # replaced system disk: the new disk has a new ID and the old snapshot cannot roll it back
    new_system = disks.replace_system_disk(ctx, ACCOUNT, instance_id,
                                           _image_of(ctx, instance_id))
    assert new_system != system
    codes = refused(ctx, [items[0]])
    assert ("InvalidDiskId.NotFound", system) in codes
    assert ("InvalidParameter.Mismatch", system) in codes
    codes = refused(ctx, [(new_system, items[0][1])])
    assert codes[0] == ("InvalidParameter.Mismatch", new_system)
    # the other data disk is still fine
    ok = rollback.reset_disks(ctx, ACCOUNT, REGION, [items[1]])
    assert instances.wait_task(ctx, ok.task_id).status == TaskStatus.FINISHED


def _image_of(ctx: ServiceContext, instance_id: str) -> str:
    with ctx.uow() as uow:
        inst = uow.instances.get(instance_id)
        assert inst is not None
        return inst.image_id


def test_not_ready_snapshot_and_concurrent_operation(ctx: ServiceContext, image: Image) -> None:
    instance_id = make_instance(ctx, image)
    group_id = snapshot_everything(ctx, instance_id)
    items = group_items(ctx, group_id)
    instances.wait_task(ctx, instances.stop_instance(ctx, ACCOUNT, instance_id))
    with ctx.uow() as uow:
        snap = uow.snapshots.get(items[1][1])
        assert snap is not None
        snap.status = SnapshotStatus.PROGRESSING
        uow.commit()
    assert refused(ctx, [items[1]]) == [("InvalidSnapshotId.NotReady", items[1][0])]
    with ctx.uow() as uow:
        assert uow.try_lock("instance", [instance_id], "t-other") is None
        uow.commit()
    assert ("Operation.Conflict", None) in refused(ctx, [items[0]])
    with pytest.raises(EcsError) as caught:
        instances.start_instance(ctx, ACCOUNT, instance_id)
    assert caught.value.code == "Operation.Conflict"


def test_a_disk_at_its_snapshot_quota_refuses_the_group(ctx: ServiceContext,
                                                         image: Image) -> None:
    instance_id = make_instance(ctx, image, start=False)
    first, full = list(disk_paths(ctx, instance_id))[:2]
    with ctx.uow() as uow:  # rows only: the quota counts what the store holds
        disk = uow.disks.get(full)
        assert disk is not None
        for _ in range(MAX_MANUAL_SNAPSHOTS_PER_DISK - 1):
            uow.snapshots.add(Snapshot(id=ids.new_id("snapshot"), account_id=ACCOUNT,
                                       region_id=REGION, source_disk_id=full,
                                       source_disk_type=disk.type,
                                       source_disk_size=disk.size_gib,
                                       instance_id=instance_id))
        uow.commit()
    # one below the maximum on one disk: the group is taken (each disk gets its snapshot)
    snapshot_everything(ctx, instance_id)
    with pytest.raises(EcsError) as caught:
        snapshots.create_snapshot_group(ctx, ACCOUNT, REGION, instance_id)
    assert caught.value.code == "QuotaExceed.Snapshot" and full in caught.value.message
    # the disks below the maximum are not refused
    group_id, task_id = snapshots.create_snapshot_group(ctx, ACCOUNT, REGION, instance_id,
                                                        disk_ids=[first])
    assert instances.wait_task(ctx, task_id).status == TaskStatus.FINISHED
    assert [s for _, s in group_items(ctx, group_id)] and \
        {d for d, _ in group_items(ctx, group_id)} == {first}


def test_stop_charging_gives_capacity_away(ctx: ServiceContext, image: Image) -> None:
    small = make_instance(ctx, image, instance_type="ecs.g6.large")  # 2 vCPU, 8 GiB
    group_id = snapshot_everything(ctx, small)
    instances.wait_task(ctx, instances.stop_instance(ctx, ACCOUNT, small,
                                                     stopped_mode="StopCharging"))
    # someone else takes the freed memory
    other = make_instance(ctx, image, instance_type="ecs.g6.large")
    assert status(ctx, other) == InstanceStatus.RUNNING
    with pytest.raises(EcsError) as caught:
        instances.start_instance(ctx, ACCOUNT, small)
    assert caught.value.code == "OperationDenied.NoStock"
    assert status(ctx, small) == InstanceStatus.STOPPED
    # a rollback with auto start rolls back, then reports the start failure
    preview = rollback.preview_group_rollback(ctx, ACCOUNT, group_id)
    assert "capacity" in preview.stop_charging_warning
    result = rollback.reset_disks(ctx, ACCOUNT, REGION, group_items(ctx, group_id),
                                  auto_start=True)
    task = instances.wait_task(ctx, result.task_id)
    assert task.status == TaskStatus.FINISHED
    assert task.result["start_error"]["Code"] == "OperationDenied.NoStock"
    assert status(ctx, small) == InstanceStatus.STOPPED
    # KeepCharging keeps the reservation, StopCharging gives it back. The region has
    # 8 vCPU and 8 GiB; `other` holds all of the memory.
    assert reserved(ctx) == (2, 8192)
    finished(ctx, instances.stop_instance(ctx, ACCOUNT, other, stopped_mode="KeepCharging"))
    assert status(ctx, other) == InstanceStatus.STOPPED
    assert reserved(ctx) == (2, 8192)  # still held by the stopped `other`
    assert no_stock(lambda: instances.start_instance(ctx, ACCOUNT, small))
    assert no_stock(lambda: instances.run_instances(  # 2 vCPU, 4 GiB: no room for it
        ctx, ACCOUNT, REGION, instances.InstanceRequest(image_id=image.id,
                                                        instance_type="ecs.c6.large")))
    finished(ctx, instances.start_instance(ctx, ACCOUNT, other))  # its room was kept
    assert status(ctx, other) == InstanceStatus.RUNNING
    finished(ctx, instances.stop_instance(ctx, ACCOUNT, other, stopped_mode="StopCharging"))
    assert reserved(ctx) == (0, 0)  # given back
    finished(ctx, instances.start_instance(ctx, ACCOUNT, small))  # so `small` fits again
    assert status(ctx, small) == InstanceStatus.RUNNING
    assert reserved(ctx) == (2, 8192)
    assert no_stock(lambda: instances.start_instance(ctx, ACCOUNT, other))
    assert status(ctx, other) == InstanceStatus.STOPPED


def reserved(ctx: ServiceContext) -> tuple[int, int]:
    capacity = regions.region_capacity(ctx, REGION)
    return capacity.vcpus_used, capacity.memory_mib_used


def no_stock(call: Callable[[], object]) -> bool:
    """The call is refused for want of capacity, with ECS's code."""
    with pytest.raises(EcsError) as caught:
        call()
    assert (caught.value.code, caught.value.http_status) == ("OperationDenied.NoStock", 403)
    return True


def finished(ctx: ServiceContext, task_id: str | None) -> None:
    assert task_id
    task = instances.wait_task(ctx, task_id)
    assert task.status == TaskStatus.FINISHED, (task.error_code, task.error_message)


def test_failed_revert_restores_every_disk(ctx: ServiceContext, image: Image) -> None:
    instance_id = make_instance(ctx, image)
    paths = disk_paths(ctx, instance_id)
    for path in paths.values():
        qcow.write(path, OLD)
    group_id = snapshot_everything(ctx, instance_id)
    for path in paths.values():
        qcow.write(path, NEW)
    instances.wait_task(ctx, instances.stop_instance(ctx, ACCOUNT, instance_id))
    items = group_items(ctx, group_id)
    # the third disk's snapshot vanishes from its file behind ecsnap's back
    import subprocess

    subprocess.run(["qemu-img", "snapshot", "-d", items[2][1], paths[items[2][0]]], check=True)
    result = rollback.reset_disks(ctx, ACCOUNT, REGION, items)
    task = instances.wait_task(ctx, result.task_id)
    assert task.status == TaskStatus.FAILED
    assert all(qcow.holds(p, NEW) for p in paths.values()), "a disk stayed rolled back"
    with ctx.uow() as uow:
        inst = uow.instances.get(instance_id)
        assert inst is not None and inst.lock_task_id is None
        assert all(d.lock_task_id is None for d in attached_disks(uow, instance_id))


def test_other_accounts_see_nothing(ctx: ServiceContext, image: Image) -> None:
    instance_id = make_instance(ctx, image)
    group_id = snapshot_everything(ctx, instance_id)
    assert instances.describe_instances(ctx, OTHER, REGION).items == []
    assert snapshots.describe_snapshot_groups(ctx, OTHER, REGION).items == []
    with pytest.raises(EcsError) as caught:
        instances.stop_instance(ctx, OTHER, instance_id)
    assert caught.value.code == "InvalidInstanceId.NotFound"
    with pytest.raises(EcsError) as caught:
        rollback.reset_disks(ctx, OTHER, REGION, group_items(ctx, group_id))
    assert caught.value.http_status == 404


def test_released_disk_keeps_its_file_until_the_last_snapshot(ctx: ServiceContext,
                                                              image: Image) -> None:
    disk_id = disks.create_disk(ctx, ACCOUNT, REGION, size_gib=20)
    with ctx.uow() as uow:
        path = ctx.storage(uow, REGION).path(disk_id)
    qcow.write(path, OLD)
    snap_id = snapshots.create_snapshot(ctx, ACCOUNT, disk_id, name="keep-me")
    disks.delete_disk(ctx, ACCOUNT, disk_id)
    import os

    assert os.path.exists(path)
    page = snapshots.describe_snapshots(ctx, ACCOUNT, REGION, snapshot_ids=[snap_id])
    assert page.items[0].source_disk_id == disk_id
    assert page.items[0].source_disk_type == DiskType.DATA
    snapshots.delete_snapshot(ctx, ACCOUNT, snap_id)
    assert not os.path.exists(path)


def test_atomic_live_snapshot_failure_leaves_nothing(ctx: ServiceContext, image: Image,
                                                     compute: FileBackedCompute) -> None:
    instance_id = make_instance(ctx, image)
    paths = disk_paths(ctx, instance_id)
    compute.fail_snapshot_of = list(paths)[2]
    group_id, task_id = snapshots.create_snapshot_group(ctx, ACCOUNT, REGION, instance_id)
    task = instances.wait_task(ctx, task_id)
    assert task.status == TaskStatus.FAILED
    view = snapshots.get_snapshot_group(ctx, ACCOUNT, group_id)
    assert view.group.status == SnapshotStatus.FAILED
    for path in paths.values():
        assert qcow.snapshots(path) == ["ecsnap-initial"]


def test_pagination_both_styles(ctx: ServiceContext, image: Image) -> None:
    instance_id = make_instance(ctx, image, data_disks=0)
    made = [snapshot_everything(ctx, instance_id) for _ in range(7)]
    seen: list[str] = []
    token: str | None = None
    for _ in range(10):  # 3 pages; a token that never ends must not hang the test
        page = snapshots.describe_snapshot_groups(ctx, ACCOUNT, REGION, next_token=token,
                                                  max_results=3)
        seen += [v.group.id for v in page.items]
        if not page.next_token:
            break
        token = page.next_token
    else:
        raise AssertionError(f"NextToken never ended: {seen}")
    assert sorted(seen) == sorted(made) and len(seen) == 7
    page2 = snapshots.describe_snapshots(ctx, ACCOUNT, REGION, page_number=2, page_size=5)
    assert page2.total == 7 and len(page2.items) == 2


def test_a_guest_that_does_not_come_up_is_reported(ctx: ServiceContext, image: Image,
                                                   compute: FileBackedCompute) -> None:
    instance_id = make_instance(ctx, image)
    group_id = snapshot_everything(ctx, instance_id)
    instances.wait_task(ctx, instances.stop_instance(ctx, ACCOUNT, instance_id))
    compute.agent_up = False  # the rolled-back guest never answers
    result = rollback.reset_disks(ctx, ACCOUNT, REGION, group_items(ctx, group_id),
                                  auto_start=True)
    task = instances.wait_task(ctx, result.task_id)
    assert task.status == TaskStatus.FINISHED
    health = task.result["health"]
    assert health["GuestAgent"] == "NoResponse"
    assert result.safety_group_id and result.safety_group_id in health["Message"]
