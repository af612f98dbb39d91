"""Test doubles. They live here only: the product has no fakes.

`FileBackedCompute` stands in for the QEMU driver in service tests: it keeps "running"
VMs as a set and takes live snapshots with `qemu-img` on the real disk files (nothing
has them open), all or none, like QEMU's transaction would.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from ecsnap.adapters.compute.base import (
    ComputeError,
    ExecResult,
    LiveSnapshotResult,
    VmDisk,
    VmSpec,
    VmState,
)


class FileBackedCompute:
    def __init__(self) -> None:
        self.vms: dict[str, dict[str, str]] = {}  # instance -> disk id -> path
        self.started: list[str] = []
        self.agent_up = True
        self.fail_snapshot_of: str | None = None

    def start(self, spec: VmSpec) -> None:
        self.vms[spec.instance_id] = {d.disk_id: d.path for d in spec.disks}
        self.started.append(spec.instance_id)

    def stop(self, instance_id: str, *, force: bool = False, timeout: float = 30.0) -> None:
        self.vms.pop(instance_id, None)

    def reboot(self, instance_id: str, *, force: bool = False) -> None:
        pass

    def state(self, instance_id: str) -> VmState:
        return VmState(instance_id, instance_id in self.vms)

    def running(self) -> list[str]:
        return list(self.vms)

    def snapshot_disks(self, instance_id: str, items: Sequence[tuple[str, str]], *,
                       quiesce: bool = True) -> LiveSnapshotResult:
        paths = self.vms[instance_id]
        made: list[tuple[str, str]] = []
        try:
            for disk_id, snap_id in items:
                if disk_id == self.fail_snapshot_of:
                    raise ComputeError(f"injected failure on {disk_id}")
                subprocess.run(["qemu-img", "snapshot", "-c", snap_id, paths[disk_id]],
                               check=True, capture_output=True)
                made.append((paths[disk_id], snap_id))
        except (subprocess.CalledProcessError, ComputeError) as exc:
            for path, snap_id in made:
                subprocess.run(["qemu-img", "snapshot", "-d", snap_id, path], check=True)
            raise ComputeError(str(exc)) from exc
        fs = quiesce and self.agent_up
        return LiveSnapshotResult("FileSystemConsistent" if fs else "CrashConsistent", 1.0,
                                  "fsfreeze" if fs else "pause")

    def delete_disk_snapshot(self, instance_id: str, disk_id: str, snapshot_id: str) -> None:
        subprocess.run(["qemu-img", "snapshot", "-d", snapshot_id,
                        self.vms[instance_id][disk_id]], capture_output=True)

    def has_disk_snapshot(self, instance_id: str, disk_id: str, snapshot_id: str) -> bool:
        out = subprocess.run(["qemu-img", "snapshot", "-l", self.vms[instance_id][disk_id]],
                             capture_output=True, text=True).stdout
        return snapshot_id in out

    def attach_disk(self, instance_id: str, disk: VmDisk) -> None:
        self.vms[instance_id][disk.disk_id] = disk.path

    def detach_disk(self, instance_id: str, disk_id: str) -> None:
        self.vms[instance_id].pop(disk_id, None)

    def guest_ping(self, instance_id: str, *, timeout: float = 5.0) -> bool:
        return instance_id in self.vms and self.agent_up

    def guest_exec(self, instance_id: str, command: str, *, timeout: float = 60.0,
                   working_dir: str = "/root") -> ExecResult:
        raise ComputeError("the test double runs no guest")

    def guest_write_file(self, instance_id: str, path: str, data: bytes, *,
                         timeout: float = 60.0) -> None:
        raise ComputeError("the test double runs no guest")

    def serial_socket(self, instance_id: str) -> str:
        return ""

    def resume_guest(self, instance_id: str) -> None:
        pass
