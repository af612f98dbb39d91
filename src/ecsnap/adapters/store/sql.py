"""SQLAlchemy 2 implementation of the store: SQLite (WAL) by default, PostgreSQL for scale."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, Generic, Self, TypeVar

from sqlalchemy import Engine, create_engine, delete, event, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from ecsnap.adapters.store import orm
from ecsnap.adapters.store.base import Criteria
from ecsnap.domain import model

T = TypeVar("T")

TAG_FILTER_CAP = 1000  # ECS caps tag-filtered listings at 1,000 results
NONCE_PURGE_SECONDS = 60.0
_last_purge = 0.0


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite gets WAL, a busy timeout and write-locking transactions."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            # IMMEDIATE takes the write lock up front, so a read-then-write transaction
            # never fails half-way with SQLITE_BUSY when another writer got in between;
            # read-only units of work take no lock and run beside the writer (WAL).
            if conn.get_execution_options().get("ecsnap_readonly"):
                conn.exec_driver_sql("BEGIN")
            else:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest alembic revision."""
    from alembic import command
    from alembic.config import Config

    here = Path(__file__).parent
    cfg = Config()
    cfg.set_main_option("script_location", str(here / "migrations"))
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")


class SqlRepository(Generic[T]):
    def __init__(self, session: Session, cls: type[T]) -> None:
        self.session = session
        self.cls = cls
        self.table = orm.MAPPED[cls]

    def add(self, obj: T) -> None:
        self.session.add(obj)

    def get(self, obj_id: str) -> T | None:
        return self.session.get(self.cls, obj_id)

    def delete(self, obj: T) -> None:
        self.session.delete(obj)

    def _select(self, criteria: Criteria, equals: dict[str, Any]) -> Any:
        c = self.table.c
        stmt = select(self.cls)
        for name, value in {**criteria.equals, **equals}.items():
            stmt = stmt.where(c[name].is_(None) if value is None else c[name] == value)
        for name, values in criteria.within.items():
            stmt = stmt.where(c[name].in_(list(values)))
        for name, pattern in criteria.wildcard.items():
            escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            stmt = stmt.where(c[name].like(escaped.replace("*", "%"), escape="\\"))
        if criteria.created_from is not None:
            stmt = stmt.where(c.created >= criteria.created_from)
        if criteria.created_to is not None:
            stmt = stmt.where(c.created <= criteria.created_to)
        return stmt

    def _ordered(self, stmt: Any, criteria: Criteria) -> Any:
        c = self.table.c
        if "created" not in c:
            return stmt
        if criteria.after is not None:
            created, last_id = criteria.after
            if criteria.newest_first:
                stmt = stmt.where((c.created < created)
                                  | ((c.created == created) & (c.id < last_id)))
            else:
                stmt = stmt.where((c.created > created)
                                  | ((c.created == created) & (c.id > last_id)))
        if criteria.newest_first:
            return stmt.order_by(c.created.desc(), c.id.desc())
        return stmt.order_by(c.created.asc(), c.id.asc())

    def find(self, criteria: Criteria | None = None, **equals: Any) -> list[T]:
        criteria = criteria or Criteria()
        stmt = self._ordered(self._select(criteria, equals), criteria)
        if criteria.tags:
            rows = list(self.session.scalars(stmt.limit(TAG_FILTER_CAP * 10)))
            rows = [r for r in rows if _has_tags(r, criteria.tags)][:TAG_FILTER_CAP]
            end = None if criteria.limit is None else criteria.offset + criteria.limit
            return rows[criteria.offset:end]
        if criteria.offset:
            stmt = stmt.offset(criteria.offset)
        if criteria.limit is not None:
            stmt = stmt.limit(criteria.limit)
        return list(self.session.scalars(stmt))

    def count(self, criteria: Criteria | None = None, **equals: Any) -> int:
        criteria = criteria or Criteria()
        if criteria.tags:
            page = Criteria(**{**criteria.__dict__, "offset": 0, "limit": None, "after": None})
            return len(self.find(page, **equals))
        stmt = self._select(criteria, equals).with_only_columns(func.count())
        return int(self.session.scalar(stmt) or 0)


def _has_tags(obj: Any, wanted: dict[str, str]) -> bool:
    tags = getattr(obj, "tags", {}) or {}
    return all(k in tags and (v == "" or tags[k] == v) for k, v in wanted.items())


_LOCKABLE = {"instance": orm.instances, "disk": orm.disks}


class SqlUnitOfWork:
    def __init__(self, session_factory: Callable[[], Session], readonly: bool = False) -> None:
        self.session_factory = session_factory
        self.readonly = readonly

    def __enter__(self) -> Self:
        self.session = self.session_factory()
        s = self.session
        if self.readonly:
            s.connection(execution_options={"ecsnap_readonly": True})
        self.accounts = SqlRepository(s, model.Account)
        self.access_keys = SqlRepository(s, model.AccessKey)
        self.regions = SqlRepository(s, model.Region)
        self.zones = SqlRepository(s, model.Zone)
        self.images = SqlRepository(s, model.Image)
        self.instances = SqlRepository(s, model.Instance)
        self.disks = SqlRepository(s, model.Disk)
        self.snapshots = SqlRepository(s, model.Snapshot)
        self.snapshot_groups = SqlRepository(s, model.SnapshotGroup)
        self.tasks = SqlRepository(s, model.Task)
        self.idempotency = SqlRepository(s, model.IdempotencyRecord)
        self.invocations = SqlRepository(s, model.Invocation)
        return self

    def __exit__(self, *exc: object) -> None:
        # close() ends (rolls back) an uncommitted transaction and detaches the objects
        # with what they hold, so results stay readable after the unit of work
        self.session.close()

    def commit(self) -> None:
        self.session.commit()

    def rollback(self) -> None:
        self.session.rollback()

    def try_lock(self, kind: str, obj_id: str, task_id: str) -> bool:
        table = _LOCKABLE[kind]
        self.session.flush()
        result = self.session.execute(
            update(table).where(table.c.id == obj_id, table.c.lock_task_id.is_(None))
            .values(lock_task_id=task_id).execution_options(synchronize_session=False))
        taken = bool(getattr(result, "rowcount", 0) == 1)
        cls: type[model.Instance] | type[model.Disk] = \
            model.Instance if kind == "instance" else model.Disk
        obj = self.session.get(cls, obj_id)
        if obj is not None:
            self.session.refresh(obj)
            taken = taken or getattr(obj, "lock_task_id", None) == task_id
        return taken

    def unlock(self, kind: str, obj_id: str, task_id: str) -> None:
        table = _LOCKABLE[kind]
        self.session.flush()
        self.session.execute(
            update(table).where(table.c.id == obj_id, table.c.lock_task_id == task_id)
            .values(lock_task_id=None).execution_options(synchronize_session=False))
        obj = self.session.get(model.Instance if kind == "instance" else model.Disk, obj_id)
        if obj is not None:
            self.session.refresh(obj)

    def remember_nonce(self, key_id: str, nonce: str, expires: datetime, now: datetime) -> bool:
        table = orm.nonces
        global _last_purge
        if time.monotonic() - _last_purge > NONCE_PURGE_SECONDS:  # not on every request
            self.session.execute(delete(table).where(table.c.expires < now))
            _last_purge = time.monotonic()
        seen = self.session.execute(select(table.c.expires).where(
            table.c.key_id == key_id, table.c.nonce == nonce)).scalar()
        if seen is not None and seen >= now:
            return False
        if seen is not None:  # expired, not purged yet: the nonce may be used again
            self.session.execute(delete(table).where(table.c.key_id == key_id,
                                                     table.c.nonce == nonce))
        try:
            with self.session.begin_nested():
                self.session.execute(insert(table).values(key_id=key_id, nonce=nonce,
                                                          expires=expires))
        except IntegrityError:
            return False
        return True


def session_factory(engine: Engine) -> Callable[[], Session]:
    orm.start_mappers()
    return sessionmaker(bind=engine, expire_on_commit=False)
