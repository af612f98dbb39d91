"""The QEMU driver on real VMs of the demo guest (TCG on hosts without a working KVM):
the agent, live snapshots (file-system consistent, atomic, pause fallback), hot plug, the
serial console, stop (agent, ACPI, force), a VM outliving its controller, the
accelerator probe. No test doubles. One VM serves most tests, in file order."""

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
    def __init__(self, driver: QemuDriver, disks: dict[str, VmDisk], boot_s: float) -> None:
        self.driver = driver
        self.disks = disks
        self.boot_s = boot_s

    def sh(self, command: str, timeout: float = 60) -> str:
        result = self.driver.guest_exec(VM, command, timeout=timeout)
        assert result.exit_code == 0, result
        return result.stdout.decode()


@pytest.fixture(scope="module")
def main(demo_image: DemoImage, run_root: Path, make_disk: MakeDisk) -> Iterator[Main]:
    """A VM with a system disk and two blank data disks, one of them 20 GiB (thin)."""
    disks = {SYS: make_disk(SYS, "1G", demo_image.rootfs_path),
             D1: make_disk(D1, "20G"), D2: make_disk(D2, "1G")}
    driver = QemuDriver(run_root, accel="auto")
    started = time.monotonic()
    driver.start(spec_for(demo_image, VM, list(disks.values())))
    try:
        wait_agent(driver, VM)
        boot_s = time.monotonic() - started
        logging.getLogger("ecsnap.tests").warning("%s: agent answered %.1f s after start",
                                                   VM, boot_s)
        yield Main(driver, disks, boot_s)
    finally:
        driver.stop(VM, force=True)


def test_driver_satisfies_the_protocol(run_root: Path) -> None:
    driver: ComputeDriver = QemuDriver(run_root)
    assert driver.running() is not None


def test_boot_agent_and_data_disks(main: Main, monkeypatch: pytest.MonkeyPatch) -> None:
    assert main.boot_s < BOOT_TIMEOUT
    state = main.driver.state(VM)
    assert state.running and state.pid and state.accelerator in ("kvm", "tcg")
    assert VM in main.driver.running()
    mounts = main.sh("cat /proc/mounts")
    assert f" /mnt/{D1} ext4 " in mounts and f" /mnt/{D2} ext4 " in mounts
    size = main.sh(f"df -k /mnt/{D1} | tail -1").split()[1]
    assert int(size) > 19 * 1024 * 1024  # the 20 GiB disk, formatted at boot
    main.sh(f"echo root-marker > /root/m && echo d1-marker > /mnt/{D1}/m && "
            f"echo d2-marker > /mnt/{D2}/m && sync")
    assert main.sh(f"cat /root/m /mnt/{D1}/m /mnt/{D2}/m").split() == \
        ["root-marker", "d1-marker", "d2-marker"]
    failed = main.driver.guest_exec(VM, "echo out; echo oops >&2; exit 3")
    assert (failed.exit_code, failed.stdout, failed.stderr) == (3, b"out\n", b"oops\n")
    assert not failed.timed_out and not failed.truncated
    assert main.sh("pwd").strip() == "/root"
    assert main.driver.guest_exec(VM, "pwd", working_dir="/tmp").stdout == b"/tmp\n"
    monkeypatch.setattr(qemu_guest, "OUTPUT_CAP", 64 * 1024)  # 1 MiB is slow to move under TCG
    big = main.driver.guest_exec(VM, "head -c 100000 /dev/zero | tr '\\0' x")
    assert big.exit_code == 0 and big.truncated and big.stdout == b"x" * (64 * 1024)


def test_command_past_its_timeout_is_killed(main: Main) -> None:
    started = time.monotonic()
    slow = main.driver.guest_exec(VM, "sleep 40 & sleep 41; echo never", timeout=2)
    assert slow.timed_out and slow.exit_code is None and b"never" not in slow.stdout
    assert time.monotonic() - started < 10
    # the whole process group went, the background sleep too
    assert "sleep 4" not in main.sh("ps -o args | grep -v grep | grep 'sleep 4' || true")


def test_concurrent_callers_share_the_sockets(main: Main) -> None:
    results: dict[int, bytes] = {}

    def run(n: int) -> None:
        results[n] = main.driver.guest_exec(VM, f"echo caller-{n}").stdout

    threads = [threading.Thread(target=run, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == {n: f"caller-{n}\n".encode() for n in range(4)}

    async def from_an_event_loop() -> bool:  # e.g. a web server's thread
        return main.driver.guest_ping(VM)

    assert asyncio.run(from_an_event_loop())


def test_live_snapshot_with_quiesce(main: Main) -> None:
    result = main.driver.snapshot_disks(VM, [(d, "s-live") for d in main.disks])
    assert result.consistency == "FileSystemConsistent" and result.method == "fsfreeze"
    assert 0 < result.window_ms < 10_000
    for disk in main.disks.values():
        assert "s-live" in snapshots_in(disk.path)
        assert main.driver.has_disk_snapshot(VM, disk.disk_id, "s-live")
    assert not main.driver.has_disk_snapshot(VM, SYS, "s-none")
    with AgentSession(str(main.driver.run_root / VM / "qga.sock"), VM) as agent:
        assert agent.call("guest-fsfreeze-status") == "thawed"
    assert main.sh(f"echo writable > /mnt/{D1}/w && cat /mnt/{D1}/w") == "writable\n"


def test_snapshot_timing_observer_and_direct_access(main: Main) -> None:
    timings: list[LiveSnapshotTiming] = []
    # a second controller of the same VMs, with an observer
    driver = QemuDriver(main.driver.run_root, snapshot_observer=timings.append)
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

    assert driver.pid(VM) == main.driver.state(VM).pid and driver.pid("i-none") is None
    assert driver.qmp_command(VM, "query-status")["status"] == "running"
    with pytest.raises(QmpCommandError):
        driver.qmp_command(VM, "no-such-command")
    assert driver.agent_command(VM, "guest-fsfreeze-status") == "thawed"
    with driver.borrow_qmp_socket(VM) as path:
        assert path == str(main.driver.run_root / VM / "qmp.sock")
        assert not main.driver.guest_ping(VM, timeout=0.5)  # the instance is lent out
        with QmpSession(path, VM) as qmp:
            assert qmp.cmd("query-status")["running"]
    assert main.driver.guest_ping(VM)


def test_snapshot_transaction_is_all_or_nothing(main: Main) -> None:
    main.driver.snapshot_disks(VM, [(D2, "s-clash")])
    with pytest.raises(ComputeError, match="already exists"):
        main.driver.snapshot_disks(VM, [(SYS, "s-clash"), (D1, "s-clash"), (D2, "s-clash")])
    assert "s-clash" not in snapshots_in(main.disks[SYS].path)
    assert "s-clash" not in snapshots_in(main.disks[D1].path)
    main.driver.delete_disk_snapshot(VM, D2, "s-clash")
    main.driver.delete_disk_snapshot(VM, D2, "s-clash")  # already gone: no error
    assert "s-clash" not in snapshots_in(main.disks[D2].path)
    with AgentSession(str(main.driver.run_root / VM / "qga.sock"), VM) as agent:
        assert agent.call("guest-fsfreeze-status") == "thawed"


def test_resume_guest_after_an_interrupted_snapshot(main: Main) -> None:
    """What recovery does after a crash between freeze (or pause) and thaw (or cont)."""
    run = main.driver.run_root / VM
    with AgentSession(str(run / "qga.sock"), VM) as agent:
        assert agent.call("guest-fsfreeze-freeze") >= 3  # /, /mnt/<d1>, /mnt/<d2>
    with QmpSession(str(run / "qmp.sock"), VM) as qmp:
        qmp.cmd("stop")
    main.driver.resume_guest(VM)
    with QmpSession(str(run / "qmp.sock"), VM) as qmp:
        assert qmp.cmd("query-status")["status"] == "running"
    with AgentSession(str(run / "qga.sock"), VM) as agent:
        assert agent.call("guest-fsfreeze-status") == "thawed"
    main.driver.resume_guest(VM)  # nothing to do: no change
    assert main.sh("echo ok > /root/after-resume && cat /root/after-resume") == "ok\n"


def test_hot_attach_and_detach(main: Main, make_disk: MakeDisk) -> None:
    extra = make_disk(D3, "2G")
    main.driver.attach_disk(VM, extra)  # returns once the guest mounted it
    assert f" /mnt/{D3} ext4 " in main.sh("cat /proc/mounts")
    main.sh(f"echo hot > /mnt/{D3}/m && sync")
    main.driver.attach_disk(VM, extra)  # attaching again changes nothing
    main.driver.detach_disk(VM, D3)
    assert f"/mnt/{D3}" not in main.sh("cat /proc/mounts")
    assert main.sh("ls /sys/block").split() == ["vda", "vdb", "vdc"]
    vm = json.loads((main.driver.run_root / VM / "vm.json").read_text())
    assert D3 not in vm["disks"]
    with pytest.raises(ComputeError):
        main.driver.detach_disk(VM, SYS)


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


def test_serial_console_login(main: Main) -> None:
    path = main.driver.serial_socket(VM)
    assert path == main.driver.state(VM).extra["serial_socket"]
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)
        sock.settimeout(0.5)
        console_until(sock, b"login:", b"\n")
        console_until(sock, b"root@ecsnap:~# ", b"root\n")
        console_until(sock, b"hello-42", b"echo hello-$((6*7))\n")
        console_until(sock, b"logged-2", b"echo logged-$((1+1)); exit\n")
    assert b"hello-42" in (main.driver.run_root / VM / "serial.log").read_bytes()


def test_snapshot_without_agent_pauses_the_vm(main: Main) -> None:
    # keep the agent down: init does not restart it while the flag exists
    main.sh("touch /run/ecsnap-agent-off; (sleep 1; killall qemu-ga) >/dev/null 2>&1 &")
    deadline = time.monotonic() + 20
    while main.driver.guest_ping(VM, timeout=1):
        assert time.monotonic() < deadline, "the agent did not stop"
        time.sleep(0.5)
    result = main.driver.snapshot_disks(VM, [(d, "s-paused") for d in main.disks])
    assert result.consistency == "CrashConsistent" and result.method == "pause"
    assert result.window_ms > 0
    for disk in main.disks.values():
        assert "s-paused" in snapshots_in(disk.path)
    with QmpSession(str(main.driver.run_root / VM / "qmp.sock"), VM) as qmp:
        assert qmp.cmd("query-status")["status"] == "running"  # resumed


def test_graceful_stop_without_agent_presses_the_power_button(main: Main) -> None:
    pid = main.driver.state(VM).pid
    assert pid and not main.driver.guest_ping(VM, timeout=1)
    started = time.monotonic()
    main.driver.stop(VM, timeout=30)
    assert time.monotonic() - started < 20  # the guest powered off (acpid), no quit
    assert not alive(pid) and not main.driver.state(VM).running
    assert not (main.driver.run_root / VM / "qmp.sock").exists()
    assert b"reboot: Power down" in (main.driver.run_root / VM / "serial.log").read_bytes()
    main.driver.stop(VM)  # stopping a stopped VM is no error


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
                                    make_disk: MakeDisk) -> None:
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
        driver.reboot("i-survivor", force=True)  # QMP system_reset; QEMU stays
        time.sleep(1)
        wait_agent(driver, "i-survivor")
        uptime = float(driver.guest_exec("i-survivor", "cut -d' ' -f1 /proc/uptime").stdout)
        assert uptime < BOOT_TIMEOUT
        pid = driver.state("i-survivor").pid
        started = time.monotonic()
        driver.stop("i-survivor")  # through the guest agent
        assert time.monotonic() - started < 15
        assert pid and not alive(pid)
        assert "i-survivor" not in driver.running()
    finally:
        driver.stop("i-survivor", force=True)


def test_force_stop_quits_at_once(demo_image: DemoImage, run_root: Path,
                                  make_disk: MakeDisk) -> None:
    driver = QemuDriver(run_root)
    system = make_disk("d-forcesys0000000000", "1G", demo_image.rootfs_path)
    driver.start(spec_for(demo_image, "i-force", [system]))
    pid = driver.state("i-force").pid
    assert pid
    started = time.monotonic()
    driver.stop("i-force", force=True)
    assert time.monotonic() - started < 5
    assert not alive(pid) and "i-force" not in driver.running()
    assert not (run_root / "i-force" / "qemu.pid").exists()


def test_accelerator_probe_is_logged_and_cached(demo_image: DemoImage, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    spec = spec_for(demo_image, "i-probe", [])
    caplog.set_level(logging.INFO, logger="ecsnap.compute.qemu")
    started = time.monotonic()
    verdict = QemuDriver(tmp_path / "run", accel="auto").accelerator(spec)
    assert time.monotonic() - started < 15  # the probe is bounded
    assert verdict in ("kvm", "tcg")
    said = [r.getMessage() for r in caplog.records if "accelerator:" in r.getMessage()]
    assert said and ("KVM" if verdict == "kvm" else "TCG (software emulation)") in said[0]
    cached = json.loads((tmp_path / "run" / "accel.json").read_text())
    assert cached["accel"] == verdict and cached["reason"] and cached["qemu"].startswith("QEMU")
    caplog.clear()
    started = time.monotonic()
    assert QemuDriver(tmp_path / "run", accel="auto").accelerator(spec) == verdict
    assert time.monotonic() - started < 2  # no second probe
    assert any("cached" in r.getMessage() for r in caplog.records)
    assert QemuDriver(tmp_path / "run", accel="tcg").accelerator(spec) == "tcg"
