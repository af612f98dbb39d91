"""An in-memory hypervisor (`ComputeDriver`) for fast tests: no QEMU, no qemu-img.

A "VM" is a record of the disks it has open. It opens them through `InMemoryPools`, so
starting a VM whose disk does not exist fails as QEMU would, and its live snapshots are
taken in the in-memory storage, all or none, where the services see them. The guest
agent answers while `agent_up` is true; `guest_exec` runs `exec_handler`.

The QEMU driver's rules are kept: starting a running VM leaves it alone, stopping a
stopped one is no error, reboot, live snapshots, snapshot deletes and hot-plug need a
running VM (ComputeError otherwise), a live snapshot is FileSystemConsistent when the
agent answers a quiesced snapshot and CrashConsistent (the VM paused) otherwise, and
`has_disk_snapshot` also answers for a stopped VM (from the disks it last had open).

Failure injection: `fail_start`, `fail_snapshot_of` (a disk: the whole live snapshot
fails and none is taken), `fail_stop`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ecsnap.adapters.compute.base import (
    ComputeError,
    ExecResult,
    GuestAgentUnavailable,
    LiveSnapshotResult,
    VmDisk,
    VmSpec,
    VmState,
)
from ecsnap.adapters.storage.base import StorageError
from tests.fakes.storage import InMemoryPools, InMemoryStorage

WINDOW_MS = 1.0  # the freeze (or pause) window every live snapshot reports


@dataclass
class FakeVm:
    spec: VmSpec
    pid: int
    disks: dict[str, str] = field(default_factory=dict)  # disk ID -> path
    system_disk: str = ""
    reboots: int = 0


def _no_guest_commands(instance_id: str, command: str) -> ExecResult:
    return ExecResult(exit_code=0)


class InMemoryCompute:
    def __init__(self, pools: InMemoryPools) -> None:
        self.pools = pools
        self.vms: dict[str, FakeVm] = {}
        self.last_disks: dict[str, dict[str, str]] = {}  # instance -> disks it last had open
        self.started: list[str] = []  # every start, in order
        self.stopped: list[tuple[str, bool]] = []  # (instance, force) of every stop
        self.commands: list[tuple[str, str]] = []  # (instance, command) of guest_exec
        self.guest_files: dict[tuple[str, str], bytes] = {}  # of guest_write_file
        self.snapshots_taken: list[tuple[str, tuple[tuple[str, str], ...]]] = []
        self.agent_up = True
        self.exec_handler: Callable[[str, str], ExecResult] = _no_guest_commands
        self.fail_start: set[str] = set()
        self.fail_stop: set[str] = set()
        self.fail_snapshot_of: str | None = None
        self._pids = iter(range(40_000, 1_000_000))
        self._lock = threading.RLock()

    def _vm(self, instance_id: str) -> FakeVm:
        vm = self.vms.get(instance_id)
        if vm is None:
            raise ComputeError(f"the VM of {instance_id} is not running")
        return vm

    def _open(self, path: str) -> tuple[InMemoryStorage, str]:
        try:
            return self.pools.open(path)
        except StorageError as exc:
            raise ComputeError(f"could not open disk {path}: {exc}") from exc

    # ------------------------------------------------------------ VmLifecycle

    def start(self, spec: VmSpec) -> None:
        with self._lock:
            if spec.instance_id in self.vms:
                return
            if spec.instance_id in self.fail_start:
                raise ComputeError(f"QEMU did not start for {spec.instance_id}: injected")
            if not spec.disks:
                raise ComputeError(f"{spec.instance_id}: a VM needs a system disk")
            for disk in spec.disks:
                self._open(disk.path)
            disks = {d.disk_id: d.path for d in spec.disks}
            self.vms[spec.instance_id] = FakeVm(spec, next(self._pids), disks,
                                                spec.disks[0].disk_id)
            self.last_disks[spec.instance_id] = dict(disks)
            self.started.append(spec.instance_id)

    def stop(self, instance_id: str, *, force: bool = False, timeout: float = 30.0) -> None:
        with self._lock:
            if instance_id in self.fail_stop:
                raise ComputeError(f"QEMU of {instance_id} survives SIGKILL: injected")
            self.stopped.append((instance_id, force))
            self.vms.pop(instance_id, None)

    def reboot(self, instance_id: str, *, force: bool = False) -> None:
        with self._lock:
            self._vm(instance_id).reboots += 1

    def state(self, instance_id: str) -> VmState:
        vm = self.vms.get(instance_id)
        if vm is None:
            return VmState(instance_id, False)
        return VmState(instance_id, True, vm.pid, "fake")

    def running(self) -> list[str]:
        return list(self.vms)

    def serial_socket(self, instance_id: str) -> str:
        return f"/nonexistent/{instance_id}/serial.sock"

    # ------------------------------------------------------------ LiveSnapshots

    def snapshot_disks(self, instance_id: str, items: Sequence[tuple[str, str]], *,
                       quiesce: bool = True) -> LiveSnapshotResult:
        if not items:
            raise ComputeError("snapshot_disks needs at least one disk")
        with self._lock:
            vm = self._vm(instance_id)
            by_backend: dict[int, tuple[InMemoryStorage, list[tuple[str, str]]]] = {}
            for disk_id, snapshot_id in items:
                if disk_id not in vm.disks:
                    raise ComputeError(f"the VM has no disk {disk_id}")
                if disk_id == self.fail_snapshot_of:
                    raise ComputeError(f"snapshot transaction of {instance_id} failed, no "
                                       f"snapshot was taken: injected failure on {disk_id}")
                backend, name = self._open(vm.disks[disk_id])
                by_backend.setdefault(id(backend), (backend, []))[1].append((name, snapshot_id))
            done: list[tuple[InMemoryStorage, list[tuple[str, str]]]] = []
            try:
                for backend, pairs in by_backend.values():
                    fresh = [p for p in pairs if not backend.has_snapshot(*p)]
                    backend.create_snapshots(pairs)
                    done.append((backend, fresh))
            except StorageError as exc:
                for backend, pairs in done:
                    for pair in pairs:
                        backend.delete_snapshot(*pair)
                raise ComputeError(f"snapshot transaction of {instance_id} failed, no "
                                   f"snapshot was taken: {exc}") from exc
            self.snapshots_taken.append((instance_id, tuple(items)))
        frozen = quiesce and self.agent_up
        return LiveSnapshotResult("FileSystemConsistent" if frozen else "CrashConsistent",
                                  WINDOW_MS, "fsfreeze" if frozen else "pause")

    def delete_disk_snapshot(self, instance_id: str, disk_id: str, snapshot_id: str) -> None:
        with self._lock:
            vm = self._vm(instance_id)
            if disk_id not in vm.disks:
                raise ComputeError(f"the VM has no disk {disk_id}")
            backend, name = self._open(vm.disks[disk_id])
            backend.delete_snapshot(name, snapshot_id)

    def has_disk_snapshot(self, instance_id: str, disk_id: str, snapshot_id: str) -> bool:
        vm = self.vms.get(instance_id)
        path = vm.disks.get(disk_id) if vm is not None else \
            self.last_disks.get(instance_id, {}).get(disk_id)
        if not path:
            return False
        try:
            backend, name = self.pools.open(path)
        except StorageError:
            return False
        return backend.has_snapshot(name, snapshot_id)

    def resume_guest(self, instance_id: str) -> None:
        return None  # a fake VM is never left frozen or paused

    # ------------------------------------------------------------ DiskHotPlug

    def attach_disk(self, instance_id: str, disk: VmDisk) -> None:
        with self._lock:
            vm = self._vm(instance_id)
            if disk.disk_id in vm.disks:
                return
            self._open(disk.path)
            vm.disks[disk.disk_id] = disk.path
            self.last_disks[instance_id] = dict(vm.disks)

    def detach_disk(self, instance_id: str, disk_id: str) -> None:
        with self._lock:
            vm = self._vm(instance_id)
            if disk_id == vm.system_disk:
                raise ComputeError(f"{disk_id} is the system disk of {instance_id}")
            vm.disks.pop(disk_id, None)
            self.last_disks[instance_id] = dict(vm.disks)

    # ------------------------------------------------------------ GuestAgent

    def guest_ping(self, instance_id: str, *, timeout: float = 5.0) -> bool:
        if instance_id in self.vms and self.agent_up:
            return True
        time.sleep(min(timeout, 0.01))  # a caller that polls does not spin
        return False

    def guest_exec(self, instance_id: str, command: str, *, timeout: float = 60.0,
                   working_dir: str = "/root") -> ExecResult:
        self._vm(instance_id)
        if not self.agent_up:
            raise GuestAgentUnavailable(f"the guest agent of {instance_id} does not answer")
        self.commands.append((instance_id, command))
        return self.exec_handler(instance_id, command)

    def guest_write_file(self, instance_id: str, path: str, data: bytes, *,
                         timeout: float = 60.0) -> None:
        self._vm(instance_id)
        if not self.agent_up:
            raise GuestAgentUnavailable(f"the guest agent of {instance_id} does not answer")
        self.guest_files[(instance_id, path)] = data
