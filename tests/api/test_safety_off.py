"""ResetDisks with `SafetySnapshot=false`, end to end through the API, on real qcow2 files
(the compute double: no VM).

Without a safety snapshot the rollback still takes one per disk, as the undo log that makes
it all-or-nothing, and drops it at the end: no safety group is listed, and no internal
snapshot is left behind in any disk file (read with `qemu-img` and with ecsnap's own qcow2
reader). A revert that fails on the second disk leaves both disks exactly as they were
before the rollback (guest data compared with `qemu-img compare` against a copy).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from ecsnap.adapters.storage import qcow2meta
from ecsnap.adapters.storage.base import StorageError
from ecsnap.adapters.storage.qcow2 import Qcow2Backend
from ecsnap.domain.model import Image
from ecsnap.entrypoints.api.app import create_app
from ecsnap.service import setup
from ecsnap.service.context import ServiceContext
from ecsnap.service.disk_files import INITIAL
from tests import qcow
from tests.api.test_app import Caller, caller
from tests.conftest import REGION

OLD, NEW = 0xA1, 0xB2
OFFSETS = (0, 7 * qcow.MIB, 300 * qcow.MIB)  # several clusters apart


@pytest.fixture
def api(ctx: ServiceContext) -> Iterator[Caller]:
    done = setup.initialise(ctx, REGION)
    with TestClient(create_app(ctx), base_url="http://127.0.0.1") as client:
        yield caller(client, done.access_key.id, done.access_key.secret)


def ok(call: Caller, action: str, **params: Any) -> dict[str, Any]:
    status, body = call(action, **params)
    assert status == 200, (action, params, body)
    return body


def write(path: str, pattern: int) -> None:
    for offset in OFFSETS:
        qcow.write(path, pattern, offset)


def holds(path: str, pattern: int) -> bool:
    return all(qcow.holds(path, pattern, offset) for offset in OFFSETS)


def same_guest_data(path: str, copy: Path) -> bool:
    """Byte for byte the same disk as the guest sees it (`qemu-img compare`, exit 0)."""
    proc = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", "-U",
                           str(copy), path], capture_output=True, text=True)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode == 0


def internal_snapshots(path: str) -> list[str]:
    """The disk file's internal snapshots, read twice: qemu-img and ecsnap's reader."""
    by_qemu = sorted(qcow.snapshots(path))
    with open(path, "rb") as fh:
        by_reader = sorted(s.name for s in qcow2meta.read_header(fh).snapshots)
    assert by_qemu == by_reader, (by_qemu, by_reader)
    return by_qemu


class Story:
    """A Stopped instance with two data disks: OLD at the snapshot, NEW now."""

    def __init__(self, ctx: ServiceContext, api: Caller, image: Image, tmp: Path) -> None:
        body = ok(api, "CreateInstance", ImageId=image.id, InstanceType="ecs.t5-lc2m1.nano",
                  DataDisk__1__Size=20, DataDisk__2__Size=20)
        self.instance = str(body["InstanceId"])
        disks = sorted(ok(api, "DescribeDisks", InstanceId=self.instance)["Disks"]["Disk"],
                       key=lambda d: d["Device"])
        self.data = [d["DiskId"] for d in disks if d["Type"] == "data"]
        assert len(self.data) == 2
        with ctx.uow(readonly=True) as uow:
            storage = ctx.storage(uow, REGION)
            self.paths = {d: storage.path(d) for d in self.data}
        for path in self.paths.values():
            write(path, OLD)
        body = ok(api, "CreateSnapshotGroup", InstanceId=self.instance, Name="before")
        self.group = str(body["SnapshotGroupId"])
        [group] = ok(api, "DescribeSnapshotGroups", SnapshotGroupId__1=self.group)[
            "SnapshotGroups"]["SnapshotGroup"]
        assert group["Status"] == "accomplished"
        self.snaps = {s["SourceDiskId"]: s["SnapshotId"] for s in group["Snapshots"]["Snapshot"]}
        self.at_snapshot = {d: tmp / f"{d}-at-snapshot.qcow2" for d in self.data}
        for d, copy in self.at_snapshot.items():
            shutil.copyfile(self.paths[d], copy)
        for path in self.paths.values():
            write(path, NEW)
        self.before_rollback = {d: tmp / f"{d}-before-rollback.qcow2" for d in self.data}
        for d, copy in self.before_rollback.items():
            shutil.copyfile(self.paths[d], copy)
        self.files_before = {d: internal_snapshots(p) for d, p in self.paths.items()}
        assert all(names == sorted([INITIAL, self.snaps[d]])
                   for d, names in self.files_before.items())

    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {"SafetySnapshot": "false"}
        for n, d in enumerate(self.data, 1):
            out[f"Disk__{n}__DiskId"], out[f"Disk__{n}__SnapshotId"] = d, self.snaps[d]
        return out


@pytest.fixture
def story(ctx: ServiceContext, api: Caller, image: Image, tmp_path: Path) -> Story:
    return Story(ctx, api, image, tmp_path)


def groups_listed(api: Caller, story: Story) -> list[dict[str, Any]]:
    body = ok(api, "DescribeSnapshotGroups", InstanceId=story.instance)
    return list(body["SnapshotGroups"]["SnapshotGroup"])


def snapshots_listed(api: Caller, story: Story) -> list[str]:
    body = ok(api, "DescribeSnapshots", InstanceId=story.instance, PageSize=100)
    return sorted(s["SnapshotId"] for s in body["Snapshots"]["Snapshot"])


def test_rollback_without_safety_snapshot_leaves_no_trace(ctx: ServiceContext, api: Caller,
                                                          story: Story) -> None:
    before = snapshots_listed(api, story)
    body = ok(api, "ResetDisks", **story.params())
    assert body["SafetySnapshotGroupId"] == ""
    task = ok(api, "DescribeTaskAttribute", TaskId=body["TaskId"])
    assert task["TaskStatus"] == "Finished", task
    assert task["Result"]["SafetySnapshotGroupId"] == ""
    # the disks hold exactly what they held at the snapshot
    for d in story.data:
        assert same_guest_data(story.paths[d], story.at_snapshot[d]), f"{d} not rolled back"
        assert holds(story.paths[d], OLD)
    # no safety group, no extra snapshot, listed or in the files
    assert [g["SnapshotGroupId"] for g in groups_listed(api, story)] == [story.group]
    assert ok(api, "DescribeSnapshotGroups")["SnapshotGroups"]["SnapshotGroup"][0][
        "SnapshotGroupId"] == story.group
    assert snapshots_listed(api, story) == before
    for d, path in story.paths.items():
        assert internal_snapshots(path) == story.files_before[d], f"an orphan snapshot in {d}"
    with ctx.uow(readonly=True) as uow:
        assert all(d.lock_task_id is None for d in uow.disks.find(instance_id=story.instance))
        assert uow.instances.load(story.instance).lock_task_id is None


@pytest.mark.parametrize("damage", [False, True], ids=["fails-untouched", "fails-half-done"])
def test_a_failed_revert_of_the_second_disk_keeps_both_disks(
        ctx: ServiceContext, api: Caller, story: Story, monkeypatch: pytest.MonkeyPatch,
        damage: bool) -> None:
    """The second disk's revert fails (before touching it, or after its data was already
    reverted): the rollback is undone on both disks, exactly, and leaves nothing behind."""
    second, source = story.data[1], story.snaps[story.data[1]]
    revert = Qcow2Backend.revert
    failed: list[str] = []

    def failing(self: Qcow2Backend, disk_id: str, snapshot_id: str) -> None:
        if (disk_id, snapshot_id) == (second, source):  # only the rollback's own revert
            if damage:
                revert(self, disk_id, snapshot_id)
            failed.append(disk_id)
            raise StorageError(f"injected: the revert of {disk_id} failed")
        revert(self, disk_id, snapshot_id)

    monkeypatch.setattr(Qcow2Backend, "revert", failing)
    before = snapshots_listed(api, story)
    body = ok(api, "ResetDisks", **story.params())
    assert failed == [second]
    task = ok(api, "DescribeTaskAttribute", TaskId=body["TaskId"])
    assert task["TaskStatus"] == "Failed", task
    assert "injected" in task["OperationProgressSet"]["OperationProgress"][0]["ErrorMsg"]
    for d in story.data:  # both, the first one whose revert went through too
        assert same_guest_data(story.paths[d], story.before_rollback[d]), \
            f"{d} was left rolled back"
        assert holds(story.paths[d], NEW)
    assert snapshots_listed(api, story) == before
    for d, path in story.paths.items():
        assert internal_snapshots(path) == story.files_before[d], f"an orphan snapshot in {d}"
    status = ok(api, "DescribeInstances", InstanceIds=json.dumps([story.instance]))
    assert status["Instances"]["Instance"][0]["Status"] == "Stopped"
    with ctx.uow(readonly=True) as uow:
        assert all(d.lock_task_id is None for d in uow.disks.find(instance_id=story.instance))
    # and the same rollback, without the failure, goes through
    monkeypatch.setattr(Qcow2Backend, "revert", revert)
    body = ok(api, "ResetDisks", **story.params())
    assert ok(api, "DescribeTaskAttribute", TaskId=body["TaskId"])["TaskStatus"] == "Finished"
    assert all(same_guest_data(story.paths[d], story.at_snapshot[d]) for d in story.data)
    # no safety group was asked for, and none is listed: neither the one of the failed
    # rollback (its ID was never given: SafetySnapshotGroupId was "") nor the second's
    assert [(g["SnapshotGroupId"], g["Status"]) for g in groups_listed(api, story)] == \
        [(story.group, "accomplished")]
