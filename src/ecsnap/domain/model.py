"""Entities of ecsnap and their states, as ECS defines them. Plain dataclasses, no I/O.

The metadata store maps these classes to tables imperatively, so they stay free of any
framework. `eq=False` keeps identity semantics, which the store's identity map needs.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, ClassVar, NamedTuple


class IllegalTransition(RuntimeError):
    """A state change that the entity's life cycle does not allow: a bug, never user input
    (the services check the rules and answer with an ECS code before changing anything)."""


def _move(entity: object, status: StrEnum, allowed: dict[StrEnum, tuple[StrEnum, ...]],
          to: StrEnum) -> None:
    if status != to and status not in allowed.get(to, ()):
        raise IllegalTransition(f"{type(entity).__name__} {getattr(entity, 'id', '')}: "
                                f"{status.value} -> {to.value}")


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


FS_TAG = "FsConsistent"  # ECS's tag on file-system-consistent snapshots and groups
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


QUOTA_KINDS = ("instances", "vcpus", "memory_mib", "disks", "disk_gib", "snapshots")


@dataclass(eq=False)
class Account:
    id: str
    name: str
    password_hash: str = ""
    enabled: bool = True
    created: datetime = field(default_factory=utcnow)
    quotas: dict[str, int] = field(default_factory=dict)  # QUOTA_KINDS set by the admin

    def quota(self, kind: str, defaults: dict[str, int]) -> int | None:
        """The account's limit of `kind`: its own, else the default; None: unlimited."""
        value = self.quotas.get(kind, defaults.get(kind))
        return None if value is None or value < 0 else int(value)


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

    @property
    def shared_storage(self) -> bool:
        """Disks on Ceph RBD, which any host opens; else local qcow2 files, which only
        their own host can (an instance with them is pinned to it)."""
        return self.storage_pool.startswith("rbd:")


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
    status: str = "Available"  # Creating, Available, CreateFailed; Deleted: see DeleteImage
    description: str = ""
    created: datetime = field(default_factory=utcnow)
    # a custom image (CreateImage): the system-disk snapshot it was made from
    source_snapshot_id: str = ""

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
    # the host its compute is (or was last) claimed on: "local" on the single-host server,
    # an agent's host ID in a cluster; None before it was ever placed (service/placement.py)
    host_id: str | None = None

    def holds_reservation(self) -> bool:
        """Running (or on its way) instances, and Stopped ones in KeepCharging, hold compute."""
        if self.status == InstanceStatus.STOPPED:
            return self.stopped_mode == StoppedMode.KEEP_CHARGING
        return True

    # The life cycle. Each transition names the states it may come from; anything else
    # raises IllegalTransition. Recovery uses mark_running/mark_stopped from any state,
    # because the VM's real state is then the truth (`reconcile`).
    _FROM: ClassVar[dict[StrEnum, tuple[StrEnum, ...]]] = {
        InstanceStatus.STARTING: (InstanceStatus.PENDING, InstanceStatus.STOPPED,
                                  InstanceStatus.RUNNING),  # RUNNING: a reboot
        InstanceStatus.RUNNING: (InstanceStatus.STARTING, InstanceStatus.PENDING),
        InstanceStatus.STOPPING: (InstanceStatus.RUNNING,),
        InstanceStatus.STOPPED: (InstanceStatus.PENDING, InstanceStatus.STARTING,
                                 InstanceStatus.STOPPING),
    }

    def mark_starting(self) -> None:
        _move(self, self.status, self._FROM, InstanceStatus.STARTING)
        self.status = InstanceStatus.STARTING

    def mark_running(self, now: datetime | None = None) -> None:
        _move(self, self.status, self._FROM, InstanceStatus.RUNNING)
        self.status, self.started = InstanceStatus.RUNNING, now or utcnow()

    def mark_stopping(self) -> None:
        _move(self, self.status, self._FROM, InstanceStatus.STOPPING)
        self.status = InstanceStatus.STOPPING

    def mark_stopped(self, mode: StoppedMode | None = None) -> None:
        """Stopped; `mode` None keeps the current one (a start that failed)."""
        _move(self, self.status, self._FROM, InstanceStatus.STOPPED)
        self.status = InstanceStatus.STOPPED
        if mode is not None:
            self.stopped_mode = mode

    def reconcile(self, vm_running: bool) -> bool:
        """After a restart, make the status what the hypervisor says; True if it changed.
        A VM that died is Stopped in KeepCharging (its reservation is kept for it)."""
        if vm_running and self.status != InstanceStatus.RUNNING:
            self.status = InstanceStatus.RUNNING
            return True
        if not vm_running and self.status != InstanceStatus.STOPPED:
            self.status, self.stopped_mode = InstanceStatus.STOPPED, StoppedMode.KEEP_CHARGING
            return True
        return False


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
    # the storage volume holding the disk's current content: "" is the volume named by the
    # disk ID (every disk at birth); a rollback by clone and swap moves it to a new one
    volume: str = ""
    auto_snapshot_policy_id: str = ""  # the automatic snapshot policy applied to it, if any

    @property
    def serial_number(self) -> str:
        return self.id.removeprefix("d-")

    @property
    def current_volume(self) -> str:
        """What the storage backend is given for the disk's current content."""
        return self.volume or self.id

    _FROM: ClassVar[dict[StrEnum, tuple[StrEnum, ...]]] = {
        DiskStatus.AVAILABLE: (DiskStatus.CREATING, DiskStatus.ATTACHING, DiskStatus.DETACHING,
                               DiskStatus.IN_USE),  # IN_USE: its instance was deleted
        DiskStatus.IN_USE: (DiskStatus.CREATING, DiskStatus.ATTACHING, DiskStatus.DETACHING,
                            DiskStatus.REINITING),
        DiskStatus.ATTACHING: (DiskStatus.AVAILABLE,),
        DiskStatus.DETACHING: (DiskStatus.IN_USE,),
        DiskStatus.REINITING: (DiskStatus.IN_USE,),
    }

    def _to(self, status: DiskStatus) -> None:
        _move(self, self.status, self._FROM, status)
        self.status = status

    def mark_available(self) -> None:
        """A new disk is made, or an attach was undone."""
        self._to(DiskStatus.AVAILABLE)

    def mark_in_use(self) -> None:
        """An attached disk is usable again (made, re-initialised, or a detach undone)."""
        self._to(DiskStatus.IN_USE)

    def mark_attaching(self) -> None:
        self._to(DiskStatus.ATTACHING)

    def mark_detaching(self) -> None:
        self._to(DiskStatus.DETACHING)

    def mark_reiniting(self) -> None:
        self._to(DiskStatus.REINITING)

    def attach(self, instance_id: str, device: str, *, delete_with_instance: bool | None = None,
               now: datetime | None = None) -> None:
        again = self.status == DiskStatus.IN_USE and self.instance_id == instance_id
        self._to(DiskStatus.IN_USE)
        self.instance_id, self.device = instance_id, device
        if not (again and self.attached_time):
            self.attached_time = now or utcnow()
        if delete_with_instance is not None:
            self.delete_with_instance = delete_with_instance

    def detach(self, now: datetime | None = None) -> None:
        self._to(DiskStatus.AVAILABLE)
        self.instance_id, self.device = None, ""
        self.detached_time, self.delete_with_instance = now or utcnow(), False

    def release(self, now: datetime | None = None) -> None:
        """Released (deleted for the user); the row stays while snapshots refer to it."""
        if self.status != DiskStatus.AVAILABLE:
            self._to(DiskStatus.AVAILABLE)
        self.instance_id, self.device = None, ""
        self.released, self.released_time = True, now or utcnow()


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
    snapshot_type: str = "user"  # SnapshotType: "user" (manual) or "auto" (a policy's)
    policy_id: str = ""  # the automatic snapshot policy that took it ("auto" only)

    def complete(self, consistency: Consistency = Consistency.CRASH,
                 now: datetime | None = None) -> None:
        """Taken: accomplished, at 100 %; file-system-consistent ones carry ECS's tag."""
        if self.status == SnapshotStatus.FAILED:
            raise IllegalTransition(f"Snapshot {self.id}: failed -> accomplished")
        self.status, self.progress, self.consistency = SnapshotStatus.ACCOMPLISHED, 100, \
            consistency
        self.last_modified = now or utcnow()
        if consistency == Consistency.FILE_SYSTEM:
            self.tags = {**self.tags, FS_TAG: "True"}

    def rename(self, name: str | None, description: str | None,
               now: datetime | None = None) -> None:
        if name is not None:
            self.name = name
        if description is not None:
            self.description = description
        self.last_modified = now or utcnow()


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

    def complete(self, consistency: Consistency = Consistency.CRASH,
                 window_ms: float | None = None) -> None:
        if self.status == SnapshotStatus.FAILED:
            raise IllegalTransition(f"SnapshotGroup {self.id}: failed -> accomplished")
        self.status, self.consistency, self.window_ms = SnapshotStatus.ACCOMPLISHED, \
            consistency, window_ms
        if consistency == Consistency.FILE_SYSTEM:
            self.tags = {**self.tags, FS_TAG: "True"}

    def mark_failed(self) -> None:
        self.status = SnapshotStatus.FAILED


WEEKDAYS = range(1, 8)  # RepeatWeekdays: 1 Monday .. 7 Sunday (isoweekday)
HOURS = range(0, 24)  # TimePoints: the hours of a day
MAX_POLICIES_PER_REGION = 100
MAX_AUTO_SNAPSHOTS_PER_DISK = 1000


@dataclass(eq=False)
class AutoSnapshotPolicy:
    """An automatic snapshot policy: at each of `time_points` (hours) on each of
    `repeat_weekdays` (1 Monday .. 7 Sunday), in its region's time zone, a snapshot of every
    disk it is applied to; automatic snapshots older than `retention_days` go (-1: kept)."""

    id: str
    account_id: str
    region_id: str
    name: str = ""
    time_points: list[int] = field(default_factory=list)
    repeat_weekdays: list[int] = field(default_factory=list)
    retention_days: int = -1
    status: str = "Normal"
    tags: dict[str, str] = field(default_factory=dict)
    created: datetime = field(default_factory=utcnow)

    def last_due(self, now_local: datetime) -> datetime | None:
        """The latest time point at or before `now_local` (both naive, in the region's time
        zone), on the hour; None if the policy names no time point."""
        hour = now_local.replace(minute=0, second=0, microsecond=0)
        for back in range(0, 8 * 24):
            at = hour - timedelta(hours=back)
            if at.isoweekday() in self.repeat_weekdays and at.hour in self.time_points:
                return at
        return None

    def previous_due(self, due_local: datetime) -> datetime | None:
        """The time point before `due_local` (on the hour)."""
        return self.last_due(due_local - timedelta(hours=1))

    def expired(self, snap: Snapshot, now: datetime) -> bool:
        """Past its retention (UTC): an automatic snapshot this policy would delete."""
        return self.retention_days > 0 and \
            snap.created + timedelta(days=self.retention_days) <= now


@dataclass(eq=False)
class PolicyRun:
    """The last time point of `policy_id` whose snapshot of `disk_id` was journaled: written
    in the transaction that journals the snapshot, so each time point is taken once."""

    id: str  # f"{policy_id}/{disk_id}"
    policy_id: str
    disk_id: str
    last_due: datetime  # UTC
    snapshot_id: str = ""

    @staticmethod
    def key(policy_id: str, disk_id: str) -> str:
        return f"{policy_id}/{disk_id}"


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
    # cluster mode (service/cluster.py): where its steps must run (None: any agent), the
    # host driving it ("" unclaimed), that host's epoch when it claimed it, its lease
    host_id: str | None = None
    owner: str = ""
    owner_epoch: int = 0
    lease_until: datetime | None = None

    @property
    def progress(self) -> int:
        steps = self.plan.get("steps", [])
        if self.status != TaskStatus.PROCESSING:
            return 100
        return int(100 * len(self.done) / len(steps)) if steps else 0

    def step_done(self, step: str) -> None:
        if self.status != TaskStatus.PROCESSING:
            raise IllegalTransition(f"Task {self.id} is {self.status.value}: no step {step}")
        if step not in self.done:
            self.done = [*self.done, step]

    def finish(self, now: datetime | None = None) -> None:
        if self.status != TaskStatus.PROCESSING:
            raise IllegalTransition(f"Task {self.id}: {self.status.value} -> Finished")
        self.status, self.finished = TaskStatus.FINISHED, now or utcnow()

    def fail(self, code: str, message: str, now: datetime | None = None) -> None:
        if self.status != TaskStatus.PROCESSING:
            raise IllegalTransition(f"Task {self.id}: {self.status.value} -> Failed")
        self.status, self.finished = TaskStatus.FAILED, now or utcnow()
        self.error_code, self.error_message = code, message

    def note(self, **values: Any) -> None:
        """Record an outcome of a step in the task's result."""
        self.result = {**self.result, **values}


class HostState(StrEnum):
    UP = "Up"
    FENCED = "Fenced"


@dataclass(eq=False)
class Host:
    """A hypervisor host in a cluster, as its agent registered it. `epoch` grows each time
    the agent (re)joins and each time it is fenced: an agent's commit is accepted only while
    the row still has its epoch and is Up (service/cluster.py)."""

    id: str
    state: HostState = HostState.UP
    epoch: int = 1
    heartbeat_at: datetime = field(default_factory=utcnow)
    vcpus: int = 0
    memory_mib: int = 0
    address: str = ""  # the agent's listen address (/metrics, serial consoles), host:port
    ceph_addrs: list[str] = field(default_factory=list)  # its RADOS clients, for blocklisting
    started_at: datetime = field(default_factory=utcnow)
    # the key of the short-lived tokens an API process gives the agent to open a serial
    # console (service/console_access.py); never shown, made anew at each (re)join
    serial_secret: str = field(default_factory=lambda: secrets.token_hex(32), repr=False)

    def rejoin(self, at: datetime, *, vcpus: int, memory_mib: int, address: str,
               ceph_addrs: list[str]) -> None:
        """The agent (re)started: a new epoch, Up, its heartbeat and start now, what it has
        and where it listens as it says now, and a new serial secret (a token of the secret
        before, or a secret read from the old process's memory, opens nothing)."""
        self.epoch += 1
        self.state = HostState.UP
        self.heartbeat_at = self.started_at = at
        self.vcpus, self.memory_mib = vcpus, memory_mib
        self.address, self.ceph_addrs = address, ceph_addrs
        self.serial_secret = secrets.token_hex(32)


class IdempotencyKey(NamedTuple):
    """What identifies a ClientToken request: the same token of another account or action
    is another request."""

    account_id: str
    action: str
    token: str


@dataclass(eq=False)
class IdempotencyRecord:
    """The first outcome of a ClientToken request, replayed on a retry."""

    account_id: str
    action: str
    token: str
    params_digest: str
    response: dict[str, Any] = field(default_factory=dict)
    created: datetime = field(default_factory=utcnow)

    @property
    def key(self) -> IdempotencyKey:
        return IdempotencyKey(self.account_id, self.action, self.token)


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
    # cluster mode: the host whose agent runs it (the instance's), and the agent that
    # claimed it under which epoch ("" / 0 until claimed); None on a single host
    host_id: str | None = None
    owner: str = ""
    owner_epoch: int = 0

    @property
    def record_status(self) -> str:
        return "Running" if self.status == InvocationStatus.RUNNING else (
            "Finished" if self.status == InvocationStatus.SUCCESS else "Failed")
