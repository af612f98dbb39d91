"""Domain objects as ECS API structures (field names and list wrappers as ECS has them)."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

from ecsnap.domain.model import (
    AutoSnapshotPolicy,
    Disk,
    Image,
    Instance,
    InstanceStatus,
    InstanceType,
    Invocation,
    Region,
    Snapshot,
    StoppedMode,
    Task,
    Zone,
)
from ecsnap.domain.model import iso as model_iso
from ecsnap.service.inspect import EntryView, FileChanges, SnapshotFiles
from ecsnap.service.listing import Page
from ecsnap.service.snapshots import GroupView


def iso(value: datetime | None) -> str:
    """model.iso (2026-11-24T10:58:48Z), twice as fast for the naive UTC datetimes the
    store holds: a page of 100 formats hundreds of them."""
    if value is not None and value.tzinfo is None and value.year >= 1000:
        return value.isoformat(timespec="seconds") + "Z"
    return model_iso(value)


def tags(values: dict[str, str]) -> dict[str, Any]:
    return {"Tag": [{"TagKey": k, "TagValue": v} for k, v in sorted(values.items())]}


def page_fields(page: Page[Any], next_token: bool) -> dict[str, Any]:
    """TotalCount, PageNumber and PageSize in either paging style (in the token style,
    PageSize is MaxResults), and NextToken ("" on the last page, and in the page style) for
    the lists whose answer has one."""
    fields: dict[str, Any] = {"TotalCount": page.total, "PageNumber": page.page_number,
                              "PageSize": page.page_size}
    if next_token:
        fields["NextToken"] = page.next_token
    return fields


def region(r: Region, endpoint: str) -> dict[str, Any]:
    return {"RegionId": r.id, "LocalName": r.local_name, "RegionEndpoint": endpoint,
            "Status": "available"}


def zone(z: Zone, instance_types: list[str]) -> dict[str, Any]:
    categories = ["cloud_essd", "cloud_ssd", "cloud_efficiency", "cloud"]
    return {
        "ZoneId": z.id, "LocalName": z.local_name,
        "AvailableResourceCreation": {"ResourceTypes": ["Instance", "Disk"]},
        "AvailableDiskCategories": {"DiskCategories": categories},
        "AvailableInstanceTypes": {"InstanceTypes": instance_types},
        "AvailableVolumeCategories": {"VolumeCategories": []},
        "AvailableDedicatedHostTypes": {"DedicatedHostType": []},
        "AvailableResources": {"ResourcesInfo": [{
            "IoOptimized": True,
            "SystemDiskCategories": {"supportedSystemDiskCategory": categories},
            "DataDiskCategories": {"supportedDataDiskCategory": categories},
            "InstanceTypes": {"supportedInstanceType": instance_types},
            "InstanceTypeFamilies": {"supportedInstanceTypeFamily": sorted(
                {".".join(t.split(".")[:2]) for t in instance_types})},
            "InstanceGenerations": {"supportedInstanceGeneration": ["ecs-5"]},
            "NetworkTypes": {"supportedNetworkCategory": ["vpc"]},
        }]},
    }


def instance(i: Instance, image: Image | None) -> dict[str, Any]:
    # enums as they are: StrEnum members, rendered as their values (see snapshot_group)
    stopped_mode = i.stopped_mode if i.status == InstanceStatus.STOPPED else \
        StoppedMode.KEEP_CHARGING
    return {
        "InstanceId": i.id, "InstanceName": i.name, "Description": i.description,
        "HostName": i.host_name or i.id, "RegionId": i.region_id, "ZoneId": i.zone_id,
        "Status": i.status, "StoppedMode": stopped_mode,
        "OperationLocks": {"LockReason": []},
        "InstanceType": i.instance_type,
        "InstanceTypeFamily": ".".join(i.instance_type.split(".")[:2]),
        "Cpu": i.vcpus, "Memory": i.memory_mib, "ImageId": i.image_id,
        "OSName": image.os_name if image else "", "OSNameEn": image.os_name if image else "",
        "OSType": image.os_type if image else "linux",
        "CreationTime": iso(i.created), "StartTime": iso(i.started), "ExpiredTime": "",
        "InstanceChargeType": "PostPaid", "InternetChargeType": "PayByTraffic",
        "InternetMaxBandwidthIn": 0, "InternetMaxBandwidthOut": 0,
        "InstanceNetworkType": "vpc", "IoOptimized": True, "DeviceAvailable": True,
        "DeletionProtection": False, "SerialNumber": i.id.removeprefix("i-"),
        "Tags": tags(i.tags), "SecurityGroupIds": {"SecurityGroupId": []},
        "PublicIpAddress": {"IpAddress": []}, "InnerIpAddress": {"IpAddress": []},
        "VpcAttributes": {"VpcId": "", "VSwitchId": "", "NatIpAddress": "",
                          "PrivateIpAddress": {"IpAddress": []}},
        "NetworkInterfaces": {"NetworkInterface": []},
        # ecsnap extension: the host its compute is (or was last) claimed on ("local" on
        # the single-host server; service/placement.py). The SDKs' models ignore it.
        "HostId": i.host_id or "",
    }


def disk(d: Disk) -> dict[str, Any]:
    attached = bool(d.instance_id)
    return {
        "DiskId": d.id, "DiskName": d.name, "Description": d.description,
        "RegionId": d.region_id, "ZoneId": d.zone_id, "Type": d.type,
        "Category": d.category, "Size": d.size_gib, "Status": d.status,
        "InstanceId": d.instance_id or "", "Device": d.device if attached else "",
        "AttachedTime": iso(d.attached_time), "DetachedTime": iso(d.detached_time),
        "CreationTime": iso(d.created), "ExpiredTime": "", "Portable": d.portable,
        "DeleteWithInstance": d.delete_with_instance, "DeleteAutoSnapshot": False,
        # every disk may take automatic snapshots; a policy is applied or not
        "EnableAutoSnapshot": True,
        "EnableAutomatedSnapshotPolicy": bool(d.auto_snapshot_policy_id),
        "AutoSnapshotPolicyId": d.auto_snapshot_policy_id,
        "SourceSnapshotId": d.source_snapshot_id, "ImageId": d.image_id,
        "DiskChargeType": "PostPaid", "Encrypted": False, "PerformanceLevel": "PL1",
        "SerialNumber": d.serial_number, "OperationLocks": {"OperationLock": []},
        "MountInstanceNum": 1 if attached else 0,
        "MountInstances": {"MountInstance": [{"InstanceId": d.instance_id,
                                              "Device": d.device,
                                              "AttachedTime": iso(d.attached_time)}]
                           if attached else []},
        "Tags": tags(d.tags),
    }


def snapshot(s: Snapshot, usage: str = "none") -> dict[str, Any]:
    return {
        "SnapshotId": s.id, "SnapshotName": s.name, "Description": s.description,
        "SourceDiskId": s.source_disk_id, "SourceDiskType": s.source_disk_type,
        "SourceDiskSize": str(s.source_disk_size), "SourceStorageType": "disk",
        "Status": s.status, "Progress": f"{s.progress}%", "RemainTime": 0,
        "CreationTime": iso(s.created), "LastModifiedTime": iso(s.last_modified),
        "RetentionDays": s.retention_days or 0, "InstantAccess": False,
        "InstantAccessRetentionDays": 0, "SnapshotType": s.snapshot_type, "Usage": usage,
        "Category": "standard", "Encrypted": False, "ProductCode": "",
        "SnapshotSN": s.id.removeprefix("s-"), "SnapshotLinkId": f"sl-{s.source_disk_id}",
        "InstanceId": s.instance_id, "SnapshotGroupId": s.group_id or "",
        "Tags": tags(s.tags),
    }


def auto_snapshot_policy(p: AutoSnapshotPolicy, disk_nums: int) -> dict[str, Any]:
    """TimePoints and RepeatWeekdays as ECS answers them: JSON arrays of strings, in one
    string."""
    return {
        "AutoSnapshotPolicyId": p.id, "AutoSnapshotPolicyName": p.name, "RegionId": p.region_id,
        "TimePoints": json.dumps([str(h) for h in p.time_points]),
        "RepeatWeekdays": json.dumps([str(d) for d in p.repeat_weekdays]),
        "RetentionDays": p.retention_days, "DiskNums": disk_nums, "VolumeNums": 0,
        "Status": p.status, "CreationTime": iso(p.created), "Type": "Custom",
        "EnableCrossRegionCopy": False, "TargetCopyRegions": "[]",
        "CopiedSnapshotsRetentionDays": -1, "ResourceGroupId": "", "Tags": tags(p.tags),
    }


def snapshot_group(v: GroupView) -> dict[str, Any]:
    # the enums as they are (StrEnum members: rendered as their values; `.value` is a
    # property call each, and a page of 100 groups has 600 of them)
    g = v.group
    return {
        "SnapshotGroupId": g.id, "Name": g.name, "Description": g.description,
        "InstanceId": g.instance_id, "CreationTime": iso(g.created),
        "Status": g.status, "ProgressStatus": f"{v.progress}%",
        "ConsistencyLevel": g.consistency,
        "FreezeWindowMs": g.window_ms if g.window_ms is not None else -1,
        "Purpose": g.purpose, "Tags": tags(g.tags),
        "Snapshots": {"Snapshot": [{
            "SnapshotId": s.id, "SourceDiskId": s.source_disk_id,
            "SourceDiskType": s.source_disk_type, "Progress": f"{s.progress}%",
            "InstantAccess": False, "InstantAccessRetentionDays": 0,
        } for s in v.snapshots]},
    }


def image(m: Image, usage: str = "none") -> dict[str, Any]:
    return {
        "ImageId": m.id, "ImageName": m.name, "ImageFamily": "", "ImageVersion": "1",
        "Description": m.description, "Status": m.status,
        "Progress": "0%" if m.status == "Creating" else "100%",
        "Size": m.size_gib, "CreationTime": iso(m.created),
        "ImageOwnerAlias": m.owner_alias, "OSType": m.os_type, "OSName": m.os_name,
        "OSNameEn": m.os_name, "Platform": "Others Linux", "Architecture": m.architecture,
        "Usage": usage, "IsSupportCloudinit": False, "IsSupportIoOptimized": True,
        "IsCopied": False, "IsSubscribed": False, "IsSelfShared": "",
        "BootMode": "Legacy" if m.boot_mode == "bios" else "DirectKernel",
        "Tags": tags({}),
        "DiskDeviceMappings": {"DiskDeviceMapping": [{
            "SnapshotId": m.source_snapshot_id, "Size": str(m.size_gib),
            "Device": "/dev/xvda", "Type": "system", "Format": "qcow2",
            "Progress": "0%" if m.status == "Creating" else "100%"}]},
    }


def task(t: Task) -> dict[str, Any]:
    return {"TaskId": t.id, "TaskAction": t.action, "TaskStatus": t.status.value,
            "CreationTime": iso(t.created), "FinishedTime": iso(t.finished),
            "SupportCancel": "false", "TaskProcess": f"{t.progress}%",
            "ResourceId": t.resource_id}


def instance_type(t: InstanceType) -> dict[str, Any]:
    return {"InstanceTypeId": t.name, "InstanceTypeFamily": t.family, "CpuCoreCount": t.vcpus,
            "MemorySize": round(t.memory_mib / 1024, 3), "CpuArchitecture": "X86",
            "EniQuantity": 1, "LocalStorageCategory": "", "GPUAmount": 0, "GPUSpec": ""}


def invocation(invoke_id: str, rows: list[Invocation], encoding: str,
               with_output: bool) -> dict[str, Any]:
    """One RunCommand (DescribeInvocations) from its records, one per instance."""
    first = rows[0]
    statuses = {r.status.value for r in rows}
    overall = "Running" if "Running" in statuses else (
        "Success" if statuses == {"Success"} else "Failed")
    content = first.command_content
    if encoding == "Base64":
        content = base64.b64encode(content.encode()).decode()
    return {"InvokeId": invoke_id, "CommandId": first.command_id,
            "CommandType": first.command_type, "CommandName": first.name,
            "CommandContent": content, "InvocationStatus": overall, "InvokeStatus": overall,
            "CreationTime": iso(first.created), "Timed": False, "Frequency": "",
            "RepeatMode": "Once", "InvokeInstances": {"InvokeInstance": [
                {"InstanceId": r.instance_id, "InvocationStatus": r.status.value,
                 "InstanceInvokeStatus": r.record_status,
                 "ExitCode": r.exit_code if r.exit_code is not None else 0,
                 "Output": invocation_result(r, encoding)["Output"] if with_output else "",
                 "Dropped": r.dropped, "ErrorCode": r.error_code, "ErrorInfo": r.error_info,
                 "StartTime": iso(r.started), "FinishTime": iso(r.finished),
                 "CreationTime": iso(r.created), "Repeats": 1} for r in rows]}}


def invocation_result(v: Invocation, encoding: str) -> dict[str, Any]:
    output = v.output if encoding == "PlainText" else \
        base64.b64encode(v.output.encode()).decode()
    return {
        "CommandId": v.command_id, "InvokeId": v.id, "InstanceId": v.instance_id,
        "InvocationStatus": v.status.value, "InvokeRecordStatus": v.record_status,
        "ExitCode": v.exit_code if v.exit_code is not None else 0, "Output": output,
        "Dropped": v.dropped, "ErrorCode": v.error_code, "ErrorInfo": v.error_info,
        "StartTime": iso(v.started), "FinishedTime": iso(v.finished),
        "StopTime": "", "Repeats": 1, "Username": "root",
    }


def _ns_iso(ns: int | None) -> str:
    """An mtime in ns as ISO 8601 UTC with its nanoseconds ("" when unknown)."""
    if ns is None:
        return ""
    seconds, nanos = divmod(ns, 1_000_000_000)
    try:
        text = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    except (OverflowError, OSError, ValueError):
        return ""
    return f"{text}.{nanos:09d}Z" if nanos else f"{text}Z"


def file_changes(fc: FileChanges) -> dict[str, Any]:
    """PreviewResetDisks' file level of one disk (ecsnap extension)."""
    return {"Partial": bool(fc.partial), "PartialReason": fc.partial,
            "AddedCount": fc.added, "DeletedCount": fc.deleted,
            "ModifiedCount": fc.modified, "TotalCount": fc.total, "Seconds": fc.seconds,
            "Notes": {"Note": list(fc.notes)},
            "Files": {"File": [{
                "Path": f.path, "Change": f.change.value, "Type": f.type,
                "Changed": ",".join(f.what),
                "SizeInSnapshot": -1 if f.size_before is None else f.size_before,
                "SizeNow": -1 if f.size_after is None else f.size_after,
                "ModifiedTimeInSnapshot": _ns_iso(f.mtime_before),
                "ModifiedTimeNow": _ns_iso(f.mtime_after)} for f in fc.files]}}


def file_entry(e: EntryView) -> dict[str, Any]:
    return {"Name": e.name, "Path": e.path, "Type": e.type, "Size": e.size,
            "Mode": f"{e.mode & 0o7777:04o}", "Uid": e.uid, "Gid": e.gid,
            "ModifiedTime": iso(e.modified) if e.modified else "",
            "LinkTarget": e.link_target if e.link_target is not None else ""}


def snapshot_files(r: SnapshotFiles) -> dict[str, Any]:
    """DescribeSnapshotFiles (ecsnap extension): the entry, a directory's page of entries,
    a regular file's content (base64)."""
    out = {"SnapshotId": r.snapshot_id, "DiskId": r.disk_id, **file_entry(r.entry)}
    if r.entry.type == "directory":
        out.update({"Entries": {"Entry": [file_entry(e) for e in r.entries]},
                    "TotalCount": r.total, "NextToken": r.next_token})
    if r.content is not None:
        out.update({"FileContent": base64.b64encode(r.content).decode("ascii"),
                    "ContentOffset": r.offset, "ContentLength": len(r.content),
                    "Truncated": r.truncated})
    return out

