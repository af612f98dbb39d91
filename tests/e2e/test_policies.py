"""Automatic snapshot policies with a live `ecsnap serve` and a running QEMU VM: the
scheduler, driven in-process on the server's own data dir with an injected clock (the real
QEMU driver: the live snapshot goes over the VM's QMP), takes `auto_YYYYMMDD_1` of the
running VM's disk, and retention deletes it after RetentionDays and keeps a manual one;
and `ecsnap policy create|list|apply|cancel|delete` against the live server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest

from ecsnap import bootstrap, config
from ecsnap.domain.model import utcnow
from ecsnap.entrypoints.cli.client import ApiClient, load_credentials
from ecsnap.service.context import ServiceContext
from ecsnap.service.scheduler import PolicyScheduler
from tests.e2e.test_cli import cli
from tests.e2e.test_console import guest_run, status
from tests.e2e.test_sdk import wait
from tests.live import LiveServer

pytestmark = pytest.mark.qemu

EVERY_DAY = json.dumps([str(d) for d in range(1, 8)])


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def embedded(server: LiveServer) -> Iterator[ServiceContext]:
    """The service on the live server's data dir, in this process, with the real QEMU
    driver (QMP sessions are per operation and serialised across processes)."""
    ctx = bootstrap.build(config.load(server.data_dir), background=False)
    yield ctx
    ctx.extras["engine"].dispose()


def _snapshots(api: ApiClient, disk_id: str) -> dict[str, dict[str, object]]:
    body = api.call("DescribeSnapshots", {"DiskId": disk_id, "PageSize": 100})
    return {s["SnapshotId"]: s for s in body["Snapshots"]["Snapshot"]}


def test_auto_snapshot_of_a_running_vm_and_its_retention(
        server: LiveServer, demo_image: str, embedded: ServiceContext) -> None:
    api = ApiClient(load_credentials(server.data_dir))
    body = api.call("RunInstances", {"ImageId": demo_image, "InstanceType": "ecs.t5-lc2m1.nano",
                                     "DataDisk.1.Size": 20})
    iid = body["InstanceIdSets"]["InstanceIdSet"][0]
    wait(lambda: status(api, iid) == "Running", what="Running")
    [data] = [d["DiskId"] for d in api.call("DescribeDisks", {"InstanceId": iid})
              ["Disks"]["Disk"] if d["Type"] == "data"]
    guest_run(api, iid, f"echo before > /mnt/{data}/marker && sync")
    # a time point two hours ahead of the real clock: the live server's own scheduler
    # (real clock) is not due for it during this test; RetentionDays 1
    now = utcnow()
    hour = (now.hour + 2) % 24
    policy_id = api.call("CreateAutoSnapshotPolicy", {
        "TimePoints": json.dumps([str(hour)]), "RepeatWeekdays": EVERY_DAY,
        "RetentionDays": 1, "AutoSnapshotPolicyName": "vm"})["AutoSnapshotPolicyId"]
    api.call("ApplyAutoSnapshotPolicy", {"AutoSnapshotPolicyId": policy_id,
                                         "DiskIds": json.dumps([data])})
    disk = api.call("DescribeDisks", {"DiskIds": json.dumps([data])})["Disks"]["Disk"][0]
    assert disk["AutoSnapshotPolicyId"] == policy_id
    manual = api.call("CreateSnapshot", {"DiskId": data, "SnapshotName": "mine",
                                         "RetentionDays": 1})["SnapshotId"]
    wait(lambda: _snapshots(api, data)[manual]["Status"] == "accomplished", what="manual")

    due = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=2)
    clock = Clock(due - timedelta(minutes=1))
    scheduler = PolicyScheduler(embedded, clock=clock)
    assert scheduler.tick().taken == []
    clock.now = due + timedelta(seconds=30)
    [auto_id] = scheduler.tick().taken
    auto = _snapshots(api, data)[auto_id]
    assert (auto["SnapshotName"], auto["SnapshotType"], auto["Status"]) == (
        f"auto_{due:%Y%m%d}_1", "auto", "accomplished")
    assert auto["RetentionDays"] == 1
    assert status(api, iid) == "Running"
    assert guest_run(api, iid, f"cat /mnt/{data}/marker").strip() == "before"
    assert scheduler.tick().taken == []

    # a day after it was taken (by the real clock, about two hours before `due`): past
    # its RetentionDays, and before the next time point
    clock.now = due + timedelta(days=1, minutes=-1)
    report = scheduler.tick()
    assert (report.expired, report.taken) == ([auto_id], [])
    left = _snapshots(api, data)
    assert auto_id not in left and manual in left  # the manual one is past its days too
    assert status(api, iid) == "Running"
    api.call("DeleteAutoSnapshotPolicy", {"AutoSnapshotPolicyId": policy_id})
    api.call("DeleteInstance", {"InstanceId": iid, "Force": "true"})


def test_cli_policy_commands(server: LiveServer) -> None:
    code, _, err = cli(server, "policy", "create", "--time-points", "24", "--weekdays", "1",
                       check=False)
    assert code == 1 and "InvalidTimePoints" in err and len(err.strip().splitlines()) == 1

    _, out, _ = cli(server, "policy", "create", "--time-points", "2,14", "--weekdays",
                    "1,2,3,4,5", "--retention-days", "7", "--name", "cli-nightly")
    policy_id = out.strip()
    assert policy_id.startswith("sp-")
    _, out, _ = cli(server, "api", "CreateDisk", "--Size", "20")
    disk_id = json.loads(out)["DiskId"]

    _, out, _ = cli(server, "policy", "apply", policy_id, disk_id)
    _, out, _ = cli(server, "policy", "list", "--output", "json")
    [mine] = [p for p in json.loads(out)["AutoSnapshotPolicies"]["AutoSnapshotPolicy"]
              if p["AutoSnapshotPolicyId"] == policy_id]
    assert (json.loads(mine["TimePoints"]), json.loads(mine["RepeatWeekdays"]),
            mine["RetentionDays"], mine["DiskNums"], mine["AutoSnapshotPolicyName"]) == (
        ["2", "14"], ["1", "2", "3", "4", "5"], 7, 1, "cli-nightly")
    _, table, _ = cli(server, "policy", "list")
    assert policy_id in table and "2,14" in table  # the ID whole, never cut

    def policy_of(disk: str) -> str:
        _, out, _ = cli(server, "api", "DescribeDisks", "--DiskIds", json.dumps([disk]))
        return str(json.loads(out)["Disks"]["Disk"][0]["AutoSnapshotPolicyId"])

    assert policy_of(disk_id) == policy_id
    cli(server, "policy", "cancel", disk_id)
    assert policy_of(disk_id) == ""
    code, _, err = cli(server, "policy", "apply", "sp-nope", disk_id, check=False)
    assert code == 1 and "NotFound" in err

    cli(server, "policy", "apply", policy_id, disk_id)
    cli(server, "policy", "delete", policy_id)
    assert policy_of(disk_id) == ""
    _, out, _ = cli(server, "policy", "list", "--output", "json")
    assert policy_id not in out
    cli(server, "api", "DeleteDisk", "--DiskId", disk_id)
