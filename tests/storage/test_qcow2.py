"""The qcow2 backend on real files through qemu-img; data checked with qemu-io."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ecsnap.adapters.storage.base import StorageBackend, StorageError
from ecsnap.adapters.storage.qcow2 import Qcow2Backend
from tests import qcow

MIB = qcow.MIB
GIB = 1024**3


@pytest.fixture
def backend(tmp_path: Path) -> Qcow2Backend:
    return Qcow2Backend(str(tmp_path / "pool"))


def raw(backend: Qcow2Backend, disk_id: str, tmp: Path) -> bytes:
    out = tmp / f"{disk_id}.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", backend.path(disk_id), str(out)],
                   check=True)
    return out.read_bytes()


def test_it_is_a_storage_backend(backend: Qcow2Backend) -> None:
    typed: StorageBackend = backend
    assert typed.path("d-1").endswith("d-1.qcow2")


def test_snapshot_overwrite_revert(backend: Qcow2Backend) -> None:
    backend.create_blank("d-1", 20 * GIB)
    path = backend.path("d-1")
    qcow.write(path, 0x11)
    qcow.write(path, 0x12, 3 * GIB, MIB)
    backend.create_snapshots([("d-1", "s-old")])
    qcow.write(path, 0x21)
    qcow.write(path, 0x22, 3 * GIB, MIB)
    backend.create_snapshots([("d-1", "s-new")])
    qcow.write(path, 0x31)
    backend.revert("d-1", "s-old")
    assert qcow.holds(path, 0x11) and qcow.holds(path, 0x12, 3 * GIB, MIB)
    assert [s.name for s in backend.list_snapshots("d-1")] == ["s-old", "s-new"]  # kept
    backend.revert("d-1", "s-new")
    assert qcow.holds(path, 0x21) and qcow.holds(path, 0x22, 3 * GIB, MIB)
    assert backend.allocated_bytes("d-1") < 50 * MIB  # nothing was copied whole


def test_multi_disk_snapshot_is_all_or_nothing(backend: Qcow2Backend) -> None:
    for d in ("d-1", "d-2", "d-3"):
        backend.create_blank(d, GIB)
    Path(backend.path("d-3")).write_bytes(b"not a qcow2 file")
    with pytest.raises(StorageError):
        backend.create_snapshots([("d-1", "s-a"), ("d-2", "s-a"), ("d-3", "s-a")])
    assert not backend.has_snapshot("d-1", "s-a") and not backend.has_snapshot("d-2", "s-a")


def test_idempotent_operations(backend: Qcow2Backend) -> None:
    backend.create_blank("d-1", GIB)
    backend.create_snapshots([("d-1", "s-a")])
    backend.create_snapshots([("d-1", "s-a")])
    assert [s.name for s in backend.list_snapshots("d-1")] == ["s-a"]
    backend.delete_snapshot("d-1", "s-a")
    backend.delete_snapshot("d-1", "s-a")
    backend.delete_snapshot("d-gone", "s-a")
    backend.delete("d-1")
    backend.delete("d-1")
    assert not backend.exists("d-1") and backend.list_snapshots("d-1") == []


def test_overlay_on_an_image_is_o1(backend: Qcow2Backend, tmp_path: Path) -> None:
    image = tmp_path / "image.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1G"], check=True)
    qcow.write(str(image), 0x5A, 0, 8 * MIB)
    backend.create_from_image("d-sys", str(image), 20 * GIB)
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json",
                                      backend.path("d-sys")], capture_output=True,
                                     check=True).stdout)
    assert info["backing-filename"] == str(image.resolve())
    assert info["virtual-size"] == 20 * GIB and info["actual-size"] < 2 * MIB
    assert qcow.holds(backend.path("d-sys"), 0x5A, 0, 8 * MIB)


def test_resize_grows_only(backend: Qcow2Backend) -> None:
    backend.create_blank("d-1", GIB)
    backend.create_snapshots([("d-1", "s-a")])
    backend.resize("d-1", 2 * GIB)
    assert backend.virtual_size("d-1") == 2 * GIB
    with pytest.raises(StorageError):
        backend.resize("d-1", GIB)


def test_bytes_written_since_a_snapshot(backend: Qcow2Backend) -> None:
    backend.create_blank("d-1", 20 * GIB)
    path = backend.path("d-1")
    qcow.write(path, 0x11, 0, 4 * MIB)
    assert backend.bytes_written_since("d-1", "s-a") is None  # no snapshot, no map
    backend.create_snapshots([("d-1", "s-a")])
    assert backend.bytes_written_since("d-1", "s-a") == 0
    for offset in (0, 7 * GIB, 15 * GIB):
        qcow.write(path, 0x22, offset, MIB)
    written = backend.bytes_written_since("d-1", "s-a")
    assert written is not None and 3 * MIB <= written <= 3 * MIB + 3 * 65536
    backend.revert("d-1", "s-a")
    assert backend.bytes_written_since("d-1", "s-a") == 0


def test_import_image(backend: Qcow2Backend, tmp_path: Path) -> None:
    source = tmp_path / "disk.raw"
    source.write_bytes(b"\x7f" * MIB + b"\0" * MIB)
    size = backend.import_image(str(source), str(tmp_path / "t.qcow2"))
    assert size == 2 * MIB and qcow.holds(str(tmp_path / "t.qcow2"), 0x7F, 0, MIB)


writes = st.lists(st.tuples(st.integers(0, 63), st.integers(1, 8), st.integers(1, 255)),
                  max_size=6)


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(before=writes, after=writes)
def test_revert_gives_back_exactly_the_snapshot(tmp_path: Path, before: list[tuple[int, int, int]],
                                                after: list[tuple[int, int, int]]) -> None:
    backend = Qcow2Backend(str(tmp_path / "prop"))
    backend.delete("d-p")
    backend.create_blank("d-p", 4 * MIB)
    for block, count, pattern in before:
        qcow.write(backend.path("d-p"), pattern, block * 65536, min(count, 64 - block) * 65536)
    backend.create_snapshots([("d-p", "s-p")])
    expected = raw(backend, "d-p", tmp_path)
    for block, count, pattern in after:
        qcow.write(backend.path("d-p"), pattern, block * 65536, min(count, 64 - block) * 65536)
    backend.revert("d-p", "s-p")
    assert raw(backend, "d-p", tmp_path) == expected
