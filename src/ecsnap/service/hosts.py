"""Hosts as operators see them: state, epoch, heartbeat age, capacity used and free, the
instances placed on each. One function for the CLI (`ecsnap hosts`), the console's Hosts
page and the /metrics scrape.

In a cluster these are the agents' rows; on the single-host server, the implicit host
"local" (service/placement.py) with the regions' capacity and every instance.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from ecsnap import metrics
from ecsnap.domain import rules
from ecsnap.domain.model import Instance, utcnow
from ecsnap.service.context import ServiceContext
from ecsnap.service.placement import LOCAL_HOST


@dataclass(frozen=True)
class HostView:
    id: str
    state: str
    epoch: int
    heartbeat_at: datetime | None  # None: the single-host server (no agent heartbeats)
    heartbeat_age_s: float | None
    vcpus: int
    memory_mib: int
    vcpus_used: int
    memory_mib_used: int
    instances: tuple[str, ...]  # the instances whose host this is (of `account_id` only)
    address: str = ""

    @property
    def vcpus_free(self) -> int:
        return max(0, self.vcpus - self.vcpus_used)

    @property
    def memory_mib_free(self) -> int:
        return max(0, self.memory_mib - self.memory_mib_used)


def describe_hosts(ctx: ServiceContext, account_id: str | None = None) -> list[HostView]:
    """Every host with its capacity (all accounts' claims count); the instances listed are
    those of `account_id` only (the console's tenants), or all (None: the operator)."""
    now = utcnow()
    with ctx.uow(readonly=True) as uow:
        hosts = sorted(uow.hosts.find(), key=lambda h: h.id)
        instances = uow.instances.find()
        if not hosts:  # the single-host server
            regions = uow.regions.find()
            vcpus, memory = rules.reserved(instances)
            return [HostView(LOCAL_HOST, "Up", 0, None, None,
                             sum(r.vcpu_capacity for r in regions),
                             sum(r.memory_mib_capacity for r in regions), vcpus, memory,
                             _ids(instances, account_id))]
    by_host: dict[str, list[Instance]] = {}
    for inst in instances:
        by_host.setdefault(inst.host_id or "", []).append(inst)
    views = []
    for host in hosts:
        on_it = by_host.get(host.id, [])
        vcpus, memory = rules.reserved(on_it)
        views.append(HostView(host.id, host.state.value, host.epoch, host.heartbeat_at,
                              max(0.0, (now - host.heartbeat_at).total_seconds()),
                              host.vcpus, host.memory_mib, vcpus, memory,
                              _ids(on_it, account_id), host.address))
    return views


def _ids(instances: list[Instance], account_id: str | None) -> tuple[str, ...]:
    return tuple(sorted(i.id for i in instances
                        if account_id is None or i.account_id == account_id))


def host_samples(ctx: ServiceContext) -> list[metrics.HostSample]:
    """The hosts as a /metrics scrape reports them (read at scrape time)."""
    return [metrics.HostSample(h.id, h.state, h.epoch, h.heartbeat_age_s, h.vcpus,
                               h.vcpus_used, h.memory_mib, h.memory_mib_used)
            for h in describe_hosts(ctx)]
