"""Placement and capacity on PostgreSQL (a throwaway server, tests/pg.py): the transactional
claim (host rows FOR UPDATE, claims recounted under the lock), NoStock, instances pinned to
the host of their local qcow2 disks vs instances on shared (RBD) storage, StopCharging.

Real service calls on a real database; the VMs are the compute test double, and the
"RBD" region's disk paths come from a qcow2 directory (placement only reads the region's
pool name: `rbd:...` is shared storage)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ecsnap import bootstrap, config
from ecsnap.adapters.storage.base import StorageBackend
from ecsnap.adapters.storage.qcow2 import Qcow2Backend
from ecsnap.domain import rules
from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import Host, HostState, Instance, InstanceStatus, StoppedMode
from ecsnap.service import hosts, instances, regions
from ecsnap.service.context import ServiceContext
from tests.doubles import FileBackedCompute
from tests.pg import PostgresServer

ACCOUNT = "acc-alice"
QCOW2 = "local-1"
SHARED = "ceph-1"
NANO = ("ecs.t5-lc2m1.nano", 1, 512)  # the catalogue's smallest: 1 vCPU, 512 MiB


@pytest.fixture
def ctx(tmp_path: Path, postgres: PostgresServer) -> Iterator[ServiceContext]:
    settings = config.load(tmp_path / "data", database_url=postgres.fresh_database(),
                           background_tasks=False)
    ctx = bootstrap.build(settings, compute=FileBackedCompute(), background=False)
    qcow2_for = ctx.storage_for
    files = Qcow2Backend(str(tmp_path / "shared"))

    def storage_for(pool: str) -> StorageBackend:
        return files if pool.startswith("rbd:") else qcow2_for(pool)

    ctx.storage_for = storage_for
    regions.ensure_region(ctx, QCOW2, vcpus=64, memory_mib=65536)
    regions.ensure_region(ctx, SHARED, vcpus=64, memory_mib=65536,
                          storage_pool="rbd:ecsnap?conf=/etc/ceph/ceph.conf&client=admin")
    yield ctx
    ctx.extras["engine"].dispose()


def add_host(ctx: ServiceContext, host_id: str, vcpus: int, memory_mib: int) -> None:
    with ctx.uow() as uow:
        uow.hosts.add(Host(id=host_id, vcpus=vcpus, memory_mib=memory_mib))
        uow.commit()


def stopped(ctx: ServiceContext, region: str, n: int, host_id: str | None = None,
            mode: StoppedMode = StoppedMode.STOP_CHARGING) -> list[str]:
    """`n` instances Stopped in `mode` (StopCharging: holding no claim) on `host_id`."""
    made = []
    with ctx.uow() as uow:
        for k in range(n):
            inst = Instance(id=f"i-{region}-{host_id}-{k:03d}", account_id=ACCOUNT,
                            region_id=region, zone_id=f"{region}-a", instance_type=NANO[0],
                            vcpus=NANO[1], memory_mib=NANO[2], image_id="m-none",
                            status=InstanceStatus.STOPPED, stopped_mode=mode,
                            host_id=host_id)
            uow.instances.add(inst)
            made.append(inst.id)
        uow.commit()
    return made


def recount(ctx: ServiceContext) -> dict[str, tuple[int, int]]:
    """vCPUs and MiB claimed on each host, counted from the instance rows."""
    with ctx.uow(readonly=True) as uow:
        found: dict[str, list[Instance]] = {}
        for inst in uow.instances.find():
            found.setdefault(inst.host_id or "", []).append(inst)
    return {host: rules.reserved(insts) for host, insts in found.items()}


def start(ctx: ServiceContext, instance_id: str) -> str:
    """The instance's status after StartInstance, or the ECS code it was refused with."""
    try:
        instances.start_instance(ctx, ACCOUNT, instance_id)
    except EcsError as exc:
        return exc.code
    with ctx.uow(readonly=True) as uow:
        return uow.instances.load(instance_id).status.value


def host_of(ctx: ServiceContext, instance_id: str) -> str | None:
    with ctx.uow(readonly=True) as uow:
        return uow.instances.load(instance_id).host_id


def test_fifty_concurrent_starts_never_overbook_a_small_host(ctx: ServiceContext) -> None:
    add_host(ctx, "h-small", vcpus=4, memory_mib=4096)  # room for 4 nano instances
    ids = stopped(ctx, SHARED, 50)
    results: dict[str, str] = {}
    barrier = threading.Barrier(len(ids))

    def race(instance_id: str) -> None:
        barrier.wait()
        results[instance_id] = start(ctx, instance_id)

    threads = [threading.Thread(target=race, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(set(results.values())) == ["OperationDenied.NoStock", "Running"]
    running = [i for i, r in results.items() if r == "Running"]
    assert len(running) == 4
    assert recount(ctx)["h-small"] == (4, 4 * 512)
    assert {host_of(ctx, i) for i in running} == {"h-small"}
    view = {h.id: h for h in hosts.describe_hosts(ctx)}["h-small"]
    assert (view.vcpus_used, view.vcpus_free, sorted(view.instances)) == (4, 0, sorted(running))


def test_run_instances_fills_the_hosts_then_no_stock(ctx: ServiceContext,
                                                     template: Path) -> None:
    from ecsnap.service import images

    image = images.register_image(ctx, SHARED, name="tiny", os_name="Tiny Linux",
                                  template=template, size_gib=1)
    add_host(ctx, "h1", vcpus=2, memory_mib=8192)
    add_host(ctx, "h2", vcpus=1, memory_mib=8192)
    req = instances.InstanceRequest(image_id=image.id, instance_type=NANO[0])
    with pytest.raises(EcsError) as caught:  # 4 asked, 3 fit: none made
        instances.run_instances(ctx, ACCOUNT, SHARED, req, amount=4)
    assert caught.value.code == "OperationDenied.NoStock"
    made = instances.run_instances(ctx, ACCOUNT, SHARED, req, amount=4, min_amount=1)
    assert len(made) == 3
    assert recount(ctx) == {"h1": (2, 1024), "h2": (1, 512)}
    with pytest.raises(EcsError) as caught:
        instances.run_instances(ctx, ACCOUNT, SHARED, req)
    assert caught.value.code == "OperationDenied.NoStock"


def test_stop_charging_releases_the_claim_and_a_start_goes_where_there_is_room(
        ctx: ServiceContext) -> None:
    add_host(ctx, "h1", vcpus=1, memory_mib=1024)
    add_host(ctx, "h2", vcpus=1, memory_mib=512)
    rbd, qcow2 = stopped(ctx, SHARED, 1)[0], stopped(ctx, QCOW2, 1, host_id="h1")[0]
    assert start(ctx, rbd) == "Running" and host_of(ctx, rbd) == "h1"  # the most free
    # h1 is full: the instance on local disks is pinned to h1 (h2 has room: not for it)
    assert start(ctx, qcow2) == "OperationDenied.NoStock"
    assert host_of(ctx, qcow2) == "h1"
    instances.stop_instance(ctx, ACCOUNT, rbd, stopped_mode="StopCharging")
    assert recount(ctx).get("h1") == (0, 0)  # the claim is released
    assert start(ctx, qcow2) == "Running" and host_of(ctx, qcow2) == "h1"
    # the RBD instance starts on any host with room: h2 now
    assert start(ctx, rbd) == "Running" and host_of(ctx, rbd) == "h2"
    assert recount(ctx) == {"h1": (1, 512), "h2": (1, 512)}
    # no room anywhere: NoStock, and nothing claimed
    instances.stop_instance(ctx, ACCOUNT, rbd, stopped_mode="StopCharging")
    extra = stopped(ctx, SHARED, 1, host_id="h9")[0]
    assert start(ctx, extra) == "Running" and host_of(ctx, extra) == "h2"
    assert start(ctx, rbd) == "OperationDenied.NoStock"
    assert recount(ctx) == {"h1": (1, 512), "h2": (1, 512)}


def test_keep_charging_restarts_on_its_host_and_a_fenced_host_is_not_chosen(
        ctx: ServiceContext) -> None:
    add_host(ctx, "h1", vcpus=1, memory_mib=512)
    add_host(ctx, "h2", vcpus=4, memory_mib=4096)
    kept = stopped(ctx, SHARED, 1, host_id="h1", mode=StoppedMode.KEEP_CHARGING)[0]
    assert start(ctx, kept) == "Running" and host_of(ctx, kept) == "h1"  # its claim
    instances.stop_instance(ctx, ACCOUNT, kept)  # KeepCharging
    with ctx.uow() as uow:
        uow.hosts.load("h1").state = HostState.FENCED
        uow.commit()
    # its host is fenced: on RBD it is placed again, elsewhere
    assert start(ctx, kept) == "Running" and host_of(ctx, kept) == "h2"
    pinned = stopped(ctx, QCOW2, 1, host_id="h1", mode=StoppedMode.KEEP_CHARGING)[0]
    assert start(ctx, pinned) == "OperationDenied.NoStock"  # its disks are on h1, fenced


def test_the_single_host_server_has_one_implicit_host(ctx: ServiceContext) -> None:
    ids = stopped(ctx, QCOW2, 2)
    assert start(ctx, ids[0]) == "Running" and host_of(ctx, ids[0]) == "local"
    (local,) = hosts.describe_hosts(ctx)
    assert (local.id, local.state, local.vcpus_used, local.heartbeat_age_s) == \
        ("local", "Up", 1, None)
