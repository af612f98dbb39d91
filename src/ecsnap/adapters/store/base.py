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
        Disk,
        IdempotencyKey,
        IdempotencyRecord,
        Image,
        Instance,
        Invocation,
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


class Repository(Protocol[T]):
    def add(self, obj: T) -> None: ...

    def get(self, obj_id: str) -> T | None: ...

    def load(self, obj_id: str) -> T:
        """Like `get`, for a row that must exist: MissingRow if it does not."""
        ...

    def delete(self, obj: T) -> None: ...

    def find(self, criteria: Criteria | None = None, **equals: Any) -> list[T]: ...

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

    def remember_nonce(self, key_id: str, nonce: str, expires: datetime, now: datetime) -> bool:
        """Store a signature nonce; False if it was seen and has not expired."""
        ...


UnitOfWorkFactory = Callable[..., UnitOfWork]  # factory(readonly=True): a read-only one
