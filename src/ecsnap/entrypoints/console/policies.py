"""Console pages of automatic snapshot policies (Storage & Snapshots > Automatic Snapshot
Policies): list, create, modify, delete, apply to disks and cancel, through the same
service functions as the API (service.policies). Hours and weekdays come as checkboxes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from ecsnap.service import disks, policies

if TYPE_CHECKING:
    from ecsnap.entrypoints.console.app import Console, Session

WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


async def page(c: Console, request: Request, s: Session) -> Response:
    def load() -> dict[str, Any]:
        views = policies.describe_policies(c.ctx, s.account_id, s.region, page_size=100).items
        all_disks = disks.describe_disks(c.ctx, s.account_id, s.region, page_size=100).items
        return {"policies": views, "disks": all_disks, "weekdays": WEEKDAYS,
                "timezone": str(policies.region_timezone(c.ctx, s.region))}

    return c.render(request, "policies.html", session=s, nav="policies",
                    **await run_in_threadpool(load))


def _values(form: Any) -> dict[str, Any]:
    retention = str(form.get("retention_days") or "-1").strip()
    return {"time_points": [str(v) for v in form.getlist("hour")],
            "repeat_weekdays": [str(v) for v in form.getlist("weekday")],
            # not a number: 0, which the service refuses with ECS's code
            "retention_days": int(retention) if retention.lstrip("-").isdigit() else 0,
            "name": str(form.get("name", ""))}


async def create(c: Console, request: Request, s: Session) -> Response:
    form = await c.form(request, s)
    values = _values(form)
    return await c._act(request, s, lambda: policies.create_policy(
        c.ctx, s.account_id, s.region, **values), "policies")


async def modify(c: Console, request: Request, s: Session) -> Response:
    form = await c.form(request, s)
    policy_id = request.path_params["policy_id"]
    values = _values(form)
    return await c._act(request, s, lambda: policies.modify_policy(
        c.ctx, s.account_id, s.region, policy_id, **values), "policies")


async def delete(c: Console, request: Request, s: Session) -> Response:
    await c.form(request, s)
    policy_id = request.path_params["policy_id"]
    return await c._act(request, s, lambda: policies.delete_policy(
        c.ctx, s.account_id, s.region, policy_id), "policies")


async def apply(c: Console, request: Request, s: Session) -> Response:
    form = await c.form(request, s)
    policy_id = request.path_params["policy_id"]
    disk_ids = [str(d) for d in form.getlist("disk")]
    return await c._act(request, s, lambda: policies.apply_policy(
        c.ctx, s.account_id, s.region, policy_id, disk_ids), "policies")


async def cancel(c: Console, request: Request, s: Session) -> Response:
    form = await c.form(request, s)
    policy_id = request.path_params["policy_id"]
    disk_ids = [str(d) for d in form.getlist("disk")]
    return await c._act(request, s, lambda: policies.cancel_policy(
        c.ctx, s.account_id, s.region, disk_ids, policy_id=policy_id), "policies")
