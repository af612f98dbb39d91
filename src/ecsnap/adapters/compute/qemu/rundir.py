"""The run directories of the VMs, and the sessions with what runs in them.

Layout of `<run_root>/<instance id>/`:

    qemu.pid     QEMU's pidfile (-pidfile)
    qmp.sock     QMP (spoken through QEMU's `qemu.qmp` library, see qmp.py)
    qga.sock     the guest agent's virtio-serial port org.qemu.guest_agent.0 (agent.py)
    serial.sock  the serial console (ttyS0), a unix socket server for ONE client
    serial.log   everything the console printed (appended; rotated at 1 MiB at start)
    qemu.log     QEMU's own messages while it runs (-D; rewritten at each start)
    start.log    the command line of the last start and what QEMU printed while starting
    vm.json      the disks the VM has (kept up to date by attach/detach), its accelerator
    lock         serialises the QMP and agent sessions of the instance across processes

A VM is found by its pidfile, checking that the pid is still a QEMU started for that
instance (so a new driver on the same run root controls the VMs an earlier one started).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ecsnap.adapters.compute.base import ComputeError
from ecsnap.adapters.compute.filelock import flock_until
from ecsnap.adapters.compute.qemu.agent import AgentSession
from ecsnap.adapters.compute.qemu.qmp import QmpSession
from ecsnap.adapters.compute.qemu.session import CommandHook
from ecsnap.filemodes import FILE_MODE, private_dir

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SOCKETS = ("qmp.sock", "qga.sock", "serial.sock", "qemu.pid")  # gone with the process


def pid_state(pid: int) -> str | None:
    """The process state letter of `pid`, None if there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def utc_timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class RunDirs:
    """The run directories under `run_root`: paths, pids, vm.json, the per-instance lock,
    and sessions on the sockets of a running VM."""

    def __init__(self, run_root: Path) -> None:
        self.root = Path(run_root).resolve()
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def dir(self, instance_id: str) -> Path:
        if not _ID.match(instance_id):
            raise ComputeError(f"invalid instance id {instance_id!r}")
        return self.root / instance_id

    def pid(self, instance_id: str) -> int | None:
        """The pid of the instance's QEMU, if it is alive (and not a reused pid)."""
        try:
            pid = int((self.dir(instance_id) / "qemu.pid").read_text().strip())
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return None
        name = f"ecsnap-{instance_id}".encode()
        if b"qemu" not in os.path.basename(argv[0]) or \
                not any(a == name or a.startswith(name + b",") for a in argv):
            return None
        return pid if pid_state(pid) not in (None, "Z", "X") else None

    def require(self, instance_id: str) -> int:
        """The pid of the instance's QEMU; ComputeError if it is not running."""
        pid = self.pid(instance_id)
        if pid is None:
            raise ComputeError(f"the VM of {instance_id} is not running")
        return pid

    def running(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(d.name for d in self.root.iterdir()
                      if d.is_dir() and _ID.match(d.name) and self.pid(d.name) is not None)

    def vm(self, instance_id: str) -> dict[str, Any]:
        """vm.json of the instance ({} if there is none)."""
        try:
            return dict(json.loads((self.dir(instance_id) / "vm.json").read_text()))
        except (OSError, ValueError):
            return {}

    def save_vm(self, instance_id: str, vm: dict[str, Any]) -> None:
        path = self.dir(instance_id) / "vm.json"
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)  # owner-only
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(vm, indent=2) + "\n")
        os.replace(tmp, path)

    def remove_sockets(self, instance_id: str) -> None:
        """Remove the sockets and the pidfile (QEMU is gone, or about to start)."""
        run = self.dir(instance_id)
        for name in SOCKETS:
            (run / name).unlink(missing_ok=True)

    @contextlib.contextmanager
    def exclusive(self, instance_id: str, timeout: float = 60.0) -> Iterator[None]:
        """Serialise the QMP and agent sessions of an instance (each socket serves one
        client): a thread lock in this driver, a file lock across processes."""
        with self._locks_guard:
            lock = self._locks.setdefault(instance_id, threading.Lock())
        deadline = time.monotonic() + timeout
        if not lock.acquire(timeout=timeout):
            raise ComputeError(f"{instance_id} is busy (another operation holds it)")
        try:
            run = private_dir(self.dir(instance_id))  # 0700: its sockets are the VM's
            fd = os.open(run / "lock", os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
            with os.fdopen(fd, "a") as handle:
                if not flock_until(handle, deadline, 0.05):
                    raise ComputeError(f"{instance_id} is busy (another process holds it)")
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
        finally:
            lock.release()

    def qmp(self, instance_id: str, timeout: float = 10.0, *,
            on_command: CommandHook | None = None) -> QmpSession:
        """A QMP session with the running VM (hold `exclusive` while it is open)."""
        self.require(instance_id)
        return QmpSession(str(self.dir(instance_id) / "qmp.sock"), instance_id, timeout,
                          on_command=on_command)

    def agent(self, instance_id: str, timeout: float, *,
              on_command: CommandHook | None = None) -> AgentSession:
        """A session with the running VM's guest agent (hold `exclusive` while it is open)."""
        self.require(instance_id)
        return AgentSession(str(self.dir(instance_id) / "qga.sock"), instance_id, timeout,
                            sync_attempt=min(1.0, timeout), on_command=on_command)


__all__ = ["RunDirs", "pid_state", "utc_timestamp"]
