"""Restore a snapshot to a new disk (CreateDisk SnapshotId, RunInstances
DataDisk.N.SnapshotId), on the in-memory fakes: the new disk has the snapshot's content,
its SourceSnapshotId, the size rules of ECS, its codes, and leaves the source untouched."""

from __future__ import annotations

import pytest

from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import GIB, Image
from ecsnap.service import disks, instances, snapshots
from tests.conftest import ACCOUNT, OTHER, REGION
from tests.fakes.context import FastWorld
from tests.fast.story import disks_of, finished, make_instance


def _disk(world: FastWorld, disk_id: str):  # type: ignore[no-untyped-def]
    with world.ctx.uow(readonly=True) as uow:
        return uow.disks.load(disk_id)


def _snapshot_of(world: FastWorld, content: bytes, size_gib: int = 20) -> tuple[str, str]:
    ctx, storage = world.ctx, world.storage(REGION)
    disk_id = disks.create_disk(ctx, ACCOUNT, REGION, size_gib=size_gib)
    storage.write(disk_id, content)
    snap_id = snapshots.create_snapshot(ctx, ACCOUNT, disk_id)
    storage.write(disk_id, b"written after the snapshot")
    return disk_id, snap_id


def test_create_disk_from_a_snapshot(world: FastWorld) -> None:
    ctx, storage = world.ctx, world.storage(REGION)
    source, snap = _snapshot_of(world, b"the data to look at", size_gib=40)
    new = disks.create_disk(ctx, ACCOUNT, REGION, size_gib=None, snapshot_id=snap,
                            name="restored")
    disk = _disk(world, new)
    assert (disk.status.value, disk.size_gib, disk.source_snapshot_id) == \
        ("Available", 40, snap)
    assert storage.content(new) == b"the data to look at"
    assert storage.content(source) == b"written after the snapshot"  # untouched
    assert ("create_from_snapshot", new, f"{source}@{snap}") in storage.calls
    # a larger Size wins; a smaller one gives the snapshot's size (ECS: the max of both)
    bigger = disks.create_disk(ctx, ACCOUNT, REGION, size_gib=60, snapshot_id=snap)
    smaller = disks.create_disk(ctx, ACCOUNT, REGION, size_gib=20, snapshot_id=snap)
    assert (_disk(world, bigger).size_gib, _disk(world, smaller).size_gib) == (60, 40)
    assert storage.virtual_size(bigger) == 60 * GIB
    # the new disk's own snapshots and re-init work as any disk's
    assert storage.has_snapshot(new, "ecsnap-initial")
    page = disks.describe_disks(ctx, ACCOUNT, REGION, disk_ids=[new])
    assert [d.source_snapshot_id for d in page.items] == [snap]


def test_a_system_disk_snapshot_restores_to_a_data_disk(world: FastWorld,
                                                        image: Image) -> None:
    """As on ECS, CreateDisk takes a system disk's snapshot (to look at its files)."""
    ctx = world.ctx
    instance_id = make_instance(ctx, image, data_disks=0)
    [system] = disks_of(ctx, instance_id)
    snap = snapshots.create_snapshot(ctx, ACCOUNT, system)
    new = disks.create_disk(ctx, ACCOUNT, REGION, size_gib=None, snapshot_id=snap)
    assert world.storage(REGION).content(new) == world.storage(REGION).content(system)
    # but RunInstances' data disks must come from data disks' snapshots
    with pytest.raises(EcsError) as caught:
        instances.run_instances(ctx, ACCOUNT, REGION, instances.InstanceRequest(
            image.id, "ecs.t5-lc2m1.nano",
            data_disks=[instances.DataDiskSpec(None, snapshot_id=snap)]))
    assert (caught.value.code, caught.value.http_status) == \
        ("InvalidSnapshotId.NotDataDiskSnapshot", 403)


def test_refusals(world: FastWorld) -> None:
    ctx = world.ctx
    _, snap = _snapshot_of(world, b"alice's")
    cases: list[tuple[str | None, str, int]] = [
        ("s-missing", "InvalidSnapshotId.NotFound", 404),
        (None, "MissingParameter", 400),
    ]
    for snapshot_id, code, status in cases:
        with pytest.raises(EcsError) as caught:
            disks.create_disk(ctx, ACCOUNT, REGION, size_gib=None, snapshot_id=snapshot_id)
        assert (caught.value.code, caught.value.http_status) == (code, status), snapshot_id
    # another account's snapshot does not exist for Bob, and nothing is made
    before = world.storage(REGION).state()
    with pytest.raises(EcsError) as caught:
        disks.create_disk(ctx, OTHER, REGION, size_gib=None, snapshot_id=snap)
    assert caught.value.code == "InvalidSnapshotId.NotFound"
    assert world.storage(REGION).state() == before


def test_a_snapshot_still_being_taken_is_not_ready(world: FastWorld) -> None:
    ctx = world.ctx
    _, snap = _snapshot_of(world, b"x")
    with ctx.uow() as uow:
        from ecsnap.domain.model import SnapshotStatus
        uow.snapshots.load(snap).status = SnapshotStatus.PROGRESSING
        uow.commit()
    with pytest.raises(EcsError) as caught:
        disks.create_disk(ctx, ACCOUNT, REGION, size_gib=None, snapshot_id=snap)
    assert (caught.value.code, caught.value.http_status) == ("InvalidSnapshotId.NotReady", 403)


def test_deleting_a_snapshot_that_created_disks_needs_force(world: FastWorld) -> None:
    ctx, storage = world.ctx, world.storage(REGION)
    source, snap = _snapshot_of(world, b"keep me")
    new = disks.create_disk(ctx, ACCOUNT, REGION, size_gib=None, snapshot_id=snap)
    with pytest.raises(EcsError) as caught:
        snapshots.delete_snapshot(ctx, ACCOUNT, snap)
    assert (caught.value.code, caught.value.http_status) == ("SnapshotCreatedDisk", 403)
    finished(ctx, snapshots.delete_snapshot(ctx, ACCOUNT, snap, force=True))
    assert not storage.has_snapshot(source, snap)
    assert storage.content(new) == b"keep me"
    # once the disks it created are released, no Force is needed
    _, other = _snapshot_of(world, b"y")
    made = disks.create_disk(ctx, ACCOUNT, REGION, size_gib=None, snapshot_id=other)
    disks.delete_disk(ctx, ACCOUNT, made)
    finished(ctx, snapshots.delete_snapshot(ctx, ACCOUNT, other))


def test_run_instances_with_a_data_disk_from_a_snapshot(world: FastWorld,
                                                        image: Image) -> None:
    ctx, storage = world.ctx, world.storage(REGION)
    _, snap = _snapshot_of(world, b"data disk content", size_gib=30)
    [instance_id] = instances.run_instances(ctx, ACCOUNT, REGION, instances.InstanceRequest(
        image.id, "ecs.t5-lc2m1.nano",
        data_disks=[instances.DataDiskSpec(None, snapshot_id=snap),
                    instances.DataDiskSpec(20)]))
    _, restored, blank = disks_of(ctx, instance_id)
    assert storage.content(restored) == b"data disk content"
    assert storage.content(blank) == b""
    assert (_disk(world, restored).size_gib, _disk(world, restored).source_snapshot_id) == \
        (30, snap)
    for spec, code, status in [
            (instances.DataDiskSpec(20, snapshot_id=snap), "InvalidDiskSize.TooSmall", 403),
            (instances.DataDiskSpec(None, snapshot_id="s-none"),
             "InvalidDataDiskSnapshotId.NotFound", 404)]:
        with pytest.raises(EcsError) as caught:
            instances.run_instances(ctx, ACCOUNT, REGION, instances.InstanceRequest(
                image.id, "ecs.t5-lc2m1.nano", data_disks=[spec]))
        assert (caught.value.code, caught.value.http_status) == (code, status)
