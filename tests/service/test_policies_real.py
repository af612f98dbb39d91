"""Automatic snapshot policies on the real path: SQLite, real qcow2 files, the real service
and task runner; the scheduler driven by an injected clock past a time point, then past
RetentionDays. The VM is the file-backed test double (tests/doubles.py): its live
snapshots are qemu-img's on the real disk files. (A running QEMU VM: tests/e2e.)"""

from __future__ import annotations

from datetime import datetime, timedelta

from ecsnap.domain.model import Image, SnapshotStatus
from ecsnap.service import policies, snapshots
from ecsnap.service.context import ServiceContext
from ecsnap.service.scheduler import PolicyScheduler
from tests import qcow
from tests.conftest import ACCOUNT, REGION
from tests.fast.story import disks_of, make_instance

EVERY_DAY = [str(d) for d in range(1, 8)]


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def test_auto_snapshot_on_qcow2_then_retention_keeps_the_manual_one(
        ctx: ServiceContext, image: Image) -> None:
    instance_id = make_instance(ctx, image, data_disks=1)
    system, data = disks_of(ctx, instance_id)
    storage = ctx.storage_of(REGION)
    clock = Clock(datetime(2026, 3, 2, 9, 30))  # a Monday
    policy_id = policies.create_policy(ctx, ACCOUNT, REGION, time_points=["10"],
                                       repeat_weekdays=EVERY_DAY, retention_days=2,
                                       name="nightly", now=clock.now)
    policies.apply_policy(ctx, ACCOUNT, REGION, policy_id, [data], now=clock.now)
    manual = snapshots.create_snapshot(ctx, ACCOUNT, data, name="mine")
    scheduler = PolicyScheduler(ctx, clock=clock)
    assert scheduler.tick().taken == []  # 09:30: not yet

    clock.now = datetime(2026, 3, 2, 10, 0, 30)
    [auto_id] = scheduler.tick().taken
    auto = snapshots.describe_snapshots(ctx, ACCOUNT, REGION, snapshot_ids=[auto_id]).items[0]
    assert (auto.name, auto.snapshot_type, auto.status, auto.source_disk_id,
            auto.policy_id, auto.retention_days) == (
        "auto_20260302_1", "auto", SnapshotStatus.ACCOMPLISHED, data, policy_id, 2)
    assert auto_id in qcow.snapshots(storage.path(data))  # a real internal snapshot
    assert scheduler.tick().taken == []  # that time point, never again
    assert snapshots.describe_snapshots(ctx, ACCOUNT, REGION, disk_id=system).total == 0

    # two days on (the snapshots' creation time is the real clock's: move it back to the
    # time point, as if taken then), retention deletes the automatic one, not the manual
    with ctx.uow() as uow:
        for snap in uow.snapshots.find():
            snap.created = datetime(2026, 3, 2, 10, 0, 30)
        uow.commit()
    clock.now = datetime(2026, 3, 4, 10, 0, 30) + timedelta(minutes=1)
    report = scheduler.tick()
    assert report.expired == [auto_id]
    [newest] = report.taken  # and Wednesday's is taken
    left = {s.id: s for s in snapshots.describe_snapshots(ctx, ACCOUNT, REGION,
                                                          page_size=100).items}
    assert auto_id not in left and manual in left and newest in left
    assert left[newest].name == "auto_20260304_1"
    on_disk = qcow.snapshots(storage.path(data))
    assert auto_id not in on_disk and manual in on_disk and newest in on_disk
