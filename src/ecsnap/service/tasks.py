"""Tasks and their journal: every multi-step operation is a `Task` row.

The row is written, with the locks the operation takes, in the same transaction that
checks the rules. Its `plan` lists the steps; each step is idempotent and is recorded in
`done` once it has run (the last one in the transaction that finishes the task, so a crash
between the two counts as a crash inside that step). A crash (even kill -9) at any point
leaves a Processing task; at the next start `recovery.recover()` either drives it forward
(re-running the step that was interrupted) or undoes it, as its handler decides.

Fault injection for crash tests: with ECSNAP_CRASH_AT=`Action:step:before` (or `:after`)
the process kills itself with SIGKILL at that point. Nothing else uses it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ClassVar

from ecsnap.adapters.store.base import UnitOfWork
from ecsnap.domain import errors, ids
from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import Task, TaskStatus, utcnow
from ecsnap.service.context import ServiceContext

log = logging.getLogger("ecsnap.tasks")

# Snapshot, delete and rollback tasks usually take well under a second: the service waits
# this long for them before answering (see TaskRunner.submit).
SHORT_TASK_S = 2.0


class TaskHandler:
    """How one kind of task runs its steps, finishes, fails and recovers."""

    action: ClassVar[str] = ""

    def run_step(self, ctx: ServiceContext, task: Task, step: str) -> None:
        name, _, arg = step.partition(":")
        getattr(self, f"step_{name}")(ctx, task, arg)

    def finish(self, ctx: ServiceContext, uow: UnitOfWork, task: Task) -> None:
        """Final bookkeeping, in the transaction that marks the task Finished."""

    def compensate(self, ctx: ServiceContext, task: Task, error: BaseException) -> None:
        """Undo what the done steps did (idempotent); called before the task is marked Failed."""

    def failed(self, ctx: ServiceContext, uow: UnitOfWork, task: Task) -> None:
        """Bookkeeping in the transaction that marks the task Failed."""

    def recover_forward(self, ctx: ServiceContext, task: Task) -> bool:
        """After a crash: True to drive the task forward, False to undo it."""
        return True


HANDLERS: dict[str, TaskHandler] = {}


def handler(cls: type[TaskHandler]) -> type[TaskHandler]:
    HANDLERS[cls.action] = cls()
    return cls


def handler_for(action: str) -> TaskHandler:
    """The handler of a journaled action (its module registers it when imported)."""
    if action not in HANDLERS:
        from ecsnap.service import disks, instances, rollback, snapshots  # noqa: F401

    return HANDLERS[action]


def crash_point(ctx: ServiceContext, name: str) -> None:
    if ctx.settings.crash_at and ctx.settings.crash_at == name:
        log.warning("fault injection: SIGKILL at %s", name)
        os.kill(os.getpid(), signal.SIGKILL)


def new_task(uow: UnitOfWork, *, account_id: str, region_id: str, action: str,
             resource_id: str, steps: list[str], locks: list[tuple[str, str]],
             **plan: Any) -> Task:
    """Journal a task and take its locks, in the caller's transaction (not committed here).

    Raises Operation.Conflict if any lock is held by another task."""
    task = Task(id=ids.new_id("task"), account_id=account_id, region_id=region_id,
                action=action, resource_id=resource_id,
                plan={"steps": steps, "locks": [list(lock) for lock in locks], **plan})
    uow.tasks.add(task)
    for kind, obj_ids in _by_kind(locks).items():
        refused = uow.try_lock(kind, obj_ids, task.id)
        if refused is not None:
            holder = getattr(uow.instances.get(refused) if kind == "instance"
                             else uow.disks.get(refused), "lock_task_id", None)
            raise errors.operation_conflict(refused, holder)
    return task


def _by_kind(locks: Iterable[Sequence[str]]) -> dict[str, list[str]]:
    """The locks of a plan, ("instance", ID) and ("disk", ID) pairs, by kind."""
    kinds: dict[str, list[str]] = {}
    for kind, obj_id in locks:
        kinds.setdefault(kind, []).append(obj_id)
    return kinds


def _release_locks(uow: UnitOfWork, task: Task) -> None:
    for kind, obj_ids in _by_kind(task.plan.get("locks", [])).items():
        uow.unlock(kind, obj_ids, task.id)


def _mark_done(ctx: ServiceContext, task_id: str, step: str) -> Task:
    with ctx.uow() as uow:
        task = uow.tasks.get(task_id)
        assert task is not None
        if step not in task.done:
            task.done.append(step)
        uow.commit()
        return task


def drive(ctx: ServiceContext, task_id: str) -> Task:
    """Run the remaining steps of a task, then finish it; on error compensate and fail it."""
    with ctx.uow(readonly=True) as uow:
        task = uow.tasks.get(task_id)
        if task is None:
            raise errors.not_found("task", task_id)
    if task.status != TaskStatus.PROCESSING:
        return task
    h = handler_for(task.action)
    try:
        todo = [step for step in task.plan["steps"] if step not in task.done]
        for n, step in enumerate(todo):
            crash_point(ctx, f"{task.action}:{step}:before")
            log.info("task %s %s: step %s", task.id, task.action, step)
            h.run_step(ctx, task, step)
            crash_point(ctx, f"{task.action}:{step}:after")
            if n < len(todo) - 1:  # the last one is marked done in the finishing transaction
                task = _mark_done(ctx, task.id, step)
        crash_point(ctx, f"{task.action}:finish:before")
        with ctx.uow() as uow:
            fresh = uow.tasks.get(task.id)
            assert fresh is not None
            fresh.done = fresh.done + todo[-1:]
            h.finish(ctx, uow, fresh)
            fresh.status = TaskStatus.FINISHED
            fresh.finished = utcnow()
            _release_locks(uow, fresh)
            uow.commit()
            task = fresh
        log.info("task %s %s finished", task.id, task.action)
        return task
    except Exception as exc:  # every failure ends the task; nothing is left half done
        return fail(ctx, task.id, exc)


def fail(ctx: ServiceContext, task_id: str, exc: BaseException) -> Task:
    code, message = ("InternalError", f"{type(exc).__name__}: {exc}")
    if isinstance(exc, EcsError):
        code, message = exc.code, exc.message
    log.warning("task %s failed: %s: %s", task_id, code, message)
    with ctx.uow() as uow:
        task = uow.tasks.get(task_id)
        assert task is not None
    h = handler_for(task.action)
    try:
        h.compensate(ctx, task, exc)
    except Exception:
        log.exception("task %s: compensation failed; recovery will retry it", task_id)
        raise
    with ctx.uow() as uow:
        task = uow.tasks.get(task_id)
        assert task is not None
        h.failed(ctx, uow, task)
        task.status = TaskStatus.FAILED
        task.error_code, task.error_message = code, message
        task.finished = utcnow()
        _release_locks(uow, task)
        uow.commit()
        return task


class TaskRunner:
    """Executes journaled tasks: in background threads (the server) or inline."""

    def __init__(self, ctx: ServiceContext, *, background: bool, workers: int = 4) -> None:
        self.ctx = ctx
        self.background = background
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="task") \
            if background else None
        self._futures: dict[str, Future[Task]] = {}
        self._lock = threading.Lock()

    def submit(self, task_id: str, *, wait_up_to: float = 0.0) -> None:
        """Run the task; with `wait_up_to`, return once it has ended or after that many
        seconds, whichever comes first (a short task is then done when the API answers,
        so its caller sees the result at once; a long one goes on in the background)."""
        if self._pool is None:
            drive(self.ctx, task_id)
            return
        with self._lock:
            future = self._futures[task_id] = self._pool.submit(drive, self.ctx, task_id)
        if wait_up_to > 0:
            futures.wait([future], timeout=wait_up_to)  # its outcome is the task's to tell

    def spawn(self, job: Callable[[], None]) -> None:
        """Run a job that is not a journaled task (a guest command) in the background."""
        if self._pool is None:
            job()
        else:
            self._pool.submit(job)

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
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=False)
