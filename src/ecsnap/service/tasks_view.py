"""Tasks as users see them (DescribeTasks, DescribeTaskAttribute, the console's progress)."""

from __future__ import annotations

from collections.abc import Sequence

from ecsnap.adapters.store.base import Criteria
from ecsnap.domain import errors
from ecsnap.domain.model import Task
from ecsnap.service.context import ServiceContext
from ecsnap.service.listing import Page, paginate


def get_task(ctx: ServiceContext, account_id: str, region_id: str | None, task_id: str) -> Task:
    with ctx.uow(readonly=True) as uow:
        task = uow.tasks.get(task_id)
        if task is None or task.account_id != account_id or \
                (region_id and task.region_id != region_id):
            raise errors.not_found("task", task_id)
        return task


def describe_tasks(ctx: ServiceContext, account_id: str, region_id: str, *,
                   task_ids: Sequence[str] | None = None, action: str | None = None,
                   status: str | None = None, page_number: int | None = None,
                   page_size: int | None = None) -> Page[Task]:
    criteria = Criteria(equals={"account_id": account_id, "region_id": region_id})
    if task_ids:
        criteria.within["id"] = list(task_ids)
    if action:
        criteria.equals["action"] = action
    if status in ("Finished", "Processing", "Failed"):
        criteria.equals["status"] = status
    with ctx.uow(readonly=True) as uow:
        ctx.check_region(uow, region_id)
        return paginate(uow.tasks, criteria, page_number=page_number, page_size=page_size)
