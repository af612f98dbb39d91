"""The QEMU driver: one detached QEMU process per running instance.

Each instance has a run directory `<run_root>/<instance id>/` with `qemu.pid`, `qmp.sock`
(QMP, through QEMU's `qemu.qmp` library), `qga.sock` (the guest agent), `serial.sock`
(the serial console, served to one client) and `serial.log` (everything the console
printed), `qemu.log` and `spec.json` (the disks the VM was started with). QEMU runs
daemonized in its own session, so ecsnap can restart (or be killed) and VMs keep running;
a new driver on the same run root finds them by pidfile and reattaches.

Every disk is a `-blockdev` pair (file + qcow2) whose qcow2 node is named by the disk ID,
on a virtio-blk device with `serial=<disk id without "d-">` (the demo guest mounts it at
`/mnt/<disk id>`).

The accelerator: KVM only when a bounded probe boot shows the guest kernel running
under it (on some hosts /dev/kvm exists but KVM boots hang); else TCG. The verdict is
cached in `<run_root>/accel.json` per QEMU version and logged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from ecsnap.adapters.compute.base import (
    ComputeError,
    ExecResult,
    GuestAgentUnavailable,
    LiveSnapshotResult,
    VmDisk,
    VmSpec,
    VmState,
)
from ecsnap.adapters.compute.qga import GuestAgent

OUTPUT_CAP = 1024 * 1024
HOTPLUG_PORTS = 8  # PCIe root ports for disks attached while the VM runs
PROBE_SECONDS = 10.0


def disk_serial(disk_id: str) -> str:
    """virtio-blk keeps 20 bytes of serial: the disk ID without its `d-` prefix."""
    return disk_id.removeprefix("d-")[:20]


class QemuDriver:
    def __init__(self, run_root: Path, *, accel: str = "auto",
                 qemu_binary: str = "qemu-system-x86_64",
                 log: logging.Logger | None = None) -> None:
        self.run_root = Path(run_root)
        self.accel = accel
        self.qemu = qemu_binary
        self.log = log or logging.getLogger("ecsnap.compute.qemu")
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    # ------------------------------------------------------------ bookkeeping

    def _dir(self, instance_id: str) -> Path:
        return self.run_root / instance_id

    def _lock(self, instance_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(instance_id, threading.Lock())

    def _pid(self, instance_id: str) -> int | None:
        try:
            pid = int((self._dir(instance_id) / "qemu.pid").read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        if f"ecsnap-{instance_id}".encode() not in cmdline:
            return None  # the pid was reused by another process
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        except OSError:
            return None
        return None if state == "Z" else pid

    def state(self, instance_id: str) -> VmState:
        pid = self._pid(instance_id)
        accel = ""
        with contextlib.suppress(OSError, ValueError):
            accel = json.loads((self._dir(instance_id) / "spec.json").read_text())["accel"]
        return VmState(instance_id, pid is not None, pid, accel)

    def running(self) -> list[str]:
        if not self.run_root.is_dir():
            return []
        return sorted(d.name for d in self.run_root.iterdir()
                      if d.is_dir() and self._pid(d.name) is not None)

    def serial_socket(self, instance_id: str) -> str:
        return str(self._dir(instance_id) / "serial.sock")

    # ------------------------------------------------------------ QMP and the agent

    @contextlib.contextmanager
    def _qmp(self, instance_id: str, timeout: float = 15.0) -> Iterator[QEMUMonitorProtocol]:
        path = self._dir(instance_id) / "qmp.sock"
        if self._pid(instance_id) is None:
            raise ComputeError(f"the VM of {instance_id} is not running")
        qmp = QEMUMonitorProtocol(str(path))
        try:
            qmp.connect()
            qmp.settimeout(timeout)
            yield qmp
        except (QMPError, OSError, TimeoutError) as exc:
            raise ComputeError(f"QMP of {instance_id}: {type(exc).__name__}: {exc}") from exc
        finally:
            with contextlib.suppress(Exception):
                qmp.close()

    def _agent(self, instance_id: str, timeout: float) -> GuestAgent:
        agent = GuestAgent(str(self._dir(instance_id) / "qga.sock"), timeout)
        try:
            agent.sync(attempt=min(1.0, timeout))
        except BaseException:
            agent.sock.close()
            raise
        return agent

    # ------------------------------------------------------------ accelerator

    def _qemu_version(self) -> str:
        out = subprocess.run([self.qemu, "--version"], capture_output=True, text=True)
        return out.stdout.splitlines()[0] if out.stdout else "unknown"

    def accelerator(self, spec: VmSpec | None = None) -> str:
        if self.accel in ("kvm", "tcg"):
            return self.accel
        cache = self.run_root / "accel.json"
        version = self._qemu_version()
        with contextlib.suppress(OSError, ValueError, KeyError):
            cached = json.loads(cache.read_text())
            if cached["qemu"] == version:
                return str(cached["accel"])
        accel, why = self._probe(spec)
        self.run_root.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"qemu": version, "accel": accel, "why": why}))
        self.log.warning("accelerator: %s (%s)", "KVM" if accel == "kvm" else
                         "TCG, software emulation", why)
        return accel

    def _probe(self, spec: VmSpec | None) -> tuple[str, str]:
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            return "tcg", "no usable /dev/kvm"
        if spec is None or spec.boot_mode != "direct" or not spec.kernel_path:
            return "tcg", "KVM cannot be probed without a kernel to boot; using TCG"
        with tempfile.TemporaryDirectory() as tmp:
            log = Path(tmp) / "probe.log"
            cmd = [self.qemu, "-machine", "q35,accel=kvm", "-cpu", "host", "-m", "256",
                   "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                   "-kernel", spec.kernel_path, "-initrd", spec.initrd_path,
                   "-append", "console=ttyS0 panic=-1", "-serial", f"file:{log}"]
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + PROBE_SECONDS
            booted = False
            try:
                while time.monotonic() < deadline and proc.poll() is None:
                    with contextlib.suppress(OSError):
                        if b"Run /init" in log.read_bytes():
                            booted = True
                            break
                    time.sleep(0.2)
            finally:
                proc.kill()
                proc.wait()
        if booted:
            return "kvm", "a probe boot under KVM reached the guest's init"
        return "tcg", f"a probe boot under KVM did not reach the guest's init in " \
                      f"{PROBE_SECONDS:.0f} s"

    # ------------------------------------------------------------ life cycle

    def _disk_args(self, disk: VmDisk, bootindex: int | None) -> list[str]:
        node = disk.disk_id
        device = f"virtio-blk-pci,drive={node},id=dev-{node},serial={disk_serial(node)}"
        if bootindex is not None:
            device += f",bootindex={bootindex}"
        return ["-blockdev", f"driver=file,node-name=f-{node},filename={disk.path}",
                "-blockdev", f"driver=qcow2,node-name={node},file=f-{node}",
                "-device", device]

    def start(self, spec: VmSpec) -> None:
        iid = spec.instance_id
        with self._lock(iid):
            if self._pid(iid) is not None:
                return
            accel = self.accelerator(spec)
            run = self._dir(iid)
            run.mkdir(parents=True, exist_ok=True)
            for name in ("qmp.sock", "qga.sock", "serial.sock", "qemu.pid"):
                (run / name).unlink(missing_ok=True)
            (run / "spec.json").write_text(json.dumps({
                "accel": accel, "disks": {d.disk_id: d.path for d in spec.disks}}))
            cmd = [self.qemu, "-name", f"ecsnap-{iid}",
                   "-machine", f"q35,accel={accel}", "-cpu", "host" if accel == "kvm" else "max",
                   "-m", str(spec.memory_mib), "-smp", str(spec.vcpus),
                   "-nodefaults", "-no-user-config", "-display", "none",
                   "-chardev", f"socket,id=ser0,path={run / 'serial.sock'},server=on,wait=off,"
                               f"logfile={run / 'serial.log'},logappend=on",
                   "-serial", "chardev:ser0",
                   "-qmp", f"unix:{run / 'qmp.sock'},server=on,wait=off",
                   "-chardev", f"socket,id=qga0,path={run / 'qga.sock'},server=on,wait=off",
                   "-device", "virtio-serial-pci,id=vser0",
                   "-device", "virtserialport,bus=vser0.0,chardev=qga0,"
                              "name=org.qemu.guest_agent.0"]
            for port in range(1, HOTPLUG_PORTS + 1):
                cmd += ["-device", f"pcie-root-port,id=hp{port},chassis={port},slot={port}"]
            for n, disk in enumerate(spec.disks):
                cmd += self._disk_args(disk, 0 if n == 0 and spec.boot_mode != "direct"
                                       else None)
            if spec.boot_mode == "direct":
                cmd += ["-kernel", spec.kernel_path, "-initrd", spec.initrd_path,
                        "-append", spec.kernel_args]
            cmd += ["-daemonize", "-pidfile", str(run / "qemu.pid")]
            with open(run / "qemu.log", "ab") as log:
                proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                      start_new_session=True, timeout=60)
            if proc.returncode != 0 or self._pid(iid) is None:
                tail = (run / "qemu.log").read_text(errors="replace")[-2000:]
                raise ComputeError(f"QEMU did not start for {iid}: {tail}")
            self.log.info("started VM %s (pid %s, %s)", iid, self._pid(iid), accel.upper())

    def stop(self, instance_id: str, *, force: bool = False, timeout: float = 30.0) -> None:
        with self._lock(instance_id):
            pid = self._pid(instance_id)
            if pid is None:
                return
            if not force:
                try:
                    with self._agent(instance_id, 2.0) as agent:
                        agent.send_only("guest-shutdown", mode="powerdown")
                    how = "guest agent"
                except (ComputeError, OSError):
                    with contextlib.suppress(ComputeError), self._qmp(instance_id) as qmp:
                        qmp.cmd("system_powerdown")
                    how = "ACPI power button"
                if self._wait_gone(pid, timeout):
                    self.log.info("VM %s shut down through the %s", instance_id, how)
                    self._cleanup(instance_id)
                    return
                self.log.warning("VM %s did not shut down in %.0f s; quitting it",
                                 instance_id, timeout)
            with contextlib.suppress(ComputeError), self._qmp(instance_id, timeout=5) as qmp:
                qmp.cmd("quit")
            if not self._wait_gone(pid, 5):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self._wait_gone(pid, 5)
            self._cleanup(instance_id)

    def _wait_gone(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
                if state == "Z":
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(pid, os.WNOHANG)
                    return True
            except OSError:
                return True
            time.sleep(0.1)
        return False

    def _cleanup(self, instance_id: str) -> None:
        run = self._dir(instance_id)
        for name in ("qmp.sock", "qga.sock", "serial.sock", "qemu.pid"):
            (run / name).unlink(missing_ok=True)

    def reboot(self, instance_id: str, *, force: bool = False) -> None:
        with self._lock(instance_id):
            if not force:
                try:
                    with self._agent(instance_id, 2.0) as agent:
                        agent.send_only("guest-shutdown", mode="reboot")
                    return
                except (ComputeError, OSError):
                    pass
            with self._qmp(instance_id) as qmp:
                qmp.cmd("system_reset")

    # ------------------------------------------------------------ snapshots

    def snapshot_disks(self, instance_id: str, items: Sequence[tuple[str, str]], *,
                       quiesce: bool = True) -> LiveSnapshotResult:
        actions = [{"type": "blockdev-snapshot-internal-sync",
                    "data": {"device": disk_id, "name": snap_id}} for disk_id, snap_id in items]
        with self._lock(instance_id):
            agent: GuestAgent | None = None
            if quiesce:
                try:
                    agent = self._agent(instance_id, 2.0)
                    agent.deadline = time.monotonic() + 30
                except (ComputeError, OSError) as exc:
                    self.log.warning("VM %s: no guest agent (%s); pausing the VM instead of "
                                     "freezing its file systems", instance_id, exc)
                    agent = None
            with self._qmp(instance_id) as qmp:
                started = time.monotonic()
                method = "pause"
                try:
                    if agent is not None:
                        try:
                            agent.call("guest-fsfreeze-freeze")
                            method = "fsfreeze"
                            started = time.monotonic()
                        except ComputeError as exc:
                            self.log.warning("VM %s: freeze failed (%s); pausing instead",
                                             instance_id, exc)
                    if method == "pause":
                        qmp.cmd("stop")
                        started = time.monotonic()
                    reply = qmp.cmd_obj({"execute": "transaction",
                                         "arguments": {"actions": actions}})
                    if "error" in reply:
                        raise ComputeError(f"snapshot transaction of {instance_id}: "
                                           f"{reply['error'].get('desc')}")
                finally:
                    if method == "fsfreeze" and agent is not None:
                        self._thaw(instance_id, agent)
                    elif method == "pause":
                        qmp.cmd("cont")
                    window_ms = (time.monotonic() - started) * 1000
                    if agent is not None:
                        agent.sock.close()
        consistency = "FileSystemConsistent" if method == "fsfreeze" else "CrashConsistent"
        self.log.info("VM %s: %d disk(s) snapshotted in one transaction, %s %.1f ms",
                      instance_id, len(items), method, window_ms)
        return LiveSnapshotResult(consistency, window_ms, method)

    def _thaw(self, instance_id: str, agent: GuestAgent) -> None:
        agent.deadline = time.monotonic() + 30
        for _ in range(3):
            try:
                agent.call("guest-fsfreeze-thaw")
                if agent.call("guest-fsfreeze-status") == "thawed":
                    return
            except ComputeError as exc:
                self.log.warning("VM %s: thaw: %s", instance_id, exc)
        raise ComputeError(f"the file systems of {instance_id} could not be thawed")

    def resume_guest(self, instance_id: str) -> None:
        """After a crash mid-snapshot: thaw the guest and resume a paused VM."""
        if self._pid(instance_id) is None:
            return
        with contextlib.suppress(ComputeError, OSError), \
                self._agent(instance_id, 3.0) as agent:
            if agent.call("guest-fsfreeze-status") == "frozen":
                self._thaw(instance_id, agent)
        with contextlib.suppress(ComputeError), self._qmp(instance_id) as qmp:
            status: Any = qmp.cmd("query-status")
            if status.get("status") == "paused":
                qmp.cmd("cont")

    def delete_disk_snapshot(self, instance_id: str, disk_id: str, snapshot_id: str) -> None:
        with self._lock(instance_id), self._qmp(instance_id) as qmp:
            reply = qmp.cmd_obj({"execute": "blockdev-snapshot-delete-internal-sync",
                                 "arguments": {"device": disk_id, "name": snapshot_id}})
            error = reply.get("error", {}).get("desc", "")
            if error and "not found" not in error.lower() and \
                    "can't find" not in error.lower():
                raise ComputeError(f"delete snapshot {snapshot_id} of {disk_id}: {error}")

    def has_disk_snapshot(self, instance_id: str, disk_id: str, snapshot_id: str) -> bool:
        path = self._disk_path(instance_id, disk_id)
        out = subprocess.run(["qemu-img", "info", "-U", "--output=json", path],
                             capture_output=True, text=True)
        if out.returncode != 0:
            return False
        return any(s["name"] == snapshot_id
                   for s in json.loads(out.stdout).get("snapshots", []))

    def _disk_path(self, instance_id: str, disk_id: str) -> str:
        spec = json.loads((self._dir(instance_id) / "spec.json").read_text())
        return str(spec["disks"][disk_id])

    # ------------------------------------------------------------ hot plug

    def attach_disk(self, instance_id: str, disk: VmDisk) -> None:
        with self._lock(instance_id):
            node = disk.disk_id
            run = self._dir(instance_id) / "spec.json"
            spec = json.loads(run.read_text())
            ports = spec.setdefault("ports", {})
            free = [f"hp{n}" for n in range(1, HOTPLUG_PORTS + 1) if f"hp{n}" not in
                    ports.values()]
            if not free:
                raise ComputeError(f"{instance_id} has no free hot-plug slot; stop it to "
                                   "attach more disks")
            with self._qmp(instance_id) as qmp:
                for command, args in (
                        ("blockdev-add", {"driver": "file", "node-name": f"f-{node}",
                                          "filename": disk.path}),
                        ("blockdev-add", {"driver": "qcow2", "node-name": node,
                                          "file": f"f-{node}"}),
                        ("device_add", {"driver": "virtio-blk-pci", "drive": node,
                                        "id": f"dev-{node}", "serial": disk_serial(node),
                                        "bus": free[0]})):
                    reply = qmp.cmd_obj({"execute": command, "arguments": args})
                    if "error" in reply:
                        raise ComputeError(f"{command} {node}: {reply['error'].get('desc')}")
            spec["disks"][node] = disk.path
            ports[node] = free[0]
            run.write_text(json.dumps(spec))
        with contextlib.suppress(ComputeError, OSError):  # the guest mounts it if it can
            self.guest_exec(instance_id, "sleep 1; /sbin/ecsnap-mount-disks", timeout=30)

    def detach_disk(self, instance_id: str, disk_id: str) -> None:
        with contextlib.suppress(ComputeError, OSError):
            self.guest_exec(instance_id, f"sync; umount /mnt/{disk_id}", timeout=15)
        with self._lock(instance_id):
            with self._qmp(instance_id) as qmp:
                reply = qmp.cmd_obj({"execute": "device_del",
                                     "arguments": {"id": f"dev-{disk_id}"}})
                if "error" in reply and "not found" not in str(reply["error"]).lower():
                    raise ComputeError(f"device_del {disk_id}: {reply['error'].get('desc')}")
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    devices: Any = qmp.cmd("qom-list", path="/machine/peripheral")
                    if not any(d.get("name") == f"dev-{disk_id}" for d in devices):
                        break
                    time.sleep(0.2)
                else:
                    raise ComputeError(f"the guest did not release {disk_id}")
                for node in (disk_id, f"f-{disk_id}"):
                    qmp.cmd_obj({"execute": "blockdev-del", "arguments": {"node-name": node}})
            run = self._dir(instance_id) / "spec.json"
            spec = json.loads(run.read_text())
            spec["disks"].pop(disk_id, None)
            spec.get("ports", {}).pop(disk_id, None)
            run.write_text(json.dumps(spec))

    # ------------------------------------------------------------ the guest

    def guest_ping(self, instance_id: str, *, timeout: float = 5.0) -> bool:
        if self._pid(instance_id) is None:
            return False
        try:
            with self._lock(instance_id), self._agent(instance_id, timeout) as agent:
                agent.call("guest-ping")
            return True
        except (ComputeError, OSError):
            return False

    def guest_exec(self, instance_id: str, command: str, *, timeout: float = 60.0,
                   working_dir: str = "/root") -> ExecResult:
        import base64
        import shlex

        if self._pid(instance_id) is None:
            raise ComputeError(f"the VM of {instance_id} is not running")
        script = f"cd {shlex.quote(working_dir)} 2>/dev/null; {command}"
        with self._lock(instance_id), self._agent(instance_id, 10.0) as agent:
            pid = agent.call("guest-exec", path="/bin/sh", arg=["-c", script],
                             **{"capture-output": True})["pid"]
        deadline = time.monotonic() + timeout
        status: dict[str, Any] = {}
        while True:
            with self._lock(instance_id), self._agent(instance_id, 10.0) as agent:
                status = agent.call("guest-exec-status", pid=pid)
                if status.get("exited"):
                    break
                if time.monotonic() > deadline:
                    agent.call("guest-exec", path="/bin/kill", arg=["-9", str(pid)])
                    return ExecResult(None, timed_out=True)
            time.sleep(0.1)
        out = base64.b64decode(status.get("out-data", ""))
        err = base64.b64decode(status.get("err-data", ""))
        truncated = bool(status.get("out-truncated") or status.get("err-truncated")) or \
            len(out) > OUTPUT_CAP or len(err) > OUTPUT_CAP
        return ExecResult(status.get("exitcode"), out[:OUTPUT_CAP], err[:OUTPUT_CAP],
                          truncated=truncated)


def qemu_available(binary: str = "qemu-system-x86_64") -> bool:
    return shutil.which(binary) is not None


__all__ = ["GuestAgentUnavailable", "QemuDriver", "disk_serial", "qemu_available"]
