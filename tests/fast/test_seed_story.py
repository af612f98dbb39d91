"""The seed story and the rollback rules through the service functions, on the in-memory
fakes (tests/service/test_seed_story.py tells the same story on qcow2 files)."""

from __future__ import annotations

from pathlib import Path

from ecsnap.domain.model import (
    Consistency,
    GroupPurpose,
    Image,
    InstanceStatus,
    SnapshotStatus,
    TaskStatus,
)
from ecsnap.service import images, instances, regions, rollback, snapshots, tasks_view
from ecsnap.service.context import ServiceContext
from tests.conftest import ACCOUNT, REGION
from tests.fakes.compute import InMemoryCompute
from tests.fakes.context import fast_world
from tests.fakes.storage import InMemoryStorage
from tests.fast.conftest import IMAGE_CONTENT
from tests.fast.story import (
    disks_of,
    finished,
    group_items,
    make_instance,
    snapshot_everything,
    status,
    stop,
)

INITIAL = "ecsnap-initial"


def old(disk_id: str) -> bytes:
    return f"old data of {disk_id}".encode()


def new(disk_id: str) -> bytes:
    return f"new data written to {disk_id} after the snapshot".encode()


def test_seed_story_rolls_back_two_of_three_disks(ctx: ServiceContext, image: Image,
                                                  storage: InMemoryStorage,
                                                  compute: InMemoryCompute) -> None:
    instance_id = make_instance(ctx, image)
    assert status(ctx, instance_id) == InstanceStatus.RUNNING
    disks = disks_of(ctx, instance_id)
    system, data1, data2 = disks
    assert sorted(compute.vms[instance_id].disks) == sorted(disks)
    assert storage.content(system) == IMAGE_CONTENT and storage.content(data1) == b""
    for disk in disks:
        storage.write(disk, old(disk))

    group_id = snapshot_everything(ctx, instance_id)
    view = snapshots.get_snapshot_group(ctx, ACCOUNT, group_id)
    assert view.group.status == SnapshotStatus.ACCOMPLISHED
    assert view.group.consistency == Consistency.FILE_SYSTEM
    assert view.group.tags == {"FsConsistent": "True"}
    assert view.snapshots[0].source_disk_id == system
    items = group_items(ctx, group_id)
    assert [d for d, _ in items] == disks
    assert compute.snapshots_taken == [(instance_id, tuple(items))]  # one live transaction
    for disk, snap in items:
        assert storage.snapshot_content(disk, snap) == old(disk)
        assert storage.snapshot_names(disk) == [INITIAL, snap]

    for disk in disks:
        storage.write(disk, new(disk))
    stop(ctx, instance_id)
    assert status(ctx, instance_id) == InstanceStatus.STOPPED
    assert instance_id not in compute.vms

    chosen = items[:2]  # the system disk and the first data disk
    preview = rollback.preview_reset_disks(ctx, ACCOUNT, REGION, chosen)
    assert preview.failures == []
    assert [(d.disk_id, d.bytes_written_since) for d in preview.disks] == \
        [(disk, len(new(disk))) for disk, _ in chosen]

    result = rollback.reset_disks(ctx, ACCOUNT, REGION, chosen, auto_start=True)
    task = instances.wait_task(ctx, result.task_id)
    assert task.status == TaskStatus.FINISHED, task.error_message
    assert task.result["health"]["GuestAgent"] == "Ok"
    assert status(ctx, instance_id) == InstanceStatus.RUNNING
    assert compute.started == [instance_id, instance_id]
    # exactly the snapshot's content on the chosen disks, the third one untouched
    assert [storage.content(d) for d in disks] == [old(system), old(data1), new(data2)]

    # every snapshot survives, the safety group holds the pre-rollback data
    assert result.safety_group_id
    safety = snapshots.get_snapshot_group(ctx, ACCOUNT, result.safety_group_id)
    assert safety.group.purpose == GroupPurpose.SAFETY
    assert safety.group.status == SnapshotStatus.ACCOMPLISHED
    safety_items = group_items(ctx, result.safety_group_id)
    assert [d for d, _ in safety_items] == [system, data1]
    for disk, snap in safety_items:
        assert storage.snapshot_content(disk, snap) == new(disk)
    for disk, snap in items:
        assert snap in storage.snapshot_names(disk)
    assert storage.snapshot_names(data2) == [INITIAL, items[2][1]]

    # undo the rollback with the safety group
    stop(ctx, instance_id)
    undo = rollback.reset_disks(ctx, ACCOUNT, REGION, safety_items)
    finished(ctx, undo.task_id)
    assert [storage.content(d) for d in disks] == [new(d) for d in disks]
    preview = rollback.preview_reset_disks(ctx, ACCOUNT, REGION, chosen)
    assert [d.bytes_written_since for d in preview.disks] == \
        [len(new(disk)) for disk, _ in chosen]


def test_safety_snapshot_false_leaves_no_snapshot_behind(ctx: ServiceContext, image: Image,
                                                         storage: InMemoryStorage) -> None:
    instance_id = make_instance(ctx, image)
    disks = disks_of(ctx, instance_id)
    for disk in disks:
        storage.write(disk, old(disk))
    group_id = snapshot_everything(ctx, instance_id)
    items = group_items(ctx, group_id)
    for disk in disks:
        storage.write(disk, new(disk))
    stop(ctx, instance_id)

    result = rollback.reset_disks(ctx, ACCOUNT, REGION, items, safety_snapshot=False)
    task = instances.wait_task(ctx, result.task_id)
    assert task.status == TaskStatus.FINISHED, task.error_message
    assert result.safety_group_id is None
    assert task.result["SafetySnapshotGroupId"] == ""
    assert [storage.content(d) for d in disks] == [old(d) for d in disks]
    for disk, snap in items:
        assert storage.snapshot_names(disk) == [INITIAL, snap]
    groups = snapshots.describe_snapshot_groups(ctx, ACCOUNT, REGION).items
    assert [v.group.id for v in groups] == [group_id]
    assert snapshots.describe_snapshots(ctx, ACCOUNT, REGION).total == len(items)


def test_auto_start_reports_a_guest_that_does_not_come_up(ctx: ServiceContext, image: Image,
                                                          compute: InMemoryCompute) -> None:
    instance_id = make_instance(ctx, image)
    group_id = snapshot_everything(ctx, instance_id)
    stop(ctx, instance_id)
    compute.agent_up = False  # the rolled-back guest never answers
    result = rollback.reset_disks(ctx, ACCOUNT, REGION, group_items(ctx, group_id),
                                  auto_start=True)
    task = instances.wait_task(ctx, result.task_id)
    assert task.status == TaskStatus.FINISHED
    assert status(ctx, instance_id) == InstanceStatus.RUNNING
    health = task.result["health"]
    assert health["GuestAgent"] == "NoResponse"
    assert result.safety_group_id and result.safety_group_id in health["Message"]


def test_without_auto_start_the_instance_stays_stopped(ctx: ServiceContext, image: Image,
                                                       compute: InMemoryCompute) -> None:
    instance_id = make_instance(ctx, image)
    group_id = snapshot_everything(ctx, instance_id)
    stop(ctx, instance_id)
    result = rollback.reset_disks(ctx, ACCOUNT, REGION, group_items(ctx, group_id))
    task = instances.wait_task(ctx, result.task_id)
    assert task.status == TaskStatus.FINISHED
    assert "health" not in task.result
    assert status(ctx, instance_id) == InstanceStatus.STOPPED
    assert compute.started == [instance_id]


def test_a_stopped_instance_is_snapshotted_by_the_storage(ctx: ServiceContext, image: Image,
                                                          storage: InMemoryStorage,
                                                          compute: InMemoryCompute) -> None:
    instance_id = make_instance(ctx, image, data_disks=1)
    stop(ctx, instance_id)
    group_id = snapshot_everything(ctx, instance_id)
    view = snapshots.get_snapshot_group(ctx, ACCOUNT, group_id)
    assert view.group.status == SnapshotStatus.ACCOMPLISHED
    assert view.group.consistency == Consistency.CRASH and view.group.tags == {}
    assert compute.snapshots_taken == []
    for disk, snap in group_items(ctx, group_id):
        assert storage.has_snapshot(disk, snap)


def test_tasks_in_background_threads(tmp_path: Path) -> None:
    """The server's way: tasks run in the runner's threads beside the caller's."""
    world = fast_world(tmp_path / "data", background_tasks=True)
    ctx = world.ctx
    try:
        regions.ensure_region(ctx, REGION, vcpus=8, memory_mib=8192)
        template = tmp_path / "tiny.img"
        template.write_bytes(IMAGE_CONTENT)
        image = images.register_image(ctx, REGION, name="tiny", os_name="Tiny Linux",
                                      template=template, size_gib=1)
        instance_id = make_instance(ctx, image)
        [task] = tasks_view.describe_tasks(ctx, ACCOUNT, REGION).items
        finished(ctx, task.id)
        storage = world.storage(REGION)
        disks = disks_of(ctx, instance_id)
        group_id, task_id = snapshots.create_snapshot_group(ctx, ACCOUNT, REGION, instance_id)
        assert instances.wait_task(ctx, task_id, timeout=10).status == TaskStatus.FINISHED
        stop(ctx, instance_id)
        for disk in disks:
            storage.write(disk, new(disk))
        result = rollback.reset_disks(ctx, ACCOUNT, REGION, group_items(ctx, group_id))
        assert instances.wait_task(ctx, result.task_id, timeout=10).status == \
            TaskStatus.FINISHED
        assert [storage.content(d) for d in disks] == [IMAGE_CONTENT, b"", b""]
    finally:
        ctx.runner.shutdown()
