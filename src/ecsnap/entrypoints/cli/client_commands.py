"""Client commands of `ecsnap`: they call the API (signed), never the services directly.

Listings print a table for people (`--output table`, the default) or the API's answer as
JSON (`--output json`). In a table IDs are never cut or folded: the other columns fold, and
when the terminal is too narrow even for that, the least useful columns are left out (a
note on stderr names them; `--output json` has everything)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn
from rich.table import Column, Table

from ecsnap import config
from ecsnap.domain.errors import EcsError
from ecsnap.entrypoints.cli.client import ApiClient, load_credentials
from ecsnap.entrypoints.cli.common import (
    DataDir,
    Output,
    OutputFormat,
    err,
    fail,
    human_bytes,
    not_initialised,
    out,
)

groups_app = typer.Typer(help="Instance snapshots (snapshot groups).", no_args_is_help=True)


def client(data_dir: Path | None) -> ApiClient:
    """A client with the credentials of the data directory (config.find_data_dir), else of
    ~/.config/ecsnap/config.json or the environment (ECSNAP_ACCESS_KEY_ID...)."""
    found = config.find_data_dir(data_dir)
    if config.is_initialised(found):
        return ApiClient(load_credentials(found))
    if data_dir is not None:  # named on purpose (--data-dir or ECSNAP_DATA_DIR): say so
        raise not_initialised(found)
    try:
        return ApiClient(load_credentials(None))
    except EcsError as exc:
        raise EcsError(exc.code, f"No credentials: {not_initialised(found).message} Or "
                       "write ~/.config/ecsnap/config.json (AccessKeyId, AccessKeySecret, "
                       "RegionId, Endpoint).", exc.http_status) from exc


@dataclass(frozen=True)
class Col:
    """A column of a table: `key` in the API's items, `header` for people."""

    key: str
    header: str
    ident: bool = False  # IDs (one a line): never cut, never folded
    min_width: int = 8  # folded down to this width at most; narrower, it is left out
    drop: int = 0  # > 0: may be left out when the terminal is too narrow, highest first


GAP = 2  # between two columns


def show(rows: list[dict[str, Any]], columns: list[Col], output: str, raw: Any) -> None:
    if output == OutputFormat.json:
        print(json.dumps(raw, indent=2, ensure_ascii=False))
        return
    cells = [[_cell(row.get(c.key, "")) for c in columns] for row in rows]
    natural = [max([len(c.header)] + [len(line) for r in cells for line in r[i].split("\n")])
               for i, c in enumerate(columns)]
    least = [n if c.ident else min(n, c.min_width) for c, n in zip(columns, natural,
                                                                   strict=True)]
    keep = list(range(len(columns)))
    for i in sorted((i for i, c in enumerate(columns) if c.drop), key=lambda i:
                    -columns[i].drop):
        if sum(least[k] for k in keep) + GAP * (len(keep) - 1) <= out.width:
            break
        keep.remove(i)
    # the widths are set here, not by Rich: a Rich min_width makes it fold a cell at one
    # width and crop it to another (characters lost); the widest foldable column gives first
    widths = {i: natural[i] for i in keep}
    excess = sum(widths.values()) + GAP * (len(keep) - 1) - out.width
    while excess > 0:
        foldable = [k for k in keep if widths[k] > least[k]]
        if not foldable:
            break
        widths[max(foldable, key=lambda k: widths[k])] -= 1
        excess -= 1
    table = Table(*[Column(columns[i].header, no_wrap=columns[i].ident, overflow="fold",
                           width=widths[i]) for i in keep],
                  box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, show_edge=False,
                  collapse_padding=True)
    for row in cells:
        table.add_row(*[row[i] for i in keep])
    out.print(table)
    if not rows:
        err.print("(none)", highlight=False)
    left_out = [columns[i].header for i in range(len(columns)) if i not in keep]
    if left_out:
        err.print(f"(not shown at {out.width} columns: {', '.join(left_out)}; use a wider "
                  "terminal or --output json)", highlight=False)


def _cell(value: Any) -> str:
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _run(fn: Any) -> Any:
    try:
        return fn()
    except EcsError as exc:
        fail(exc)


def wait_task(api: ApiClient, task_id: str, label: str, output: str) -> dict[str, Any]:
    """Poll a task with a live progress bar (none with --output json)."""
    def poll() -> dict[str, Any]:
        return api.call("DescribeTaskAttribute", {"TaskId": task_id})

    if output == "json":
        while (t := poll())["TaskStatus"] == "Processing":
            time.sleep(0.5)
        return t
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.percentage:>3.0f}%"), console=err) as progress:
        bar = progress.add_task(label, total=100)
        while True:
            t = poll()
            progress.update(bar, completed=int(str(t["TaskProcess"]).rstrip("%") or 0))
            if t["TaskStatus"] != "Processing":
                return t
            time.sleep(0.5)


def _check_task(t: dict[str, Any]) -> None:
    if t["TaskStatus"] == "Failed":
        op = t["OperationProgressSet"]["OperationProgress"][0]
        raise EcsError(op["ErrorCode"], op["ErrorMsg"], 400)


def _all_pages(data_dir: Path | None, action: str, params: dict[str, Any],
               items: str) -> dict[str, Any]:
    """Every page of a list (NextToken), as one answer: {"<Items>": {"<Item>": [...]}}."""
    api = client(data_dir)
    outer, inner = items.split(".")
    rows: list[dict[str, Any]] = []
    token = None
    while True:
        body = api.call(action, {**params, "MaxResults": 100, "NextToken": token})
        rows += body[outer][inner]
        token = body.get("NextToken")
        if not token:
            return {outer: {inner: rows}, "TotalCount": len(rows)}


def instances(data_dir: DataDir = None, output: Output = OutputFormat.table) -> None:
    """List instances."""
    body = _run(lambda: _all_pages(data_dir, "DescribeInstances", {}, "Instances.Instance"))
    rows = [{**row,  # an unnamed instance is named by its ID: not twice in a table
             "Name": "" if row["InstanceName"] == row["InstanceId"] else row["InstanceName"],
             "Mode": row["StoppedMode"] if row["Status"] == "Stopped" else ""}
            for row in body["Instances"]["Instance"]]
    show(rows, [Col("InstanceId", "Instance", ident=True), Col("Status", "Status"),
                Col("Mode", "Stopped mode", drop=2), Col("InstanceType", "Type", min_width=17),
                Col("ImageId", "Image", ident=True, drop=3), Col("Name", "Name", drop=1)],
         output, body)


def disks(data_dir: DataDir = None, instance: Annotated[str | None, typer.Option()] = None,
          output: Output = OutputFormat.table) -> None:
    """List disks (of one instance with --instance)."""
    body = _run(lambda: _all_pages(data_dir, "DescribeDisks", {"InstanceId": instance},
                                   "Disks.Disk"))
    show(body["Disks"]["Disk"], [
        Col("DiskId", "Disk", ident=True), Col("InstanceId", "Instance", ident=True, drop=2),
        Col("Type", "Type", min_width=6), Col("Size", "GiB", min_width=5),
        Col("Status", "Status"), Col("Device", "Device", drop=1),
        Col("SourceSnapshotId", "From snapshot", ident=True, drop=3)], output, body)


def snapshots(data_dir: DataDir = None, disk: Annotated[str | None, typer.Option()] = None,
              output: Output = OutputFormat.table) -> None:
    """List snapshots (of one disk with --disk)."""
    body = _run(lambda: _all_pages(data_dir, "DescribeSnapshots", {"DiskId": disk},
                                   "Snapshots.Snapshot"))
    show(body["Snapshots"]["Snapshot"], [
        Col("SnapshotId", "Snapshot", ident=True), Col("SourceDiskId", "Disk", ident=True),
        Col("SourceDiskType", "Disk type", min_width=6),
        Col("Status", "Status", min_width=12),
        Col("SnapshotName", "Name", drop=1),
        Col("SnapshotGroupId", "Instance snapshot", ident=True, drop=2)], output, body)


@groups_app.command("list")
def groups_list(data_dir: DataDir = None, instance: Annotated[str | None, typer.Option()] = None,
                output: Output = OutputFormat.table) -> None:
    """List instance snapshots (of one instance with --instance)."""
    body = _run(lambda: _all_pages(data_dir, "DescribeSnapshotGroups",
                                   {"InstanceId": instance}, "SnapshotGroups.SnapshotGroup"))
    rows = [{**row, "Disks": "\n".join(s["SourceDiskId"] for s in row["Snapshots"]["Snapshot"])}
            for row in body["SnapshotGroups"]["SnapshotGroup"]]
    show(rows, [Col("SnapshotGroupId", "Instance snapshot", ident=True),
                Col("Name", "Name"), Col("Status", "Status", min_width=12),
                Col("Disks", "Disks", ident=True),
                Col("InstanceId", "Instance", ident=True, drop=2),
                Col("CreationTime", "Created", min_width=20, drop=1),
                Col("ConsistencyLevel", "Consistency", drop=3)], output, body)


@groups_app.command("create")
def groups_create(instance: str, data_dir: DataDir = None,
                  name: Annotated[str | None, typer.Option()] = None,
                  description: Annotated[str | None, typer.Option()] = None,
                  exclude: Annotated[list[str] | None, typer.Option("--exclude")] = None,
                  output: Output = OutputFormat.table) -> None:
    """Take an instance snapshot of INSTANCE (all disks, less --exclude)."""
    def run() -> dict[str, Any]:
        api = client(data_dir)
        params: dict[str, Any] = {"InstanceId": instance, "Name": name,
                                  "Description": description}
        for n, disk_id in enumerate(exclude or [], 1):
            params[f"ExcludeDiskId.{n}"] = disk_id
        body = api.call("CreateSnapshotGroup", params)
        task = wait_task(api, body["TaskId"], f"instance snapshot {body['SnapshotGroupId']}",
                         output)
        _check_task(task)
        return body

    body = _run(run)
    if output == "json":
        print(json.dumps(body))
    else:
        out.print(f"{body['SnapshotGroupId']} accomplished", highlight=False)


@groups_app.command("delete")
def groups_delete(group: str, data_dir: DataDir = None) -> None:
    """Delete an instance snapshot and its snapshots."""
    body = _run(lambda: client(data_dir).call("DeleteSnapshotGroup",
                                              {"SnapshotGroupId": group}))
    out.print(f"{group} deleted", highlight=False)
    for op in body["OperationProgressSet"]["OperationProgress"]:
        if op["ErrorCode"]:  # a member in use is kept (ECS), say which and why
            snap = op["RelatedItemSet"]["RelatedItem"][0]["Value"]
            out.print(f"{snap} kept: {op['ErrorCode']}: {op['ErrorMsg']}", highlight=False)


# ------------------------------------------------------------ custom images, disks

def _until_settled(api: ApiClient, action: str, params: dict[str, Any], items: str,
                   pending: str, timeout_s: float = 3600) -> dict[str, Any]:
    """Poll a Describe* call until its one item has left the status `pending`."""
    outer, inner = items.split(".")
    deadline = time.monotonic() + timeout_s
    while True:
        found = api.call(action, params)[outer][inner]
        if found and found[0]["Status"] != pending:
            return dict(found[0])
        if time.monotonic() > deadline:
            raise EcsError("OperationTimeout", f"still {pending} after {timeout_s:.0f} s", 500)
        time.sleep(0.5)


def image_list(data_dir: DataDir = None, output: Output = OutputFormat.table) -> None:
    """List your custom images (ImageOwnerAlias=self), being made or failed ones too."""
    def run() -> dict[str, Any]:
        api, rows, page = client(data_dir), [], 1
        while True:
            body = api.call("DescribeImages", {
                "ImageOwnerAlias": "self", "Status": "Creating,Available,CreateFailed",
                "PageSize": 100, "PageNumber": page})
            rows += body["Images"]["Image"]
            if len(rows) >= body["TotalCount"] or not body["Images"]["Image"]:
                return {"Images": {"Image": rows}, "TotalCount": len(rows)}
            page += 1

    body = _run(run)
    rows = [{**m, "Source": m["DiskDeviceMappings"]["DiskDeviceMapping"][0]["SnapshotId"]
             if m["DiskDeviceMappings"]["DiskDeviceMapping"] else ""}
            for m in body["Images"]["Image"]]
    show(rows, [Col("ImageId", "Image", ident=True), Col("ImageName", "Name"),
                Col("Status", "Status", min_width=9), Col("Size", "GiB", min_width=4),
                Col("Source", "From snapshot", ident=True, drop=1),
                Col("Usage", "Usage", drop=2),
                Col("CreationTime", "Created", min_width=20, drop=3)], output, body)


def image_create(data_dir: DataDir = None,
                 snapshot: Annotated[str | None, typer.Option(
                     help="a system disk's snapshot")] = None,
                 instance: Annotated[str | None, typer.Option(
                     help="an instance: its system disk is snapshotted first")] = None,
                 name: Annotated[str | None, typer.Option()] = None,
                 description: Annotated[str | None, typer.Option()] = None,
                 output: Output = OutputFormat.table) -> None:
    """Make a custom image of a system disk's snapshot or of an instance, wait for it."""
    if not snapshot and not instance:
        fail(EcsError("MissingParameter", "Give --snapshot or --instance.", 400))

    def run() -> dict[str, Any]:
        api = client(data_dir)
        body = api.call("CreateImage", {"SnapshotId": snapshot, "InstanceId": instance,
                                        "ImageName": name, "Description": description})
        image = _until_settled(api, "DescribeImages", {
            "ImageId": body["ImageId"], "ImageOwnerAlias": "self",
            "Status": "Creating,Available,CreateFailed"}, "Images.Image", "Creating")
        if image["Status"] != "Available":
            raise EcsError("CreateImage.Failed", f"{body['ImageId']} is {image['Status']}",
                           500)
        return image

    image = _run(run)
    if output == "json":
        print(json.dumps(image))
    else:
        out.print(f"{image['ImageId']} Available", highlight=False)


def image_delete(image: str, data_dir: DataDir = None,
                 force: Annotated[bool, typer.Option(
                     help="even if instances were made from it")] = False) -> None:
    """Delete a custom image."""
    _run(lambda: client(data_dir).call("DeleteImage", {"ImageId": image,
                                                       "Force": "true" if force else None}))
    out.print(f"{image} deleted", highlight=False)


disk_app = typer.Typer(help="Disks: create one (blank, or from a snapshot), attach it.",
                       no_args_is_help=True)


@disk_app.command("create")
def disk_create(data_dir: DataDir = None,
                snapshot: Annotated[str | None, typer.Option(
                    help="the snapshot whose content the disk gets")] = None,
                size: Annotated[int | None, typer.Option(
                    help="GiB (from a snapshot: at least the snapshot's disk's)")] = None,
                name: Annotated[str | None, typer.Option()] = None,
                output: Output = OutputFormat.table) -> None:
    """Create a data disk, blank or from a snapshot, and wait until it is Available."""
    def run() -> dict[str, Any]:
        api = client(data_dir)
        body = api.call("CreateDisk", {"SnapshotId": snapshot, "Size": size,
                                       "DiskName": name})
        disk = _until_settled(api, "DescribeDisks", {"DiskIds": json.dumps([body["DiskId"]])},
                              "Disks.Disk", "Creating")
        if disk["Status"] != "Available":
            raise EcsError("CreateDisk.Failed", f"{body['DiskId']} is {disk['Status']}", 500)
        return disk

    disk = _run(run)
    if output == "json":
        print(json.dumps(disk))
    else:
        source = f" from {disk['SourceSnapshotId']}" if disk["SourceSnapshotId"] else ""
        out.print(f"{disk['DiskId']} Available, {disk['Size']} GiB{source}", highlight=False)


@disk_app.command("attach")
def disk_attach(disk: str, instance: Annotated[str, typer.Option()],
                data_dir: DataDir = None) -> None:
    """Attach a disk to an instance."""
    _run(lambda: client(data_dir).call("AttachDisk", {"DiskId": disk, "InstanceId": instance}))
    out.print(f"{disk} attached to {instance}", highlight=False)


def rollback(group: str, data_dir: DataDir = None,
             disk: Annotated[list[str] | None, typer.Option("--disk", help="disk to roll back"
                                                            " (repeat; default all)")] = None,
             start: Annotated[bool, typer.Option("--start", help="start the instance after")]
             = False,
             no_safety: Annotated[bool, typer.Option("--no-safety",
                                                     help="no safety snapshot")] = False,
             preview: Annotated[bool, typer.Option("--preview", help="check only")] = False,
             output: Output = OutputFormat.table) -> None:
    """Roll disks back from instance snapshot GROUP (ResetDisks)."""
    def run() -> dict[str, Any]:
        api = client(data_dir)
        found = api.call("DescribeSnapshotGroups", {"SnapshotGroupId.1": group})
        groups = found["SnapshotGroups"]["SnapshotGroup"]
        if not groups:
            raise EcsError("InvalidSnapshotGroupId.NotFound",
                           f"The snapshot group {group} does not exist.", 404)
        members = [s for s in groups[0]["Snapshots"]["Snapshot"]
                   if not disk or s["SourceDiskId"] in disk]
        missing = set(disk or []) - {s["SourceDiskId"] for s in members}
        if missing:
            raise EcsError("InvalidDiskId.NotFound",
                           f"Not in {group}: {', '.join(sorted(missing))}", 404)
        params: dict[str, Any] = {}
        for n, s in enumerate(members, 1):
            params[f"Disk.{n}.DiskId"] = s["SourceDiskId"]
            params[f"Disk.{n}.SnapshotId"] = s["SnapshotId"]
        if preview:
            return api.call("PreviewResetDisks", params)
        body = api.call("ResetDisks", {**params, "AutoStartInstance": start,
                                       "SafetySnapshot": not no_safety})
        task = wait_task(api, body["TaskId"], f"rollback from {group}", output)
        _check_task(task)
        return {**body, "Result": task.get("Result", {})}

    body = _run(run)
    if output == "json":
        print(json.dumps(body, indent=2))
        return
    if preview:
        for d in body["Disks"]["Disk"]:
            written = human_bytes(d["BytesWrittenSinceSnapshot"])
            state = "ok" if d["Allowed"] else "; ".join(
                f"{f['Code']}: {f['Message']}" for f in d["Failures"]["Failure"])
            out.print(f"{d['DiskId']} <- {d['SnapshotId']}: {written} written since; "
                      f"{state}", highlight=False)
        for f in body["InstanceFailures"]["Failure"]:
            out.print(f"instance: {f['Code']}: {f['Message']}", highlight=False)
        if body.get("Warning"):
            out.print(f"warning: {body['Warning']}", highlight=False)
        if not body["Allowed"]:
            raise typer.Exit(1)
        return
    out.print("rolled back; safety snapshot group: "
              f"{body['SafetySnapshotGroupId'] or '(none)'}", highlight=False)
    result = body.get("Result", {})
    if result.get("start_error"):
        err.print(f"not started: {result['start_error']['Code']}: "
                  f"{result['start_error']['Message']}", highlight=False)
    if result.get("health"):
        out.print(f"guest agent: {result['health']['GuestAgent']}", highlight=False)


def run(instance: str, command: Annotated[list[str], typer.Argument(help="-- COMMAND ...")],
        data_dir: DataDir = None, timeout: Annotated[int, typer.Option()] = 60,
        output: Output = OutputFormat.table) -> None:
    """Run a shell command in a Running instance (Cloud Assistant RunCommand)."""
    def go() -> dict[str, Any]:
        api = client(data_dir)
        body = api.call("RunCommand", {"Type": "RunShellScript", "InstanceId.1": instance,
                                       "CommandContent": " ".join(command),
                                       "Timeout": timeout})
        while True:
            res = api.call("DescribeInvocationResults", {"InvokeId": body["InvokeId"],
                                                         "ContentEncoding": "PlainText"})
            rows = res["Invocation"]["InvocationResults"]["InvocationResult"]
            if rows and rows[0]["InvokeRecordStatus"] != "Running":
                return dict(rows[0])
            time.sleep(0.3)

    result = _run(go)
    if output == "json":
        print(json.dumps(result, indent=2))
    else:
        print(result["Output"], end="")
        if result["ErrorCode"]:
            err.print(f"{result['ErrorCode']}: {result['ErrorInfo']}", highlight=False)
    if result["ExitCode"] != 0 or result["ErrorCode"]:
        raise typer.Exit(1)


# `api` takes any --Name value pairs: register it with these Click context settings
PASS_THROUGH_OPTIONS = {"allow_extra_args": True, "ignore_unknown_options": True}


def api(ctx: typer.Context, action: str, data_dir: DataDir = None) -> None:
    """Call any API action: ecsnap api DescribeInstances --PageSize 5."""
    params: dict[str, str] = {}
    args = list(ctx.args)
    while args:
        key = args.pop(0)
        if not key.startswith("--"):
            fail(EcsError("InvalidParameter", f"Expected --Name value, got {key!r}.", 400))
        name, _, value = key[2:].partition("=")
        if not value:
            value = args.pop(0) if args else ""
        params[name] = value
    body = _run(lambda: client(data_dir).call(action, params))
    print(json.dumps(body, indent=2, ensure_ascii=False))
