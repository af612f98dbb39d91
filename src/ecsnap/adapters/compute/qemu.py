"""The QEMU driver: one detached QEMU process per running instance.

Run directory layout, `<run_root>/<instance id>/`:

    qemu.pid     QEMU's pidfile (-pidfile)
    qmp.sock     QMP (spoken through QEMU's `qemu.qmp` library, see qga.py)
    qga.sock     the guest agent's virtio-serial port org.qemu.guest_agent.0
    serial.sock  the serial console (ttyS0), a unix socket server for ONE client
    serial.log   everything the console printed (appended; rotated at 1 MiB at start)
    qemu.log     QEMU's own messages while it runs (-D; rewritten at each start)
    start.log    the command line of the last start and what QEMU printed while starting
    vm.json      the disks the VM has (kept up to date by attach/detach), its accelerator
    lock         serialises the QMP and agent sessions of the instance across processes

and `<run_root>/accel.json`, the cached accelerator verdict (`accel-probe.log`: the
console of the probe boot).

QEMU runs with -daemonize in its own session: ecsnap can exit, restart or be killed and
the VMs keep running; a new driver on the same run root finds them by their pidfiles
(checking that the pid is still a QEMU started for that instance) and controls them.

Disks: each is a `-blockdev` pair, a file node `f-<disk id>` under a qcow2 node named by
the disk ID (the name QMP snapshot commands use), on a virtio-blk-pci device
`dev-<disk id>`. Serial scheme: the device's `serial` is the disk ID without its "d-"
prefix (ecsnap disk IDs are "d-" and 20 characters; virtio-blk keeps 20 bytes of
serial); the demo guest mounts the disk at `/mnt/d-<serial>`, i.e. `/mnt/<disk id>`.
The system disk (first) sits on the root complex; every data disk sits on its own PCIe
root port, and a few free ports are added, so data disks can be hot-plugged and
unplugged. Boot: `-kernel/-initrd/-append` when the spec says "direct", else firmware
boot from the system disk. No `-no-reboot`: a guest reboot (or `reboot()`) resets the
VM and QEMU keeps running; only a power-off ends the process.

Accelerator: "kvm" or "tcg" as configured; "auto" uses KVM only if a probe boot of the
guest kernel under KVM gets to starting init within a few seconds (on some hosts
/dev/kvm exists but KVM guests hang). The verdict is cached in `<run_root>/accel.json`
per QEMU version and host kernel, and logged with its reason. A firmware-booted VM gives
no kernel to probe with: without a cached verdict it gets TCG.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ecsnap.adapters.compute.base import (
    ComputeError,
    ExecResult,
    GuestAgentUnavailable,
    LiveSnapshotResult,
    VmDisk,
    VmSpec,
    VmState,
)
from ecsnap.adapters.compute.filelock import flock_until
from ecsnap.adapters.compute.qga import AgentSession, QmpCommandError, QmpSession

OUTPUT_CAP = 1024 * 1024  # bytes of stdout and of stderr kept from guest_exec
HOTPLUG_SPARE_PORTS = 8  # free PCIe root ports for disks attached while the VM runs
MAX_ROOT_PORTS = 26
AGENT_QUIESCE_TIMEOUT = 2.0  # the agent must answer this fast, else pause instead
FREEZE_TIMEOUT = 20.0
PROBE_TIMEOUT = 8.0  # the KVM probe boot must get to init in this time
PROBE_STALL = 3.0  # ... and may not stay silent this long once it printed something
PROBE_MARKERS = (b"Freeing unused kernel", b"Run /init", b"Run /sbin/init",
                 b"VFS: Unable to mount root")
SERIAL_LOG_ROTATE = 1024 * 1024
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_NODE = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,29}$")


def disk_serial(disk_id: str) -> str:
    """The virtio-blk serial of a disk: its ID without "d-" (at most 20 bytes)."""
    return disk_id.removeprefix("d-")[:20]


def _checked(disk: VmDisk) -> tuple[str, str]:
    """(block node name, absolute file path) of a disk to attach, or ComputeError."""
    node = disk.disk_id
    if not _NODE.match(node):
        raise ComputeError(f"disk id {node!r} cannot name a QEMU block node")
    path = str(Path(disk.path).resolve())
    if not Path(path).is_file():
        raise ComputeError(f"disk {node}: no file at {path}")
    return node, path


def _opt(value: str) -> str:
    """A value inside a QEMU key=value option string (commas doubled)."""
    return value.replace(",", ",,")


def _pid_state(pid: int) -> str | None:
    """The process state letter of `pid`, None if there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class QemuDriver:
    """ComputeDriver on QEMU processes, see the module docstring."""

    def __init__(self, run_root: Path, *, accel: str = "auto",
                 qemu_binary: str = "qemu-system-x86_64",
                 log: logging.Logger | None = None) -> None:
        if accel not in ("auto", "kvm", "tcg"):
            raise ValueError(f"accel must be auto, kvm or tcg, not {accel!r}")
        self.run_root = Path(run_root).resolve()
        self.accel = accel
        self.qemu = qemu_binary
        self.log = log or logging.getLogger("ecsnap.compute.qemu")
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._accel_logged = False

    # ------------------------------------------------------------ run directories

    def _dir(self, instance_id: str) -> Path:
        if not _ID.match(instance_id):
            raise ComputeError(f"invalid instance id {instance_id!r}")
        return self.run_root / instance_id

    def serial_socket(self, instance_id: str) -> str:
        return str(self._dir(instance_id) / "serial.sock")

    def _pid(self, instance_id: str) -> int | None:
        """The pid of the instance's QEMU, if it is alive (and not a reused pid)."""
        try:
            pid = int((self._dir(instance_id) / "qemu.pid").read_text().strip())
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return None
        name = f"ecsnap-{instance_id}".encode()
        if b"qemu" not in os.path.basename(argv[0]) or \
                not any(a == name or a.startswith(name + b",") for a in argv):
            return None
        return pid if _pid_state(pid) not in (None, "Z", "X") else None

    def _vm(self, instance_id: str) -> dict[str, Any]:
        try:
            return dict(json.loads((self._dir(instance_id) / "vm.json").read_text()))
        except (OSError, ValueError):
            return {}

    def _save_vm(self, instance_id: str, vm: dict[str, Any]) -> None:
        path = self._dir(instance_id) / "vm.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(vm, indent=2) + "\n")
        os.replace(tmp, path)

    def state(self, instance_id: str) -> VmState:
        pid = self._pid(instance_id)
        vm = self._vm(instance_id)
        run = self._dir(instance_id)
        extra = {"run_dir": str(run), "serial_socket": str(run / "serial.sock"),
                 "serial_log": str(run / "serial.log"), "qemu_log": str(run / "qemu.log")}
        for key in ("started_at", "accel_reason"):
            if vm.get(key):
                extra[key] = str(vm[key])
        return VmState(instance_id, pid is not None, pid,
                       str(vm.get("accel", "")) if pid is not None else "", extra)

    def running(self) -> list[str]:
        if not self.run_root.is_dir():
            return []
        return sorted(d.name for d in self.run_root.iterdir()
                      if d.is_dir() and _ID.match(d.name) and self._pid(d.name) is not None)

    def _require(self, instance_id: str) -> int:
        pid = self._pid(instance_id)
        if pid is None:
            raise ComputeError(f"the VM of {instance_id} is not running")
        return pid

    # ------------------------------------------------------------ sessions

    @contextlib.contextmanager
    def _exclusive(self, instance_id: str, timeout: float = 60.0) -> Iterator[None]:
        """Serialise the QMP and agent sessions of an instance (each socket serves one
        client): a thread lock in this driver, a file lock across processes."""
        with self._locks_guard:
            lock = self._locks.setdefault(instance_id, threading.Lock())
        deadline = time.monotonic() + timeout
        if not lock.acquire(timeout=timeout):
            raise ComputeError(f"{instance_id} is busy (another operation holds it)")
        try:
            run = self._dir(instance_id)
            run.mkdir(parents=True, exist_ok=True)
            with open(run / "lock", "a") as handle:
                if not flock_until(handle, deadline, 0.05):
                    raise ComputeError(f"{instance_id} is busy (another process holds it)")
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
        finally:
            lock.release()

    def _qmp(self, instance_id: str, timeout: float = 10.0) -> QmpSession:
        self._require(instance_id)
        return QmpSession(str(self._dir(instance_id) / "qmp.sock"), instance_id, timeout)

    def _agent(self, instance_id: str, timeout: float) -> AgentSession:
        self._require(instance_id)
        return AgentSession(str(self._dir(instance_id) / "qga.sock"), instance_id, timeout,
                            sync_attempt=min(1.0, timeout))

    # ------------------------------------------------------------ accelerator

    def _host_key(self) -> dict[str, str]:
        try:
            out = subprocess.run([self.qemu, "--version"], capture_output=True, text=True,
                                 timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ComputeError(f"cannot run {self.qemu}: {exc}") from exc
        return {"qemu": out.splitlines()[0] if out else "unknown",
                "host_kernel": os.uname().release}

    def accelerator(self, spec: VmSpec | None = None) -> str:
        """The accelerator a VM gets: as configured, or for "auto" the cached verdict of
        the KVM probe (probing now with the spec's kernel when there is none)."""
        if self.accel != "auto":
            return self.accel
        cache = self.run_root / "accel.json"
        key = self._host_key()

        def cached() -> dict[str, Any] | None:
            with contextlib.suppress(OSError, ValueError):
                verdict = dict(json.loads(cache.read_text()))
                if all(verdict.get(k) == v for k, v in key.items()) and \
                        verdict.get("accel") in ("kvm", "tcg"):
                    return verdict
            return None

        verdict = cached()
        if verdict is None:
            if spec is None or spec.boot_mode != "direct" or not spec.kernel_path:
                self.log.warning("accelerator: TCG (software emulation) for now: KVM is "
                                 "unproven on this host and a firmware-booted VM gives no "
                                 "kernel to probe it with")
                return "tcg"
            self.run_root.mkdir(parents=True, exist_ok=True)
            with open(self.run_root / "accel.lock", "a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)  # one probe at a time, across processes
                try:
                    verdict = cached()
                    if verdict is None:
                        started = time.monotonic()
                        accel, reason = self._probe(spec)
                        verdict = {**key, "accel": accel, "reason": reason,
                                   "probe_seconds": round(time.monotonic() - started, 1),
                                   "probed_at": _now()}
                        tmp = cache.with_suffix(".tmp")
                        tmp.write_text(json.dumps(verdict, indent=2) + "\n")
                        os.replace(tmp, cache)
                        self._log_verdict(verdict, fresh=True)
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
        if not self._accel_logged:
            self._log_verdict(verdict, fresh=False)
        return str(verdict["accel"])

    def _log_verdict(self, verdict: dict[str, Any], fresh: bool) -> None:
        self._accel_logged = True
        what = "KVM (hardware virtualisation)" if verdict["accel"] == "kvm" else \
            "TCG (software emulation)"
        where = "" if fresh else f" (verdict cached in {self.run_root / 'accel.json'} at " \
                                 f"{verdict.get('probed_at', '?')})"
        self.log.warning("accelerator: %s: %s%s", what, verdict["reason"], where)

    def _probe(self, spec: VmSpec) -> tuple[str, str]:
        """Boot the spec's kernel under KVM and watch its console for init starting."""
        if not os.path.exists("/dev/kvm"):
            return "tcg", "there is no /dev/kvm"
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            return "tcg", "/dev/kvm is not accessible to this user"
        console = self.run_root / "accel-probe.log"
        console.unlink(missing_ok=True)
        cmd = [self.qemu, "-name", "ecsnap-kvm-probe", "-machine", "q35,accel=kvm",
               "-cpu", "host", "-m", "256", "-smp", "1", "-nodefaults", "-no-user-config",
               "-display", "none", "-no-reboot", "-kernel", spec.kernel_path]
        if spec.initrd_path:
            cmd += ["-initrd", spec.initrd_path]
        cmd += ["-append", "console=ttyS0 earlyprintk=serial,ttyS0,115200 loglevel=7 panic=-1",
                "-serial", f"file:{console}"]
        self.log.info("probing KVM: booting %s under KVM for at most %.0f s",
                      spec.kernel_path, PROBE_TIMEOUT)
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        seen, last_growth = b"", time.monotonic()
        try:
            while True:
                now = time.monotonic()
                with contextlib.suppress(OSError):
                    text = console.read_bytes()
                    if len(text) != len(seen):
                        seen, last_growth = text, now
                if any(marker in seen for marker in PROBE_MARKERS):
                    return "kvm", f"a probe boot under KVM got to the guest's init in " \
                                  f"{now - started:.1f} s"
                if proc.poll() is not None:
                    err = (proc.stderr.read() if proc.stderr else b"").decode(errors="replace")
                    err = "; ".join(line.strip() for line in err.strip().splitlines()[-3:])
                    return "tcg", "KVM probe failed at once, QEMU could not run a KVM " \
                                  f"guest: {err[-300:] or f'exit status {proc.returncode}'}"
                lines = seen.strip().splitlines()
                where = lines[-1].decode(errors="replace").strip()[:80] if lines else ""
                if seen and now - last_growth > PROBE_STALL:
                    return "tcg", f"KVM probe hung: the guest kernel went silent for " \
                                  f"{PROBE_STALL:.0f} s after {where!r} ({now - started:.1f} s " \
                                  "in); /dev/kvm exists but does not run this kernel"
                if now - started > PROBE_TIMEOUT:
                    return "tcg", f"KVM probe timed out after {PROBE_TIMEOUT:.0f} s without " \
                                  f"the guest kernel reaching init (last console line: " \
                                  f"{where or 'none'!r})"
                time.sleep(0.1)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stderr:
                proc.stderr.close()

    # ------------------------------------------------------------ start

    def _disk_args(self, disk: VmDisk, bus: str | None, bootindex: int | None) -> list[str]:
        node, path = _checked(disk)
        device: dict[str, Any] = {"driver": "virtio-blk-pci", "drive": node,
                                  "id": f"dev-{node}", "serial": disk_serial(node)}
        if bus:
            device["bus"] = bus
        if bootindex is not None:
            device["bootindex"] = bootindex
        return ["-blockdev", json.dumps({"driver": "file", "node-name": f"f-{node}",
                                         "filename": path, "discard": "unmap"}),
                "-blockdev", json.dumps({"driver": "qcow2", "node-name": node,
                                         "file": f"f-{node}", "discard": "unmap"}),
                "-device", json.dumps(device)]

    def _command(self, spec: VmSpec, accel: str, run: Path) -> list[str]:
        iid = spec.instance_id
        data = len(spec.disks) - 1
        ports = data + max(0, min(HOTPLUG_SPARE_PORTS, MAX_ROOT_PORTS - data))
        cmd = [self.qemu, "-name", f"ecsnap-{iid},process=ecsnap-{iid}",
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
            cmd += self._disk_args(disk, f"rp{n}" if n else None,
                                   None if direct or n else 1)
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

    def start(self, spec: VmSpec) -> None:
        iid = spec.instance_id
        run = self._dir(iid)
        if not spec.disks:
            raise ComputeError(f"{iid}: a VM needs a system disk")
        if len(str(run / "serial.sock")) > 107:
            raise ComputeError(f"run directory {run} is too deep for unix socket paths")
        with self._exclusive(iid):
            if (pid := self._pid(iid)) is not None:
                self.log.info("VM %s is already running (pid %d)", iid, pid)
                return
            accel = self.accelerator(spec)
            for name in ("qmp.sock", "qga.sock", "serial.sock", "qemu.pid"):
                (run / name).unlink(missing_ok=True)
            serial_log = run / "serial.log"
            if serial_log.exists() and serial_log.stat().st_size > SERIAL_LOG_ROTATE:
                os.replace(serial_log, run / "serial.log.1")
            cmd = self._command(spec, accel, run)
            reason = f"accel={self.accel}"
            if self.accel == "auto":
                with contextlib.suppress(OSError, ValueError, KeyError):
                    reason = json.loads((self.run_root / "accel.json").read_text())["reason"]
            self._save_vm(iid, {
                "instance_id": iid, "accel": accel, "accel_reason": reason,
                "vcpus": spec.vcpus, "memory_mib": spec.memory_mib,
                "boot_mode": spec.boot_mode,
                "disks": {d.disk_id: str(Path(d.path).resolve()) for d in spec.disks},
                "system_disk": spec.disks[0].disk_id, "started_at": _now()})
            started = time.monotonic()
            try:
                proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                                      start_new_session=True, timeout=120)
                output = (proc.stdout + proc.stderr).decode(errors="replace")
                failed = proc.returncode != 0
            except (OSError, subprocess.TimeoutExpired) as exc:
                output, failed = str(exc), True
            (run / "start.log").write_text(f"{_now()}\n{shlex.join(cmd)}\n{output}")
            pid = self._pid(iid)
            if failed or pid is None:
                raise ComputeError(f"QEMU did not start for {iid}: "
                                   f"{output.strip()[-1500:] or 'no output'}")
            self.log.info("VM %s started: pid %d, %s, %d vCPU, %d MiB, %d disk(s), %s boot, "
                          "in %.2f s", iid, pid, accel.upper(), spec.vcpus, spec.memory_mib,
                          len(spec.disks), spec.boot_mode, time.monotonic() - started)

    # ------------------------------------------------------------ stop, reboot

    def _wait_gone(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if _pid_state(pid) in (None, "Z", "X"):
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitpid(pid, os.WNOHANG)  # in case it is our child
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def _cleanup(self, instance_id: str) -> None:
        run = self._dir(instance_id)
        for name in ("qmp.sock", "qga.sock", "serial.sock", "qemu.pid"):
            (run / name).unlink(missing_ok=True)

    def _shutdown_request(self, instance_id: str, mode: str) -> bool:
        """Ask the guest agent to power off (or reboot); False if it does not answer."""
        try:
            with self._exclusive(instance_id, 10), self._agent(instance_id, 2.0) as agent:
                agent.send_only("guest-shutdown", {"mode": mode})
            return True
        except ComputeError as exc:
            self.log.info("VM %s: no guest agent for a %s (%s)", instance_id, mode, exc)
            return False

    def _acpi_powerdown(self, instance_id: str) -> bool:
        try:
            with self._exclusive(instance_id, 10), self._qmp(instance_id) as qmp:
                qmp.cmd("system_powerdown")
            return True
        except ComputeError as exc:
            self.log.warning("VM %s: ACPI power button: %s", instance_id, exc)
            return False

    def stop(self, instance_id: str, *, force: bool = False, timeout: float = 30.0) -> None:
        pid = self._pid(instance_id)
        if pid is None:
            self._cleanup(instance_id)
            return
        started = time.monotonic()
        if not force:
            how = None
            if self._shutdown_request(instance_id, "powerdown"):
                how = "guest agent"
                # a guest that ignores its agent gets the power button half way through
                if not self._wait_gone(pid, timeout / 2):
                    self.log.info("VM %s: still running %.0f s after the agent's shutdown; "
                                  "pressing the ACPI power button", instance_id, timeout / 2)
                    self._acpi_powerdown(instance_id)
            elif self._acpi_powerdown(instance_id):
                how = "ACPI power button"
            if how and self._wait_gone(pid, max(0.0, timeout - (time.monotonic() - started))):
                self.log.info("VM %s shut down through the %s in %.1f s", instance_id, how,
                              time.monotonic() - started)
                self._cleanup(instance_id)
                return
            self.log.warning("VM %s did not shut down in %.0f s; quitting QEMU",
                             instance_id, timeout)
        self._quit(instance_id, pid)
        self.log.info("VM %s stopped (%s) in %.1f s", instance_id,
                      "forced" if force else "QEMU quit after the timeout",
                      time.monotonic() - started)

    def _quit(self, instance_id: str, pid: int) -> None:
        with contextlib.suppress(ComputeError), self._exclusive(instance_id, 5), \
                self._qmp(instance_id, timeout=3) as qmp, \
                contextlib.suppress(ComputeError):  # QEMU may hang up before it answers
            qmp.cmd("quit", timeout=3)
        if not self._wait_gone(pid, 5):
            self.log.warning("VM %s: QEMU (pid %d) ignored quit; killing it", instance_id, pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if not self._wait_gone(pid, 10):
                raise ComputeError(f"QEMU of {instance_id} (pid {pid}) survives SIGKILL")
        self._cleanup(instance_id)

    def reboot(self, instance_id: str, *, force: bool = False) -> None:
        self._require(instance_id)
        if not force:
            if self._shutdown_request(instance_id, "reboot"):
                self.log.info("VM %s: reboot requested through the guest agent", instance_id)
                return
            # no agent: Ctrl-Alt-Del on the PS/2 keyboard makes init reboot cleanly
            with self._exclusive(instance_id), self._qmp(instance_id) as qmp:
                qmp.cmd("send-key", {"keys": [{"type": "qcode", "data": key}
                                              for key in ("ctrl", "alt", "delete")]})
            self.log.info("VM %s: reboot requested with Ctrl-Alt-Del", instance_id)
            return
        with self._exclusive(instance_id), self._qmp(instance_id) as qmp:
            qmp.cmd("system_reset")
        self.log.info("VM %s: reset", instance_id)

    # ------------------------------------------------------------ snapshots

    def snapshot_disks(self, instance_id: str, items: Sequence[tuple[str, str]], *,
                       quiesce: bool = True) -> LiveSnapshotResult:
        if not items:
            raise ComputeError("snapshot_disks needs at least one disk")
        actions = [{"type": "blockdev-snapshot-internal-sync",
                    "data": {"device": disk_id, "name": snapshot_id}}
                   for disk_id, snapshot_id in items]
        with self._exclusive(instance_id), self._qmp(instance_id, timeout=30) as qmp:
            agent: AgentSession | None = None
            if quiesce:
                try:
                    agent = self._agent(instance_id, AGENT_QUIESCE_TIMEOUT)
                except GuestAgentUnavailable as exc:
                    self.log.warning("VM %s: the guest agent does not answer (%s); pausing "
                                     "the VM instead of freezing its file systems",
                                     instance_id, exc)
            try:
                frozen_at = self._freeze(instance_id, agent) if agent is not None else None
                method = "pause" if frozen_at is None else "fsfreeze"
                started = time.monotonic() if frozen_at is None else frozen_at
                try:
                    if method == "pause":
                        qmp.cmd("stop")
                    qmp.cmd("transaction", {"actions": actions})
                except QmpCommandError as exc:
                    raise ComputeError(f"snapshot transaction of {instance_id} failed, no "
                                       f"snapshot was taken: {exc.desc}") from exc
                finally:
                    if agent is not None and method == "fsfreeze":
                        self._thaw(instance_id, agent)
                    else:
                        self._resume(instance_id, qmp)
                    window_ms = (time.monotonic() - started) * 1000
            finally:
                if agent is not None:
                    agent.close()
        consistency = "FileSystemConsistent" if method == "fsfreeze" else "CrashConsistent"
        self.log.info("VM %s: %d disk(s) snapshotted in one transaction (%s, guest %s for "
                      "%.1f ms)", instance_id, len(items), consistency,
                      "frozen" if method == "fsfreeze" else "paused", window_ms)
        return LiveSnapshotResult(consistency, window_ms, method)

    def _freeze(self, instance_id: str, agent: AgentSession) -> float | None:
        """Freeze the guest's file systems: when the freeze started, or None (the guest
        thawed again) if it did not work."""
        try:
            if agent.call("guest-fsfreeze-status") == "frozen":
                self.log.warning("VM %s was left frozen; thawing it first", instance_id)
                agent.call("guest-fsfreeze-thaw", timeout=FREEZE_TIMEOUT)
            started = time.monotonic()
            count = agent.call("guest-fsfreeze-freeze", timeout=FREEZE_TIMEOUT)
            self.log.debug("VM %s: %s file system(s) frozen", instance_id, count)
            return started
        except ComputeError as exc:
            self.log.warning("VM %s: freezing the file systems failed (%s); pausing the VM "
                             "instead", instance_id, exc)
            with contextlib.suppress(ComputeError):
                self._thaw(instance_id, agent)
            return None

    def _thaw(self, instance_id: str, agent: AgentSession) -> None:
        """Thaw, and check: the guest must end up thawed whatever happened."""
        error: Exception | None = None
        for attempt in range(3):
            try:
                if attempt:  # a fresh connection, in case this one broke
                    agent.close()
                    agent = self._agent(instance_id, 10.0)
                agent.call("guest-fsfreeze-thaw", timeout=FREEZE_TIMEOUT)
                status = agent.call("guest-fsfreeze-status")
                if status == "thawed":
                    return
                error = ComputeError(f"file systems still {status}")
            except ComputeError as exc:
                error = exc
            self.log.warning("VM %s: thaw attempt %d: %s", instance_id, attempt + 1, error)
        raise ComputeError(f"the file systems of {instance_id} could not be thawed: {error}")

    def _resume(self, instance_id: str, qmp: QmpSession) -> None:
        for attempt in range(3):
            try:
                qmp.cmd("cont")
                if qmp.cmd("query-status").get("running"):
                    return
            except ComputeError as exc:
                self.log.warning("VM %s: resume attempt %d: %s", instance_id, attempt + 1, exc)
        raise ComputeError(f"the VM of {instance_id} could not be resumed")

    def resume_guest(self, instance_id: str) -> None:
        if self._pid(instance_id) is None:
            return
        with self._exclusive(instance_id):
            with contextlib.suppress(ComputeError), self._qmp(instance_id) as qmp:
                if qmp.cmd("query-status").get("status") == "paused":
                    self.log.warning("VM %s was left paused; resuming it", instance_id)
                    self._resume(instance_id, qmp)
            with contextlib.suppress(ComputeError), self._agent(instance_id, 3.0) as agent:
                if agent.call("guest-fsfreeze-status") == "frozen":
                    self.log.warning("VM %s was left frozen; thawing it", instance_id)
                    self._thaw(instance_id, agent)

    def _block_node(self, qmp: QmpSession, node_name: str) -> dict[str, Any] | None:
        nodes = qmp.cmd("query-named-block-nodes", {"flat": True})
        return next((dict(n) for n in nodes if n.get("node-name") == node_name), None)

    def _node_snapshots(self, qmp: QmpSession, disk_id: str) -> list[str]:
        node = self._block_node(qmp, disk_id)
        if node is None:
            raise ComputeError(f"the VM has no disk {disk_id}")
        return [str(s["name"]) for s in node.get("image", {}).get("snapshots", [])]

    def delete_disk_snapshot(self, instance_id: str, disk_id: str, snapshot_id: str) -> None:
        with self._exclusive(instance_id), self._qmp(instance_id, timeout=60) as qmp:
            try:
                qmp.cmd("blockdev-snapshot-delete-internal-sync",
                        {"device": disk_id, "name": snapshot_id})
                self.log.info("VM %s: deleted snapshot %s of %s", instance_id, snapshot_id,
                              disk_id)
            except QmpCommandError as exc:
                if snapshot_id in self._node_snapshots(qmp, disk_id):
                    raise ComputeError(f"delete snapshot {snapshot_id} of {disk_id}: "
                                       f"{exc.desc}") from exc

    def has_disk_snapshot(self, instance_id: str, disk_id: str, snapshot_id: str) -> bool:
        if self._pid(instance_id) is not None:
            with contextlib.suppress(ComputeError), self._exclusive(instance_id), \
                    self._qmp(instance_id) as qmp:
                return snapshot_id in self._node_snapshots(qmp, disk_id)
        path = self._vm(instance_id).get("disks", {}).get(disk_id)
        if not path:
            return False
        out = subprocess.run(["qemu-img", "info", "-U", "--output=json", path],
                             capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            return False
        return any(s.get("name") == snapshot_id
                   for s in json.loads(out.stdout).get("snapshots", []))

    # ------------------------------------------------------------ hot plug

    def _free_ports(self, qmp: QmpSession) -> list[str]:
        """The PCIe root ports with nothing behind them (ours are rp1, rp2, ...)."""
        free = []
        for bus in qmp.cmd("query-pci"):
            for dev in bus.get("devices", []):
                bridge = dev.get("pci_bridge")
                if bridge is not None and dev.get("qdev_id") and not bridge.get("devices"):
                    free.append(str(dev["qdev_id"]))
        return sorted(free, key=lambda p: (len(p), p))

    def attach_disk(self, instance_id: str, disk: VmDisk) -> None:
        node, path = _checked(disk)
        with self._exclusive(instance_id), self._qmp(instance_id, timeout=30) as qmp:
            if self._block_node(qmp, node) is not None:
                self.log.info("VM %s already has disk %s", instance_id, node)
                return
            ports = self._free_ports(qmp)
            if not ports:
                raise ComputeError(f"{instance_id} has no free hot-plug slot; stop the "
                                   "instance to attach more disks")
            added: list[str] = []
            try:
                qmp.cmd("blockdev-add", {"driver": "file", "node-name": f"f-{node}",
                                         "filename": path, "discard": "unmap"})
                added.append(f"f-{node}")
                qmp.cmd("blockdev-add", {"driver": "qcow2", "node-name": node,
                                         "file": f"f-{node}", "discard": "unmap"})
                added.append(node)
                qmp.cmd("device_add", {"driver": "virtio-blk-pci", "drive": node,
                                       "id": f"dev-{node}", "serial": disk_serial(node),
                                       "bus": ports[0]})
            except QmpCommandError as exc:
                for name in reversed(added):
                    with contextlib.suppress(ComputeError):
                        qmp.cmd("blockdev-del", {"node-name": name})
                raise ComputeError(f"attach {node} to {instance_id}: {exc}") from exc
            vm = self._vm(instance_id)
            vm.setdefault("disks", {})[node] = path
            self._save_vm(instance_id, vm)
        self.log.info("VM %s: disk %s attached on %s", instance_id, node, ports[0])
        # the demo guest mounts it by itself (uevent); wait for that, best effort
        if not self.guest_ping(instance_id, timeout=2.0):
            self.log.info("VM %s: no guest agent to ask whether %s is mounted", instance_id,
                          node)
            return
        try:
            result = self.guest_exec(
                instance_id, f"/sbin/ecsnap-mount-disks --wait {disk_serial(node)} 20",
                timeout=30, working_dir="/")
            if result.exit_code == 0:
                self.log.info("VM %s: the guest mounted %s at /mnt/%s", instance_id, node,
                              node)
            else:
                self.log.info("VM %s: the guest did not mount %s (exit %s)", instance_id,
                              node, result.exit_code)
        except ComputeError as exc:
            self.log.info("VM %s: could not ask the guest to mount %s: %s", instance_id,
                          node, exc)

    def detach_disk(self, instance_id: str, disk_id: str) -> None:
        if self._vm(instance_id).get("system_disk") == disk_id:
            raise ComputeError(f"{disk_id} is the system disk of {instance_id}")
        self._require(instance_id)
        if self.guest_ping(instance_id, timeout=2.0):  # let the guest let go, best effort
            with contextlib.suppress(ComputeError):
                self.guest_exec(instance_id, f"sync; umount /mnt/{disk_id} 2>/dev/null || "
                                             f"umount -l /mnt/{disk_id} 2>/dev/null; sync",
                                timeout=20, working_dir="/")
        with self._exclusive(instance_id), self._qmp(instance_id, timeout=30) as qmp:
            def present() -> bool:
                return any(d.get("name") == f"dev-{disk_id}"
                           for d in qmp.cmd("qom-list", {"path": "/machine/peripheral"}))

            if present():
                started = time.monotonic()
                qmp.cmd("device_del", {"id": f"dev-{disk_id}"})
                event = qmp.wait_event("DEVICE_DELETED",
                                       lambda d: d.get("device") == f"dev-{disk_id}", 30.0)
                if event is None and present():
                    raise ComputeError(f"the guest of {instance_id} did not release "
                                       f"{disk_id} in 30 s")
                self.log.info("VM %s: disk %s unplugged in %.1f s", instance_id, disk_id,
                              time.monotonic() - started)
            for node in (disk_id, f"f-{disk_id}"):
                try:
                    qmp.cmd("blockdev-del", {"node-name": node})
                except QmpCommandError as exc:
                    if self._block_node(qmp, node) is not None:
                        raise ComputeError(f"detach {disk_id}: {exc}") from exc
            vm = self._vm(instance_id)
            vm.get("disks", {}).pop(disk_id, None)
            self._save_vm(instance_id, vm)

    # ------------------------------------------------------------ the guest

    def guest_ping(self, instance_id: str, *, timeout: float = 5.0) -> bool:
        if self._pid(instance_id) is None:
            return False
        deadline = time.monotonic() + timeout
        try:
            with self._exclusive(instance_id, timeout), \
                    self._agent(instance_id, max(0.2, deadline - time.monotonic())) as agent:
                agent.call("guest-ping", timeout=max(0.2, deadline - time.monotonic()))
            return True
        except ComputeError:
            return False

    def guest_exec(self, instance_id: str, command: str, *, timeout: float = 60.0,
                   working_dir: str = "/root") -> ExecResult:
        self._require(instance_id)
        script = f"cd {shlex.quote(working_dir)} 2>/dev/null || cd /\n{command}"
        # in a process group of its own (setsid, where the guest has it), so that a
        # timeout kills the command with everything it started
        launcher = 'if command -v setsid >/dev/null 2>&1; then exec setsid /bin/sh -c "$1"; ' \
                   'else exec /bin/sh -c "$1"; fi'
        with self._exclusive(instance_id), self._agent(instance_id, 10.0) as agent:
            pid = int(agent.call("guest-exec", {"path": "/bin/sh",
                                                "arg": ["-c", launcher, "ecsnap-exec", script],
                                                "capture-output": True})["pid"])
        deadline = time.monotonic() + timeout
        pause = 0.05
        while True:
            time.sleep(pause)
            pause = min(0.5, pause * 1.5)
            status = self._exec_status(instance_id, pid)
            if status.get("exited"):
                return self._exec_result(status, timed_out=False)
            if time.monotonic() >= deadline:
                break
        self.log.warning("VM %s: guest command (pid %d) still running after %.0f s; "
                         "killing it", instance_id, pid, timeout)
        with contextlib.suppress(ComputeError), self._exclusive(instance_id), \
                self._agent(instance_id, 10.0) as agent:
            agent.call("guest-exec", {"path": "/bin/sh", "arg": [
                "-c", f"kill -9 -{pid} 2>/dev/null; kill -9 {pid} 2>/dev/null; true"]})
        status = {}
        for _ in range(20):  # collect what it wrote (and let the agent forget it)
            with contextlib.suppress(ComputeError):
                status = self._exec_status(instance_id, pid)
                if status.get("exited"):
                    break
            time.sleep(0.1)
        return self._exec_result(status, timed_out=True)

    def _exec_status(self, instance_id: str, pid: int) -> dict[str, Any]:
        with self._exclusive(instance_id), self._agent(instance_id, 10.0) as agent:
            return dict(agent.call("guest-exec-status", {"pid": pid}, timeout=30))

    @staticmethod
    def _exec_result(status: dict[str, Any], *, timed_out: bool) -> ExecResult:
        out = base64.b64decode(status.get("out-data", ""))
        err = base64.b64decode(status.get("err-data", ""))
        truncated = bool(status.get("out-truncated") or status.get("err-truncated")) or \
            len(out) > OUTPUT_CAP or len(err) > OUTPUT_CAP
        code = None if timed_out else status.get("exitcode")
        if not timed_out and code is None and status.get("signal") is not None:
            code = 128 + int(status["signal"])
        return ExecResult(code, out[:OUTPUT_CAP], err[:OUTPUT_CAP], timed_out=timed_out,
                          truncated=truncated)


def qemu_available(binary: str = "qemu-system-x86_64") -> bool:
    return shutil.which(binary) is not None


__all__ = ["QemuDriver", "disk_serial", "qemu_available"]
