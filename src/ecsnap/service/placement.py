"""Building block: placement, which host an instance's compute is claimed on.

One code path for both modes. In a cluster (the `hosts` table has rows: agents registered)
the candidates are the Up hosts, their rows locked FOR UPDATE (`uow.lock_hosts`) and the
claims on each recounted under that lock, so two concurrent starts cannot overbook a host:
the second waits for the first's commit and then counts its claim. On the single-host
server (no host rows) the one candidate is the implicit host "local" with the region's
capacity (`Region.vcpu_capacity`, `memory_mib_capacity`, as before) and the claims of the
region's instances.

A claim is held by an instance that holds a reservation (`Instance.holds_reservation`:
Pending, Starting, Running, Stopping, or Stopped in KeepCharging) on the host named by its
`host_id`; StopCharging releases it. An instance whose disks are local qcow2 files is pinned
to its host; one on Ceph RBD may go to any host.
"""

from __future__ import annotations

from collections.abc import Sequence

from ecsnap.adapters.store.base import UnitOfWork
from ecsnap.domain import rules
from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import Host, HostState, Instance, InstanceStatus, Region

LOCAL_HOST = "local"


def local_host(region: Region) -> Host:
    """The single-host server's implicit host, with the region's capacity."""
    return Host(id=LOCAL_HOST, vcpus=region.vcpu_capacity,
                memory_mib=region.memory_mib_capacity)


def clustered(uow: UnitOfWork) -> bool:
    return bool(uow.hosts.find())


def place(uow: UnitOfWork, region: Region, inst: Instance,
          also: Sequence[Instance] = (), *, on: str | None = None) -> str:
    """The host where `inst` (not holding a claim yet) can claim its compute now, beside
    the claims already held and those of `also` (instances placed in this transaction, not
    yet written). The caller sets `inst.host_id` in the same transaction, which holds the
    host rows locked until it ends. OperationDenied.NoStock when no host has room. `on`
    (a cluster): the VM boots on that host (the agent running the step), so only it is a
    candidate."""
    pinned = None if region.shared_storage else inst.host_id
    if on is not None and clustered(uow):
        if pinned is not None and pinned != on:  # its disks are local to another host
            return rules.choose_host([], {}, inst.vcpus, inst.memory_mib,
                                     pinned_to=pinned).id
        pinned = on
    if not clustered(uow):
        others = [i for i in uow.instances.find(region_id=region.id) if i.id != inst.id]
        return rules.choose_host([local_host(region)], {LOCAL_HOST: [*others, *also]},
                                 inst.vcpus, inst.memory_mib,
                                 pinned_to=LOCAL_HOST if pinned else None).id
    hosts = uow.lock_hosts()
    claims: dict[str, list[Instance]] = {
        h.id: [i for i in uow.instances.find(host_id=h.id) if i.id != inst.id] for h in hosts}
    for other in also:
        claims.setdefault(other.host_id or "", []).append(other)
    return rules.choose_host(hosts, claims, inst.vcpus, inst.memory_mib,
                             pinned_to=pinned).id


def place_new(uow: UnitOfWork, region: Region, vcpus: int, memory_mib: int,
              amount: int) -> list[str]:
    """Hosts for up to `amount` new instances of that size, placed one after another (each
    counted on its host for the next): as many as fit, fewer when room runs out; the
    NoStock error when not even one fits."""
    placed: list[Instance] = []
    for n in range(amount):
        new = Instance(id=f"new-{n}", account_id="", region_id=region.id, zone_id="",
                       instance_type="", vcpus=vcpus, memory_mib=memory_mib, image_id="",
                       status=InstanceStatus.PENDING)
        try:
            new.host_id = place(uow, region, new, placed)
        except EcsError:
            if not placed:
                raise
            break
        placed.append(new)
    return [i.host_id or LOCAL_HOST for i in placed]


def room_to_start(uow: UnitOfWork, region: Region, inst: Instance,
                  on: str | None = None) -> str:
    """The host a Stopped instance starts on: the one holding its claim (KeepCharging) while
    that host is up; else a new claim where there is room (its own host only when its disks
    are local). OperationDenied.NoStock when there is none. `on`: in a cluster, the host
    whose agent boots the VM (a step of a task routed there: ResetDisks' AutoStartInstance),
    the only one the instance may start on."""
    if inst.holds_reservation():
        if not clustered(uow):
            return inst.host_id or LOCAL_HOST
        host = uow.hosts.get(inst.host_id) if inst.host_id else None
        if host is not None and host.state == HostState.UP and on in (None, host.id):
            return host.id
        if not region.shared_storage:  # its disks are on a host that is gone: refused
            return rules.choose_host([], {}, inst.vcpus, inst.memory_mib,
                                     pinned_to=inst.host_id).id
    return place(uow, region, inst, on=on)
