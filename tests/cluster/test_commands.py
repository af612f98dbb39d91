"""Cloud Assistant commands in cluster mode (service/commands.py): the invocation written by
the API process is carried to the agent of the instance's host, which runs it through the
guest agent and writes the result; an agent killed mid-command leaves it reported as ECS
reports an interrupted one; the console of an API process says where the serial console
is instead of failing to connect.

Real parts: a throwaway PostgreSQL, `ecsnap agent` and `ecsnap serve` child processes, and
(for the first test) a QEMU VM of the demo image."""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from ecsnap import bootstrap, config
from ecsnap.domain import ids
from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import (
    Host,
    HostState,
    InstanceStatus,
    Invocation,
    InvocationStatus,
)
from ecsnap.entrypoints.api.app import create_app
from ecsnap.entrypoints.cli.client import ApiClient
from ecsnap.service import accounts, commands
from ecsnap.service import cluster as cluster_service
from ecsnap.service.context import ServiceContext
from tests.cluster.conftest import Cluster

pytestmark = [pytest.mark.postgres]

PASSWORD = "correct horse battery"


def results(api: ApiClient, invoke_id: str) -> list[dict[str, Any]]:
    body = api.call("DescribeInvocationResults", {"InvokeId": invoke_id,
                                                  "ContentEncoding": "PlainText"})
    return list(body["Invocation"]["InvocationResults"]["InvocationResult"])


def run(api: ApiClient, instance_id: str, command: str, timeout: int = 60) -> str:
    return str(api.call("RunCommand", {
        "Type": "RunShellScript", "InstanceId.1": instance_id, "CommandContent": command,
        "Timeout": timeout})["InvokeId"])


def ended(api: ApiClient, invoke_id: str, timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        [row] = results(api, invoke_id)
        if row["InvokeRecordStatus"] != "Running":
            return row
        assert time.monotonic() < deadline, f"the command still runs: {row}"
        time.sleep(0.2)


def guest_run(api: ApiClient, instance_id: str, command: str) -> dict[str, Any]:
    """Run once the guest agent answers (right after a boot it may not yet)."""
    deadline = time.monotonic() + 180
    while True:
        row = ended(api, run(api, instance_id, command))
        if row["ErrorCode"] not in ("ClientNotResponse", "ExecutionException") or \
                time.monotonic() > deadline:
            return row
        time.sleep(1)


def records(lab: Cluster, **equals: Any) -> list[Invocation]:
    with lab.ctx.uow(readonly=True) as uow:
        return uow.invocations.find(**equals)


@pytest.mark.qemu
def test_run_command_is_carried_to_the_instances_agent_and_an_agent_killed_mid_command(
        vm_cluster: Cluster) -> None:
    lab = vm_cluster
    agent_a = lab.agent("h1")
    api = lab.client(lab.api())
    instance_id = lab.run_demo(api)
    with lab.ctx.uow(readonly=True) as uow:
        assert uow.instances.load(instance_id).host_id == "h1"
    agent_b = lab.agent("h2")  # up before the commands: it hears every NOTIFY, claims none

    row = guest_run(api, instance_id, "echo from-$(hostname); echo err >&2; exit 3")
    assert (row["InvocationStatus"], row["ErrorCode"], row["ExitCode"]) == \
        ("Failed", "ExitCodeNonzero", 3), row
    assert "from-" in row["Output"] and "err" in row["Output"]
    for pair in ((0, 1), (2, 3)):  # two at once: the most one instance runs
        invokes = {n: run(api, instance_id, f"echo run-{n}") for n in pair}
        for n, invoke_id in invokes.items():
            row = ended(api, invoke_id)
            assert (row["InvocationStatus"], row["Output"]) == ("Success", f"run-{n}\n"), row
    mine = records(lab)
    assert len(mine) >= 5 and {r.owner for r in mine} == {"h1"}
    assert {r.host_id for r in mine} == {"h1"} and all(r.started for r in mine)
    assert "claimed invocation" not in agent_b.text()
    assert "claimed invocation" in agent_a.text()

    # kill -9 of the instance's agent while its command runs: reported interrupted
    invoke_id = run(api, instance_id, "sleep 50; echo late", timeout=120)
    lab.until(lambda: any(r.owner == "h1" for r in records(lab, invoke_id=invoke_id)), 30,
              "the command claimed")
    time.sleep(1.0)  # in the guest now
    agent_a.signal(signal.SIGKILL)
    assert agent_a.proc.wait(30) == -signal.SIGKILL
    row = ended(api, invoke_id, timeout=60)  # fenced after the timeout (3 s) by h2
    assert (row["InvocationStatus"], row["InvokeRecordStatus"], row["ErrorCode"]) == \
        ("Error", "Failed", "ExecutionInterrupted"), row
    assert row["ErrorInfo"] == "the host h1 was fenced (its agent stopped answering)"
    assert row["FinishedTime"] and "late" not in row["Output"]
    host = lab.host("h1")
    assert host is not None and host.state == HostState.FENCED
    body = api.call("DescribeInvocations", {"InvokeId": invoke_id})
    [inv] = body["Invocations"]["Invocation"]
    assert inv["InvocationStatus"] == "Failed"
    assert "claimed invocation" not in agent_b.text()
    # the instance is Stopped with its fenced host: a command is refused, not queued
    with pytest.raises(EcsError, match="IncorrectInstanceStatus"):
        run(api, instance_id, "true")


def routed(ctx: ServiceContext, host_id: str, n: int, instance_id: str = "i-x",
           **fields: Any) -> list[str]:
    made = [Invocation(id=ids.new_id("task"), invoke_id=ids.new_id("task"),
                       command_id=ids.new_id("command"), account_id="a", region_id="r",
                       instance_id=instance_id, command_type="RunShellScript",
                       command_content="echo hi", host_id=host_id, **fields)
            for _ in range(n)]
    with ctx.uow() as uow:
        for record in made:
            uow.invocations.add(record)
        uow.commit()
    return [r.id for r in made]


def test_racing_agents_claim_each_invocation_once_and_only_their_hosts(
        pg_ctx: ServiceContext) -> None:
    with pg_ctx.uow() as uow:
        for host_id in ("h1", "h2"):
            uow.hosts.add(Host(id=host_id, heartbeat_at=cluster_service.now()))
        uow.commit()
    wanted = set(routed(pg_ctx, "h1", 40))
    other = set(routed(pg_ctx, "h2", 3))
    got: dict[str, list[str]] = {"a": [], "b": [], "h2": []}
    start = threading.Barrier(3)

    def claim(name: str, host_id: str) -> None:
        start.wait()
        for _ in range(40):  # bounded: a claim that took a row twice must not loop forever
            batch = commands.claim(pg_ctx, host_id, 1, 3)
            if not batch:
                return
            got[name] += batch

    threads = [threading.Thread(target=claim, args=args)
               for args in (("a", "h1"), ("b", "h1"), ("h2", "h2"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(got["a"] + got["b"]) == sorted(wanted)  # each once, by h1 only
    assert set(got["h2"]) == other
    assert commands.claim(pg_ctx, "h1", 1, 10) == []  # claimed once, never again
    assert commands.claim(pg_ctx, "h1", 2, 10) == []  # not at another epoch either


def test_a_fenced_agents_result_is_refused_and_its_invocations_interrupted(
        pg_ctx: ServiceContext) -> None:
    with pg_ctx.uow() as uow:
        uow.hosts.add(Host(id="h1", heartbeat_at=cluster_service.now() -
                           timedelta(seconds=60)))
        uow.commit()
    first, second = routed(pg_ctx, "h1", 2)
    assert sorted(commands.claim(pg_ctx, "h1", 1, 2)) == sorted([first, second])
    waiting = routed(pg_ctx, "h1", 1)[0]  # never claimed
    with pg_ctx.uow() as uow:  # fenced behind its back (the host row only)
        assert uow.fence_host("h1", 1, cluster_service.now())
        uow.commit()
    commands.run_claimed(pg_ctx, first, "h1", 1)  # its late result: refused
    with pg_ctx.uow(readonly=True) as uow:
        row = uow.invocations.load(first)
    assert (row.status, row.error_code, row.finished) == (InvocationStatus.RUNNING, "", None)
    assert commands.claim(pg_ctx, "h1", 1, 5) == []  # nor does a fenced host claim
    with pg_ctx.uow() as uow:  # what the fence does next (cluster.fence)
        assert sorted(commands.interrupt_host(uow, "h1")) == sorted([first, second, waiting])
        uow.commit()
    with pg_ctx.uow(readonly=True) as uow:
        rows = [uow.invocations.load(i) for i in (first, second, waiting)]
    assert {(r.status, r.error_code, r.record_status) for r in rows} == \
        {(InvocationStatus.ERROR, "ExecutionInterrupted", "Failed")}
    assert all(r.finished is not None for r in rows)


def test_an_agent_runs_what_it_claimed_and_a_taken_record_is_not_overwritten(
        pg_ctx: ServiceContext) -> None:
    with pg_ctx.uow() as uow:
        uow.hosts.add(Host(id="h1", heartbeat_at=cluster_service.now()))
        uow.commit()
    mine, taken = routed(pg_ctx, "h1", 2)
    assert sorted(commands.claim(pg_ctx, "h1", 1, 5)) == sorted([mine, taken])
    with pg_ctx.uow() as uow:  # another epoch's now (as after a rejoin that lost it)
        uow.invocations.load(taken).owner_epoch = 7
        uow.commit()
    commands.run_claimed(pg_ctx, mine, "h1", 1)
    commands.run_claimed(pg_ctx, taken, "h1", 1)
    with pg_ctx.uow(readonly=True) as uow:
        done, kept = uow.invocations.load(mine), uow.invocations.load(taken)
    # no instance i-x Running on h1: reported as ECS does, by the agent that claimed it
    assert (done.status, done.error_code) == (InvocationStatus.ERROR, "InstanceNotRunning")
    assert done.started is not None and done.finished is not None
    assert (kept.status, kept.error_code) == (InvocationStatus.RUNNING, "")


def insert(lab: Cluster, instance_id: str, host_id: str, **fields: Any) -> str:
    record = Invocation(id=ids.new_id("task"), invoke_id=ids.new_id("task"),
                        command_id=ids.new_id("command"), account_id=lab.account_id,
                        region_id="local-1", instance_id=instance_id,
                        command_type="RunShellScript", command_content="echo hi",
                        host_id=host_id, **fields)
    with lab.ctx.uow() as uow:
        uow.invocations.add(record)
        uow.notify(cluster_service.CHANNEL)
        uow.commit()
    return record.id


def test_only_the_hosts_agent_claims_and_a_restarted_agent_reports_interrupted(
        cluster: Cluster) -> None:
    """Without a VM: the invocations are claimed by their host's agent only (the instance is
    not running there, which it reports), and one it had claimed before a restart is
    reported interrupted when it rejoins."""
    assert commands.AGENTS_CHANNEL == cluster_service.CHANNEL  # (cluster is above commands)
    lab = cluster
    inst = lab.stopped_instance()
    agent_1 = lab.agent("h1")
    host = lab.host("h1")
    assert host is not None
    lost = insert(lab, inst.id, "h1", owner="h1", owner_epoch=host.epoch)  # claimed, running
    agent_1.stop()
    queued = insert(lab, inst.id, "h1")  # while it is away: run when it is back
    agent_1 = lab.agent("h1", wait=False)
    lab.until(lambda: (h := lab.host("h1")) is not None and h.epoch > host.epoch and
              h.state == HostState.UP, 60, "h1 rejoined")
    agent_2 = lab.agent("h2")
    with lab.ctx.uow(readonly=True) as uow:
        row = uow.invocations.load(lost)
    assert (row.status, row.error_code, row.error_info) == \
        (InvocationStatus.ERROR, "ExecutionInterrupted",
         "the agent of host h1 stopped while the command ran")
    assert row.finished is not None

    made = [insert(lab, inst.id, "h1") for _ in range(5)] + [queued]
    lab.until(lambda: all(r.status != InvocationStatus.RUNNING for r in records(lab)), 30,
              "the invocations ended")
    for record_id in made:
        with lab.ctx.uow(readonly=True) as uow:
            row = uow.invocations.load(record_id)
        assert (row.owner, row.status, row.error_code) == \
            ("h1", InvocationStatus.ERROR, "InstanceNotRunning"), record_id
    assert "claimed invocation" not in agent_2.text()
    assert agent_1.text().count("claimed invocation") == 6


def console(ctx: Any) -> Iterator[TestClient]:
    with TestClient(create_app(ctx), follow_redirects=False) as client:
        page = client.get("/console/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert csrf is not None
        assert client.post("/console/login", data={
            "csrf": csrf.group(1), "account": "carol", "password": PASSWORD,
        }).status_code == 303
        yield client


def test_an_api_process_refuses_a_command_for_an_instance_without_a_host(
        cluster: Cluster) -> None:
    lab = cluster
    inst = lab.stopped_instance()
    api_ctx = bootstrap.build(config.load(lab.data_dir))  # an API process
    with lab.ctx.uow() as uow:
        row = uow.instances.load(inst.id)
        row.status, row.host_id = InstanceStatus.RUNNING, None
        uow.commit()
    with pytest.raises(EcsError, match=r"IncorrectInstanceStatus.*not placed on a host"):
        commands.run_command(api_ctx, lab.account_id, "local-1", command_type="RunShellScript",
                             content="true", instance_ids=[inst.id])
    assert records(lab) == []
    with lab.ctx.uow() as uow:
        uow.instances.load(inst.id).host_id = "h1"
        uow.commit()
    _, invoke_id = commands.run_command(api_ctx, lab.account_id, "local-1",
                                        command_type="RunShellScript", content="true",
                                        instance_ids=[inst.id])
    [queued] = records(lab, invoke_id=invoke_id)  # for h1's agent, run by nobody here
    assert (queued.host_id, queued.owner, queued.status) == \
        ("h1", "", InvocationStatus.RUNNING)


def test_the_console_of_an_api_process_says_when_the_serial_console_is_out_of_reach(
        cluster: Cluster) -> None:
    """The serial console is carried to the agent of the instance's host (test_serial_proxy):
    an agent started without --address cannot be reached, and the Connect page says so."""
    lab = cluster
    inst = lab.stopped_instance()
    settings = config.load(lab.data_dir)
    assert settings.cluster
    api_ctx = bootstrap.build(settings)  # an API process: no hypervisor
    carol = accounts.create_account(api_ctx, "carol", PASSWORD)
    with lab.ctx.uow() as uow:  # an instance of carol's, on h1, whose agent has no address
        uow.hosts.add(Host(id="h1", heartbeat_at=cluster_service.now()))
        row = uow.instances.load(inst.id)
        row.account_id, row.host_id = carol.id, "h1"
        uow.commit()
    for client in console(api_ctx):
        page = client.get(f"/console/instances/{inst.id}/connect")
        assert page.status_code == 200
        refused = re.search(r'<p class="sub" id="serial-refused"[^>]*>(.*?)</p>', page.text,
                            re.S)
        assert refused is not None
        assert f"The serial console of {inst.id} is unavailable: the agent of its host h1 " \
            "was started without --address" in refused.group(1)
        assert "RunCommand" in refused.group(1)
        assert "data-serial-path" not in page.text and "connect.js" not in page.text
        # the socket itself is refused, never a traceback
        with pytest.raises(WebSocketDisconnect) as closed, client.websocket_connect(
                f"/console/instances/{inst.id}/serial",
                headers={"origin": "http://testserver"}) as ws:
            ws.receive_bytes()
        assert closed.value.code == 4404
        # another account's instance, or none: not found, as any page of it
        assert client.get("/console/instances/i-none/connect").status_code == 404
    with lab.ctx.uow() as uow:  # its agent now listens: the terminal
        uow.hosts.load("h1").address = "127.0.0.1:9"
        uow.commit()
    for client in console(api_ctx):
        page = client.get(f"/console/instances/{inst.id}/connect")
        assert "data-serial-path" in page.text and "connect.js" in page.text
        assert "serial-refused" not in page.text
    # the same page of a single-host server (same database): the terminal, no refusal
    for client in console(lab.ctx):
        page = client.get(f"/console/instances/{inst.id}/connect")
        assert page.status_code == 200
        assert "data-serial-path" in page.text and "connect.js" in page.text
        assert "serial-refused" not in page.text
