"""Rollback by clone and swap on Ceph RBD, through the service functions (a throwaway
cluster, tests/ceph.py): every chosen disk moves to a clone of its snapshot in one
transaction while its old volume stays exactly as it was; the safety group undoes it;
CollectVolumes removes exactly the volumes nothing needs and flattens deep clone chains;
ReInitDisk clones INITIAL the same way; a rollback that fails leaves every disk where it
was and no clone behind. Crash cases: test_crash_matrix.py (the RBD scenarios)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ecsnap.adapters.storage.base import StorageError
from ecsnap.adapters.storage.rbd import RbdBackend
from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import Disk, Image, TaskStatus
from ecsnap.service import disks, images, inspect, instances, regions, rollback, snapshots
from ecsnap.service.context import ServiceContext, attached_disks
from ecsnap.service.volumes import MAX_CLONE_DEPTH
from tests.ceph import CephCluster, shared
from tests.conftest import ACCOUNT
from tests.inspect.images import make_raw
from tests.storage.guest_data import read, write

RBD_REGION = "ceph-1"
MIB = 1024 * 1024
OLD, NEW, LATER = 0xA1, 0xB2, 0xC3


@pytest.fixture(scope="session")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    with shared(tmp_path_factory) as cluster:
        yield cluster


@pytest.fixture
def rbd_image(ctx: ServiceContext, ceph: CephCluster, template: Path) -> Iterator[Image]:
    spec = ceph.spec()
    regions.ensure_region(ctx, RBD_REGION, vcpus=8, memory_mib=8192, storage_pool=spec)
    yield images.register_image(ctx, RBD_REGION, name="tiny", os_name="Tiny Linux",
                                template=template, size_gib=1)  # ctx's teardown closes the pool


def storage(ctx: ServiceContext) -> RbdBackend:
    backend = ctx.storage_of(RBD_REGION)
    assert isinstance(backend, RbdBackend)
    return backend


def disk_rows(ctx: ServiceContext, instance_id: str) -> list[Disk]:
    with ctx.uow(readonly=True) as uow:
        return attached_disks(uow, instance_id)


def holds(ctx: ServiceContext, volume: str, pattern: int) -> bool:
    return read(storage(ctx).path(volume), 0, MIB) == bytes([pattern]) * MIB


def finished(ctx: ServiceContext, task_id: str | None) -> Any:
    assert task_id
    task = instances.wait_task(ctx, task_id)
    assert task.status == TaskStatus.FINISHED, task.error_message
    return task


def collect_tasks(ctx: ServiceContext) -> list[Any]:
    with ctx.uow(readonly=True) as uow:
        return uow.tasks.find(action="CollectVolumes")


@pytest.fixture
def world(ctx: ServiceContext, rbd_image: Image) -> dict[str, Any]:
    """A stopped instance with 3 disks: OLD written, group `before`, NEW written."""
    req = instances.InstanceRequest(image_id=rbd_image.id, instance_type="ecs.t5-lc2m1.nano",
                                    data_disks=[instances.DataDiskSpec(20),
                                                instances.DataDiskSpec(20)])
    [instance_id] = instances.run_instances(ctx, ACCOUNT, RBD_REGION, req, start=False)
    rows = disk_rows(ctx, instance_id)
    for d in rows:
        write(storage(ctx).path(d.current_volume), OLD, 0, MIB)
    group_id, task_id = snapshots.create_snapshot_group(ctx, ACCOUNT, RBD_REGION, instance_id)
    finished(ctx, task_id)
    for d in rows:
        write(storage(ctx).path(d.current_volume), NEW, 0, MIB)
    view = snapshots.get_snapshot_group(ctx, ACCOUNT, group_id)
    return {"instance": instance_id, "disks": [d.id for d in rows], "group": group_id,
            "items": [(s.source_disk_id, s.id) for s in view.snapshots]}


def test_rollback_clones_and_swaps_all_disks(ctx: ServiceContext, world: dict[str, Any]) -> None:
    before = {d.id: d.current_volume for d in disk_rows(ctx, world["instance"])}
    assert before == {d: d for d in world["disks"]}  # every disk starts on its own ID
    result = rollback.reset_disks(ctx, ACCOUNT, RBD_REGION, world["items"])
    task = finished(ctx, result.task_id)
    assert task.plan["steps"] == ["safety", "clone", "swap"]
    after = {d.id: d.current_volume for d in disk_rows(ctx, world["instance"])}
    assert after == {d: f"{d}.{task.id}" for d in world["disks"]}
    assert all(holds(ctx, v, OLD) for v in after.values())  # the snapshot's data
    assert all(holds(ctx, v, NEW) for v in before.values())  # the old volumes: untouched
    preview = rollback.preview_reset_disks(ctx, ACCOUNT, RBD_REGION, world["items"])
    assert [d.bytes_written_since for d in preview.disks] == [0, 0, 0]
    # undo through the safety group: clones of the safety snapshots on the old volumes
    assert result.safety_group_id
    safety = [(s.source_disk_id, s.id) for s in
              snapshots.get_snapshot_group(ctx, ACCOUNT, result.safety_group_id).snapshots]
    preview = rollback.preview_reset_disks(ctx, ACCOUNT, RBD_REGION, safety)
    assert [d.bytes_written_since for d in preview.disks] == [MIB, MIB, MIB]
    undo = rollback.reset_disks(ctx, ACCOUNT, RBD_REGION, safety)
    undo_task = finished(ctx, undo.task_id)
    now = {d.id: d.current_volume for d in disk_rows(ctx, world["instance"])}
    assert now == {d: f"{d}.{undo_task.id}" for d in world["disks"]}
    assert all(holds(ctx, v, NEW) for v in now.values())
    # every volume holds snapshots (the group, two safety groups) or is current: none goes
    listed = {v for d in world["disks"] for v in storage(ctx).volumes(d)}
    assert listed == set(before.values()) | set(after.values()) | set(now.values())
    assert all(t.status == TaskStatus.FINISHED for t in collect_tasks(ctx))
    # a guest write lands on the current volume only
    write(storage(ctx).path(now[world["disks"][1]]), LATER, 0, MIB)
    assert holds(ctx, after[world["disks"][1]], OLD)


def test_collect_removes_exactly_what_nothing_needs(ctx: ServiceContext,
                                                    world: dict[str, Any]) -> None:
    first = rollback.reset_disks(ctx, ACCOUNT, RBD_REGION, world["items"],
                                 safety_snapshot=False)
    t1 = finished(ctx, first.task_id).id
    # SafetySnapshot=false: the old volumes hold the group's snapshots still: kept
    assert all(storage(ctx).volumes(d) == [d, f"{d}.{t1}"] for d in world["disks"])
    second = rollback.reset_disks(ctx, ACCOUNT, RBD_REGION, world["items"],
                                  safety_snapshot=False)
    t2 = finished(ctx, second.task_id).id
    # the first clones hold nothing now (their safety snapshots were dropped): removed
    assert all(storage(ctx).volumes(d) == [d, f"{d}.{t2}"] for d in world["disks"])
    assert all(holds(ctx, f"{d}.{t2}", OLD) for d in world["disks"])
    [collect] = [t for t in collect_tasks(ctx) if t.result.get("removed")]
    assert sorted(collect.result["removed"]) == sorted(f"{d}.{t1}" for d in world["disks"])
    # a third rollback with a safety group, then the group deleted: its old volumes go
    third = rollback.reset_disks(ctx, ACCOUNT, RBD_REGION, world["items"])
    t3 = finished(ctx, third.task_id).id
    assert all(set(storage(ctx).volumes(d)) == {d, f"{d}.{t2}", f"{d}.{t3}"}
               for d in world["disks"])
    assert third.safety_group_id
    _, task_id = snapshots.delete_snapshot_group(ctx, ACCOUNT, RBD_REGION,
                                                 third.safety_group_id)
    finished(ctx, task_id)
    assert all(storage(ctx).volumes(d) == [d, f"{d}.{t3}"] for d in world["disks"])
    assert all(holds(ctx, f"{d}.{t3}", OLD) for d in world["disks"])


def test_a_deleted_snapshot_the_disk_was_cloned_from(ctx: ServiceContext,
                                                     world: dict[str, Any]) -> None:
    result = rollback.reset_disks(ctx, ACCOUNT, RBD_REGION, world["items"],
                                  safety_snapshot=False)
    task_id = finished(ctx, result.task_id).id
    _, delete = snapshots.delete_snapshot_group(ctx, ACCOUNT, RBD_REGION, world["group"])
    finished(ctx, delete)
    with ctx.uow(readonly=True) as uow:  # gone for the user at once
        assert not any(uow.snapshots.get(s) for _, s in world["items"])
    assert not any(storage(ctx).has_snapshot(d, s) for d, s in world["items"])
    # the data stays for the clones (in RBD's trash) and the old volumes with it
    assert all(holds(ctx, f"{d}.{task_id}", OLD) for d in world["disks"])
    assert all(len(storage(ctx).volumes(d)) == 2 for d in world["disks"])


def test_flatten_bounds_the_clone_chains(ctx: ServiceContext, world: dict[str, Any]) -> None:
    system = world["disks"][0]  # a clone of the image's template: depth 1 from the start
    assert storage(ctx).clone_depth(system) == 1
    items = world["items"]
    depths = []
    for n in range(MAX_CLONE_DEPTH + 1):
        result = rollback.reset_disks(ctx, ACCOUNT, RBD_REGION, items, safety_snapshot=False)
        finished(ctx, result.task_id)
        rows = {d.id: d.current_volume for d in disk_rows(ctx, world["instance"])}
        depths.append(storage(ctx).clone_depth(rows[system]))
        assert all(holds(ctx, v, OLD) for v in rows.values()), n
        # next time from a group of the current volumes: each clone one deeper
        group_id, task_id = snapshots.create_snapshot_group(ctx, ACCOUNT, RBD_REGION,
                                                            world["instance"])
        finished(ctx, task_id)
        items = [(s.source_disk_id, s.id)
                 for s in snapshots.get_snapshot_group(ctx, ACCOUNT, group_id).snapshots]
    assert depths == [2, 3, 0, 1]  # the fourth clone was flattened at once
    assert any(t.result.get("flattened") for t in collect_tasks(ctx))


def test_reinit_clones_initial(ctx: ServiceContext, world: dict[str, Any]) -> None:
    data = world["disks"][1]
    task = finished(ctx, disks.reinit_disk(ctx, ACCOUNT, data))
    assert task.plan["steps"] == ["clone", "swap"]
    [row] = [d for d in disk_rows(ctx, world["instance"]) if d.id == data]
    assert row.current_volume == f"{data}.{task.id}"
    assert read(storage(ctx).path(row.current_volume), 0, MIB) == bytes(MIB)
    assert holds(ctx, data, NEW)  # the old volume holds the group's snapshot: kept
    assert storage(ctx).has_snapshot(data, dict(world["items"])[data])


def test_a_failed_clone_leaves_every_disk_where_it_was(ctx: ServiceContext,
                                                       world: dict[str, Any],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    backend = storage(ctx)
    real = backend.clone_to_volume
    made: list[str] = []

    def clone_then_fail(disk_id: str, snapshot_id: str, volume: str, size: int) -> None:
        real(disk_id, snapshot_id, volume, size)
        made.append(volume)
        if disk_id == world["disks"][2]:
            raise StorageError("the cluster said no")

    monkeypatch.setattr(backend, "clone_to_volume", clone_then_fail)
    result = rollback.reset_disks(ctx, ACCOUNT, RBD_REGION, world["items"])
    task = instances.wait_task(ctx, result.task_id)
    assert task.status == TaskStatus.FAILED and "the cluster said no" in task.error_message
    assert len(made) == 3
    assert all(d.current_volume == d.id for d in disk_rows(ctx, world["instance"]))
    assert all(backend.volumes(d) == [d] for d in world["disks"])  # no clone left
    assert all(holds(ctx, d, NEW) for d in world["disks"])


def test_no_undo_log_snapshots_without_safety_snapshot(ctx: ServiceContext,
                                                       world: dict[str, Any],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """SafetySnapshot=false on the clone path: the old volumes, never written, are the
    undo log, so no snapshot is taken (each costs a monitor round, ~1 s by default)."""
    taken: list[Any] = []
    backend = storage(ctx)
    real = backend.create_snapshots

    def spy(items: Any) -> None:
        taken.append(list(items))
        real(items)

    monkeypatch.setattr(backend, "create_snapshots", spy)
    result = rollback.reset_disks(ctx, ACCOUNT, RBD_REGION, world["items"],
                                  safety_snapshot=False)
    task = finished(ctx, result.task_id)
    assert result.safety_group_id is None
    assert [t for t in taken if t] == []
    assert all(holds(ctx, f"{d}.{task.id}", OLD) for d in world["disks"])
    assert all(holds(ctx, d, NEW) for d in world["disks"])  # the old volumes: as they were
    with ctx.uow(readonly=True) as uow:  # no safety group, not even for a moment
        assert [g.id for g in uow.snapshot_groups.find()] == [world["group"]]
    # with it, the safety snapshots are taken
    kept = rollback.reset_disks(ctx, ACCOUNT, RBD_REGION, world["items"])
    finished(ctx, kept.task_id)
    assert [len(t) for t in taken if t] == [3]


def test_a_full_pool_refuses_snapshots_and_rollbacks(ctx: ServiceContext,
                                                     world: dict[str, Any],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    backend = storage(ctx)
    assert backend.free_bytes() is None  # the test cluster has no manager: no pool stats
    monkeypatch.setattr(backend, "free_bytes", lambda: 10 * MIB)  # what `ceph df` says
    with pytest.raises(EcsError) as refused:
        snapshots.create_snapshot_group(ctx, ACCOUNT, RBD_REGION, world["instance"])
    assert refused.value.code == "OperationDenied.NoSpace"
    with pytest.raises(EcsError) as refused:
        rollback.reset_disks(ctx, ACCOUNT, RBD_REGION, world["items"])
    assert refused.value.code == "OperationDenied.NoSpace"
    with ctx.uow(readonly=True) as uow:  # nothing journaled
        assert [g.id for g in uow.snapshot_groups.find()] == [world["group"]]
    monkeypatch.setattr(backend, "free_bytes", lambda: 1024 * MIB)
    _, task_id = snapshots.create_snapshot_group(ctx, ACCOUNT, RBD_REGION, world["instance"])
    finished(ctx, task_id)


def test_files_of_snapshots_on_any_volume(ctx: ServiceContext, world: dict[str, Any],
                                          tmp_path: Path) -> None:
    """DescribeSnapshotFiles and the preview's file level read an RBD snapshot on whichever
    volume of the disk holds it (a snapshot taken after a rollback is on the clone)."""
    data = world["disks"][1]
    first = make_raw(tmp_path / "a", {"one": b"1", "both": b"old"})
    second = make_raw(tmp_path / "b", {"two": b"2", "both": b"new"})
    fs_copy(first, storage(ctx).path(data))
    s1 = snapshots.create_snapshot(ctx, ACCOUNT, data)
    finished(ctx, rollback.reset_disks(ctx, ACCOUNT, RBD_REGION, [(data, s1)]).task_id)
    [row] = [d for d in disk_rows(ctx, world["instance"]) if d.id == data]
    assert row.volume  # now on a clone
    fs_copy(second, storage(ctx).path(row.current_volume))
    s2 = snapshots.create_snapshot(ctx, ACCOUNT, data)
    assert storage(ctx).snapshot_volume(data, s2) == row.current_volume
    assert storage(ctx).snapshot_volume(data, s1) == data
    for snap, names in ((s1, ["both", "one"]), (s2, ["both", "two"])):
        listed = inspect.describe_snapshot_files(ctx, ACCOUNT, snap, "/")
        assert sorted(e.name for e in listed.entries if e.name != "lost+found") == names
    preview = rollback.preview_reset_disks(ctx, ACCOUNT, RBD_REGION, [(data, s1)],
                                           file_changes=10)
    files = preview.disks[0].files
    assert files is not None and files.file_level == inspect.FileLevel.SUPPORTED, files
    assert {(f.path, f.change) for f in files.files} == {  # since the snapshot
        ("/two", inspect.Change.ADDED), ("/one", inspect.Change.DELETED),
        ("/both", inspect.Change.MODIFIED)}


def fs_copy(image: Path, location: str) -> None:
    subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image),
                    location], check=True, capture_output=True)
