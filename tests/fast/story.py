"""The steps of the seed story on the fakes, shared by the fast service tests."""

from __future__ import annotations

import pytest

from ecsnap.domain.errors import RuleViolations
from ecsnap.domain.model import Image, InstanceStatus, TaskStatus
from ecsnap.service import instances, rollback, snapshots
from ecsnap.service.context import ServiceContext, attached_disks
from tests.conftest import ACCOUNT, REGION
from tests.fakes.context import FastWorld


def make_instance(ctx: ServiceContext, image: Image, *, data_disks: int = 2,
                  instance_type: str = "ecs.t5-lc2m1.nano", start: bool = True,
                  account_id: str = ACCOUNT, region_id: str = REGION) -> str:
    req = instances.InstanceRequest(image_id=image.id, instance_type=instance_type,
                                    data_disks=[instances.DataDiskSpec(20)
                                                for _ in range(data_disks)])
    [instance_id] = instances.run_instances(ctx, account_id, region_id, req, start=start)
    return instance_id


def disks_of(ctx: ServiceContext, instance_id: str) -> list[str]:
    """The instance's attached disks, system disk first."""
    with ctx.uow(readonly=True) as uow:
        return [d.id for d in attached_disks(uow, instance_id)]


def status(ctx: ServiceContext, instance_id: str) -> InstanceStatus:
    with ctx.uow(readonly=True) as uow:
        return uow.instances.load(instance_id).status


def finished(ctx: ServiceContext, task_id: str | None) -> None:
    assert task_id
    task = instances.wait_task(ctx, task_id)
    assert task.status == TaskStatus.FINISHED, (task.error_code, task.error_message)


def snapshot_everything(ctx: ServiceContext, instance_id: str, name: str = "before-upgrade",
                        ) -> str:
    group_id, task_id = snapshots.create_snapshot_group(ctx, ACCOUNT, REGION, instance_id,
                                                        name=name)
    finished(ctx, task_id)
    return group_id


def stop(ctx: ServiceContext, instance_id: str, mode: str | None = None) -> None:
    finished(ctx, instances.stop_instance(ctx, ACCOUNT, instance_id, stopped_mode=mode))


def group_items(ctx: ServiceContext, group_id: str) -> list[tuple[str, str]]:
    """(disk, snapshot) of a group, system disk first, then as the instance's disks go."""
    view = snapshots.get_snapshot_group(ctx, ACCOUNT, group_id)
    order = disks_of(ctx, view.group.instance_id)
    return sorted(((s.source_disk_id, s.id) for s in view.snapshots),
                  key=lambda item: (order.index(item[0]) if item[0] in order else 99, item))


def refused(ctx: ServiceContext, items: list[tuple[str, str]], account_id: str = ACCOUNT,
            ) -> list[tuple[str, str | None]]:
    """The (code, disk) of every failed check of a rollback, which must change nothing."""
    world_before = _fingerprint(ctx)
    with pytest.raises(RuleViolations) as caught:
        rollback.reset_disks(ctx, account_id, REGION, items)
    assert _fingerprint(ctx) == world_before, "a refused rollback changed something"
    return [(f.code, f.disk_id) for f in caught.value.failures]


def _fingerprint(ctx: ServiceContext) -> object:
    world = ctx.extras.get("fast_world")
    assert isinstance(world, FastWorld)
    return fingerprint(world)


def fingerprint(world: FastWorld) -> object:
    """Everything the fakes hold: rows, disks with their snapshots, running VMs."""
    return (world.store.dump(), [p.state() for p in world.pools.all()],
            sorted(world.compute.vms), len(world.compute.started))
