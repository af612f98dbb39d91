"""Cluster mode end to end: API processes journal, agents claim, drive, fence."""

from __future__ import annotations

import signal

import pytest

from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import HostState, TaskStatus
from ecsnap.entrypoints.cli.client import ApiClient
from ecsnap.service import snapshots
from tests.cluster.conftest import HOST_TIMEOUT_S, Cluster
from tests.crash import check_invariants, data_state, write

pytestmark = pytest.mark.postgres


def test_snapshot_of_a_stopped_instance_goes_api_task_agent(cluster: Cluster) -> None:
    inst = cluster.stopped_instance()
    api = cluster.client(cluster.api())
    agent = cluster.agent("h1")
    body = api.call("CreateSnapshotGroup", {"InstanceId": inst.id})
    group_id = body["SnapshotGroupId"]
    [task] = [t for t in cluster.tasks(action="TakeSnapshots")]
    task = cluster.ended(task.id)
    assert task.status == TaskStatus.FINISHED, task.error_message
    assert task.owner == "h1" and task.owner_epoch == cluster.host("h1").epoch  # type: ignore[union-attr]
    groups = api.call("DescribeSnapshotGroups", {"SnapshotGroupId.1": group_id})
    [group] = groups["SnapshotGroups"]["SnapshotGroup"]
    assert group["Status"] == "accomplished"
    assert f"claimed task {task.id}" in agent.text()
    # a guest command is checked by the API process as on one host (it is carried to the
    # instance's agent when Running: tests/cluster/test_commands.py); nothing is written
    with pytest.raises(EcsError) as refused:
        api.call("RunCommand", {"InstanceId.1": inst.id, "Type": "RunShellScript",
                                "CommandContent": "true"})
    assert refused.value.code == "IncorrectInstanceStatus"
    with cluster.ctx.uow(readonly=True) as uow:
        assert uow.invocations.find() == []


def test_a_fenced_agents_late_commit_is_refused_and_it_rejoins(cluster: Cluster) -> None:
    inst = cluster.stopped_instance()
    hung = cluster.agent("h1", env={"ECSNAP_CRASH_AT": "TakeSnapshots:snapshot:after",
                                    "ECSNAP_CRASH_SIGNAL": "STOP"})
    api = cluster.client(cluster.api())
    epoch = cluster.host("h1").epoch  # type: ignore[union-attr]
    api.call("CreateSnapshotGroup", {"InstanceId": inst.id})
    [task] = cluster.tasks(action="TakeSnapshots")
    cluster.until(lambda: "fault injection" in hung.text(), 30, "h1 hung in the step")
    assert cluster.task(task.id).owner == "h1"
    cluster.agent("h2")
    # h2 fences h1 once its heartbeat is older than the timeout, then takes the task over
    cluster.until(lambda: cluster.host("h1").state == HostState.FENCED,  # type: ignore[union-attr]
                  HOST_TIMEOUT_S * 4, "h1 fenced")
    assert cluster.host("h1").epoch == epoch + 1  # type: ignore[union-attr]
    done = cluster.ended(task.id)
    assert done.owner == "h2"
    before = (done.status, list(done.done), done.owner, done.owner_epoch, done.finished)
    hung.signal(signal.SIGCONT)
    cluster.until(lambda: "stops working on task" in hung.text(), 30, "h1's late commit refused")
    after = cluster.task(task.id)
    assert (after.status, list(after.done), after.owner, after.owner_epoch,
            after.finished) == before
    # its heartbeat matched no row: it rejoined under a new epoch, empty
    cluster.until(lambda: cluster.host("h1").state == HostState.UP,  # type: ignore[union-attr]
                  30, "h1 rejoined")
    assert cluster.host("h1").epoch == epoch + 2  # type: ignore[union-attr]


def test_a_task_is_claimed_once_by_three_racing_agents(cluster: Cluster) -> None:
    stopped = [cluster.stopped_instance() for _ in range(6)]
    agents = [cluster.agent(h) for h in ("h1", "h2", "h3")]
    apis = [cluster.client(cluster.api()), cluster.client(cluster.api())]
    for n, inst in enumerate(stopped):
        apis[n % 2].call("CreateSnapshotGroup", {"InstanceId": inst.id})
    tasks = cluster.tasks(action="TakeSnapshots")
    assert len(tasks) == len(stopped)
    for task in tasks:
        ended = cluster.ended(task.id)
        assert ended.status == TaskStatus.FINISHED, ended.error_message
    logs = [a.text() for a in agents]
    for task in tasks:
        claims = sum(log.count(f"claimed task {task.id}") for log in logs)
        assert claims == 1, f"{task.id} claimed {claims} times"


def test_kill_9_of_an_api_process_mid_request_then_a_retry_makes_one_task(
        cluster: Cluster) -> None:
    dying = cluster.api()
    dying.env = {**dying.env}
    other = cluster.client(cluster.api())
    dying.stop()
    dying.env["ECSNAP_CRASH_AT"] = "CreateDisk:journaled:after"
    dying.start()
    params = {"ZoneId": "local-1-a", "Size": 20, "ClientToken": "once-only-1"}
    with pytest.raises(EcsError):  # the connection dies with the process: no answer
        cluster.client(dying).call("CreateDisk", params)
    assert dying.proc is not None and dying.proc.wait(10) == -signal.SIGKILL
    [task] = cluster.tasks(action="CreateDisk")  # journaled before the kill
    retried = other.call("CreateDisk", params)
    again = other.call("CreateDisk", params)
    assert retried["DiskId"] == again["DiskId"] == task.resource_id
    assert len(cluster.tasks(action="CreateDisk")) == 1
    cluster.agent("h1")
    assert cluster.ended(task.id).status == TaskStatus.FINISHED
    # a new token: a new disk
    fresh = other.call("CreateDisk", {**params, "ClientToken": "once-only-2"})
    assert fresh["DiskId"] != retried["DiskId"]
    assert len(cluster.tasks(action="CreateDisk")) == 2


@pytest.mark.parametrize(("crash_at", "takeover"), [
    ("ResetDisks:revert:after", "h2"), ("ResetDisks:safety:after", "h2"),
    ("ResetDisks:revert:after", "h1")])  # h1: the same agent, restarted
def test_kill_9_of_an_agent_mid_reset_disks_another_finishes_or_undoes_it(
        cluster: Cluster, crash_at: str, takeover: str) -> None:
    inst = cluster.stopped_instance()
    paths = [cluster.disk_path(d.id) for d in cluster.disks(inst.id)]
    for path in paths:
        write(path, 0xA1, 0, 1 << 20)
    group_id, _ = snapshots.create_snapshot_group(cluster.ctx, cluster.account_id, "local-1",
                                                  inst.id)
    for path in paths:
        write(path, 0xB2, 0, 1 << 20)
    with cluster.ctx.uow(readonly=True) as uow:
        snaps = uow.snapshots.find(group_id=group_id)
    dying = cluster.agent("h1", env={"ECSNAP_CRASH_AT": crash_at})
    api = cluster.client(cluster.api())
    params: dict[str, object] = {}
    for n, snap in enumerate(snaps, 1):
        params[f"Disk.{n}.DiskId"] = snap.source_disk_id
        params[f"Disk.{n}.SnapshotId"] = snap.id
    api.call("ResetDisks", params)
    assert dying.proc.wait(30) == -signal.SIGKILL
    [task] = cluster.tasks(action="ResetDisks")
    assert cluster.task(task.id).status == TaskStatus.PROCESSING
    cluster.agent(takeover)
    ended = cluster.ended(task.id, timeout=HOST_TIMEOUT_S * 4 + 30)
    assert ended.owner == takeover
    # another agent takes over once h1 is fenced; h1 restarted takes it back at once
    assert cluster.host("h1").state == (  # type: ignore[union-attr]
        HostState.FENCED if takeover == "h2" else HostState.UP)
    state = data_state(paths, {"rolled back": [0xA1] * len(paths),
                               "as before": [0xB2] * len(paths)}, 0, 1 << 20)
    assert state == ("rolled back" if ended.status == TaskStatus.FINISHED else "as before")
    check_invariants(cluster.lab())


def test_fifty_conflicting_calls_across_two_api_processes(cluster: Cluster) -> None:
    """ResetDisks, DeleteSnapshotGroup, StopInstance and DeleteInstance on the same
    instances, from 8 threads through two API processes, three agents driving: every call
    answers a result or an ECS error code (never InternalError), and afterwards no task
    is left Processing, no lock held, no disk file half rolled back or orphaned."""
    import random
    import threading

    stopped = [cluster.stopped_instance() for _ in range(3)]
    targets = []
    for inst in stopped:
        group_id, _ = snapshots.create_snapshot_group(cluster.ctx, cluster.account_id,
                                                      "local-1", inst.id)
        with cluster.ctx.uow(readonly=True) as uow:
            snaps = uow.snapshots.find(group_id=group_id)
        targets.append((inst.id, group_id, [(s.source_disk_id, s.id) for s in snaps]))
    for host in ("h1", "h2", "h3"):
        cluster.agent(host)
    apis = [cluster.client(cluster.api()), cluster.client(cluster.api())]
    rng = random.Random(14)
    calls = []
    for n in range(50):
        instance_id, group_id, pairs = rng.choice(targets)
        kind = rng.choice(["ResetDisks", "ResetDisks", "DeleteSnapshotGroup", "StopInstance",
                           "DeleteInstance"])
        params: dict[str, object] = {}
        if kind == "ResetDisks":
            for i, (disk_id, snap_id) in enumerate(pairs, 1):
                params[f"Disk.{i}.DiskId"], params[f"Disk.{i}.SnapshotId"] = disk_id, snap_id
        elif kind == "DeleteSnapshotGroup":
            params["SnapshotGroupId"] = group_id
        else:
            params["InstanceId"] = instance_id
        calls.append((apis[n % 2], kind, params))
    answers: list[str] = []

    def worker(mine: list[tuple[ApiClient, str, dict[str, object]]]) -> None:
        for api, kind, params in mine:
            try:
                api.call(kind, params)
                answers.append("ok")
            except EcsError as exc:
                answers.append(exc.code)

    threads = [threading.Thread(target=worker, args=(calls[i::8],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(answers) == 50
    assert not [a for a in answers if a in ("InternalError", "ServiceUnavailable")], answers
    cluster.until(lambda: not cluster.tasks(status=TaskStatus.PROCESSING), 60,
                  "every task ended")
    check_invariants(cluster.lab())
