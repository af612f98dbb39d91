"""Rules of ecsnap as named checks, each with its ECS error code. Pure functions, no I/O.

Rollback checks return every failure at once (per disk) instead of stopping at the first;
`require()` turns a non-empty list into one `RuleViolations` error.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ecsnap.domain.errors import (
    CheckFailure,
    EcsError,
    RuleViolations,
    incorrect_instance_status,
    operation_conflict,
)
from ecsnap.domain.model import (
    DISK_CATEGORIES,
    MAX_DATA_DISKS,
    MAX_GROUP_DISKS,
    Disk,
    DiskStatus,
    DiskType,
    Host,
    Instance,
    InstanceStatus,
    InstanceType,
    Region,
    Snapshot,
    SnapshotStatus,
)

# ---------------------------------------------------------------- names and descriptions


def _bad_prefix(value: str) -> bool:
    lowered = value.lower()
    return lowered.startswith("http://") or lowered.startswith("https://")


# NUL and the other C0 and C1 controls (tab, newline and DEL too), the Unicode line and
# paragraph separators, and lone surrogates (which no UTF-8 column can store)
_CONTROL_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})


def _is_control(char: str) -> bool:
    return unicodedata.category(char) in _CONTROL_CATEGORIES


def has_control_chars(value: str) -> bool:
    """True when `value` holds a character that names, descriptions and tags refuse."""
    return any(_is_control(c) for c in value)


def _shown(value: str) -> str:
    """`value` for an error message, with those characters written as escapes."""
    return "".join(f"\\u{ord(c):04x}" if _is_control(c) else c for c in value)


def check_name(value: str | None, *, code: str, field: str = "Name", allow_dot: bool = True,
               digit_first: bool = False, reserved_prefix: str | None = None) -> None:
    """ECS names: 2-128 chars, start with a letter (or a digit where allowed), letters,
    digits, ':', '_', '-' (and '.' where allowed), not starting with http(s)://; no
    control characters."""
    if value is None or value == "":
        return
    extra = ":_-." if allow_dot else ":_-"
    first_ok = value[0].isalpha() or (digit_first and value[0].isdigit())
    why = ""
    if has_control_chars(value):
        why = "it must not contain control characters"
    elif not 2 <= len(value) <= 128:
        why = "it must be 2 to 128 characters long"
    elif not first_ok:
        why = "it must start with a letter" + (" or a digit" if digit_first else "")
    elif _bad_prefix(value):
        why = "it must not start with http:// or https://"
    elif any(not (c.isalnum() or c in extra) for c in value):
        why = f"it may contain only letters, digits and {' '.join(extra)}"
    elif reserved_prefix and value.lower().startswith(reserved_prefix):
        why = f"names starting with '{reserved_prefix}' are reserved"
    if why:
        raise EcsError(code, f"The specified {field} \"{_shown(value)}\" is malformed: {why}.",
                       400)


def check_description(value: str | None, *, code: str = "InvalidDescription.Malformed") -> None:
    """ECS descriptions: 2-256 chars, not starting with http(s)://; no control characters
    (not even a newline)."""
    if value is None or value == "":
        return
    if has_control_chars(value):
        raise EcsError(code, "The description must not contain control characters.", 400)
    if not 2 <= len(value) <= 256 or _bad_prefix(value):
        raise EcsError(code, "The description must be 2 to 256 characters long and must not "
                       "start with http:// or https://.", 400)


def check_tags(tags: dict[str, str]) -> None:
    """At most 20 tags; keys 1-128 chars, values up to 128, neither starting with `acs:`
    (keys nor with `aliyun`) nor holding `://` or control characters."""
    if len(tags) > 20:
        raise EcsError("InvalidTagCount", "At most 20 tags may be given.", 400)
    for key, value in tags.items():
        if not 1 <= len(key) <= 128 or key.startswith(("acs:", "aliyun")) or "://" in key \
                or has_control_chars(key):
            raise EcsError("InvalidTagKey.Malformed",
                           f"The tag key \"{_shown(key)}\" is malformed.", 400)
        if len(value) > 128 or value.startswith("acs:") or "://" in value \
                or has_control_chars(value):
            raise EcsError("InvalidTagValue.Malformed",
                           f"The tag value \"{_shown(value)}\" is malformed.", 400)


# ---------------------------------------------------------------- disks


def check_disk_size(size_gib: int, *, category: str, system: bool) -> None:
    if category not in DISK_CATEGORIES:
        code = "InvalidSystemDiskCategory" if system else "InvalidDataDiskCategory"
        raise EcsError(f"{code}.ValueNotSupported",
                       f"The disk category \"{category}\" is not supported.", 400)
    if system:
        low, high = 20, 500
        code = "InvalidSystemDiskSize.ValueNotSupported"
    else:
        low, high = (5, 2000) if category == "cloud" else (20, 32768)
        code = "InvalidDataDiskSize.ValueNotSupported"
    if not low <= size_gib <= high:
        raise EcsError(code, f"The disk size {size_gib} GiB is out of range: a "
                       f"{'system' if system else category} disk takes {low} to {high} GiB.", 400)


def check_data_disk_count(count: int) -> None:
    if count > MAX_DATA_DISKS:
        raise EcsError("InstanceDiskNumber.LimitExceed",
                       f"An instance may have at most {MAX_DATA_DISKS} data disks.", 400)


def next_device(used: Iterable[str]) -> str:
    taken = set(used)
    for letter in "bcdefghijklmnopqrstuvwxyz":
        device = f"/dev/xvd{letter}"
        if device not in taken:
            return device
    raise EcsError("InstanceDiskLimitExceeded", "The instance has no free device name.", 403)


# ---------------------------------------------------------------- instances and capacity


def require_instance_status(instance: Instance, *allowed: InstanceStatus,
                            http_status: int = 403) -> None:
    if instance.status not in allowed:
        wanted = " or ".join(s.value for s in allowed)
        raise incorrect_instance_status(instance.id, instance.status.value, wanted, http_status)


def check_not_locked(*resources: Instance | Disk) -> None:
    for resource in resources:
        if resource.lock_task_id:
            raise operation_conflict(resource.id, resource.lock_task_id)


def reserved(instances: Iterable[Instance]) -> tuple[int, int]:
    """vCPUs and MiB held by the instances that hold a compute reservation."""
    held = [i for i in instances if i.holds_reservation()]
    return sum(i.vcpus for i in held), sum(i.memory_mib for i in held)


def check_capacity(region: Region, others: Iterable[Instance], wanted: Sequence[InstanceType],
                   ) -> None:
    """`OperationDenied.NoStock` unless the wanted compute fits beside what others hold."""
    vcpus, memory = reserved(others)
    need_vcpus = sum(t.vcpus for t in wanted)
    need_memory = sum(t.memory_mib for t in wanted)
    if vcpus + need_vcpus > region.vcpu_capacity or memory + need_memory > \
            region.memory_mib_capacity:
        raise EcsError(
            "OperationDenied.NoStock",
            f"The region {region.id} has no capacity for {need_vcpus} vCPU and {need_memory} MiB "
            f"({region.vcpu_capacity - vcpus} vCPU and {region.memory_mib_capacity - memory} "
            "MiB are free). An instance stopped in StopCharging mode gave its compute back and "
            "must wait for capacity; try again later or choose a smaller instance type.", 403)


def choose_host(hosts: Sequence[Host], claims: Mapping[str, Iterable[Instance]], vcpus: int,
                memory_mib: int, *, pinned_to: str | None = None) -> Host:
    """The host for an instance that needs `vcpus` and `memory_mib`: among `hosts` (only
    `pinned_to` when given: an instance whose disks are local files), one where it fits
    beside the claims of the instances on it (`claims` by host ID), the one with the most
    free memory (then vCPUs, then ID: instances spread). `OperationDenied.NoStock` when
    none has room."""
    best: tuple[int, int, str] | None = None
    chosen: Host | None = None
    free_anywhere: list[str] = []
    for host in hosts:
        if pinned_to is not None and host.id != pinned_to:
            continue
        used_vcpus, used_memory = reserved(claims.get(host.id, ()))
        free_vcpus, free_memory = host.vcpus - used_vcpus, host.memory_mib - used_memory
        free_anywhere.append(f"{host.id}: {free_vcpus} vCPU, {free_memory} MiB")
        if vcpus <= free_vcpus and memory_mib <= free_memory:
            rank = (-free_memory, -free_vcpus, host.id)
            if best is None or rank < best:
                best, chosen = rank, host
    if chosen is not None:
        return chosen
    where = f"its host {pinned_to} (its disks are local to it)" if pinned_to is not None \
        else "any host"
    raise EcsError(
        "OperationDenied.NoStock",
        f"There is no capacity for {vcpus} vCPU and {memory_mib} MiB on {where} "
        f"({'; '.join(free_anywhere) or 'no host is up'}). An instance stopped in "
        "StopCharging mode gave its compute back and must wait for capacity; try again "
        "later or choose a smaller instance type.", 403)


# ---------------------------------------------------------------- quotas

# ECS's code for each quota an account can exceed
QUOTA_CODES = {
    "instances": "QuotaExceed.ElasticQuota",
    "vcpus": "QuotaExceed.ElasticQuota",
    "memory_mib": "QuotaExceed.ElasticQuota",
    "disks": "QuotaExceed.PostPaidDisk",
    "disk_gib": "QuotaExceed.DiskCapacity",
    "snapshots": "QuotaExceed.Snapshot",
}


def quota_failure(limits: Mapping[str, int | None], used: Mapping[str, int],
                  wanted: Mapping[str, int]) -> EcsError | None:
    """The error for the first quota that `wanted` on top of `used` would exceed."""
    for kind, more in wanted.items():
        limit = limits.get(kind)
        if limit is not None and more > 0 and used.get(kind, 0) + more > limit:
            return EcsError(QUOTA_CODES[kind],
                            f"The account's quota of {kind} is {limit}; it uses "
                            f"{used.get(kind, 0)} and the request needs {more} more. Ask the "
                            "administrator for a larger quota or release resources.", 403)
    return None


def check_quota(limits: Mapping[str, int | None], used: Mapping[str, int],
                wanted: Mapping[str, int]) -> None:
    failure = quota_failure(limits, used, wanted)
    if failure is not None:
        raise failure


def times_within_quota(limits: Mapping[str, int | None], used: Mapping[str, int],
                       each: Mapping[str, int], most: int) -> int:
    """How many of `each` (up to `most`) fit in the quotas (RunInstances' MinAmount)."""
    n = most
    while n > 0 and quota_failure(limits, used, {k: v * n for k, v in each.items()}):
        n -= 1
    return n


# ---------------------------------------------------------------- instance snapshots


def select_group_disks(instance: Instance, attached: Sequence[Disk], *,
                       disk_ids: Sequence[str] = (), exclude_disk_ids: Sequence[str] = (),
                       ) -> list[Disk]:
    """The disks an instance snapshot takes: all attached ones, or `disk_ids`, less the excluded."""
    require_instance_status(instance, InstanceStatus.RUNNING, InstanceStatus.STOPPED)
    check_not_locked(instance)
    by_id = {d.id: d for d in attached}
    for disk_id in [*disk_ids, *exclude_disk_ids]:
        if disk_id not in by_id:
            raise EcsError("IncorrectDiskStatus",
                           f"The disk {disk_id} is not attached to instance {instance.id}.", 403)
    chosen = [by_id[d] for d in disk_ids] if disk_ids else list(attached)
    chosen = [d for d in chosen if d.id not in set(exclude_disk_ids)]
    if not chosen:
        raise EcsError("InvalidParameter.DiskIds",
                       "The instance snapshot would hold no disk: every disk was excluded.", 400)
    if len(chosen) > MAX_GROUP_DISKS:
        raise EcsError("InvalidParameter.DiskIds",
                       f"An instance snapshot may hold at most {MAX_GROUP_DISKS} disks.", 400)
    for disk in chosen:
        if disk.status != DiskStatus.IN_USE:
            raise EcsError("IncorrectDiskStatus",
                           f"The disk {disk.id} is {disk.status.value}; it must be In_use.", 403)
    check_not_locked(*chosen)
    return sorted(chosen, key=lambda d: (d.type != DiskType.SYSTEM, d.device, d.id))


# ---------------------------------------------------------------- rollback


@dataclass(frozen=True)
class ResetTarget:
    """One disk of a rollback request, as found in the store (None: not found or released)."""

    disk_id: str
    snapshot_id: str
    disk: Disk | None
    snapshot: Snapshot | None


def check_instance_stopped(instance: Instance) -> CheckFailure | None:
    if instance.status == InstanceStatus.STOPPED:
        return None
    return CheckFailure("instance_stopped", "IncorrectInstanceStatus",
                        f"The instance {instance.id} is {instance.status.value}; stop it before "
                        "rolling back its disks.", 403)


def check_instance_free(instance: Instance) -> CheckFailure | None:
    if not instance.lock_task_id:
        return None
    return CheckFailure("no_concurrent_operation", "Operation.Conflict",
                        f"Another operation ({instance.lock_task_id}) is running on instance "
                        f"{instance.id}.", 403)


def check_disk_exists(t: ResetTarget) -> CheckFailure | None:
    if t.disk is not None and not t.disk.released:
        return None
    return CheckFailure("disk_exists", "InvalidDiskId.NotFound",
                        f"The disk {t.disk_id} does not exist or has been released.", 404,
                        t.disk_id)


def check_disk_attached(t: ResetTarget, instance: Instance) -> CheckFailure | None:
    disk = t.disk
    if disk is None or disk.released:
        return None  # reported by check_disk_exists
    if disk.status == DiskStatus.IN_USE and disk.instance_id == instance.id:
        return None
    where = f"attached to {disk.instance_id}" if disk.instance_id else "detached"
    return CheckFailure("disk_attached", "IncorrectDiskStatus",
                        f"The disk {disk.id} is {disk.status.value} ({where}); it must be "
                        f"attached to instance {instance.id}.", 403, t.disk_id)


def check_disk_free(t: ResetTarget) -> CheckFailure | None:
    if t.disk is None or not t.disk.lock_task_id:
        return None
    return CheckFailure("no_concurrent_operation", "Operation.Conflict",
                        f"Another operation ({t.disk.lock_task_id}) is running on disk "
                        f"{t.disk.id}.", 403, t.disk_id)


def check_snapshot_exists(t: ResetTarget) -> CheckFailure | None:
    if t.snapshot is not None:
        return None
    return CheckFailure("snapshot_exists", "InvalidSnapshotId.NotFound",
                        f"The snapshot {t.snapshot_id} does not exist (it may have been "
                        "deleted).", 404, t.disk_id)


def check_snapshot_ready(t: ResetTarget) -> CheckFailure | None:
    if t.snapshot is None or t.snapshot.status == SnapshotStatus.ACCOMPLISHED:
        return None
    return CheckFailure("snapshot_ready", "InvalidSnapshotId.NotReady",
                        f"The snapshot {t.snapshot.id} is {t.snapshot.status.value}; only an "
                        "accomplished snapshot can be rolled back to.", 403, t.disk_id)


def check_snapshot_of_disk(t: ResetTarget) -> CheckFailure | None:
    if t.snapshot is None or t.snapshot.source_disk_id == t.disk_id:
        return None
    return CheckFailure("snapshot_of_disk", "InvalidParameter.Mismatch",
                        f"The snapshot {t.snapshot.id} was taken of disk "
                        f"{t.snapshot.source_disk_id}, not of {t.disk_id}.", 403, t.disk_id)


def check_system_disk_not_replaced(t: ResetTarget, system_disk_id: str | None,
                                   ) -> CheckFailure | None:
    snap = t.snapshot
    if snap is None or snap.source_disk_type != DiskType.SYSTEM:
        return None
    if system_disk_id is None or system_disk_id == snap.source_disk_id:
        return None
    return CheckFailure("system_disk_not_replaced", "InvalidParameter.Mismatch",
                        f"The system disk was replaced after the snapshot {snap.id} was taken "
                        f"(it was {snap.source_disk_id}, it is now {system_disk_id}); the "
                        "snapshot cannot roll the new system disk back.", 403, t.disk_id)


def check_reset(instance: Instance, targets: Sequence[ResetTarget], *,
                system_disk_id: str | None) -> list[CheckFailure]:
    """Every failed check of a rollback request, instance-wide first, then per disk."""
    failures = [f for f in (check_instance_stopped(instance), check_instance_free(instance)) if f]
    seen: set[str] = set()
    for t in targets:
        if t.disk_id in seen:
            failures.append(CheckFailure("disk_once", "InvalidParameter",
                                         f"The disk {t.disk_id} is named twice.", 400, t.disk_id))
        seen.add(t.disk_id)
        replaced = check_system_disk_not_replaced(t, system_disk_id)
        # a replaced system disk explains the mismatch better than "another disk's snapshot"
        mismatch = None if replaced else check_snapshot_of_disk(t)
        for failure in (check_snapshot_exists(t), check_snapshot_ready(t), check_disk_exists(t),
                        replaced, mismatch, check_disk_attached(t, instance),
                        check_disk_free(t)):
            if failure and failure not in failures:
                failures.append(failure)
    return failures


def require(failures: Sequence[CheckFailure]) -> None:
    if failures:
        raise RuleViolations(list(failures))


# ------------------------------------------------------------------ automatic snapshot policies


def check_policy_values(values: Sequence[str] | None, allowed: range, *, code: str,
                        field: str) -> list[int] | None:
    """TimePoints (hours 0-23) or RepeatWeekdays (1-7): a JSON array of 1 to len(allowed)
    distinct numbers written as strings; None (not given) passes. Sorted integers."""
    if values is None:
        return None
    bad = ""
    numbers: list[int] = []
    for value in values:
        text = str(value).strip()
        if not text.lstrip("-").isdigit() or int(text) not in allowed:
            bad = f"\"{_shown(str(value))}\" is not one of {allowed.start} to {allowed.stop - 1}"
            break
        numbers.append(int(text))
    if not bad and not numbers:
        bad = "at least one value is needed"
    elif not bad and len(set(numbers)) != len(numbers):
        bad = "a value is given twice"
    if bad:
        raise EcsError(code, f"The specified {field} is malformed: {bad}.", 400)
    return sorted(numbers)


def check_policy_retention(days: int | None) -> None:
    """RetentionDays of a policy: -1 (kept until deleted) or 1 to 65536."""
    if days is not None and days != -1 and not 1 <= days <= 65536:
        raise EcsError("InvalidRetentionDays.Malformed",
                       "The specified RetentionDays is -1 (kept for ever) or 1 to 65536.", 400)
