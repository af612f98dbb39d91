"""The seed story through the service functions in a region whose disks live in a Ceph
RBD pool (a throwaway cluster, tests/ceph.py): the services are the same as on qcow2 and
do not know the difference. The compute double (tests/doubles.py) takes its "live"
snapshots with `qemu-img snapshot` on each disk's path(), which QEMU's rbd driver serves
as it serves a qcow2 file, so it needs no RBD variant."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import (
    Consistency,
    GroupPurpose,
    Image,
    InstanceStatus,
    SnapshotStatus,
    TaskStatus,
)
from ecsnap.service import images, instances, regions, rollback, snapshots
from ecsnap.service.context import ServiceContext, attached_disks
from tests.ceph import CephCluster, shared
from tests.conftest import ACCOUNT
from tests.storage.guest_data import read, write

RBD_REGION = "ceph-1"
MIB = 1024 * 1024
OLD, NEW = 0xA1, 0xB2


@pytest.fixture(scope="session")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    with shared(tmp_path_factory) as cluster:
        yield cluster


@pytest.fixture
def rbd_image(ctx: ServiceContext, ceph: CephCluster, template: Path) -> Iterator[Image]:
    """The tiny image, registered in a region on the cluster's pool."""
    spec = ceph.spec()
    regions.ensure_region(ctx, RBD_REGION, vcpus=8, memory_mib=8192, storage_pool=spec)
    yield images.register_image(ctx, RBD_REGION, name="tiny", os_name="Tiny Linux",
                                template=template, size_gib=1)  # ctx's teardown closes the pool


def holds(path: str, pattern: int) -> bool:
    return read(path, 0, MIB) == bytes([pattern]) * MIB


def disk_paths(ctx: ServiceContext, instance_id: str) -> dict[str, str]:
    """Where each disk's current content is: its current volume (a rollback clones the
    snapshot into a new one)."""
    with ctx.uow() as uow:
        storage = ctx.storage(uow, RBD_REGION)
        return {d.id: storage.path(d.current_volume) for d in attached_disks(uow, instance_id)}


def group_items(ctx: ServiceContext, group_id: str) -> list[tuple[str, str]]:
    view = snapshots.get_snapshot_group(ctx, ACCOUNT, group_id)
    return sorted((s.source_disk_id, s.id) for s in view.snapshots)


def finished(ctx: ServiceContext, task_id: str | None) -> None:
    assert task_id
    task = instances.wait_task(ctx, task_id)
    assert task.status == TaskStatus.FINISHED, task.error_message


def test_region_on_an_rbd_pool(ctx: ServiceContext, ceph: CephCluster,
                               rbd_image: Image) -> None:
    region = regions.describe_regions(ctx)
    assert {r.id: r.storage_pool for r in region}[RBD_REGION] == ceph.spec()
    # again with the same pool: nothing changes; another pool: refused
    regions.ensure_region(ctx, RBD_REGION, vcpus=8, memory_mib=8192, storage_pool=ceph.spec())
    with pytest.raises(EcsError, match="cannot change"):
        regions.ensure_region(ctx, RBD_REGION, vcpus=8, memory_mib=8192,
                              storage_pool=ceph.spec("other"))
    for bad in ("rbd:nopool?conf=" + str(ceph.conf), "rbd:a/b"):
        with pytest.raises(EcsError) as caught:
            regions.ensure_region(ctx, "ceph-2", vcpus=8, memory_mib=8192, storage_pool=bad)
        assert caught.value.code == "InvalidParameter.StoragePool"
    assert "ceph-2" not in {r.id for r in regions.describe_regions(ctx)}


def test_seed_story_on_rbd(ctx: ServiceContext, rbd_image: Image) -> None:
    req = instances.InstanceRequest(image_id=rbd_image.id, instance_type="ecs.t5-lc2m1.nano",
                                    data_disks=[instances.DataDiskSpec(20),
                                                instances.DataDiskSpec(20)])
    [instance_id] = instances.run_instances(ctx, ACCOUNT, RBD_REGION, req)
    paths = disk_paths(ctx, instance_id)
    assert len(paths) == 3 and all(p.startswith("rbd:") for p in paths.values())
    system, data1, data2 = paths
    assert holds(paths[system], 0x11)  # the image's data, through the clone
    for path in paths.values():
        write(path, OLD, 0, MIB)

    group_id, task_id = snapshots.create_snapshot_group(ctx, ACCOUNT, RBD_REGION,
                                                        instance_id, name="before-upgrade")
    finished(ctx, task_id)
    view = snapshots.get_snapshot_group(ctx, ACCOUNT, group_id)
    assert view.group.status == SnapshotStatus.ACCOMPLISHED
    assert view.group.consistency == Consistency.FILE_SYSTEM
    assert {s.source_disk_id for s in view.snapshots} == set(paths)

    for path in paths.values():
        write(path, NEW, 0, MIB)
    finished(ctx, instances.stop_instance(ctx, ACCOUNT, instance_id))

    chosen = [item for item in group_items(ctx, group_id) if item[0] in (data1, data2)]
    preview = rollback.preview_reset_disks(ctx, ACCOUNT, RBD_REGION, chosen)
    assert preview.failures == []
    assert [d.bytes_written_since for d in preview.disks] == [MIB, MIB]

    result = rollback.reset_disks(ctx, ACCOUNT, RBD_REGION, chosen, auto_start=True)
    finished(ctx, result.task_id)
    with ctx.uow() as uow:
        inst = uow.instances.get(instance_id)
        assert inst is not None and inst.status == InstanceStatus.RUNNING
    before, paths = paths, disk_paths(ctx, instance_id)
    assert holds(paths[data1], OLD) and holds(paths[data2], OLD)
    assert holds(paths[system], NEW) and paths[system] == before[system]
    # cloned into new volumes: the old ones are as they were (the safety snapshots' data)
    assert paths[data1] != before[data1] and holds(before[data1], NEW)
    preview = rollback.preview_reset_disks(ctx, ACCOUNT, RBD_REGION, chosen)
    assert [d.bytes_written_since for d in preview.disks] == [0, 0]

    # the safety group holds the data the rollback overwrote: rolling back to it undoes it
    assert result.safety_group_id
    safety = snapshots.get_snapshot_group(ctx, ACCOUNT, result.safety_group_id)
    assert safety.group.purpose == GroupPurpose.SAFETY
    assert safety.group.status == SnapshotStatus.ACCOMPLISHED
    assert {s.source_disk_id for s in safety.snapshots} == {data1, data2}
    finished(ctx, instances.stop_instance(ctx, ACCOUNT, instance_id))
    undo = rollback.reset_disks(ctx, ACCOUNT, RBD_REGION,
                                group_items(ctx, result.safety_group_id))
    finished(ctx, undo.task_id)
    paths = disk_paths(ctx, instance_id)
    assert all(holds(p, NEW) for p in paths.values())

    # the instance goes; its disks' images stay while their snapshots do (as in ECS)
    finished(ctx, instances.delete_instance(ctx, ACCOUNT, instance_id, force=True))
    storage = ctx.storage_of(RBD_REGION)
    assert all(storage.has_snapshot(d, s) for d, s in group_items(ctx, group_id))
