"""Start, stop and reboot VMs; their state.

QEMU runs with -daemonize in its own session: ecsnap can exit, restart or be killed and
the VMs keep running (rundir.py finds them again). The system disk (first) sits on the
root complex; every data disk sits on its own PCIe root port, and a few free ports are
added, so data disks can be hot-plugged and unplugged (disks.py: how a disk appears).
Boot: `-kernel/-initrd/-append` when the spec says "direct", else firmware boot from the
system disk. No `-no-reboot`: a guest reboot (or `reboot()`) resets the VM and QEMU
keeps running; only a power-off ends the process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

from ecsnap.adapters.compute.base import ComputeError, VmSpec, VmState
from ecsnap.adapters.compute.qemu import disks
from ecsnap.adapters.compute.qemu.accel import Accelerator
from ecsnap.adapters.compute.qemu.rundir import RunDirs, pid_state, utc_timestamp
from ecsnap.filemodes import FILE_MODE

HOTPLUG_SPARE_PORTS = 8  # free PCIe root ports for disks attached while the VM runs
MAX_ROOT_PORTS = 26
SERIAL_LOG_ROTATE = 1024 * 1024


def _opt(value: str) -> str:
    """A value inside a QEMU key=value option string (commas doubled)."""
    return value.replace(",", ",,")


def _key_file(run: Path, secret: str, key: str) -> Path:
    """An owner-only file in the run directory holding a disk's cephx key (disks.py)."""
    path = run / f"{secret}.secret"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    with os.fdopen(fd, "w") as fh:
        fh.write(key)
    os.chmod(path, FILE_MODE)  # an older file keeps its mode through O_CREAT
    return path


def command_line(qemu: str, spec: VmSpec, accel: str, run: Path) -> list[str]:
    """The QEMU command line of the VM of `spec`, with its run directory `run`."""
    iid = spec.instance_id
    data = len(spec.disks) - 1
    ports = data + max(0, min(HOTPLUG_SPARE_PORTS, MAX_ROOT_PORTS - data))
    cmd = [qemu, "-name", f"ecsnap-{iid},process=ecsnap-{iid}",
           "-machine", f"q35,accel={accel}", "-cpu", "host" if accel == "kvm" else "max",
           "-m", str(spec.memory_mib), "-smp", str(spec.vcpus),
           "-nodefaults", "-no-user-config", "-display", "none", "-rtc", "base=utc",
           "-chardev", f"socket,id=con0,path={_opt(str(run / 'serial.sock'))},"
                       f"server=on,wait=off,logfile={_opt(str(run / 'serial.log'))},"
                       "logappend=on",
           "-serial", "chardev:con0",
           "-chardev", f"socket,id=qmp0,path={_opt(str(run / 'qmp.sock'))},"
                       "server=on,wait=off",
           "-mon", "chardev=qmp0,mode=control",
           "-chardev", f"socket,id=qga0,path={_opt(str(run / 'qga.sock'))},"
                       "server=on,wait=off",
           "-device", "virtio-serial-pci,id=vser0",
           "-device", "virtserialport,bus=vser0.0,chardev=qga0,"
                      "name=org.qemu.guest_agent.0"]
    for n in range(1, ports + 1):
        cmd += ["-device", f"pcie-root-port,id=rp{n},chassis={n},slot={n}"]
    direct = spec.boot_mode == "direct"
    for n, disk in enumerate(spec.disks):
        node, location = disks.checked(disk)
        for secret, key in disks.secrets(node, location):  # a cephx key, from a file
            cmd += ["-object", f"secret,id={secret},format=base64,"
                               f"file={_opt(str(_key_file(run, secret, key)))}"]
        for blockdev in disks.nodes(node, location):
            cmd += ["-blockdev", json.dumps(blockdev)]
        cmd += ["-device", json.dumps(disks.device(node, f"rp{n}" if n else None,
                                                   None if direct or n else 1))]
    if direct:
        if not spec.kernel_path:
            raise ComputeError(f"{iid}: direct boot needs a kernel")
        for what in (spec.kernel_path, spec.initrd_path):
            if what and not Path(what).is_file():
                raise ComputeError(f"{iid}: no file at {what}")
        cmd += ["-kernel", str(Path(spec.kernel_path).resolve())]
        if spec.initrd_path:
            cmd += ["-initrd", str(Path(spec.initrd_path).resolve())]
        cmd += ["-append", spec.kernel_args]
    cmd += ["-D", str(run / "qemu.log"), "-daemonize", "-pidfile", str(run / "qemu.pid")]
    return cmd


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if pid_state(pid) in (None, "Z", "X"):
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)  # in case it is our child
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


class QemuLifecycle:
    """VmLifecycle on detached QEMU processes."""

    def __init__(self, dirs: RunDirs, accelerator: Accelerator, qemu_binary: str,
                 log: logging.Logger) -> None:
        self.dirs = dirs
        self.accelerator = accelerator
        self.qemu = qemu_binary
        self.log = log

    def serial_socket(self, instance_id: str) -> str:
        return str(self.dirs.dir(instance_id) / "serial.sock")

    def state(self, instance_id: str) -> VmState:
        pid = self.dirs.pid(instance_id)
        vm = self.dirs.vm(instance_id)
        run = self.dirs.dir(instance_id)
        extra = {"run_dir": str(run), "serial_socket": str(run / "serial.sock"),
                 "serial_log": str(run / "serial.log"), "qemu_log": str(run / "qemu.log")}
        for key in ("started_at", "accel_reason"):
            if vm.get(key):
                extra[key] = str(vm[key])
        return VmState(instance_id, pid is not None, pid,
                       str(vm.get("accel", "")) if pid is not None else "", extra)

    def running(self) -> list[str]:
        return self.dirs.running()

    # ------------------------------------------------------------ start

    def start(self, spec: VmSpec) -> None:
        iid = spec.instance_id
        run = self.dirs.dir(iid)
        if not spec.disks:
            raise ComputeError(f"{iid}: a VM needs a system disk")
        if len(str(run / "serial.sock")) > 107:
            raise ComputeError(f"run directory {run} is too deep for unix socket paths")
        with self.dirs.exclusive(iid):
            if (pid := self.dirs.pid(iid)) is not None:
                self.log.info("VM %s is already running (pid %d)", iid, pid)
                return
            accel = self.accelerator.choose(spec)
            self.dirs.remove_sockets(iid)
            serial_log = run / "serial.log"
            if serial_log.exists() and serial_log.stat().st_size > SERIAL_LOG_ROTATE:
                os.replace(serial_log, run / "serial.log.1")
            cmd = command_line(self.qemu, spec, accel, run)
            self.dirs.save_vm(iid, {
                "instance_id": iid, "accel": accel, "accel_reason": self.accelerator.reason(),
                "vcpus": spec.vcpus, "memory_mib": spec.memory_mib,
                "boot_mode": spec.boot_mode,
                "disks": dict(disks.checked(d) for d in spec.disks),
                "system_disk": spec.disks[0].disk_id, "started_at": utc_timestamp()})
            started = time.monotonic()
            try:
                proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                                      start_new_session=True, timeout=120)
                output = (proc.stdout + proc.stderr).decode(errors="replace")
                failed = proc.returncode != 0
            except (OSError, subprocess.TimeoutExpired) as exc:
                output, failed = str(exc), True
            (run / "start.log").write_text(f"{utc_timestamp()}\n{shlex.join(cmd)}\n{output}")
            pid = self.dirs.pid(iid)
            if failed or pid is None:
                raise ComputeError(f"QEMU did not start for {iid}: "
                                   f"{output.strip()[-1500:] or 'no output'}")
            self.log.info("VM %s started: pid %d, %s, %d vCPU, %d MiB, %d disk(s), %s boot, "
                          "in %.2f s", iid, pid, accel.upper(), spec.vcpus, spec.memory_mib,
                          len(spec.disks), spec.boot_mode, time.monotonic() - started)

    # ------------------------------------------------------------ stop, reboot

    def _shutdown_request(self, instance_id: str, mode: str) -> bool:
        """Ask the guest agent to power off (or reboot); False if it does not answer."""
        try:
            with self.dirs.exclusive(instance_id, 10), \
                    self.dirs.agent(instance_id, 2.0) as agent:
                agent.send_only("guest-shutdown", {"mode": mode})
            return True
        except ComputeError as exc:
            self.log.info("VM %s: no guest agent for a %s (%s)", instance_id, mode, exc)
            return False

    def _acpi_powerdown(self, instance_id: str) -> bool:
        try:
            with self.dirs.exclusive(instance_id, 10), self.dirs.qmp(instance_id) as qmp:
                qmp.cmd("system_powerdown")
            return True
        except ComputeError as exc:
            self.log.warning("VM %s: ACPI power button: %s", instance_id, exc)
            return False

    def stop(self, instance_id: str, *, force: bool = False, timeout: float = 30.0) -> None:
        pid = self.dirs.pid(instance_id)
        if pid is None:
            self.dirs.remove_sockets(instance_id)
            return
        started = time.monotonic()
        if not force:
            how = None
            if self._shutdown_request(instance_id, "powerdown"):
                how = "guest agent"
                # a guest that ignores its agent gets the power button half way through
                if not _wait_gone(pid, timeout / 2):
                    self.log.info("VM %s: still running %.0f s after the agent's shutdown; "
                                  "pressing the ACPI power button", instance_id, timeout / 2)
                    self._acpi_powerdown(instance_id)
            elif self._acpi_powerdown(instance_id):
                how = "ACPI power button"
            if how and _wait_gone(pid, max(0.0, timeout - (time.monotonic() - started))):
                self.log.info("VM %s shut down through the %s in %.1f s", instance_id, how,
                              time.monotonic() - started)
                self.dirs.remove_sockets(instance_id)
                return
            self.log.warning("VM %s did not shut down in %.0f s; quitting QEMU",
                             instance_id, timeout)
        self._quit(instance_id, pid)
        self.log.info("VM %s stopped (%s) in %.1f s", instance_id,
                      "forced" if force else "QEMU quit after the timeout",
                      time.monotonic() - started)

    def _quit(self, instance_id: str, pid: int) -> None:
        with contextlib.suppress(ComputeError), self.dirs.exclusive(instance_id, 5), \
                self.dirs.qmp(instance_id, timeout=3) as qmp, \
                contextlib.suppress(ComputeError):  # QEMU may hang up before it answers
            qmp.cmd("quit", timeout=3)
        if not _wait_gone(pid, 5):
            self.log.warning("VM %s: QEMU (pid %d) ignored quit; killing it", instance_id, pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if not _wait_gone(pid, 10):
                raise ComputeError(f"QEMU of {instance_id} (pid {pid}) survives SIGKILL")
        self.dirs.remove_sockets(instance_id)

    def reboot(self, instance_id: str, *, force: bool = False) -> None:
        self.dirs.require(instance_id)
        if not force:
            if self._shutdown_request(instance_id, "reboot"):
                self.log.info("VM %s: reboot requested through the guest agent", instance_id)
                return
            # no agent: Ctrl-Alt-Del on the PS/2 keyboard makes init reboot cleanly
            with self.dirs.exclusive(instance_id), self.dirs.qmp(instance_id) as qmp:
                qmp.cmd("send-key", {"keys": [{"type": "qcode", "data": key}
                                              for key in ("ctrl", "alt", "delete")]})
            self.log.info("VM %s: reboot requested with Ctrl-Alt-Del", instance_id)
            return
        with self.dirs.exclusive(instance_id), self.dirs.qmp(instance_id) as qmp:
            qmp.cmd("system_reset")
        self.log.info("VM %s: reset", instance_id)


__all__ = ["QemuLifecycle", "command_line"]
