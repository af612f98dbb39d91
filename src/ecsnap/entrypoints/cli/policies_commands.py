"""`ecsnap policy`: automatic snapshot policies over the API (CreateAutoSnapshotPolicy,
ModifyAutoSnapshotPolicyEx, DescribeAutoSnapshotPolicyEx, DeleteAutoSnapshotPolicy,
ApplyAutoSnapshotPolicy, CancelAutoSnapshotPolicy)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ecsnap.domain.errors import EcsError
from ecsnap.entrypoints.cli.client_commands import Col, client, show
from ecsnap.entrypoints.cli.common import DataDir, Output, OutputFormat, fail, out

policy_app = typer.Typer(help="Automatic snapshot policies: snapshots at set hours and "
                              "weekdays, kept for a number of days.", no_args_is_help=True)

HOURS = typer.Option("--time-points", help="hours of the region's day, e.g. 2,14")
DAYS = typer.Option("--weekdays", help="1 Monday .. 7 Sunday, e.g. 1,2,3,4,5")
RETENTION = typer.Option("--retention-days", help="-1: kept until deleted; or 1-65536")


def _call(action: str, params: dict[str, Any], data_dir: Path | None) -> dict[str, Any]:
    try:
        return client(data_dir).call(action, {k: v for k, v in params.items()
                                              if v is not None})
    except EcsError as exc:
        fail(exc)
        raise  # unreachable: fail() exits


def _array(csv: str | None) -> str | None:
    if csv is None:
        return None
    return json.dumps([v.strip() for v in csv.split(",") if v.strip()])


@policy_app.command("list")
def policy_list(data_dir: DataDir = None, output: Output = OutputFormat.table) -> None:
    """List the policies of the region."""
    rows: list[dict[str, Any]] = []
    number = 1
    while True:
        body = _call("DescribeAutoSnapshotPolicyEx", {"PageNumber": number, "PageSize": 100},
                     data_dir)
        page = body["AutoSnapshotPolicies"]["AutoSnapshotPolicy"]
        rows += page
        if not page or len(rows) >= body["TotalCount"]:
            break
        number += 1
    show([{**r, "TimePoints": ",".join(json.loads(r["TimePoints"])),
           "RepeatWeekdays": ",".join(json.loads(r["RepeatWeekdays"]))} for r in rows],
         [Col("AutoSnapshotPolicyId", "Policy", ident=True),
          Col("TimePoints", "Hours"), Col("RepeatWeekdays", "Weekdays"),
          Col("RetentionDays", "Days", min_width=4), Col("DiskNums", "Disks", min_width=5),
          Col("AutoSnapshotPolicyName", "Name", drop=1)],
         output, {"AutoSnapshotPolicies": {"AutoSnapshotPolicy": rows},
                  "TotalCount": len(rows)})


@policy_app.command("create")
def policy_create(time_points: Annotated[str, HOURS], weekdays: Annotated[str, DAYS],
                  retention_days: Annotated[int, RETENTION] = -1,
                  name: Annotated[str, typer.Option("--name")] = "",
                  data_dir: DataDir = None) -> None:
    """Create a policy; prints its ID."""
    body = _call("CreateAutoSnapshotPolicy", {
        "TimePoints": _array(time_points), "RepeatWeekdays": _array(weekdays),
        "RetentionDays": retention_days, "AutoSnapshotPolicyName": name or None}, data_dir)
    out.print(body["AutoSnapshotPolicyId"], highlight=False)


@policy_app.command("modify")
def policy_modify(policy: str,
                  time_points: Annotated[str | None, HOURS] = None,
                  weekdays: Annotated[str | None, DAYS] = None,
                  retention_days: Annotated[int | None, RETENTION] = None,
                  name: Annotated[str | None, typer.Option("--name")] = None,
                  data_dir: DataDir = None) -> None:
    """Change a policy's hours, weekdays, retention or name."""
    _call("ModifyAutoSnapshotPolicyEx", {
        "AutoSnapshotPolicyId": policy, "TimePoints": _array(time_points),
        "RepeatWeekdays": _array(weekdays), "RetentionDays": retention_days,
        "AutoSnapshotPolicyName": name}, data_dir)


@policy_app.command("delete")
def policy_delete(policy: str, data_dir: DataDir = None) -> None:
    """Delete a policy (its disks are left without one; its snapshots stay)."""
    _call("DeleteAutoSnapshotPolicy", {"AutoSnapshotPolicyId": policy}, data_dir)


@policy_app.command("apply")
def policy_apply(policy: str, disks: Annotated[list[str], typer.Argument(help="disk IDs")],
                 data_dir: DataDir = None) -> None:
    """Apply a policy to disks (it replaces theirs)."""
    _call("ApplyAutoSnapshotPolicy", {"AutoSnapshotPolicyId": policy,
                                      "DiskIds": json.dumps(disks)}, data_dir)


@policy_app.command("cancel")
def policy_cancel(disks: Annotated[list[str], typer.Argument(help="disk IDs")],
                  data_dir: DataDir = None) -> None:
    """Take these disks' policy off them."""
    _call("CancelAutoSnapshotPolicy", {"DiskIds": json.dumps(disks)}, data_dir)
