"""Building block: a disk's storage volumes on a backend that reverts by clone and swap.

On such a backend (`CloneRevert`: Ceph RBD) a rollback or a re-initialisation clones the
snapshot into a new volume of the disk, `{disk}.{task}` (`new_volume`), and switches the
disk to it in one transaction (`switch`); `Disk.current_volume` is what every storage call
about the disk's content is given. The old volume is never written again: it stays while
it holds snapshots (the safety snapshot of that rollback among them) or has clones.

After such a task, `CollectVolumes` (journaled by the task's `finish`, run in the
background, no locks) bounds the clone chains and removes the volumes nothing needs:

1. `flatten`  the current volume of each disk whose clone depth exceeds MAX_CLONE_DEPTH
              is flattened (its data copied from its parents; nothing visible changes);
2. `collect`  each disk's volumes are listed *first*, then the disk's row is read: a disk
              that a task holds (its lock) is left for a later round, since that task may be
              making or switching volumes; of the others, every listed volume but the
              current one that holds no snapshot and has no clone is removed. A volume made
              after the listing is not looked at; one listed before was made by a task that
              had ended, or still held the disk, when the row was read.

A snapshot that still has clones and is deleted is gone for the user at once; the backend
keeps its data until the clones no longer need it (RBD's trash namespace: Ceph removes it
with the last clone, or when the clone is flattened), and a later `collect` removes the
volume it leaves empty. Both steps are idempotent: after a crash the task goes forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ecsnap.adapters.storage.base import CloneRevert, StorageBackend, volume_name
from ecsnap.adapters.store.base import UnitOfWork
from ecsnap.domain.model import Task
from ecsnap.service.context import ServiceContext
from ecsnap.service.operation import Lock, Operation, Plan, Resume, Step

MAX_CLONE_DEPTH = 3  # parents a volume may read through before it is flattened


def clone_revert(storage: StorageBackend) -> CloneRevert | None:
    """The backend's clone-and-swap capability, None when it reverts in place (qcow2)."""
    return storage if isinstance(storage, CloneRevert) else None


def new_volume(disk_id: str, task_id: str) -> str:
    return volume_name(disk_id, task_id)


def current_volumes(ctx: ServiceContext, disk_ids: Sequence[str]) -> dict[str, str]:
    """Each disk's current volume (its ID for a disk that has no row any more)."""
    with ctx.uow(readonly=True) as uow:
        found = {d: uow.disks.get(d) for d in disk_ids}
    return {d: disk.current_volume if disk is not None else d for d, disk in found.items()}


def switch(ctx: ServiceContext, moves: Sequence[tuple[str, str, str]]) -> None:
    """Every (disk, from, to): the disk's volume becomes `to` if it is `from` (or `to`
    already), all in one transaction; idempotent."""
    with ctx.uow() as uow:
        for disk_id, old, new in moves:
            disk = uow.disks.load(disk_id)
            if disk.current_volume not in (old, new):
                raise RuntimeError(f"disk {disk_id} is on volume {disk.current_volume}, "
                                   f"neither {old} nor {new}")
            disk.volume = "" if new == disk.id else new
        uow.commit()


@dataclass(frozen=True)
class CollectVolumesPlan(Plan):
    disk_ids: tuple[str, ...]


class CollectVolumes(Operation[CollectVolumesPlan]):
    """Flatten deep clone chains and remove the volumes nothing needs (module docstring)."""

    action = "CollectVolumes"
    plan_type = CollectVolumesPlan

    @classmethod
    def locks(cls, plan: CollectVolumesPlan) -> list[Lock]:
        return []  # it never changes what a disk holds: users' tasks go on meanwhile

    def steps(self) -> list[Step]:
        return [Step("flatten", self.flatten), Step("collect", self.collect)]

    def _storage(self) -> CloneRevert | None:
        return clone_revert(self.ctx.storage_of(self.task.region_id))

    def flatten(self) -> None:
        storage = self._storage()
        if storage is None:
            return
        flattened = []
        for disk_id in self.plan.disk_ids:
            with self.ctx.uow(readonly=True) as uow:
                disk = uow.disks.get(disk_id)
            if disk is None or disk.released or disk.lock_task_id:
                continue
            volume = disk.current_volume
            if storage.clone_depth(volume) > MAX_CLONE_DEPTH:
                storage.flatten(volume)
                flattened.append(volume)
        if flattened:
            self.note(flattened=flattened)

    def collect(self) -> None:
        storage = self._storage()
        if storage is None:
            return
        removed: list[str] = []
        for disk_id in self.plan.disk_ids:
            listed = storage.volumes(disk_id)  # before the row is read: see the docstring
            with self.ctx.uow(readonly=True) as uow:
                disk = uow.disks.get(disk_id)
            if disk is None or disk.lock_task_id:
                continue
            removed += storage.remove_volumes([v for v in listed if v != disk.current_volume])
        if removed:
            self.note(removed=removed)

    def resume(self) -> Resume:
        return Resume.FORWARD


def schedule_collect(ctx: ServiceContext, uow: UnitOfWork, after: Task,
                     disk_ids: Sequence[str]) -> Task | None:
    """Journal a CollectVolumes of the disks in the caller's transaction (a task's `finish`:
    add it to the operation's `follow_ups`); None on a backend that reverts in place."""
    if not disk_ids or clone_revert(ctx.storage(uow, after.region_id)) is None:
        return None
    return ctx.runner.journal(uow, CollectVolumes, CollectVolumesPlan(tuple(disk_ids)),
                              account_id=after.account_id, region_id=after.region_id,
                              resource_id=disk_ids[0])


__all__ = ["MAX_CLONE_DEPTH", "CollectVolumes", "CollectVolumesPlan", "clone_revert",
           "current_volumes", "new_volume", "schedule_collect", "switch"]
