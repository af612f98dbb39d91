"""Crash recovery, run at every start-up before anything else.

1. Tasks: every task still Processing was cut off by a crash. Its operation first puts
   back what the crash may have left (`before_resume`: a guest frozen by a live
   snapshot), then says whether to drive it forward (its done steps are skipped, the
   interrupted one re-runs: steps are idempotent) or to undo it (compensate, then mark it
   Failed). Recovery knows no operation's steps.
2. Cloud Assistant commands that were running are reported interrupted.
3. Instances: a VM that is running is reattached (nothing to do: VMs outlive ecsnap); an
   instance recorded as Running (or on its way) whose VM died is marked Stopped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ecsnap.adapters.store.base import Criteria
from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import InstanceStatus, TaskStatus
from ecsnap.service.commands import interrupt_running
from ecsnap.service.context import ServiceContext
from ecsnap.service.operation import Resume

log = logging.getLogger("ecsnap.recovery")


@dataclass
class RecoveryReport:
    forward: list[str] = field(default_factory=list)
    undone: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)


def recover(ctx: ServiceContext) -> RecoveryReport:
    report = RecoveryReport()
    runner = ctx.runner
    with ctx.uow(readonly=True) as uow:
        pending = [t.id for t in uow.tasks.find(Criteria(newest_first=False),
                                                status=TaskStatus.PROCESSING)]
    for task_id in pending:
        with ctx.uow(readonly=True) as uow:
            task = uow.tasks.load(task_id)
        op = runner.operation(task)
        op.before_resume()
        if op.resume() == Resume.FORWARD:
            log.warning("recovery: driving task %s (%s) forward from %s", task.id, task.action,
                        task.done)
            runner.drive(task.id)
            report.forward.append(task.id)
        else:
            log.warning("recovery: undoing task %s (%s) after %s", task.id, task.action,
                        task.done)
            runner.fail(task.id, EcsError(
                "Task.Interrupted", "ecsnap stopped while the task ran; it was undone.", 500))
            report.undone.append(task.id)
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
