"""Looking inside a real VM's disks (the demo image): files written through RunCommand, an
instance snapshot, files changed, the instance stopped; the preview names exactly the
changed paths of the data disk, neither disk file changes, and the snapshot's files read
back as they were."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest

from ecsnap.entrypoints.cli.client import ApiClient, load_credentials
from tests.e2e.test_console import guest_run, status
from tests.e2e.test_sdk import wait
from tests.live import LiveServer

pytestmark = pytest.mark.qemu

BEFORE = ("mkdir -p /mnt/{d}/look/sub && echo keep > /mnt/{d}/look/keep.txt && "
          "echo old > /mnt/{d}/look/mod.txt && echo bye > /mnt/{d}/look/gone.txt && "
          "echo same > /mnt/{d}/look/sub/same.txt && echo sys-old > /root/inside.txt && sync")
AFTER = ("echo new-content > /mnt/{d}/look/mod.txt && rm /mnt/{d}/look/gone.txt && "
         "echo hi > /mnt/{d}/look/added.txt && mkdir /mnt/{d}/look/newdir && "
         "echo sys-new-content > /root/inside.txt && sync")


def checksum(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def test_preview_names_the_files_a_real_guest_changed(server: LiveServer,
                                                      demo_image: str) -> None:
    api = ApiClient(load_credentials(server.data_dir))
    body = api.call("RunInstances", {"ImageId": demo_image, "InstanceType": "ecs.t5-lc2m1.nano",
                                     "DataDisk.1.Size": 20})
    iid = body["InstanceIdSets"]["InstanceIdSet"][0]
    wait(lambda: status(api, iid) == "Running", what="Running")
    disks = sorted(api.call("DescribeDisks", {"InstanceId": iid})["Disks"]["Disk"],
                   key=lambda d: d["Device"])
    system, data = (d["DiskId"] for d in disks)
    guest_run(api, iid, BEFORE.format(d=data))
    group_id = api.call("CreateSnapshotGroup", {"InstanceId": iid})["SnapshotGroupId"]
    wait(lambda: api.call("DescribeSnapshotGroups", {"SnapshotGroupId.1": group_id})
         ["SnapshotGroups"]["SnapshotGroup"][0]["Status"] == "accomplished", what="group")
    group = api.call("DescribeSnapshotGroups", {"SnapshotGroupId.1": group_id})[
        "SnapshotGroups"]["SnapshotGroup"][0]
    snaps = {s["SourceDiskId"]: s["SnapshotId"] for s in group["Snapshots"]["Snapshot"]}
    guest_run(api, iid, AFTER.format(d=data))
    # a snapshot reads while its instance runs (the file level waits for it to stop)
    running = api.call("DescribeSnapshotFiles", {"SnapshotId": snaps[data],
                                                 "Path": "/look/gone.txt"})
    assert base64.b64decode(running["FileContent"]) == b"bye\n"
    preview = api.call("PreviewResetDisks", {"Disk.1.DiskId": data,
                                             "Disk.1.SnapshotId": snaps[data],
                                             "IncludeFileChanges": "true"})
    assert preview["Disks"]["Disk"][0]["FileLevel"] == "Unavailable"
    api.call("StopInstance", {"InstanceId": iid})
    wait(lambda: status(api, iid) == "Stopped", what="Stopped")

    files = [next(server.data_dir.glob(f"pools/*/{d}.qcow2")) for d in (system, data)]
    before = [checksum(f) for f in files]
    body = api.call("PreviewResetDisks", {
        "Disk.1.DiskId": system, "Disk.1.SnapshotId": snaps[system],
        "Disk.2.DiskId": data, "Disk.2.SnapshotId": snaps[data],
        "IncludeFileChanges": "true", "MaxFileChanges": 1000})
    assert [checksum(f) for f in files] == before  # read-only, snapshots included
    by_disk = {d["DiskId"]: d for d in body["Disks"]["Disk"]}
    on_data = by_disk[data]
    assert on_data["FileLevel"] == "Supported", on_data
    changes = on_data["FileChanges"]
    assert not changes["Partial"], changes
    assert {f["Path"]: f["Change"] for f in changes["Files"]["File"]} == {
        "/look/added.txt": "added", "/look/gone.txt": "deleted", "/look/mod.txt": "modified",
        "/look/newdir": "added"}
    on_system = by_disk[system]
    assert on_system["FileLevel"] == "Supported", on_system
    modified = {f["Path"]: f for f in on_system["FileChanges"]["Files"]["File"]}
    assert modified["/root/inside.txt"]["Change"] == "modified"

    # the snapshot's files, as they were before the changes
    look = api.call("DescribeSnapshotFiles", {"SnapshotId": snaps[data], "Path": "/look"})
    assert sorted(e["Name"] for e in look["Entries"]["Entry"]) == \
        ["gone.txt", "keep.txt", "mod.txt", "sub"]
    old = api.call("DescribeSnapshotFiles", {"SnapshotId": snaps[data],
                                             "Path": "/look/mod.txt"})
    assert base64.b64decode(old["FileContent"]) == b"old\n"
    root = api.call("DescribeSnapshotFiles", {"SnapshotId": snaps[system],
                                              "Path": "/root/inside.txt"})
    assert base64.b64decode(root["FileContent"]) == b"sys-old\n"
