"""`ecsnap files`: look inside snapshots over the API (DescribeSnapshotFiles, and the file
level of PreviewResetDisks), and restore files from them (RestoreSnapshotFiles). Nothing is
ever written to a host path derived from a guest's name: `get` writes where -o says, or to
stdout. Guest names arrive escaped (`\\xNN`) and are printed as plain text, never as Rich
markup."""

from __future__ import annotations

import base64
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from ecsnap.domain.errors import EcsError
from ecsnap.entrypoints.cli.client_commands import client
from ecsnap.entrypoints.cli.common import DataDir, Output, OutputFormat, err, fail, out

files_app = typer.Typer(help="Look inside snapshots: list and read their files, the files "
                             "a rollback would change, and restore files.",
                        no_args_is_help=True)

PAGE = 1000
CHUNK = 1 << 20


def _call(action: str, params: dict[str, Any], data_dir: Path | None) -> dict[str, Any]:
    try:
        return client(data_dir).call(action, params)
    except EcsError as exc:
        fail(exc)
        raise  # unreachable: fail() exits


def _plain(value: Any) -> Text:
    return Text(str(value), no_wrap=False)


@files_app.command("ls")
def ls(snapshot: Annotated[str, typer.Argument(help="snapshot ID (s-...)")],
       path: Annotated[str, typer.Argument(help="directory or file in the snapshot "
                                                "(escaped as listed: \\xNN)")] = "/",
       data_dir: DataDir = None, output: Output = OutputFormat.table) -> None:
    """List a directory of SNAPSHOT (every page), or show what PATH is."""
    params: dict[str, Any] = {"SnapshotId": snapshot, "Path": path, "MaxResults": PAGE,
                              "MaxBytes": 1}
    body = _call("DescribeSnapshotFiles", params, data_dir)
    entries = list(body.get("Entries", {}).get("Entry", []))
    while body.get("NextToken"):
        body = _call("DescribeSnapshotFiles", {**params, "NextToken": body["NextToken"]},
                     data_dir)
        entries += body["Entries"]["Entry"]
    if output == OutputFormat.json:
        body.pop("FileContent", None)
        print(json.dumps({**body, "Entries": {"Entry": entries}} if entries else body,
                         indent=2, ensure_ascii=False))
        return
    rows = entries if body["Type"] == "directory" else [body]
    table = Table("Mode", "Owner", "Size", "Modified", "Name", box=box.SIMPLE_HEAD,
                  pad_edge=False, show_edge=False)
    for e in rows:
        name = e["Name"] + ("/" if e["Type"] == "directory" else "")
        if e["Type"] == "symlink":
            name += f" -> {e['LinkTarget']}"
        elif e["Type"] not in ("file", "directory"):
            name += f" ({e['Type']})"
        table.add_row(*map(_plain, (e["Mode"], f"{e['Uid']}:{e['Gid']}", e["Size"],
                                    e["ModifiedTime"], name)))
    out.print(table)
    if body["Type"] == "directory":
        err.print(Text(f"{len(entries)} entries in {body['Path']}"), highlight=False)


@files_app.command("get")
def get(snapshot: Annotated[str, typer.Argument(help="snapshot ID (s-...)")],
        path: Annotated[str, typer.Argument(help="file in the snapshot (escaped: \\xNN)")],
        to: Annotated[Path | None, typer.Option("-o", "--to", help="write it to this file "
                                                "(default: stdout)")] = None,
        data_dir: DataDir = None) -> None:
    """Read a regular file of SNAPSHOT (1 MiB per call) to -o FILE or stdout."""
    first = _call("DescribeSnapshotFiles", {"SnapshotId": snapshot, "Path": path,
                                            "MaxBytes": CHUNK}, data_dir)
    if "FileContent" not in first:
        fail(EcsError("InvalidPath.NotAFile", f"{first['Path']} is a {first['Type']}"
                      + (f" (-> {first['LinkTarget']}, not followed)"
                         if first["Type"] == "symlink" else "")
                      + ": only a regular file can be read.", 400))
    sink = to.open("wb") if to is not None else sys.stdout.buffer
    try:
        part = first
        while True:
            sink.write(base64.b64decode(part["FileContent"]))
            if not part["Truncated"] or not part["ContentLength"]:
                break
            part = _call("DescribeSnapshotFiles", {
                "SnapshotId": snapshot, "Path": path, "MaxBytes": CHUNK,
                "Offset": part["ContentOffset"] + part["ContentLength"]}, data_dir)
    finally:
        if to is not None:
            sink.close()
        else:
            sink.flush()
    if to is not None:
        err.print(Text(f"{first['Path']}: {first['Size']} bytes written to {to}"),
                  highlight=False)


@files_app.command("changes")
def changes(group: Annotated[str, typer.Argument(help="instance snapshot (ssg-...)")],
            disk: Annotated[list[str] | None, typer.Option("--disk", help="disk (repeat; "
                                                           "default all)")] = None,
            limit: Annotated[int, typer.Option("--max", help="paths listed per disk")] = 200,
            data_dir: DataDir = None, output: Output = OutputFormat.table) -> None:
    """The files a rollback to GROUP would change, per disk (the instance must be stopped):
    remove (added since the snapshot), restore (deleted since), revert (modified since)."""
    found = _call("DescribeSnapshotGroups", {"SnapshotGroupId.1": group}, data_dir)
    groups = found["SnapshotGroups"]["SnapshotGroup"]
    if not groups:
        fail(EcsError("InvalidSnapshotGroupId.NotFound",
                      f"The snapshot group {group} does not exist.", 404))
    members = [s for s in groups[0]["Snapshots"]["Snapshot"]
               if not disk or s["SourceDiskId"] in disk]
    params: dict[str, Any] = {"IncludeFileChanges": True, "MaxFileChanges": limit}
    for n, s in enumerate(members, 1):
        params[f"Disk.{n}.DiskId"], params[f"Disk.{n}.SnapshotId"] = \
            s["SourceDiskId"], s["SnapshotId"]
    body = _call("PreviewResetDisks", params, data_dir)
    if output == OutputFormat.json:
        print(json.dumps(body, indent=2, ensure_ascii=False))
        return
    verbs = {"added": "remove ", "deleted": "restore", "modified": "revert "}
    for d in body["Disks"]["Disk"]:
        if d.get("FileLevel") != "Supported":
            out.print(Text(f"{d['DiskId']}: file level {d.get('FileLevel', '?')}: "
                           f"{d.get('FileLevelReason', '')}"), highlight=False)
            continue
        fc = d["FileChanges"]
        out.print(Text(f"{d['DiskId']} <- {d['SnapshotId']}: {fc['AddedCount']} to remove, "
                       f"{fc['DeletedCount']} to restore, {fc['ModifiedCount']} to revert"
                       + (f" (partial: {fc['PartialReason']})" if fc["Partial"] else "")),
                  highlight=False)
        for f in fc["Files"]["File"]:
            what = f" ({f['Changed'].replace(',', ', ')})" if f["Changed"] else ""
            out.print(Text(f"  {verbs.get(f['Change'], f['Change'])}  {f['Path']}{what}"),
                      highlight=False)
        more = fc["TotalCount"] - len(fc["Files"]["File"])
        if more > 0:
            out.print(Text(f"  ... and {more} more"), highlight=False)


@files_app.command("restore")
def restore(instance: Annotated[str, typer.Argument(help="instance ID (i-...)")],
            snapshot: Annotated[str, typer.Argument(help="snapshot of one of its disks")],
            paths: Annotated[list[str], typer.Argument(help="regular files in the snapshot "
                                                            "(escaped: \\xNN)")],
            to: Annotated[str | None, typer.Option("--to", help="with one path: where it "
                                                   "goes instead (a guest path, or a path "
                                                   "on the stopped disk)")] = None,
            wait: Annotated[float, typer.Option("--wait", help="seconds to wait for the "
                                                "task (0: do not wait)")] = 600.0,
            data_dir: DataDir = None, output: Output = OutputFormat.table) -> None:
    """Put files of SNAPSHOT back onto INSTANCE: into the guest (running, through its
    agent) or onto the disk (stopped), with their mode and owner (RestoreSnapshotFiles)."""
    params: dict[str, Any] = {"InstanceId": instance, "SnapshotId": snapshot}
    params.update({f"Path.{n}": p for n, p in enumerate(paths, 1)})
    if to:
        params["TargetPath"] = to
    body = _call("RestoreSnapshotFiles", params, data_dir)
    task: dict[str, Any] = {"TaskStatus": body["TaskStatus"]}
    deadline = time.monotonic() + wait
    while task["TaskStatus"] in ("Processing", "Waiting") and time.monotonic() < deadline:
        time.sleep(0.5)
        task = _call("DescribeTaskAttribute", {"TaskId": body["TaskId"]}, data_dir)
    if output == OutputFormat.json:
        print(json.dumps({**body, "TaskStatus": task["TaskStatus"]}, indent=2,
                         ensure_ascii=False))
    else:
        how = "into the guest" if body["RestoreMode"] == "GuestAgent" else "onto disk " + \
            body["DiskId"]
        for f in body["Files"]["File"]:
            out.print(Text(f"{f['Path']} -> {f['TargetPath']} ({how})"), highlight=False)
        out.print(Text(f"task {body['TaskId']}: {task['TaskStatus']}"), highlight=False)
    if task["TaskStatus"] == "Failed":
        if "OperationProgressSet" not in task:
            task = _call("DescribeTaskAttribute", {"TaskId": body["TaskId"]}, data_dir)
        progress = task["OperationProgressSet"]["OperationProgress"][0]
        fail(EcsError(progress["ErrorCode"], progress["ErrorMsg"], 400))
