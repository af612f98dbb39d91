"""The QEMU driver on real VMs of the demo guest (TCG on hosts without a working KVM):
the agent, live snapshots (file-system consistent, atomic, pause fallback), hot plug, the
serial console, stop (agent, ACPI, force), a VM outliving its controller, the
accelerator probe. No test doubles. One VM serves most tests; before each, the `vm`
fixture puts it back in its initial state (running, agent answering, thawed, its three
disks) by booting it again when a test left it otherwise, so that every test also runs
alone (-k) or in any order. No test asserts a duration: the timings are in bench/."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ecsnap.adapters.compute.base import ComputeDriver, ComputeError, VmDisk
from ecsnap.adapters.compute.guest_image import DemoImage
from ecsnap.adapters.compute.qemu import LiveSnapshotTiming, QemuDriver
from ecsnap.adapters.compute.qemu import guest as qemu_guest
from ecsnap.adapters.compute.qemu.agent import AgentSession
from ecsnap.adapters.compute.qemu.qmp import QmpCommandError, QmpSession
from tests.compute.conftest import BOOT_TIMEOUT, MakeDisk, snapshots_in, spec_for, wait_agent

pytestmark = pytest.mark.qemu

# ecsnap disk IDs: "d-" and 20 lowercase letters and digits
SYS, D1, D2, D3 = (f"d-{name:0<20}" for name in ("sys", "data1", "data2", "hot3"))
VM = "i-main"


def alive(pid: int) -> bool:
    """A zombie is dead: its reaper (init, here) may not have collected it yet."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


class Main:
    def __init__(self, driver: QemuDriver, disks: dict[str, VmDisk], image: DemoImage) -> None:
        self.driver = driver
        self.disks = disks
        self.image = image
        self.boots = 0

    def boot(self) -> None:
        self.driver.stop(VM, force=True)
        self.driver.start(spec_for(self.image, VM, list(self.disks.values())))
        wait_agent(self.driver, VM)
        self.boots += 1

    def pristine(self) -> bool:
        """Running as booted: agent answering, not paused, thawed, only its own disks."""
        driver = self.driver
        if not driver.state(VM).running or not driver.guest_ping(VM, timeout=3):
            return False
        try:
            vm = json.loads((driver.run_root / VM / "vm.json").read_text())
            return driver.qmp_command(VM, "query-status")["status"] == "running" and \
                driver.agent_command(VM, "guest-fsfreeze-status") == "thawed" and \
                set(vm["disks"]) == set(self.disks)
        except (ComputeError, OSError, KeyError, ValueError):
            return False

    def sh(self, command: str, timeout: float = 60) -> str:
        result = self.driver.guest_exec(VM, command, timeout=timeout)
        assert result.exit_code == 0, result
        return result.stdout.decode()


@pytest.fixture(scope="module")
def main(demo_image: DemoImage, run_root: Path, make_disk: MakeDisk) -> Iterator[Main]:
    """A VM with a system disk and two blank data disks, one of them 20 GiB (thin)."""
    disks = {SYS: make_disk(SYS, "1G", demo_image.rootfs_path),
             D1: make_disk(D1, "20G"), D2: make_disk(D2, "1G")}
    shared = Main(QemuDriver(run_root, accel="auto"), disks, demo_image)
    try:
        shared.boot()
        yield shared
    finally:
        shared.driver.stop(VM, force=True)


@pytest.fixture
def vm(main: Main) -> Main:
    """The shared VM, as booted: booted again if the previous test left it stopped,
    paused, frozen, without its agent or with another disk."""
    if not main.pristine():
        logging.getLogger("ecsnap.tests").warning("%s: not as booted; booting it again", VM)
        main.boot()
    return main


def agent_off(vm: Main) -> None:
    """Stop the guest agent and keep it down (init does not restart it while the flag
    exists; /run is a tmpfs: the next boot has it again)."""
    vm.sh("touch /run/ecsnap-agent-off; (sleep 1; killall qemu-ga) >/dev/null 2>&1 &")
    deadline = time.monotonic() + 30
    while vm.driver.guest_ping(VM, timeout=1):
        assert time.monotonic() < deadline, "the agent did not stop"
        time.sleep(0.5)


def test_driver_satisfies_the_protocol(tmp_path: Path) -> None:
    driver: ComputeDriver = QemuDriver(tmp_path / "run")  # mypy checks the Protocol
    assert driver.running() == []  # a run root of its own: no VM
    state = driver.state("i-none")
    assert (state.instance_id, state.running, state.pid) == ("i-none", False, None)
    assert not driver.has_disk_snapshot("i-none", SYS, "s-x")
    assert not driver.guest_ping("i-none", timeout=0.5)
    driver.resume_guest("i-none")  # nothing to resume: no error
    driver.stop("i-none")  # nothing to stop: no error
    with pytest.raises(ComputeError):
        driver.guest_exec("i-none", "true")


def test_boot_agent_and_data_disks(vm: Main, monkeypatch: pytest.MonkeyPatch) -> None:
    state = vm.driver.state(VM)
    assert state.running and state.pid and state.accelerator in ("kvm", "tcg")
    assert VM in vm.driver.running()
    mounts = vm.sh("cat /proc/mounts")
    assert f" /mnt/{D1} ext4 " in mounts and f" /mnt/{D2} ext4 " in mounts
    size = vm.sh(f"df -k /mnt/{D1} | tail -1").split()[1]
    assert int(size) > 19 * 1024 * 1024  # the 20 GiB disk, formatted at boot
    vm.sh(f"echo root-marker > /root/m && echo d1-marker > /mnt/{D1}/m && "
            f"echo d2-marker > /mnt/{D2}/m && sync")
    assert vm.sh(f"cat /root/m /mnt/{D1}/m /mnt/{D2}/m").split() == \
        ["root-marker", "d1-marker", "d2-marker"]
    failed = vm.driver.guest_exec(VM, "echo out; echo oops >&2; exit 3")
    assert (failed.exit_code, failed.stdout, failed.stderr) == (3, b"out\n", b"oops\n")
    assert not failed.timed_out and not failed.truncated
    assert vm.sh("pwd").strip() == "/root"
    assert vm.driver.guest_exec(VM, "pwd", working_dir="/tmp").stdout == b"/tmp\n"
    monkeypatch.setattr(qemu_guest, "OUTPUT_CAP", 64 * 1024)  # 1 MiB is slow to move under TCG
    big = vm.driver.guest_exec(VM, "head -c 100000 /dev/zero | tr '\\0' x")
    assert big.exit_code == 0 and big.truncated and big.stdout == b"x" * (64 * 1024)


def test_command_past_its_timeout_is_killed(vm: Main) -> None:
    slow = vm.driver.guest_exec(VM, "sleep 40 & sleep 41; echo never", timeout=2)
    assert slow.timed_out and slow.exit_code is None and b"never" not in slow.stdout
    # the whole process group went, the background sleep too
    assert "sleep 4" not in vm.sh("ps -o args | grep -v grep | grep 'sleep 4' || true")


def test_concurrent_callers_share_the_sockets(vm: Main) -> None:
    results: dict[int, bytes] = {}

    def run(n: int) -> None:
        results[n] = vm.driver.guest_exec(VM, f"echo caller-{n}").stdout

    threads = [threading.Thread(target=run, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == {n: f"caller-{n}\n".encode() for n in range(4)}

    async def from_an_event_loop() -> bool:  # e.g. a web server's thread
        return vm.driver.guest_ping(VM)

    assert asyncio.run(from_an_event_loop())


def test_live_snapshot_with_quiesce(vm: Main) -> None:
    result = vm.driver.snapshot_disks(VM, [(d, "s-live") for d in vm.disks])
    assert result.consistency == "FileSystemConsistent" and result.method == "fsfreeze"
    assert result.window_ms > 0
    for disk in vm.disks.values():
        assert "s-live" in snapshots_in(disk.path)
        assert vm.driver.has_disk_snapshot(VM, disk.disk_id, "s-live")
    assert not vm.driver.has_disk_snapshot(VM, SYS, "s-none")
    with AgentSession(str(vm.driver.run_root / VM / "qga.sock"), VM) as agent:
        assert agent.call("guest-fsfreeze-status") == "thawed"
    assert vm.sh(f"echo writable > /mnt/{D1}/w && cat /mnt/{D1}/w") == "writable\n"


def test_snapshot_timing_observer_and_direct_access(vm: Main) -> None:
    timings: list[LiveSnapshotTiming] = []
    # a second controller of the same VMs, with an observer
    driver = QemuDriver(vm.driver.run_root, snapshot_observer=timings.append)
    result = driver.snapshot_disks(VM, [(SYS, "s-timed"), (D1, "s-timed")])
    [timing] = timings
    assert (timing.instance_id, timing.disks, timing.method, timing.window_ms) == \
        (VM, 2, result.method, result.window_ms) and result.method == "fsfreeze"
    assert [c.command for c in timing.commands] == [
        "guest-fsfreeze-status", "guest-fsfreeze-freeze", "transaction",
        "guest-fsfreeze-thaw", "guest-fsfreeze-status"]
    assert all(c.ms > 0 for c in timing.commands)
    assert 0 < timing.transaction_ms < timing.window_ms
    assert timing.total_ms("guest-fsfreeze-freeze", "transaction") < timing.window_ms
    for disk_id in (SYS, D1):
        driver.delete_disk_snapshot(VM, disk_id, "s-timed")
    assert timings == [timing]  # deleting is not observed

    assert driver.pid(VM) == vm.driver.state(VM).pid and driver.pid("i-none") is None
    assert driver.qmp_command(VM, "query-status")["status"] == "running"
    with pytest.raises(QmpCommandError):
        driver.qmp_command(VM, "no-such-command")
    assert driver.agent_command(VM, "guest-fsfreeze-status") == "thawed"
    with driver.borrow_qmp_socket(VM) as path:
        assert path == str(vm.driver.run_root / VM / "qmp.sock")
        assert not vm.driver.guest_ping(VM, timeout=0.5)  # the instance is lent out
        with QmpSession(path, VM) as qmp:
            assert qmp.cmd("query-status")["running"]
    assert vm.driver.guest_ping(VM)


def test_snapshot_transaction_is_all_or_nothing(vm: Main) -> None:
    vm.driver.snapshot_disks(VM, [(D2, "s-clash")])
    with pytest.raises(ComputeError, match="already exists"):
        vm.driver.snapshot_disks(VM, [(SYS, "s-clash"), (D1, "s-clash"), (D2, "s-clash")])
    assert "s-clash" not in snapshots_in(vm.disks[SYS].path)
    assert "s-clash" not in snapshots_in(vm.disks[D1].path)
    vm.driver.delete_disk_snapshot(VM, D2, "s-clash")
    vm.driver.delete_disk_snapshot(VM, D2, "s-clash")  # already gone: no error
    assert "s-clash" not in snapshots_in(vm.disks[D2].path)
    with AgentSession(str(vm.driver.run_root / VM / "qga.sock"), VM) as agent:
        assert agent.call("guest-fsfreeze-status") == "thawed"


def test_resume_guest_after_an_interrupted_snapshot(vm: Main) -> None:
    """What recovery does after a crash between freeze (or pause) and thaw (or cont)."""
    run = vm.driver.run_root / VM
    with AgentSession(str(run / "qga.sock"), VM) as agent:
        assert agent.call("guest-fsfreeze-freeze") >= 3  # /, /mnt/<d1>, /mnt/<d2>
    with QmpSession(str(run / "qmp.sock"), VM) as qmp:
        qmp.cmd("stop")
    vm.driver.resume_guest(VM)
    with QmpSession(str(run / "qmp.sock"), VM) as qmp:
        assert qmp.cmd("query-status")["status"] == "running"
    with AgentSession(str(run / "qga.sock"), VM) as agent:
        assert agent.call("guest-fsfreeze-status") == "thawed"
    vm.driver.resume_guest(VM)  # nothing to do: no change
    assert vm.sh("echo ok > /root/after-resume && cat /root/after-resume") == "ok\n"


def test_hot_attach_and_detach(vm: Main, make_disk: MakeDisk) -> None:
    extra = make_disk(D3, "2G")
    vm.driver.attach_disk(VM, extra)  # returns once the guest mounted it
    assert f" /mnt/{D3} ext4 " in vm.sh("cat /proc/mounts")
    vm.sh(f"echo hot > /mnt/{D3}/m && sync")
    vm.driver.attach_disk(VM, extra)  # attaching again changes nothing
    vm.driver.detach_disk(VM, D3)
    assert f"/mnt/{D3}" not in vm.sh("cat /proc/mounts")
    assert vm.sh("ls /sys/block").split() == ["vda", "vdb", "vdc"]
    recorded = json.loads((vm.driver.run_root / VM / "vm.json").read_text())
    assert D3 not in recorded["disks"]
    with pytest.raises(ComputeError):
        vm.driver.detach_disk(VM, SYS)


def console_until(sock: socket.socket, wanted: bytes, send: bytes = b"",
                  timeout: float = 30) -> bytes:
    """Send, then read the console until `wanted` shows up."""
    if send:
        sock.sendall(send)
    seen, deadline = b"", time.monotonic() + timeout
    while wanted not in seen:
        assert time.monotonic() < deadline, f"no {wanted!r} on the console: {seen[-400:]!r}"
        with contextlib.suppress(TimeoutError):
            seen += sock.recv(4096)
    return seen


def test_serial_console_login(vm: Main) -> None:
    path = vm.driver.serial_socket(VM)
    assert path == vm.driver.state(VM).extra["serial_socket"]
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)
        sock.settimeout(0.5)
        console_until(sock, b"login:", b"\n")
        console_until(sock, b"root@ecsnap:~# ", b"root\n")
        console_until(sock, b"hello-42", b"echo hello-$((6*7))\n")
        console_until(sock, b"logged-2", b"echo logged-$((1+1)); exit\n")
    assert b"hello-42" in (vm.driver.run_root / VM / "serial.log").read_bytes()


def test_snapshot_without_agent_pauses_the_vm(vm: Main) -> None:
    agent_off(vm)
    result = vm.driver.snapshot_disks(VM, [(d, "s-paused") for d in vm.disks])
    assert result.consistency == "CrashConsistent" and result.method == "pause"
    assert result.window_ms > 0
    for disk in vm.disks.values():
        assert "s-paused" in snapshots_in(disk.path)
    with QmpSession(str(vm.driver.run_root / VM / "qmp.sock"), VM) as qmp:
        assert qmp.cmd("query-status")["status"] == "running"  # resumed


def test_graceful_stop_without_agent_presses_the_power_button(
        vm: Main, caplog: pytest.LogCaptureFixture) -> None:
    agent_off(vm)
    pid = vm.driver.state(VM).pid
    assert pid and not vm.driver.guest_ping(VM, timeout=1)
    caplog.set_level(logging.INFO, logger="ecsnap.compute.qemu")
    vm.driver.stop(VM, timeout=60)
    said = [r.getMessage() for r in caplog.records if r.name == "ecsnap.compute.qemu"]
    # the guest powered off (acpid): QEMU was not quit after the timeout
    assert any(f"VM {VM} shut down through the ACPI power button" in m for m in said), said
    assert not any("quitting QEMU" in m or "stopped (" in m for m in said), said
    assert not alive(pid) and not vm.driver.state(VM).running
    assert not (vm.driver.run_root / VM / "qmp.sock").exists()
    assert b"reboot: Power down" in (vm.driver.run_root / VM / "serial.log").read_bytes()
    vm.driver.stop(VM)  # stopping a stopped VM is no error


CONTROLLER = """
import os, signal, sys
from pathlib import Path
from ecsnap.adapters.compute.base import VmDisk, VmSpec
from ecsnap.adapters.compute.qemu import QemuDriver
run_root, kernel, initrd, args, disk_id, path = sys.argv[1:7]
driver = QemuDriver(Path(run_root), accel="auto")
driver.start(VmSpec("i-survivor", 1, 256, [VmDisk(disk_id, path, True)], "direct",
                    kernel, initrd, args))
os.kill(os.getpid(), signal.SIGKILL)  # the controller dies; the VM must not
"""


def test_vm_outlives_its_controller(demo_image: DemoImage, run_root: Path,
                                    make_disk: MakeDisk,
                                    caplog: pytest.LogCaptureFixture) -> None:
    system = make_disk("d-survivorsys0000000", "1G", demo_image.rootfs_path)
    proc = subprocess.run([sys.executable, "-c", CONTROLLER, str(run_root),
                           str(demo_image.kernel_path), str(demo_image.initrd_path),
                           demo_image.kernel_args, system.disk_id, system.path],
                          timeout=120, env=os.environ.copy())
    assert proc.returncode == -9
    driver = QemuDriver(run_root)  # a new controller
    try:
        assert "i-survivor" in driver.running()
        wait_agent(driver, "i-survivor")
        assert driver.guest_exec("i-survivor", "echo alive").stdout == b"alive\n"
        first_boot = boot_id(driver, "i-survivor")
        qemu_pid = driver.state("i-survivor").pid
        driver.reboot("i-survivor", force=True)  # QMP system_reset; QEMU stays
        deadline = time.monotonic() + BOOT_TIMEOUT
        while True:  # the agent of the old boot may answer for a moment
            wait_agent(driver, "i-survivor")
            now = boot_id(driver, "i-survivor")
            if now != first_boot:
                break
            assert time.monotonic() < deadline, "the guest did not boot again"
            time.sleep(1)
        assert driver.state("i-survivor").pid == qemu_pid  # the same QEMU
        pid = driver.state("i-survivor").pid
        caplog.set_level(logging.INFO, logger="ecsnap.compute.qemu")
        driver.stop("i-survivor", timeout=60)  # through the guest agent
        said = [r.getMessage() for r in caplog.records if r.name == "ecsnap.compute.qemu"]
        assert any("VM i-survivor shut down through the guest agent" in m for m in said), said
        assert pid and not alive(pid)
        assert "i-survivor" not in driver.running()
    finally:
        driver.stop("i-survivor", force=True)


def boot_id(driver: QemuDriver, instance_id: str) -> str:
    """The guest kernel's random ID of the current boot (new at every boot)."""
    result = driver.guest_exec(instance_id, "cat /proc/sys/kernel/random/boot_id")
    assert result.exit_code == 0, result
    value = result.stdout.decode().strip()
    assert len(value) == 36, value
    return value


def test_force_stop_quits_at_once(demo_image: DemoImage, run_root: Path,
                                  make_disk: MakeDisk,
                                  caplog: pytest.LogCaptureFixture) -> None:
    driver = QemuDriver(run_root)
    system = make_disk("d-forcesys0000000000", "1G", demo_image.rootfs_path)
    driver.start(spec_for(demo_image, "i-force", [system]))
    pid = driver.state("i-force").pid
    assert pid
    caplog.set_level(logging.INFO, logger="ecsnap.compute.qemu")
    driver.stop("i-force", force=True)
    said = [r.getMessage() for r in caplog.records if r.name == "ecsnap.compute.qemu"]
    assert any("VM i-force stopped (forced)" in m for m in said), said  # quit, no shutdown
    assert not any("shut down through" in m or "power button" in m for m in said), said
    assert not alive(pid) and "i-force" not in driver.running()
    assert not (run_root / "i-force" / "qemu.pid").exists()


def test_accelerator_probe_is_logged_and_cached(demo_image: DemoImage, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    spec = spec_for(demo_image, "i-probe", [])
    caplog.set_level(logging.INFO, logger="ecsnap.compute.qemu")
    verdict = QemuDriver(tmp_path / "run", accel="auto").accelerator(spec)
    assert verdict in ("kvm", "tcg")
    said = [r.getMessage() for r in caplog.records if "accelerator:" in r.getMessage()]
    assert said and ("KVM" if verdict == "kvm" else "TCG (software emulation)") in said[0]
    cached = json.loads((tmp_path / "run" / "accel.json").read_text())
    assert cached["accel"] == verdict and cached["reason"] and cached["qemu"].startswith("QEMU")
    caplog.clear()
    assert QemuDriver(tmp_path / "run", accel="auto").accelerator(spec) == verdict
    said = [r.getMessage() for r in caplog.records if "accelerator:" in r.getMessage()]
    assert said and all("cached" in m for m in said), said  # no second probe
    assert not any("probing KVM" in r.getMessage() for r in caplog.records)
    assert QemuDriver(tmp_path / "run", accel="tcg").accelerator(spec) == "tcg"
