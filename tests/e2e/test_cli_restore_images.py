"""The `ecsnap` client commands for restores and custom images, against a live server:
`disk create --snapshot` (the new disk shows its source snapshot), `disk attach`, `image
create|list|delete` (ImageOwnerAlias=self), and the snapshot's Usage as they go."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.e2e.test_cli import cli
from tests.live import LiveServer

pytestmark = pytest.mark.qemu


def _api(server: LiveServer, action: str, *args: str) -> Any:
    return json.loads(cli(server, "api", action, *args)[1])


def _until(what: str, probe: Any, timeout_s: float = 120) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (found := probe()):
        assert time.monotonic() < deadline, what
        time.sleep(0.5)
    return found


def test_disk_from_a_snapshot_and_a_custom_image(server: LiveServer, demo_image: str) -> None:
    instance_id = _api(server, "CreateInstance", "--ImageId", demo_image,
                       "--InstanceType", "ecs.t5-lc2m1.nano")["InstanceId"]
    _until("Stopped", lambda: _api(server, "DescribeInstances", "--InstanceIds",
                                   json.dumps([instance_id]))["Instances"]["Instance"][0]
           ["Status"] == "Stopped")
    [system] = [d["DiskId"] for d in _api(server, "DescribeDisks", "--InstanceId",
                                          instance_id)["Disks"]["Disk"]]
    snap = _api(server, "CreateSnapshot", "--DiskId", system)["SnapshotId"]

    def snapshot() -> dict[str, Any]:
        return dict(_api(server, "DescribeSnapshots", "--SnapshotIds",
                         json.dumps([snap]))["Snapshots"]["Snapshot"][0])

    _until("accomplished", lambda: snapshot()["Status"] == "accomplished")

    # a disk from the snapshot, waited for; the listing shows where it came from
    code, out, err = cli(server, "disk", "create", "--snapshot", snap, "--size", "30",
                         "--name", "restored", "--output", "json")
    disk = json.loads(out)
    assert (disk["Status"], disk["SourceSnapshotId"], disk["Size"]) == ("Available", snap, 30)
    _, out, _ = cli(server, "disks", "--output", "json")
    assert {d["DiskId"]: d["SourceSnapshotId"] for d in json.loads(out)["Disks"]["Disk"]
            }[disk["DiskId"]] == snap
    _, table, _ = cli(server, "disks")
    assert disk["DiskId"] in table
    _, out, _ = cli(server, "disk", "attach", disk["DiskId"], "--instance", instance_id)
    assert f"{disk['DiskId']} attached to {instance_id}" in out
    attached = _api(server, "DescribeDisks", "--DiskIds", json.dumps([disk["DiskId"]]))
    assert attached["Disks"]["Disk"][0]["InstanceId"] == instance_id
    assert snapshot()["Usage"] == "disk"

    # a custom image of the system disk's snapshot
    code, out, err = cli(server, "image", "create", "--snapshot", snap, "--name", "cli-golden",
                         "--output", "json")
    image = json.loads(out)
    assert (image["Status"], image["ImageName"], image["ImageOwnerAlias"]) == \
        ("Available", "cli-golden", "self")
    _, out, _ = cli(server, "image", "list", "--output", "json")
    assert [(m["ImageId"], m["Usage"]) for m in json.loads(out)["Images"]["Image"]] == \
        [(image["ImageId"], "none")]
    _, table, _ = cli(server, "image", "list")
    assert image["ImageId"] in table and snap in table
    assert snapshot()["Usage"] == "image_disk"
    code, _, err = cli(server, "api", "DeleteSnapshot", "--SnapshotId", snap, check=False)
    assert code == 1 and "SnapshotCreatedImage" in err
    _, out, _ = cli(server, "image", "delete", image["ImageId"])
    assert f"{image['ImageId']} deleted" in out
    _, out, _ = cli(server, "image", "list", "--output", "json")
    assert json.loads(out)["Images"]["Image"] == []
    assert snapshot()["Usage"] == "disk"

    # refusals: one line, the ECS code
    code, _, err = cli(server, "image", "create", "--name", "nothing", check=False)
    assert code == 1 and "MissingParameter" in err
    code, _, err = cli(server, "disk", "create", "--snapshot", "s-nope", check=False)
    assert code == 1 and "InvalidSnapshotId.NotFound" in err
    code, _, err = cli(server, "image", "delete", "m-nope", check=False)
    assert code == 1 and "InvalidImageId.NotFound" in err
