"""The task runner: journals operations, runs their steps, finishes or fails them.

A task is an `Operation` (service/operation.py) with its `Task` row: the row is written,
with the operation's locks, in the transaction that checked the rules (`journal`). Each
step is recorded in `done` once it has run, the last one in the transaction that finishes
the task, so a crash between the two counts as a crash inside that step. A crash (even
kill -9) at any point leaves a Processing task; at the next start `recovery.recover()`
asks its operation whether to drive it forward or undo it.

The runner knows operations only through the registry it is given (`service/registry.py`,
handed over by bootstrap): nothing registers itself by being imported.

Fault injection for crash tests: with ECSNAP_CRASH_AT=`Action:step:before` (or `:after`,
or `Action:finish:before`) the process kills itself with SIGKILL at that point; a step
may also be named by its place, `Action:kind#n:before` (the n-th step named `kind…`).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ecsnap import metrics
from ecsnap.adapters.store.base import UnitOfWork
from ecsnap.domain import errors, ids
from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import Task, TaskStatus
from ecsnap.service import idempotency
from ecsnap.service.context import ServiceContext
from ecsnap.service.operation import Lock, Operation, P, Step

log = logging.getLogger("ecsnap.tasks")

# Snapshot, delete and rollback tasks usually take well under a second: the service waits
# this long for them before answering (see TaskRunner.submit).
SHORT_TASK_S = 2.0


def _by_kind(locks: Iterable[Sequence[str]]) -> dict[str, list[str]]:
    """The locks of a plan, ("instance", ID) and ("disk", ID) pairs, by kind."""
    kinds: dict[str, list[str]] = {}
    for kind, obj_id in locks:
        kinds.setdefault(kind, []).append(obj_id)
    return kinds


def _places(steps: Sequence[Step]) -> dict[str, str]:
    """Each step's place for fault injection: its kind (the name up to a colon) and its
    rank among the steps of that kind, `create_disk#1`, so a test can name a step whose
    name holds an ID it does not know yet."""
    seen: dict[str, int] = {}
    places = {}
    for step in steps:
        kind = step.name.partition(":")[0]
        seen[kind] = seen.get(kind, 0) + 1
        places[step.name] = f"{kind}#{seen[kind]}"
    return places


class Fenced(BaseException):
    """Cluster mode: this agent's commit for a task was refused (its host was fenced, or
    rejoined under a newer epoch, or the task is no longer its own). The agent stops
    working on the task at once, undoing nothing: another agent owns it now. A
    BaseException, so that no `except Exception` of a step or of the runner (which would
    compensate) catches it."""


class TaskRunner:
    """Journals and executes operations: in background threads (the server) or inline."""

    def __init__(self, ctx: ServiceContext, operations: Iterable[type[Operation[Any]]], *,
                 background: bool, workers: int = 4, command_workers: int = 16) -> None:
        self.ctx = ctx
        self.operations: dict[str, type[Operation[Any]]] = {}
        for op in operations:
            if op.action in self.operations:
                raise ValueError(f"two operations for the action {op.action}")
            self.operations[op.action] = op
        self.background = background
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="task") \
            if background else None
        # guest commands run for up to 24 h: a pool of their own, so that they can never
        # take the workers that snapshots and rollbacks need
        self._commands = ThreadPoolExecutor(max_workers=command_workers,
                                            thread_name_prefix="command") \
            if background else None
        self._futures: dict[str, Future[Task]] = {}
        self._lock = threading.Lock()

    # -- journal
    def journal(self, uow: UnitOfWork, op_type: type[Operation[P]], plan: P, *,
                account_id: str, region_id: str, resource_id: str,
                task_id: str | None = None) -> Task:
        """Write the task of `plan`, take its locks and let the operation record what users
        see at once, in the caller's transaction (not committed here). `task_id`: the ID
        the plan was made for (names derived from it), a new one when None.

        Raises Operation.Conflict if any lock is held by another task."""
        if self.operations.get(op_type.action) is not op_type:
            raise ValueError(f"{op_type.__name__} is not in the runner's registry")
        locks = list(op_type.locks(plan))
        task = Task(id=task_id or ids.new_id("task"), account_id=account_id,
                    region_id=region_id, action=op_type.action, resource_id=resource_id)
        op = op_type(self.ctx, task, plan)
        task.plan = {**plan.to_journal(), "steps": [s.name for s in op.steps()],
                     "locks": [list(lock) for lock in locks]}
        uow.tasks.add(task)
        for kind, obj_ids in _by_kind(locks).items():
            refused = uow.try_lock(kind, obj_ids, task.id)
            if refused is not None:
                holder = uow.instances.get(refused) if kind == "instance" \
                    else uow.disks.get(refused)
                raise errors.operation_conflict(refused, getattr(holder, "lock_task_id", None))
        op.accept(uow)
        idempotency.journaled(uow, task.id)  # a ClientToken request's record, with its task
        return task

    def operation(self, task: Task) -> Operation[Any]:
        """The operation of a journaled task, its plan read back from the journal."""
        op_type = self.operations[task.action]
        plan = op_type.plan_type.from_journal(task.plan, task.resource_id)
        return op_type(self.ctx, task, plan)

    # -- execution
    def drive(self, task_or_id: Task | str) -> Task:
        """Run the remaining steps of a task, then finish it; on error compensate, fail it.

        Given the Task just journaled (by `submit`), it is not read again."""
        ctx = self.ctx
        if isinstance(task_or_id, Task):
            task = task_or_id
        else:
            with ctx.uow(readonly=True) as uow:
                found = uow.tasks.get(task_or_id)
                if found is None:
                    raise errors.not_found("task", task_or_id)
                task = found
        if task.status != TaskStatus.PROCESSING:
            return task
        try:
            op = self.operation(task)
            steps = op.steps()
            places = _places(steps)
            todo = [step for step in steps if step.name not in task.done]
            for n, step in enumerate(todo):
                self.guard(task.id)
                self._crash_point(task.action, step.name, places[step.name], "before")
                log.info("task %s %s: step %s", task.id, task.action, step.name)
                began = metrics.now()
                step.run()
                metrics.task_step(task.action, step.name, metrics.now() - began)
                self._crash_point(task.action, step.name, places[step.name], "after")
                if n < len(todo) - 1:  # the last one is marked done in the finishing commit
                    self._mark_done(task, step.name)
            self._crash_point(task.action, "finish", "finish", "before")
            with ctx.uow() as uow:
                fresh = uow.tasks.load(task.id)
                op.task = fresh
                op.finish(uow)
                for step in todo[-1:]:  # after finish's reads: the task is one UPDATE
                    fresh.step_done(step.name)
                fresh.finish()
                self._release_locks(uow, fresh)
                self.ended(uow, fresh)
                uow.commit()
            log.info("task %s %s finished", task.id, task.action)
            metrics.task_ended(task.action, "Finished")
        except Exception as exc:  # every failure ends the task; nothing is left half done
            return self.fail(task.id, exc)
        for follow_up in op.follow_ups:  # journaled by finish; recovery drives them if lost
            self.submit(follow_up)
        return fresh

    def fail(self, task_id: str, exc: BaseException) -> Task:
        code, message = ("InternalError", f"{type(exc).__name__}: {exc}")
        if isinstance(exc, EcsError):
            code, message = exc.code, exc.message
        log.warning("task %s failed: %s: %s", task_id, code, message)
        with self.ctx.uow(readonly=True) as uow:
            task = uow.tasks.load(task_id)
        op = self.operation(task)
        self.guard(task_id)
        try:
            op.compensate(exc)
        except Exception:
            log.exception("task %s: compensation failed; recovery will retry it", task_id)
            raise
        with self.ctx.uow() as uow:
            fresh = uow.tasks.load(task_id)
            op.task = fresh
            op.failed(uow)
            fresh.fail(code, message)
            self._release_locks(uow, fresh)
            self.ended(uow, fresh)
            uow.commit()
        metrics.task_ended(fresh.action, "Failed")
        return fresh

    def ended(self, uow: UnitOfWork, task: Task) -> None:
        """In the transaction that ends a task: a cluster agent tells the API processes
        waiting for it (service/cluster.py); nothing to do otherwise."""

    def guard(self, task_id: str) -> None:
        """Before a step or a compensation: a cluster agent raises Fenced here when the
        task is no longer its own (service/cluster.py); nothing to check otherwise."""

    def _mark_done(self, task: Task, step: str) -> None:
        with self.ctx.uow() as uow:
            uow.tasks.load(task.id).step_done(step)
            uow.commit()
        task.step_done(step)

    @staticmethod
    def _release_locks(uow: UnitOfWork, task: Task) -> None:
        for kind, obj_ids in _by_kind(task.plan.get("locks", [])).items():
            uow.unlock(kind, obj_ids, task.id)

    def _crash_point(self, action: str, step: str, place: str, when: str) -> None:
        wanted = self.ctx.settings.crash_at
        if wanted and wanted in (f"{action}:{step}:{when}", f"{action}:{place}:{when}"):
            hang = self.ctx.settings.crash_signal.upper() == "STOP"  # a hung host, then on
            log.warning("fault injection: %s at %s", "SIGSTOP" if hang else "SIGKILL", wanted)
            os.kill(os.getpid(), signal.SIGSTOP if hang else signal.SIGKILL)

    # -- scheduling
    def submit(self, task: Task, *, wait_up_to: float = 0.0) -> None:
        """Run a task just journaled (and committed); with `wait_up_to`, return once it has
        ended or after that many seconds, whichever comes first (a short task is then done
        when the API answers, so its caller sees the result at once; a long one goes on in
        the background)."""
        if self._pool is None:
            self.drive(task)
            return
        task_id = task.id
        future = self._pool.submit(self.drive, task)
        with self._lock:
            self._futures[task_id] = future
        future.add_done_callback(lambda _: self._forget(task_id))
        if wait_up_to > 0:
            futures.wait([future], timeout=wait_up_to)  # its outcome is the task's to tell

    def _forget(self, task_id: str) -> None:
        with self._lock:
            self._futures.pop(task_id, None)

    def spawn(self, job: Callable[[], None]) -> None:
        """Run a guest command (not a journaled task) in the background, in the command pool."""
        if self._commands is None:
            job()
        else:
            self._commands.submit(job)

    def wait(self, task_id: str, timeout: float | None = None) -> Task:
        with self._lock:
            future = self._futures.get(task_id)
        if future is not None:
            future.result(timeout)
        with self.ctx.uow() as uow:
            task = uow.tasks.get(task_id)
            if task is None:
                raise errors.not_found("task", task_id)
            return task

    def shutdown(self) -> None:
        for pool in (self._pool, self._commands):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=False)


__all__ = ["SHORT_TASK_S", "Fenced", "Lock", "TaskRunner"]
