"""A released disk's last snapshots: their deletes are serialised like those of an attached
disk, the file goes with the last one, and the disk's row outlives every snapshot that
refers to it (hardening, input edges)."""

from __future__ import annotations

import os

import pytest

from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import Image, TaskStatus
from ecsnap.service import disks, snapshots
from ecsnap.service.context import ServiceContext
from ecsnap.service.snapshots import DeleteSnapshots
from tests.conftest import ACCOUNT, REGION


def test_deletes_of_a_released_disks_last_snapshots_are_serialised(
        ctx: ServiceContext, image: Image) -> None:
    disk_id = disks.create_disk(ctx, ACCOUNT, REGION, size_gib=20)
    path = ctx.storage_of(REGION).path(disk_id)
    first = snapshots.create_snapshot(ctx, ACCOUNT, disk_id, name="first")
    second = snapshots.create_snapshot(ctx, ACCOUNT, disk_id, name="second")
    disks.delete_disk(ctx, ACCOUNT, disk_id)
    with ctx.uow() as uow:  # a delete of the first, accepted and not run yet
        snap = uow.snapshots.load(first)
        task = ctx.runner.journal(uow, DeleteSnapshots, DeleteSnapshots.check(uow, [snap], None),
                                  account_id=ACCOUNT, region_id=REGION, resource_id=first)
        uow.commit()
    with pytest.raises(EcsError) as refused:  # meanwhile: the other one waits its turn
        snapshots.delete_snapshot(ctx, ACCOUNT, second)
    assert refused.value.code == "Operation.Conflict"
    assert ctx.runner.drive(task.id).status == TaskStatus.FINISHED
    with ctx.uow(readonly=True) as uow:  # the row stays while `second` refers to it
        assert uow.disks.load(disk_id).released
    assert os.path.exists(path)
    snapshots.delete_snapshot(ctx, ACCOUNT, second)
    assert not os.path.exists(path)
    with ctx.uow(readonly=True) as uow:
        assert uow.disks.get(disk_id) is None
        assert uow.snapshots.count(source_disk_id=disk_id) == 0
