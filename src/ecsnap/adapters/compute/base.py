"""The compute contract, split by capability (like storage/base.py): run instances as VMs,
snapshot their disks live, hot-plug disks, talk to the guest.

Every method that takes an instance ID acts on that instance's VM; errors are raised as
`ComputeError` (`GuestAgentUnavailable` when the guest agent does not answer), and the
services turn them into ECS errors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


class ComputeError(Exception):
    """A hypervisor operation failed."""


class GuestAgentUnavailable(ComputeError):
    """The guest agent did not answer in time."""


@dataclass(frozen=True)
class VmDisk:
    disk_id: str
    path: str
    system: bool


@dataclass(frozen=True)
class VmSpec:
    instance_id: str
    vcpus: int
    memory_mib: int
    disks: Sequence[VmDisk]  # the system disk first
    boot_mode: str = "bios"  # "direct": kernel + initrd + args; "bios": from the system disk
    kernel_path: str = ""
    initrd_path: str = ""
    kernel_args: str = ""


@dataclass(frozen=True)
class LiveSnapshotResult:
    consistency: str  # domain.model.Consistency value
    window_ms: float  # how long the guest was frozen or paused
    method: str  # "fsfreeze" or "pause"


@dataclass(frozen=True)
class ExecResult:
    exit_code: int | None  # None: killed at timeout
    stdout: bytes = b""
    stderr: bytes = b""
    timed_out: bool = False
    truncated: bool = False


@dataclass(frozen=True)
class VmState:
    instance_id: str
    running: bool
    pid: int | None = None
    accelerator: str = ""
    extra: dict[str, str] = field(default_factory=dict)


class VmLifecycle(Protocol):
    """Run an instance as a VM: start, stop, reboot, and tell which VMs run."""

    def start(self, spec: VmSpec) -> None:
        """Start the VM detached from this process (it survives a restart of ecsnap).
        A VM that is already running is left as it is."""
        ...

    def stop(self, instance_id: str, *, force: bool = False, timeout: float = 30.0) -> None:
        """Shut the guest down (agent, then ACPI, then quit after `timeout`); force: quit now.
        Returns once the VM process is gone. A VM that is not running is not an error."""
        ...

    def reboot(self, instance_id: str, *, force: bool = False) -> None:
        """Ask the guest to reboot (agent, else Ctrl-Alt-Del); force: reset the VM now.
        The VM keeps running through the reboot."""
        ...

    def state(self, instance_id: str) -> VmState:
        """Whether the instance's VM runs, with its pid and accelerator; an instance that
        has no VM is simply not running."""
        ...

    def running(self) -> list[str]:
        """IDs of the instances whose VM process is alive (to reattach at start-up)."""
        ...

    def serial_socket(self, instance_id: str) -> str:
        """Path of the unix socket on which the VM's serial console is served."""
        ...


class LiveSnapshots(Protocol):
    """Internal snapshots of the disks of a running VM (the VM has them open)."""

    def snapshot_disks(self, instance_id: str, items: Sequence[tuple[str, str]], *,
                       quiesce: bool = True) -> LiveSnapshotResult:
        """Take internal snapshot `snapshot_id` of each (disk_id, snapshot_id) of a running VM
        in one atomic transaction: all or none. With quiesce, freeze the guest file systems
        through the agent first (pause the VM when no agent answers), and always thaw."""
        ...

    def delete_disk_snapshot(self, instance_id: str, disk_id: str, snapshot_id: str) -> None:
        """Remove an internal snapshot of a disk that a running VM has open; a snapshot
        that is already gone is not an error."""
        ...

    def has_disk_snapshot(self, instance_id: str, disk_id: str, snapshot_id: str) -> bool:
        """Whether the disk holds the snapshot (asked of the VM while it runs)."""
        ...

    def resume_guest(self, instance_id: str) -> None:
        """Thaw the guest's file systems and resume a paused VM (after a crash that cut a
        live snapshot short); a VM that is neither frozen nor paused is left alone."""
        ...


class DiskHotPlug(Protocol):
    """Disks attached to and detached from a running VM."""

    def attach_disk(self, instance_id: str, disk: VmDisk) -> None:
        """Plug the disk into the running VM; a disk it already has is not an error."""
        ...

    def detach_disk(self, instance_id: str, disk_id: str) -> None:
        """Unplug a data disk from the running VM (the guest lets go of it first, best
        effort); ComputeError for the system disk."""
        ...


class GuestAgent(Protocol):
    """Talk to the guest through its agent."""

    def guest_ping(self, instance_id: str, *, timeout: float = 5.0) -> bool:
        """True once the guest agent answers."""
        ...

    def guest_exec(self, instance_id: str, command: str, *, timeout: float = 60.0,
                   working_dir: str = "/root") -> ExecResult:
        """Run `/bin/sh -c command` in the guest through the agent."""
        ...

    def guest_write_file(self, instance_id: str, path: str, data: bytes, *,
                         timeout: float = 60.0) -> None:
        """Create (or truncate) the guest file `path` and write `data` into it through the
        agent (the guest's own rules: the agent follows the guest's symlinks, inside the
        guest); mode and owner are set afterwards with `guest_exec`."""
        ...


class ComputeDriver(VmLifecycle, LiveSnapshots, DiskHotPlug, GuestAgent, Protocol):
    """Everything the services need from a hypervisor."""


class BuiltImage(Protocol):
    """What a guest-image builder produces: a root file system template and a kernel."""

    @property
    def kernel_path(self) -> Path: ...

    @property
    def initrd_path(self) -> Path: ...

    @property
    def rootfs_path(self) -> Path: ...

    @property
    def kernel_args(self) -> str: ...

    @property
    def os_name(self) -> str: ...

    @property
    def size_gib(self) -> int: ...


class GuestImageBuilder(Protocol):
    def __call__(self, out_dir: Path, cache_dir: Path) -> BuiltImage: ...
