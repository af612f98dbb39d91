"""The QEMU driver and the demo guest on real VMs (TCG here): agent, live snapshots
(file-system consistent, atomic, pause fallback), survival of a controller restart,
hot plug, serial console, and the accelerator probe. No test double anywhere."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ecsnap.adapters.compute.base import ComputeError, VmDisk, VmSpec
from ecsnap.adapters.compute.guest_image import DemoImage, build_demo_image
from ecsnap.adapters.compute.qemu import QemuDriver
from tests import qcow
from tests.e2e.conftest import CACHE

pytestmark = pytest.mark.qemu

# ecsnap disk IDs: "d-" and 20 characters, all of which fit in a virtio-blk serial
SYS, D1, D2, D3 = (f"d-{name:0<20}" for name in ("sys", "data1", "data2", "data3"))


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> DemoImage:
    return build_demo_image(tmp_path_factory.mktemp("image"), CACHE / "debs")


def disk(folder: Path, disk_id: str, backing: Path | None = None, size: str = "20G") -> VmDisk:
    path = folder / f"{disk_id}.qcow2"
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing:
        cmd += ["-b", str(backing), "-F", "qcow2"]
    subprocess.run([*cmd, str(path), size], check=True)
    return VmDisk(disk_id, str(path), backing is not None)


def spec_for(image: DemoImage, disks: list[VmDisk], instance_id: str = "i-drivertest") -> VmSpec:
    return VmSpec(instance_id, 1, 512, disks, "direct", str(image.kernel_path),
                  str(image.initrd_path), image.kernel_args)


def wait_agent(driver: QemuDriver, instance_id: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not driver.guest_ping(instance_id, timeout=2):
        assert time.monotonic() < deadline, "the guest agent never answered"


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory, image: DemoImage,
       ) -> Iterator[tuple[QemuDriver, dict[str, VmDisk]]]:
    folder = tmp_path_factory.mktemp("vm")
    disks = {SYS: disk(folder, SYS, image.rootfs_path), D1: disk(folder, D1),
             D2: disk(folder, D2)}
    driver = QemuDriver(folder / "run", accel="auto")
    driver.start(spec_for(image, list(disks.values())))
    try:
        wait_agent(driver, "i-drivertest")
        yield driver, disks
    finally:
        driver.stop("i-drivertest", force=True)


def sh(driver: QemuDriver, command: str, timeout: float = 60) -> str:
    result = driver.guest_exec("i-drivertest", command, timeout=timeout)
    assert result.exit_code == 0, result
    return result.stdout.decode()


def test_agent_runs_commands_on_every_disk(vm: tuple[QemuDriver, dict[str, VmDisk]]) -> None:
    driver, _ = vm
    sh(driver, f"echo a > /root/m && echo b > /mnt/{D1}/m && echo c > /mnt/{D2}/m && sync")
    assert sh(driver, f"cat /root/m /mnt/{D1}/m /mnt/{D2}/m").split() == ["a", "b", "c"]
    failed = driver.guest_exec("i-drivertest", "echo oops >&2; exit 3")
    assert failed.exit_code == 3 and failed.stderr == b"oops\n"
    slow = driver.guest_exec("i-drivertest", "sleep 30", timeout=1)
    assert slow.timed_out and slow.exit_code is None


def test_live_snapshot_is_fs_consistent_and_thawed(
        vm: tuple[QemuDriver, dict[str, VmDisk]]) -> None:
    driver, disks = vm
    result = driver.snapshot_disks("i-drivertest", [(d, "s-live1") for d in disks])
    assert result.consistency == "FileSystemConsistent" and result.method == "fsfreeze"
    assert result.window_ms > 0
    for d in disks.values():
        assert "s-live1" in qcow.snapshots(d.path)
    assert sh(driver, "echo still-writable > /root/w && cat /root/w").strip() == \
        "still-writable"  # thawed


def test_transaction_is_all_or_nothing(vm: tuple[QemuDriver, dict[str, VmDisk]]) -> None:
    driver, disks = vm
    driver.snapshot_disks("i-drivertest", [(D2, "s-clash")])
    with pytest.raises(ComputeError):
        driver.snapshot_disks("i-drivertest", [(SYS, "s-clash"), (D1, "s-clash"),
                                               (D2, "s-clash")])
    assert "s-clash" not in qcow.snapshots(disks[SYS].path)
    assert "s-clash" not in qcow.snapshots(disks[D1].path)
    driver.delete_disk_snapshot("i-drivertest", D2, "s-clash")
    assert "s-clash" not in qcow.snapshots(disks[D2].path)
    assert sh(driver, "echo ok > /root/after && cat /root/after").strip() == "ok"


def test_hot_attach_and_detach(vm: tuple[QemuDriver, dict[str, VmDisk]],
                               tmp_path: Path) -> None:
    driver, _ = vm
    extra = disk(tmp_path, D3)
    driver.attach_disk("i-drivertest", extra)
    deadline = time.monotonic() + 30
    while f"/mnt/{D3}" not in sh(driver, "cat /proc/mounts"):
        assert time.monotonic() < deadline, "the hot-plugged disk was not mounted"
        sh(driver, "/sbin/ecsnap-mount-disks")
    sh(driver, f"echo hot > /mnt/{D3}/m && sync")
    driver.detach_disk("i-drivertest", D3)
    assert f"/mnt/{D3}" not in sh(driver, "cat /proc/mounts")


def test_serial_console_login(vm: tuple[QemuDriver, dict[str, VmDisk]]) -> None:
    driver, _ = vm
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(driver.serial_socket("i-drivertest"))
        s.settimeout(1)

        def until(text: bytes, send: bytes, timeout: float = 30) -> bytes:
            seen, deadline, last = b"", time.monotonic() + timeout, 0.0
            while text not in seen:
                assert time.monotonic() < deadline, seen[-500:]
                if time.monotonic() - last > 3:
                    s.sendall(send)
                    last = time.monotonic()
                with contextlib.suppress(TimeoutError):
                    seen += s.recv(4096)
            return seen

        until(b"login:", b"\r")
        until(b"# ", b"root\r")
        assert b"hello-42" in until(b"hello-42", b"echo hello-$((6*7))\r")


def test_pause_fallback_without_an_agent(vm: tuple[QemuDriver, dict[str, VmDisk]]) -> None:
    driver, disks = vm
    # stop the agent for good: init respawns /etc/init.d/qga, so make that a no-op first
    driver.guest_exec("i-drivertest",
                      "printf '#!/bin/sh\\nsleep 3600\\n' > /etc/init.d/qga; "
                      "(sleep 1; killall qemu-ga) >/dev/null 2>&1 &", timeout=10)
    time.sleep(3)
    assert not driver.guest_ping("i-drivertest", timeout=2)
    result = driver.snapshot_disks("i-drivertest", [(d, "s-paused") for d in disks])
    assert result.consistency == "CrashConsistent" and result.method == "pause"
    for d in disks.values():
        assert "s-paused" in qcow.snapshots(d.path)
    status = json.loads(subprocess.run(
        [sys.executable, "-c", "from qemu.qmp.legacy import QEMUMonitorProtocol as Q; "
         f"q=Q({str(driver.run_root / 'i-drivertest' / 'qmp.sock')!r}); q.connect(); "
         "import json; print(json.dumps(q.cmd('query-status')))"],
        capture_output=True, text=True, check=True).stdout)
    assert status["status"] == "running"  # resumed after the pause


CHILD = """
import sys
from pathlib import Path
from ecsnap.adapters.compute.base import VmDisk, VmSpec
from ecsnap.adapters.compute.qemu import QemuDriver
run, kernel, initrd, args, path = sys.argv[1:6]
d = QemuDriver(Path(run), accel="tcg")
d.start(VmSpec("i-survivor", 1, 512, [VmDisk("d-sys00000000000000000", path, True)],
               "direct", kernel, initrd, args))
import os, signal
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_vm_outlives_its_controller(image: DemoImage, tmp_path: Path) -> None:
    system = disk(tmp_path, SYS, image.rootfs_path)
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(run), str(image.kernel_path),
                           str(image.initrd_path), image.kernel_args, system.path],
                          timeout=60)
    assert proc.returncode == -9  # the controller died
    driver = QemuDriver(run, accel="tcg")  # a new controller reattaches
    try:
        assert driver.running() == ["i-survivor"]
        wait_agent(driver, "i-survivor")
        assert driver.guest_exec("i-survivor", "echo alive").stdout == b"alive\n"
        started = time.monotonic()
        driver.stop("i-survivor")  # through the guest agent
        assert time.monotonic() - started < 30
        assert driver.running() == [] and not driver.state("i-survivor").running
    finally:
        driver.stop("i-survivor", force=True)


def test_accelerator_probe_is_cached(image: DemoImage, tmp_path: Path) -> None:
    driver = QemuDriver(tmp_path / "run", accel="auto")
    spec = spec_for(image, [disk(tmp_path, SYS, image.rootfs_path)])
    verdict = driver.accelerator(spec)
    cached = json.loads((tmp_path / "run" / "accel.json").read_text())
    assert cached["accel"] == verdict in ("kvm", "tcg") and cached["why"]
    started = time.monotonic()
    assert driver.accelerator(spec) == verdict
    assert time.monotonic() - started < 1  # no second probe
