"""The API app in-process (real database, real qcow2 files; the compute test double):
actions, envelopes, tenancy, and a property-based test of bad input on every action."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from ecsnap.domain.model import Image
from ecsnap.entrypoints.api.actions import ACTIONS
from ecsnap.entrypoints.api.app import Api, create_app
from ecsnap.entrypoints.api.signature import rpc_v1_request_params
from ecsnap.service import accounts, setup
from ecsnap.service.context import ServiceContext
from tests.conftest import REGION

Caller = Callable[..., tuple[int, dict[str, Any]]]


@pytest.fixture
def client(ctx: ServiceContext) -> Iterator[TestClient]:
    with TestClient(create_app(ctx), base_url="http://127.0.0.1") as c:
        yield c


def caller(client: TestClient, key_id: str, secret: str) -> Caller:
    def call(action: str, fmt: str = "JSON", **params: Any) -> tuple[int, dict[str, Any]]:
        values = {"RegionId": REGION, **{k.replace("__", "."): str(v) for k, v in
                                         params.items()}}
        query = rpc_v1_request_params(action, values, key_id, secret, fmt=fmt)
        response = client.post("/", params=query)
        if fmt == "XML":
            return response.status_code, {"xml": response.text}
        return response.status_code, response.json()
    return call


@pytest.fixture
def alice(ctx: ServiceContext, client: TestClient) -> Caller:
    done = setup.initialise(ctx, REGION)
    return caller(client, done.access_key.id, done.access_key.secret)


@pytest.fixture
def bob(ctx: ServiceContext, client: TestClient) -> Caller:
    accounts.create_account(ctx, "bob", "violet-harbour-7")
    key = accounts.create_access_key(ctx, "bob")
    return caller(client, key.id, key.secret)


def run_instance(call: Caller, image: Image) -> str:
    status, body = call("RunInstances", ImageId=image.id, InstanceType="ecs.t5-lc2m1.nano",
                        DataDisk__1__Size=20, DataDisk__2__Size=20)
    assert status == 200, body
    [instance_id] = body["InstanceIdSets"]["InstanceIdSet"]
    return str(instance_id)


def test_regions_zones_and_envelope(alice: Caller) -> None:
    status, body = alice("DescribeRegions")
    assert status == 200 and body["Regions"]["Region"][0]["RegionId"] == REGION
    assert len(body["RequestId"]) == 36 and body["RequestId"].isupper()
    status, body = alice("DescribeZones")
    assert body["Zones"]["Zone"][0]["ZoneId"] == f"{REGION}-a"
    status, body = alice("NoSuchAction")
    assert status == 404 and body["Code"] == "InvalidAction.NotFound"
    assert set(body) == {"RequestId", "HostId", "Code", "Message", "Recommend"}
    status, body = alice("DescribeInstances", fmt="XML")
    assert status == 200 and body["xml"].startswith("<?xml")
    assert "<DescribeInstancesResponse>" in body["xml"]


def test_seed_story_through_the_api(alice: Caller, image: Image) -> None:
    instance_id = run_instance(alice, image)
    status, body = alice("DescribeInstances", InstanceIds=json.dumps([instance_id]))
    [shown] = body["Instances"]["Instance"]
    assert (shown["Status"], shown["OSName"], shown["ImageId"]) == ("Running", "Tiny Linux",
                                                                   image.id)
    status, body = alice("CreateSnapshotGroup", InstanceId=instance_id, Name="before")
    assert status == 200, body
    group_id = body["SnapshotGroupId"]
    status, body = alice("DescribeSnapshotGroups", SnapshotGroupId__1=group_id)
    [group] = body["SnapshotGroups"]["SnapshotGroup"]
    assert group["Status"] == "accomplished" and len(group["Snapshots"]["Snapshot"]) == 3
    members = group["Snapshots"]["Snapshot"]
    assert [m["SourceDiskType"] for m in members] == ["system", "data", "data"]
    assert (group["ConsistencyLevel"], group["Purpose"], group["ProgressStatus"]) == (
        "FileSystemConsistent", "user", "100%"), group
    disks = {f"Disk__{n}__DiskId": s["SourceDiskId"] for n, s in enumerate(members[:2], 1)}
    snaps = {f"Disk__{n}__SnapshotId": s["SnapshotId"] for n, s in enumerate(members[:2], 1)}
    status, body = alice("ResetDisks", **disks, **snaps)
    assert status == 403 and body["Code"] == "IncorrectInstanceStatus"
    assert alice("StopInstance", InstanceId=instance_id)[0] == 200
    status, body = alice("PreviewResetDisks", **disks, **snaps)
    assert body["Allowed"] is True and len(body["Disks"]["Disk"]) == 2
    status, body = alice("ResetDisks", **disks, **snaps, AutoStartInstance="true")
    assert status == 200, body
    assert body["SafetySnapshotGroupId"].startswith("ssg-")
    items = body["OperationProgressSet"]["OperationProgress"]
    assert {i["RelatedItemSet"]["RelatedItem"][1]["Value"] for i in items} == set(disks.values())
    status, body = alice("DescribeTaskAttribute", TaskId=body["TaskId"])
    assert body["TaskStatus"] == "Finished"
    status, body = alice("DescribeInstanceStatus", InstanceId__1=instance_id)
    assert body["InstanceStatuses"]["InstanceStatus"][0]["Status"] == "Running"


def test_accounts_cannot_see_each_other(alice: Caller, bob: Caller, image: Image) -> None:
    instance_id = run_instance(alice, image)
    _, body = bob("DescribeInstances")
    assert body["Instances"]["Instance"] == [] and body["TotalCount"] == 0
    status, body = bob("StopInstance", InstanceId=instance_id)
    assert status == 404 and body["Code"] == "InvalidInstanceId.NotFound"
    status, body = alice("CreateSnapshotGroup", InstanceId=instance_id)
    status, body = bob("DeleteSnapshotGroup", SnapshotGroupId=body["SnapshotGroupId"])
    assert status == 404
    assert bob("DescribeSnapshotGroups")[1]["SnapshotGroups"]["SnapshotGroup"] == []


def test_dry_run_and_client_token(alice: Caller, image: Image) -> None:
    status, body = alice("RunInstances", ImageId=image.id, InstanceType="ecs.t5-lc2m1.nano",
                         DryRun="true")
    assert status == 400 and body["Code"] == "DryRunOperation"
    assert alice("DescribeInstances")[1]["TotalCount"] == 0
    first = alice("RunInstances", ImageId=image.id, InstanceType="ecs.t5-lc2m1.nano",
                  ClientToken="tok-1")[1]
    again = alice("RunInstances", ImageId=image.id, InstanceType="ecs.t5-lc2m1.nano",
                  ClientToken="tok-1")[1]
    assert first["InstanceIdSets"] == again["InstanceIdSets"]
    assert alice("DescribeInstances")[1]["TotalCount"] == 1
    status, body = alice("RunInstances", ImageId=image.id, InstanceType="ecs.g6.large",
                         ClientToken="tok-1")
    assert status == 400 and body["Code"] == "IdempotentParameterMismatch"


def state_digest(ctx: ServiceContext) -> str:
    with ctx.uow() as uow:
        rows = []
        for repo in (uow.instances, uow.disks, uow.snapshots, uow.snapshot_groups, uow.images):
            for obj in repo.find():
                rows.append(repr(sorted((k, str(v)) for k, v in vars(obj).items()
                                        if not k.startswith("_"))))
        return "\n".join(sorted(rows))


NAMES = ["InstanceId", "DiskId", "SnapshotId", "SnapshotGroupId", "ImageId", "InstanceType",
         "Size", "NewSize", "Name", "Description", "DryRun", "Amount", "PageSize",
         "PageNumber", "MaxResults", "NextToken", "Disk.1.DiskId", "Disk.1.SnapshotId",
         "DataDisk.1.Size", "Tag.1.Key", "Tag.1.Value", "InstanceIds", "DiskIds",
         "StoppedMode", "ExcludeDiskId.1", "Status", "CommandContent", "Type", "Timeout",
         "AutoStartInstance", "SafetySnapshot", "Force", "InstanceId.1", "Status.1",
         "SystemDisk.Size", "ClientToken", "ZoneId", "Format"]
VALUES = st.one_of(st.sampled_from(["", "true", "false", "0", "-1", "99999999999999999999",
                                    "[]", '["x"]', "[1,2]", "{", "i-x", "d-x", "s-x", "ssg-x",
                                    "None", "1e9", "ecs.g6.large", "KeepCharging", "\x00",
                                    "%", "a" * 300, "数据", "http://x"]),
                   st.text(max_size=40))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(action=st.sampled_from(sorted(ACTIONS)),
       params=st.dictionaries(st.sampled_from(NAMES), VALUES, max_size=6))
def test_bad_input_never_breaks_anything(ctx: ServiceContext, alice: Caller, image: Image,
                                         action: str, params: dict[str, str]) -> None:
    params.pop("Format", None)
    before = state_digest(ctx)
    status, body = alice(action, **{k.replace(".", "__"): v for k, v in params.items()})
    assert status < 500, body
    assert "Traceback" not in json.dumps(body)
    if status >= 400:
        assert body["Code"] and body["Message"] and body["RequestId"]
        assert state_digest(ctx) == before, f"{action} {params} changed state on {body}"


def test_a_replayed_request_is_refused_even_after_a_restart(ctx: ServiceContext,
                                                            client: TestClient) -> None:
    done = setup.initialise(ctx, REGION)
    query = rpc_v1_request_params("DescribeRegions", {"RegionId": REGION},
                                  done.access_key.id, done.access_key.secret)
    assert client.post("/", params=query).status_code == 200
    again = client.post("/", params=query)
    assert again.status_code == 400 and again.json()["Code"] == "SignatureNonceUsed"
    with TestClient(create_app(ctx), base_url="http://127.0.0.1") as restarted:
        replay = restarted.post("/", params=query)
    assert replay.status_code == 400 and replay.json()["Code"] == "SignatureNonceUsed"
    tampered = [(k, "eu-1" if k == "RegionId" else v) for k, v in query]
    response = client.post("/", params=tampered)
    assert response.json()["Code"] == "SignatureDoesNotMatch" and ":" in response.json()[
        "Message"]


def test_a_key_disabled_after_its_last_request_is_refused_at_its_next(
        ctx: ServiceContext, client: TestClient) -> None:
    """The API keeps the keys it checked signatures with (accounts.signing_key): a key
    disabled, deleted, or whose account is disabled since (by this process or another;
    neither tells the cache) is refused at its very next request, with its own code."""
    done = setup.initialise(ctx, REGION)
    key_id = done.access_key.id
    call = caller(client, key_id, done.access_key.secret)

    def answer() -> tuple[int, str]:
        status, body = call("DescribeRegions")
        return status, body.get("Code", "")

    assert answer() == (200, "") and key_id in ctx.signing_keys  # now used from the cache
    accounts.disable_access_key(ctx, key_id)
    assert answer() == (403, "Forbidden.AccessKeyDisabled")
    assert answer() == (403, "Forbidden.AccessKeyDisabled")  # read again, and not kept
    accounts.enable_access_key(ctx, key_id)
    assert answer() == (200, "")
    accounts.disable_account(ctx, done.account.name)
    assert answer() == (403, "Forbidden.AccessKeyDisabled")
    accounts.enable_account(ctx, done.account.name)
    assert answer() == (200, "") and key_id in ctx.signing_keys
    accounts.delete_access_key(ctx, key_id)
    assert answer() == (400, "InvalidAccessKeyId.NotFound")


def test_describe_threads_follow_the_database_and_the_cluster(ctx: ServiceContext) -> None:
    """One Describe thread on SQLite (all CPU in this process) and in a cluster (the other
    API processes fill the database waits); two on a single-host PostgreSQL."""
    assert Api(ctx).workers == 1
    pg = replace(ctx, settings=replace(ctx.settings, database_url="postgresql+psycopg://h/d"))
    assert Api(pg).workers == 2
    assert Api(replace(pg, settings=replace(pg.settings, cluster=True))).workers == 1
    assert Api(pg, 3).workers == 3
