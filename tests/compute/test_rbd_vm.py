"""A real QEMU VM of the demo guest on disks of a Ceph RBD pool (a throwaway cluster,
tests/ceph.py): it boots from an RBD system disk cloned from the image template, reads and
writes an RBD data disk, takes a live snapshot of both through QMP, has an RBD disk
hot-plugged, and after a stop finds the data disk reverted by the storage backend."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ecsnap.adapters.compute.base import ComputeError, VmDisk, VmSpec
from ecsnap.adapters.compute.guest_image import DemoImage
from ecsnap.adapters.compute.qemu import QemuDriver
from ecsnap.adapters.compute.qemu.lifecycle import command_line
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
    with_keyring = VmDisk(SYS, str(RbdLocation("vms", SYS, keyring="/k")), True)
    with pytest.raises(ComputeError, match="keyring"):
        command_line("qemu-system-x86_64", spec_for_paths([with_keyring]), "tcg", tmp_path)


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
