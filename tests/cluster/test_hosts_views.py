"""Hosts as operators and tenants see them, through one service function
(service/hosts.describe_hosts): `ecsnap hosts` (table and JSON), the console's Hosts page,
DescribeInstances' HostId (an ecsnap extension field). Real database (SQLite), the compute
test double."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

from starlette.testclient import TestClient
from typer.testing import CliRunner

from ecsnap.domain.model import Host, HostState, Image, utcnow
from ecsnap.entrypoints.api.app import create_app
from ecsnap.entrypoints.api.signature import rpc_v1_request_params
from ecsnap.entrypoints.cli.main import app as cli
from ecsnap.service import accounts, hosts, instances, setup
from ecsnap.service.context import ServiceContext
from tests.conftest import REGION

PASSWORD = "correct horse battery"


def run(ctx: ServiceContext, account: str, image: Image) -> str:
    return instances.run_instances(ctx, account, REGION, instances.InstanceRequest(
        image_id=image.id, instance_type="ecs.t5-lc2m1.nano"))[0]


def two_hosts(ctx: ServiceContext) -> None:
    with ctx.uow() as uow:
        uow.hosts.add(Host(id="h1", vcpus=4, memory_mib=4096, epoch=2,
                           heartbeat_at=utcnow() - timedelta(seconds=3)))
        uow.hosts.add(Host(id="h2", vcpus=2, memory_mib=1024, state=HostState.FENCED,
                           epoch=5))
        uow.commit()


def test_describe_hosts_counts_every_claim_and_lists_only_the_tenants_instances(
        ctx: ServiceContext, image: Image) -> None:
    two_hosts(ctx)
    mine, theirs = run(ctx, "acc-alice", image), run(ctx, "acc-bob", image)
    found = {h.id: h for h in hosts.describe_hosts(ctx, "acc-alice")}
    h1 = found["h1"]  # the only Up host: both instances are on it
    assert (h1.state, h1.epoch, h1.vcpus_used, h1.vcpus_free, h1.memory_mib_free) == \
        ("Up", 2, 2, 2, 4096 - 1024)
    assert h1.instances == (mine,)  # bob's counts in the capacity, its ID is not shown
    assert h1.heartbeat_age_s is not None and 2 <= h1.heartbeat_age_s < 60
    assert found["h2"].state == "Fenced" and found["h2"].instances == ()
    assert sorted(hosts.describe_hosts(ctx)[0].instances) == sorted([mine, theirs])


def test_the_cli_lists_hosts_as_a_table_and_as_json(tmp_path: Path) -> None:
    data = tmp_path / "data"
    runner = CliRunner()
    assert runner.invoke(cli, ["init", "--data-dir", str(data)]).exit_code == 0
    result = runner.invoke(cli, ["hosts", "--data-dir", str(data), "--output", "json"])
    assert result.exit_code == 0, result.output
    (local,) = json.loads(result.output)["Hosts"]
    assert (local["HostId"], local["State"], local["VcpusUsed"], local["InstanceIds"]) == \
        ("local", "Up", 0, [])
    assert local["VcpusFree"] == local["Vcpus"] > 0
    result = runner.invoke(cli, ["hosts", "--data-dir", str(data)])
    assert result.exit_code == 0
    header, row = result.output.splitlines()
    assert header.split()[:3] == ["HOST", "STATE", "EPOCH"]
    assert row.split()[:4] == ["local", "Up", "0", "-"]


def client_for(ctx: ServiceContext) -> Iterator[TestClient]:
    with TestClient(create_app(ctx), base_url="http://127.0.0.1",
                    follow_redirects=False) as c:
        yield c


def test_the_console_hosts_page_and_the_host_of_an_instance(ctx: ServiceContext,
                                                            image: Image) -> None:
    two_hosts(ctx)
    alice = accounts.create_account(ctx, "alice", PASSWORD)
    mine, theirs = run(ctx, alice.id, image), run(ctx, "acc-bob", image)
    for client in client_for(ctx):
        assert client.get("/console/hosts/").status_code in (302, 303)  # log-on first
        page = client.get("/console/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert csrf is not None
        assert client.post("/console/login", data={
            "csrf": csrf.group(1), "account": "alice", "password": PASSWORD}).status_code == 303
        page = client.get("/console/hosts/")
        assert page.status_code == 200
        row = re.search(r'<tr data-host="h1">(.*?)</tr>', page.text, re.S)
        assert row is not None and "Up" in row.group(1) and "2 / 2" in row.group(1)
        assert mine in row.group(1) and theirs not in page.text
        assert 'data-host="h2"' in page.text and "Fenced" in page.text
        detail = client.get(f"/console/instances/{mine}")
        assert detail.status_code == 200 and 'class="host"' in detail.text and "h1" in detail.text
        # /metrics is the API app's, outside the console's log-on
        client.cookies.clear()
        assert client.get("/metrics").status_code == 200


def test_describe_instances_shows_the_host(ctx: ServiceContext, image: Image) -> None:
    key = setup.initialise(ctx, REGION).access_key
    for client in client_for(ctx):
        query = rpc_v1_request_params("RunInstances", {
            "RegionId": REGION, "ImageId": image.id, "InstanceType": "ecs.t5-lc2m1.nano"},
            key.id, key.secret)
        assert client.post("/", params=query).status_code == 200
        query = rpc_v1_request_params("DescribeInstances", {"RegionId": REGION}, key.id,
                                      key.secret)
        (inst,) = client.post("/", params=query).json()["Instances"]["Instance"]
        assert inst["HostId"] == "local"  # the single-host server's implicit host
