"""The seed story on Ceph RBD with a real VM, through the service functions (bootstrap's
real QEMU driver, the demo image imported into a throwaway cluster's pool, tests/ceph.py):
a running 3-disk instance is snapshotted live (guest frozen; librbd snapshots taken side
by side), the guest writes, the instance stops, two of its disks are rolled back with
AutoStart (clone and swap), the guest reads the snapshot's data on them and its own later
data on the third, and the safety group undoes the rollback."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ecsnap import bootstrap, config
from ecsnap.adapters.compute.qemu import LiveSnapshotTiming, QemuDriver
from ecsnap.adapters.storage.rbd import RbdBackend
from ecsnap.domain.model import Consistency, TaskStatus
from ecsnap.service import images, instances, regions, rollback, setup, snapshots
from ecsnap.service.context import ServiceContext, attached_disks
from tests.ceph import CephCluster, shared

pytestmark = pytest.mark.qemu

REGION = "ceph-1"
CACHE = Path(__file__).parents[2] / ".cache"


@pytest.fixture(scope="session")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    with shared(tmp_path_factory) as cluster:
        yield cluster


def finished(ctx: ServiceContext, task_id: str | None) -> None:
    assert task_id
    task = instances.wait_task(ctx, task_id, timeout=300)
    assert task.status == TaskStatus.FINISHED, task.error_message


def test_the_seed_story_on_rbd_with_a_real_vm(tmp_path_factory: pytest.TempPathFactory,
                                              ceph: CephCluster) -> None:
    data = tmp_path_factory.mktemp("rbdseed")  # short: the VM's sockets live under it
    settings = config.load(data, accel="auto", cache=str(CACHE), background_tasks=True,
                           database_url=f"sqlite:///{data / 'ecsnap.db'}")
    timings: list[LiveSnapshotTiming] = []
    driver = QemuDriver(settings.run_dir, accel=settings.accel,
                        snapshot_observer=timings.append)
    ctx = bootstrap.build(settings, compute=driver, background=True)
    account = setup.initialise(ctx, "local-1").account.id
    regions.ensure_region(ctx, REGION, vcpus=8, memory_mib=8192, storage_pool=ceph.spec())
    instance_id = ""
    try:
        image = images.build_demo_image(ctx, REGION)
        req = instances.InstanceRequest(
            image_id=image.id, instance_type="ecs.t5-lc2m1.nano",
            data_disks=[instances.DataDiskSpec(20), instances.DataDiskSpec(20)])
        [instance_id] = instances.run_instances(ctx, account, REGION, req, start=True)
        deadline = time.monotonic() + 180
        while instances.statuses(ctx, account, [instance_id])[instance_id] != "Running" or \
                not driver.guest_ping(instance_id, timeout=2):
            assert time.monotonic() < deadline, "the instance did not come up"
            time.sleep(0.5)
        with ctx.uow(readonly=True) as uow:
            sys_disk, d1, d2 = (d.id for d in attached_disks(uow, instance_id))

        def sh(command: str) -> str:
            result = driver.guest_exec(instance_id, command, timeout=60)
            assert result.exit_code == 0, result
            return result.stdout.decode()

        sh(f"echo v1 > /root/f; echo v1 > /mnt/{d1}/f; echo v1 > /mnt/{d2}/f")  # no sync
        group_id, task_id = snapshots.create_snapshot_group(ctx, account, REGION,
                                                            instance_id)
        finished(ctx, task_id)
        group = snapshots.get_snapshot_group(ctx, account, group_id)
        assert group.group.consistency == Consistency.FILE_SYSTEM
        commands = [c.command for c in timings[-1].commands]
        assert "rbd-snap-create" in commands and "transaction" not in commands

        sh(f"echo v2 > /root/f; echo v2 > /mnt/{d1}/f; echo v2 > /mnt/{d2}/f; sync")
        finished(ctx, instances.stop_instance(ctx, account, instance_id))
        items = [(s.source_disk_id, s.id) for s in group.snapshots
                 if s.source_disk_id in (sys_disk, d1)]
        result = rollback.reset_disks(ctx, account, REGION, items, auto_start=True)
        finished(ctx, result.task_id)
        deadline = time.monotonic() + 180
        while not driver.guest_ping(instance_id, timeout=2):
            assert time.monotonic() < deadline, "the instance did not come back"
        assert sh(f"cat /root/f /mnt/{d1}/f /mnt/{d2}/f").split() == ["v1", "v1", "v2"]
        backend = ctx.storage_of(REGION)
        assert isinstance(backend, RbdBackend)
        with ctx.uow(readonly=True) as uow:  # the two disks moved to clones, one did not
            moved = {d.id: d.volume for d in attached_disks(uow, instance_id)}
        assert moved[sys_disk] and moved[d1] and not moved[d2]

        # undo: back to what the disks held before the rollback
        finished(ctx, instances.stop_instance(ctx, account, instance_id))
        assert result.safety_group_id
        safety = [(s.source_disk_id, s.id) for s in
                  snapshots.get_snapshot_group(ctx, account, result.safety_group_id).snapshots]
        finished(ctx, rollback.reset_disks(ctx, account, REGION, safety,
                                           auto_start=True).task_id)
        deadline = time.monotonic() + 180
        while not driver.guest_ping(instance_id, timeout=2):
            assert time.monotonic() < deadline, "the instance did not come back"
        assert sh(f"cat /root/f /mnt/{d1}/f /mnt/{d2}/f").split() == ["v2", "v2", "v2"]
    finally:
        for vm in driver.running():
            driver.stop(vm, force=True)
        ctx.close()  # the runner's steps first, then the pool's Ceph connection
