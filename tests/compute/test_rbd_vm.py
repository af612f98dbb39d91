"""A real QEMU VM of the demo guest on disks of a Ceph RBD pool (a throwaway cluster,
tests/ceph.py): it boots from an RBD system disk cloned from the image template, reads and
writes an RBD data disk, takes a live snapshot of both through QMP, has an RBD disk
hot-plugged, and after a stop finds the data disk reverted by the storage backend. A live
snapshot taken while a guest writer runs is file-system consistent (the frozen file
system's snapshot needs no journal recovery and holds every line written before it), taken
by librbd outside QEMU (all or nothing); and a cluster with cephx: the VM gets the key
as a QEMU secret object, from an owner-only file."""

from __future__ import annotations

import json
import logging
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ecsnap.adapters.compute.base import ComputeError, VmDisk, VmSpec
from ecsnap.adapters.compute.guest_image import DemoImage
from ecsnap.adapters.compute.qemu import LiveSnapshotTiming, QemuDriver
from ecsnap.adapters.compute.qemu.lifecycle import command_line
from ecsnap.adapters.compute.qemu.rbd_snapshots import RbdSnapshotter
from ecsnap.adapters.storage.base import RbdLocation
from ecsnap.adapters.storage.rbd import RbdBackend
from tests.ceph import CephCluster, shared
from tests.compute.conftest import spec_for, wait_agent

pytestmark = pytest.mark.qemu

SYS, D1, D2 = (f"d-{name:0<20}" for name in ("rbdsys", "rbddata1", "rbdhot2"))
VM = "i-rbd"
GIB = 1024**3
log = logging.getLogger("ecsnap.tests")


@pytest.fixture(scope="session")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    with shared(tmp_path_factory) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def backend(ceph: CephCluster) -> Iterator[RbdBackend]:
    backend = RbdBackend(ceph.pool, conf=str(ceph.conf), client="admin")
    try:
        yield backend
    finally:
        for disk in (SYS, D1, D2):
            backend.delete(disk)
        backend.close()


def sh(driver: QemuDriver, command: str) -> str:
    result = driver.guest_exec(VM, command, timeout=60)
    assert result.exit_code == 0, result
    return result.stdout.decode()


def test_the_command_line_opens_rbd_disks_as_rbd_nodes(tmp_path: Path) -> None:
    disk = VmDisk(SYS, str(RbdLocation("vms", SYS, "ecsnap", "/etc/ceph/c.conf")), True)
    cmd = command_line("qemu-system-x86_64", spec_for_paths([disk]), "tcg", tmp_path)
    blockdevs = [json.loads(cmd[n + 1]) for n, arg in enumerate(cmd) if arg == "-blockdev"]
    assert blockdevs == [{"driver": "rbd", "node-name": SYS, "pool": "vms", "image": SYS,
                          "conf": "/etc/ceph/c.conf", "user": "ecsnap", "discard": "unmap",
                          "cache": {"direct": False, "no-flush": False}}]
    keyring = tmp_path / "k"
    keyring.write_text("[client.other]\n\tkey = AQBvb3RoZXI=\n[client.ecsnap]\n"
                       "\tkey = AQBlY3NuYXBrZXk=\n\tcaps mon = \"allow r\"\n")
    with_keyring = VmDisk(SYS, str(RbdLocation("vms", SYS, "ecsnap", keyring=str(keyring))),
                          True)
    cmd = command_line("qemu-system-x86_64", spec_for_paths([with_keyring]), "tcg", tmp_path)
    blockdevs = [json.loads(cmd[n + 1]) for n, arg in enumerate(cmd) if arg == "-blockdev"]
    assert blockdevs[0]["key-secret"] == f"key-{SYS}"
    secret = tmp_path / f"key-{SYS}.secret"
    assert cmd[cmd.index("-object") + 1] == \
        f"secret,id=key-{SYS},format=base64,file={secret}"
    assert secret.read_text() == "AQBlY3NuYXBrZXk="  # the client's key, not another's
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert "AQBlY3NuYXBrZXk=" not in " ".join(cmd)
    no_key = VmDisk(SYS, str(RbdLocation("vms", SYS, "nobody", keyring=str(keyring))), True)
    with pytest.raises(ComputeError, match=r"no key for client\.nobody"):
        command_line("qemu-system-x86_64", spec_for_paths([no_key]), "tcg", tmp_path)
    missing = VmDisk(SYS, str(RbdLocation("vms", SYS, keyring=str(tmp_path / "no"))), True)
    with pytest.raises(ComputeError, match="cannot read the keyring"):
        command_line("qemu-system-x86_64", spec_for_paths([missing]), "tcg", tmp_path)


def spec_for_paths(disks: list[VmDisk]) -> VmSpec:
    return VmSpec("i-x", 1, 256, disks)


def test_a_vm_on_rbd_disks(demo_image: DemoImage, run_root: Path,
                           backend: RbdBackend) -> None:
    backend.create_from_image(SYS, str(demo_image.rootfs_path), GIB)
    backend.create_blank(D1, GIB)
    disks = [VmDisk(SYS, backend.path(SYS), True), VmDisk(D1, backend.path(D1), False)]
    driver = QemuDriver(run_root, accel="auto")
    started = time.monotonic()
    driver.start(spec_for(demo_image, VM, disks))
    try:
        wait_agent(driver, VM)
        log.warning("%s: agent answered %.1f s after start, from an RBD system disk", VM,
                    time.monotonic() - started)
        assert f" /mnt/{D1} ext4 " in sh(driver, "cat /proc/mounts")
        sh(driver, f"echo before > /mnt/{D1}/m && echo root > /root/m && sync")
        assert sh(driver, f"cat /mnt/{D1}/m /root/m").split() == ["before", "root"]

        result = driver.snapshot_disks(VM, [(SYS, "s-live"), (D1, "s-live")])
        log.warning("%s: live snapshot of 2 RBD disks through QMP: %s, window %.0f ms", VM,
                    result.method, result.window_ms)
        assert result.consistency == "FileSystemConsistent"
        assert backend.has_snapshot(SYS, "s-live") and backend.has_snapshot(D1, "s-live")
        assert driver.has_disk_snapshot(VM, D1, "s-live")

        backend.create_blank(D2, GIB)
        hot = VmDisk(D2, backend.path(D2), False)
        driver.attach_disk(VM, hot)  # returns once the guest mounted it
        assert f" /mnt/{D2} ext4 " in sh(driver, "cat /proc/mounts")
        sh(driver, f"echo hot > /mnt/{D2}/m && sync")
        driver.detach_disk(VM, D2)
        assert f"/mnt/{D2}" not in sh(driver, "cat /proc/mounts")

        sh(driver, f"echo after > /mnt/{D1}/m && sync")
    finally:
        driver.stop(VM)
    assert driver.has_disk_snapshot(VM, D1, "s-live")  # asked of the image, VM stopped
    assert backend.bytes_written_since(D1, "s-live")
    backend.revert(D1, "s-live")
    assert backend.bytes_written_since(D1, "s-live") == 0
    driver.start(spec_for(demo_image, VM, disks))
    try:
        wait_agent(driver, VM)
        assert sh(driver, f"cat /mnt/{D1}/m /root/m").split() == ["before", "root"]
    finally:
        driver.stop(VM, force=True)


def test_librbd_snapshots_are_all_or_nothing(backend: RbdBackend) -> None:
    backend.create_blank(D2, GIB)
    try:
        location = RbdLocation.parse(backend.path(D2))
        gone = RbdLocation.parse(backend.path("d-rbdnotthere00000000"))
        assert location is not None and gone is not None
        with RbdSnapshotter({D2: location, "d-gone": gone}) as snapper, \
                pytest.raises(ComputeError, match="none was kept"):
            snapper.snapshot([(D2, "s-half"), ("d-gone", "s-half")])
        assert not backend.has_snapshot(D2, "s-half")
        with RbdSnapshotter({D2: location}) as snapper:
            snapper.snapshot([(D2, "s-whole")])
            snapper.snapshot([(D2, "s-whole")])  # again (a retried step): kept as it is
        assert backend.has_snapshot(D2, "s-whole")
    finally:
        backend.delete(D2)


def _snapshot_file(ceph: CephCluster, image: str, snapshot: str, folder: Path) -> Path:
    out = folder / f"{image}@{snapshot}.raw"
    subprocess.run(["rbd", "-c", str(ceph.conf), "export", f"{ceph.pool}/{image}@{snapshot}",
                    str(out)], check=True, capture_output=True, timeout=120)
    return out


def test_a_live_snapshot_on_rbd_under_a_guest_writer_is_consistent(
        demo_image: DemoImage, run_root: Path, ceph: CephCluster, backend: RbdBackend,
        tmp_path: Path) -> None:
    timings: list[LiveSnapshotTiming] = []
    backend.create_from_image(SYS, str(demo_image.rootfs_path), GIB)
    backend.create_blank(D1, GIB)
    disks = [VmDisk(SYS, backend.path(SYS), True), VmDisk(D1, backend.path(D1), False)]
    driver = QemuDriver(run_root, accel="auto", snapshot_observer=timings.append)
    driver.start(spec_for(demo_image, VM, disks))
    try:
        wait_agent(driver, VM)
        seq = f"/mnt/{D1}/seq"
        # a writer that never syncs: what it wrote sits in the guest's page cache until
        # the freeze flushes it
        sh(driver, f"setsid sh -c 'i=0; while [ $i -lt 1000000 ]; do i=$((i+1)); "
                   f"echo $i >> {seq}; done' </dev/null >/dev/null 2>&1 &")
        deadline = time.monotonic() + 60
        while int(sh(driver, f"cat {seq} 2>/dev/null | wc -l") or 0) < 200:
            assert time.monotonic() < deadline, "the guest writer does not write"
            time.sleep(0.5)
        before = int(sh(driver, f"wc -l < {seq}"))
        result = driver.snapshot_disks(VM, [(SYS, "s-w"), (D1, "s-w")])
        after = int(sh(driver, f"wc -l < {seq}"))
        log.warning("%s: live snapshot of 2 RBD disks under a writer: %s, window %.0f ms, "
                    "lines before %d, after %d", VM, result.method, result.window_ms,
                    before, after)
        assert result.consistency == "FileSystemConsistent"
        assert after > before, "the writer stopped"
        commands = [c.command for c in timings[-1].commands]
        assert "rbd-snap-create" in commands and "transaction" not in commands
        # the pause fallback (no quiesce): librbd too, while QEMU is stopped; resumed after
        paused = driver.snapshot_disks(VM, [(SYS, "s-p"), (D1, "s-p")], quiesce=False)
        assert (paused.method, paused.consistency) == ("pause", "CrashConsistent")
        assert [c.command for c in timings[-1].commands if c.command != "query-status"] == \
            ["stop", "rbd-snap-create", "cont"]
        assert backend.has_snapshot(SYS, "s-p") and backend.has_snapshot(D1, "s-p")
        assert int(sh(driver, f"wc -l < {seq}")) > after  # running again, still writing
    finally:
        driver.stop(VM, force=True)
    image = _snapshot_file(ceph, D1, "s-w", tmp_path)
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True,
                          timeout=120)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr  # clean: no recovery needed
    lines = subprocess.run(["debugfs", "-R", "cat /seq", str(image)], capture_output=True,
                           text=True, check=True, timeout=120).stdout.split()
    assert len(lines) >= before  # all that was written before the snapshot is in it
    assert lines == [str(n) for n in range(1, len(lines) + 1)]  # and nothing torn
    for disk in (SYS, D1):
        backend.delete(disk)


@pytest.fixture(scope="module")
def cephx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    cluster = CephCluster(tmp_path_factory.mktemp("cephx"), auth=True)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def test_a_vm_on_a_cluster_with_cephx(demo_image: DemoImage, run_root: Path,
                                      cephx: CephCluster) -> None:
    backend = RbdBackend.from_spec(cephx.spec())
    assert backend.keyring == str(cephx.keyring)
    backend.create_from_image(SYS, str(demo_image.rootfs_path), GIB)
    backend.create_blank(D1, GIB)
    backend.create_blank(D2, GIB)
    driver = QemuDriver(run_root, accel="auto")
    try:
        disks = [VmDisk(SYS, backend.path(SYS), True), VmDisk(D1, backend.path(D1), False)]
        assert all(RbdLocation.parse(d.path).keyring for d in disks)  # type: ignore[union-attr]
        driver.start(spec_for(demo_image, VM, disks))
        try:
            wait_agent(driver, VM)
            run = run_root / VM
            for disk in (SYS, D1):
                assert stat.S_IMODE((run / f"key-{disk}.secret").stat().st_mode) == 0o600
            sh(driver, f"echo cephx > /mnt/{D1}/m && sync")
            result = driver.snapshot_disks(VM, [(SYS, "s-x"), (D1, "s-x")])
            assert result.consistency == "FileSystemConsistent"
            assert backend.has_snapshot(D1, "s-x")
            driver.attach_disk(VM, VmDisk(D2, backend.path(D2), False))  # key via QMP
            assert f" /mnt/{D2} ext4 " in sh(driver, "cat /proc/mounts")
            driver.detach_disk(VM, D2)
        finally:
            driver.stop(VM)
        assert backend.has_snapshot(SYS, "s-x")
        assert not (run_root / VM / f"key-{D2}.secret").exists()  # plugged through QMP
    finally:
        for disk in (SYS, D1, D2):
            backend.delete(disk)
        backend.close()
