"""Rollback on real VMs through the API: FsConsistent instance snapshot, undo with the
safety group, and the refusals after a snapshot was deleted or the system disk replaced."""

from __future__ import annotations

import pytest

from ecsnap.domain.errors import EcsError
from ecsnap.entrypoints.cli.client import ApiClient, load_credentials
from tests.e2e.test_console import guest_run, status
from tests.e2e.test_sdk import READ, WRITE, wait
from tests.live import LiveServer

pytestmark = pytest.mark.qemu


def refused(api: ApiClient, items: list[tuple[str, str]]) -> tuple[str, int, str]:
    params = {}
    for n, (d, s) in enumerate(items, 1):
        params[f"Disk.{n}.DiskId"], params[f"Disk.{n}.SnapshotId"] = d, s
    with pytest.raises(EcsError) as caught:
        api.call("ResetDisks", params)
    return caught.value.code, caught.value.http_status, caught.value.message


def reset(api: ApiClient, items: list[tuple[str, str]], **extra: object) -> dict[str, object]:
    params: dict[str, object] = dict(extra)
    for n, (d, s) in enumerate(items, 1):
        params[f"Disk.{n}.DiskId"], params[f"Disk.{n}.SnapshotId"] = d, s
    body = api.call("ResetDisks", params)
    wait(lambda: api.call("DescribeTaskAttribute", {"TaskId": body["TaskId"]})["TaskStatus"]
         != "Processing", what="rollback")
    task = api.call("DescribeTaskAttribute", {"TaskId": body["TaskId"]})
    assert task["TaskStatus"] == "Finished", task
    return {**body, "Result": task["Result"]}


def written_since(api: ApiClient, disk_id: str, snapshot_id: str) -> int:
    """PreviewResetDisks' BytesWrittenSinceSnapshot: 0 when the disk is its snapshot."""
    body = api.call("PreviewResetDisks", {"Disk.1.DiskId": disk_id,
                                          "Disk.1.SnapshotId": snapshot_id})
    [disk] = body["Disks"]["Disk"]
    return int(disk["BytesWrittenSinceSnapshot"])


def test_real_rollback_undo_and_refusals(server: LiveServer, demo_image: str) -> None:
    api = ApiClient(load_credentials(server.data_dir))
    body = api.call("RunInstances", {"ImageId": demo_image, "InstanceType": "ecs.t5-lc2m1.nano",
                                     "DataDisk.1.Size": 20, "DataDisk.2.Size": 20})
    iid = body["InstanceIdSets"]["InstanceIdSet"][0]
    wait(lambda: status(api, iid) == "Running", what="Running")
    disks = sorted(api.call("DescribeDisks", {"InstanceId": iid})["Disks"]["Disk"],
                   key=lambda d: d["Device"])
    system, d1, d2 = (d["DiskId"] for d in disks)
    guest_run(api, iid, WRITE.format(tag="old", d1=d1, d2=d2))
    group_id = api.call("CreateSnapshotGroup", {"InstanceId": iid})["SnapshotGroupId"]
    wait(lambda: api.call("DescribeSnapshotGroups", {"SnapshotGroupId.1": group_id})
         ["SnapshotGroups"]["SnapshotGroup"][0]["Status"] == "accomplished", what="group")
    group = api.call("DescribeSnapshotGroups", {"SnapshotGroupId.1": group_id})[
        "SnapshotGroups"]["SnapshotGroup"][0]
    assert group["ConsistencyLevel"] == "FileSystemConsistent"
    assert {"TagKey": "FsConsistent", "TagValue": "True"} in group["Tags"]["Tag"]
    snaps = {s["SourceDiskId"]: s["SnapshotId"] for s in group["Snapshots"]["Snapshot"]}
    guest_run(api, iid, WRITE.format(tag="new", d1=d1, d2=d2))
    api.call("StopInstance", {"InstanceId": iid})
    wait(lambda: status(api, iid) == "Stopped", what="Stopped")

    # roll back the system disk and one data disk, start, read; then undo with the safety group
    done = reset(api, [(system, snaps[system]), (d1, snaps[d1])], AutoStartInstance="true")
    assert done["Result"]["health"]["GuestAgent"] == "Ok"  # type: ignore[index]
    assert guest_run(api, iid, READ.format(d1=d1, d2=d2)).split() == \
        ["old-sys", "old-d1", "new-d2"]
    safety = str(done["SafetySnapshotGroupId"])
    api.call("StopInstance", {"InstanceId": iid})
    wait(lambda: status(api, iid) == "Stopped", what="Stopped")
    undo = api.call("DescribeSnapshotGroups", {"SnapshotGroupId.1": safety})[
        "SnapshotGroups"]["SnapshotGroup"][0]["Snapshots"]["Snapshot"]
    reset(api, [(s["SourceDiskId"], s["SnapshotId"]) for s in undo], AutoStartInstance="true")
    assert guest_run(api, iid, READ.format(d1=d1, d2=d2)).split() == \
        ["new-sys", "new-d1", "new-d2"]
    api.call("StopInstance", {"InstanceId": iid})
    wait(lambda: status(api, iid) == "Stopped", what="Stopped")

    # one disk's snapshot deleted: that disk is refused, the others are fine
    api.call("DeleteSnapshot", {"SnapshotId": snaps[d2]})
    wait(lambda: not api.call("DescribeSnapshots", {"SnapshotIds": f'["{snaps[d2]}"]'})[
        "Snapshots"]["Snapshot"], what="snapshot deleted")
    code, http, message = refused(api, [(d1, snaps[d1]), (d2, snaps[d2])])
    assert (code, http) == ("InvalidSnapshotId.NotFound", 404) and d2 in message
    assert written_since(api, d1, snaps[d1]) > 0  # the undo brought new-d1 back
    reset(api, [(d1, snaps[d1])])
    assert written_since(api, d1, snaps[d1]) == 0  # d1 is its snapshot again

    # the system disk replaced: its old snapshot no longer rolls the instance back
    new_system = api.call("ReplaceSystemDisk", {"InstanceId": iid,
                                                "ImageId": demo_image})["DiskId"]
    wait(lambda: any(d["DiskId"] == new_system and d["Status"] == "In_use" for d in
                     api.call("DescribeDisks", {"InstanceId": iid})["Disks"]["Disk"]),
         what="new system disk")
    code, http, message = refused(api, [(new_system, snaps[system])])
    assert (code, http) == ("InvalidParameter.Mismatch", 403) and "replaced" in message
    code, http, message = refused(api, [(system, snaps[system])])
    # the old system disk is released (the first failure), and no longer the system disk
    assert (code, http) == ("InvalidDiskId.NotFound", 404)
    assert "InvalidParameter.Mismatch" in message and "replaced" in message
    # the old snapshot is still listed, with its SourceDiskId
    listed = api.call("DescribeSnapshots", {"SnapshotIds": f'["{snaps[system]}"]'})
    assert listed["Snapshots"]["Snapshot"][0]["SourceDiskId"] == system
