"""Both official Alibaba Cloud Python SDKs, unchanged, against a live `ecsnap serve` with
real QEMU VMs: the seed story, pagination, DryRun, and an error per precondition."""

from __future__ import annotations

import base64
import functools
import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.live import LiveServer

pytestmark = pytest.mark.qemu

TYPE = "ecs.t5-lc2m1.nano"


class SdkError(Exception):
    def __init__(self, code: str, status: int) -> None:
        super().__init__(f"{code} ({status})")
        self.code, self.status = code, status


class NewSdk:
    """alibabacloud-ecs20140526 (Tea / darabonba), ACS3-HMAC-SHA256 signatures."""

    def __init__(self, server: LiveServer) -> None:
        from alibabacloud_ecs20140526.client import Client
        from alibabacloud_tea_openapi import models as open_api_models

        c = server.credentials
        self.region = c["RegionId"]
        self.client = Client(open_api_models.Config(
            access_key_id=c["AccessKeyId"], access_key_secret=c["AccessKeySecret"],
            region_id=self.region, endpoint=f"127.0.0.1:{server.port}", protocol="http"))

    def _call(self, fn: Callable[[], Any]) -> Any:
        from alibabacloud_tea_openapi.exceptions import ClientException

        try:
            return fn().body
        except ClientException as exc:
            raise SdkError(exc.code, exc.status_code) from exc

    def run_instance(self, image_id: str) -> str:
        from alibabacloud_ecs20140526 import models as m

        body = self._call(lambda: self.client.run_instances(m.RunInstancesRequest(
            region_id=self.region, image_id=image_id, instance_type=TYPE,
            data_disk=[m.RunInstancesRequestDataDisk(size=20, category="cloud_essd"),
                       m.RunInstancesRequestDataDisk(size=20, category="cloud_essd")])))
        return str(body.instance_id_sets.instance_id_set[0])

    def dry_run(self, image_id: str) -> None:
        from alibabacloud_ecs20140526 import models as m

        self._call(lambda: self.client.run_instances(m.RunInstancesRequest(
            region_id=self.region, image_id=image_id, instance_type=TYPE, dry_run=True)))

    def status(self, instance_id: str) -> str:
        from alibabacloud_ecs20140526 import models as m

        body = self._call(lambda: self.client.describe_instances(m.DescribeInstancesRequest(
            region_id=self.region, instance_ids=json.dumps([instance_id]))))
        return str(body.instances.instance[0].status)

    def disks(self, instance_id: str) -> list[str]:
        from alibabacloud_ecs20140526 import models as m

        body = self._call(lambda: self.client.describe_disks(m.DescribeDisksRequest(
            region_id=self.region, instance_id=instance_id)))
        disks = sorted(body.disks.disk, key=lambda d: d.device)
        return [str(d.disk_id) for d in disks]

    def run(self, instance_id: str, command: str) -> tuple[str, int | None, str]:
        from alibabacloud_ecs20140526 import models as m

        body = self._call(lambda: self.client.run_command(m.RunCommandRequest(
            region_id=self.region, type="RunShellScript", command_content=command,
            instance_id=[instance_id], timeout=60)))
        invoke_id = body.invoke_id
        while True:
            res = self._call(lambda: self.client.describe_invocation_results(
                m.DescribeInvocationResultsRequest(region_id=self.region,
                                                   invoke_id=invoke_id)))
            row = res.invocation.invocation_results.invocation_result[0]
            if row.invoke_record_status != "Running":
                return (base64.b64decode(row.output).decode(), row.exit_code,
                        str(row.error_code or ""))
            time.sleep(0.3)

    def snapshot_group(self, instance_id: str) -> str:
        from alibabacloud_ecs20140526 import models as m

        body = self._call(lambda: self.client.create_snapshot_group(
            m.CreateSnapshotGroupRequest(region_id=self.region, instance_id=instance_id,
                                         name="sdk-new")))
        return str(body.snapshot_group_id)

    def group(self, group_id: str) -> dict[str, Any]:
        from alibabacloud_ecs20140526 import models as m

        body = self._call(lambda: self.client.describe_snapshot_groups(
            m.DescribeSnapshotGroupsRequest(region_id=self.region,
                                            snapshot_group_id=[group_id])))
        g = body.snapshot_groups.snapshot_group[0]
        return {"status": g.status, "snapshots": {s.source_disk_id: s.snapshot_id
                                                  for s in g.snapshots.snapshot}}

    def group_ids_paged(self, page: int) -> list[str]:
        from alibabacloud_ecs20140526 import models as m

        found, token = [], None
        while True:
            req = m.DescribeSnapshotGroupsRequest(region_id=self.region, max_results=page,
                                                  next_token=token)
            body = self._call(functools.partial(self.client.describe_snapshot_groups, req))
            found += [g.snapshot_group_id for g in body.snapshot_groups.snapshot_group]
            token = body.next_token
            if not token:
                return found

    def stop(self, instance_id: str) -> None:
        from alibabacloud_ecs20140526 import models as m

        self._call(lambda: self.client.stop_instance(m.StopInstanceRequest(
            instance_id=instance_id, stopped_mode="KeepCharging")))

    def reset(self, items: list[tuple[str, str]], auto_start: bool) -> None:
        """ResetDisks; with AutoStartInstance (an ecsnap extension the typed model lacks)
        through the SDK's own generic call_api."""
        from alibabacloud_ecs20140526 import models as m
        from alibabacloud_tea_openapi import models as open_api_models
        from alibabacloud_tea_util import models as util_models

        if not auto_start:
            self._call(lambda: self.client.reset_disks(m.ResetDisksRequest(
                region_id=self.region, disk=[m.ResetDisksRequestDisk(disk_id=d, snapshot_id=s)
                                             for d, s in items])))
            return
        query = {"RegionId": self.region, "AutoStartInstance": "true"}
        for n, (d, s) in enumerate(items, 1):
            query[f"Disk.{n}.DiskId"], query[f"Disk.{n}.SnapshotId"] = d, s
        params = open_api_models.Params(action="ResetDisks", version="2014-05-26",
                                        protocol="HTTP", pathname="/", method="POST",
                                        auth_type="AK", style="RPC", req_body_type="formData",
                                        body_type="json")
        self._call(lambda: _Body(self.client.call_api(
            params, open_api_models.OpenApiRequest(query=query), util_models.RuntimeOptions())))


class _Body:
    def __init__(self, response: dict[str, Any]) -> None:
        self.body = response.get("body")


class OldSdk:
    """aliyun-python-sdk-core + aliyun-python-sdk-ecs, RPC v1 HMAC-SHA1 signatures."""

    def __init__(self, server: LiveServer) -> None:
        from aliyunsdkcore.client import AcsClient

        c = server.credentials
        self.region = c["RegionId"]
        self.client = AcsClient(c["AccessKeyId"], c["AccessKeySecret"], self.region)
        self.client.add_endpoint(self.region, "Ecs", f"127.0.0.1:{server.port}")

    def _do(self, request: Any) -> dict[str, Any]:
        from aliyunsdkcore.acs_exception.exceptions import ServerException

        request.set_protocol_type("http")
        try:
            return dict(json.loads(self.client.do_action_with_exception(request)))
        except ServerException as exc:
            raise SdkError(exc.get_error_code(), exc.get_http_status()) from exc

    def run_instance(self, image_id: str) -> str:
        from aliyunsdkecs.request.v20140526.RunInstancesRequest import RunInstancesRequest

        req = RunInstancesRequest()
        req.set_ImageId(image_id)
        req.set_InstanceType(TYPE)
        req.set_DataDisks([{"Size": 20, "Category": "cloud_essd"},
                           {"Size": 20, "Category": "cloud_essd"}])
        return str(self._do(req)["InstanceIdSets"]["InstanceIdSet"][0])

    def dry_run(self, image_id: str) -> None:
        from aliyunsdkecs.request.v20140526.RunInstancesRequest import RunInstancesRequest

        req = RunInstancesRequest()
        req.set_ImageId(image_id)
        req.set_InstanceType(TYPE)
        req.set_DryRun(True)
        self._do(req)

    def status(self, instance_id: str) -> str:
        from aliyunsdkecs.request.v20140526.DescribeInstancesRequest import (
            DescribeInstancesRequest,
        )

        req = DescribeInstancesRequest()
        req.set_InstanceIds(json.dumps([instance_id]))
        return str(self._do(req)["Instances"]["Instance"][0]["Status"])

    def disks(self, instance_id: str) -> list[str]:
        from aliyunsdkecs.request.v20140526.DescribeDisksRequest import DescribeDisksRequest

        req = DescribeDisksRequest()
        req.set_InstanceId(instance_id)
        disks = sorted(self._do(req)["Disks"]["Disk"], key=lambda d: d["Device"])
        return [str(d["DiskId"]) for d in disks]

    def run(self, instance_id: str, command: str) -> tuple[str, int | None, str]:
        from aliyunsdkecs.request.v20140526.DescribeInvocationResultsRequest import (
            DescribeInvocationResultsRequest,
        )
        from aliyunsdkecs.request.v20140526.RunCommandRequest import RunCommandRequest

        req = RunCommandRequest()
        req.set_Type("RunShellScript")
        req.set_CommandContent(command)
        req.set_InstanceIds([instance_id])
        invoke_id = self._do(req)["InvokeId"]
        while True:
            q = DescribeInvocationResultsRequest()
            q.set_InvokeId(invoke_id)
            q.set_ContentEncoding("PlainText")
            row = self._do(q)["Invocation"]["InvocationResults"]["InvocationResult"][0]
            if row["InvokeRecordStatus"] != "Running":
                return row["Output"], row["ExitCode"], row["ErrorCode"]
            time.sleep(0.3)

    def snapshot_group(self, instance_id: str) -> str:
        from aliyunsdkecs.request.v20140526.CreateSnapshotGroupRequest import (
            CreateSnapshotGroupRequest,
        )

        req = CreateSnapshotGroupRequest()
        req.set_InstanceId(instance_id)
        req.set_Name("sdk-old")
        return str(self._do(req)["SnapshotGroupId"])

    def group(self, group_id: str) -> dict[str, Any]:
        from aliyunsdkecs.request.v20140526.DescribeSnapshotGroupsRequest import (
            DescribeSnapshotGroupsRequest,
        )

        req = DescribeSnapshotGroupsRequest()
        req.set_SnapshotGroupIds([group_id])
        g = self._do(req)["SnapshotGroups"]["SnapshotGroup"][0]
        return {"status": g["Status"], "snapshots": {s["SourceDiskId"]: s["SnapshotId"]
                                                     for s in g["Snapshots"]["Snapshot"]}}

    def group_ids_paged(self, page: int) -> list[str]:
        from aliyunsdkecs.request.v20140526.DescribeSnapshotGroupsRequest import (
            DescribeSnapshotGroupsRequest,
        )

        found: list[str] = []
        token = None
        while True:
            req = DescribeSnapshotGroupsRequest()
            req.set_MaxResults(page)
            if token:
                req.set_NextToken(token)
            body = self._do(req)
            found += [g["SnapshotGroupId"] for g in body["SnapshotGroups"]["SnapshotGroup"]]
            token = body.get("NextToken")
            if not token:
                return found

    def stop(self, instance_id: str) -> None:
        from aliyunsdkecs.request.v20140526.StopInstanceRequest import StopInstanceRequest

        req = StopInstanceRequest()
        req.set_InstanceId(instance_id)
        req.set_StoppedMode("KeepCharging")
        self._do(req)

    def reset(self, items: list[tuple[str, str]], auto_start: bool) -> None:
        from aliyunsdkecs.request.v20140526.ResetDisksRequest import ResetDisksRequest

        req = ResetDisksRequest()
        req.set_Disks([{"DiskId": d, "SnapshotId": s} for d, s in items])
        if auto_start:
            req.add_query_param("AutoStartInstance", "true")  # ecsnap's extension
        self._do(req)


def wait(predicate: Callable[[], bool], timeout: float = 120, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def guest(sdk: Any, instance_id: str, command: str, timeout: float = 120) -> str:
    """Run a command once the guest agent answers (right after a boot it may not yet)."""
    deadline = time.monotonic() + timeout
    while True:
        output, code, error = sdk.run(instance_id, command)
        if error not in ("ClientNotResponse", "ExecutionException") or \
                time.monotonic() > deadline:
            assert code == 0 and not error, (output, code, error)
            return str(output)
        time.sleep(1)


WRITE = ("echo {tag}-sys > /root/marker && echo {tag}-d1 > /mnt/{d1}/marker && "
         "echo {tag}-d2 > /mnt/{d2}/marker && sync")
READ = "cat /root/marker /mnt/{d1}/marker /mnt/{d2}/marker"


@pytest.mark.parametrize("flavour", ["new", "old"])
def test_seed_story_with_the_official_sdk(server: LiveServer, demo_image: str,
                                          flavour: str) -> None:
    sdk = NewSdk(server) if flavour == "new" else OldSdk(server)
    with pytest.raises(SdkError) as caught:
        sdk.dry_run(demo_image)
    assert (caught.value.code, caught.value.status) == ("DryRunOperation", 400)

    instance_id = sdk.run_instance(demo_image)
    wait(lambda: sdk.status(instance_id) == "Running", what="Running")
    system, d1, d2 = sdk.disks(instance_id)
    guest(sdk, instance_id, WRITE.format(tag="old", d1=d1, d2=d2))

    group_id = sdk.snapshot_group(instance_id)
    wait(lambda: sdk.group(group_id)["status"] == "accomplished", what="group")
    snaps = sdk.group(group_id)["snapshots"]
    assert set(snaps) == {system, d1, d2}
    guest(sdk, instance_id, WRITE.format(tag="new", d1=d1, d2=d2))

    with pytest.raises(SdkError) as caught:  # the instance is Running
        sdk.reset([(system, snaps[system])], auto_start=False)
    assert (caught.value.code, caught.value.status) == ("IncorrectInstanceStatus", 403)

    sdk.stop(instance_id)
    wait(lambda: sdk.status(instance_id) == "Stopped", what="Stopped")
    with pytest.raises(SdkError) as caught:  # another disk's snapshot
        sdk.reset([(d1, snaps[d2])], auto_start=False)
    assert (caught.value.code, caught.value.status) == ("InvalidParameter.Mismatch", 403)
    with pytest.raises(SdkError) as caught:  # no such snapshot
        sdk.reset([(d1, "s-doesnotexist")], auto_start=False)
    assert (caught.value.code, caught.value.status) == ("InvalidSnapshotId.NotFound", 404)

    sdk.reset([(system, snaps[system]), (d1, snaps[d1])], auto_start=True)
    wait(lambda: sdk.status(instance_id) == "Running", what="Running after rollback")
    out = guest(sdk, instance_id, READ.format(d1=d1, d2=d2))
    assert out.split() == ["old-sys", "old-d1", "new-d2"]

    ids = sdk.group_ids_paged(1)
    assert group_id in ids and len(ids) == len(set(ids)) >= 2  # the safety group too
