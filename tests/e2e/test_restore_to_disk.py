"""Restore a snapshot to a new disk through the official SDK, on a live `ecsnap serve` with
a real QEMU VM: the new disk, attached to the running VM, reads the snapshot's data while
the source disk keeps its newer data, and still does after the snapshot is deleted."""

from __future__ import annotations

from typing import Any

import pytest

from tests.e2e.test_sdk import NewSdk, SdkError, guest, wait
from tests.live import LiveServer

pytestmark = pytest.mark.qemu


def _disk(sdk: NewSdk, disk_id: str) -> Any:
    from alibabacloud_ecs20140526 import models as m

    body = sdk._call(lambda: sdk.client.describe_disks(m.DescribeDisksRequest(
        region_id=sdk.region, disk_ids=f'["{disk_id}"]')))
    return body.disks.disk[0]


def _snapshot_status(sdk: NewSdk, snap_id: str) -> str:
    from alibabacloud_ecs20140526 import models as m

    body = sdk._call(lambda: sdk.client.describe_snapshots(m.DescribeSnapshotsRequest(
        region_id=sdk.region, snapshot_ids=f'["{snap_id}"]')))
    return str(body.snapshots.snapshot[0].status)


def test_a_disk_from_a_snapshot_on_a_running_vm(server: LiveServer, demo_image: str) -> None:
    from alibabacloud_ecs20140526 import models as m

    sdk = NewSdk(server)
    instance_id = sdk.run_instance(demo_image)
    wait(lambda: sdk.status(instance_id) == "Running", what="Running")
    _, d1, _ = sdk.disks(instance_id)
    guest(sdk, instance_id, f"echo old-d1 > /mnt/{d1}/marker && sync")
    snap = str(sdk._call(lambda: sdk.client.create_snapshot(m.CreateSnapshotRequest(
        disk_id=d1))).snapshot_id)
    wait(lambda: _snapshot_status(sdk, snap) == "accomplished", what="snapshot")
    guest(sdk, instance_id, f"echo new-d1 > /mnt/{d1}/marker && sync")

    with pytest.raises(SdkError) as caught:  # NotFound, before anything is made
        sdk._call(lambda: sdk.client.create_disk(m.CreateDiskRequest(
            region_id=sdk.region, zone_id=f"{sdk.region}-a", snapshot_id="s-nosuchsnapshot")))
    assert (caught.value.code, caught.value.status) == ("InvalidSnapshotId.NotFound", 404)
    restored = str(sdk._call(lambda: sdk.client.create_disk(m.CreateDiskRequest(
        region_id=sdk.region, zone_id=f"{sdk.region}-a", snapshot_id=snap,
        disk_name="restored"))).disk_id)
    wait(lambda: _disk(sdk, restored).status == "Available", what="Available")
    disk = _disk(sdk, restored)
    assert (disk.source_snapshot_id, disk.size) == (snap, 20)

    sdk._call(lambda: sdk.client.attach_disk(m.AttachDiskRequest(
        instance_id=instance_id, disk_id=restored)))
    wait(lambda: _disk(sdk, restored).status == "In_use", what="In_use")
    serial = restored.removeprefix("d-")
    out = guest(sdk, instance_id, f"ecsnap-mount-disks --wait {serial} 60 >/dev/null; "
                                  f"cat /mnt/{restored}/marker /mnt/{d1}/marker")
    assert out.split() == ["old-d1", "new-d1"]

    with pytest.raises(SdkError) as caught:  # it created a disk: Force is needed
        sdk._call(lambda: sdk.client.delete_snapshot(m.DeleteSnapshotRequest(
            snapshot_id=snap)))
    assert (caught.value.code, caught.value.status) == ("SnapshotCreatedDisk", 403)
    sdk._call(lambda: sdk.client.delete_snapshot(m.DeleteSnapshotRequest(
        snapshot_id=snap, force=True)))
    # a fresh boot opens every disk again: the restored one still has the snapshot's data
    sdk.stop(instance_id)
    wait(lambda: sdk.status(instance_id) == "Stopped", what="Stopped")
    sdk._call(lambda: sdk.client.start_instance(m.StartInstanceRequest(
        instance_id=instance_id)))
    wait(lambda: sdk.status(instance_id) == "Running", what="Running again")
    out = guest(sdk, instance_id, f"ecsnap-mount-disks --wait {serial} 60 >/dev/null; "
                                  f"cat /mnt/{restored}/marker /mnt/{d1}/marker")
    assert out.split() == ["old-d1", "new-d1"]
