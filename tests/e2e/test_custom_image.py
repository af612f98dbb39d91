"""Custom images through the official SDK, on a live `ecsnap serve` with real QEMU VMs: a
marker written in a running demo VM's root file system, its system disk snapshotted, an
image made of the snapshot, and a new VM booted from the image (with the demo image's
kernel, kept by the image) reads the marker; DeleteImage is refused while that VM uses
the image, then Force deletes it and the VM still boots."""

from __future__ import annotations

from typing import Any

import pytest

from tests.e2e.test_sdk import NewSdk, SdkError, guest, wait
from tests.live import LiveServer

pytestmark = pytest.mark.qemu


def _image(sdk: NewSdk, image_id: str) -> Any:
    from alibabacloud_ecs20140526 import models as m

    body = sdk._call(lambda: sdk.client.describe_images(m.DescribeImagesRequest(
        region_id=sdk.region, image_id=image_id, image_owner_alias="self",
        status="Creating,Available,CreateFailed")))
    images = body.images.image
    return images[0] if images else None


def _snapshot_status(sdk: NewSdk, snap_id: str) -> str:
    from alibabacloud_ecs20140526 import models as m

    body = sdk._call(lambda: sdk.client.describe_snapshots(m.DescribeSnapshotsRequest(
        region_id=sdk.region, snapshot_ids=f'["{snap_id}"]')))
    return str(body.snapshots.snapshot[0].status)


def test_a_vm_from_a_custom_image_reads_the_marker(server: LiveServer,
                                                   demo_image: str) -> None:
    from alibabacloud_ecs20140526 import models as m

    sdk = NewSdk(server)
    source = sdk.run_instance(demo_image)
    wait(lambda: sdk.status(source) == "Running", what="Running")
    system = sdk.disks(source)[0]
    guest(sdk, source, "echo made-in-the-source > /root/marker && sync")
    snap = str(sdk._call(lambda: sdk.client.create_snapshot(m.CreateSnapshotRequest(
        disk_id=system))).snapshot_id)
    wait(lambda: _snapshot_status(sdk, snap) == "accomplished", what="snapshot")
    guest(sdk, source, "echo changed-afterwards > /root/marker && sync")

    image_id = str(sdk._call(lambda: sdk.client.create_image(m.CreateImageRequest(
        region_id=sdk.region, snapshot_id=snap, image_name="golden",
        description="the source with its marker"))).image_id)
    assert image_id.startswith("m-")
    wait(lambda: _image(sdk, image_id).status == "Available", what="Available")
    image = _image(sdk, image_id)
    assert (image.image_name, image.image_owner_alias, image.size) == ("golden", "self", 20)
    assert image.disk_device_mappings.disk_device_mapping[0].snapshot_id == snap

    made = sdk.run_instance(image_id)
    wait(lambda: sdk.status(made) == "Running", what="Running from the custom image")
    assert guest(sdk, made, "cat /root/marker").split() == ["made-in-the-source"]
    assert guest(sdk, source, "cat /root/marker").split() == ["changed-afterwards"]

    with pytest.raises(SdkError) as caught:  # the snapshot backs the image
        sdk._call(lambda: sdk.client.delete_snapshot(m.DeleteSnapshotRequest(
            snapshot_id=snap, force=True)))
    assert (caught.value.code, caught.value.status) == ("SnapshotCreatedImage", 403)
    with pytest.raises(SdkError) as caught:  # an instance was made from it
        sdk._call(lambda: sdk.client.delete_image(m.DeleteImageRequest(
            region_id=sdk.region, image_id=image_id)))
    assert (caught.value.code, caught.value.status) == ("ImageUsingByInstance", 403)
    sdk._call(lambda: sdk.client.delete_image(m.DeleteImageRequest(
        region_id=sdk.region, image_id=image_id, force=True)))
    assert _image(sdk, image_id) is None
    # the snapshot may go now; the VM made from the image boots again (its kernel and
    # system disk were the image's) and still reads the marker
    sdk._call(lambda: sdk.client.delete_snapshot(m.DeleteSnapshotRequest(snapshot_id=snap)))
    sdk.stop(made)
    wait(lambda: sdk.status(made) == "Stopped", what="Stopped")
    sdk._call(lambda: sdk.client.start_instance(m.StartInstanceRequest(instance_id=made)))
    wait(lambda: sdk.status(made) == "Running", what="Running again")
    assert guest(sdk, made, "cat /root/marker").split() == ["made-in-the-source"]
