"""The rules of the domain, each a named check with its ECS code; no I/O."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ecsnap.domain import rules
from ecsnap.domain.errors import CheckFailure, EcsError, RuleViolations
from ecsnap.domain.model import (
    Disk,
    DiskStatus,
    DiskType,
    Instance,
    InstanceStatus,
    InstanceType,
    Region,
    Snapshot,
    SnapshotStatus,
    StoppedMode,
)


def instance(status: InstanceStatus = InstanceStatus.STOPPED, **kw: object) -> Instance:
    return Instance(id="i-1", account_id="a", region_id="r", zone_id="r-a",
                    instance_type="ecs.g6.large", vcpus=2, memory_mib=8192, image_id="m-1",
                    status=status, **kw)  # type: ignore[arg-type]


def disk(disk_id: str, *, system: bool = False, instance_id: str | None = "i-1",
         status: DiskStatus = DiskStatus.IN_USE, **kw: object) -> Disk:
    return Disk(id=disk_id, account_id="a", region_id="r", zone_id="r-a", size_gib=20,
                type=DiskType.SYSTEM if system else DiskType.DATA, status=status,
                instance_id=instance_id, device="/dev/xvda" if system else "/dev/xvdb",
                **kw)  # type: ignore[arg-type]


def snap(snap_id: str, disk_id: str, *, system: bool = False,
         status: SnapshotStatus = SnapshotStatus.ACCOMPLISHED) -> Snapshot:
    return Snapshot(id=snap_id, account_id="a", region_id="r", source_disk_id=disk_id,
                    source_disk_type=DiskType.SYSTEM if system else DiskType.DATA,
                    source_disk_size=20, instance_id="i-1", status=status)


def target(d: Disk | None, s: Snapshot | None, disk_id: str = "", snap_id: str = "",
           ) -> rules.ResetTarget:
    return rules.ResetTarget(d.id if d else disk_id, s.id if s else snap_id, d, s)


def codes(failures: list[CheckFailure]) -> list[tuple[str, str | None]]:
    return [(f.code, f.disk_id) for f in failures]


def test_a_clean_request_passes() -> None:
    d = disk("d-sys", system=True)
    assert rules.check_reset(instance(), [target(d, snap("s-1", "d-sys", system=True))],
                             system_disk_id="d-sys") == []


@pytest.mark.parametrize("status", [InstanceStatus.RUNNING, InstanceStatus.STARTING,
                                    InstanceStatus.STOPPING, InstanceStatus.PENDING])
def test_instance_must_be_stopped(status: InstanceStatus) -> None:
    failures = rules.check_reset(instance(status), [target(disk("d-1"), snap("s-1", "d-1"))],
                                 system_disk_id=None)
    assert codes(failures) == [("IncorrectInstanceStatus", None)]
    assert failures[0].http_status == 403


def test_released_or_missing_disk() -> None:
    gone = disk("d-1", released=True, instance_id=None, status=DiskStatus.AVAILABLE)
    assert codes(rules.check_reset(instance(), [target(gone, snap("s-1", "d-1"))],
                                   system_disk_id=None)) == [("InvalidDiskId.NotFound", "d-1")]
    assert codes(rules.check_reset(instance(), [target(None, snap("s-1", "d-9"), "d-9")],
                                   system_disk_id=None))[0] == ("InvalidDiskId.NotFound", "d-9")


def test_detached_or_elsewhere_disk() -> None:
    detached = disk("d-1", instance_id=None, status=DiskStatus.AVAILABLE)
    elsewhere = disk("d-2", instance_id="i-2")
    failures = rules.check_reset(instance(), [target(detached, snap("s-1", "d-1")),
                                              target(elsewhere, snap("s-2", "d-2"))],
                                 system_disk_id=None)
    assert codes(failures) == [("IncorrectDiskStatus", "d-1"), ("IncorrectDiskStatus", "d-2")]


def test_replaced_system_disk_is_a_mismatch() -> None:
    old = disk("d-old", system=True, released=True, instance_id=None,
               status=DiskStatus.AVAILABLE)
    new = disk("d-new", system=True)
    s = snap("s-1", "d-old", system=True)
    by_old = codes(rules.check_reset(instance(), [target(old, s)], system_disk_id="d-new"))
    assert ("InvalidDiskId.NotFound", "d-old") in by_old
    assert ("InvalidParameter.Mismatch", "d-old") in by_old
    by_new = codes(rules.check_reset(instance(), [target(new, s)], system_disk_id="d-new"))
    assert by_new == [("InvalidParameter.Mismatch", "d-new")]


def test_deleted_and_unfinished_snapshots() -> None:
    failures = rules.check_reset(
        instance(), [target(disk("d-1"), None, snap_id="s-gone"),
                     target(disk("d-2"), snap("s-2", "d-2", status=SnapshotStatus.PROGRESSING))],
        system_disk_id=None)
    assert codes(failures) == [("InvalidSnapshotId.NotFound", "d-1"),
                               ("InvalidSnapshotId.NotReady", "d-2")]
    assert [f.http_status for f in failures] == [404, 403]


def test_concurrent_operation() -> None:
    failures = rules.check_reset(instance(lock_task_id="t-9"),
                                 [target(disk("d-1", lock_task_id="t-8"), snap("s-1", "d-1"))],
                                 system_disk_id=None)
    assert codes(failures) == [("Operation.Conflict", None), ("Operation.Conflict", "d-1")]


def test_every_failure_at_once_and_require() -> None:
    failures = rules.check_reset(
        instance(InstanceStatus.RUNNING),
        [target(disk("d-1", instance_id=None, status=DiskStatus.AVAILABLE), snap("s-1", "d-1")),
         target(disk("d-2"), None, snap_id="s-x"),
         target(disk("d-3"), snap("s-3", "d-1"))],
        system_disk_id=None)
    assert codes(failures) == [("IncorrectInstanceStatus", None), ("IncorrectDiskStatus", "d-1"),
                               ("InvalidSnapshotId.NotFound", "d-2"),
                               ("InvalidParameter.Mismatch", "d-3")]
    with pytest.raises(RuleViolations) as caught:
        rules.require(failures)
    assert caught.value.code == "IncorrectInstanceStatus"
    assert "d-2" in caught.value.message and "d-3" in caught.value.message


def test_group_disk_selection() -> None:
    attached = [disk("d-sys", system=True), disk("d-1"), disk("d-2")]
    chosen = rules.select_group_disks(instance(), attached, exclude_disk_ids=["d-1"])
    assert [d.id for d in chosen] == ["d-sys", "d-2"]
    assert [d.id for d in rules.select_group_disks(instance(InstanceStatus.RUNNING), attached,
                                                   disk_ids=["d-2"])] == ["d-2"]
    with pytest.raises(EcsError) as caught:
        rules.select_group_disks(instance(InstanceStatus.STARTING), attached)
    assert caught.value.code == "IncorrectInstanceStatus"
    with pytest.raises(EcsError) as caught:
        rules.select_group_disks(instance(), attached, exclude_disk_ids=["d-9"])
    assert caught.value.code == "IncorrectDiskStatus"
    with pytest.raises(EcsError):
        rules.select_group_disks(instance(), attached,
                                 exclude_disk_ids=["d-sys", "d-1", "d-2"])
    many = [disk(f"d-{n}") for n in range(17)]
    with pytest.raises(EcsError) as caught:
        rules.select_group_disks(instance(), many)
    assert "16" in caught.value.message


def test_capacity_and_stopped_modes() -> None:
    region = Region(id="r", local_name="r", vcpu_capacity=4, memory_mib_capacity=16384,
                    storage_pool="/x")
    kept = instance(stopped_mode=StoppedMode.KEEP_CHARGING)
    freed = instance(stopped_mode=StoppedMode.STOP_CHARGING)
    running = instance(InstanceStatus.RUNNING)
    two = InstanceType("t", 2, 8192)
    assert kept.holds_reservation() and running.holds_reservation()
    assert not freed.holds_reservation()
    rules.check_capacity(region, [running, freed], [two])
    with pytest.raises(EcsError) as caught:
        rules.check_capacity(region, [running, kept], [two])
    assert caught.value.code == "OperationDenied.NoStock"
    assert caught.value.http_status == 403


@pytest.mark.parametrize("name,ok", [
    ("web-01", True), ("a", False), ("1abc", False), ("http://x", False),
    ("ok.name:v_1", True), ("bad name", False), ("x" * 129, False), ("数据盘", True)])
def test_names(name: str, ok: bool) -> None:
    if ok:
        rules.check_name(name, code="InvalidInstanceName.Malformed")
    else:
        with pytest.raises(EcsError) as caught:
            rules.check_name(name, code="InvalidInstanceName.Malformed")
        assert caught.value.code == "InvalidInstanceName.Malformed"


def test_snapshot_names_reserve_auto_and_groups_allow_digits() -> None:
    with pytest.raises(EcsError):
        rules.check_name("auto-1", code="InvalidSnapshotName.Malformed", reserved_prefix="auto")
    rules.check_name("2026-backup", code="InvalidParameter.Name", digit_first=True)


@given(st.text(max_size=140))
def test_name_check_never_crashes(value: str) -> None:
    try:
        rules.check_name(value, code="X")
    except EcsError as exc:
        assert exc.code == "X" and exc.http_status == 400
