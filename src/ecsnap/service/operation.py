"""What a journaled operation is: a typed plan, its locks, its steps, and how it ends.

Every multi-step user action (a snapshot, a rollback, a start, ...) is one `Operation`
subclass, in the shape of Ganeti's logical units:

1. `check(uow, ...)` (a classmethod, its parameters the action's own) loads what the
   action needs, applies the domain rules and returns a `Plan`, changing nothing.
2. The runner journals it (`TaskRunner.journal`): in the caller's transaction it writes
   the `Task` row (the plan, the step names), takes the locks the operation declares
   (`locks`), and lets the operation record what the user sees at once (`accept`: rows in
   `progressing`, an instance `Starting`). The caller commits; one transaction, so either
   all of it is there or none.
3. The runner runs `steps()` in order, each one idempotent and recorded in `Task.done`
   once it has run, then `finish` in the transaction that marks the task Finished.
4. On an error: `compensate` undoes what the done steps did (idempotent too), then
   `failed` does the bookkeeping in the transaction that marks the task Failed.
5. After a crash, recovery asks `resume()` whether to drive the task forward or undo it,
   after `before_resume()` has put back what a crash may have left (a frozen guest).

Plans are frozen dataclasses journaled as JSON with a version number (`Plan.VERSION`).
A later release that changes a plan bumps its VERSION and teaches `upgrade` to read the
older form, so a task journaled by one release is recovered by the next.

No generic code knows an operation's step names: each operation lists its steps and
answers for them.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar, Generic, Self, TypeVar, get_type_hints

from ecsnap.adapters.store.base import UnitOfWork
from ecsnap.domain.model import HostState, InstanceStatus, Task
from ecsnap.service.context import ServiceContext

Lock = tuple[str, str]  # ("instance", "i-...") or ("disk", "d-...")
Pair = tuple[str, str]  # (disk ID, snapshot ID)


class Resume(Enum):
    """What recovery does with a task that a crash cut short."""

    FORWARD = "forward"  # run the remaining steps (the interrupted one again), then finish
    UNDO = "undo"  # compensate, then mark it Failed


@dataclass(frozen=True)
class Plan:
    """What a task will do, decided when it was accepted. Subclasses are frozen
    dataclasses of str, int, bool, None and tuples of those (journaled as JSON lists)."""

    VERSION: ClassVar[int] = 1

    def to_journal(self) -> dict[str, Any]:
        return {"version": self.VERSION, **_plain(dataclasses.asdict(self))}

    @classmethod
    def from_journal(cls, data: dict[str, Any], resource_id: str = "") -> Self:
        version = int(data.get("version", 0))
        if version > cls.VERSION:
            raise ValueError(f"{cls.__name__}: journal version {version} is newer than this "
                             f"release's {cls.VERSION}")
        if version < cls.VERSION:
            data = cls.upgrade(dict(data), version, resource_id)
        hints = get_type_hints(cls)
        values = {f.name: _typed(data[f.name], hints[f.name]) for f in dataclasses.fields(cls)
                  if f.name in data}
        return cls(**values)

    @classmethod
    def upgrade(cls, data: dict[str, Any], version: int, resource_id: str) -> dict[str, Any]:
        """The journal of an older release in this release's form (fields by name). Version
        0 is release 0.1's unversioned plan: it kept the step names in `steps`."""
        return data


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def _typed(value: Any, hint: Any) -> Any:
    """JSON lists back into the plan's tuples."""
    if isinstance(value, list):
        args = getattr(hint, "__args__", ())
        if isinstance(hint, types.UnionType):
            hint = next((a for a in args if a is not type(None)), hint)
            args = getattr(hint, "__args__", ())
        inner = args[0] if args else Any
        return tuple(_typed(v, inner) for v in value)
    return value


P = TypeVar("P", bound=Plan)


@dataclass(frozen=True)
class Step:
    """One idempotent step: `name` is what the journal records once it has run."""

    name: str
    run: Callable[[], None]


class Operation(Generic[P]):
    """One kind of journaled task (see the module docstring for the contract).

    Subclasses set `action` (the Task's action, as DescribeTasks shows it) and `plan_type`,
    write a `check` classmethod, and override the hooks they need."""

    action: ClassVar[str]
    plan_type: ClassVar[type[Plan]]

    def __init__(self, ctx: ServiceContext, task: Task, plan: P) -> None:
        self.ctx, self.task, self.plan = ctx, task, plan
        # tasks `finish` journaled in its transaction (a follow-up in the background, such
        # as collecting storage volumes): the runner submits them once that is committed
        self.follow_ups: list[Task] = []

    @classmethod
    def locks(cls, plan: P) -> Sequence[Lock]:
        """What the operation holds from acceptance to its end."""
        raise NotImplementedError

    @classmethod
    def runs_on(cls, plan: P, uow: UnitOfWork) -> str | None:
        """Cluster mode: the host whose agent must run the steps, None for any agent. By
        default the host of the plan's instance (its VM is there), if that is a registered
        host (not the single-host server's implicit one); an operation whose steps touch
        storage only may answer None."""
        instance_id = getattr(plan, "instance_id", None)
        if not instance_id:
            return None
        inst = uow.instances.get(instance_id)
        host_id = inst.host_id if inst is not None else None
        host = uow.hosts.get(host_id) if host_id else None
        if inst is None or host is None:
            return None
        if host.state != HostState.UP and inst.status == InstanceStatus.STOPPED:
            # its host was fenced (its VM is gone): disks on shared storage are reached
            # from any agent; local files only from their host, whenever it is back
            region = uow.regions.get(inst.region_id)
            if region is not None and region.shared_storage:
                return None
        return host.id

    def accept(self, uow: UnitOfWork) -> None:
        """What users see at once, in the journal's transaction (rows, statuses)."""

    def steps(self) -> list[Step]:
        raise NotImplementedError

    def finish(self, uow: UnitOfWork) -> None:
        """Bookkeeping in the transaction that marks the task Finished."""

    def compensate(self, error: BaseException) -> None:
        """Undo what the done steps did (idempotent); before the task is marked Failed."""

    def failed(self, uow: UnitOfWork) -> None:
        """Bookkeeping in the transaction that marks the task Failed."""

    def before_resume(self) -> None:
        """After a crash, before `resume`: put back what the crash may have left."""

    def resume(self) -> Resume:
        """After a crash: drive the task forward or undo it."""
        return Resume.FORWARD

    # helpers for subclasses
    def done(self, step: str) -> bool:
        return step in self.task.done

    def note(self, **values: Any) -> None:
        """Record an outcome in the task's result now (a step's figures, a start error)."""
        with self.ctx.uow() as uow:
            uow.tasks.load(self.task.id).note(**values)
            uow.commit()
        self.task.note(**values)
