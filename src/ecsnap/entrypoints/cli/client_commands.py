"""Client commands of `ecsnap`: they call the API (signed), never the services directly."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn
from rich.table import Table

from ecsnap.domain.errors import EcsError
from ecsnap.entrypoints.cli.client import ApiClient, load_credentials
from ecsnap.entrypoints.cli.common import DataDir, err, fail, out

groups_app = typer.Typer(help="Instance snapshots (snapshot groups).", no_args_is_help=True)

Output = Annotated[str, typer.Option("--output", "-o", help="table or json")]


def client(data_dir: Path | None) -> ApiClient:
    return ApiClient(load_credentials(data_dir))


def show(rows: list[dict[str, Any]], columns: list[str], output: str, raw: Any) -> None:
    if output == "json":
        print(json.dumps(raw, indent=2, ensure_ascii=False))
        return
    table = Table(*columns, show_lines=False)
    for row in rows:
        table.add_row(*[_cell(row.get(c, "")) for c in columns])
    out.print(table)


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


def instances(data_dir: DataDir = None, output: Output = "table") -> None:
    """List instances."""
    body = _run(lambda: client(data_dir).call("DescribeInstances", {"PageSize": 100}))
    rows = body["Instances"]["Instance"]
    show(rows, ["InstanceId", "InstanceName", "Status", "StoppedMode", "InstanceType",
                "ImageId"], output, body)


def disks(data_dir: DataDir = None, instance: Annotated[str | None, typer.Option()] = None,
          output: Output = "table") -> None:
    """List disks."""
    body = _run(lambda: client(data_dir).call("DescribeDisks", {"PageSize": 100,
                                                               "InstanceId": instance}))
    show(body["Disks"]["Disk"], ["DiskId", "Type", "Size", "Status", "InstanceId", "Device"],
         output, body)


def snapshots(data_dir: DataDir = None, disk: Annotated[str | None, typer.Option()] = None,
              output: Output = "table") -> None:
    """List snapshots."""
    body = _run(lambda: client(data_dir).call("DescribeSnapshots", {"PageSize": 100,
                                                                   "DiskId": disk}))
    show(body["Snapshots"]["Snapshot"], ["SnapshotId", "SnapshotName", "SourceDiskId",
                                         "SourceDiskType", "Status", "SnapshotGroupId"],
         output, body)


@groups_app.command("list")
def groups_list(data_dir: DataDir = None, instance: Annotated[str | None, typer.Option()] = None,
                output: Output = "table") -> None:
    """List instance snapshots (walks every page)."""
    def fetch() -> dict[str, Any]:
        api = client(data_dir)
        rows: list[dict[str, Any]] = []
        token = None
        while True:
            body = api.call("DescribeSnapshotGroups", {"MaxResults": 100, "NextToken": token,
                                                       "InstanceId": instance})
            rows += body["SnapshotGroups"]["SnapshotGroup"]
            token = body.get("NextToken")
            if not token:
                return {"SnapshotGroups": {"SnapshotGroup": rows}}

    body = _run(fetch)
    rows = body["SnapshotGroups"]["SnapshotGroup"]
    for row in rows:
        row["Disks"] = " ".join(s["SourceDiskId"] for s in row["Snapshots"]["Snapshot"])
    show(rows, ["SnapshotGroupId", "Name", "InstanceId", "Status", "ConsistencyLevel", "Disks",
                "CreationTime"], output, body)


@groups_app.command("create")
def groups_create(instance: str, data_dir: DataDir = None,
                  name: Annotated[str | None, typer.Option()] = None,
                  description: Annotated[str | None, typer.Option()] = None,
                  exclude: Annotated[list[str] | None, typer.Option("--exclude")] = None,
                  output: Output = "table") -> None:
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
    _run(lambda: client(data_dir).call("DeleteSnapshotGroup", {"SnapshotGroupId": group}))
    out.print(f"{group} deleted", highlight=False)


def rollback(group: str, data_dir: DataDir = None,
             disk: Annotated[list[str] | None, typer.Option("--disk", help="disk to roll back"
                                                            " (repeat; default all)")] = None,
             start: Annotated[bool, typer.Option("--start", help="start the instance after")]
             = False,
             no_safety: Annotated[bool, typer.Option("--no-safety",
                                                     help="no safety snapshot")] = False,
             preview: Annotated[bool, typer.Option("--preview", help="check only")] = False,
             output: Output = "table") -> None:
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
            written = d["BytesWrittenSinceSnapshot"]
            state = "ok" if d["Allowed"] else "; ".join(
                f"{f['Code']}: {f['Message']}" for f in d["Failures"]["Failure"])
            out.print(f"{d['DiskId']} <- {d['SnapshotId']}: "
                      f"{'unknown' if written < 0 else f'{written} bytes'} written since; "
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
        output: Output = "table") -> None:
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
