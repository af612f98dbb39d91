"""The in-memory storage backend against the qcow2 one: the same calls, the same answers
(snapshot names, idempotence, all-or-nothing snapshots, refusals, bytes written since a
snapshot after overwrites and reverts). The qcow2 half runs qemu-img (skipped without it);
writes are whole 64 KiB clusters, where qcow2's cluster count and the fake's byte count
agree."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ecsnap.adapters.storage.base import StorageBackend, StorageError
from tests import qcow
from tests.fakes.storage import InMemoryStorage

KIB = 1024
MIB = KIB * KIB


class Disks:
    """A backend and how a guest writes to its disks."""

    def __init__(self, backend: StorageBackend) -> None:
        self.backend = backend

    def write(self, disk_id: str, pattern: int, offset: int, length: int) -> None:
        if isinstance(self.backend, InMemoryStorage):
            self.backend.write(disk_id, f"{pattern:#x}@{offset}", offset=offset, size=length)
        else:
            qcow.write(self.backend.path(disk_id), pattern, offset, length)


@pytest.fixture(params=["memory", "qcow2"])
def disks(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Disks]:
    if request.param == "memory":
        yield Disks(InMemoryStorage())
        return
    if shutil.which("qemu-img") is None or shutil.which("qemu-io") is None:
        pytest.fail("qemu-img and qemu-io are not installed (make deps installs them)")
    from ecsnap.adapters.storage.qcow2 import Qcow2Backend

    shm = Path("/dev/shm")
    root = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else str(tmp_path)
    with tempfile.TemporaryDirectory(dir=root, prefix="ecsnap-fake-vs-") as pool:
        yield Disks(Qcow2Backend(pool))


def test_snapshots_reverts_and_bytes_written(disks: Disks) -> None:
    b = disks.backend
    b.create_blank("d-1", 64 * MIB)
    b.create_blank("d-2", 64 * MIB)
    assert (b.exists("d-1"), b.exists("d-9"), b.virtual_size("d-1")) == (True, False, 64 * MIB)
    b.create_snapshots([("d-1", "s-a"), ("d-2", "s-a")])
    b.create_snapshots([("d-1", "s-a")])  # there already: kept, not doubled
    assert [s.name for s in b.list_snapshots("d-1")] == ["s-a"]

    disks.write("d-1", 0x11, 0, MIB)
    assert (b.bytes_written_since("d-1", "s-a"), b.bytes_written_since("d-2", "s-a")) == \
        (MIB, 0)
    b.create_snapshots([("d-1", "s-b")])
    disks.write("d-1", 0x22, 0, 256 * KIB)  # overwrites part of the first write
    disks.write("d-1", 0x33, 4 * MIB, 128 * KIB)
    assert b.bytes_written_since("d-1", "s-a") == MIB + 128 * KIB
    assert b.bytes_written_since("d-1", "s-b") == 256 * KIB + 128 * KIB

    b.revert("d-1", "s-a")
    assert b.bytes_written_since("d-1", "s-a") == 0
    assert b.bytes_written_since("d-1", "s-b") == MIB  # what s-b has that the disk has not
    assert [s.name for s in b.list_snapshots("d-1")] == ["s-a", "s-b"]
    b.revert_many([("d-1", "s-b"), ("d-2", "s-a")])
    assert (b.bytes_written_since("d-1", "s-b"), b.bytes_written_since("d-1", "s-a")) == \
        (0, MIB)
    assert b.has_snapshot("d-1", "s-b") and not b.has_snapshot("d-1", "s-c")


def test_refusals_and_idempotent_deletes(disks: Disks) -> None:
    b = disks.backend
    b.create_blank("d-1", 64 * MIB)
    b.create_snapshots([("d-1", "s-a")])
    with pytest.raises(StorageError):  # one disk missing: none taken
        b.create_snapshots([("d-1", "s-b"), ("d-9", "s-b")])
    assert [s.name for s in b.list_snapshots("d-1")] == ["s-a"]
    for name in ("", "123"):
        with pytest.raises(StorageError):
            b.create_snapshots([("d-1", name)])
    with pytest.raises(StorageError):
        b.revert("d-1", "s-nope")
    with pytest.raises(StorageError):
        b.revert_many([("d-1", "s-a"), ("d-1", "s-a")])
    with pytest.raises(StorageError):
        b.resize("d-1", 32 * MIB)
    b.resize("d-1", 128 * MIB)
    assert b.virtual_size("d-1") == 128 * MIB
    b.delete_snapshot("d-1", "s-nope")
    b.delete_snapshot("d-9", "s-a")
    b.delete_snapshot("d-1", "s-a")
    b.delete_snapshot("d-1", "s-a")
    assert b.list_snapshots("d-1") == [] and b.list_snapshots("d-9") == []
    assert b.bytes_written_since("d-1", "s-a") is None
    assert b.bytes_written_since("d-9", "s-a") is None
    b.delete("d-1")
    b.delete("d-1")
    assert not b.exists("d-1") and b.allocated_bytes("d-1") == 0
