"""A rollback with AutoStartInstance boots the VM in its `start` step, on the agent that
runs the task: the task is routed where the instance can start (the host holding its
claim, or, for one on RBD that gave its compute back, a host with room now), and the step
claims the compute only on the host it runs on (`room_to_start(on=)`), never on another
host than the one booting the VM. On PostgreSQL, with the placement tests' fixtures."""

from __future__ import annotations

import pytest

from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import HostState, StoppedMode, Task
from ecsnap.service import cluster, placement
from ecsnap.service.context import ServiceContext, get_region
from ecsnap.service.instances import RunInstance, RunInstancePlan
from ecsnap.service.rollback import ResetDisks, ResetDisksPlan
from tests.cluster.test_placement import QCOW2, SHARED, add_host, host_of, start, stopped
from tests.cluster.test_placement import ctx as ctx


def _plan(instance_id: str, auto_start: bool) -> ResetDisksPlan:
    return ResetDisksPlan(instance_id=instance_id, pairs=(), items=(), safety_group_id="",
                          keep_safety=True, auto_start=auto_start)


def _routed(ctx: ServiceContext, instance_id: str, auto_start: bool = True) -> str | None:
    with ctx.uow() as uow:
        return ResetDisks.runs_on(_plan(instance_id, auto_start), uow)


def _room_on(ctx: ServiceContext, instance_id: str, on: str) -> str:
    with ctx.uow() as uow:
        inst = uow.instances.load(instance_id)
        try:
            return placement.room_to_start(uow, get_region(uow, inst.region_id), inst, on=on)
        except EcsError as exc:
            return exc.code


def test_an_auto_start_rollback_goes_and_boots_where_the_instance_can_start(
        ctx: ServiceContext) -> None:
    add_host(ctx, "h1", vcpus=1, memory_mib=512)
    add_host(ctx, "h2", vcpus=2, memory_mib=1024)
    filler = stopped(ctx, SHARED, 1, host_id="h9")[0]
    rbd = stopped(ctx, SHARED, 1, host_id="h1")[0]  # StopCharging: no claim, last on h1
    assert start(ctx, filler) == "Running"
    with ctx.uow() as uow:  # h2 (the most free) took the filler; fill h1 instead
        uow.instances.load(filler).host_id = "h1"
        uow.commit()
    # h1 is full: the rollback of the RBD instance is routed to h2, where it can start
    assert _routed(ctx, rbd) == "h2"
    assert _routed(ctx, rbd, auto_start=False) == "h1"  # storage only: its host
    # its start step claims the compute on the host that runs it, and only there
    assert _room_on(ctx, rbd, "h2") == "h2"
    assert _room_on(ctx, rbd, "h1") == "OperationDenied.NoStock"
    # a claim held (KeepCharging) on an Up host: routed there, started there
    kept = stopped(ctx, SHARED, 1, host_id="h2", mode=StoppedMode.KEEP_CHARGING)[0]
    assert _routed(ctx, kept) == "h2" and _room_on(ctx, kept, "h2") == "h2"
    # on local disks, pinned: its host fenced, no other host may boot it
    with ctx.uow() as uow:
        uow.hosts.load("h1").state = HostState.FENCED
        uow.commit()
    pinned = stopped(ctx, QCOW2, 1, host_id="h1", mode=StoppedMode.KEEP_CHARGING)[0]
    assert _room_on(ctx, pinned, "h2") == "OperationDenied.NoStock"  # its disks are on h1


def test_a_task_of_a_stopped_instance_on_a_fenced_host_goes_where_its_disks_are_reached(
        ctx: ServiceContext) -> None:
    """Operation.runs_on: a storage-only task (a rollback without AutoStart, a snapshot) of
    a Stopped instance whose host was fenced runs on any agent when its disks are on RBD,
    and waits for its host when they are local files; on an Up host it runs there."""
    add_host(ctx, "h1", vcpus=2, memory_mib=1024)
    add_host(ctx, "h2", vcpus=2, memory_mib=1024)
    rbd = stopped(ctx, SHARED, 1, host_id="h1")[0]
    local = stopped(ctx, QCOW2, 1, host_id="h1")[0]
    assert _routed(ctx, rbd, auto_start=False) == "h1"
    assert _routed(ctx, local, auto_start=False) == "h1"
    with ctx.uow() as uow:
        uow.hosts.load("h1").state = HostState.FENCED
        uow.commit()
    assert _routed(ctx, rbd, auto_start=False) is None
    assert _routed(ctx, local, auto_start=False) == "h1"


def test_a_fenced_hosts_tasks_go_to_any_agent_on_shared_storage_and_wait_on_local_files(
        ctx: ServiceContext) -> None:
    add_host(ctx, "h1", vcpus=2, memory_mib=1024)
    with ctx.uow() as uow:
        for task_id, region in (("t-rbd", SHARED), ("t-local", QCOW2)):
            task = Task(id=task_id, account_id="acc-alice", region_id=region,
                        action="CreateSnapshot")
            task.host_id = "h1"
            uow.tasks.add(task)
        uow.commit()
    with ctx.uow() as uow:
        cluster.reroute(uow, "h1")
        uow.commit()
    with ctx.uow(readonly=True) as uow:
        assert uow.tasks.load("t-rbd").host_id is None
        assert uow.tasks.load("t-local").host_id == "h1"


def test_run_instances_taken_over_from_a_fenced_host_claims_the_host_that_boots_it(
        ctx: ServiceContext) -> None:
    """A RunInstances whose host was fenced before its boot step is driven by another
    agent (its disks on RBD): the VM boots there, so the claim moves there; with no room
    there, NoStock (the task is undone), never a VM on a host that does not count it."""
    add_host(ctx, "h1", vcpus=2, memory_mib=1024)
    add_host(ctx, "h2", vcpus=1, memory_mib=512)
    new, other = stopped(ctx, SHARED, 2, host_id="h1", mode=StoppedMode.KEEP_CHARGING)
    with ctx.uow() as uow:
        uow.hosts.load("h1").state = HostState.FENCED
        uow.commit()

    def boot_on(host_id: str, instance_id: str) -> None:
        task = Task(id=f"t-run-{instance_id}", account_id="acc-alice", region_id=SHARED,
                    action="RunInstance", resource_id=instance_id, owner=host_id)
        RunInstance(ctx, task, RunInstancePlan(instance_id, (), True, "")).boot()

    boot_on("h2", new)
    assert host_of(ctx, new) == "h2" and ctx.compute.state(new).running
    with pytest.raises(EcsError) as refused:  # h2 is full now
        boot_on("h2", other)
    assert refused.value.code == "OperationDenied.NoStock"
    assert host_of(ctx, other) == "h1" and not ctx.compute.state(other).running
