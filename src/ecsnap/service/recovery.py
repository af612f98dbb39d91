"""Crash recovery, run at every start-up before anything else.

1. Tasks: every task still Processing was cut off by a crash. Its operation first puts
   back what the crash may have left (`before_resume`: a guest frozen by a live
   snapshot), then says whether to drive it forward (its done steps are skipped, the
   interrupted one re-runs: steps are idempotent) or to undo it (compensate, then mark it
   Failed). Recovery knows no operation's steps.
2. Cloud Assistant commands that were running are reported interrupted.
3. Instances: a VM that is running is reattached (nothing to do: VMs outlive ecsnap); an
   instance recorded as Running (or on its way) whose VM died is marked Stopped.

Start-up never dies for one bad resource: a task that can be neither driven forward nor
undone (a disk file corrupted or gone, any exception from its operation's hooks) is
marked Failed with the reason (`Task.RecoveryFailed`), its locks are released, and the
instance and disks it held carry the tag `ecsnap:needs-attention` (its value: the task
ID; DescribeInstances and DescribeDisks show it) and an ERROR log line names them, for
the operator to repair; the other tasks are recovered, and the service starts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ecsnap.adapters.store.base import Criteria, UnitOfWork
from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import InstanceStatus, Task, TaskStatus
from ecsnap.service.commands import interrupt_running
from ecsnap.service.context import ServiceContext
from ecsnap.service.operation import Resume

log = logging.getLogger("ecsnap.recovery")

ATTENTION_TAG = "ecsnap:needs-attention"  # value: the ID of the task recovery gave up on
RECOVERY_FAILED = "Task.RecoveryFailed"


@dataclass
class RecoveryReport:
    forward: list[str] = field(default_factory=list)
    undone: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # given up: resources need attention


def recover(ctx: ServiceContext) -> RecoveryReport:
    report = RecoveryReport()
    with ctx.uow(readonly=True) as uow:
        pending = [t.id for t in uow.tasks.find(Criteria(newest_first=False),
                                                status=TaskStatus.PROCESSING)]
    for task_id in pending:
        resume_task(ctx, task_id, report)
    interrupt_running(ctx)
    running = set(ctx.compute.running())
    with ctx.uow() as uow:
        for inst in uow.instances.find():
            if inst.status == InstanceStatus.STOPPED or inst.lock_task_id:
                continue
            if inst.reconcile(inst.id in running) and inst.status == InstanceStatus.STOPPED:
                log.warning("recovery: the VM of %s is gone; marking it Stopped", inst.id)
                report.stopped.append(inst.id)
        uow.commit()
    if running:
        log.info("recovery: %d VM(s) running and reattached: %s", len(running),
                 ", ".join(sorted(running)))
    return report


def resume_task(ctx: ServiceContext, task_id: str,
                report: RecoveryReport | None = None) -> RecoveryReport:
    """Recover one task that a crash cut short: forward, undone, or given up (its resources
    flagged). At start-up for every Processing task; in a cluster, by the agent that takes
    over a task from a fenced or restarted one."""
    report = report if report is not None else RecoveryReport()
    try:
        _recover_task(ctx, task_id, report)
    except Exception as exc:  # one task's trouble never stops the start-up
        _give_up(ctx, task_id, exc)
        report.failed.append(task_id)
    return report


def _recover_task(ctx: ServiceContext, task_id: str, report: RecoveryReport) -> None:
    runner = ctx.runner
    with ctx.uow(readonly=True) as uow:
        task = uow.tasks.load(task_id)
    op = runner.operation(task)
    op.before_resume()
    if op.resume() == Resume.FORWARD:
        log.warning("recovery: driving task %s (%s) forward from %s", task.id, task.action,
                    task.done)
        runner.drive(task.id)  # a failing step: compensated and Failed (or raises)
        report.forward.append(task.id)
    else:
        log.warning("recovery: undoing task %s (%s) after %s", task.id, task.action,
                    task.done)
        runner.fail(task.id, EcsError(
            "Task.Interrupted", "ecsnap stopped while the task ran; it was undone.", 500))
        report.undone.append(task.id)


def _give_up(ctx: ServiceContext, task_id: str, exc: Exception) -> None:
    """The task could be neither driven forward nor undone: mark it Failed with the reason,
    release its locks, tag what it held for the operator. Its operation's `failed`
    bookkeeping runs if it can (so no row stays `progressing`); if that fails too, the task
    is marked Failed without it."""
    why = f"{exc.code}: {exc.message}" if isinstance(exc, EcsError) else \
        f"{type(exc).__name__}: {exc}"
    log.error("recovery: task %s could be neither driven forward nor undone (%s); it is "
              "marked Failed", task_id, why, exc_info=exc)
    held: list[tuple[str, str]] = []
    for bookkeeping in (True, False):
        try:
            with ctx.uow() as uow:
                task = uow.tasks.load(task_id)
                if task.status != TaskStatus.PROCESSING:
                    return  # it ended after all (its failure was recorded before the error)
                if bookkeeping:
                    op = ctx.runner.operation(task)
                    op.task = task
                    op.failed(uow)
                held = _release_and_flag(uow, task)
                task.fail(RECOVERY_FAILED, _reason(why, held))
                uow.commit()
            break
        except Exception:
            if not bookkeeping:
                log.exception("recovery: task %s could not even be marked Failed", task_id)
                return
    names = ", ".join(f"{kind} {obj_id}" for kind, obj_id in held) or "no resource"
    log.error("recovery: task %s: %s need(s) attention (tag %s=%s): repair them, then remove "
              "the tag", task_id, names, ATTENTION_TAG, task_id)


def _release_and_flag(uow: UnitOfWork, task: Task) -> list[tuple[str, str]]:
    """Release the task's locks; tag the instance and disks it held."""
    held = [(str(kind), str(obj_id)) for kind, obj_id in task.plan.get("locks", [])]
    for kind in ("instance", "disk"):
        ids = [obj_id for k, obj_id in held if k == kind]
        if ids:
            uow.unlock(kind, ids, task.id)
    for kind, obj_id in held:
        obj = uow.instances.get(obj_id) if kind == "instance" else \
            uow.disks.get(obj_id) if kind == "disk" else None
        if obj is not None:
            obj.tags = {**obj.tags, ATTENTION_TAG: task.id}
    return held


def _reason(why: str, held: list[tuple[str, str]]) -> str:
    flagged = ", ".join(obj_id for _, obj_id in held)
    return (f"Recovery at start-up could neither finish nor undo this task: {why}. "
            + (f"Tagged {ATTENTION_TAG} for the operator: {flagged}." if flagged else ""))
