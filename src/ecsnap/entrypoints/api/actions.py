"""The ECS actions: each decodes its parameters, calls one service function, and returns
the response fields (the app adds RequestId and renders JSON or XML)."""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ecsnap.domain.errors import EcsError, dry_run_passed
from ecsnap.entrypoints.api import views
from ecsnap.service import (
    commands,
    disks,
    images,
    instances,
    regions,
    rollback,
    snapshots,
    tasks_view,
)
from ecsnap.service.context import ServiceContext


@dataclass
class Call:
    ctx: ServiceContext
    account_id: str
    p: Any  # entrypoints.api.params.Params
    endpoint: str

    @property
    def region(self) -> str:
        return str(self.p.str("RegionId", required=True))


Action = Callable[[Call], dict[str, Any]]
ACTIONS: dict[str, Action] = {}


def action(*names: str) -> Callable[[Action], Action]:
    def register(fn: Action) -> Action:
        for name in names:
            ACTIONS[name] = fn
        return fn
    return register


def _page_args(p: Any, token: bool = True) -> dict[str, Any]:
    args = {"page_number": p.int("PageNumber", min=1),
            "page_size": p.int("PageSize", min=1, max=100)}
    if token:
        args.update(next_token=p.str("NextToken") or None,
                    max_results=p.int("MaxResults", min=1, max=500))
    return args


def _token_style(p: Any) -> bool:
    return bool(p.str("NextToken") or p.int("MaxResults"))


def _dry_run(p: Any) -> bool:
    return bool(p.bool("DryRun", default=False))


# ------------------------------------------------------------------ regions and images


@action("DescribeRegions")
def describe_regions(c: Call) -> dict[str, Any]:
    return {"Regions": {"Region": [views.region(r, c.endpoint)
                                   for r in regions.describe_regions(c.ctx)]}}


@action("DescribeZones")
def describe_zones(c: Call) -> dict[str, Any]:
    region, zones = regions.describe_zones(c.ctx, c.region)
    names = [t.name for t in region.catalogue()]
    return {"Zones": {"Zone": [views.zone(z, names) for z in zones]}}


@action("DescribeInstanceTypes")
def describe_instance_types(c: Call) -> dict[str, Any]:
    wanted = set(c.p.list("InstanceTypes"))
    types = [t for t in regions.describe_instance_types(c.ctx, c.region)
             if not wanted or t.name in wanted]
    return {"InstanceTypes": {"InstanceType": [{
        "InstanceTypeId": t.name, "InstanceTypeFamily": t.family, "CpuCoreCount": t.vcpus,
        "MemorySize": round(t.memory_mib / 1024, 3), "EniQuantity": 1,
        "LocalStorageCategory": "", "GPUAmount": 0} for t in types]}}


@action("DescribeImages")
def describe_images(c: Call) -> dict[str, Any]:
    ids_ = c.p.str("ImageId")
    page = images.describe_images(c.ctx, c.account_id, c.region,
                                  image_ids=ids_.split(",") if ids_ else None,
                                  name=c.p.str("ImageName") or None,
                                  owner_alias=c.p.str("ImageOwnerAlias") or None,
                                  page_number=c.p.int("PageNumber", min=1),
                                  page_size=c.p.int("PageSize", min=1, max=100))
    return {"Images": {"Image": [views.image(m) for m in page.items]}, "RegionId": c.region,
            **views.page_fields(page, False)}


# ------------------------------------------------------------------ instances


def _instance_request(p: Any) -> instances.InstanceRequest:
    data = []
    for d in p.items("DataDisk", max_items=16):
        if d.str("SnapshotId"):
            raise EcsError("UnsupportedParameter",
                           "ecsnap cannot create a data disk from a snapshot yet.", 400)
        data.append(instances.DataDiskSpec(
            size_gib=d.int("Size", default=20), category=d.str("Category") or "cloud_essd",
            name=d.str("DiskName") or "", description=d.str("Description") or "",
            delete_with_instance=d.bool("DeleteWithInstance", default=True)))
    return instances.InstanceRequest(
        image_id=p.str("ImageId", required=True), instance_type=p.str("InstanceType",
                                                                       required=True),
        zone_id=p.str("ZoneId") or "", name=p.str("InstanceName") or "",
        description=p.str("Description") or "",
        system_disk_size_gib=p.int("SystemDisk.Size"),
        system_disk_category=p.str("SystemDisk.Category") or "cloud_essd",
        system_disk_name=p.str("SystemDisk.DiskName") or "",
        data_disks=data, tags=p.tags(), host_name=p.str("HostName") or "")


@action("RunInstances")
def run_instances(c: Call) -> dict[str, Any]:
    ids_ = instances.run_instances(
        c.ctx, c.account_id, c.region, _instance_request(c.p),
        amount=c.p.int("Amount", default=1), min_amount=c.p.int("MinAmount"),
        start=True, dry_run=_dry_run(c.p), client_token=c.p.str("ClientToken") or None)
    return {"InstanceIdSets": {"InstanceIdSet": ids_}, "TradePrice": 0.0}


@action("CreateInstance")
def create_instance(c: Call) -> dict[str, Any]:
    [instance_id] = instances.run_instances(
        c.ctx, c.account_id, c.region, _instance_request(c.p), start=False,
        dry_run=_dry_run(c.p), client_token=c.p.str("ClientToken") or None)
    return {"InstanceId": instance_id, "TradePrice": 0.0}


@action("DescribeInstances")
def describe_instances(c: Call) -> dict[str, Any]:
    if _dry_run(c.p):
        raise dry_run_passed()
    page = instances.describe_instances(
        c.ctx, c.account_id, c.region, instance_ids=c.p.json_list("InstanceIds"),
        status=c.p.str("Status") or None, zone_id=c.p.str("ZoneId") or None,
        name=c.p.str("InstanceName") or None, image_id=c.p.str("ImageId") or None,
        instance_type=c.p.str("InstanceType") or None, tags=c.p.tags(), **_page_args(c.p))
    by_id = images.images_by_id(c.ctx, {i.image_id for i in page.items})
    return {"Instances": {"Instance": [views.instance(i, by_id.get(i.image_id))
                                       for i in page.items]},
            **views.page_fields(page, _token_style(c.p))}


@action("DescribeInstanceStatus")
def describe_instance_status(c: Call) -> dict[str, Any]:
    page = instances.describe_instances(
        c.ctx, c.account_id, c.region, instance_ids=c.p.list("InstanceId") or None,
        zone_id=c.p.str("ZoneId") or None, page_number=c.p.int("PageNumber", min=1),
        page_size=c.p.int("PageSize", min=1, max=50))
    return {"InstanceStatuses": {"InstanceStatus": [
        {"InstanceId": i.id, "Status": i.status.value} for i in page.items]},
        **views.page_fields(page, False)}


@action("StartInstance")
def start_instance(c: Call) -> dict[str, Any]:
    instances.start_instance(c.ctx, c.account_id, c.p.str("InstanceId", required=True),
                             dry_run=_dry_run(c.p))
    return {}


@action("StopInstance")
def stop_instance(c: Call) -> dict[str, Any]:
    instances.stop_instance(c.ctx, c.account_id, c.p.str("InstanceId", required=True),
                            force=c.p.bool("ForceStop", default=False),
                            stopped_mode=c.p.enum("StoppedMode",
                                                  {"KeepCharging", "StopCharging"}),
                            dry_run=_dry_run(c.p))
    return {}


def _batch(c: Call, run: Callable[[str], object]) -> dict[str, Any]:
    ids_ = c.p.list("InstanceId")
    if not ids_:
        raise EcsError("MissingParameter", "The input parameter \"InstanceId.1\" that is "
                       "mandatory for processing this request is not supplied.", 400)
    together = (c.p.str("BatchOptimization") or "AllTogether") == "AllTogether"
    before = instances.statuses(c.ctx, c.account_id, ids_)
    results = []
    for instance_id in ids_:
        try:
            run(instance_id)
            results.append((instance_id, "200", "success"))
        except EcsError as exc:
            if together:
                raise
            results.append((instance_id, exc.code, exc.message))
    after = instances.statuses(c.ctx, c.account_id, ids_)
    return {"InstanceResponses": {"InstanceResponse": [
        {"InstanceId": i, "PreviousStatus": before[i], "CurrentStatus": after[i], "Code": code,
         "Message": msg} for i, code, msg in results]}}


@action("StartInstances")
def start_instances(c: Call) -> dict[str, Any]:
    dry = _dry_run(c.p)
    return _batch(c, lambda i: instances.start_instance(c.ctx, c.account_id, i,
                                                        region_id=c.region, dry_run=dry))


@action("StopInstances")
def stop_instances(c: Call) -> dict[str, Any]:
    force = c.p.bool("ForceStop", default=False)
    mode = c.p.enum("StoppedMode", {"KeepCharging", "StopCharging"})
    dry = _dry_run(c.p)
    return _batch(c, lambda i: instances.stop_instance(c.ctx, c.account_id, i,
                                                       region_id=c.region, force=force,
                                                       stopped_mode=mode, dry_run=dry))


@action("RebootInstance")
def reboot_instance(c: Call) -> dict[str, Any]:
    instances.reboot_instance(c.ctx, c.account_id, c.p.str("InstanceId", required=True),
                              force=c.p.bool("ForceStop", default=False),
                              dry_run=_dry_run(c.p))
    return {}


@action("DeleteInstance")
def delete_instance(c: Call) -> dict[str, Any]:
    instances.delete_instance(c.ctx, c.account_id, c.p.str("InstanceId", required=True),
                              force=c.p.bool("Force", default=False))
    return {}


# ------------------------------------------------------------------ disks


@action("CreateDisk")
def create_disk(c: Call) -> dict[str, Any]:
    if c.p.str("InstanceId"):
        raise EcsError("UnsupportedParameter",
                       "ecsnap creates standalone disks; attach them with AttachDisk.", 400)
    disk_id = disks.create_disk(c.ctx, c.account_id, c.region, size_gib=c.p.int("Size"),
                                zone_id=c.p.str("ZoneId") or None,
                                category=c.p.str("DiskCategory") or "cloud_essd",
                                name=c.p.str("DiskName") or "",
                                description=c.p.str("Description") or "", tags=c.p.tags(),
                                snapshot_id=c.p.str("SnapshotId") or None,
                                client_token=c.p.str("ClientToken") or None)
    return {"DiskId": disk_id}


@action("AttachDisk")
def attach_disk(c: Call) -> dict[str, Any]:
    disks.attach_disk(c.ctx, c.account_id, c.p.str("InstanceId", required=True),
                      c.p.str("DiskId", required=True),
                      delete_with_instance=c.p.bool("DeleteWithInstance", default=False))
    return {}


@action("DetachDisk")
def detach_disk(c: Call) -> dict[str, Any]:
    disks.detach_disk(c.ctx, c.account_id, c.p.str("InstanceId", required=True),
                      c.p.str("DiskId", required=True))
    return {}


@action("DeleteDisk")
def delete_disk(c: Call) -> dict[str, Any]:
    disks.delete_disk(c.ctx, c.account_id, c.p.str("DiskId", required=True))
    return {}


@action("ResizeDisk")
def resize_disk(c: Call) -> dict[str, Any]:
    disks.resize_disk(c.ctx, c.account_id, c.p.str("DiskId", required=True),
                      c.p.int("NewSize", required=True),
                      resize_type=c.p.str("Type") or "offline")
    return {}


@action("ReInitDisk")
def reinit_disk(c: Call) -> dict[str, Any]:
    disks.reinit_disk(c.ctx, c.account_id, c.p.str("DiskId", required=True),
                      auto_start=c.p.bool("AutoStartInstance", default=False))
    return {}


@action("ReplaceSystemDisk")
def replace_system_disk(c: Call) -> dict[str, Any]:
    disk_id = disks.replace_system_disk(c.ctx, c.account_id,
                                        c.p.str("InstanceId", required=True),
                                        c.p.str("ImageId", required=True),
                                        size_gib=c.p.int("SystemDisk.Size"),
                                        client_token=c.p.str("ClientToken") or None)
    return {"DiskId": disk_id}


@action("DescribeDisks")
def describe_disks(c: Call) -> dict[str, Any]:
    if _dry_run(c.p):
        raise dry_run_passed()
    page = disks.describe_disks(
        c.ctx, c.account_id, c.region, disk_ids=c.p.json_list("DiskIds"),
        instance_id=c.p.str("InstanceId") or None, disk_type=c.p.str("DiskType") or None,
        status=c.p.str("Status") or None, category=c.p.str("Category") or None,
        zone_id=c.p.str("ZoneId") or None, name=c.p.str("DiskName") or None,
        tags=c.p.tags(), **_page_args(c.p))
    return {"Disks": {"Disk": [views.disk(d) for d in page.items]},
            **views.page_fields(page, _token_style(c.p))}


# ------------------------------------------------------------------ snapshots


@action("CreateSnapshot")
def create_snapshot(c: Call) -> dict[str, Any]:
    snap_id = snapshots.create_snapshot(c.ctx, c.account_id, c.p.str("DiskId", required=True),
                                        name=c.p.str("SnapshotName") or "",
                                        description=c.p.str("Description") or "",
                                        tags=c.p.tags(),
                                        retention_days=c.p.int("RetentionDays"),
                                        client_token=c.p.str("ClientToken") or None)
    return {"SnapshotId": snap_id}


@action("DescribeSnapshots")
def describe_snapshots(c: Call) -> dict[str, Any]:
    if _dry_run(c.p):
        raise dry_run_passed()
    page = snapshots.describe_snapshots(
        c.ctx, c.account_id, c.region, snapshot_ids=c.p.json_list("SnapshotIds"),
        disk_id=c.p.str("DiskId") or None, instance_id=c.p.str("InstanceId") or None,
        status=c.p.str("Status") or None, name=c.p.str("SnapshotName") or None,
        source_disk_type=c.p.str("SourceDiskType") or None, tags=c.p.tags(),
        **_page_args(c.p))
    return {"Snapshots": {"Snapshot": [views.snapshot(s) for s in page.items]},
            **views.page_fields(page, _token_style(c.p))}


@action("DeleteSnapshot")
def delete_snapshot(c: Call) -> dict[str, Any]:
    snapshots.delete_snapshot(c.ctx, c.account_id, c.p.str("SnapshotId", required=True),
                              force=c.p.bool("Force", default=False))
    return {}


@action("ModifySnapshotAttribute")
def modify_snapshot(c: Call) -> dict[str, Any]:
    snapshots.modify_snapshot(c.ctx, c.account_id, c.p.str("SnapshotId", required=True),
                              name=c.p.str("SnapshotName"), description=c.p.str("Description"))
    return {}


@action("CreateSnapshotGroup")
def create_snapshot_group(c: Call) -> dict[str, Any]:
    group_id, task_id = snapshots.create_snapshot_group(
        c.ctx, c.account_id, c.region, c.p.str("InstanceId", required=True),
        exclude_disk_ids=c.p.list("ExcludeDiskId"), disk_ids=c.p.list("DiskId"),
        name=c.p.str("Name") or "", description=c.p.str("Description") or "",
        tags=c.p.tags(), quiesce=c.p.bool("FileSystemConsistent", default=True))
    return {"SnapshotGroupId": group_id, "TaskId": task_id}


@action("DescribeSnapshotGroups")
def describe_snapshot_groups(c: Call) -> dict[str, Any]:
    page = snapshots.describe_snapshot_groups(
        c.ctx, c.account_id, c.region, group_ids=c.p.list("SnapshotGroupId") or None,
        instance_id=c.p.str("InstanceId") or None, name=c.p.str("Name") or None,
        statuses=c.p.list("Status") or None, next_token=c.p.str("NextToken") or None,
        max_results=c.p.int("MaxResults", min=1, max=100))
    return {"SnapshotGroups": {"SnapshotGroup": [views.snapshot_group(v) for v in page.items]},
            "NextToken": page.next_token}


@action("ModifySnapshotGroup")
def modify_snapshot_group(c: Call) -> dict[str, Any]:
    snapshots.modify_snapshot_group(c.ctx, c.account_id, c.region,
                                    c.p.str("SnapshotGroupId", required=True),
                                    name=c.p.str("Name"), description=c.p.str("Description"))
    return {}


@action("DeleteSnapshotGroup")
def delete_snapshot_group(c: Call) -> dict[str, Any]:
    snap_ids, task_id = snapshots.delete_snapshot_group(
        c.ctx, c.account_id, c.region, c.p.str("SnapshotGroupId", required=True))
    return {"TaskId": task_id, "OperationProgressSet": {"OperationProgress": [{
        "OperationStatus": "Success", "ErrorCode": "", "ErrorMsg": "",
        "RelatedItemSet": {"RelatedItem": [{"Name": "SnapshotId", "Value": s}]}}
        for s in snap_ids]}}


# ------------------------------------------------------------------ rollback


def _reset_items(p: Any) -> list[tuple[str, str]]:
    items = [(d.get("DiskId") or "", d.get("SnapshotId") or "")
             for d in p.objects("Disk", fields=("DiskId", "SnapshotId"))]
    if not items:
        raise EcsError("MissingParameter", "The input parameter \"Disk.1.DiskId\" that is "
                       "mandatory for processing this request is not supplied.", 400)
    return items


def _progress(items: list[tuple[str, str]]) -> dict[str, Any]:
    return {"OperationProgressSet": {"OperationProgress": [{
        "OperationStatus": "Success", "ErrorCode": "", "ErrorMsg": "",
        "RelatedItemSet": {"RelatedItem": [{"Name": "SnapshotId", "Value": s},
                                           {"Name": "DiskId", "Value": d}]}}
        for d, s in items]}}


@action("ResetDisks")
def reset_disks(c: Call) -> dict[str, Any]:
    result = rollback.reset_disks(c.ctx, c.account_id, c.region, _reset_items(c.p),
                                  auto_start=c.p.bool("AutoStartInstance", default=False),
                                  safety_snapshot=c.p.bool("SafetySnapshot", default=True),
                                  dry_run=_dry_run(c.p))
    return {**_progress(result.items), "SafetySnapshotGroupId": result.safety_group_id or "",
            "TaskId": result.task_id}


@action("ResetDisk")
def reset_disk(c: Call) -> dict[str, Any]:
    result = rollback.reset_disk(c.ctx, c.account_id, c.p.str("DiskId", required=True),
                                 c.p.str("SnapshotId", required=True),
                                 auto_start=c.p.bool("AutoStartInstance", default=False),
                                 safety_snapshot=c.p.bool("SafetySnapshot", default=True))
    return {"SafetySnapshotGroupId": result.safety_group_id or "", "TaskId": result.task_id}


@action("PreviewResetDisks")
def preview_reset_disks(c: Call) -> dict[str, Any]:
    preview = rollback.preview_reset_disks(c.ctx, c.account_id, c.region, _reset_items(c.p))

    def failures(fs: list[Any]) -> dict[str, Any]:
        return {"Failure": [{"Check": f.check, "Code": f.code, "Message": f.message}
                            for f in fs]}

    return {"InstanceId": preview.instance_id, "InstanceStatus": preview.instance_status,
            "StoppedMode": preview.stopped_mode, "Allowed": not preview.failures,
            "Warning": preview.stop_charging_warning,
            "InstanceFailures": failures(preview.instance_failures),
            "Disks": {"Disk": [{
                "DiskId": d.disk_id, "SnapshotId": d.snapshot_id, "DiskType": d.disk_type,
                "Allowed": d.ok,
                "BytesWrittenSinceSnapshot": -1 if d.bytes_written_since is None
                else d.bytes_written_since,
                "Failures": failures(d.failures)} for d in preview.disks]}}


# ------------------------------------------------------------------ tasks


@action("DescribeTasks")
def describe_tasks(c: Call) -> dict[str, Any]:
    ids_ = c.p.str("TaskIds")
    page = tasks_view.describe_tasks(c.ctx, c.account_id, c.region,
                                     task_ids=ids_.split(",") if ids_ else None,
                                     action=c.p.str("TaskAction") or None,
                                     status=c.p.str("TaskStatus") or None,
                                     page_number=c.p.int("PageNumber", min=1),
                                     page_size=c.p.int("PageSize", min=1, max=100))
    return {"TaskSet": {"Task": [views.task(t) for t in page.items]}, "RegionId": c.region,
            **views.page_fields(page, False)}


@action("DescribeTaskAttribute")
def describe_task_attribute(c: Call) -> dict[str, Any]:
    t = tasks_view.get_task(c.ctx, c.account_id, c.region, c.p.str("TaskId", required=True))
    failed = t.status.value == "Failed"
    return {**views.task(t), "RegionId": c.region, "TotalCount": 1,
            "SuccessCount": 0 if failed else int(t.status.value == "Finished"),
            "FailedCount": int(failed), "Result": dict(t.result),
            "OperationProgressSet": {"OperationProgress": [{
                "OperationStatus": "Failed" if failed else "Success",
                "ErrorCode": t.error_code, "ErrorMsg": t.error_message,
                "RelatedItemSet": {"RelatedItem": [{"Name": "ResourceId",
                                                    "Value": t.resource_id}]}}]}}


# ------------------------------------------------------------------ Cloud Assistant


@action("RunCommand")
def run_command(c: Call) -> dict[str, Any]:
    repeat = c.p.str("RepeatMode") or "Once"
    if repeat != "Once" or c.p.bool("Timed", default=False):
        raise EcsError("InvalidParameter", "ecsnap runs commands once (RepeatMode=Once).", 400)
    command_id, invoke_id = commands.run_command(
        c.ctx, c.account_id, c.region, command_type=c.p.str("Type", required=True),
        content=c.p.str("CommandContent", required=True), instance_ids=c.p.list("InstanceId"),
        timeout=c.p.int("Timeout", default=60), working_dir=c.p.str("WorkingDir") or "/root",
        name=c.p.str("Name") or "",
        content_encoding=c.p.str("ContentEncoding") or "PlainText")
    return {"CommandId": command_id, "InvokeId": invoke_id}


@action("DescribeInvocationResults")
def describe_invocation_results(c: Call) -> dict[str, Any]:
    encoding = c.p.str("ContentEncoding") or "Base64"
    page = commands.describe_invocation_results(
        c.ctx, c.account_id, c.region, invoke_id=c.p.str("InvokeId") or None,
        instance_id=c.p.str("InstanceId") or None, command_id=c.p.str("CommandId") or None,
        record_status=c.p.str("InvokeRecordStatus") or None,
        page_number=c.p.int("PageNumber", min=1), page_size=c.p.int("PageSize", min=1,
                                                                      max=50))
    return {"Invocation": {"PageNumber": page.page_number, "PageSize": page.page_size,
                           "TotalCount": page.total, "InvocationResults": {
                               "InvocationResult": [views.invocation_result(v, encoding)
                                                    for v in page.items]}}}


@action("DescribeInvocations")
def describe_invocations(c: Call) -> dict[str, Any]:
    encoding = c.p.str("ContentEncoding") or "Base64"
    page = commands.describe_invocation_results(
        c.ctx, c.account_id, c.region, invoke_id=c.p.str("InvokeId") or None,
        instance_id=c.p.str("InstanceId") or None, command_id=c.p.str("CommandId") or None,
        page_number=1, page_size=50)
    grouped: dict[str, list[Any]] = {}
    for v in page.items:
        grouped.setdefault(v.invoke_id, []).append(v)
    out = []
    for invoke_id, rows in grouped.items():
        first = rows[0]
        statuses = {r.status.value for r in rows}
        overall = "Running" if "Running" in statuses else (
            "Success" if statuses == {"Success"} else "Failed")
        content = first.command_content
        if encoding == "Base64":
            content = base64.b64encode(content.encode()).decode()
        out.append({"InvokeId": invoke_id, "CommandId": first.command_id,
                    "CommandType": first.command_type, "CommandName": first.name,
                    "CommandContent": content, "InvocationStatus": overall,
                    "InvokeStatus": overall, "CreationTime": views.iso(first.created),
                    "Timed": False, "Frequency": "", "RepeatMode": "Once",
                    "InvokeInstances": {"InvokeInstance": [
                        {"InstanceId": r.instance_id, "InvocationStatus": r.status.value,
                         "ExitCode": r.exit_code or 0, "Output": views.invocation_result(
                             r, encoding)["Output"], "StartTime": views.iso(r.started),
                         "FinishTime": views.iso(r.finished)} for r in rows]}})
    return {"Invocations": {"Invocation": out}, "TotalCount": len(out), "PageNumber": 1,
            "PageSize": 50}


__all__ = ["ACTIONS", "Call"]
