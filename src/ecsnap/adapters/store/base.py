"""The metadata-store contract: a unit of work holding one repository per entity.

A unit of work is one database transaction: `with uow_factory() as uow: ...; uow.commit()`.
Leaving the block without commit rolls back. Locks are rows' `lock_task_id` columns, taken
with an atomic conditional update, so two operations cannot both hold one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, Self, TypeVar

T = TypeVar("T")


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


class Repository(Protocol[T]):
    def add(self, obj: T) -> None: ...

    def get(self, obj_id: str) -> T | None: ...

    def delete(self, obj: T) -> None: ...

    def find(self, criteria: Criteria | None = None, **equals: Any) -> list[T]: ...

    def count(self, criteria: Criteria | None = None, **equals: Any) -> int: ...


class UnitOfWork(Protocol):
    @property
    def accounts(self) -> Repository[Any]: ...

    @property
    def access_keys(self) -> Repository[Any]: ...

    @property
    def regions(self) -> Repository[Any]: ...

    @property
    def zones(self) -> Repository[Any]: ...

    @property
    def images(self) -> Repository[Any]: ...

    @property
    def instances(self) -> Repository[Any]: ...

    @property
    def disks(self) -> Repository[Any]: ...

    @property
    def snapshots(self) -> Repository[Any]: ...

    @property
    def snapshot_groups(self) -> Repository[Any]: ...

    @property
    def tasks(self) -> Repository[Any]: ...

    @property
    def idempotency(self) -> Repository[Any]: ...

    @property
    def invocations(self) -> Repository[Any]: ...


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
