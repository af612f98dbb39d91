"""Through the API (real database, real qcow2 files, the compute double): DeleteSnapshotGroup
answers one OperationProgress per member, Failed with ECS's code for a member kept because
it backs a custom image or created disks; DescribeSnapshots and DescribeImages answer and
filter by a computed `Usage`."""

from __future__ import annotations

from typing import Any

from ecsnap.domain.model import Image
from tests.api.test_app import Caller, alice, client, run_instance  # noqa: F401 (fixtures)


def _ok(call: Caller, action: str, **params: Any) -> dict[str, Any]:
    status, body = call(action, **params)
    assert status == 200, (action, body)
    return body


def _usage(call: Caller, **params: Any) -> dict[str, str]:
    body = _ok(call, "DescribeSnapshots", **params)
    return {s["SnapshotId"]: s["Usage"] for s in body["Snapshots"]["Snapshot"]}


def test_usage_and_delete_snapshot_group(alice: Caller,  # noqa: F811
                                         image: Image) -> None:
    instance_id = run_instance(alice, image)
    group_id = _ok(alice, "CreateSnapshotGroup", InstanceId=instance_id)["SnapshotGroupId"]
    [group] = _ok(alice, "DescribeSnapshotGroups",
                  SnapshotGroupId__1=group_id)["SnapshotGroups"]["SnapshotGroup"]
    members: dict[str, list[str]] = {"system": [], "data": []}
    for s in group["Snapshots"]["Snapshot"]:
        members[s["SourceDiskType"]].append(s["SnapshotId"])
    [s_sys], [s_d1, s_d2] = members["system"], sorted(members["data"])
    assert set(_usage(alice).values()) == {"none"}
    image_id = _ok(alice, "CreateImage", SnapshotId=s_sys, ImageName="golden")["ImageId"]
    _ok(alice, "CreateDisk", SnapshotId=s_sys)
    _ok(alice, "CreateDisk", SnapshotId=s_d1)
    assert _usage(alice) == {s_sys: "image_disk", s_d1: "disk", s_d2: "none"}
    assert list(_usage(alice, Usage="disk")) == [s_d1]
    assert list(_usage(alice, Usage="none")) == [s_d2]
    status, body = alice("DescribeSnapshots", Usage="instance")
    assert (status, body["Code"]) == (404, "InvalidUsage")
    # DescribeImages: the system image has an instance, the custom one none yet
    body = _ok(alice, "DescribeImages", ImageOwnerAlias="self")
    assert [(m["ImageId"], m["Usage"]) for m in body["Images"]["Image"]] == \
        [(image_id, "none")]
    body = _ok(alice, "DescribeImages", Usage="instance")
    assert [(m["ImageId"], m["Usage"]) for m in body["Images"]["Image"]] == \
        [(image.id, "instance")]
    # DeleteSnapshotGroup: the idle member goes, the two in use stay, each says why
    body = _ok(alice, "DeleteSnapshotGroup", SnapshotGroupId=group_id)
    progress = {p["RelatedItemSet"]["RelatedItem"][0]["Value"]:
                (p["OperationStatus"], p["ErrorCode"])
                for p in body["OperationProgressSet"]["OperationProgress"]}
    assert progress == {s_sys: ("Failed", "SnapshotCreatedImage"),
                        s_d1: ("Failed", "SnapshotCreatedDisk"), s_d2: ("Success", "")}
    assert _ok(alice, "DescribeTaskAttribute", TaskId=body["TaskId"])["TaskStatus"] == \
        "Finished"
    assert set(_usage(alice)) == {s_sys, s_d1}
    assert _ok(alice, "DescribeSnapshotGroups")["SnapshotGroups"]["SnapshotGroup"] == []
