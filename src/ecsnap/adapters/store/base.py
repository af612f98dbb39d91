"""The metadata-store contract: a unit of work holding one repository per entity.

A unit of work is one database transaction: `with uow_factory() as uow: ...; uow.commit()`.
Leaving the block without commit rolls back. Locks are rows' `lock_task_id` columns, taken
with an atomic conditional update, so two operations cannot both hold one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, Self, TypeVar

if TYPE_CHECKING:
    from ecsnap.domain.model import (
        AccessKey,
        Account,
        AutoSnapshotPolicy,
        Disk,
        Host,
        IdempotencyKey,
        IdempotencyRecord,
        Image,
        Instance,
        Invocation,
        PolicyRun,
        Region,
        Snapshot,
        SnapshotGroup,
        Task,
        Zone,
    )

T = TypeVar("T")
K = TypeVar("K", contravariant=True)


class MissingRow(LookupError):
    """`Repository.load` found no row: a journal or a caller named an ID the store lacks.

    Not an ECS error (a user's unknown ID is checked before, with its NotFound code): it
    means the store and the journal disagree, a bug or a hand-edited database."""


@dataclass
class Criteria:
    """What a listing asks for: exact matches, IN lists, a `*` wildcard, a creation window,
    tags, an order and a page. Pure data; the store turns it into SQL."""

    equals: dict[str, Any] = field(default_factory=dict)
    within: dict[str, Sequence[Any]] = field(default_factory=dict)
    without: dict[str, Sequence[Any]] = field(default_factory=dict)  # NOT IN (a NULL: neither)
    wildcard: dict[str, str] = field(default_factory=dict)
    created_from: datetime | None = None
    created_to: datetime | None = None
    tags: dict[str, str] = field(default_factory=dict)
    newest_first: bool = True
    offset: int = 0
    limit: int | None = None
    after: tuple[datetime, str] | None = None  # keyset page: (created, id) of the last row seen


class KeyedRepository(Protocol[T, K]):
    def add(self, obj: T) -> None: ...

    def get(self, obj_id: K) -> T | None: ...

    def load(self, obj_id: K) -> T:
        """Like `get`, for a row that must exist: MissingRow if it does not."""
        ...

    def delete(self, obj: T) -> None: ...


# A row of Repository.rows: a named tuple whose fields are the columns asked for (all of
# them: every field of the domain object, read as `row.name`); what listings show.
Row = Any


class Repository(Protocol[T]):
    def add(self, obj: T) -> None: ...

    def get(self, obj_id: str) -> T | None: ...

    def load(self, obj_id: str) -> T:
        """Like `get`, for a row that must exist: MissingRow if it does not."""
        ...

    def delete(self, obj: T) -> None: ...

    def find(self, criteria: Criteria | None = None, **equals: Any) -> list[T]: ...

    def rows(self, columns: Sequence[str] | None = None, criteria: Criteria | None = None,
             **equals: Any) -> list[Any]:
        """Only `columns` (None: every column) of the rows `find` would give, as read-only
        named tuples: what a listing shows, cheaper than whole objects."""
        ...

    def count(self, criteria: Criteria | None = None, **equals: Any) -> int: ...


class UnitOfWork(Protocol):
    @property
    def accounts(self) -> Repository[Account]: ...

    @property
    def access_keys(self) -> Repository[AccessKey]: ...

    @property
    def regions(self) -> Repository[Region]: ...

    @property
    def zones(self) -> Repository[Zone]: ...

    @property
    def images(self) -> Repository[Image]: ...

    @property
    def instances(self) -> Repository[Instance]: ...

    @property
    def disks(self) -> Repository[Disk]: ...

    @property
    def snapshots(self) -> Repository[Snapshot]: ...

    @property
    def snapshot_groups(self) -> Repository[SnapshotGroup]: ...

    @property
    def tasks(self) -> Repository[Task]: ...

    @property
    def idempotency(self) -> KeyedRepository[IdempotencyRecord, IdempotencyKey]: ...

    @property
    def invocations(self) -> Repository[Invocation]: ...

    @property
    def auto_snapshot_policies(self) -> Repository[AutoSnapshotPolicy]: ...

    @property
    def policy_runs(self) -> Repository[PolicyRun]: ...

    @property
    def hosts(self) -> Repository[Host]: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...

    def commit(self) -> None: ...

    def rollback(self) -> None: ...

    def try_lock(self, kind: str, obj_ids: Sequence[str], task_id: str) -> str | None:
        """Set `lock_task_id` of these instances or disks to `task_id` where it is free
        (atomic). `kind` is "instance" or "disk". None if this task holds them all now,
        else the ID of one it does not hold (held by another task, or unknown)."""
        ...

    def unlock(self, kind: str, obj_ids: Sequence[str], task_id: str) -> None:
        """Clear the locks that `task_id` holds among these."""
        ...

    def spend_nonce(self, key_id: str, nonce: str, expires: datetime, now: datetime) -> bool:
        """Store a signature nonce of AccessKey `key_id` until `expires`, if that key and
        its account exist and are enabled; False if it was not stored (the nonce was seen
        and has not expired, or the key is not usable). One statement, committed by
        itself: the one write a read-only unit of work makes (an API request's first)."""
        ...

    def snapshot_users(self, account_id: str, image_statuses: Sequence[str],
                       snapshot_ids: Sequence[str] | None) -> tuple[set[str], set[str]]:
        """(the snapshots that back one of the account's images in `image_statuses`, the
        snapshots that created one of its disks not released), among `snapshot_ids` (None:
        all the account's): one statement."""
        ...

    def advance_policy_run(self, policy_id: str, disk_id: str, due: datetime,
                           snapshot_id: str = "") -> bool:
        """Claim the time point `due` of a policy for a disk: one statement that inserts the
        pair's `PolicyRun` or moves its `last_due` forward to `due`, only where it is
        earlier (`INSERT ... ON CONFLICT DO UPDATE ... WHERE last_due < due`). True for
        the one transaction whose statement wrote the row; a concurrent one waits for it
        and answers False once it commits (PostgreSQL READ COMMITTED included). Objects
        this unit of work holds are told the new values."""
        ...

    # -- the cluster (service/cluster.py): the agents' queue, leases and epoch fencing
    def clock(self) -> datetime:
        """The database server's clock, naive UTC with microseconds: the one clock every
        host's heartbeats and leases are written and compared with (no skew between
        hosts)."""
        ...

    def claim_tasks(self, host_id: str, epoch: int, now: datetime, lease_until: datetime,
                    limit: int) -> list[tuple[str, bool]]:
        """Take up to `limit` Processing tasks routed to `host_id` or to any host that are
        unowned, or whose owner is no longer Up at the epoch it claimed them under, or
        whose lease ended before `now`: set their owner, owner_epoch and lease (rows
        another transaction is claiming are skipped: FOR UPDATE SKIP LOCKED). Their IDs,
        each with True when an agent had claimed it before (it was cut short: resume it
        as recovery does)."""
        ...

    def claim_invocations(self, host_id: str, epoch: int, now: datetime,
                          limit: int) -> list[str]:
        """Take up to `limit` Running Cloud Assistant invocations routed to `host_id` and
        never claimed: set their owner, owner_epoch and start time (FOR UPDATE SKIP
        LOCKED). An invocation once claimed is never claimed again (a command may have
        had effects: it is reported interrupted instead, service/commands.py). Their IDs."""
        ...

    def renew_leases(self, host_id: str, epoch: int, task_ids: Sequence[str],
                     lease_until: datetime) -> list[str]:
        """Extend the leases `host_id` under `epoch` still holds; the IDs it still holds."""
        ...

    def hold_epoch(self, host_id: str, epoch: int, task_id: str | None = None) -> bool:
        """Whether the host's row is Up with this epoch (and, given `task_id`, the task is
        still owned by this host under it), keeping it so until the end of the transaction
        (SELECT ... FOR SHARE / FOR UPDATE): a fence waits for this commit, or is seen."""
        ...

    def heartbeat(self, host_id: str, epoch: int, now: datetime) -> bool:
        """`UPDATE hosts SET heartbeat_at=now WHERE id=H AND epoch=E AND state=Up`:
        False when the host was fenced (or rejoined under another epoch)."""
        ...

    def fence_host(self, host_id: str, epoch: int, stale_before: datetime) -> bool:
        """Fence the host if it is still Up at `epoch` with a heartbeat older than
        `stale_before`: epoch+1, Fenced (its tasks are then claimable: their owner is not
        Up at the epoch that claimed them). True for the one caller whose conditional
        UPDATE won. Only the host row is written (no deadlock with an agent's commit)."""
        ...

    def notify(self, channel: str, payload: str = "") -> None:
        """Wake the processes listening on `channel` when this transaction commits
        (PostgreSQL NOTIFY with `payload`; nothing elsewhere)."""
        ...

    def lock_hosts(self) -> list[Host]:
        """The Up hosts in ID order, locked until the end of the transaction (FOR UPDATE):
        two placements on one host are serialised (service/placement.py)."""
        ...


UnitOfWorkFactory = Callable[..., UnitOfWork]  # factory(readonly=True): a read-only one
