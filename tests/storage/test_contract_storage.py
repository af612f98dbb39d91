"""The storage contract (adapters/storage/base.py) on every backend, with the same
assertions: qcow2 files through qemu-img, and RBD images on a throwaway Ceph cluster.
Guest data is written with qemu-io and read back as exact bytes through QEMU's own
drivers, on each disk's `path()` (tests/storage/guest_data.py).

Where the backends differ, by design, it is said once here (`Flavour`): how coarsely they
count bytes written since a snapshot (a qcow2 cluster, an RBD object) and how a disk is
broken on purpose. What only one backend does is tested in test_qcow2.py / test_rbd.py.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ecsnap.adapters.storage.base import StorageBackend, StorageError
from ecsnap.adapters.storage.qcow2 import Qcow2Backend
from ecsnap.adapters.storage.rbd import RbdBackend
from tests.ceph import CephCluster
from tests.storage.guest_data import qemu_io, read, whole, write, write_many

KIB, MIB, GIB = 1024, 1024**2, 1024**3
CLUSTER = 64 * KIB  # qcow2's default cluster
OBJECT = 4 * MIB  # RBD's default object


@dataclass
class Flavour:
    name: str
    # bytes_written_since counts in units of up to this size: a write may be counted up to
    # one unit more than it wrote (a qcow2 cluster it touched partly; for RBD, an object
    # made since the snapshot counts from its start)
    unit: int
    # writes aligned to 64 KiB on a disk whose data existed at the snapshot are counted
    # exactly (qcow2); else only bounded by `unit`
    exact_when_aligned: bool


FLAVOURS = {"qcow2": Flavour("qcow2", CLUSTER, True), "rbd": Flavour("rbd", OBJECT, False)}


def flavour(backend: StorageBackend) -> Flavour:
    return FLAVOURS["rbd" if isinstance(backend, RbdBackend) else "qcow2"]


@pytest.fixture(params=["qcow2", "rbd"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> StorageBackend:
    """A pool of each backend (qcow2 on pytest's tmp_path, RBD on the test cluster)."""
    if request.param == "rbd":
        rbd_backend: RbdBackend = request.getfixturevalue("rbd_backend")
        return rbd_backend
    return Qcow2Backend(str(tmp_path / "pool"))


@pytest.fixture(params=["qcow2", "rbd"])
def ram_backend(request: pytest.FixtureRequest) -> StorageBackend:
    """For many-example property tests: qcow2 in /dev/shm (see conftest), RBD on the test
    cluster (a memstore OSD: RAM already)."""
    name = "rbd_backend" if request.param == "rbd" else "ram_backend"
    found: StorageBackend = request.getfixturevalue(name)
    return found


def break_snapshots(backend: StorageBackend, disk_id: str, ceph: CephCluster | None) -> None:
    """Make the next snapshot of the disk fail: a corrupt qcow2 file; an RBD image whose
    snapshot limit is reached (one snapshot, a limit of one: 0 would mean no limit)."""
    if isinstance(backend, Qcow2Backend):
        Path(backend.path(disk_id)).write_bytes(b"not a qcow2 file")
        return
    import rbd

    assert ceph is not None and isinstance(backend, RbdBackend)
    with ceph.connect() as conn, conn.open_ioctx(backend.pool) as ioctx, \
            rbd.Image(ioctx, disk_id) as image:
        image.create_snap("s-filler")
        image.set_snap_limit(1)


def names(backend: StorageBackend, disk_id: str) -> list[str]:
    return [s.name for s in backend.list_snapshots(disk_id)]


@pytest.fixture
def image_file(tmp_path: Path) -> Iterator[Path]:
    """A 1 GiB qcow2 template: 8 MiB of 0x5A at 0, 1 MiB of 0x5B at 700 MiB."""
    image = tmp_path / "image.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1G"], check=True)
    write(str(image), 0x5A, 0, 8 * MIB)
    write(str(image), 0x5B, 700 * MIB, MIB)
    yield image


# ---------------------------------------------------------------- lifecycle

def test_it_is_a_storage_backend(backend: StorageBackend) -> None:
    typed: StorageBackend = backend
    assert not typed.exists("d-1")
    assert typed.path("d-1") != typed.path("d-2")


def test_create_blank(backend: StorageBackend) -> None:
    backend.create_blank("d-1", 20 * GIB)
    assert backend.exists("d-1")
    assert backend.virtual_size("d-1") == 20 * GIB
    assert backend.allocated_bytes("d-1") < MIB
    assert read(backend.path("d-1"), 5 * GIB, MIB) == bytes(MIB)


def test_create_blank_again_gives_a_blank_disk(backend: StorageBackend) -> None:
    """A retry after a crash: the disk is made again, whatever the first attempt left."""
    backend.create_blank("d-1", GIB)
    write(backend.path("d-1"), 0x11, 0, MIB)
    backend.create_blank("d-1", 2 * GIB)
    assert backend.virtual_size("d-1") == 2 * GIB
    assert read(backend.path("d-1"), 0, MIB) == bytes(MIB)


def test_a_disk_from_an_image_is_o1(backend: StorageBackend, image_file: Path) -> None:
    backend.create_from_image("d-sys", str(image_file), 20 * GIB)
    path = backend.path("d-sys")
    assert backend.virtual_size("d-sys") == 20 * GIB
    assert backend.allocated_bytes("d-sys") < MIB  # the image's data is not copied
    assert read(path, 0, 8 * MIB) == b"\x5a" * 8 * MIB
    assert read(path, 700 * MIB, MIB) == b"\x5b" * MIB
    assert read(path, 2 * GIB, MIB) == bytes(MIB)
    # written over: the image is not changed, nor is another disk of it
    backend.create_from_image("d-other", str(image_file), GIB)
    write(path, 0x77, 0, MIB)
    assert read(backend.path("d-other"), 0, MIB) == b"\x5a" * MIB
    assert read(str(image_file), 0, MIB) == b"\x5a" * MIB
    # asked smaller than the image: the image's size
    backend.create_from_image("d-small", str(image_file), MIB)
    assert backend.virtual_size("d-small") == GIB


def test_resize_grows_only(backend: StorageBackend) -> None:
    backend.create_blank("d-1", GIB)
    write(backend.path("d-1"), 0x11, 0, MIB)
    backend.create_snapshots([("d-1", "s-a")])
    backend.resize("d-1", 2 * GIB)
    backend.resize("d-1", 2 * GIB)  # same size again: fine
    assert backend.virtual_size("d-1") == 2 * GIB
    with pytest.raises(StorageError, match="only grow"):
        backend.resize("d-1", GIB)
    assert backend.virtual_size("d-1") == 2 * GIB
    assert read(backend.path("d-1"), 0, MIB) == b"\x11" * MIB
    assert names(backend, "d-1") == ["s-a"]


def test_delete_removes_the_disk_and_its_snapshots(backend: StorageBackend) -> None:
    backend.create_blank("d-1", GIB)
    backend.create_snapshots([("d-1", "s-a")])
    backend.delete("d-1")
    backend.delete("d-1")
    backend.delete("d-never")
    assert not backend.exists("d-1")
    assert backend.list_snapshots("d-1") == []
    assert not backend.has_snapshot("d-1", "s-a")
    assert backend.allocated_bytes("d-1") == 0
    with pytest.raises(StorageError):
        backend.virtual_size("d-1")


# ---------------------------------------------------------------- snapshots

def test_snapshot_overwrite_revert_keeps_newer_snapshots(backend: StorageBackend) -> None:
    backend.create_blank("d-1", 20 * GIB)
    path = backend.path("d-1")
    write(path, 0x11, 0, MIB)
    write(path, 0x12, 3 * GIB, MIB)
    backend.create_snapshots([("d-1", "s-old")])
    write(path, 0x21, 0, MIB)
    write(path, 0x22, 3 * GIB + 512 * KIB, MIB)  # straddles the old data's end
    backend.create_snapshots([("d-1", "s-new")])
    write(path, 0x31, 0, MIB)
    write(path, 0x32, 9 * GIB, MIB)

    backend.revert("d-1", "s-old")
    assert read(path, 0, MIB) == b"\x11" * MIB
    assert read(path, 3 * GIB, 2 * MIB) == b"\x12" * MIB + bytes(MIB)
    assert read(path, 9 * GIB, MIB) == bytes(MIB)
    assert names(backend, "d-1") == ["s-old", "s-new"]

    backend.revert("d-1", "s-new")
    assert read(path, 0, MIB) == b"\x21" * MIB
    assert read(path, 3 * GIB, 2 * MIB) == \
        b"\x12" * (512 * KIB) + b"\x22" * MIB + bytes(512 * KIB)
    assert read(path, 9 * GIB, MIB) == bytes(MIB)
    assert names(backend, "d-1") == ["s-old", "s-new"]
    assert backend.allocated_bytes("d-1") < 20 * MIB  # nothing was copied whole

    backend.revert("d-1", "s-new")  # idempotent
    assert read(path, 0, MIB) == b"\x21" * MIB


def test_revert_keeps_the_grown_size(backend: StorageBackend) -> None:
    backend.create_blank("d-1", GIB)
    path = backend.path("d-1")
    write(path, 0x11, 0, MIB)
    backend.create_snapshots([("d-1", "s-a")])
    backend.resize("d-1", 2 * GIB)
    write(path, 0x22, 0, MIB)
    write(path, 0x33, GIB + 512 * MIB, MIB)  # in the grown space
    assert backend.bytes_written_since("d-1", "s-a") == 2 * MIB
    backend.revert("d-1", "s-a")
    assert backend.virtual_size("d-1") == 2 * GIB
    assert read(path, 0, MIB) == b"\x11" * MIB
    assert read(path, GIB + 512 * MIB, MIB) == bytes(MIB)
    assert backend.bytes_written_since("d-1", "s-a") == 0


def test_revert_to_a_missing_snapshot_fails(backend: StorageBackend) -> None:
    backend.create_blank("d-1", GIB)
    with pytest.raises(StorageError, match="s-nope"):
        backend.revert("d-1", "s-nope")
    with pytest.raises(StorageError, match="d-nope"):
        backend.revert("d-nope", "s-nope")


def test_all_digit_names_are_refused(backend: StorageBackend) -> None:
    """`qemu-img snapshot -a 1` picks the snapshot whose qcow2 ID is 1, whatever its name;
    every backend refuses such names, so that they are interchangeable."""
    backend.create_blank("d-1", GIB)
    with pytest.raises(StorageError):
        backend.create_snapshots([("d-1", "1")])
    with pytest.raises(StorageError):
        backend.revert("d-1", "1")
    assert names(backend, "d-1") == []


def test_listing_snapshots(backend: StorageBackend) -> None:
    backend.create_blank("d-1", GIB)
    before = int(time.time())
    backend.create_snapshots([("d-1", "s-a"), ("d-1", "s-b")])
    snaps = backend.list_snapshots("d-1")
    assert [s.name for s in snaps] == ["s-a", "s-b"]
    assert all(s.vm_state_size == 0 and before - 1 <= s.date_sec <= time.time() + 1
               for s in snaps)
    assert backend.has_snapshot("d-1", "s-b") and not backend.has_snapshot("d-1", "s-c")
    assert backend.list_snapshots("d-missing") == []
    assert not backend.has_snapshot("d-missing", "s-a")


@pytest.mark.parametrize("breakage", ["broken", "missing"])
def test_multi_disk_snapshot_is_all_or_nothing(backend: StorageBackend, breakage: str,
                                               request: pytest.FixtureRequest) -> None:
    for d in ("d-1", "d-2", "d-3"):
        backend.create_blank(d, GIB)
    backend.create_snapshots([("d-1", "s-a")])  # already there: not this call's to undo
    if breakage == "broken":
        ceph = request.getfixturevalue("ceph") if isinstance(backend, RbdBackend) else None
        break_snapshots(backend, "d-3", ceph)
    else:
        backend.delete("d-3")
    items = [("d-1", "s-a"), ("d-1", "s-b"), ("d-2", "s-a"), ("d-2", "s-b"), ("d-3", "s-a")]
    with pytest.raises(StorageError, match="d-3"):
        backend.create_snapshots(items)
    assert names(backend, "d-1") == ["s-a"]
    assert names(backend, "d-2") == []
    assert backend.bytes_written_since("d-1", "s-a") == 0
    assert backend.bytes_written_since("d-2", "s-a") is None  # undone: no such snapshot


def test_idempotent_operations(backend: StorageBackend) -> None:
    backend.create_blank("d-1", GIB)
    backend.create_snapshots([("d-1", "s-a")])
    write(backend.path("d-1"), 0x44, 0, MIB)
    backend.create_snapshots([("d-1", "s-a")])  # kept as it was: still the empty disk
    assert names(backend, "d-1") == ["s-a"]
    assert backend.bytes_written_since("d-1", "s-a") == MIB
    backend.revert("d-1", "s-a")
    assert read(backend.path("d-1"), 0, MIB) == bytes(MIB)
    backend.revert_many([("d-1", "s-a")])
    assert read(backend.path("d-1"), 0, MIB) == bytes(MIB)
    backend.delete_snapshot("d-1", "s-a")
    backend.delete_snapshot("d-1", "s-a")
    backend.delete_snapshot("d-gone", "s-a")
    assert names(backend, "d-1") == []
    assert backend.bytes_written_since("d-1", "s-a") is None


def test_revert_many_reverts_side_by_side(backend: StorageBackend) -> None:
    for n, d in enumerate(("d-1", "d-2", "d-3"), start=1):
        backend.create_blank(d, GIB)
        write(backend.path(d), 0x10 + n, 0, MIB)
    backend.create_snapshots([("d-1", "s-a"), ("d-2", "s-a"), ("d-3", "s-a")])
    for d in ("d-1", "d-2", "d-3"):
        write(backend.path(d), 0xEE, 0, MIB)
    backend.revert_many([("d-1", "s-a"), ("d-2", "s-a")])
    assert read(backend.path("d-1"), 0, MIB) == b"\x11" * MIB
    assert read(backend.path("d-2"), 0, MIB) == b"\x12" * MIB
    assert read(backend.path("d-3"), 0, MIB) == b"\xee" * MIB
    with pytest.raises(StorageError, match="one snapshot"):
        backend.revert_many([("d-1", "s-a"), ("d-1", "s-a")])
    with pytest.raises(StorageError, match="s-nope"):
        backend.revert_many([("d-3", "s-a"), ("d-2", "s-nope")])
    assert read(backend.path("d-3"), 0, MIB) == b"\x13" * MIB  # the others still ran


# ---------------------------------------------------------------- change tracking

def test_bytes_written_since_a_snapshot(backend: StorageBackend) -> None:
    unit = flavour(backend).unit
    backend.create_blank("d-1", 20 * GIB)
    path = backend.path("d-1")
    write(path, 0x11, 0, 4 * MIB)
    assert backend.bytes_written_since("d-1", "s-a") is None  # no snapshot, no answer
    backend.create_snapshots([("d-1", "s-a")])
    assert backend.bytes_written_since("d-1", "s-a") == 0
    # 1 MiB each at three places, not cluster-aligned: over shared data, over unallocated
    # space far away, and straddling both
    for offset in (512 * KIB + 4 * KIB, 7 * GIB + 512, 4 * MIB - 8 * KIB):
        write(path, 0x22, offset, MIB)
    written = backend.bytes_written_since("d-1", "s-a")
    assert written is not None and 3 * MIB <= written <= 3 * MIB + 3 * unit
    backend.revert("d-1", "s-a")
    assert backend.bytes_written_since("d-1", "s-a") == 0
    assert read(path, 0, 5 * MIB) == b"\x11" * (4 * MIB) + bytes(MIB)


def test_zeroes_and_discards_count_as_written(backend: StorageBackend) -> None:
    backend.create_blank("d-1", GIB)
    path = backend.path("d-1")
    write(path, 0x11, 0, 4 * MIB)
    backend.create_snapshots([("d-1", "s-a")])
    qemu_io(path, f"write -z {MIB} {MIB}", f"discard {2 * MIB} {MIB}")
    assert backend.bytes_written_since("d-1", "s-a") == 2 * MIB
    assert read(path, 0, 4 * MIB) == b"\x11" * MIB + bytes(2 * MIB) + b"\x11" * MIB
    backend.revert("d-1", "s-a")
    assert read(path, 0, 4 * MIB) == b"\x11" * (4 * MIB)


def test_bytes_written_since_on_a_disk_from_an_image(backend: StorageBackend,
                                                     tmp_path: Path) -> None:
    image = tmp_path / "image.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    write(str(image), 0x5A, 0, 8 * MIB)
    backend.create_from_image("d-1", str(image), GIB)
    backend.create_snapshots([("d-1", "s-a")])
    write(backend.path("d-1"), 0x66, 2 * MIB, MIB)  # over the image's data
    write(backend.path("d-1"), 0x67, 512 * MIB, MIB)  # past the image's end
    assert backend.bytes_written_since("d-1", "s-a") == 2 * MIB
    backend.revert("d-1", "s-a")
    assert backend.bytes_written_since("d-1", "s-a") == 0
    assert read(backend.path("d-1"), 0, 8 * MIB) == b"\x5a" * (8 * MIB)


def test_other_snapshots_survive_a_revert(backend: StorageBackend) -> None:
    backend.create_blank("d-1", GIB)
    path = backend.path("d-1")
    backend.create_snapshots([("d-1", "s-old")])
    write(path, 0x11, 0, MIB)
    backend.create_snapshots([("d-1", "s-new")])
    backend.revert("d-1", "s-old")
    assert backend.bytes_written_since("d-1", "s-old") == 0
    assert backend.bytes_written_since("d-1", "s-new") == MIB  # the states differ by 1 MiB
    backend.revert("d-1", "s-new")
    assert backend.bytes_written_since("d-1", "s-new") == 0
    assert backend.bytes_written_since("d-1", "s-old") == MIB
    write(path, 0x22, 8 * MIB, MIB)  # after the revert: counted
    assert backend.bytes_written_since("d-1", "s-new") == MIB
    backend.delete_snapshot("d-1", "s-new")
    assert names(backend, "d-1") == ["s-old"]
    assert backend.bytes_written_since("d-1", "s-new") is None


# ---------------------------------------------------------------- disks from snapshots

def leftovers(backend: StorageBackend) -> list[str]:
    """What the pool still holds: disk files and snapshot bases (qcow2), images and the
    RBD trash's entries (RBD), templates aside."""
    if isinstance(backend, Qcow2Backend):
        return sorted(str(p.relative_to(backend.pool)) for p in backend.pool.rglob("*")
                      if p.is_file())
    import rbd

    assert isinstance(backend, RbdBackend)
    with backend.ioctx() as io:
        return sorted([n for n in rbd.RBD().list(io) if n.startswith("d-")] +
                      [f"trash:{e['name']}" for e in rbd.RBD().trash_list(io)])


def test_a_disk_from_a_snapshot(backend: StorageBackend) -> None:
    backend.create_blank("d-src", GIB)
    write(backend.path("d-src"), 0x11, 0, 2 * MIB)
    backend.create_snapshots([("d-src", "s-a")])
    write(backend.path("d-src"), 0x22, 0, MIB)  # after the snapshot: not in the new disks
    backend.create_from_snapshot("d-new", "d-src", "s-a", 2 * GIB)
    backend.create_from_snapshot("d-small", "d-src", "s-a", MIB)
    assert backend.virtual_size("d-new") == 2 * GIB
    assert backend.virtual_size("d-small") == GIB  # never smaller than the snapshot
    assert backend.allocated_bytes("d-new") < MIB  # O(1): nothing copied into the disk
    assert read(backend.path("d-new"), 0, 2 * MIB) == b"\x11" * 2 * MIB
    # each disk is its own: writes go nowhere else
    write(backend.path("d-new"), 0x33, 0, MIB)
    assert read(backend.path("d-small"), 0, MIB) == b"\x11" * MIB
    assert read(backend.path("d-src"), 0, MIB) == b"\x22" * MIB
    assert backend.has_snapshot("d-src", "s-a")
    # the new disk takes snapshots and reverts as any disk
    backend.create_snapshots([("d-new", "s-b")])
    write(backend.path("d-new"), 0x44, 0, MIB)
    backend.revert("d-new", "s-b")
    assert read(backend.path("d-new"), 0, 2 * MIB) == b"\x33" * MIB + b"\x11" * MIB
    # made again (a retry after a crash): the snapshot's content again
    backend.create_from_snapshot("d-new", "d-src", "s-a", 2 * GIB)
    assert read(backend.path("d-new"), 0, MIB) == b"\x11" * MIB
    with pytest.raises(StorageError):
        backend.create_from_snapshot("d-x", "d-src", "s-missing", GIB)


def test_a_disk_from_a_snapshot_outlives_the_snapshot_and_its_disk(
        backend: StorageBackend) -> None:
    before = leftovers(backend)
    backend.create_blank("d-src", GIB)
    write(backend.path("d-src"), 0x11, 0, MIB)
    backend.create_snapshots([("d-src", "s-a"), ("d-src", "s-b")])
    backend.create_from_snapshot("d-one", "d-src", "s-a", GIB)
    backend.create_from_snapshot("d-two", "d-src", "s-a", GIB)
    backend.create_from_snapshot("d-three", "d-src", "s-b", GIB)
    backend.delete_snapshot("d-src", "s-a")
    assert not backend.has_snapshot("d-src", "s-a")
    assert read(backend.path("d-one"), 0, MIB) == b"\x11" * MIB
    backend.delete("d-src")
    assert not backend.exists("d-src")
    for disk in ("d-one", "d-two", "d-three"):
        assert read(backend.path(disk), 0, MIB) == b"\x11" * MIB, disk
    backend.delete("d-one")
    assert read(backend.path("d-two"), 0, MIB) == b"\x11" * MIB
    backend.delete("d-two")
    backend.delete("d-three")
    backend.delete("d-three")
    # nothing is left behind: bases, images, trash entries are all gone with the last user
    assert [n for n in leftovers(backend) if n not in before and n != ".bases"] == []


def test_export_a_snapshot_to_a_standalone_template(backend: StorageBackend,
                                                    tmp_path: Path) -> None:
    """CreateImage's template (ImageFromSnapshot): the snapshot's content, not the disk's
    current one, in a qcow2 file that needs neither the snapshot nor its disk."""
    import json

    backend.create_blank("d-src", GIB)
    write(backend.path("d-src"), 0x11, 0, 2 * MIB)
    write(backend.path("d-src"), 0x12, 700 * MIB, MIB)
    backend.create_snapshots([("d-src", "s-a")])
    write(backend.path("d-src"), 0x22, 0, MIB)  # after the snapshot: not in the template
    target = tmp_path / "templates" / "m-1.qcow2"
    target.parent.mkdir()
    assert backend.export_snapshot("d-src", "s-a", str(target)) == GIB
    assert backend.export_snapshot("d-src", "s-a", str(target)) == GIB  # overwritten
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(target)],
                                     check=True, capture_output=True, text=True).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == GIB
    assert "backing-filename" not in info  # standalone
    assert info["actual-size"] < 16 * MIB  # the data, not the disk's size
    # a disk made from a snapshot exports its own snapshot with what it shares (a clone's
    # parent data on RBD, the base file on qcow2)
    backend.create_from_snapshot("d-new", "d-src", "s-a", GIB)
    write(backend.path("d-new"), 0x33, MIB, MIB)
    backend.create_snapshots([("d-new", "s-b")])
    second = tmp_path / "templates" / "m-2.qcow2"
    assert backend.export_snapshot("d-new", "s-b", str(second)) == GIB
    # the snapshot and both disks go: the templates stay whole
    backend.delete_snapshot("d-new", "s-b")
    backend.delete("d-new")
    backend.delete_snapshot("d-src", "s-a")
    backend.delete("d-src")
    assert read(str(target), 0, 2 * MIB) == b"\x11" * 2 * MIB
    assert read(str(target), 700 * MIB, MIB) == b"\x12" * MIB
    assert read(str(target), 100 * MIB, MIB) == bytes(MIB)
    assert read(str(second), 0, 2 * MIB) == b"\x11" * MIB + b"\x33" * MIB
    assert read(str(second), 700 * MIB, MIB) == b"\x12" * MIB
    with pytest.raises(StorageError):
        backend.export_snapshot("d-src", "s-a", str(tmp_path / "m-3.qcow2"))


# ---------------------------------------------------------------- property

BLOCKS = 64  # a 4 MiB disk of 64 KiB blocks
writes = st.lists(st.tuples(st.integers(0, BLOCKS - 1), st.integers(1, 8),
                            st.integers(1, 255)), max_size=6)


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(before=writes, after=writes)
def test_revert_gives_back_exactly_the_snapshot(
        ram_backend: StorageBackend, before: list[tuple[int, int, int]],
        after: list[tuple[int, int, int]]) -> None:
    backend = ram_backend
    backend.delete("d-p")
    backend.create_blank("d-p", BLOCKS * CLUSTER)
    path = backend.path("d-p")
    write_many(path, [(p, b * CLUSTER, min(n, BLOCKS - b) * CLUSTER) for b, n, p in before])
    backend.create_snapshots([("d-p", "s-p")])
    expected = whole(path)
    write_many(path, [(p, b * CLUSTER, min(n, BLOCKS - b) * CLUSTER) for b, n, p in after])
    touched = len({c for b, n, _ in after for c in range(b, min(b + n, BLOCKS))}) * CLUSTER
    written = backend.bytes_written_since("d-p", "s-p")
    assert written is not None and touched <= written <= touched + flavour(backend).unit
    if flavour(backend).exact_when_aligned:
        assert written == touched
    backend.revert("d-p", "s-p")
    assert whole(path) == expected
    assert backend.bytes_written_since("d-p", "s-p") == 0
