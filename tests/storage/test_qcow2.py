"""What only the qcow2 backend does, on real files through real qemu-img: its file layout
(a qcow2 file per disk, a backing file for a disk from an image), qemu-img's error words,
image import, qemu's file locks, and the qcow2 layouts its metadata reader understands.
The storage contract itself, on every backend: test_contract_storage.py."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ecsnap.adapters.storage import qcow2
from ecsnap.adapters.storage.base import StorageBackend, StorageError
from ecsnap.adapters.storage.qcow2 import Qcow2Backend
from tests.storage.guest_data import read, whole, write

KIB, MIB, GIB = 1024, 1024**2, 1024**3


# ---------------------------------------------------------------- helpers

def info(path: str) -> dict[str, object]:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", path],
                         check=True, capture_output=True, text=True).stdout
    return dict(json.loads(out))


def names(backend: Qcow2Backend, disk_id: str) -> list[str]:
    return [s.name for s in backend.list_snapshots(disk_id)]


@contextmanager
def held_open(path: str) -> Iterator[None]:
    """The file open read-write by another process (as by a running VM), with its lock."""
    proc = subprocess.Popen(["qemu-io", "-f", "qcow2", path], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write("read 0 512\n")  # answered once the image is open (and locked)
        proc.stdin.flush()
        assert "read 512/512 bytes" in proc.stdout.readline(), proc.communicate()
        yield
    finally:
        proc.communicate(timeout=30)


# ---------------------------------------------------------------- lifecycle

def test_it_is_a_storage_backend(tmp_path: Path) -> None:
    typed: StorageBackend = Qcow2Backend(str(tmp_path / "new" / "pool"))
    assert (tmp_path / "new" / "pool").is_dir()
    assert typed.path("d-1") == str(tmp_path / "new" / "pool" / "d-1.qcow2")
    assert not typed.exists("d-1")


def test_a_blank_disk_is_a_qcow2_file(backend: Qcow2Backend) -> None:
    backend.create_blank("d-1", 20 * GIB)
    meta = info(backend.path("d-1"))
    assert meta["format"] == "qcow2" and meta["virtual-size"] == 20 * GIB
    assert Path(backend.path("d-1")).stat().st_size < MIB


def test_a_disk_from_an_image_is_an_overlay_file(backend: Qcow2Backend,
                                                 tmp_path: Path) -> None:
    image = tmp_path / "image.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1G"], check=True)
    write(str(image), 0x5A, 0, 8 * MIB)
    backend.create_from_image("d-sys", str(image), 20 * GIB)
    meta = info(backend.path("d-sys"))
    assert meta["backing-filename"] == str(image.resolve())
    assert meta["backing-filename-format"] == "qcow2"
    assert meta["virtual-size"] == 20 * GIB
    assert Path(backend.path("d-sys")).stat().st_size < MIB


def test_delete_removes_the_file(backend: Qcow2Backend) -> None:
    backend.create_blank("d-1", GIB)
    backend.create_snapshots([("d-1", "s-a")])
    backend.delete("d-1")
    assert not Path(backend.path("d-1")).exists()
    assert not (backend.pool / "d-1.maps").exists()


def test_errors_carry_command_and_qemu_img_words(backend: Qcow2Backend) -> None:
    with pytest.raises(StorageError, match=r"d-missing\.qcow2: no such disk file"):
        backend.virtual_size("d-missing")
    with pytest.raises(StorageError) as err:
        backend.create_from_image("d-1", str(backend.pool / "missing.qcow2"), GIB)
    assert "qemu-img info" in str(err.value) and "missing.qcow2" in str(err.value)
    assert "No such file" in str(err.value)
    missing_tool = Qcow2Backend(str(backend.pool), qemu_img="/nonexistent/qemu-img")
    with pytest.raises(StorageError):
        missing_tool.create_blank("d-1", GIB)


def test_import_image(backend: Qcow2Backend, tmp_path: Path) -> None:
    source = tmp_path / "disk.raw"
    source.write_bytes(b"\x7f" * MIB + bytes(MIB))
    target = tmp_path / "t.qcow2"
    assert backend.import_image(str(source), str(target)) == 2 * MIB
    assert info(str(target))["format"] == "qcow2"
    assert whole(str(target)) == source.read_bytes()


# ---------------------------------------------------------------- snapshots

def test_queries_work_while_the_file_is_open(backend: Qcow2Backend,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qcow2, "LOCK_WAIT_S", 0.3)  # the refused snapshot waits no 10 s
    backend.create_blank("d-1", GIB)
    write(backend.path("d-1"), 0x11, 0, MIB)
    backend.create_snapshots([("d-1", "s-a")])
    with held_open(backend.path("d-1")):
        assert backend.virtual_size("d-1") == GIB
        assert backend.allocated_bytes("d-1") > MIB
        assert names(backend, "d-1") == ["s-a"]
        assert backend.bytes_written_since("d-1", "s-a") == 0
        with pytest.raises(StorageError, match="lock"):
            backend.create_snapshots([("d-1", "s-b")])
    assert names(backend, "d-1") == ["s-a"]


# ---------------------------------------------------------------- change tracking

@pytest.mark.parametrize("options", ["compat=0.10", "compat=1.1,cluster_size=4096",
                                     "compat=1.1,extended_l2=on", "compat=1.1,lazy_refcounts=on"])
def test_bytes_written_since_on_other_qcow2_layouts(backend: Qcow2Backend,
                                                     options: str) -> None:
    """The table reader against files qemu-img lays out otherwise: qcow2 v2, small
    clusters, 128-bit L2 entries (subclusters), lazy refcounts; plus zeroes, a discard and
    growth past the snapshot's size."""
    path = backend.path("d-1")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", options, path, "1G"],
                   check=True)
    write(path, 0x11, 0, 4 * MIB)
    backend.create_snapshots([("d-1", "s-a")])
    assert backend.bytes_written_since("d-1", "s-a") == 0
    write(path, 0x22, MIB, MIB)  # over shared data
    write(path, 0x23, 900 * MIB, MIB)  # unallocated space
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -z {2 * MIB} {MIB}", "-c",
                    f"discard {3 * MIB} {MIB}", path], check=True, capture_output=True)
    assert backend.bytes_written_since("d-1", "s-a") == 4 * MIB
    size = GIB
    if options != "compat=0.10":  # a v2 image with snapshots cannot be resized
        size = 2 * GIB
        backend.resize("d-1", size)
        write(path, 0x24, GIB + 16 * MIB, MIB)  # past the size the snapshot had
        assert backend.bytes_written_since("d-1", "s-a") == 5 * MIB
    backend.revert("d-1", "s-a")
    assert backend.bytes_written_since("d-1", "s-a") == 0
    assert backend.virtual_size("d-1") == size
    assert read(path, 0, 4 * MIB) == b"\x11" * (4 * MIB)
