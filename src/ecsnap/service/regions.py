"""Regions, zones and the instance-type catalogue; capacity of a region."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ecsnap.adapters.storage.base import StorageError
from ecsnap.domain import rules
from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import InstanceType, Region, Zone
from ecsnap.service.context import ServiceContext, get_region


def ensure_region(ctx: ServiceContext, region_id: str, *, vcpus: int, memory_mib: int,
                  local_name: str = "", instance_types: list[dict[str, Any]] | None = None,
                  storage_pool: str | None = None) -> Region:
    """Create the region (one zone, `<region>-a`) and its storage pool unless it exists.

    `storage_pool` names where its disks live when it is not the default directory of
    qcow2 files under DATA_DIR/pools, e.g. `rbd:POOL?conf=/etc/ceph/ceph.conf&client=admin`
    for a Ceph RBD pool (bootstrap's `storage_for` reads it); it is reached once before
    the region is made. A region's pool never changes."""
    if storage_pool:
        with ctx.uow(readonly=True) as uow:
            existing = uow.regions.get(region_id)
        if existing is not None and existing.storage_pool != storage_pool:
            raise EcsError("InvalidParameter.StoragePool",
                           f"The region {region_id} keeps its disks in "
                           f"{existing.storage_pool}; a region's pool cannot change.", 400)
        if existing is None:
            check_storage_pool(ctx, storage_pool)
        pool: str | Path = storage_pool
    else:
        pool = ctx.settings.pools_dir / region_id
        Path(pool).mkdir(parents=True, exist_ok=True)
    with ctx.uow() as uow:
        region = uow.regions.get(region_id)
        if region is None:
            region = Region(id=region_id, local_name=local_name or f"ecsnap {region_id}",
                            vcpu_capacity=vcpus, memory_mib_capacity=memory_mib,
                            storage_pool=str(pool), instance_types=list(instance_types or []))
            uow.regions.add(region)
            uow.zones.add(Zone(id=f"{region_id}-a", region_id=region_id,
                               local_name=f"{region_id} zone A"))
            uow.commit()
        return region


def check_storage_pool(ctx: ServiceContext, storage_pool: str) -> None:
    """EcsError unless `storage_pool` names a pool a backend can reach."""
    try:
        ctx.storage_for(storage_pool).exists("d-ecsnap-probe")  # any call reaches the pool
    except (ValueError, StorageError) as exc:
        raise EcsError("InvalidParameter.StoragePool",
                       f"The storage pool {storage_pool} cannot be used: {exc}", 400) from exc


def describe_regions(ctx: ServiceContext) -> list[Region]:
    with ctx.uow(readonly=True) as uow:
        return sorted(uow.regions.find(), key=lambda r: r.id)


def describe_zones(ctx: ServiceContext, region_id: str) -> tuple[Region, list[Zone]]:
    with ctx.uow(readonly=True) as uow:
        region = get_region(uow, region_id)
        return region, sorted(uow.zones.find(region_id=region_id), key=lambda z: z.id)


def describe_instance_types(ctx: ServiceContext, region_id: str) -> tuple[InstanceType, ...]:
    with ctx.uow(readonly=True) as uow:
        return get_region(uow, region_id).catalogue()


@dataclass
class Capacity:
    vcpus: int
    memory_mib: int
    vcpus_used: int
    memory_mib_used: int


def region_capacity(ctx: ServiceContext, region_id: str) -> Capacity:
    with ctx.uow(readonly=True) as uow:
        region = get_region(uow, region_id)
        used = rules.reserved(uow.instances.find(region_id=region_id))
        return Capacity(region.vcpu_capacity, region.memory_mib_capacity, *used)
