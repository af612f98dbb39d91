"""The queue, the leases and the epoch fencing on PostgreSQL, in-process (service/cluster.py
and the store's claim_tasks / hold_epoch / heartbeat / fence_host)."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pytest

from ecsnap import bootstrap, config
from ecsnap.domain.model import Host, HostState, Task, TaskStatus
from ecsnap.service import cluster
from ecsnap.service.context import ServiceContext
from ecsnap.service.tasks import Fenced
from tests.doubles import FileBackedCompute
from tests.pg import PostgresServer

pytestmark = pytest.mark.postgres


def _hosts(ctx: ServiceContext, *host_ids: str) -> None:
    with ctx.uow() as uow:
        for host_id in host_ids:
            uow.hosts.add(Host(id=host_id, heartbeat_at=cluster.now()))
        uow.commit()


def _tasks(ctx: ServiceContext, n: int, host_id: str | None = None) -> list[str]:
    with ctx.uow() as uow:
        tasks = [Task(id=f"t-{host_id or 'any'}-{i}", account_id="a", region_id="r",
                      action="TakeSnapshots", host_id=host_id) for i in range(n)]
        for task in tasks:
            uow.tasks.add(task)
        uow.commit()
    return [t.id for t in tasks]


def test_racing_claims_take_each_task_once(pg_ctx: ServiceContext) -> None:
    _hosts(pg_ctx, "h1", "h2", "h3")
    wanted = set(_tasks(pg_ctx, 60))
    got: dict[str, list[str]] = {"h1": [], "h2": [], "h3": []}
    start = threading.Barrier(3)

    def claim(host_id: str) -> None:
        start.wait()
        while True:
            with pg_ctx.uow() as uow:
                at = cluster.now()
                claimed = uow.claim_tasks(host_id, 1, at, at + timedelta(seconds=30), 2)
                uow.commit()
            if not claimed:
                return
            got[host_id] += [task_id for task_id, _ in claimed]

    threads = [threading.Thread(target=claim, args=(h,)) for h in got]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [t for ids in got.values() for t in ids]
    assert sorted(every) == sorted(wanted)  # each once, none lost
    with pg_ctx.uow(readonly=True) as uow:
        for host_id, ids in got.items():
            assert all(uow.tasks.load(t).owner == host_id for t in ids)


def test_claims_follow_the_route_and_skip_live_owners(pg_ctx: ServiceContext) -> None:
    _hosts(pg_ctx, "h1", "h2")
    [mine] = _tasks(pg_ctx, 1, host_id="h1")
    at = cluster.now()
    lease = at + timedelta(seconds=30)
    with pg_ctx.uow() as uow:
        assert uow.claim_tasks("h2", 1, at, lease, 10) == []  # routed to h1
        assert uow.claim_tasks("h1", 1, at, lease, 10) == [(mine, False)]
        uow.commit()
    with pg_ctx.uow() as uow:  # owned by a live h1 under its epoch, lease running
        assert uow.claim_tasks("h1", 1, at, lease, 10) == []
        uow.commit()


def test_a_fenced_hosts_writes_are_refused_and_its_tasks_taken_over(
        pg_ctx: ServiceContext) -> None:
    _hosts(pg_ctx, "h1", "h2")
    [task_id] = _tasks(pg_ctx, 1)
    at = cluster.now()
    with pg_ctx.uow() as uow:
        assert uow.claim_tasks("h1", 1, at, at + timedelta(seconds=30), 1) == [(task_id, False)]
        uow.commit()
    driving = ("h1", 1, task_id)
    token = cluster._DRIVING.set(driving)
    try:
        with pg_ctx.uow() as uow:  # still ours: accepted
            uow.tasks.load(task_id).step_done("a")
            uow.commit()
    finally:
        cluster._DRIVING.reset(token)
    later = cluster.now() + timedelta(seconds=5)
    with pg_ctx.uow(readonly=True) as uow:
        h1 = uow.hosts.load("h1")
    # only the one whose conditional UPDATE wins fences it
    results = [cluster.fence(pg_ctx, h1, later, by=by) for by in ("h2", "h3")]
    assert results == [True, False]
    token = cluster._DRIVING.set(driving)
    try:
        with pytest.raises(Fenced), pg_ctx.uow() as uow:
            uow.tasks.load(task_id).step_done("b")
            uow.commit()
    finally:
        cluster._DRIVING.reset(token)
    with pg_ctx.uow() as uow:
        assert uow.tasks.load(task_id).done == ["a"]  # the late write is not there
        assert not uow.heartbeat("h1", 1, later)  # matches no row: h1 finds itself fenced
        host = uow.hosts.load("h1")
        assert (host.state, host.epoch) == (HostState.FENCED, 2)
        # its task is claimable (its owner is not Up at that epoch), as a cut-short one
        assert uow.claim_tasks("h2", 1, later, later + timedelta(seconds=30), 5) == \
            [(task_id, True)]
        uow.commit()


def test_a_task_routed_to_a_fenced_host_on_local_files_waits_for_it(
        pg_ctx: ServiceContext) -> None:
    """Fencing reroutes a host's tasks to any agent only on shared storage (RBD:
    tests/cluster/test_rollback_placement.py); the region "r" here is no RBD pool, so the
    task waits for its host, which claims it when it rejoins under a new epoch."""
    _hosts(pg_ctx, "h1", "h2")
    [routed] = _tasks(pg_ctx, 1, host_id="h1")
    later = cluster.now() + timedelta(seconds=5)
    with pg_ctx.uow() as uow:
        assert uow.claim_tasks("h2", 1, later, later, 5) == []
        uow.commit()
    with pg_ctx.uow(readonly=True) as uow:
        h1 = uow.hosts.load("h1")
    assert cluster.fence(pg_ctx, h1, later)
    with pg_ctx.uow() as uow:
        assert uow.claim_tasks("h2", 1, later, later, 5) == []
        host = uow.hosts.load("h1")  # h1 rejoins (Agent.register)
        host.epoch, host.state, host.heartbeat_at = host.epoch + 1, HostState.UP, later
        epoch = host.epoch
        uow.commit()
    with pg_ctx.uow() as uow:
        assert uow.claim_tasks("h1", epoch, later, later, 5) == [(routed, False)]
        uow.commit()


def test_a_fresh_heartbeat_is_never_fenced(pg_ctx: ServiceContext) -> None:
    _hosts(pg_ctx, "h1")
    with pg_ctx.uow(readonly=True) as uow:
        h1 = uow.hosts.load("h1")
    assert not cluster.fence(pg_ctx, h1, h1.heartbeat_at - timedelta(seconds=1))
    with pg_ctx.uow(readonly=True) as uow:
        assert uow.hosts.load("h1").state == HostState.UP


def test_a_task_already_ended_is_not_claimed(pg_ctx: ServiceContext) -> None:
    _hosts(pg_ctx, "h1")
    [task_id] = _tasks(pg_ctx, 1)
    with pg_ctx.uow() as uow:
        uow.tasks.load(task_id).finish()
        uow.commit()
    at = cluster.now()
    with pg_ctx.uow() as uow:
        assert uow.claim_tasks("h1", 1, at, at, 5) == []
        assert uow.tasks.load(task_id).status == TaskStatus.FINISHED


@pytest.mark.parametrize("database", ["postgres", "sqlite"])
def test_one_client_token_racing_in_two_threads_makes_one_disk(
        postgres: PostgresServer, tmp_path: Path, database: str) -> None:
    from ecsnap.domain.errors import EcsError
    from ecsnap.service import disks, regions

    url = postgres.fresh_database() if database == "postgres" else \
        f"sqlite:///{tmp_path / 'ecsnap.db'}"
    settings = config.load(tmp_path / "data", database_url=url, background_tasks=False)
    ctx = bootstrap.build(settings, compute=FileBackedCompute(), background=False)
    regions.ensure_region(ctx, "local-1", vcpus=8, memory_mib=8192)
    start = threading.Barrier(4)
    answers: list[str] = []

    def create() -> None:
        start.wait()
        try:
            answers.append(disks.create_disk(ctx, "acc-alice", "local-1", size_gib=20,
                                             client_token="tok-1"))
        except EcsError as exc:
            answers.append(exc.code)

    threads = [threading.Thread(target=create) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with ctx.uow(readonly=True) as uow:
        made = uow.disks.find(account_id="acc-alice")
    assert len(made) == 1
    assert set(answers) <= {made[0].id, "LastTokenProcessing"}, answers
    assert disks.create_disk(ctx, "acc-alice", "local-1", size_gib=20,
                             client_token="tok-1") == made[0].id
    ctx.extras["engine"].dispose()


def test_a_failed_claim_never_ends_the_agents_loop(pg_ctx: ServiceContext,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A claim that fails (the database away a moment; the host stopped inside the claim's
    transaction, whose session the server then ended) is logged and tried again: the
    loop goes on claiming (it once left `run`, and the agent never claimed again)."""
    agent = cluster.Agent(pg_ctx, "h1", vcpus=4, memory_mib=4096,
                          wait_for_wakeup=lambda _: [])
    calls: list[int] = []

    def claim_full() -> bool:
        calls.append(len(calls))
        if len(calls) == 1:
            raise RuntimeError("the connection was closed")
        if len(calls) >= 3:
            agent.stop()
        return False

    monkeypatch.setattr(agent, "claim_full", claim_full)
    monkeypatch.setattr(agent, "claim_commands", lambda: 0)
    monkeypatch.setattr(agent, "_heartbeats", lambda: None)
    runner = threading.Thread(target=agent.run)
    runner.start()
    runner.join(30)
    assert not runner.is_alive() and len(calls) >= 3
