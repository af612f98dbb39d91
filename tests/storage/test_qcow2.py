"""The qcow2 backend on real files through real qemu-img; guest data written with qemu-io
and read back as exact bytes with `qemu-img convert -O raw`."""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ecsnap.adapters.storage.base import StorageBackend, StorageError
from ecsnap.adapters.storage.qcow2 import Qcow2Backend

KIB, MIB, GIB = 1024, 1024**2, 1024**3
CLUSTER = 64 * KIB


# ---------------------------------------------------------------- guest data helpers

def write(path: str, pattern: int, offset: int, length: int) -> None:
    write_many(path, [(pattern, offset, length)])


def write_many(path: str, writes: list[tuple[int, int, int]]) -> None:
    """(pattern, offset, length) writes, in order, by one qemu-io process."""
    cmds = [arg for p, o, n in writes for arg in ("-c", f"write -P {p:#x} {o} {n}")]
    if cmds:
        subprocess.run(["qemu-io", "-f", "qcow2", *cmds, path], check=True,
                       capture_output=True)


def read(path: str, offset: int, length: int) -> bytes:
    """Exactly the guest bytes [offset, offset+length) (multiples of 512): a raw slice of
    the qcow2 image converted to a raw file."""
    opts = (f"driver=raw,offset={offset},size={length},file.driver=qcow2,"
            f"file.file.filename={path.replace(',', ',,')}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "slice.raw"
        subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", "--image-opts", opts,
                        str(out)], check=True, capture_output=True)
        return out.read_bytes()


def whole(path: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "disk.raw"
        subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", path, str(out)],
                       check=True, capture_output=True)
        return out.read_bytes()


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


def test_create_blank(backend: Qcow2Backend) -> None:
    backend.create_blank("d-1", 20 * GIB)
    assert backend.exists("d-1") and info(backend.path("d-1"))["format"] == "qcow2"
    assert backend.virtual_size("d-1") == 20 * GIB
    assert backend.allocated_bytes("d-1") < MIB
    assert read(backend.path("d-1"), 5 * GIB, MIB) == bytes(MIB)


def test_overlay_on_an_image_is_o1(backend: Qcow2Backend, tmp_path: Path) -> None:
    image = tmp_path / "image.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1G"], check=True)
    write(str(image), 0x5A, 0, 8 * MIB)
    write(str(image), 0x5B, 700 * MIB, MIB)
    backend.create_from_image("d-sys", str(image), 20 * GIB)
    meta = info(backend.path("d-sys"))
    assert meta["backing-filename"] == str(image.resolve())
    assert meta["backing-filename-format"] == "qcow2"
    assert meta["virtual-size"] == 20 * GIB
    assert Path(backend.path("d-sys")).stat().st_size < MIB
    assert read(backend.path("d-sys"), 0, 8 * MIB) == b"\x5a" * 8 * MIB
    assert read(backend.path("d-sys"), 700 * MIB, MIB) == b"\x5b" * MIB
    assert read(backend.path("d-sys"), 2 * GIB, MIB) == bytes(MIB)
    # asked smaller than the image: the image's size
    backend.create_from_image("d-small", str(image), MIB)
    assert backend.virtual_size("d-small") == GIB


def test_resize_grows_only(backend: Qcow2Backend) -> None:
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


def test_delete_removes_the_file(backend: Qcow2Backend) -> None:
    backend.create_blank("d-1", GIB)
    backend.create_snapshots([("d-1", "s-a")])
    backend.delete("d-1")
    backend.delete("d-1")
    backend.delete("d-never")
    assert not backend.exists("d-1") and not (backend.pool / "d-1.maps").exists()
    assert backend.list_snapshots("d-1") == []


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

def test_snapshot_overwrite_revert_keeps_newer_snapshots(backend: Qcow2Backend) -> None:
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


def test_revert_keeps_the_grown_size(backend: Qcow2Backend) -> None:
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


def test_revert_to_a_missing_snapshot_fails(backend: Qcow2Backend) -> None:
    backend.create_blank("d-1", GIB)
    with pytest.raises(StorageError, match="s-nope"):
        backend.revert("d-1", "s-nope")


def test_all_digit_names_are_refused(backend: Qcow2Backend) -> None:
    """`qemu-img snapshot -a 1` picks the snapshot whose qcow2 ID is 1, whatever its name."""
    backend.create_blank("d-1", GIB)
    with pytest.raises(StorageError):
        backend.create_snapshots([("d-1", "1")])
    with pytest.raises(StorageError):
        backend.revert("d-1", "1")
    assert names(backend, "d-1") == []


def test_listing_snapshots(backend: Qcow2Backend) -> None:
    backend.create_blank("d-1", GIB)
    before = int(time.time())
    backend.create_snapshots([("d-1", "s-a"), ("d-1", "s-b")])
    snaps = backend.list_snapshots("d-1")
    assert [s.name for s in snaps] == ["s-a", "s-b"]
    assert all(s.vm_state_size == 0 and before - 1 <= s.date_sec <= time.time() + 1
               for s in snaps)
    assert backend.has_snapshot("d-1", "s-b") and not backend.has_snapshot("d-1", "s-c")
    assert backend.list_snapshots("d-missing") == []


@pytest.mark.parametrize("breakage", ["corrupt", "missing"])
def test_multi_disk_snapshot_is_all_or_nothing(backend: Qcow2Backend, breakage: str) -> None:
    for d in ("d-1", "d-2", "d-3"):
        backend.create_blank(d, GIB)
    backend.create_snapshots([("d-1", "s-a")])  # already there: not this call's to undo
    if breakage == "corrupt":
        Path(backend.path("d-3")).write_bytes(b"not a qcow2 file")
    else:
        backend.delete("d-3")
    items = [("d-1", "s-a"), ("d-1", "s-b"), ("d-2", "s-a"), ("d-2", "s-b"), ("d-3", "s-a")]
    with pytest.raises(StorageError, match="d-3"):
        backend.create_snapshots(items)
    assert names(backend, "d-1") == ["s-a"]
    assert names(backend, "d-2") == []
    assert backend.bytes_written_since("d-1", "s-a") == 0
    assert backend.bytes_written_since("d-2", "s-a") is None  # undone: no such snapshot


def test_idempotent_operations(backend: Qcow2Backend) -> None:
    backend.create_blank("d-1", GIB)
    backend.create_snapshots([("d-1", "s-a")])
    write(backend.path("d-1"), 0x44, 0, MIB)
    backend.create_snapshots([("d-1", "s-a")])  # kept as it was: still the empty disk
    assert names(backend, "d-1") == ["s-a"]
    assert backend.bytes_written_since("d-1", "s-a") == MIB
    backend.revert("d-1", "s-a")
    assert read(backend.path("d-1"), 0, MIB) == bytes(MIB)
    backend.delete_snapshot("d-1", "s-a")
    backend.delete_snapshot("d-1", "s-a")
    backend.delete_snapshot("d-gone", "s-a")
    assert names(backend, "d-1") == []
    assert backend.bytes_written_since("d-1", "s-a") is None


def test_queries_work_while_the_file_is_open(backend: Qcow2Backend) -> None:
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

def test_bytes_written_since_a_snapshot(backend: Qcow2Backend) -> None:
    backend.create_blank("d-1", 20 * GIB)
    path = backend.path("d-1")
    write(path, 0x11, 0, 4 * MIB)
    assert backend.bytes_written_since("d-1", "s-a") is None  # no snapshot, no map
    backend.create_snapshots([("d-1", "s-a")])
    assert backend.bytes_written_since("d-1", "s-a") == 0
    # 1 MiB each at three places, not cluster-aligned: over shared data, over unallocated
    # space far away, and straddling both
    for offset in (512 * KIB + 4 * KIB, 7 * GIB + 512, 4 * MIB - 8 * KIB):
        write(path, 0x22, offset, MIB)
    written = backend.bytes_written_since("d-1", "s-a")
    assert written is not None and 3 * MIB <= written <= 3 * MIB + 3 * CLUSTER
    backend.revert("d-1", "s-a")
    assert backend.bytes_written_since("d-1", "s-a") == 0
    assert read(path, 0, 5 * MIB) == b"\x11" * (4 * MIB) + bytes(MIB)


def test_bytes_written_since_on_an_overlay(backend: Qcow2Backend, tmp_path: Path) -> None:
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


def test_other_snapshots_maps_survive_a_revert(backend: Qcow2Backend) -> None:
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


# ---------------------------------------------------------------- property

BLOCKS = 64  # a 4 MiB disk of 64 KiB clusters
writes = st.lists(st.tuples(st.integers(0, BLOCKS - 1), st.integers(1, 8),
                            st.integers(1, 255)), max_size=6)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(before=writes, after=writes)
def test_revert_gives_back_exactly_the_snapshot(
        ram_backend: Qcow2Backend, before: list[tuple[int, int, int]],
        after: list[tuple[int, int, int]]) -> None:
    backend = ram_backend
    backend.delete("d-p")
    backend.create_blank("d-p", BLOCKS * CLUSTER)
    path = backend.path("d-p")
    write_many(path, [(p, b * CLUSTER, min(n, BLOCKS - b) * CLUSTER) for b, n, p in before])
    backend.create_snapshots([("d-p", "s-p")])
    expected = whole(path)
    write_many(path, [(p, b * CLUSTER, min(n, BLOCKS - b) * CLUSTER) for b, n, p in after])
    touched = {c for b, n, _ in after for c in range(b, min(b + n, BLOCKS))}
    assert backend.bytes_written_since("d-p", "s-p") == len(touched) * CLUSTER
    backend.revert("d-p", "s-p")
    assert whole(path) == expected
    assert backend.bytes_written_since("d-p", "s-p") == 0
