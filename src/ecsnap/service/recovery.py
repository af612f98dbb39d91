"""Crash recovery, run at every start-up before anything else.

1. Instances: a VM that is running is reattached (nothing to do: VMs outlive ecsnap); an
   instance recorded as Running (or on its way) whose VM died is marked Stopped.
2. Tasks: every task still Processing was cut off by a crash. Its handler says whether to
   drive it forward (its done steps are skipped, the interrupted one re-runs: steps are
   idempotent) or to undo it (compensate, then mark it Failed).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ecsnap.adapters.store.base import Criteria
from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import InstanceStatus, StoppedMode, TaskStatus
from ecsnap.service.context import ServiceContext
from ecsnap.service.tasks import drive, fail, handler_for

log = logging.getLogger("ecsnap.recovery")


@dataclass
class RecoveryReport:
    forward: list[str] = field(default_factory=list)
    undone: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)


def recover(ctx: ServiceContext) -> RecoveryReport:
    report = RecoveryReport()
    with ctx.uow() as uow:
        pending = [t.id for t in uow.tasks.find(Criteria(newest_first=False),
                                                status=TaskStatus.PROCESSING)]
    for task_id in pending:
        with ctx.uow() as uow:
            task = uow.tasks.get(task_id)
            assert task is not None
        h = handler_for(task.action)
        if "transaction" in task.plan.get("steps", []):  # a live snapshot was cut short
            ctx.compute.resume_guest(task.plan["instance_id"])
        if h.recover_forward(ctx, task):
            log.warning("recovery: driving task %s (%s) forward from %s", task.id, task.action,
                        task.done)
            drive(ctx, task.id)
            report.forward.append(task.id)
        else:
            log.warning("recovery: undoing task %s (%s) after %s", task.id, task.action,
                        task.done)
            fail(ctx, task.id, EcsError("Task.Interrupted",
                                        "ecsnap stopped while the task ran; it was undone.", 500))
            report.undone.append(task.id)
    from ecsnap.service.commands import interrupt_running

    interrupt_running(ctx)
    running = set(ctx.compute.running())
    with ctx.uow() as uow:
        for inst in uow.instances.find():
            if inst.status == InstanceStatus.STOPPED or inst.lock_task_id:
                continue
            if inst.id not in running:
                log.warning("recovery: the VM of %s is gone; marking it Stopped", inst.id)
                inst.status = InstanceStatus.STOPPED
                inst.stopped_mode = StoppedMode.KEEP_CHARGING
                report.stopped.append(inst.id)
            elif inst.status != InstanceStatus.RUNNING:
                inst.status = InstanceStatus.RUNNING
        uow.commit()
    if running:
        log.info("recovery: %d VM(s) running and reattached: %s", len(running),
                 ", ".join(sorted(running)))
    return report
