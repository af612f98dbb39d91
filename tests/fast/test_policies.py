"""Automatic snapshot policies on the fakes: the actions' rules, and the scheduler driven by
an injected clock (no sleeping): due, exactly once (two schedulers racing), catch-up after
downtime, retention, and a deleted policy's disks."""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta

import pytest

from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import Image, Snapshot
from ecsnap.service import disks, policies, snapshots
from ecsnap.service.context import ServiceContext
from ecsnap.service.scheduler import PolicyScheduler
from tests.conftest import ACCOUNT, REGION
from tests.fakes.context import FastWorld
from tests.fast.story import disks_of, make_instance, snapshot_everything

EVERY_DAY = [str(d) for d in range(1, 8)]
# 2026-03-02 is a Monday
MONDAY_0930 = datetime(2026, 3, 2, 9, 30)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def _policy(ctx: ServiceContext, hours: list[str], days: list[str] | None = None,
            retention: int = -1, now: datetime = MONDAY_0930) -> str:
    return policies.create_policy(ctx, ACCOUNT, REGION, time_points=hours,
                                  repeat_weekdays=days or EVERY_DAY, retention_days=retention,
                                  name="nightly", now=now)


def _disk(ctx: ServiceContext) -> str:
    return disks.create_disk(ctx, ACCOUNT, REGION, size_gib=20)


def _autos(ctx: ServiceContext, disk_id: str | None = None) -> list[Snapshot]:
    page = snapshots.describe_snapshots(ctx, ACCOUNT, REGION, snapshot_type="auto",
                                        disk_id=disk_id, page_size=100)
    return page.items


def _policy_of(ctx: ServiceContext, disk_id: str) -> str:
    with ctx.uow(readonly=True) as uow:
        return uow.disks.load(disk_id).auto_snapshot_policy_id


# ------------------------------------------------------------------ the actions


@pytest.mark.parametrize(("hours", "days", "retention", "code"), [
    (["24"], EVERY_DAY, -1, "InvalidTimePoints.Malformed"),
    (["x"], EVERY_DAY, -1, "InvalidTimePoints.Malformed"),
    ([], EVERY_DAY, -1, "InvalidTimePoints.Malformed"),
    (["1", "1"], EVERY_DAY, -1, "InvalidTimePoints.Malformed"),
    (["1"], ["0"], -1, "InvalidRepeatWeekdays.Malformed"),
    (["1"], ["8"], -1, "InvalidRepeatWeekdays.Malformed"),
    (["1"], EVERY_DAY, 0, "InvalidRetentionDays.Malformed"),
    (["1"], EVERY_DAY, 65537, "InvalidRetentionDays.Malformed"),
    (["1"], EVERY_DAY, -2, "InvalidRetentionDays.Malformed"),
])
def test_create_refuses_bad_values(ctx: ServiceContext, hours: list[str], days: list[str],
                                   retention: int, code: str) -> None:
    with pytest.raises(EcsError) as caught:
        policies.create_policy(ctx, ACCOUNT, REGION, time_points=hours, repeat_weekdays=days,
                               retention_days=retention)
    assert caught.value.code == code
    assert policies.describe_policies(ctx, ACCOUNT, REGION).total == 0


def test_create_refuses_a_bad_name(ctx: ServiceContext) -> None:
    with pytest.raises(EcsError) as caught:
        policies.create_policy(ctx, ACCOUNT, REGION, time_points=["1"],
                               repeat_weekdays=["1"], retention_days=-1, name="http://x")
    assert caught.value.code == "InvalidAutoSnapshotPolicyName.Malformed"


def test_create_describe_modify_apply_cancel_delete(ctx: ServiceContext) -> None:
    policy_id = _policy(ctx, ["2", "14"], ["1", "3"], retention=7)
    assert policy_id.startswith("sp-")
    [view] = policies.describe_policies(ctx, ACCOUNT, REGION).items
    assert (view.policy.time_points, view.policy.repeat_weekdays, view.disk_nums) == \
        ([2, 14], [1, 3], 0)
    policies.modify_policy(ctx, ACCOUNT, REGION, policy_id, name="weekly", time_points=["5"],
                           retention_days=-1)
    d1, d2 = _disk(ctx), _disk(ctx)
    policies.apply_policy(ctx, ACCOUNT, REGION, policy_id, [d1, d2])
    [view] = policies.describe_policies(ctx, ACCOUNT, REGION, policy_ids=[policy_id]).items
    assert (view.policy.name, view.policy.time_points, view.policy.retention_days,
            view.disk_nums) == ("weekly", [5], -1, 2)
    assert _policy_of(ctx, d1) == policy_id
    policies.cancel_policy(ctx, ACCOUNT, REGION, [d1])
    assert _policy_of(ctx, d1) == ""
    policies.delete_policy(ctx, ACCOUNT, REGION, policy_id)
    assert _policy_of(ctx, d2) == ""
    assert policies.describe_policies(ctx, ACCOUNT, REGION).total == 0


def test_unknown_ids_and_other_tenants(ctx: ServiceContext) -> None:
    policy_id = _policy(ctx, ["1"])
    disk_id = _disk(ctx)
    for call in (lambda: policies.delete_policy(ctx, "acc-bob", REGION, policy_id),
                 lambda: policies.apply_policy(ctx, "acc-bob", REGION, policy_id, [disk_id]),
                 lambda: policies.modify_policy(ctx, ACCOUNT, REGION, "sp-nope", name="ab")):
        with pytest.raises(EcsError) as caught:
            call()
        assert caught.value.code == "InvalidAutoSnapshotPolicyId.NotFound"
    with pytest.raises(EcsError) as caught:
        policies.apply_policy(ctx, ACCOUNT, REGION, policy_id, ["d-nope"])
    assert caught.value.code == "InvalidDiskId.NotFound"
    assert _policy_of(ctx, disk_id) == ""
    assert policies.describe_policies(ctx, "acc-bob", REGION).total == 0


def test_malformed_disk_ids_answer_ecs_code(ctx: ServiceContext) -> None:
    policy_id = _policy(ctx, ["10"])
    for call in (lambda: policies.apply_policy(ctx, ACCOUNT, REGION, policy_id, [""]),
                 lambda: policies.cancel_policy(ctx, ACCOUNT, REGION, ["d-1"] * 1001)):
        with pytest.raises(EcsError) as caught:
            call()
        assert (caught.value.code, caught.value.http_status) == ("ParameterInvalid", 403)


def test_policies_page_like_ecs(ctx: ServiceContext) -> None:
    made = {_policy(ctx, [str(h)]) for h in range(5)}
    seen = set()
    for number in (1, 2, 3):
        page = policies.describe_policies(ctx, ACCOUNT, REGION, page_number=number,
                                          page_size=2)
        assert page.total == 5
        seen |= {v.policy.id for v in page.items}
    assert seen == made


# ------------------------------------------------------------------ the scheduler


def test_due_snapshot_taken_once_named_as_ecs(ctx: ServiceContext) -> None:
    clock = Clock(MONDAY_0930)
    policy_id = _policy(ctx, ["10"], retention=3)
    disk_id = _disk(ctx)
    policies.apply_policy(ctx, ACCOUNT, REGION, policy_id, [disk_id], now=clock.now)
    scheduler = PolicyScheduler(ctx, clock=clock)
    assert scheduler.tick().taken == []  # 09:30: nothing due yet (applied after 10:00 of
    clock.now = MONDAY_0930 + timedelta(minutes=31)  # the day before: not taken at once)
    report = scheduler.tick()
    assert len(report.taken) == 1
    assert scheduler.tick().taken == []  # the same time point: never twice
    [snap] = _autos(ctx, disk_id)
    assert (snap.name, snap.snapshot_type, snap.policy_id, snap.status.value,
            snap.retention_days) == ("auto_20260302_1", "auto", policy_id, "accomplished", 3)
    assert snapshots.describe_snapshots(ctx, ACCOUNT, REGION, snapshot_type="user").total == 0
    clock.now = datetime(2026, 3, 3, 10, 0)
    scheduler.tick()
    assert sorted(s.name for s in _autos(ctx, disk_id)) == ["auto_20260302_1",
                                                            "auto_20260303_1"]


def test_weekdays_are_monday_to_sunday(ctx: ServiceContext) -> None:
    clock = Clock(datetime(2026, 3, 6, 23, 0))  # a Friday
    policy_id = _policy(ctx, ["0"], ["7"], now=clock.now)  # Sundays at 00:00
    disk_id = _disk(ctx)
    policies.apply_policy(ctx, ACCOUNT, REGION, policy_id, [disk_id], now=clock.now)
    scheduler = PolicyScheduler(ctx, clock=clock)
    clock.now = datetime(2026, 3, 7, 23, 59)  # Saturday
    assert scheduler.tick().taken == []
    clock.now = datetime(2026, 3, 8, 0, 1)  # Sunday
    assert len(scheduler.tick().taken) == 1


def test_time_zone_of_the_region(world: FastWorld) -> None:
    ctx = world.ctx
    ctx.settings.snapshot_policy_timezones = {REGION: "Asia/Shanghai"}  # UTC+8
    clock = Clock(datetime(2026, 3, 2, 0, 0))  # 08:00 in Shanghai
    policy_id = _policy(ctx, ["9"], now=clock.now)
    disk_id = _disk(ctx)
    policies.apply_policy(ctx, ACCOUNT, REGION, policy_id, [disk_id], now=clock.now)
    scheduler = PolicyScheduler(ctx, clock=clock)
    clock.now = datetime(2026, 3, 2, 0, 59)
    assert scheduler.tick().taken == []
    clock.now = datetime(2026, 3, 2, 1, 0)  # 09:00 in Shanghai
    assert len(scheduler.tick().taken) == 1


def test_two_schedulers_racing_take_each_time_point_once(world: FastWorld) -> None:
    ctx = world.ctx
    clock = Clock(MONDAY_0930)
    policy_id = _policy(ctx, ["10", "11"])
    disk_ids = [_disk(ctx) for _ in range(4)]
    policies.apply_policy(ctx, ACCOUNT, REGION, policy_id, disk_ids, now=clock.now)
    clock.now = MONDAY_0930 + timedelta(hours=1)
    a, b = PolicyScheduler(ctx, clock=clock), PolicyScheduler(ctx, clock=clock)
    start = threading.Barrier(2)
    reports: list[policies.TickReport] = []

    def run(s: PolicyScheduler) -> None:
        start.wait()
        reports.append(s.tick())

    threads = [threading.Thread(target=run, args=(s,)) for s in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(len(r.taken) for r in reports) == 4
    for disk_id in disk_ids:
        assert len(_autos(ctx, disk_id)) == 1


def test_catch_up_after_downtime_is_one_snapshot_per_disk(
        ctx: ServiceContext, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock(MONDAY_0930)
    policy_id = _policy(ctx, ["10", "14", "18"])
    disk_ids = [_disk(ctx), _disk(ctx)]
    policies.apply_policy(ctx, ACCOUNT, REGION, policy_id, disk_ids, now=clock.now)
    scheduler = PolicyScheduler(ctx, clock=clock)
    clock.now = datetime(2026, 3, 2, 10, 5)
    assert len(scheduler.tick().taken) == 2
    clock.now = datetime(2026, 3, 4, 15, 0)  # down from Monday 10:05 to Wednesday 15:00
    with caplog.at_level(logging.WARNING, logger="ecsnap.policies"):
        report = scheduler.tick()
    assert len(report.taken) == 2 and sorted(report.caught_up) == sorted(disk_ids)
    for disk_id in disk_ids:
        assert sorted(s.name for s in _autos(ctx, disk_id)) == ["auto_20260302_1",
                                                                "auto_20260304_1"]
    # missed: Mon 14, 18; Tue 10, 14, 18; Wed 10 (Wed 14 is the one taken)
    assert "missed 6 time point(s)" in caplog.text
    assert scheduler.tick().taken == []


def test_busy_disk_waits_for_the_next_tick(ctx: ServiceContext, image: Image) -> None:
    clock = Clock(MONDAY_0930)
    instance_id = make_instance(ctx, image, data_disks=0)
    [system] = disks_of(ctx, instance_id)
    policy_id = _policy(ctx, ["10"])
    policies.apply_policy(ctx, ACCOUNT, REGION, policy_id, [system], now=clock.now)
    with ctx.uow() as uow:
        uow.instances.load(instance_id).lock_task_id = "t-someone"
        uow.commit()
    clock.now = MONDAY_0930 + timedelta(hours=1)
    scheduler = PolicyScheduler(ctx, clock=clock)
    assert scheduler.tick().skipped == [system]
    with ctx.uow() as uow:
        uow.instances.load(instance_id).lock_task_id = None
        uow.commit()
    assert len(scheduler.tick().taken) == 1


def test_retention_keeps_manual_group_and_needed_snapshots(ctx: ServiceContext,
                                                           image: Image) -> None:
    clock = Clock(MONDAY_0930)
    instance_id = make_instance(ctx, image, data_disks=1)
    system, data = disks_of(ctx, instance_id)
    manual = snapshots.create_snapshot(ctx, ACCOUNT, data, name="mine", retention_days=1)
    group_id = snapshot_everything(ctx, instance_id)
    policy_id = _policy(ctx, ["10"], retention=2)
    policies.apply_policy(ctx, ACCOUNT, REGION, policy_id, [system, data], now=clock.now)
    scheduler = PolicyScheduler(ctx, clock=clock)
    clock.now = datetime(2026, 3, 2, 10, 0)
    scheduler.tick()
    first = {s.source_disk_id: s.id for s in _autos(ctx)}
    from_snapshot = _disk(ctx)
    # everything made so far is "old": the manual snapshots too, which retention ignores
    with ctx.uow() as uow:
        for snap in uow.snapshots.find():
            snap.created = datetime(2026, 2, 1)
        # a disk was created from the system disk's automatic snapshot (issue 15 part 2)
        uow.disks.load(from_snapshot).source_snapshot_id = first[system]
        uow.commit()
    clock.now = datetime(2026, 3, 3, 10, 0)
    report = scheduler.tick()
    assert report.expired == [first[data]]  # not the one a disk needs
    left = {s.id for s in snapshots.describe_snapshots(ctx, ACCOUNT, REGION,
                                                       page_size=100).items}
    assert manual in left and first[system] in left and first[data] not in left
    group = snapshots.get_snapshot_group(ctx, ACCOUNT, group_id)
    assert {s.id for s in group.snapshots} <= left
    assert len(_autos(ctx)) == 3  # the needed one and today's two


def test_deleted_policy_detaches_its_disks_and_takes_nothing_more(
        ctx: ServiceContext) -> None:
    clock = Clock(MONDAY_0930)
    policy_id = _policy(ctx, ["10"])
    disk_id = _disk(ctx)
    policies.apply_policy(ctx, ACCOUNT, REGION, policy_id, [disk_id], now=clock.now)
    assert policies.delete_policy(ctx, ACCOUNT, REGION, policy_id) == [disk_id]
    assert _policy_of(ctx, disk_id) == ""
    clock.now = MONDAY_0930 + timedelta(days=2)
    assert PolicyScheduler(ctx, clock=clock).tick().taken == []
    assert _autos(ctx) == []


def test_cancelled_disk_is_not_snapshotted(ctx: ServiceContext) -> None:
    clock = Clock(MONDAY_0930)
    policy_id = _policy(ctx, ["10"])
    kept, cancelled = _disk(ctx), _disk(ctx)
    policies.apply_policy(ctx, ACCOUNT, REGION, policy_id, [kept, cancelled], now=clock.now)
    policies.cancel_policy(ctx, ACCOUNT, REGION, [cancelled])
    clock.now = MONDAY_0930 + timedelta(hours=1)
    PolicyScheduler(ctx, clock=clock).tick()
    assert [s.source_disk_id for s in _autos(ctx)] == [kept]


def test_scheduler_thread_starts_and_stops(ctx: ServiceContext) -> None:
    clock = Clock(MONDAY_0930)
    scheduler = PolicyScheduler(ctx, clock=clock, interval_s=0.01)
    scheduler.start()
    assert scheduler.running
    scheduler.stop()
    assert not scheduler.running
