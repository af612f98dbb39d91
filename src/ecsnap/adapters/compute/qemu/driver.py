"""The QEMU driver: one detached QEMU process per running instance.

`QemuDriver` is the ComputeDriver of ecsnap; it composes one part per capability of the
contract (base.py), each in its own module:

    rundir.py         run directories, pidfiles, vm.json, the per-instance lock, sessions
    accel.py          KVM or TCG: the probe boot and its cached verdict
    lifecycle.py      VmLifecycle: the command line, start, stop, reboot, state
    live_snapshot.py  LiveSnapshots: freeze (or pause), one QMP transaction, thaw
    hotplug.py        DiskHotPlug: blockdev-add/device_add and back
    guest.py          GuestAgent: ping, guest-exec
    session.py, qmp.py, agent.py   the QMP and guest-agent sessions (qemu.qmp)

Beyond the contract it offers the accelerator verdict, an observer of live-snapshot
timings, and direct access for tools (the VM's pid, one QMP or agent command, the QMP
socket lent to a client of one's own), all under the per-instance lock that serialises
every session of an instance.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ecsnap.adapters.compute.base import ExecResult, LiveSnapshotResult, VmDisk, VmSpec, VmState
from ecsnap.adapters.compute.qemu.accel import Accelerator
from ecsnap.adapters.compute.qemu.guest import QemuGuestAgent
from ecsnap.adapters.compute.qemu.hotplug import QemuHotPlug
from ecsnap.adapters.compute.qemu.lifecycle import QemuLifecycle
from ecsnap.adapters.compute.qemu.live_snapshot import QemuLiveSnapshots, SnapshotObserver
from ecsnap.adapters.compute.qemu.rundir import RunDirs


class QemuDriver:
    """ComputeDriver on QEMU processes (see the module docstring)."""

    def __init__(self, run_root: Path, *, accel: str = "auto",
                 qemu_binary: str = "qemu-system-x86_64",
                 log: logging.Logger | None = None,
                 snapshot_observer: SnapshotObserver | None = None) -> None:
        """`snapshot_observer`, if given, is called after every successful
        `snapshot_disks` with its LiveSnapshotTiming (in the caller's thread)."""
        self.log = log or logging.getLogger("ecsnap.compute.qemu")
        self._dirs = RunDirs(run_root)
        self._accel = Accelerator(self._dirs.root, accel, qemu_binary, self.log)
        self.run_root = self._dirs.root
        self.accel = accel
        self.qemu = qemu_binary
        self._lifecycle = QemuLifecycle(self._dirs, self._accel, qemu_binary, self.log)
        self._snapshots = QemuLiveSnapshots(self._dirs, self.log, snapshot_observer)
        self._guest = QemuGuestAgent(self._dirs, self.log)
        self._hotplug = QemuHotPlug(self._dirs, self._guest, self.log)

    def accelerator(self, spec: VmSpec | None = None) -> str:
        """The accelerator a VM gets: as configured, or for "auto" the cached verdict of
        the KVM probe (probing now with the spec's kernel when there is none)."""
        return self._accel.choose(spec)

    # ------------------------------------------------------------ VmLifecycle

    def start(self, spec: VmSpec) -> None:
        self._lifecycle.start(spec)

    def stop(self, instance_id: str, *, force: bool = False, timeout: float = 30.0) -> None:
        self._lifecycle.stop(instance_id, force=force, timeout=timeout)

    def reboot(self, instance_id: str, *, force: bool = False) -> None:
        self._lifecycle.reboot(instance_id, force=force)

    def state(self, instance_id: str) -> VmState:
        return self._lifecycle.state(instance_id)

    def running(self) -> list[str]:
        return self._lifecycle.running()

    def serial_socket(self, instance_id: str) -> str:
        return self._lifecycle.serial_socket(instance_id)

    # ------------------------------------------------------------ LiveSnapshots

    def snapshot_disks(self, instance_id: str, items: Sequence[tuple[str, str]], *,
                       quiesce: bool = True) -> LiveSnapshotResult:
        return self._snapshots.snapshot_disks(instance_id, items, quiesce=quiesce)

    def delete_disk_snapshot(self, instance_id: str, disk_id: str, snapshot_id: str) -> None:
        self._snapshots.delete_disk_snapshot(instance_id, disk_id, snapshot_id)

    def has_disk_snapshot(self, instance_id: str, disk_id: str, snapshot_id: str) -> bool:
        return self._snapshots.has_disk_snapshot(instance_id, disk_id, snapshot_id)

    def resume_guest(self, instance_id: str) -> None:
        self._snapshots.resume_guest(instance_id)

    # ------------------------------------------------------------ DiskHotPlug

    def attach_disk(self, instance_id: str, disk: VmDisk) -> None:
        self._hotplug.attach_disk(instance_id, disk)

    def detach_disk(self, instance_id: str, disk_id: str) -> None:
        self._hotplug.detach_disk(instance_id, disk_id)

    # ------------------------------------------------------------ GuestAgent

    def guest_ping(self, instance_id: str, *, timeout: float = 5.0) -> bool:
        return self._guest.guest_ping(instance_id, timeout=timeout)

    def guest_exec(self, instance_id: str, command: str, *, timeout: float = 60.0,
                   working_dir: str = "/root") -> ExecResult:
        return self._guest.guest_exec(instance_id, command, timeout=timeout,
                                      working_dir=working_dir)

    def guest_write_file(self, instance_id: str, path: str, data: bytes, *,
                         timeout: float = 60.0) -> None:
        self._guest.guest_write_file(instance_id, path, data, timeout=timeout)

    # ------------------------------------------------------------ direct access (tools)

    def pid(self, instance_id: str) -> int | None:
        """The pid of the instance's QEMU, None if it is not running."""
        return self._dirs.pid(instance_id)

    def qmp_command(self, instance_id: str, command: str,
                    arguments: dict[str, object] | None = None, *,
                    timeout: float = 10.0) -> Any:
        """Run one QMP command on the running VM: its `return` value (QmpCommandError if
        QEMU answers with an error, ComputeError if the VM is not running)."""
        with self._dirs.exclusive(instance_id), \
                self._dirs.qmp(instance_id, timeout=timeout) as qmp:
            return qmp.cmd(command, arguments)

    def agent_command(self, instance_id: str, command: str,
                      arguments: dict[str, object] | None = None, *,
                      timeout: float = 10.0) -> Any:
        """Run one guest-agent command: its `return` value (ComputeError if the agent
        reports an error, GuestAgentUnavailable if it does not answer in time)."""
        return self._guest.call(instance_id, command, arguments, timeout=timeout)

    @contextlib.contextmanager
    def borrow_qmp_socket(self, instance_id: str, timeout: float = 60.0) -> Iterator[str]:
        """The path of the running VM's QMP socket, for a QMP client of the caller's own;
        no session of this driver (nor of another process's) opens it until the block
        ends. ComputeError if the VM is not running."""
        with self._dirs.exclusive(instance_id, timeout):
            self._dirs.require(instance_id)
            yield str(self._dirs.dir(instance_id) / "qmp.sock")


__all__ = ["QemuDriver"]
