"""Tables of the metadata store, mapped imperatively onto the domain's dataclasses.

Portable SQL only (SQLite and PostgreSQL): strings, integers, booleans, naive UTC
timestamps, JSON. Enums are stored by value in plain string columns.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.mutable import MutableDict, MutableList
from sqlalchemy.orm import registry

from ecsnap.domain import model

metadata = MetaData()
mapper_registry = registry(metadata=metadata)


class StrEnumColumn(TypeDecorator[StrEnum]):
    """A StrEnum stored by value in a plain string column, as SQLAlchemy's Enum type stores
    it (native_enum=False, no constraint), read back through one dict lookup per value:
    that type calls two Python functions per value, and a page of 100 snapshot groups
    reads 900 values. Writing a value that is not a member's raises, as its
    validate_strings does; so does reading one (a row no release of ecsnap wrote)."""

    impl = String(32)
    cache_ok = True

    def __init__(self, enum_class: type[StrEnum]) -> None:
        super().__init__(length=32)
        self.enum_class = enum_class
        self.members: dict[str | None, StrEnum | None] = {None: None}
        self.members.update((m.value, m) for m in enum_class)

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        if value is None:
            return None
        member = self.members.get(value) if isinstance(value, str) else None
        if member is None:
            raise LookupError(f"{value!r} is not among the defined values of "
                              f"{self.enum_class.__name__}")
        return member.value

    def result_processor(self, dialect: Dialect, coltype: object) -> Callable[[Any], Any]:
        return self.members.__getitem__


def _enum(cls: type[StrEnum]) -> StrEnumColumn:
    return StrEnumColumn(cls)


JsonDict = MutableDict.as_mutable(JSON)
JsonList = MutableList.as_mutable(JSON)


def _id(name: str = "id") -> Column[str]:
    return Column(name, String(64), primary_key=True)


accounts = Table(
    "accounts", metadata,
    _id(),
    Column("name", String(128), nullable=False, unique=True),
    Column("password_hash", String(256), nullable=False, default=""),
    Column("enabled", Boolean, nullable=False, default=True),
    Column("created", DateTime, nullable=False),
    Column("quotas", JsonDict, nullable=False, default=dict),
)

access_keys = Table(
    "access_keys", metadata,
    _id(),
    Column("secret", String(128), nullable=False),
    Column("account_id", String(64), nullable=False, index=True),
    Column("enabled", Boolean, nullable=False, default=True),
    Column("created", DateTime, nullable=False),
)

regions = Table(
    "regions", metadata,
    _id(),
    Column("local_name", String(128), nullable=False),
    Column("vcpu_capacity", Integer, nullable=False),
    Column("memory_mib_capacity", Integer, nullable=False),
    Column("storage_pool", Text, nullable=False),
    Column("instance_types", JsonList, nullable=False),
)

zones = Table(
    "zones", metadata,
    _id(),
    Column("region_id", String(64), nullable=False, index=True),
    Column("local_name", String(128), nullable=False),
)

images = Table(
    "images", metadata,
    _id(),
    Column("region_id", String(64), nullable=False, index=True),
    Column("account_id", String(64), nullable=True, index=True),
    Column("name", String(128), nullable=False),
    Column("os_name", String(256), nullable=False),
    Column("os_type", String(16), nullable=False),
    Column("architecture", String(16), nullable=False),
    Column("template_path", Text, nullable=False),
    Column("size_gib", Integer, nullable=False),
    Column("boot_mode", String(16), nullable=False),
    Column("kernel_path", Text, nullable=False),
    Column("initrd_path", Text, nullable=False),
    Column("kernel_args", Text, nullable=False),
    Column("status", String(32), nullable=False),
    Column("description", Text, nullable=False),
    Column("created", DateTime, nullable=False),
    Column("source_snapshot_id", String(64), nullable=False, default="", index=True),
)

instances = Table(
    "instances", metadata,
    _id(),
    Column("account_id", String(64), nullable=False),
    Column("region_id", String(64), nullable=False),
    Column("zone_id", String(64), nullable=False),
    Column("instance_type", String(64), nullable=False),
    Column("vcpus", Integer, nullable=False),
    Column("memory_mib", Integer, nullable=False),
    Column("image_id", String(64), nullable=False),
    Column("name", String(128), nullable=False),
    Column("description", Text, nullable=False),
    Column("status", _enum(model.InstanceStatus), nullable=False),
    Column("stopped_mode", _enum(model.StoppedMode), nullable=False),
    Column("lock_task_id", String(64), nullable=True),
    Column("tags", JsonDict, nullable=False),
    Column("created", DateTime, nullable=False),
    Column("started", DateTime, nullable=True),
    Column("host_name", String(128), nullable=False),
    Column("host_id", String(64), nullable=True),
    Index("ix_instances_owner", "account_id", "region_id", "created", "id"),
    Index("ix_instances_host", "host_id"),
)

disks = Table(
    "disks", metadata,
    _id(),
    Column("account_id", String(64), nullable=False),
    Column("region_id", String(64), nullable=False),
    Column("zone_id", String(64), nullable=False),
    Column("size_gib", Integer, nullable=False),
    Column("type", _enum(model.DiskType), nullable=False),
    Column("category", String(32), nullable=False),
    Column("name", String(128), nullable=False),
    Column("description", Text, nullable=False),
    Column("status", _enum(model.DiskStatus), nullable=False),
    Column("instance_id", String(64), nullable=True, index=True),
    Column("device", String(32), nullable=False),
    Column("delete_with_instance", Boolean, nullable=False),
    Column("image_id", String(64), nullable=False),
    Column("source_snapshot_id", String(64), nullable=False, index=True),
    Column("lock_task_id", String(64), nullable=True),
    Column("released", Boolean, nullable=False),
    Column("portable", Boolean, nullable=False),
    Column("tags", JsonDict, nullable=False),
    Column("created", DateTime, nullable=False),
    Column("attached_time", DateTime, nullable=True),
    Column("detached_time", DateTime, nullable=True),
    Column("released_time", DateTime, nullable=True),
    Column("volume", String(200), nullable=False, default=""),
    Column("auto_snapshot_policy_id", String(64), nullable=False, default="", index=True),
    Index("ix_disks_owner", "account_id", "region_id", "created", "id"),
)

snapshots = Table(
    "snapshots", metadata,
    _id(),
    Column("account_id", String(64), nullable=False),
    Column("region_id", String(64), nullable=False),
    Column("source_disk_id", String(64), nullable=False, index=True),
    Column("source_disk_type", _enum(model.DiskType), nullable=False),
    Column("source_disk_size", Integer, nullable=False),
    Column("instance_id", String(64), nullable=False),
    Column("name", String(128), nullable=False),
    Column("description", Text, nullable=False),
    Column("status", _enum(model.SnapshotStatus), nullable=False),
    Column("progress", Integer, nullable=False),
    Column("group_id", String(64), nullable=True, index=True),
    Column("consistency", _enum(model.Consistency), nullable=False),
    Column("retention_days", Integer, nullable=True),
    Column("tags", JsonDict, nullable=False),
    Column("created", DateTime, nullable=False),
    Column("last_modified", DateTime, nullable=False),
    Column("snapshot_type", String(16), nullable=False, default="user"),
    Column("policy_id", String(64), nullable=False, default=""),
    Index("ix_snapshots_owner", "account_id", "region_id", "created", "id"),
)

snapshot_groups = Table(
    "snapshot_groups", metadata,
    _id(),
    Column("account_id", String(64), nullable=False),
    Column("region_id", String(64), nullable=False),
    Column("instance_id", String(64), nullable=False, index=True),
    Column("name", String(128), nullable=False),
    Column("description", Text, nullable=False),
    Column("status", _enum(model.SnapshotStatus), nullable=False),
    Column("purpose", _enum(model.GroupPurpose), nullable=False),
    Column("consistency", _enum(model.Consistency), nullable=False),
    Column("window_ms", Float, nullable=True),
    Column("tags", JsonDict, nullable=False),
    Column("created", DateTime, nullable=False),
    Index("ix_snapshot_groups_owner", "account_id", "region_id", "created", "id"),
)

tasks = Table(
    "tasks", metadata,
    _id(),
    Column("account_id", String(64), nullable=False),
    Column("region_id", String(64), nullable=False),
    Column("action", String(64), nullable=False),
    Column("resource_id", String(64), nullable=False),
    Column("status", _enum(model.TaskStatus), nullable=False, index=True),
    Column("plan", JsonDict, nullable=False),
    Column("done", JsonList, nullable=False),
    Column("result", JsonDict, nullable=False),
    Column("error_code", String(128), nullable=False),
    Column("error_message", Text, nullable=False),
    Column("created", DateTime, nullable=False),
    Column("finished", DateTime, nullable=True),
    Column("host_id", String(64), nullable=True),
    Column("owner", String(64), nullable=False, default=""),
    Column("owner_epoch", Integer, nullable=False, default=0),
    Column("lease_until", DateTime, nullable=True),
    Index("ix_tasks_owner", "account_id", "region_id", "created", "id"),
)

hosts = Table(
    "hosts", metadata,
    _id(),
    Column("state", _enum(model.HostState), nullable=False),
    Column("epoch", Integer, nullable=False),
    Column("heartbeat_at", DateTime, nullable=False),
    Column("vcpus", Integer, nullable=False),
    Column("memory_mib", Integer, nullable=False),
    Column("address", String(256), nullable=False, default=""),
    Column("ceph_addrs", JsonList, nullable=False, default=list),
    Column("started_at", DateTime, nullable=False),
    Column("serial_secret", String(64), nullable=False, default=""),
)

idempotency = Table(
    "idempotency", metadata,
    Column("account_id", String(64), primary_key=True),
    Column("action", String(64), primary_key=True),
    Column("token", String(64), primary_key=True),
    Column("params_digest", String(64), nullable=False),
    Column("response", JsonDict, nullable=False),
    Column("created", DateTime, nullable=False),
)

invocations = Table(
    "invocations", metadata,
    _id(),
    Column("invoke_id", String(64), nullable=False, index=True),
    Column("command_id", String(64), nullable=False, index=True),
    Column("account_id", String(64), nullable=False),
    Column("region_id", String(64), nullable=False),
    Column("instance_id", String(64), nullable=False, index=True),
    Column("command_type", String(32), nullable=False),
    Column("command_content", Text, nullable=False),
    Column("name", String(128), nullable=False),
    Column("working_dir", Text, nullable=False),
    Column("timeout", Integer, nullable=False),
    Column("status", _enum(model.InvocationStatus), nullable=False),
    Column("exit_code", Integer, nullable=True),
    Column("output", Text, nullable=False),
    Column("dropped", Integer, nullable=False),
    Column("error_code", String(64), nullable=False),
    Column("error_info", Text, nullable=False),
    Column("created", DateTime, nullable=False),
    Column("started", DateTime, nullable=True),
    Column("finished", DateTime, nullable=True),
    Column("host_id", String(64), nullable=True),
    Column("owner", String(64), nullable=False, default=""),
    Column("owner_epoch", Integer, nullable=False, default=0),
    Index("ix_invocations_owner", "account_id", "region_id", "created", "id"),
    Index("ix_invocations_host", "host_id", "status"),
)

auto_snapshot_policies = Table(
    "auto_snapshot_policies", metadata,
    _id(),
    Column("account_id", String(64), nullable=False),
    Column("region_id", String(64), nullable=False),
    Column("name", String(128), nullable=False),
    Column("time_points", JsonList, nullable=False),
    Column("repeat_weekdays", JsonList, nullable=False),
    Column("retention_days", Integer, nullable=False),
    Column("status", String(32), nullable=False),
    Column("tags", JsonDict, nullable=False),
    Column("created", DateTime, nullable=False),
    Index("ix_auto_snapshot_policies_owner", "account_id", "region_id", "created", "id"),
)

# the last time point of a policy whose snapshot of a disk was journaled (one row a pair)
policy_runs = Table(
    "policy_runs", metadata,
    Column("id", String(200), primary_key=True),
    Column("policy_id", String(64), nullable=False, index=True),
    Column("disk_id", String(64), nullable=False),
    Column("last_due", DateTime, nullable=False),
    Column("snapshot_id", String(64), nullable=False),
)

nonces = Table(
    "nonces", metadata,
    Column("key_id", String(64), primary_key=True),
    Column("nonce", String(128), primary_key=True),
    Column("expires", DateTime, nullable=False, index=True),
)

MAPPED = {
    model.Account: accounts,
    model.AccessKey: access_keys,
    model.Region: regions,
    model.Zone: zones,
    model.Image: images,
    model.Instance: instances,
    model.Disk: disks,
    model.Snapshot: snapshots,
    model.SnapshotGroup: snapshot_groups,
    model.Task: tasks,
    model.IdempotencyRecord: idempotency,
    model.Invocation: invocations,
    model.AutoSnapshotPolicy: auto_snapshot_policies,
    model.PolicyRun: policy_runs,
    model.Host: hosts,
}


def start_mappers() -> None:
    """Map the domain classes onto the tables, once per process."""
    if getattr(start_mappers, "done", False):
        return
    for cls, table in MAPPED.items():
        mapper_registry.map_imperatively(cls, table)
    start_mappers.done = True  # type: ignore[attr-defined]
