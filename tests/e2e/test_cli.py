"""The `ecsnap` command as a client of a live server (signed API calls)."""

from __future__ import annotations

import json
import time

import pytest

from tests.live import LiveServer, ecsnap

pytestmark = pytest.mark.qemu


def cli(server: LiveServer, *args: str, check: bool = True) -> tuple[int, str, str]:
    proc = ecsnap(*args, env={"ECSNAP_DATA_DIR": str(server.data_dir)}, check=check)
    return proc.returncode, proc.stdout, proc.stderr


def test_cli_round_trip(server: LiveServer, demo_image: str) -> None:
    _, out, _ = cli(server, "api", "DescribeRegions")
    assert json.loads(out)["Regions"]["Region"][0]["RegionId"] == "local-1"

    code, out, err = cli(server, "api", "StopInstance", "--InstanceId", "i-nope", check=False)
    assert code == 1 and "InvalidInstanceId.NotFound" in err and len(err.strip().splitlines()) == 1

    _, out, _ = cli(server, "api", "CreateInstance", "--ImageId", demo_image,
                    "--InstanceType", "ecs.t5-lc2m1.nano", "--DataDisk.1.Size", "20")
    instance_id = json.loads(out)["InstanceId"]
    deadline = time.monotonic() + 60
    while True:
        _, out, _ = cli(server, "instances", "--output", "json")
        status = {i["InstanceId"]: i["Status"] for i in json.loads(out)["Instances"]["Instance"]}
        if status[instance_id] == "Stopped":
            break
        assert time.monotonic() < deadline
        time.sleep(0.5)
    _, table, _ = cli(server, "instances")
    assert instance_id[:10] in table  # a Rich table for people

    _, out, _ = cli(server, "snapshot-groups", "create", instance_id, "--name", "cli-1",
                    "--output", "json")
    group_id = json.loads(out)["SnapshotGroupId"]
    _, out, _ = cli(server, "snapshot-groups", "list", "--instance", instance_id,
                    "--output", "json")
    [group] = json.loads(out)["SnapshotGroups"]["SnapshotGroup"]
    assert group["SnapshotGroupId"] == group_id and group["Status"] == "accomplished"
    data_disk = next(s["SourceDiskId"] for s in group["Snapshots"]["Snapshot"]
                 if s["SourceDiskType"] == "data")

    _, out, _ = cli(server, "rollback", group_id, "--preview")
    assert "written since" in out
    _, out, _ = cli(server, "rollback", group_id, "--disk", data_disk, "--output", "json")
    assert json.loads(out)["SafetySnapshotGroupId"].startswith("ssg-")
    code, _, err = cli(server, "rollback", group_id, "--disk", "d-notinthegroup", check=False)
    assert code == 1 and "InvalidDiskId.NotFound" in err

    cli(server, "api", "StartInstance", "--InstanceId", instance_id)
    deadline = time.monotonic() + 120
    while True:
        code, out, err = cli(server, "run", instance_id, "--", "echo", "hello-from-guest",
                             check=False)
        if code == 0:
            break
        assert time.monotonic() < deadline, err
        time.sleep(1)
    assert out.strip() == "hello-from-guest"
    code, _, _ = cli(server, "run", instance_id, "--", "exit 7", check=False)
    assert code == 1

    _, out, _ = cli(server, "snapshot-groups", "delete", group_id)
    assert "deleted" in out


def test_vms_survive_a_restart_of_ecsnap(server: LiveServer, demo_image: str) -> None:
    _, out, _ = cli(server, "api", "RunInstances", "--ImageId", demo_image,
                    "--InstanceType", "ecs.t5-lc2m1.nano")
    instance_id = json.loads(out)["InstanceIdSets"]["InstanceIdSet"][0]
    deadline = time.monotonic() + 120
    while cli(server, "run", instance_id, "--", "true", check=False)[0] != 0:
        assert time.monotonic() < deadline
        time.sleep(1)
    assert server.stop() == 0  # SIGTERM: a clean stop
    server.start()  # recovery reattaches the running VM
    _, out, _ = cli(server, "instances", "--output", "json")
    status = {i["InstanceId"]: i["Status"] for i in json.loads(out)["Instances"]["Instance"]}
    assert status[instance_id] == "Running"
    _, out, _ = cli(server, "run", instance_id, "--", "echo", "still-here")
    assert out.strip() == "still-here"
    cli(server, "api", "StopInstance", "--InstanceId", instance_id)
