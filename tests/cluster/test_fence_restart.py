"""A fenced host's instances started again elsewhere (service/cluster.py `fence`, `settle`),
in-process on PostgreSQL (a throwaway server, tests/pg.py), without QEMU: what the fencing
agent commits, read back from the database.

The context is an agent's (its unit of work fenced, its runner the AgentRunner: a journaled
task is routed to a host and left to the queue); the VMs are the compute test double, and
the "RBD" region's disks come from a qcow2 directory (placement and the restart only read
the region's pool name: `rbd:...` is shared storage; qcow2 has no Ceph client to shut out).
The end to end run on Ceph with real QEMU is tests/cluster/test_failover_rbd.py."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from ecsnap import bootstrap, config
from ecsnap.adapters.storage.base import StorageBackend
from ecsnap.adapters.storage.qcow2 import Qcow2Backend
from ecsnap.domain.model import (
    Host,
    HostState,
    Instance,
    InstanceStatus,
    StoppedMode,
    Task,
    TaskStatus,
)
from ecsnap.service import cluster, regions
from ecsnap.service.context import ServiceContext
from ecsnap.service.registry import OPERATIONS
from tests.doubles import FileBackedCompute
from tests.pg import PostgresServer

pytestmark = pytest.mark.postgres

ACCOUNT = "acc-alice"
LOCAL = "local-1"  # qcow2 files: an instance is pinned to its host
SHARED = "ceph-1"  # RBD: shared storage, an instance may start on any host
NANO = ("ecs.t5-lc2m1.nano", 1, 512)

Make = Callable[..., ServiceContext]


@pytest.fixture
def make(postgres: PostgresServer, tmp_path: Path) -> Iterator[Make]:
    """An agent's context on a fresh database, with its settings (`restart_fenced`)."""
    made: list[ServiceContext] = []

    def build(**settings: object) -> ServiceContext:
        values = config.load(tmp_path / "data", database_url=postgres.fresh_database(),
                             background_tasks=False, **settings)
        ctx = bootstrap.build(values, compute=FileBackedCompute(), background=False)
        made.append(ctx)
        qcow2_for, files = ctx.storage_for, Qcow2Backend(str(tmp_path / "shared"))

        def storage_for(pool: str) -> StorageBackend:
            return files if pool.startswith("rbd:") else qcow2_for(pool)

        ctx.storage_for = storage_for
        regions.ensure_region(ctx, LOCAL, vcpus=64, memory_mib=65536)
        regions.ensure_region(ctx, SHARED, vcpus=64, memory_mib=65536,
                              storage_pool="rbd:ecsnap?conf=/etc/ceph/ceph.conf&client=admin")
        ctx.uow = cluster.fenced_uow(ctx.uow)  # what bootstrap gives an agent
        ctx.runner = cluster.AgentRunner(ctx, OPERATIONS, background=False)
        return ctx

    yield build
    for ctx in made:
        ctx.extras["engine"].dispose()


def add_host(ctx: ServiceContext, host_id: str, vcpus: int = 4, memory_mib: int = 4096,
             heartbeat_at: datetime | None = None) -> None:
    with ctx.uow() as uow:
        uow.hosts.add(Host(id=host_id, vcpus=vcpus, memory_mib=memory_mib,
                           heartbeat_at=heartbeat_at or cluster.now()))
        uow.commit()


def instance(ctx: ServiceContext, name: str, region: str, status: InstanceStatus,
             host_id: str = "h1", started: datetime | None = None) -> str:
    with ctx.uow() as uow:
        inst = Instance(id=f"i-{name}", account_id=ACCOUNT, region_id=region,
                        zone_id=f"{region}-a", instance_type=NANO[0], vcpus=NANO[1],
                        memory_mib=NANO[2], image_id="m-none", status=status,
                        stopped_mode=StoppedMode.KEEP_CHARGING, host_id=host_id,
                        started=started)
        uow.instances.add(inst)
        uow.commit()
    return inst.id


def load(ctx: ServiceContext, instance_id: str) -> Instance:
    with ctx.uow(readonly=True) as uow:
        return uow.instances.load(instance_id)


def tasks_of(ctx: ServiceContext, instance_id: str) -> list[Task]:
    with ctx.uow(readonly=True) as uow:
        return uow.tasks.find(resource_id=instance_id)


def fence_h1(ctx: ServiceContext) -> None:
    """h1's heartbeat is older than the timeout (`stale_before` after it): h2 fences it."""
    with ctx.uow(readonly=True) as uow:
        h1 = uow.hosts.load("h1")
    assert cluster.fence(ctx, h1, cluster.now() + timedelta(seconds=5), by="h2")
    with ctx.uow(readonly=True) as uow:
        assert uow.hosts.load("h1").state == HostState.FENCED


def warnings_of(caplog: pytest.LogCaptureFixture, instance_id: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "ecsnap.cluster" and instance_id in r.getMessage()]


def test_a_fenced_hosts_instances_on_shared_storage_restart_elsewhere_local_ones_stay(
        make: Make, caplog: pytest.LogCaptureFixture) -> None:
    ctx = make()
    add_host(ctx, "h1")
    add_host(ctx, "h2")
    rbd = instance(ctx, "rbd", SHARED, InstanceStatus.RUNNING)
    local = instance(ctx, "local", LOCAL, InstanceStatus.RUNNING)
    stopped = instance(ctx, "stopped", SHARED, InstanceStatus.STOPPED)
    held = instance(ctx, "held", SHARED, InstanceStatus.RUNNING)
    with ctx.uow() as uow:  # a task holds it: left to that task, as before
        uow.tasks.add(Task(id="t-held", account_id=ACCOUNT, region_id=SHARED,
                           action="TakeSnapshots", resource_id=held, host_id="h1"))
        assert uow.try_lock("instance", [held], "t-held") is None
        uow.commit()
    caplog.set_level(logging.INFO, logger="ecsnap.cluster")

    fence_h1(ctx)

    # (a) on shared storage: StartInstance journaled in the fence's commit, placed and
    # routed to h2 (the fenced host is never chosen), the instance Starting there
    [start] = tasks_of(ctx, rbd)
    assert (start.action, start.status, start.host_id) == \
        ("StartInstance", TaskStatus.PROCESSING, "h2")
    inst = load(ctx, rbd)
    assert (inst.status, inst.host_id, inst.lock_task_id) == \
        (InstanceStatus.STARTING, "h2", start.id)
    assert warnings_of(caplog, rbd) == [
        f"instance {rbd} of fenced host h1 marked Stopped and restarted on host h2 "
        f"(task {start.id})"]
    # (b) on local files of the fenced host: Stopped, no start anywhere, said why
    inst = load(ctx, local)
    assert (inst.status, inst.host_id, tasks_of(ctx, local)) == \
        (InstanceStatus.STOPPED, "h1", [])
    [said] = warnings_of(caplog, local)
    assert "not restarted elsewhere: its disks are local files of h1" in said
    # already Stopped: untouched; held by a task: left to it; its task routed to any agent
    assert (load(ctx, stopped).status, tasks_of(ctx, stopped)) == (InstanceStatus.STOPPED, [])
    inst = load(ctx, held)
    assert (inst.status, inst.lock_task_id) == (InstanceStatus.RUNNING, "t-held")
    assert [t.host_id for t in tasks_of(ctx, held)] == [None]

    # the start is the agents' like any task: h2 claims it and drives it: Running on h2
    with ctx.uow() as uow:
        at = uow.clock()
        claimed = uow.claim_tasks("h2", 1, at, at + timedelta(seconds=30), 5)
        uow.commit()
    assert (start.id, False) in claimed
    assert ctx.runner.drive(start.id).status == TaskStatus.FINISHED
    inst = load(ctx, rbd)
    assert (inst.status, inst.host_id, inst.lock_task_id) == \
        (InstanceStatus.RUNNING, "h2", None)
    assert not any(r.exc_info for r in caplog.records)


def test_restart_fenced_off_leaves_them_stopped(make: Make,
                                                caplog: pytest.LogCaptureFixture) -> None:
    ctx = make(restart_fenced=False)
    add_host(ctx, "h1")
    add_host(ctx, "h2")
    rbd = instance(ctx, "rbd", SHARED, InstanceStatus.RUNNING)
    caplog.set_level(logging.INFO, logger="ecsnap.cluster")
    fence_h1(ctx)
    inst = load(ctx, rbd)
    assert (inst.status, inst.host_id, tasks_of(ctx, rbd)) == \
        (InstanceStatus.STOPPED, "h1", [])
    assert warnings_of(caplog, rbd) == [
        f"instance {rbd} of fenced host h1 marked Stopped; not restarted: "
        "restart_fenced is off"]


def test_the_setting_from_the_environment(monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    assert config.load(tmp_path).restart_fenced is True
    monkeypatch.setenv("ECSNAP_RESTART_FENCED", "0")
    assert config.load(tmp_path).restart_fenced is False
    (tmp_path / "config.json").write_text('{"restart_fenced": false}')
    monkeypatch.setenv("ECSNAP_RESTART_FENCED", "1")  # the environment over config.json
    assert config.load(tmp_path).restart_fenced is True


def test_no_room_anywhere_the_instance_stays_stopped_and_the_fence_completes(
        make: Make, caplog: pytest.LogCaptureFixture) -> None:
    ctx = make()
    add_host(ctx, "h1")
    add_host(ctx, "h2", vcpus=1, memory_mib=512)
    instance(ctx, "filler", SHARED, InstanceStatus.RUNNING, host_id="h2")  # h2 is full
    first = instance(ctx, "first", SHARED, InstanceStatus.RUNNING)
    second = instance(ctx, "second", SHARED, InstanceStatus.RUNNING)
    with ctx.uow() as uow:  # a task routed to h1 on shared storage: rerouted all the same
        uow.tasks.add(Task(id="t-routed", account_id=ACCOUNT, region_id=SHARED,
                           action="TakeSnapshots", resource_id="d-x", host_id="h1"))
        uow.commit()
    add_host(ctx, "h3", vcpus=1, memory_mib=512)  # room for one of the two
    caplog.set_level(logging.INFO, logger="ecsnap.cluster")

    fence_h1(ctx)

    moved = [i for i in (first, second) if load(ctx, i).host_id == "h3"]
    [left] = [i for i in (first, second) if i not in moved]
    assert len(moved) == 1 and load(ctx, moved[0]).status == InstanceStatus.STARTING
    inst = load(ctx, left)
    assert (inst.status, inst.host_id, tasks_of(ctx, left)) == \
        (InstanceStatus.STOPPED, "h1", [])
    [said] = warnings_of(caplog, left)  # one line, with the ECS code; no traceback
    assert "stays Stopped, its automatic restart refused: OperationDenied.NoStock" in said
    assert not any(r.exc_info for r in caplog.records)
    with ctx.uow(readonly=True) as uow:
        assert uow.tasks.load("t-routed").host_id is None  # the fence went on to the end


def test_a_fence_cut_short_is_finished_by_a_peer(make: Make) -> None:
    """The fencing agent died after the fence's commit (the host row Fenced) and before its
    instances were settled — killed before `settle`'s commit, which then never happened:
    this is what the database holds. A peer's next look finishes it: the instance that ran
    there is restarted; one marked Running after the host's last heartbeat (a task taken
    over started it elsewhere) is left alone."""
    ctx = make()
    beat = cluster.now() - timedelta(seconds=60)
    add_host(ctx, "h1", heartbeat_at=beat)
    add_host(ctx, "h2")
    rbd = instance(ctx, "rbd", SHARED, InstanceStatus.RUNNING,
                   started=beat - timedelta(minutes=5))
    later = instance(ctx, "later", SHARED, InstanceStatus.RUNNING,
                     started=beat + timedelta(seconds=30))
    with ctx.uow() as uow:  # the fence's own commit, and nothing after it
        assert uow.fence_host("h1", 1, cluster.now())
        uow.commit()
    peer = cluster.Agent(ctx, "h2", vcpus=4, memory_mib=4096,
                         wait_for_wakeup=lambda _: [])
    assert peer.check_peers(cluster.now()) == []  # nothing to fence: h1 is Fenced already
    [start] = tasks_of(ctx, rbd)
    assert (start.action, start.host_id, load(ctx, rbd).status) == \
        ("StartInstance", "h2", InstanceStatus.STARTING)
    assert (load(ctx, later).status, tasks_of(ctx, later)) == (InstanceStatus.RUNNING, [])
    # settled once: done again, nothing more is started
    assert cluster.settle(ctx, "h1", before=beat) == 0
    assert len(tasks_of(ctx, rbd)) == 1


def test_a_task_that_takes_the_instance_meanwhile_keeps_it(
        make: Make, caplog: pytest.LogCaptureFixture) -> None:
    """A user's StopInstance locks the instance while the fence settles it (its journal,
    not yet committed, holds the row): the fence's start finds the lock held
    (Operation.Conflict, after its journal wrote its task row), rolls everything back and
    settles again, leaving the instance to that task: no StartInstance committed."""
    ctx = make()
    add_host(ctx, "h1")
    add_host(ctx, "h2")
    rbd = instance(ctx, "rbd", SHARED, InstanceStatus.RUNNING)
    caplog.set_level(logging.INFO, logger="ecsnap.cluster")
    engine = ctx.extras["engine"]
    with ctx.uow() as uow:
        uow.tasks.add(Task(id="t-stop", account_id=ACCOUNT, region_id=SHARED,
                           action="StopInstance", resource_id=rbd, host_id="h1"))
        assert uow.try_lock("instance", [rbd], "t-stop") is None
        uow.instances.load(rbd).mark_stopping()
        fencing = threading.Thread(target=fence_h1, args=(ctx,))
        fencing.start()
        deadline = time.monotonic() + 30
        # the fence waits for this transaction's row lock; polled outside a transaction
        # (in one, pg_stat_activity answers the snapshot of its first read, every time)
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            while conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                                    "current_database() AND wait_event_type = 'Lock'")
                               ).scalar_one() == 0:
                assert time.monotonic() < deadline, "the fence never waited for the row"
                time.sleep(0.05)
        uow.commit()
    fencing.join(30)
    assert not fencing.is_alive()
    inst = load(ctx, rbd)
    assert (inst.status, inst.lock_task_id) == (InstanceStatus.STOPPING, "t-stop")
    assert [t.id for t in tasks_of(ctx, rbd)] == ["t-stop"]
    assert any("Operation.Conflict; its instances settled again" in r.getMessage()
               for r in caplog.records)
