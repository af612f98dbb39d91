"""The guest, through its agent: ping, commands run with `guest-exec`, files written with
`guest-file-*`."""

from __future__ import annotations

import base64
import contextlib
import logging
import shlex
import time
from typing import Any

from ecsnap.adapters.compute.base import ComputeError, ExecResult
from ecsnap.adapters.compute.qemu.rundir import RunDirs

OUTPUT_CAP = 1024 * 1024  # bytes of stdout and of stderr kept from guest_exec
WRITE_CHUNK = 1 << 20  # bytes per guest-file-write (1.4 MB of base64 in one message)


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


class QemuGuestAgent:
    """GuestAgent through qemu-guest-agent's virtio-serial port."""

    def __init__(self, dirs: RunDirs, log: logging.Logger) -> None:
        self.dirs = dirs
        self.log = log

    def call(self, instance_id: str, command: str,
             arguments: dict[str, object] | None = None, *, timeout: float = 10.0) -> Any:
        """One agent command in a session of its own: its `return` value."""
        with self.dirs.exclusive(instance_id), self.dirs.agent(instance_id, 10.0) as agent:
            return agent.call(command, arguments, timeout=timeout)

    def guest_ping(self, instance_id: str, *, timeout: float = 5.0) -> bool:
        if self.dirs.pid(instance_id) is None:
            return False
        deadline = time.monotonic() + timeout
        try:
            with self.dirs.exclusive(instance_id, timeout), \
                    self.dirs.agent(instance_id, max(0.2, deadline - time.monotonic())) as agent:
                agent.call("guest-ping", timeout=max(0.2, deadline - time.monotonic()))
            return True
        except ComputeError:
            return False

    def guest_exec(self, instance_id: str, command: str, *, timeout: float = 60.0,
                   working_dir: str = "/root") -> ExecResult:
        self.dirs.require(instance_id)
        script = f"cd {shlex.quote(working_dir)} 2>/dev/null || cd /\n{command}"
        # in a process group of its own (setsid, where the guest has it), so that a
        # timeout kills the command with everything it started
        launcher = 'if command -v setsid >/dev/null 2>&1; then exec setsid /bin/sh -c "$1"; ' \
                   'else exec /bin/sh -c "$1"; fi'
        with self.dirs.exclusive(instance_id), self.dirs.agent(instance_id, 10.0) as agent:
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
                return _exec_result(status, timed_out=False)
            if time.monotonic() >= deadline:
                break
        self.log.warning("VM %s: guest command (pid %d) still running after %.0f s; "
                         "killing it", instance_id, pid, timeout)
        with contextlib.suppress(ComputeError), self.dirs.exclusive(instance_id), \
                self.dirs.agent(instance_id, 10.0) as agent:
            agent.call("guest-exec", {"path": "/bin/sh", "arg": [
                "-c", f"kill -9 -{pid} 2>/dev/null; kill -9 {pid} 2>/dev/null; true"]})
        status = {}
        for _ in range(20):  # collect what it wrote (and let the agent forget it)
            with contextlib.suppress(ComputeError):
                status = self._exec_status(instance_id, pid)
                if status.get("exited"):
                    break
            time.sleep(0.1)
        return _exec_result(status, timed_out=True)

    def guest_write_file(self, instance_id: str, path: str, data: bytes, *,
                         timeout: float = 60.0) -> None:
        """guest-file-open (mode "w"), guest-file-write in chunks, guest-file-close."""
        self.dirs.require(instance_id)
        deadline = time.monotonic() + timeout
        with self.dirs.exclusive(instance_id), self.dirs.agent(instance_id, 10.0) as agent:
            handle = int(agent.call("guest-file-open", {"path": path, "mode": "w"}))
            try:
                for at in range(0, len(data), WRITE_CHUNK):
                    chunk = data[at:at + WRITE_CHUNK]
                    left = max(1.0, deadline - time.monotonic())
                    written = agent.call("guest-file-write", {
                        "handle": handle, "buf-b64": base64.b64encode(chunk).decode()},
                        timeout=left)
                    if int(written.get("count", -1)) != len(chunk):
                        raise ComputeError(f"guest-file-write wrote {written.get('count')} "
                                           f"of {len(chunk)} bytes of {path}")
            finally:
                agent.call("guest-file-close", {"handle": handle})

    def _exec_status(self, instance_id: str, pid: int) -> dict[str, Any]:
        with self.dirs.exclusive(instance_id), self.dirs.agent(instance_id, 10.0) as agent:
            return dict(agent.call("guest-exec-status", {"pid": pid}, timeout=30))


__all__ = ["OUTPUT_CAP", "QemuGuestAgent"]
