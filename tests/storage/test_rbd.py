"""What only the RBD backend does, on a throwaway Ceph cluster (tests/ceph.py): its names
(QEMU's rbd filename, the region's pool spec), the image features, templates imported
once and cloned, images open elsewhere, the connection shared by threads, and how long
the operations take here. The storage contract itself: test_contract_storage.py."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from ecsnap.adapters.storage.base import RbdLocation, StorageBackend, StorageError
from ecsnap.adapters.storage.rbd import (
    MARKER,
    TEMPLATE_PREFIX,
    TEMPLATE_SNAP,
    RbdBackend,
    parse_pool_spec,
)
from tests.ceph import CephCluster
from tests.storage.conftest import rbd_images
from tests.storage.guest_data import read, write

MIB, GIB = 1024**2, 1024**3
log = logging.getLogger("ecsnap.tests")


@pytest.fixture
def template(tmp_path: Path) -> Path:
    image = tmp_path / "template.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "256M"],
                   check=True)
    write(str(image), 0x5A, 0, 4 * MIB)
    return image


@contextmanager
def held_open(path: str) -> Iterator[None]:
    """The image open read-write by another client (as by a running VM), which has
    written to it and so holds its exclusive lock."""
    proc = subprocess.Popen(["qemu-io", "-f", "raw", path], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write("write -P 0x66 0 4096\n")
        proc.stdin.flush()
        assert "wrote 4096/4096 bytes" in proc.stdout.readline(), proc.communicate()
        yield
    finally:
        proc.communicate(timeout=30)


# ---------------------------------------------------------------- names

def test_path_is_qemus_rbd_filename(ceph: CephCluster) -> None:
    backend: StorageBackend = RbdBackend("rbd", conf=str(ceph.conf), client="admin")
    assert backend.path("d-1") == f"rbd:rbd/d-1:id=admin:conf={ceph.conf}"
    assert RbdLocation.parse(backend.path("d-1")) == \
        RbdLocation("rbd", "d-1", "admin", str(ceph.conf))
    odd = RbdLocation("p", "d-1", "u", "/etc/a:b/ceph.conf", "/k/ring")
    assert str(odd) == r"rbd:p/d-1:id=u:conf=/etc/a\:b/ceph.conf:keyring=/k/ring"
    assert RbdLocation.parse(str(odd)) == odd
    assert RbdLocation.parse("/var/lib/ecsnap/pools/local-1/d-1.qcow2") is None
    for bad in ("rbd:pool", "rbd:pool/image@snap", "rbd:pool/image:mon_host=x", "rbd:/i"):
        with pytest.raises(ValueError):
            RbdLocation.parse(bad)


def test_pool_spec() -> None:
    assert parse_pool_spec("rbd:vms?conf=/etc/ceph/ceph.conf&client=client.ecsnap") == \
        {"pool": "vms", "conf": "/etc/ceph/ceph.conf", "client": "ecsnap"}
    assert parse_pool_spec("rbd:vms") == {"pool": "vms"}
    assert parse_pool_spec("rbd:vms?keyring=/k") == {"pool": "vms", "keyring": "/k"}
    for bad in ("vms", "rbd:", "rbd:a/b", "rbd:vms?user=x", "rbd:vms?conf=a&conf=b",
                "rbd:vms?conf"):
        with pytest.raises(ValueError):
            parse_pool_spec(bad)
    backend = RbdBackend.from_spec("rbd:vms?conf=/c&client=u")
    assert (backend.pool, backend.conf, backend.client, backend.keyring) == \
        ("vms", "/c", "u", "")


def test_a_missing_pool_or_cluster_is_a_storage_error(ceph: CephCluster,
                                                      tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="nopool"):
        RbdBackend("nopool", conf=str(ceph.conf)).exists("d-1")
    with pytest.raises(StorageError, match="connect"):
        RbdBackend("rbd", conf=str(tmp_path / "missing.conf")).exists("d-1")


# ---------------------------------------------------------------- images

def test_images_are_format_2_with_the_features(rbd_backend: RbdBackend, ceph: CephCluster,
                                               template: Path) -> None:
    import rbd

    rbd_backend.create_blank("d-1", GIB)
    rbd_backend.create_from_image("d-2", str(template), GIB)
    wanted = (rbd.RBD_FEATURE_LAYERING | rbd.RBD_FEATURE_EXCLUSIVE_LOCK |
              rbd.RBD_FEATURE_OBJECT_MAP | rbd.RBD_FEATURE_FAST_DIFF |
              rbd.RBD_FEATURE_DEEP_FLATTEN)
    for disk in ("d-1", "d-2"):
        with ceph.image(disk) as image:
            assert not image.old_format()
            assert image.features() & wanted == wanted


def test_a_template_is_imported_once_and_cloned(rbd_backend: RbdBackend, ceph: CephCluster,
                                                template: Path) -> None:
    before = rbd_images(ceph, ceph.pool)
    errors: list[BaseException] = []

    def make(n: int) -> None:
        try:
            rbd_backend.create_from_image(f"d-{n}", str(template), GIB)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=make, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    templates = [n for n in rbd_images(ceph, ceph.pool) - before
                 if n.startswith(TEMPLATE_PREFIX)]
    assert len(templates) == 1 and "importing" not in templates[0]
    name, size = rbd_backend.import_template(str(template))  # again: found, not written
    assert (name, size) == (templates[0], 256 * MIB)
    for n in range(4):
        with ceph.image(f"d-{n}") as image:
            parent = image.get_parent_image_spec()
            assert (parent["image_name"], parent["snap_name"]) == (name, TEMPLATE_SNAP)
            assert image.size() == GIB
        assert read(rbd_backend.path(f"d-{n}"), 0, MIB) == b"\x5a" * MIB
    assert rbd_backend.allocated_bytes("d-0") == 0  # a clone holds none of the data


def test_a_staging_image_left_by_a_crash_does_not_matter(rbd_backend: RbdBackend,
                                                         ceph: CephCluster,
                                                         template: Path) -> None:
    import rbd

    name, _ = rbd_backend.import_template(str(template))
    with ceph.connect() as conn, conn.open_ioctx(ceph.pool) as ioctx:
        rbd.RBD().create(ioctx, f"{name}.importing-deadbeef", MIB)  # a crashed import
    rbd_backend.create_from_image("d-1", str(template), GIB)
    assert read(rbd_backend.path("d-1"), 0, MIB) == b"\x5a" * MIB


def test_templates_raw_or_standalone_qcow2(rbd_backend: RbdBackend, template: Path,
                                          tmp_path: Path) -> None:
    raw = tmp_path / "raw.img"
    raw.write_bytes(b"\x7f" * MIB + bytes(MIB))
    rbd_backend.create_from_image("d-raw", str(raw), GIB)
    assert read(rbd_backend.path("d-raw"), 0, 2 * MIB) == raw.read_bytes()
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(template), "-F",
                    "qcow2", str(overlay)], check=True)
    with pytest.raises(StorageError, match="stand alone"):
        rbd_backend.create_from_image("d-overlay", str(overlay), GIB)
    assert not rbd_backend.exists("d-overlay")


def test_an_image_open_elsewhere(rbd_backend: RbdBackend) -> None:
    """A VM's disk: snapshots work (the lock owner takes them, crash-consistent); a revert
    or a delete is refused while another client has it open."""
    rbd_backend.create_blank("d-1", GIB)
    path = rbd_backend.path("d-1")
    write(path, 0x11, 0, MIB)
    rbd_backend.create_snapshots([("d-1", "s-a")])
    with held_open(path):
        rbd_backend.create_snapshots([("d-1", "s-b")])
        assert rbd_backend.virtual_size("d-1") == GIB
        assert rbd_backend.bytes_written_since("d-1", "s-b") == 0
        with pytest.raises(StorageError, match="open elsewhere"):
            rbd_backend.revert("d-1", "s-a")
        with pytest.raises(StorageError, match="open elsewhere"):
            rbd_backend.delete("d-1")
    assert [s.name for s in rbd_backend.list_snapshots("d-1")] == ["s-a", "s-b"]
    assert read(path, 0, 4096) == b"\x66" * 4096  # what the other client wrote
    rbd_backend.revert("d-1", "s-b")
    assert read(path, 0, 4096) == b"\x66" * 4096
    rbd_backend.revert("d-1", "s-a")
    assert read(path, 0, 4096) == b"\x11" * 4096


def test_revert_markers_stay_hidden(rbd_backend: RbdBackend, ceph: CephCluster) -> None:
    rbd_backend.create_blank("d-1", GIB)
    rbd_backend.create_snapshots([("d-1", "s-a"), ("d-1", "s-b")])
    rbd_backend.revert("d-1", "s-a")
    rbd_backend.revert("d-1", "s-b")
    with ceph.image("d-1") as image:
        assert [s["name"] for s in image.list_snaps()] == ["s-a", "s-b", MARKER + "s-b"]
    assert [s.name for s in rbd_backend.list_snapshots("d-1")] == ["s-a", "s-b"]
    assert not rbd_backend.has_snapshot("d-1", MARKER + "s-b")
    assert rbd_backend.bytes_written_since("d-1", MARKER + "s-b") is None
    with pytest.raises(StorageError):
        rbd_backend.create_snapshots([("d-1", MARKER + "x")])
    rbd_backend.delete_snapshot("d-1", "s-b")
    with ceph.image("d-1") as image:
        assert [s["name"] for s in image.list_snaps()] == ["s-a"]


def test_one_connection_serves_many_threads(rbd_backend: RbdBackend) -> None:
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            disk = f"d-t{n}"
            rbd_backend.create_blank(disk, GIB)
            rbd_backend.create_snapshots([(disk, "s-a")])
            rbd_backend.revert(disk, "s-a")
            assert rbd_backend.bytes_written_since(disk, "s-a") == 0
            rbd_backend.delete(disk)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert rbd_backend._cluster is not None  # one connection, made once


def test_images_are_never_opened_read_only(rbd_backend: RbdBackend,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """librbd 16 aborts the process now and then when it opens or closes a clone
    read-only (see RbdBackend._image): the backend opens every image read-write."""
    import rbd

    modes: list[bool] = []
    real = rbd.Image

    def spy(*args: Any, **kwargs: Any) -> Any:
        modes.append(bool(kwargs.get("read_only", False)))
        return real(*args, **kwargs)

    monkeypatch.setattr(rbd, "Image", spy)
    rbd_backend.create_blank("d-ro", 4 * MIB)
    rbd_backend.create_snapshots([("d-ro", "s-a")])
    rbd_backend.clone_to_volume("d-ro", "s-a", "d-ro.t-1", 4 * MIB)
    assert rbd_backend.exists("d-ro.t-1") and rbd_backend.clone_depth("d-ro.t-1") == 1
    assert rbd_backend.virtual_size("d-ro.t-1") == 4 * MIB
    assert rbd_backend.snapshot_volume("d-ro", "s-a") == "d-ro"
    assert [s.name for s in rbd_backend.list_snapshots("d-ro")] == ["s-a"]
    assert modes and not any(modes), modes


# A call holds an image open for a while (rbd.Image made slow after it opens) when another
# thread closes the backend. Run in a child process: librados aborts the whole process
# when its connection is shut under an operation.
SLOW_CALL = """
import logging, sys, threading, time
import rbd
from ecsnap.adapters.storage.rbd import RbdBackend

logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(message)s")
pool, conf, hold_s, timeout_s = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
backend = RbdBackend(pool, conf=conf, op_timeout_s=timeout_s)
opened = threading.Event()

class Slow(rbd.Image):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        opened.set()
        time.sleep(hold_s)

rbd.Image = Slow
call = threading.Thread(target=lambda: print("size", backend.virtual_size("d-slow")))
call.start()
opened.wait()
started = time.monotonic()
backend.close()
print("close took", round(time.monotonic() - started, 1))
call.join()
print("open after close:", backend._cluster is not None)
"""


@pytest.mark.parametrize("timeout_s", [30, 1])
def test_close_waits_for_the_calls_running(rbd_backend: RbdBackend, ceph: CephCluster,
                                           timeout_s: int) -> None:
    """close waits for a running call, then shuts the connection; with a call still running
    after op_timeout_s (a hung cluster) it leaves the connection open and says so, never
    aborting the process (which shutting it under the call does)."""
    rbd_backend.create_blank("d-slow", 4 * MIB)
    proc = subprocess.run([sys.executable, "-c", SLOW_CALL, ceph.pool, str(ceph.conf),
                           "3", str(timeout_s)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert f"size {4 * MIB}" in lines
    took = float(next(line for line in lines if line.startswith("close took")).split()[-1])
    if timeout_s == 30:
        assert took >= 2, proc.stdout
        assert "open after close: False" in lines
    else:
        assert 0.9 <= took < 2.5, proc.stdout
        assert "still running after 1 s; its Ceph connection is left open" in proc.stdout
        assert "open after close: True" in lines


# ---------------------------------------------------------------- how long it takes here

def test_timings(rbd_backend: RbdBackend, template: Path) -> None:
    """Snapshot, clone and rollback times on the test cluster (memstore OSD, monitor
    proposals every 10 ms), logged for the record; nothing is asserted about them."""
    rbd_backend.import_template(str(template))
    started = time.perf_counter()
    for n in range(3):
        rbd_backend.create_from_image(f"d-{n}", str(template), 20 * GIB)
    clone_ms = (time.perf_counter() - started) * 1000 / 3
    for n in range(3):
        write(rbd_backend.path(f"d-{n}"), 0x11, 0, 64 * MIB)
    started = time.perf_counter()
    rbd_backend.create_snapshots([(f"d-{n}", "s-a") for n in range(3)])
    snapshot_ms = (time.perf_counter() - started) * 1000
    for n in range(3):
        write(rbd_backend.path(f"d-{n}"), 0x22, 0, 64 * MIB)
    started = time.perf_counter()
    written = rbd_backend.bytes_written_since("d-0", "s-a")
    diff_ms = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    rbd_backend.revert_many([(f"d-{n}", "s-a") for n in range(3)])
    revert_ms = (time.perf_counter() - started) * 1000
    assert written == 64 * MIB
    assert read(rbd_backend.path("d-2"), 0, MIB) == b"\x11" * MIB
    log.warning("RBD on the test cluster: clone of a template %.0f ms; snapshot of 3 disks "
                "%.0f ms; bytes written since (64 MiB) %.1f ms; rollback of 3 disks with "
                "64 MiB written each %.0f ms", clone_ms, snapshot_ms, diff_ms, revert_ms)
