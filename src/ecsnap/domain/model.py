"""Entities of ecsnap and their states, as ECS defines them. Plain dataclasses, no I/O.

The metadata store maps these classes to tables imperatively, so they stay free of any
framework. `eq=False` keeps identity semantics, which the store's identity map needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any


def utcnow() -> datetime:
    return datetime.now(UTC).replace(microsecond=0, tzinfo=None)


def iso(value: datetime | None) -> str:
    """UTC ISO 8601 as ECS prints it: 2026-11-24T10:58:48Z."""
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value else ""


class InstanceStatus(StrEnum):
    PENDING = "Pending"
    STARTING = "Starting"
    RUNNING = "Running"
    STOPPING = "Stopping"
    STOPPED = "Stopped"


class StoppedMode(StrEnum):
    KEEP_CHARGING = "KeepCharging"
    STOP_CHARGING = "StopCharging"
    NOT_APPLICABLE = "Not-applicable"


class DiskStatus(StrEnum):
    CREATING = "Creating"
    AVAILABLE = "Available"
    IN_USE = "In_use"
    ATTACHING = "Attaching"
    DETACHING = "Detaching"
    REINITING = "ReIniting"


class DiskType(StrEnum):
    SYSTEM = "system"
    DATA = "data"


class SnapshotStatus(StrEnum):
    PROGRESSING = "progressing"
    ACCOMPLISHED = "accomplished"
    FAILED = "failed"


class Consistency(StrEnum):
    CRASH = "CrashConsistent"
    FILE_SYSTEM = "FileSystemConsistent"


class TaskStatus(StrEnum):
    PROCESSING = "Processing"
    FINISHED = "Finished"
    FAILED = "Failed"


class GroupPurpose(StrEnum):
    USER = "user"
    SAFETY = "safety"


DISK_CATEGORIES = ("cloud", "cloud_efficiency", "cloud_ssd", "cloud_essd")
MAX_DATA_DISKS = 16
MAX_GROUP_DISKS = 16
MAX_MANUAL_SNAPSHOTS_PER_DISK = 256
GIB = 1024**3


@dataclass(frozen=True)
class InstanceType:
    name: str
    vcpus: int
    memory_mib: int

    @property
    def family(self) -> str:
        return ".".join(self.name.split(".")[:2])


# A small catalogue of ECS-style instance types; a region's config may replace it.
DEFAULT_INSTANCE_TYPES: tuple[InstanceType, ...] = (
    InstanceType("ecs.t5-lc2m1.nano", 1, 512),
    InstanceType("ecs.t6-c1m1.large", 2, 2048),
    InstanceType("ecs.g6.large", 2, 8192),
    InstanceType("ecs.g6.xlarge", 4, 16384),
    InstanceType("ecs.c6.large", 2, 4096),
    InstanceType("ecs.r6.large", 2, 16384),
)


@dataclass(eq=False)
class Account:
    id: str
    name: str
    password_hash: str = ""
    enabled: bool = True
    created: datetime = field(default_factory=utcnow)


@dataclass(eq=False)
class AccessKey:
    id: str
    secret: str
    account_id: str
    enabled: bool = True
    created: datetime = field(default_factory=utcnow)


@dataclass(eq=False)
class Region:
    id: str
    local_name: str
    vcpu_capacity: int
    memory_mib_capacity: int
    storage_pool: str
    instance_types: list[dict[str, Any]] = field(default_factory=list)

    def catalogue(self) -> tuple[InstanceType, ...]:
        if not self.instance_types:
            return DEFAULT_INSTANCE_TYPES
        return tuple(InstanceType(t["name"], int(t["vcpus"]), int(t["memory_mib"]))
                     for t in self.instance_types)

    def instance_type(self, name: str) -> InstanceType | None:
        return next((t for t in self.catalogue() if t.name == name), None)


@dataclass(eq=False)
class Zone:
    id: str
    region_id: str
    local_name: str


@dataclass(eq=False)
class Image:
    id: str
    region_id: str
    name: str
    os_name: str
    template_path: str
    size_gib: int
    account_id: str | None = None  # None: a system image every account may use
    os_type: str = "linux"
    architecture: str = "x86_64"
    boot_mode: str = "bios"  # "direct" (kernel + initrd) or "bios" (boot from the system disk)
    kernel_path: str = ""
    initrd_path: str = ""
    kernel_args: str = ""
    status: str = "Available"
    description: str = ""
    created: datetime = field(default_factory=utcnow)

    @property
    def owner_alias(self) -> str:
        return "system" if self.account_id is None else "self"


@dataclass(eq=False)
class Instance:
    id: str
    account_id: str
    region_id: str
    zone_id: str
    instance_type: str
    vcpus: int
    memory_mib: int
    image_id: str
    name: str = ""
    description: str = ""
    status: InstanceStatus = InstanceStatus.PENDING
    stopped_mode: StoppedMode = StoppedMode.NOT_APPLICABLE
    lock_task_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    created: datetime = field(default_factory=utcnow)
    started: datetime | None = None
    host_name: str = ""

    def holds_reservation(self) -> bool:
        """Running (or on its way) instances, and Stopped ones in KeepCharging, hold compute."""
        if self.status == InstanceStatus.STOPPED:
            return self.stopped_mode == StoppedMode.KEEP_CHARGING
        return True


@dataclass(eq=False)
class Disk:
    id: str
    account_id: str
    region_id: str
    zone_id: str
    size_gib: int
    type: DiskType = DiskType.DATA
    category: str = "cloud_essd"
    name: str = ""
    description: str = ""
    status: DiskStatus = DiskStatus.CREATING
    instance_id: str | None = None
    device: str = ""
    delete_with_instance: bool = True
    image_id: str = ""
    source_snapshot_id: str = ""
    lock_task_id: str | None = None
    released: bool = False
    portable: bool = True
    tags: dict[str, str] = field(default_factory=dict)
    created: datetime = field(default_factory=utcnow)
    attached_time: datetime | None = None
    detached_time: datetime | None = None
    released_time: datetime | None = None

    @property
    def serial_number(self) -> str:
        return self.id.removeprefix("d-")


@dataclass(eq=False)
class Snapshot:
    id: str
    account_id: str
    region_id: str
    source_disk_id: str
    source_disk_type: DiskType
    source_disk_size: int
    instance_id: str = ""
    name: str = ""
    description: str = ""
    status: SnapshotStatus = SnapshotStatus.PROGRESSING
    progress: int = 0
    group_id: str | None = None
    consistency: Consistency = Consistency.CRASH
    retention_days: int | None = None
    tags: dict[str, str] = field(default_factory=dict)
    created: datetime = field(default_factory=utcnow)
    last_modified: datetime = field(default_factory=utcnow)


@dataclass(eq=False)
class SnapshotGroup:
    id: str
    account_id: str
    region_id: str
    instance_id: str
    name: str = ""
    description: str = ""
    status: SnapshotStatus = SnapshotStatus.PROGRESSING
    purpose: GroupPurpose = GroupPurpose.USER
    consistency: Consistency = Consistency.CRASH
    window_ms: float | None = None
    tags: dict[str, str] = field(default_factory=dict)
    created: datetime = field(default_factory=utcnow)


@dataclass(eq=False)
class Task:
    """A multi-step operation and its journal: `plan` says what to do, `done` what is done."""

    id: str
    account_id: str
    region_id: str
    action: str
    resource_id: str = ""
    status: TaskStatus = TaskStatus.PROCESSING
    plan: dict[str, Any] = field(default_factory=dict)
    done: list[str] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)
    error_code: str = ""
    error_message: str = ""
    created: datetime = field(default_factory=utcnow)
    finished: datetime | None = None

    @property
    def progress(self) -> int:
        steps = self.plan.get("steps", [])
        if self.status != TaskStatus.PROCESSING:
            return 100
        return int(100 * len(self.done) / len(steps)) if steps else 0


@dataclass(eq=False)
class IdempotencyRecord:
    """The first outcome of a ClientToken request, replayed on a retry."""

    account_id: str
    action: str
    token: str
    params_digest: str
    response: dict[str, Any] = field(default_factory=dict)
    created: datetime = field(default_factory=utcnow)


class InvocationStatus(StrEnum):
    RUNNING = "Running"
    SUCCESS = "Success"
    FAILED = "Failed"
    TIMEOUT = "Timeout"
    ERROR = "Error"


@dataclass(eq=False)
class Invocation:
    """One run of a Cloud Assistant command on one instance (through the guest agent)."""

    id: str  # this instance's record of the run
    invoke_id: str  # InvokeId, t-..., shared by the instances of one RunCommand
    command_id: str  # c-...
    account_id: str
    region_id: str
    instance_id: str
    command_type: str
    command_content: str
    name: str = ""
    working_dir: str = "/root"
    timeout: int = 60
    status: InvocationStatus = InvocationStatus.RUNNING
    exit_code: int | None = None
    output: str = ""  # text as the guest printed it (capped)
    dropped: int = 0
    error_code: str = ""
    error_info: str = ""
    created: datetime = field(default_factory=utcnow)
    started: datetime | None = None
    finished: datetime | None = None

    @property
    def record_status(self) -> str:
        return "Running" if self.status == InvocationStatus.RUNNING else (
            "Finished" if self.status == InvocationStatus.SUCCESS else "Failed")
