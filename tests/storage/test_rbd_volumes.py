"""The RBD backend's volumes (`CloneRevert`): a revert by clone into a new volume of the
disk leaves the old one as it was, shows the snapshot's data, and finds snapshots on any
volume of the disk; deleted snapshots with clones wait in RBD's trash; only volumes nothing
needs are removed; flattening bounds the clone chains; bytes written since a snapshot and
allocated bytes follow the data across the clone boundary. On a throwaway Ceph cluster
(tests/ceph.py); the contract every backend keeps is test_contract_storage.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from ecsnap.adapters.storage.base import CloneRevert, StorageError
from ecsnap.adapters.storage.rbd import RbdBackend
from tests.ceph import CephCluster
from tests.storage.conftest import rbd_images
from tests.storage.guest_data import read, write, write_many

MIB, GIB = 1024**2, 1024**3


def holds(backend: RbdBackend, volume: str, pattern: int, offset: int = 0,
          length: int = MIB) -> bool:
    return read(backend.path(volume), offset, length) == bytes([pattern]) * length


def user_snaps(ceph: CephCluster, volume: str) -> list[tuple[str, int]]:
    """(name, namespace) of every snapshot of the image, RBD's trash included."""
    with ceph.image(volume) as image:
        return [(s["name"], s["namespace"]) for s in image.list_snaps()]


@pytest.fixture
def disk(rbd_backend: RbdBackend) -> str:
    """d-v: 0xA1 at 0 and at 1 GiB, snapshot s-old; then 0xB2 over both, snapshot s-new."""
    rbd_backend.create_blank("d-v", 2 * GIB)
    rbd_backend.create_snapshots([("d-v", "ecsnap-initial")])
    write_many(rbd_backend.path("d-v"), [(0xA1, 0, MIB), (0xA1, GIB, MIB)])
    rbd_backend.create_snapshots([("d-v", "s-old")])
    write_many(rbd_backend.path("d-v"), [(0xB2, 0, MIB), (0xB2, GIB, MIB)])
    rbd_backend.create_snapshots([("d-v", "s-new")])
    return "d-v"


def test_it_can_clone_and_swap(rbd_backend: RbdBackend) -> None:
    assert isinstance(rbd_backend, CloneRevert)


def test_a_clone_shows_the_snapshot_and_leaves_the_old_volume(rbd_backend: RbdBackend,
                                                            disk: str) -> None:
    rbd_backend.resize(disk, 3 * GIB)  # grown since the snapshot: the clone is grown too
    rbd_backend.clone_to_volume(disk, "s-old", "d-v.t-1", 3 * GIB)
    assert rbd_backend.volumes(disk) == ["d-v", "d-v.t-1"]
    assert holds(rbd_backend, "d-v.t-1", 0xA1) and holds(rbd_backend, "d-v.t-1", 0xA1, GIB)
    assert rbd_backend.virtual_size("d-v.t-1") == 3 * GIB
    assert holds(rbd_backend, disk, 0xB2) and holds(rbd_backend, disk, 0xB2, GIB)
    # the guest writes on the new volume; the old one and its snapshots do not change
    write(rbd_backend.path("d-v.t-1"), 0xC3, 0, MIB)
    assert holds(rbd_backend, disk, 0xB2)
    rbd_backend.clone_to_volume(disk, "s-new", "d-v.t-2", 3 * GIB)
    assert holds(rbd_backend, "d-v.t-2", 0xB2)
    # O(1): the clone holds no data of its own
    assert rbd_backend._allocated("d-v.t-2") == 0


def test_disks_and_templates_from_a_snapshot_on_any_volume(rbd_backend: RbdBackend,
                                                           disk: str, tmp_path: Any) -> None:
    """A disk that moved to a new volume (a rollback): CreateDisk and CreateImage still find
    its snapshots on the old volume, and the new volume's own ones, by the disk ID or by
    the current volume's name."""
    rbd_backend.clone_to_volume(disk, "s-old", "d-v.t-1", 2 * GIB)
    write(rbd_backend.path("d-v.t-1"), 0xC3, 0, MIB)
    rbd_backend.create_snapshots([("d-v.t-1", "s-moved")])
    rbd_backend.create_from_snapshot("d-a", "d-v.t-1", "s-new", GIB)  # on the old volume
    rbd_backend.create_from_snapshot("d-b", disk, "s-moved", GIB)  # on the new one
    assert holds(rbd_backend, "d-a", 0xB2) and holds(rbd_backend, "d-b", 0xC3)
    assert holds(rbd_backend, "d-b", 0xA1, GIB)
    assert rbd_backend.virtual_size("d-a") == 2 * GIB
    target = tmp_path / "m.qcow2"
    assert rbd_backend.export_snapshot("d-v.t-1", "s-old", str(target)) == 2 * GIB
    assert holds_file(target, 0xA1) and holds_file(target, 0xA1, GIB)
    assert rbd_backend.export_snapshot(disk, "s-moved", str(target)) == 2 * GIB
    assert holds_file(target, 0xC3) and holds_file(target, 0xA1, GIB)
    with pytest.raises(StorageError, match="no snapshot s-none"):
        rbd_backend.export_snapshot(disk, "s-none", str(target))


def holds_file(path: Any, pattern: int, offset: int = 0) -> bool:
    return read(str(path), offset, MIB) == bytes([pattern]) * MIB


def test_clone_again_after_a_crash(rbd_backend: RbdBackend, disk: str) -> None:
    rbd_backend.clone_to_volume(disk, "s-old", "d-v.t-1", 2 * GIB)
    write(rbd_backend.path("d-v.t-1"), 0xEE, 0, MIB)  # a half-made clone, say
    rbd_backend.clone_many([(disk, "s-old", "d-v.t-1", 2 * GIB)])
    assert holds(rbd_backend, "d-v.t-1", 0xA1)
    # a volume that holds a snapshot is not a clone a crash left: refused, kept
    rbd_backend.create_snapshots([("d-v.t-1", "s-kept")])
    with pytest.raises(StorageError, match="not a clone left by a crash"):
        rbd_backend.clone_to_volume(disk, "s-new", "d-v.t-1", 2 * GIB)
    assert holds(rbd_backend, "d-v.t-1", 0xA1)
    for bad in ("d-v", "d-other.t-1"):
        with pytest.raises(StorageError, match="cannot be a new volume"):
            rbd_backend.clone_to_volume(disk, "s-old", bad, 2 * GIB)
    with pytest.raises(StorageError, match="no snapshot s-none"):
        rbd_backend.clone_to_volume(disk, "s-none", "d-v.t-3", 2 * GIB)


def test_snapshots_are_found_on_any_volume(rbd_backend: RbdBackend, ceph: CephCluster,
                                          disk: str) -> None:
    rbd_backend.clone_to_volume(disk, "s-old", "d-v.t-1", 2 * GIB)
    rbd_backend.create_snapshots([("d-v.t-1", "s-later")])
    for name in (disk, "d-v.t-1"):
        assert [s.name for s in rbd_backend.list_snapshots(name)] == \
            ["ecsnap-initial", "s-old", "s-new", "s-later"]
        assert rbd_backend.has_snapshot(name, "s-new") and \
            rbd_backend.has_snapshot(name, "s-later")
    # a clone of a snapshot on the new volume, named from the disk ID
    rbd_backend.clone_to_volume(disk, "s-later", "d-v.t-2", 2 * GIB)
    assert holds(rbd_backend, "d-v.t-2", 0xA1)
    rbd_backend.delete_snapshot("d-v.t-2", "s-new")  # on the first volume, which has no clone
    rbd_backend.delete_snapshot(disk, "s-new")  # gone already: fine
    assert not rbd_backend.has_snapshot("d-v.t-1", "s-new")
    assert "s-new" not in [name for name, _ in user_snaps(ceph, disk)]


def test_a_deleted_snapshot_with_clones_waits_in_the_trash(rbd_backend: RbdBackend,
                                                           ceph: CephCluster,
                                                           disk: str) -> None:
    rbd_backend.clone_to_volume(disk, "s-old", "d-v.t-1", 2 * GIB)
    rbd_backend.delete_snapshot(disk, "s-old")
    assert not rbd_backend.has_snapshot(disk, "s-old")  # gone for the user at once
    assert "s-old" not in [s.name for s in rbd_backend.list_snapshots(disk)]
    trash = [n for n, ns in user_snaps(ceph, disk) if ns != 0]
    assert len(trash) == 1  # its data is kept for the clone
    assert holds(rbd_backend, "d-v.t-1", 0xA1)
    rbd_backend.flatten("d-v.t-1")  # the clone no longer needs it: Ceph removes it
    assert [n for n, ns in user_snaps(ceph, disk) if ns != 0] == []
    assert holds(rbd_backend, "d-v.t-1", 0xA1) and holds(rbd_backend, "d-v.t-1", 0xA1, GIB)


def test_only_volumes_nothing_needs_are_removed(rbd_backend: RbdBackend, ceph: CephCluster,
                                                disk: str) -> None:
    rbd_backend.clone_to_volume(disk, "s-old", "d-v.t-1", 2 * GIB)
    rbd_backend.create_snapshots([("d-v.t-1", "s-on-1")])  # t-1: a snapshot, and a clone
    rbd_backend.clone_to_volume(disk, "s-on-1", "d-v.t-2", 2 * GIB)  # nothing: garbage
    rbd_backend.clone_to_volume(disk, "s-new", "d-v.t-3", 2 * GIB)  # nothing: garbage
    rbd_backend.clone_to_volume(disk, "s-new", "d-v.t-4", 2 * GIB)  # the current one
    listed = rbd_backend.volumes(disk)
    assert listed == ["d-v", "d-v.t-1", "d-v.t-2", "d-v.t-3", "d-v.t-4"]
    # the caller names every volume but the current one
    assert rbd_backend.remove_volumes(listed[:-1]) == ["d-v.t-2", "d-v.t-3"]
    assert rbd_backend.volumes(disk) == ["d-v", "d-v.t-1", "d-v.t-4"]
    assert rbd_backend.remove_volumes(["d-v.t-3", "d-v.t-9"]) == []  # missing: no error
    rbd_backend.delete_snapshot(disk, "s-on-1")  # no clone left: removed for good
    assert rbd_backend.remove_volumes(["d-v", "d-v.t-1"]) == ["d-v.t-1"]
    # a volume whose only snapshot is in the trash (deleted, with a clone) stays until the
    # clone is flattened
    rbd_backend.create_snapshots([("d-v.t-4", "s-on-4")])
    rbd_backend.clone_to_volume(disk, "s-on-4", "d-v.t-5", 2 * GIB)  # current now
    rbd_backend.delete_snapshot(disk, "s-on-4")
    assert rbd_backend.remove_volumes(["d-v.t-4"]) == []
    rbd_backend.flatten("d-v.t-5")
    assert rbd_backend.remove_volumes(["d-v.t-4"]) == ["d-v.t-4"]
    assert holds(rbd_backend, "d-v.t-5", 0xB2) and holds(rbd_backend, "d-v.t-5", 0xB2, GIB)
    assert {n for n in rbd_images(ceph, ceph.pool) if n == "d-v" or n.startswith("d-v.")} == \
        {"d-v", "d-v.t-5"}


def test_flatten_bounds_the_clone_depth(rbd_backend: RbdBackend, disk: str) -> None:
    volume = disk
    for n in range(1, 5):
        rbd_backend.create_snapshots([(volume, f"s-gen{n}")])
        rbd_backend.clone_to_volume(disk, f"s-gen{n}", f"d-v.t-{n}", 2 * GIB)
        volume = f"d-v.t-{n}"
        write(rbd_backend.path(volume), 0x10 + n, n * MIB, MIB)
    assert [rbd_backend.clone_depth(f"d-v.t-{n}") for n in range(1, 5)] == [1, 2, 3, 4]
    assert rbd_backend.clone_depth(disk) == 0
    rbd_backend.flatten("d-v.t-4")
    rbd_backend.flatten("d-v.t-4")  # no parent: nothing to do
    assert rbd_backend.clone_depth("d-v.t-4") == 0
    assert holds(rbd_backend, "d-v.t-4", 0xB2, 0) and holds(rbd_backend, "d-v.t-4", 0xB2, GIB)
    assert all(holds(rbd_backend, "d-v.t-4", 0x10 + n, n * MIB) for n in range(1, 5))
    # the data is the flattened volume's own now
    assert rbd_backend._allocated("d-v.t-4") >= 6 * MIB


def test_bytes_written_since_across_the_clone_boundary(rbd_backend: RbdBackend,
                                                      disk: str) -> None:
    rbd_backend.clone_to_volume(disk, "s-old", "d-v.t-1", 2 * GIB)
    assert rbd_backend.bytes_written_since("d-v.t-1", "s-old") == 0  # just rolled back
    write(rbd_backend.path("d-v.t-1"), 0xC3, 4 * MIB, 64 * 1024)
    assert rbd_backend.bytes_written_since("d-v.t-1", "s-old") == 64 * 1024
    # since s-new (on the old volume, after s-old): what changed there between s-old and
    # s-new (2 MiB) and what the clone wrote
    assert rbd_backend.bytes_written_since("d-v.t-1", "s-new") == 2 * MIB + 64 * 1024
    # the other way: a later volume's snapshot, seen from the old volume's head
    rbd_backend.create_snapshots([("d-v.t-1", "s-on-1")])
    assert rbd_backend.bytes_written_since(disk, "s-on-1") == 2 * MIB + 64 * 1024
    assert rbd_backend.bytes_written_since(disk, "s-missing") is None
    assert rbd_backend.bytes_written_since("d-v.t-9", "s-old") is None
    # a flattened volume has no ancestry left to follow
    rbd_backend.clone_to_volume(disk, "s-on-1", "d-v.t-2", 2 * GIB)
    rbd_backend.flatten("d-v.t-2")
    assert rbd_backend.bytes_written_since("d-v.t-2", "s-old") is None


def test_allocated_bytes_over_all_volumes_and_delete_of_all(rbd_backend: RbdBackend,
                                                            ceph: CephCluster,
                                                            disk: str) -> None:
    before = rbd_backend.allocated_bytes(disk)
    assert before == 4 * MIB  # two MiB at s-old, two rewritten before s-new
    rbd_backend.clone_to_volume(disk, "s-old", "d-v.t-1", 2 * GIB)
    assert rbd_backend.allocated_bytes("d-v.t-1") == before  # the clone shares it all
    write(rbd_backend.path("d-v.t-1"), 0xC3, 8 * MIB, 4 * MIB)
    assert rbd_backend.allocated_bytes(disk) == before + 4 * MIB
    rbd_backend.create_snapshots([("d-v.t-1", "s-on-1")])
    rbd_backend.clone_to_volume(disk, "s-on-1", "d-v.t-2", 2 * GIB)
    rbd_backend.delete_snapshot(disk, "s-old")  # trashed: t-1 is its clone
    rbd_backend.delete("d-v.t-2")  # any volume names the disk: all go, clones first
    assert rbd_backend.volumes(disk) == []
    assert not {n for n in rbd_images(ceph, ceph.pool) if n == "d-v" or n.startswith("d-v.")}
    assert rbd_backend.allocated_bytes(disk) == 0
    rbd_backend.delete(disk)


def test_a_flatten_cut_short_by_kill_9_then_run_again(rbd_backend: RbdBackend,
                                                      ceph: CephCluster) -> None:
    """librbd 16 marks an object in the object map before it copies it up, and a flatten
    skips the objects the map marks: run again after a kill -9 it would leave the objects
    that were being copied as zeroes. `flatten` copies those up first."""
    import rados
    import rbd

    objects = 48
    rbd_backend.create_blank("d-f", objects * 4 * MIB)
    write_many(rbd_backend.path("d-f"), [(n + 1, n * 4 * MIB, 4 * MIB) for n in range(objects)])
    rbd_backend.create_snapshots([("d-f", "s-1")])
    rbd_backend.clone_to_volume("d-f", "s-1", "d-f.t-1", objects * 4 * MIB)
    write(rbd_backend.path("d-f.t-1"), 0xEE, 5 * 4 * MIB + 8192, 4096)  # the guest's own
    rbd_backend.create_snapshots([("d-f.t-1", "s-child")])
    with ceph.image("d-f.t-1") as image:
        prefix = image.block_name_prefix()
    code = ("import sys; from ecsnap.adapters.storage.rbd import RbdBackend; "
            f"RbdBackend({ceph.pool!r}, conf={str(ceph.conf)!r}).flatten('d-f.t-1')")
    child = subprocess.Popen([sys.executable, "-c", code])
    with ceph.connect() as conn, conn.open_ioctx(ceph.pool) as ioctx:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and child.poll() is None:
            copied = 0
            for n in range(objects):
                try:
                    ioctx.stat(f"{prefix}.{n:016x}")
                    copied += 1
                except rados.ObjectNotFound:
                    pass
            if copied >= objects // 4:
                break
            time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert rbd_backend.clone_depth("d-f.t-1") == 1, "the flatten ended before the kill"
    # the dead client's lock: broken here at once (Ceph would wait for its watch to expire)
    with ceph.connect() as conn, conn.open_ioctx(ceph.pool) as ioctx, \
            rbd.Image(ioctx, "d-f.t-1") as image:
        for owner in image.lock_get_owners():
            image.lock_break(owner["mode"], owner["owner"])
    rbd_backend.flatten("d-f.t-1")
    assert rbd_backend.clone_depth("d-f.t-1") == 0
    with ceph.image("d-f.t-1") as image:
        for snap in (None, "s-child"):
            image.set_snap(snap)
            assert [image.read(n * 4 * MIB, 1)[0] for n in range(objects)] == \
                list(range(1, objects + 1)), snap
            assert [image.read(n * 4 * MIB + 4 * MIB - 1, 1)[0] for n in range(objects)] == \
                list(range(1, objects + 1)), snap
            assert image.read(5 * 4 * MIB + 8192, 4096) == b"\xee" * 4096
