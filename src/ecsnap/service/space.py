"""Building block: refuse a snapshot or a rollback early when its pool is nearly full.

A snapshot or a rollback that runs out of space half-way fails in `qemu-img` (or QEMU),
after its task was journaled, and a full file system also stops the database: no task
can then be finished, no nonce stored, no request answered but with an error. So the use
cases that add to a pool check its free space before they journal anything, with
`require_free_space`, and refuse with `OperationDenied.NoSpace` (403), changing nothing;
deleting snapshots (DeleteSnapshot, DeleteSnapshotGroup) frees space, and is never refused.

What they need: a fixed reserve (the database, the journal and the metadata writes of
`qemu-img`, with room to spare for the guests' own writes) plus an estimate per disk
(a qcow2 internal snapshot copies the L1 table and rewrites the snapshot table and
refcount blocks: a few clusters; a rollback takes a safety snapshot, then reverts).
A disk that is not a file (Ceph RBD: `rbd:` locations) is checked against what its
backend says its pool can still take (`PoolSpace`; an RBD snapshot or clone is metadata
at first, but a full pool stops the guests' writes; every volume of a disk is in its
pool, so the disk ID names the right pool).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from ecsnap.adapters.storage.base import PoolSpace
from ecsnap.adapters.store.base import UnitOfWork
from ecsnap.domain.errors import EcsError
from ecsnap.service.context import ServiceContext

MIB = 1024 * 1024
RESERVE_BYTES = 64 * MIB
PER_DISK_BYTES = 4 * MIB  # one snapshot's metadata, with a wide margin


def free_bytes(folder: str) -> int | None:
    """Bytes an unprivileged writer may still use on the file system of `folder`; None
    when it cannot be told (a backend whose disks are not files)."""
    try:
        st = os.statvfs(folder)
    except (OSError, ValueError):
        return None
    return st.f_bavail * st.f_frsize


def require_free_space(ctx: ServiceContext, uow: UnitOfWork, region_id: str,
                       disk_ids: Sequence[str], *, snapshots_per_disk: int = 1) -> None:
    """Refuse (OperationDenied.NoSpace) unless the file system of each disk's pool has
    RESERVE_BYTES plus PER_DISK_BYTES for each snapshot of each of its disks free.
    Call it before journaling: it changes nothing."""
    storage = ctx.storage(uow, region_id)
    disks_by_folder: dict[str, int] = {}
    pooled = 0  # disks that are not files: their backend tells its free space
    for disk_id in disk_ids:
        path = storage.path(disk_id)
        if os.path.isabs(path):  # a file
            folder = os.path.dirname(path)
            disks_by_folder[folder] = disks_by_folder.get(folder, 0) + 1
        else:
            pooled += 1
    checks: list[tuple[int | None, int]] = [
        (free_bytes(folder), disks) for folder, disks in disks_by_folder.items()]
    if pooled and isinstance(storage, PoolSpace):
        checks.append((storage.free_bytes(), pooled))
    for free, disks in checks:
        need = RESERVE_BYTES + PER_DISK_BYTES * disks * max(1, snapshots_per_disk)
        if free is not None and free < need:
            raise EcsError(
                "OperationDenied.NoSpace",
                f"The storage of region {region_id} has {free // MIB} MiB free; this "
                f"operation needs at least {-(-need // MIB)} MiB. Delete snapshots "
                "(DeleteSnapshot, DeleteSnapshotGroup) to free space.", 403)


__all__ = ["PER_DISK_BYTES", "RESERVE_BYTES", "free_bytes", "require_free_space"]
