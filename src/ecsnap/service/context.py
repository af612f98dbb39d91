"""What every service function is handed: the store, the storage pools, the hypervisor."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ecsnap.adapters.compute.base import ComputeDriver, GuestImageBuilder
from ecsnap.adapters.inspect.base import FileSystemReader
from ecsnap.adapters.storage.base import ImageImport, StorageBackend
from ecsnap.adapters.store.base import UnitOfWork
from ecsnap.config import Settings
from ecsnap.domain import errors
from ecsnap.domain.model import AccessKey, Disk, Image, Instance, Region, Snapshot, SnapshotGroup

if TYPE_CHECKING:
    from ecsnap.service.tasks import TaskRunner

log = logging.getLogger("ecsnap.service")


@dataclass
class ServiceContext:
    settings: Settings
    uow: Callable[..., UnitOfWork]  # uow(readonly=True) for reads that never write
    storage_for: Callable[[str], StorageBackend]  # a region's storage_pool -> its backend
    compute: ComputeDriver
    image_builder: GuestImageBuilder | None = None
    image_import: ImageImport | None = None
    inspector: FileSystemReader | None = None  # reads guest file systems (service.inspect)
    runner: TaskRunner = field(init=False)
    extras: dict[str, Any] = field(default_factory=dict)

    # service.accounts.signing_key: usable AccessKeys (plain secrets) and when they were read
    signing_keys: dict[str, tuple[AccessKey, float]] = field(default_factory=dict,
                                                            init=False, repr=False)
    _pools: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    # close(): what was opened for this context (a Ceph pool's cluster connection)
    closers: list[Callable[[], None]] = field(default_factory=list, init=False, repr=False)

    def close(self) -> None:
        """The end of this context (a server or agent stopping, a test's end): running
        tasks finish their steps first (the runner's threads are waited for), then what was
        opened for it closes: a storage connection is never shut under a running step."""
        runner = self.__dict__.get("runner")
        if runner is not None:
            runner.shutdown()
        while self.closers:
            self.closers.pop()()

    def storage(self, uow: UnitOfWork, region_id: str) -> StorageBackend:
        """The storage backend of a region's pool (a region's pool never changes, so it is
        remembered: task steps need no query for it)."""
        pool = self._pools.get(region_id)
        if pool is None:
            region = uow.regions.get(region_id)
            if region is None:
                raise errors.not_found("region", region_id)
            pool = self._pools[region_id] = region.storage_pool
        return self.storage_for(pool)

    def check_region(self, uow: UnitOfWork, region_id: str | None) -> None:
        """MissingParameter or InvalidRegionId.NotFound unless the region exists. Regions
        are never removed, so one seen once needs no query again."""
        if not region_id or region_id not in self._pools:
            self._pools[region_id or ""] = get_region(uow, region_id).storage_pool

    def storage_of(self, region_id: str) -> StorageBackend:
        """`storage` outside a unit of work (a task step)."""
        if region_id in self._pools:
            return self.storage_for(self._pools[region_id])
        with self.uow(readonly=True) as uow:
            return self.storage(uow, region_id)


def get_region(uow: UnitOfWork, region_id: str | None) -> Region:
    if not region_id:
        raise errors.missing_parameter("RegionId")
    region = uow.regions.get(region_id)
    if region is None:
        raise errors.not_found("region", region_id)
    return region


def get_instance(uow: UnitOfWork, account_id: str, instance_id: str | None,
                 region_id: str | None = None) -> Instance:
    if not instance_id:
        raise errors.missing_parameter("InstanceId")
    inst = uow.instances.get(instance_id)
    if inst is None or inst.account_id != account_id or (region_id and inst.region_id != region_id):
        raise errors.not_found("instance", instance_id)
    return inst


def get_disk(uow: UnitOfWork, account_id: str, disk_id: str | None,
             region_id: str | None = None) -> Disk:
    if not disk_id:
        raise errors.missing_parameter("DiskId")
    disk = uow.disks.get(disk_id)
    if disk is None or disk.released or disk.account_id != account_id or \
            (region_id and disk.region_id != region_id):
        raise errors.not_found("disk", disk_id)
    return disk


def get_snapshot(uow: UnitOfWork, account_id: str, snapshot_id: str | None,
                 region_id: str | None = None) -> Snapshot:
    if not snapshot_id:
        raise errors.missing_parameter("SnapshotId")
    snap = uow.snapshots.get(snapshot_id)
    if snap is None or snap.account_id != account_id or \
            (region_id and snap.region_id != region_id):
        raise errors.not_found("snapshot", snapshot_id)
    return snap


def get_group(uow: UnitOfWork, account_id: str, group_id: str | None,
              region_id: str | None = None) -> SnapshotGroup:
    if not group_id:
        raise errors.missing_parameter("SnapshotGroupId")
    group = uow.snapshot_groups.get(group_id)
    if group is None or group.account_id != account_id or \
            (region_id and group.region_id != region_id):
        raise errors.not_found("snapshot_group", group_id)
    return group


def get_image(uow: UnitOfWork, account_id: str, image_id: str | None,
              region_id: str | None = None) -> Image:
    if not image_id:
        raise errors.missing_parameter("ImageId")
    image = uow.images.get(image_id)
    if image is None or image.account_id not in (None, account_id) or \
            (region_id and image.region_id != region_id):
        raise errors.not_found("image", image_id)
    return image


def attached_disks(uow: UnitOfWork, instance_id: str) -> list[Disk]:
    disks = [d for d in uow.disks.find(instance_id=instance_id) if not d.released]
    return sorted(disks, key=lambda d: (d.type.value != "system", d.device, d.id))
