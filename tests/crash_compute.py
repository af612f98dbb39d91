"""A hypervisor double whose "running VMs" outlive the process that started them.

Crash tests kill a child process with SIGKILL in the middle of a task and recover in
another one; a real QEMU VM would outlive both, and so do this double's VMs: their state
is a JSON file in the data dir (replaced atomically, so a kill never leaves half of it),
read again on every call. Every process that builds a context on that data dir with a
`JsonFileCompute` sees the same VMs.

It keeps the rules of the QEMU driver (and of tests/fakes/compute.py): starting a running
VM leaves it alone and needs its disk files to exist, stopping a stopped one is no error,
reboot, live snapshots, snapshot deletes and hot-plug need a running VM (ComputeError
otherwise), the system disk cannot be unplugged. Live snapshots are `qemu-img snapshot -c`
on the real disk files, all or none, like QEMU's transaction (a name the disk already holds
fails it, as in QEMU). The guest agent answers while the VM runs.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ecsnap.adapters.compute.base import (
    ComputeError,
    ExecResult,
    LiveSnapshotResult,
    VmDisk,
    VmSpec,
    VmState,
)

STATE_FILE = "compute-double.json"


def _snapshots(path: str) -> list[str]:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", path],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise ComputeError(f"could not open disk {path}: {out.stderr.strip()}")
    return [s["name"] for s in json.loads(out.stdout).get("snapshots", [])]


def _exists(path: str) -> bool:
    """A disk file, or an RBD image (its `rbd:` path) that qemu-img can open."""
    if not path.startswith("rbd:"):
        return os.path.exists(path)
    return subprocess.run(["qemu-img", "info", "-U", path], capture_output=True).returncode == 0


def _qemu_img_snapshot(flag: str, name: str, path: str) -> None:
    out = subprocess.run(["qemu-img", "snapshot", flag, name, path],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise ComputeError(f"qemu-img snapshot {flag} {name} {path}: {out.stderr.strip()}")


class JsonFileCompute:
    """`ComputeDriver` whose VMs are records in DATA_DIR/compute-double.json:
    {"vms": {instance: {"disks": {disk: path}, "system": disk}}, "boots": {instance: n},
    "last_disks": {instance: {disk: path}}}. `boots` counts starts and reboots."""

    def __init__(self, data_dir: str | Path) -> None:
        self.path = Path(data_dir) / STATE_FILE

    # ------------------------------------------------------------ the state file

    def load(self) -> dict[str, Any]:
        try:
            state: dict[str, Any] = json.loads(self.path.read_text())
        except FileNotFoundError:
            state = {}
        for key in ("vms", "boots", "last_disks"):
            state.setdefault(key, {})
        return state

    def _save(self, state: dict[str, Any]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
        os.replace(tmp, self.path)

    def _vm(self, state: dict[str, Any], instance_id: str) -> dict[str, Any]:
        vm: dict[str, Any] | None = state["vms"].get(instance_id)
        if vm is None:
            raise ComputeError(f"the VM of {instance_id} is not running")
        return vm

    def vm_disks(self, instance_id: str) -> dict[str, str]:
        """The disks (ID -> path) the running VM has open; {} when it does not run."""
        vm = self.load()["vms"].get(instance_id)
        return dict(vm["disks"]) if vm else {}

    def boots(self, instance_id: str) -> int:
        return int(self.load()["boots"].get(instance_id, 0))

    # ------------------------------------------------------------ VmLifecycle

    def start(self, spec: VmSpec) -> None:
        state = self.load()
        if spec.instance_id in state["vms"]:
            return
        if not spec.disks or not spec.disks[0].system:
            raise ComputeError(f"{spec.instance_id}: a VM boots from its system disk, first")
        for disk in spec.disks:
            if not _exists(disk.path):
                raise ComputeError(f"could not open disk {disk.path}: no such file")
        disks = {d.disk_id: d.path for d in spec.disks}
        state["vms"][spec.instance_id] = {"disks": disks, "system": spec.disks[0].disk_id}
        state["last_disks"][spec.instance_id] = dict(disks)
        state["boots"][spec.instance_id] = state["boots"].get(spec.instance_id, 0) + 1
        self._save(state)

    def stop(self, instance_id: str, *, force: bool = False, timeout: float = 30.0) -> None:
        state = self.load()
        if state["vms"].pop(instance_id, None) is not None:
            self._save(state)

    def reboot(self, instance_id: str, *, force: bool = False) -> None:
        state = self.load()
        self._vm(state, instance_id)
        state["boots"][instance_id] = state["boots"].get(instance_id, 0) + 1
        self._save(state)

    def state(self, instance_id: str) -> VmState:
        running = instance_id in self.load()["vms"]
        return VmState(instance_id, running, None, "double" if running else "")

    def running(self) -> list[str]:
        return sorted(self.load()["vms"])

    def serial_socket(self, instance_id: str) -> str:
        return f"/nonexistent/{instance_id}/serial.sock"

    # ------------------------------------------------------------ LiveSnapshots

    def snapshot_disks(self, instance_id: str, items: Sequence[tuple[str, str]], *,
                       quiesce: bool = True) -> LiveSnapshotResult:
        if not items:
            raise ComputeError("snapshot_disks needs at least one disk")
        vm = self._vm(self.load(), instance_id)
        for disk_id, _ in items:
            if disk_id not in vm["disks"]:
                raise ComputeError(f"the VM has no disk {disk_id}")
        made: list[tuple[str, str]] = []
        try:
            for disk_id, snapshot_id in items:
                path = vm["disks"][disk_id]
                if snapshot_id in _snapshots(path):
                    raise ComputeError(f"{disk_id}: a snapshot {snapshot_id} exists already")
                _qemu_img_snapshot("-c", snapshot_id, path)
                made.append((path, snapshot_id))
        except ComputeError as exc:
            for path, snapshot_id in made:
                _qemu_img_snapshot("-d", snapshot_id, path)
            raise ComputeError(f"snapshot transaction of {instance_id} failed, no snapshot "
                               f"was taken: {exc}") from exc
        return LiveSnapshotResult("FileSystemConsistent" if quiesce else "CrashConsistent",
                                  1.0, "fsfreeze" if quiesce else "pause")

    def delete_disk_snapshot(self, instance_id: str, disk_id: str, snapshot_id: str) -> None:
        vm = self._vm(self.load(), instance_id)
        path = vm["disks"].get(disk_id)
        if path is None:
            raise ComputeError(f"the VM has no disk {disk_id}")
        if snapshot_id in _snapshots(path):
            _qemu_img_snapshot("-d", snapshot_id, path)

    def has_disk_snapshot(self, instance_id: str, disk_id: str, snapshot_id: str) -> bool:
        state = self.load()
        vm = state["vms"].get(instance_id)
        path = vm["disks"].get(disk_id) if vm else \
            state["last_disks"].get(instance_id, {}).get(disk_id)
        if not path or not _exists(path):
            return False
        return snapshot_id in _snapshots(path)

    def resume_guest(self, instance_id: str) -> None:
        return None  # the double never leaves a guest frozen or paused

    # ------------------------------------------------------------ DiskHotPlug

    def attach_disk(self, instance_id: str, disk: VmDisk) -> None:
        state = self.load()
        vm = self._vm(state, instance_id)
        if disk.disk_id in vm["disks"]:
            return
        if not _exists(disk.path):
            raise ComputeError(f"could not open disk {disk.path}: no such file")
        vm["disks"][disk.disk_id] = disk.path
        state["last_disks"][instance_id] = dict(vm["disks"])
        self._save(state)

    def detach_disk(self, instance_id: str, disk_id: str) -> None:
        state = self.load()
        vm = self._vm(state, instance_id)
        if disk_id == vm["system"]:
            raise ComputeError(f"{disk_id} is the system disk of {instance_id}")
        if vm["disks"].pop(disk_id, None) is not None:
            state["last_disks"][instance_id] = dict(vm["disks"])
            self._save(state)

    # ------------------------------------------------------------ GuestAgent

    def guest_ping(self, instance_id: str, *, timeout: float = 5.0) -> bool:
        return instance_id in self.load()["vms"]

    def guest_exec(self, instance_id: str, command: str, *, timeout: float = 60.0,
                   working_dir: str = "/root") -> ExecResult:
        raise ComputeError("the crash-test double runs no guest")

    def guest_write_file(self, instance_id: str, path: str, data: bytes, *,
                         timeout: float = 60.0) -> None:
        raise ComputeError("the crash-test double runs no guest")
