"""Files inside disks on Ceph RBD (a throwaway cluster, tests/ceph.py): the debugfs
reader opens an RBD image at a snapshot, read-only, through QEMU's rbd driver, lists and
reads it, and tells what changed between the snapshot and the image's current state;
writing to an RBD disk is refused."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ecsnap.adapters.inspect.base import DiskImage, FileType, Unsupported
from ecsnap.adapters.inspect.debugfs import DebugfsReader
from ecsnap.adapters.storage.rbd import RbdBackend
from ecsnap.service.inspect import Change, diff
from tests.ceph import CephCluster, shared
from tests.inspect.images import make_raw

DISK = "d-rbdfiles00000000000"


@pytest.fixture(scope="session")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    with shared(tmp_path_factory) as cluster:
        yield cluster


def test_files_of_an_rbd_snapshot(ceph: CephCluster, tmp_path: Path) -> None:
    backend = RbdBackend(ceph.pool, conf=str(ceph.conf), client="admin")
    reader = DebugfsReader(tmp_path / "work")
    try:
        backend.create_blank(DISK, 64 * 1024 * 1024)
        before = make_raw(tmp_path / "a", {"kept": b"same", "changed": b"old", "gone": b"x"})
        after = make_raw(tmp_path / "b", {"kept": b"same", "changed": b"new!", "added": b"y"})
        subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(before),
                        backend.path(DISK)], check=True, capture_output=True)
        backend.create_snapshots([(DISK, "s-files1")])
        subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(after),
                        backend.path(DISK)], check=True, capture_output=True)

        snap = DiskImage(backend.path(DISK), "s-files1", DISK)
        with reader.open(snap) as disk:
            names = {e.name for e in reader.list_dir(disk, ()).entries}
            assert {b"kept", b"changed", b"gone"} <= names and b"added" not in names
            assert reader.stat(disk, (b"changed",)).type == FileType.FILE
            assert reader.read_file(disk, (b"changed",), length=10) == b"old"
        changes = diff(reader, snap, DiskImage(backend.path(DISK), None, DISK))
        kinds = {c.path: c.change for c in changes.files}
        assert kinds == {"/added": Change.ADDED, "/changed": Change.MODIFIED,
                         "/gone": Change.DELETED}
        with pytest.raises(Unsupported, match="not written"), \
                reader.open_writable(DiskImage(backend.path(DISK), None, DISK)):
            pass
    finally:
        backend.delete(DISK)
        backend.close()
