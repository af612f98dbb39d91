"""An in-memory metadata store with the SQL store's semantics (adapters/store/sql.py).

`InMemoryStore().unit_of_work` is a `UnitOfWorkFactory`: `uow(readonly=False)`.

What it keeps of the SQL store, so that code tested on it behaves the same on SQLite:

- Transactions. A writing unit of work takes the store's one writer lock at its first
  statement (SQLite's `BEGIN IMMEDIATE`) and gives it back at commit, rollback or the end
  of its block; its changes are seen by other units of work only once committed, and
  leaving the block without commit discards them. A second writing unit of work opened in
  the same thread while the first holds the lock raises `WriterBusy` at once (on SQLite it
  would wait `busy_timeout` and fail with "database is locked").
- Detached objects. Objects are copies of the committed rows: changing one changes the
  store only when its writing unit of work commits (read-only units of work never write).
  A writing unit of work has an identity map (two gets of one ID return one object) and
  tracks changes per field, like the ORM's flush: a commit writes the fields that changed
  since the object was loaded (or last flushed), so a stale object left in a unit of work
  does not overwrite what others committed meanwhile.
- Autoflush. `find` and `count` in a writing unit of work see its own pending changes.
- Listings. `Criteria` are applied as `SqlRepository._query` applies them: equals (None is
  IS NULL), IN lists, `*` wildcards (with `%`, `_` and `\\` literal), an inclusive creation
  window, keyset pages on (created, id), order by created then id, offset and limit, and
  tags filtered after the SQL (at most 10,000 rows looked at, 1,000 kept) then paged.
  Counts ignore order and page, except that a tag-filtered count is the length of the
  unpaged listing. Tables without `created` (regions, zones) come in key order. Unknown
  column names raise KeyError, as the SQL store's `table.c[name]` does.
- Locks are rows' `lock_task_id`, set by `try_lock` in the transaction (not through the
  objects, which are told the new value without becoming dirty), as the SQL store's
  conditional UPDATE does.
- Read-only units of work read one committed state (taken at their first read, as a WAL
  read transaction does), hand out fresh copies on every read (no identity map), and
  raise `sql.ReadOnlyError` on any write, lock or nonce.
- Enum columns: a plain string stored in an enum field comes back as the enum (and an
  invalid one is refused at flush), as the SQL store's Enum columns do.

One deliberate difference: wildcards are case-sensitive, as on PostgreSQL (SQLite's LIKE
ignores the case of ASCII letters).
"""

from __future__ import annotations

import copy
import dataclasses
import re
import threading
import typing
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any, Generic, Self, TypeVar, cast

from ecsnap.adapters.store.base import Criteria, MissingRow
from ecsnap.adapters.store.sql import TAG_FILTER_CAP, ReadOnlyError
from ecsnap.domain import model

T = TypeVar("T")
K = TypeVar("K")

Row = Any  # a committed row: a domain object nobody mutates (it is replaced instead)
Key = Hashable


class DuplicateKey(Exception):
    """An insert whose key (or unique column) is taken: the SQL store's IntegrityError."""


class StaleRow(Exception):
    """An update or delete of a row that another unit of work deleted meanwhile: the SQL
    store's StaleDataError."""


class WriterBusy(RuntimeError):
    """The writer lock could not be taken (see the module docstring)."""


@dataclass(frozen=True)
class _Table:
    name: str
    cls: type[Any]
    key: Callable[[Any], Key]
    unique: tuple[str, ...] = ()


def _by_id(obj: Any) -> Key:
    return cast(Key, obj.id)


def _idempotency_key(obj: Any) -> Key:
    # the plain tuple: an IdempotencyKey (a NamedTuple) hashes and compares equal to it
    return (obj.account_id, obj.action, obj.token)


TABLES: dict[str, _Table] = {t.name: t for t in (
    _Table("accounts", model.Account, _by_id, unique=("name",)),
    _Table("access_keys", model.AccessKey, _by_id),
    _Table("regions", model.Region, _by_id),
    _Table("zones", model.Zone, _by_id),
    _Table("images", model.Image, _by_id),
    _Table("instances", model.Instance, _by_id),
    _Table("disks", model.Disk, _by_id),
    _Table("snapshots", model.Snapshot, _by_id),
    _Table("snapshot_groups", model.SnapshotGroup, _by_id),
    _Table("tasks", model.Task, _by_id),
    _Table("idempotency", model.IdempotencyRecord, _idempotency_key),
    _Table("invocations", model.Invocation, _by_id),
    _Table("auto_snapshot_policies", model.AutoSnapshotPolicy, _by_id),
    _Table("policy_runs", model.PolicyRun, _by_id),
    _Table("hosts", model.Host, _by_id),
)}
_LOCKABLE = {"instance": "instances", "disk": "disks"}

# ------------------------------------------------------------------ rows and copies

_FIELDS: dict[type[Any], tuple[str, ...]] = {}
_ENUMS: dict[type[Any], dict[str, type[Enum]]] = {}


def _fields(cls: type[Any]) -> tuple[str, ...]:
    if cls not in _FIELDS:
        _FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls))
        hints = typing.get_type_hints(cls)
        enums: dict[str, type[Enum]] = {}
        for name in _FIELDS[cls]:
            for candidate in (hints[name], *typing.get_args(hints[name])):
                if isinstance(candidate, type) and issubclass(candidate, Enum):
                    enums[name] = candidate
        _ENUMS[cls] = enums
    return _FIELDS[cls]


def _copy_value(value: Any) -> Any:
    return copy.deepcopy(value) if isinstance(value, dict | list) else value


def _values(obj: Any) -> dict[str, Any]:
    """The field values of an object, mutable ones copied (a baseline to compare with)."""
    return {name: _copy_value(getattr(obj, name)) for name in _fields(type(obj))}


def _clone(obj: T) -> T:
    """A new object of the same class with copies of the values (handed out)."""
    return type(obj)(**_values(obj))


def _row(obj: Any, changes: dict[str, Any] | None = None) -> Row:
    """A committed row: a copy of `obj` (with `changes`), enum columns as enums."""
    cls = type(obj)
    values = _values(obj)
    if changes:
        values.update((k, _copy_value(v)) for k, v in changes.items())
    for name, enum in _ENUMS[cls].items():
        value = values[name]
        if value is not None and not isinstance(value, enum):
            try:
                values[name] = enum(value)
            except ValueError as exc:  # the SQL store's Enum(validate_strings=True)
                raise ValueError(f"{cls.__name__}.{name}: {value!r} is not a "
                                 f"{enum.__name__}") from exc
    return cls(**values)


# ------------------------------------------------------------------ listings


def _like(pattern: str) -> re.Pattern[str]:
    """`*` matches anything; every other character (% and _ included) is literal."""
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")), re.DOTALL)


def _has_tags(obj: Any, wanted: dict[str, str]) -> bool:
    tags = getattr(obj, "tags", {}) or {}
    return all(k in tags and (v == "" or tags[k] == v) for k, v in wanted.items())


def _filtered(table: _Table, rows: Iterable[Any], criteria: Criteria,
              equals: dict[str, Any]) -> list[Any]:
    """The WHERE clause of SqlRepository._build, except `after` (listings only)."""
    merged = {**criteria.equals, **equals}
    known = set(_fields(table.cls))
    for name in (*merged, *criteria.within, *criteria.without, *criteria.wildcard):
        if name not in known:
            raise KeyError(name)
    patterns = {name: _like(p) for name, p in criteria.wildcard.items()}
    within = {name: list(values) for name, values in criteria.within.items()}
    out = []
    for obj in rows:
        ok = True
        for name, value in merged.items():
            have = getattr(obj, name)
            if not (have is None if value is None else have is not None and have == value):
                ok = False
                break
        if ok:
            for name, values in within.items():
                have = getattr(obj, name)
                if have is None or have not in values:
                    ok = False
                    break
        if ok:
            for name, excluded in criteria.without.items():
                have = getattr(obj, name)  # NULL is in no list, nor out of it (SQL)
                if have is None or have in excluded:
                    ok = False
                    break
        if ok:
            for name, regex in patterns.items():
                have = getattr(obj, name)
                if have is None or not regex.fullmatch(str(have)):
                    ok = False
                    break
        if ok and criteria.created_from is not None:
            ok = obj.created is not None and obj.created >= criteria.created_from
        if ok and criteria.created_to is not None:
            ok = obj.created is not None and obj.created <= criteria.created_to
        if ok:
            out.append(obj)
    return out


def _listing(table: _Table, rows: Iterable[Any], criteria: Criteria,
             equals: dict[str, Any]) -> list[Any]:
    found = _filtered(table, rows, criteria, equals)
    if "created" in _fields(table.cls):
        if criteria.after is not None:
            created, last_id = criteria.after
            if criteria.newest_first:
                found = [o for o in found if o.created < created
                         or (o.created == created and o.id < last_id)]
            else:
                found = [o for o in found if o.created > created
                         or (o.created == created and o.id > last_id)]
        found.sort(key=lambda o: (o.created, o.id), reverse=criteria.newest_first)
    else:
        found.sort(key=lambda o: cast(Any, table.key(o)))
    if criteria.tags:
        found = found[:TAG_FILTER_CAP * 10]  # the SQL's LIMIT, before the tags are looked at
        found = [o for o in found if _has_tags(o, criteria.tags)][:TAG_FILTER_CAP]
        end = None if criteria.limit is None else criteria.offset + criteria.limit
        return found[criteria.offset:end]
    if criteria.offset:
        found = found[criteria.offset:]
    if criteria.limit is not None:
        found = found[:criteria.limit]
    return found


def _count(table: _Table, rows: Iterable[Any], criteria: Criteria,
           equals: dict[str, Any]) -> int:
    if criteria.tags:
        unpaged = dataclasses.replace(criteria, offset=0, limit=None, after=None)
        return len(_listing(table, rows, unpaged, equals))
    return len(_filtered(table, rows, criteria, equals))


# ------------------------------------------------------------------ the store


class InMemoryStore:
    """The committed state, shared by the units of work of one test."""

    def __init__(self, *, writer_timeout: float = 30.0) -> None:
        # never mutated in place: a commit publishes new table dicts (copy on write), so a
        # reader keeps the state it started with
        self._state: dict[str, dict[Key, Row]] = {name: {} for name in TABLES}
        self._nonces: dict[tuple[str, str], datetime] = {}
        self._writer = threading.Lock()
        self._writer_uow: InMemoryUnitOfWork | None = None
        self._writer_thread: int | None = None
        self.writer_timeout = writer_timeout
        self.commits = 0

    def unit_of_work(self, readonly: bool = False) -> InMemoryUnitOfWork:
        """The UnitOfWorkFactory: `uow()` writes, `uow(readonly=True)` only reads."""
        return InMemoryUnitOfWork(self, readonly)

    def dump(self) -> dict[str, dict[Key, dict[str, Any]]]:
        """Every committed row as plain values (compare two dumps: did anything change?)."""
        state = self._state
        return {name: {key: _values(row) for key, row in rows.items()}
                for name, rows in state.items()}

    def rows(self, table: str) -> list[Any]:
        """Copies of a table's committed rows, in key order."""
        rows = self._state[table]
        return [_clone(rows[key]) for key in sorted(rows, key=lambda k: cast(Any, k))]

    def _acquire(self, uow: InMemoryUnitOfWork) -> None:
        me = threading.get_ident()
        if self._writer_thread == me and self._writer_uow is not uow:
            raise WriterBusy("a second writing unit of work in this thread while the first "
                             "holds the write lock: on SQLite it would wait for it forever "
                             "(database is locked)")
        if not self._writer.acquire(timeout=self.writer_timeout):
            raise WriterBusy(f"the write lock was held for over {self.writer_timeout} s")
        self._writer_uow, self._writer_thread = uow, me

    def _release(self) -> None:
        self._writer_uow, self._writer_thread = None, None
        self._writer.release()


@dataclass
class _Entry:
    obj: Any
    baseline: dict[str, Any] | None  # None: added in this unit of work, not flushed yet


class InMemoryUnitOfWork:
    def __init__(self, store: InMemoryStore, readonly: bool = False) -> None:
        self.store = store
        self.readonly = readonly
        self._entered = False
        self._tx: dict[str, dict[Key, Row]] | None = None  # the transaction's tables
        self._tx_nonces: dict[tuple[str, str], datetime] | None = None
        self._view: dict[str, dict[Key, Row]] | None = None  # a reader's committed state
        self._imap: dict[str, dict[Key, _Entry]] = {}
        self._deleted: dict[str, dict[Key, Any]] = {}
        self._repos: dict[str, Any] = {}

    # ------------------------------------------------------------ the contract

    def __enter__(self) -> Self:
        self._end()
        self._entered = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._end()

    def commit(self) -> None:
        self._require_entered()
        if self.readonly:
            self._view = None  # ends the read transaction; nothing was written
            return
        self._begin()
        self._flush()
        assert self._tx is not None
        store = self.store
        if self._tx:
            state = dict(store._state)
            state.update(self._tx)
            store._state = state
        if self._tx_nonces is not None:
            store._nonces = self._tx_nonces
        store.commits += 1
        self._tx, self._tx_nonces = None, None
        store._release()

    def rollback(self) -> None:
        self._require_entered()
        if self.readonly:
            self._view = None
            return
        self._discard()
        self._imap.clear()
        self._deleted.clear()

    @property
    def accounts(self) -> MemoryRepository[model.Account]:
        return cast(MemoryRepository[model.Account], self._repo("accounts"))

    @property
    def access_keys(self) -> MemoryRepository[model.AccessKey]:
        return cast(MemoryRepository[model.AccessKey], self._repo("access_keys"))

    @property
    def regions(self) -> MemoryRepository[model.Region]:
        return cast(MemoryRepository[model.Region], self._repo("regions"))

    @property
    def zones(self) -> MemoryRepository[model.Zone]:
        return cast(MemoryRepository[model.Zone], self._repo("zones"))

    @property
    def images(self) -> MemoryRepository[model.Image]:
        return cast(MemoryRepository[model.Image], self._repo("images"))

    @property
    def instances(self) -> MemoryRepository[model.Instance]:
        return cast(MemoryRepository[model.Instance], self._repo("instances"))

    @property
    def disks(self) -> MemoryRepository[model.Disk]:
        return cast(MemoryRepository[model.Disk], self._repo("disks"))

    @property
    def snapshots(self) -> MemoryRepository[model.Snapshot]:
        return cast(MemoryRepository[model.Snapshot], self._repo("snapshots"))

    @property
    def snapshot_groups(self) -> MemoryRepository[model.SnapshotGroup]:
        return cast(MemoryRepository[model.SnapshotGroup], self._repo("snapshot_groups"))

    @property
    def tasks(self) -> MemoryRepository[model.Task]:
        return cast(MemoryRepository[model.Task], self._repo("tasks"))

    @property
    def idempotency(self) -> MemoryKeyedRepository[model.IdempotencyRecord,
                                                   model.IdempotencyKey]:
        return cast(MemoryKeyedRepository[model.IdempotencyRecord, model.IdempotencyKey],
                    self._repo("idempotency"))

    @property
    def invocations(self) -> MemoryRepository[model.Invocation]:
        return cast(MemoryRepository[model.Invocation], self._repo("invocations"))

    @property
    def auto_snapshot_policies(self) -> MemoryRepository[model.AutoSnapshotPolicy]:
        return cast(MemoryRepository[model.AutoSnapshotPolicy],
                    self._repo("auto_snapshot_policies"))

    @property
    def policy_runs(self) -> MemoryRepository[model.PolicyRun]:
        return cast(MemoryRepository[model.PolicyRun], self._repo("policy_runs"))

    @property
    def hosts(self) -> MemoryRepository[model.Host]:
        return cast(MemoryRepository[model.Host], self._repo("hosts"))

    def try_lock(self, kind: str, obj_ids: Sequence[str], task_id: str) -> str | None:
        assert not isinstance(obj_ids, str), "a sequence of IDs"
        self._writable("try_lock")
        table = _LOCKABLE[kind]
        self._begin()
        self._flush()
        rows = self._rows(table, write=True)
        holders: dict[str, str | None] = {}
        for obj_id in dict.fromkeys(obj_ids):
            row = rows.get(obj_id)
            if row is None:
                holders[obj_id] = None
                continue
            if row.lock_task_id is None:
                row = rows[obj_id] = _row(row, {"lock_task_id": task_id})
            holders[obj_id] = row.lock_task_id
        for obj_id, holder in holders.items():
            self._told(table, obj_id, holder)
        return next((obj_id for obj_id, holder in holders.items() if holder != task_id), None)

    def unlock(self, kind: str, obj_ids: Sequence[str], task_id: str) -> None:
        assert not isinstance(obj_ids, str), "a sequence of IDs"
        self._writable("unlock")
        table = _LOCKABLE[kind]
        self._begin()
        self._flush()
        rows = self._rows(table, write=True)
        for obj_id in obj_ids:
            row = rows.get(obj_id)
            if row is not None and row.lock_task_id == task_id:
                rows[obj_id] = _row(row, {"lock_task_id": None})
                entry = self._imap.get(table, {}).get(obj_id)
                if entry is not None and entry.obj.lock_task_id == task_id:
                    self._told(table, obj_id, None)

    def spend_nonce(self, key_id: str, nonce: str, expires: datetime, now: datetime) -> bool:
        """sql.py's one statement: the nonce is stored only while the key and its account
        are enabled; in a read-only unit of work it commits at once (under the write lock,
        as SQLite's takes it), in a writing one with the rest."""
        self._require_entered()
        if self.readonly:
            self.store._acquire(self)
            try:
                nonces = dict(self.store._nonces)
                stored = self._spend(self.store._state, nonces, key_id, nonce, expires, now)
                self.store._nonces = nonces
                return stored
            finally:
                self.store._release()
        self._begin()
        self._flush()
        if self._tx_nonces is None:
            self._tx_nonces = dict(self.store._nonces)
        assert self._tx is not None
        return self._spend({**self.store._state, **self._tx}, self._tx_nonces, key_id, nonce,
                           expires, now)

    @staticmethod
    def _spend(state: dict[str, dict[Key, Row]], nonces: dict[tuple[str, str], datetime],
               key_id: str, nonce: str, expires: datetime, now: datetime) -> bool:
        key = state["access_keys"].get(key_id)
        account = state["accounts"].get(key.account_id) if key is not None else None
        if key is None or account is None or not (key.enabled and account.enabled):
            return False
        seen = nonces.get((key_id, nonce))
        if seen is not None and not seen < now:
            return False
        nonces[(key_id, nonce)] = expires
        return True

    def snapshot_users(self, account_id: str, image_statuses: Sequence[str],
                       snapshot_ids: Sequence[str] | None) -> tuple[set[str], set[str]]:
        """sql.py's one statement, as two finds."""
        wanted = None if snapshot_ids is None else set(snapshot_ids)
        imaged = {i.source_snapshot_id for i in self.images.find(account_id=account_id)
                  if i.status in image_statuses and i.source_snapshot_id}
        disked = {d.source_snapshot_id for d in self.disks.find(account_id=account_id,
                                                                released=False)
                  if d.source_snapshot_id}
        if wanted is not None:
            imaged, disked = imaged & wanted, disked & wanted
        return imaged, disked

    def advance_policy_run(self, policy_id: str, disk_id: str, due: datetime,
                           snapshot_id: str = "") -> bool:
        """sql.py's conditional upsert: under the writer lock, insert the run or move its
        last_due forward only where it is earlier."""
        self._writable("advance_policy_run")
        self._begin()
        self._flush()
        key = model.PolicyRun.key(policy_id, disk_id)
        rows = self._rows("policy_runs", write=True)
        row = rows.get(key)
        if row is not None and not row.last_due < due:
            return False
        if row is None:
            rows[key] = _row(model.PolicyRun(id=key, policy_id=policy_id, disk_id=disk_id,
                                             last_due=due, snapshot_id=snapshot_id))
            return True
        self._set("policy_runs", key, last_due=due, snapshot_id=snapshot_id)
        return True

    # ------------------------------------------------------------ the cluster (sql.py's)

    def _set(self, table: str, obj_id: str, **values: Any) -> None:
        rows = self._rows(table, write=True)
        rows[obj_id] = _row(rows[obj_id], values)
        entry = self._imap.get(table, {}).get(obj_id)
        if entry is not None:  # told, without becoming dirty (as try_lock's objects)
            for name, value in values.items():
                setattr(entry.obj, name, value)
                if entry.baseline is not None:
                    entry.baseline[name] = _copy_value(value)

    def clock(self) -> datetime:
        return datetime.now(UTC).replace(tzinfo=None)

    def _host_up(self, host_id: str, epoch: int) -> bool:
        host = self._rows("hosts").get(host_id)
        return host is not None and host.epoch == epoch and host.state == model.HostState.UP

    def claim_tasks(self, host_id: str, epoch: int, now: datetime, lease_until: datetime,
                    limit: int) -> list[tuple[str, bool]]:
        self._writable("claim_tasks")
        self._begin()
        self._flush()
        tasks = sorted(self._rows("tasks").values(), key=lambda t: (t.created, t.id))
        picked = [(t.id, bool(t.owner_epoch)) for t in tasks
                  if t.status == model.TaskStatus.PROCESSING
                  and t.host_id in (None, host_id)
                  and (t.owner == "" or not self._host_up(t.owner, t.owner_epoch)
                       or (t.lease_until is not None and t.lease_until < now))][:limit]
        for task_id, _ in picked:
            self._set("tasks", task_id, owner=host_id, owner_epoch=epoch,
                      lease_until=lease_until)
        return picked

    def renew_leases(self, host_id: str, epoch: int, task_ids: Sequence[str],
                     lease_until: datetime) -> list[str]:
        self._writable("renew_leases")
        self._begin()
        self._flush()
        rows = self._rows("tasks")
        held = [i for i in task_ids if i in rows and rows[i].owner == host_id
                and rows[i].owner_epoch == epoch]
        for task_id in held:
            self._set("tasks", task_id, lease_until=lease_until)
        return held

    def claim_invocations(self, host_id: str, epoch: int, now: datetime,
                          limit: int) -> list[str]:
        self._writable("claim_invocations")
        self._begin()
        self._flush()
        rows = sorted(self._rows("invocations").values(), key=lambda v: (v.created, v.id))
        picked = [v.id for v in rows if v.status == model.InvocationStatus.RUNNING
                  and v.host_id == host_id and v.owner == ""][:limit]
        for record_id in picked:
            self._set("invocations", record_id, owner=host_id, owner_epoch=epoch,
                      started=now)
        return picked

    def hold_epoch(self, host_id: str, epoch: int, task_id: str | None = None) -> bool:
        self._writable("hold_epoch")
        self._begin()
        self._flush()
        if not self._host_up(host_id, epoch):
            return False
        task = self._rows("tasks").get(task_id) if task_id is not None else None
        return task_id is None or (task is not None and task.owner == host_id
                                   and task.owner_epoch == epoch)

    def heartbeat(self, host_id: str, epoch: int, now: datetime) -> bool:
        self._writable("heartbeat")
        self._begin()
        self._flush()
        if not self._host_up(host_id, epoch):
            return False
        self._set("hosts", host_id, heartbeat_at=now)
        return True

    def fence_host(self, host_id: str, epoch: int, stale_before: datetime) -> bool:
        self._writable("fence_host")
        self._begin()
        self._flush()
        host = self._rows("hosts").get(host_id)
        if host is None or not self._host_up(host_id, epoch) or \
                not host.heartbeat_at < stale_before:
            return False
        self._set("hosts", host_id, epoch=epoch + 1, state=model.HostState.FENCED)
        return True

    def notify(self, channel: str, payload: str = "") -> None:
        self._writable("notify")

    def lock_hosts(self) -> list[model.Host]:
        self._writable("lock_hosts")
        return sorted((h for h in self.hosts.find() if h.state == model.HostState.UP),
                      key=lambda h: h.id)

    # ------------------------------------------------------------ repository operations

    def _repo(self, table: str) -> Any:
        if table not in self._repos:
            cls = MemoryKeyedRepository if table == "idempotency" else MemoryRepository
            self._repos[table] = cls(self, TABLES[table])
        return self._repos[table]

    def _add(self, table: _Table, obj: Any) -> None:
        self._writable("add")
        if not isinstance(obj, table.cls):
            raise TypeError(f"{table.name} holds {table.cls.__name__}, not {type(obj).__name__}")
        key = table.key(obj)
        entries = self._imap.setdefault(table.name, {})
        entry = entries.get(key)
        if entry is not None:
            if entry.obj is obj:
                return
            raise DuplicateKey(f"{table.name}: {key!r} is already in this unit of work")
        self._begin()
        deleted = self._deleted.get(table.name, {})
        if key in deleted:  # deleted, then added again: the ORM turns it into an update
            deleted.pop(key)
            entries[key] = _Entry(obj, {name: object() for name in _fields(table.cls)})
            return
        if key in self._rows(table.name):
            raise DuplicateKey(f"{table.name}: {key!r} exists")
        entries[key] = _Entry(obj, None)

    def _get(self, table: _Table, key: Any) -> Any:
        self._require_entered()
        if self.readonly:
            row = self._read_view()[table.name].get(key)
            return None if row is None else _clone(row)
        entry = self._imap.get(table.name, {}).get(key)
        if entry is not None:
            return entry.obj
        if key in self._deleted.get(table.name, {}):
            return None
        self._begin()
        row = self._rows(table.name).get(key)
        return None if row is None else self._adopt(table, key, row)

    def _delete(self, table: _Table, obj: Any) -> None:
        self._writable("delete")
        key = table.key(obj)
        entries = self._imap.get(table.name, {})
        entry = entries.get(key)
        if entry is None or entry.obj is not obj:
            raise ValueError(f"{table.name}: {key!r} is not an object of this unit of work "
                             "(get it here first)")
        del entries[key]
        if entry.baseline is not None:  # a pending object is simply dropped
            self._deleted.setdefault(table.name, {})[key] = obj

    def _find(self, table: _Table, criteria: Criteria | None, equals: dict[str, Any]
              ) -> list[Any]:
        self._require_entered()
        criteria = criteria or Criteria()
        if self.readonly:
            return [_clone(r) for r in _listing(table, self._read_view()[table.name].values(),
                                                criteria, equals)]
        self._begin()
        self._flush()
        found = _listing(table, self._rows(table.name).values(), criteria, equals)
        return [self._adopt(table, table.key(row), row) for row in found]

    def _count_rows(self, table: _Table, criteria: Criteria | None, equals: dict[str, Any]
                    ) -> int:
        self._require_entered()
        criteria = criteria or Criteria()
        if self.readonly:
            return _count(table, self._read_view()[table.name].values(), criteria, equals)
        self._begin()
        self._flush()
        return _count(table, self._rows(table.name).values(), criteria, equals)

    # ------------------------------------------------------------ plumbing

    def _require_entered(self) -> None:
        if not self._entered:
            raise RuntimeError("a unit of work is used inside its `with` block only")

    def _writable(self, what: str) -> None:
        self._require_entered()
        if self.readonly:
            raise ReadOnlyError(f"{what}: this unit of work is read-only (uow(readonly=True))")

    def _read_view(self) -> dict[str, dict[Key, Row]]:
        if self._view is None:
            self._view = self.store._state
        return self._view

    def _begin(self) -> None:
        if self._tx is None:
            self.store._acquire(self)
            self._tx = {}

    def _rows(self, table: str, *, write: bool = False) -> dict[Key, Row]:
        """The transaction's rows of a table (its own copy once it writes to it)."""
        assert self._tx is not None
        if table in self._tx:
            return self._tx[table]
        if not write:
            return self.store._state[table]
        rows = self._tx[table] = dict(self.store._state[table])
        return rows

    def _adopt(self, table: _Table, key: Key, row: Row) -> Any:
        """The identity map's object for a row (a copy of it, the first time)."""
        entries = self._imap.setdefault(table.name, {})
        entry = entries.get(key)
        if entry is None:
            obj = _clone(row)
            entry = entries[key] = _Entry(obj, _values(obj))
        return entry.obj

    def _told(self, table: str, obj_id: str, holder: str | None) -> None:
        """set_committed_value: the object learns the lock's value without becoming dirty."""
        entry = self._imap.get(table, {}).get(obj_id)
        if entry is not None:
            entry.obj.lock_task_id = holder
            if entry.baseline is not None:
                entry.baseline["lock_task_id"] = holder

    def _flush(self) -> None:
        """Write the changed fields of the identity map's objects, the new objects and the
        deletions into the transaction's tables (the ORM's flush)."""
        touched: set[str] = set()
        for name, entries in self._imap.items():
            table = TABLES[name]
            for key, entry in entries.items():
                now = _values(entry.obj)
                if entry.baseline is None:
                    rows = self._rows(name, write=True)
                    if key in rows:
                        raise DuplicateKey(f"{name}: {key!r} exists")
                    rows[key] = _row(entry.obj)
                else:
                    changed = {f: v for f, v in now.items() if v != entry.baseline[f]}
                    if not changed:
                        continue
                    rows = self._rows(name, write=True)
                    current = rows.get(key)
                    if current is None:
                        raise StaleRow(f"{name}: {key!r} was deleted by another unit of work")
                    rows[key] = _row(current, changed)
                entry.baseline = now
                touched.add(table.name)
        for name, gone in self._deleted.items():
            if not gone:
                continue
            rows = self._rows(name, write=True)
            for key in gone:
                if rows.pop(key, None) is None:
                    raise StaleRow(f"{name}: {key!r} was deleted by another unit of work")
            gone.clear()
        for name in touched:
            for column in TABLES[name].unique:
                values = [getattr(r, column) for r in self._rows(name).values()]
                if len(values) != len(set(values)):
                    raise DuplicateKey(f"{name}: two rows share one {column}")

    def _discard(self) -> None:
        if self._tx is not None:
            self._tx, self._tx_nonces = None, None
            self.store._release()

    def _end(self) -> None:
        self._discard()
        self._view = None
        self._imap.clear()
        self._deleted.clear()
        self._entered = False


class MemoryRepository(Generic[T]):
    """A table of an InMemoryUnitOfWork (the `Repository` protocol)."""

    def __init__(self, uow: InMemoryUnitOfWork, table: _Table) -> None:
        self._uow = uow
        self._table = table

    def add(self, obj: T) -> None:
        self._uow._add(self._table, obj)

    def get(self, obj_id: str) -> T | None:
        return cast("T | None", self._uow._get(self._table, obj_id))

    def load(self, obj_id: str) -> T:
        found = self.get(obj_id)
        if found is None:
            raise MissingRow(f"{self._table.name}: no row {obj_id!r}")
        return found

    def delete(self, obj: T) -> None:
        self._uow._delete(self._table, obj)

    def find(self, criteria: Criteria | None = None, **equals: Any) -> list[T]:
        return cast(list[T], self._uow._find(self._table, criteria, equals))

    def rows(self, columns: Sequence[str] | None = None, criteria: Criteria | None = None,
             **equals: Any) -> list[Any]:
        found = self.find(criteria, **equals)
        names = tuple(columns) if columns else tuple(
            f.name for f in dataclasses.fields(cast(Any, found[0]))) if found else ()
        assert not (criteria and criteria.tags) or "tags" in names or not found
        row = typing.NamedTuple("Row", [(c, Any) for c in names])  # type: ignore[misc]
        return [row(*(getattr(obj, c) for c in names)) for obj in found]

    def count(self, criteria: Criteria | None = None, **equals: Any) -> int:
        return self._uow._count_rows(self._table, criteria, equals)


class MemoryKeyedRepository(Generic[T, K]):
    """A table keyed by a tuple (the `KeyedRepository` protocol): idempotency records."""

    def __init__(self, uow: InMemoryUnitOfWork, table: _Table) -> None:
        self._uow = uow
        self._table = table

    def add(self, obj: T) -> None:
        self._uow._add(self._table, obj)

    def get(self, obj_id: K) -> T | None:
        return cast("T | None", self._uow._get(self._table, tuple(cast(Any, obj_id))))

    def load(self, obj_id: K) -> T:
        found = self.get(obj_id)
        if found is None:
            raise MissingRow(f"{self._table.name}: no row {obj_id!r}")
        return found

    def delete(self, obj: T) -> None:
        self._uow._delete(self._table, obj)
