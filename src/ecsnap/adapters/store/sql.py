"""SQLAlchemy 2 implementation of the store: SQLite (WAL) by default, PostgreSQL for scale."""

from __future__ import annotations

import functools
import json
import threading
import time
import weakref
from collections import namedtuple
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, Self, TypeVar, cast

from sqlalchemy import (
    JSON,
    Connection,
    DateTime,
    Engine,
    Integer,
    String,
    Table,
    Text,
    TypeDecorator,
    any_,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    literal,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy import (
    cast as sql_cast,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.orm import Session, class_mapper, sessionmaker
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.base import instance_state

from ecsnap.adapters.store import orm
from ecsnap.adapters.store.base import Criteria, MissingRow
from ecsnap.domain import model
from ecsnap.filemodes import private_file, restrict

T = TypeVar("T")

TAG_FILTER_CAP = 1000  # ECS caps tag-filtered listings at 1,000 results
NONCE_PURGE_SECONDS = 60.0
_last_purge = 0.0


def make_engine(url: str, *, idle_in_transaction_s: float = 0) -> Engine:
    """An engine for `url`; SQLite gets WAL, a busy timeout and write-locking transactions.
    `idle_in_transaction_s` (PostgreSQL): the server ends a session idle inside a
    transaction that long, releasing its row locks (a cluster agent: a hung agent, stopped
    in the middle of a transaction, must not keep the host row its peers fence it by).

    Durability: a committed write survives an operating-system crash (SQLite
    `synchronous=FULL`, PostgreSQL's default), because the task journal must be on disk
    before the disk operations it records are. The one exception is a unit of work that
    stores a signature nonce (`spend_nonce`): it survives a crash of ecsnap (kill -9)
    but not of the operating system, which saves an fsync on every API request.
    """
    if url.startswith("sqlite"):
        _private_database_file(url)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn: Any, record: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()
            record.info["synchronous"] = "FULL"

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            # IMMEDIATE takes the write lock up front, so a read-then-write transaction
            # never fails half-way with SQLITE_BUSY when another writer got in between;
            # read-only units of work take no lock and run beside the writer (WAL).
            readonly = conn.get_execution_options().get("ecsnap_readonly")
            # in WAL mode NORMAL syncs at checkpoints only: a commit survives a crash of
            # the process, not of the OS; the level cannot change inside a transaction. A
            # read-only unit of work writes nothing but a signature nonce (spend_nonce).
            level = "NORMAL" if readonly else "FULL"
            info = conn.connection.info
            if info.get("synchronous") != level:
                conn.exec_driver_sql(f"PRAGMA synchronous={level}")
                info["synchronous"] = level
            if readonly:
                conn.exec_driver_sql("BEGIN")
                return
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    connect_args = {"options": "-c idle_in_transaction_session_timeout="
                               f"{max(1, int(idle_in_transaction_s * 1000))}"} \
        if idle_in_transaction_s > 0 else {}
    engine = create_engine(url, pool_size=10, max_overflow=20, connect_args=connect_args)
    _ping_when_idle(engine)
    return engine


PING_AFTER_IDLE_S = 2.0


def _ping_when_idle(engine: Engine) -> None:
    """Test a pooled connection before use when it sat idle in the pool for more than
    PING_AFTER_IDLE_S (the server may have restarted, or a proxy dropped it): a dead one is
    replaced before the caller sees it (SQLAlchemy's pessimistic disconnect handling, as
    pool_pre_ping does on every checkout; a connection in use moments ago needs no test, and
    the round trip was one in four of a Describe request's)."""

    @event.listens_for(engine, "checkin")
    def _checkin(dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_conn: Any, record: Any, proxy: Any) -> None:
        since = record.info.get("idle_since")
        if since is None or time.monotonic() - since <= PING_AFTER_IDLE_S:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:  # the pool retries the checkout with a new connection
            raise DisconnectionError(f"a pooled connection is gone: {exc}") from exc


def _private_database_file(url: str) -> None:
    """The SQLite file (AccessKey secrets, sessions) owner-only, whatever the umask: made
    0600 before SQLite opens it, since SQLite gives its -wal and -shm files the mode of the
    database file; an existing one (and its -wal, -shm) loses group and other permissions."""
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:") or \
            not Path(database).parent.is_dir():
        return  # (SQLite says what is wrong with a missing directory)
    private_file(database)
    for suffix in ("", "-wal", "-shm", "-journal"):
        restrict(database + suffix)


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


def listener(url: str, channel: str) -> Callable[[float], list[str]]:
    """`wait(timeout)` on PostgreSQL's LISTEN `channel`: the payloads of the NOTIFYs that
    came within `timeout` seconds (waiting for the first, then taking those already
    there), [] if none did. One connection of its own, opened again after an error."""
    import psycopg

    conninfo = make_url(url).set(drivername="postgresql").render_as_string(
        hide_password=False)
    held: list[Any] = []

    def wait(timeout: float) -> list[str]:
        try:
            if not held:
                conn = psycopg.connect(conninfo, autocommit=True)
                conn.execute(f'LISTEN "{channel}"')
                held.append(conn)
            got = [n.payload for n in held[0].notifies(timeout=timeout, stop_after=1)]
            if got:
                got += [n.payload for n in held[0].notifies(timeout=0)]
            return got
        except psycopg.Error:
            for conn in held:
                conn.close()
            held.clear()
            time.sleep(min(timeout, 1.0))
            return []

    return wait


class DetachedLoader(Generic[T]):
    """Domain objects straight from table rows, for read-only units of work.

    The ORM's loading (identity map, load events, mutable-JSON wrappers) costs about twice
    what the row itself does, and a read-only unit of work needs none of it: its objects
    are detached when it ends anyway. These are the same mapped classes with the same
    values, detached from the start (they carry their identity key, so a writing unit of
    work could still adopt one); JSON columns hold plain dicts and lists, and nothing a
    reader does to them is ever saved — change things through a writing unit of work.
    """

    def __init__(self, cls: type[T], table: Table) -> None:
        mapper = class_mapper(cls)
        self.cls = cls
        self.new = mapper.class_manager.new_instance
        self.columns = list(table.c)
        self.keys = [mapper.get_property_by_column(c).key for c in self.columns]
        self.single_key = len(table.primary_key.columns) == 1
        self.pk = [self.columns.index(c) for c in table.primary_key.columns]
        # JSON columns come as text (cast in SQL, so the driver's JSON parser is not used)
        # and are parsed here: most hold "{}", which needs no parser
        self.json = [i for i, c in enumerate(self.columns) if isinstance(c.type, JSON)]
        self.selected = [sql_cast(c, Text) if i in self.json else c
                         for i, c in enumerate(self.columns)]
        # built once: a statement object keeps its compiled form's cache key
        self.by_key = select(*self.selected).where(
            table.primary_key.columns[0] == bindparam("key"))

    def __call__(self, rows: Sequence[Any]) -> list[T]:
        """The objects of rows fetched at once (row by row costs a driver call per row)."""
        out = []
        new, keys, cls, pk, json_at = self.new, self.keys, self.cls, self.pk, self.json
        for fetched in rows:
            row: Sequence[Any] = fetched
            if json_at:
                row = list(fetched)
                for i in json_at:
                    row[i] = _json_value(row[i])
            obj = new()
            obj.__dict__.update(zip(keys, row, strict=True))
            instance_state(obj).key = (cls, tuple(row[i] for i in pk), None)
            out.append(obj)
        return out


class DriverStatement:
    """A statement that read-only units of work on PostgreSQL run on the driver's own
    connection (psycopg), compiled once.

    SQLAlchemy's `Connection.execute` costs about as much Python again as psycopg's
    own execute (execution context, result metadata built from the cursor's description,
    row objects): run here, a Describe* page took 0.65-0.81 of the CPU it took through
    SQLAlchemy (in process, side by side; docs/benchmarks.md §8). The values go through
    the bind processors and the rows through the result processors of the statement's
    own types, as SQLAlchemy would apply them (StrEnumColumn's lookups, TextArray), so the
    rows are the same; listeners of `before_cursor_execute` still see the statement; a
    driver error leaves as SQLAlchemy's (DBAPIError, its `orig` the driver's), and one
    that says the connection is gone invalidates it, as SQLAlchemy does."""

    def __init__(self, stmt: Any, dialect: Any) -> None:
        compiled = stmt.compile(dialect=dialect)
        self.sql = compiled.string
        assert "POSTCOMPILE" not in self.sql, "expanding lists: bind them as one array"
        self.compiled = compiled
        self.binds = [(name, process) for name, bind in compiled.binds.items()
                      if (process := bind.type.bind_processor(dialect)) is not None]
        columns = getattr(stmt, "selected_columns", None)  # None: no rows (text, DML)
        self.returns_rows = columns is not None
        self.results = [(i, process) for i, column in enumerate(columns or ())
                        if (process := column.type.result_processor(dialect, None))
                        is not None]

    def run(self, connection: Connection, params: dict[str, Any]) -> tuple[list[Any], int]:
        """(the rows as tuples, the row count)."""
        values = self.compiled.construct_params(params)
        for name, process in self.binds:
            values[name] = process(values[name])
        driver = connection.connection.driver_connection
        assert driver is not None
        cursor = driver.cursor()
        try:
            if connection.dispatch.before_cursor_execute:
                connection.dispatch.before_cursor_execute(connection, cursor, self.sql,
                                                          values, None, False)
            cursor.execute(self.sql, values)
            rows = cursor.fetchall() if self.returns_rows else []
            count = cursor.rowcount
        except connection.dialect.loaded_dbapi.Error as exc:
            gone = connection.dialect.is_disconnect(exc, driver, cursor)
            if gone:
                connection.invalidate(exc)
            raise DBAPIError.instance(self.sql, values, exc,
                                      connection.dialect.loaded_dbapi.Error,
                                      connection_invalidated=gone,
                                      dialect=connection.dialect) from exc
        finally:
            cursor.close()
        if self.results:
            results = self.results
            for n, fetched in enumerate(rows):
                row = list(fetched)
                for i, process in results:
                    row[i] = process(row[i])
                rows[n] = row
        return rows, count


_DRIVER_STATEMENTS: dict[Any, DriverStatement] = {}


def _fetched(session: Session, connection: Connection | None, stmt: Any,
             params: dict[str, Any]) -> list[Any]:
    """The rows of `stmt`, fetched at once: on the driver in a read-only unit of work on
    PostgreSQL (`connection` given: DriverStatement), else through SQLAlchemy (`session`'s
    in a writing one)."""
    if connection is not None and connection.dialect.name == "postgresql":
        return driver_statement(stmt, connection).run(connection, params)[0]
    run = session.execute if connection is None else connection.execute
    return list(run(stmt, params).all())


def driver_statement(stmt: Any, connection: Connection) -> DriverStatement:
    """`stmt`'s DriverStatement (statements are module constants or cached by shape in
    _STATEMENTS: one compile each)."""
    found = _DRIVER_STATEMENTS.get(stmt)
    if found is None:
        if len(_DRIVER_STATEMENTS) > 2000:  # as _STATEMENTS: shapes come from code
            _DRIVER_STATEMENTS.clear()
        found = _DRIVER_STATEMENTS[stmt] = DriverStatement(stmt, connection.dialect)
    return found


def _json_value(raw: str | None) -> Any:
    """What SQLAlchemy's JSON type makes of a JSON column's text."""
    if raw is None:
        return None
    if raw == "{}":
        return {}
    if raw == "[]":
        return []
    return json.loads(raw)


_LOADERS: dict[type, DetachedLoader[Any]] = {}


def _loader(cls: type[T]) -> DetachedLoader[T]:
    if cls not in _LOADERS:
        _LOADERS[cls] = DetachedLoader(cls, orm.MAPPED[cls])
    return _LOADERS[cls]


class SqlRepository(Generic[T]):
    """A table's rows as domain objects. Given the `connection` of a read-only unit of work,
    reads skip the ORM session (see DetachedLoader)."""

    def __init__(self, session: Session, cls: type[T], connection: Connection | None = None,
                 counts: tuple[CountCache, int] | None = None) -> None:
        self.session = session
        self.cls = cls
        self.table = orm.MAPPED[cls]
        self.connection = connection
        self.loader = _loader(cls) if connection is not None else None
        self.counts = counts if self.table.name in CountCache.TABLES else None
        # PostgreSQL: lists of IDs as one array parameter (see _build)
        bind = connection if connection is not None else session.get_bind()
        self.arrays = bind.dialect.name == "postgresql"

    def _loaded(self, stmt: Any, params: dict[str, Any]) -> list[T]:
        """The objects of a read-only unit of work's `stmt` (DetachedLoader's columns)."""
        assert self.connection is not None and self.loader is not None
        return self.loader(_fetched(self.session, self.connection, stmt, params))

    def add(self, obj: T) -> None:
        self.session.add(obj)

    def get(self, obj_id: Any) -> T | None:
        if self.connection is None or self.loader is None or not self.loader.single_key:
            return self.session.get(self.cls, obj_id)
        found = self._loaded(self.loader.by_key, {"key": obj_id})
        return found[0] if found else None

    def load(self, obj_id: Any) -> T:
        found = self.get(obj_id)
        if found is None:
            raise MissingRow(f"{self.table.name}: no row {obj_id!r}")
        return found

    def delete(self, obj: T) -> None:
        self.session.delete(obj)

    def find(self, criteria: Criteria | None = None, **equals: Any) -> list[T]:
        criteria = criteria or Criteria()
        what = "rows" if self.connection is None else "columns"
        stmt, params, _ = self._query(criteria, equals, what)
        if self.connection is None or self.loader is None:
            rows = list(self.session.scalars(stmt, params))
        else:
            rows = self._loaded(stmt, params)
        return _tag_filtered(rows, criteria)

    def rows(self, columns: Sequence[str] | None = None, criteria: Criteria | None = None,
             **equals: Any) -> list[Any]:
        """`columns` (None: every column) of the rows `find` would give, as named tuples
        (read a field as `row.name`), never saved. A listing skips building whole objects:
        a row costs a tenth of a detached object to make, and a field of it a fifth to
        read (a mapped attribute is a Python descriptor call); a page of 100 snapshots
        took 0.6 ms less."""
        criteria = criteria or Criteria()
        shape = _row_shape(self.cls, self.table, tuple(columns or ()))
        assert not criteria.tags or "tags" in shape.names, "tags filter needs the column"
        stmt, params, _ = self._query(criteria, equals, "columns", shape.names)
        fetched = _fetched(self.session, self.connection, stmt, params)
        return _tag_filtered(shape.make(fetched), criteria)

    def count(self, criteria: Criteria | None = None, **equals: Any) -> int:
        criteria = criteria or Criteria()
        if criteria.tags:
            page = Criteria(**{**criteria.__dict__, "offset": 0, "limit": None, "after": None})
            return len(self.find(page, **equals))
        stmt, params, shape = self._query(criteria, equals,
                                          "count" if self.connection is not None else "orm count")
        if self.connection is None:
            return int(self.session.scalar(stmt, params) or 0)
        if self.counts is None:
            return self._counted(stmt, params)
        cache, since = self.counts
        key = (shape, *((k, tuple(v) if isinstance(v, list) else v)
                        for k, v in params.items()))
        found = cache.get(self.table.name, key)
        if found is None:
            found = self._counted(stmt, params)
            cache.put(key, found, since)
        return found

    def _counted(self, stmt: Any, params: dict[str, Any]) -> int:
        return int(_fetched(self.session, self.connection, stmt, params)[0][0] or 0)

    def _query(self, criteria: Criteria, equals: dict[str, Any], what: str,
               only: tuple[str, ...] = ()) -> tuple[Any, dict[str, Any], tuple[Any, ...]]:
        """The statement for `criteria` and its parameters. A statement is built once per
        shape of criteria (which columns, which clauses), with every value a bound
        parameter: building one and working out its cache key cost more than running it.
        `what`: "rows" (ORM entities), "columns" (for DetachedLoader, or `only` these
        columns), "count", or "orm count" (through the session: it flushes pending objects
        first)."""
        merged = {**criteria.equals, **equals}
        listing = "count" not in what
        ordered = listing and "created" in self.table.c
        arrays = self.arrays
        key = (self.cls, what, only, arrays, tuple((n, v is None) for n, v in merged.items()),
               tuple(criteria.within), tuple(criteria.without), tuple(criteria.wildcard),
               criteria.created_from is not None, criteria.created_to is not None,
               ordered and criteria.after is not None, ordered and criteria.newest_first,
               listing and bool(criteria.tags), listing and bool(criteria.offset),
               listing and criteria.limit is not None)
        stmt = _STATEMENTS.get(key)
        if stmt is None:
            stmt = self._build(criteria, merged, what, ordered, only, arrays)
            if len(_STATEMENTS) > 1000:  # shapes come from code, not input; just in case
                _STATEMENTS.clear()
            _STATEMENTS[key] = stmt
        params: dict[str, Any] = {f"eq_{n}": v for n, v in merged.items() if v is not None}
        for name, values in criteria.within.items():
            params[f"in_{name}"] = list(values)
        for name, values in criteria.without.items():
            params[f"notin_{name}"] = list(values)
        for name, pattern in criteria.wildcard.items():
            escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            params[f"like_{name}"] = escaped.replace("*", "%")
        if criteria.created_from is not None:
            params["created_from"] = criteria.created_from
        if criteria.created_to is not None:
            params["created_to"] = criteria.created_to
        if ordered and criteria.after is not None:
            params["after_created"], params["after_id"] = criteria.after
        if listing and criteria.tags:
            params["limit"] = TAG_FILTER_CAP * 10  # tags are filtered here, then paged
        elif listing:
            if criteria.offset:
                params["offset"] = criteria.offset
            if criteria.limit is not None:
                params["limit"] = criteria.limit
        return stmt, params, key

    def _build(self, criteria: Criteria, merged: dict[str, Any], what: str,
               ordered: bool, only: tuple[str, ...] = (), arrays: bool = False) -> Any:
        """`arrays` (PostgreSQL): a list of IDs is one array parameter (`= ANY`, `<> ALL`),
        not one parameter each (IN): the statement's text stays the same whatever the
        number of IDs (a page's 100: SQLAlchemy rendered them, and the driver parsed the
        long text again, every time: a fifth of a DescribeSnapshots page)."""
        c = self.table.c
        if what == "count":
            stmt = select(func.count()).select_from(self.table)
        elif what == "orm count":
            stmt = select(func.count()).select_from(self.cls)  # ORM: autoflush
        elif what == "columns":
            stmt = select(*(_as_read(c[n]) for n in only)) if only else \
                select(*_loader(self.cls).selected)
        else:
            stmt = select(self.cls)
        for name, value in merged.items():
            stmt = stmt.where(c[name].is_(None) if value is None
                              else c[name] == bindparam(f"eq_{name}"))
        for name in criteria.within:
            stmt = stmt.where(_among(c[name], f"in_{name}", arrays))
        for name in criteria.without:
            stmt = stmt.where(~_among(c[name], f"notin_{name}", arrays))
        for name in criteria.wildcard:
            stmt = stmt.where(c[name].like(bindparam(f"like_{name}"), escape="\\"))
        if criteria.created_from is not None:
            stmt = stmt.where(c.created >= bindparam("created_from"))
        if criteria.created_to is not None:
            stmt = stmt.where(c.created <= bindparam("created_to"))
        if "count" in what:
            return stmt
        if ordered:
            if criteria.after is not None:
                created: Any = bindparam("after_created")
                last_id: Any = bindparam("after_id")
                if criteria.newest_first:
                    stmt = stmt.where((c.created < created)
                                      | ((c.created == created) & (c.id < last_id)))
                else:
                    stmt = stmt.where((c.created > created)
                                      | ((c.created == created) & (c.id > last_id)))
            stmt = stmt.order_by(c.created.desc(), c.id.desc()) if criteria.newest_first \
                else stmt.order_by(c.created.asc(), c.id.asc())
        if criteria.tags:
            return stmt.limit(bindparam("limit", type_=Integer()))
        if criteria.offset:
            stmt = stmt.offset(bindparam("offset", type_=Integer()))
        if criteria.limit is not None:
            stmt = stmt.limit(bindparam("limit", type_=Integer()))
        return stmt


_STATEMENTS: dict[tuple[Any, ...], Any] = {}


class TextArray(TypeDecorator[list[str]]):
    """A list of strings bound as ONE text parameter in PostgreSQL's array syntax
    (`{"a","b"}`), cast to `varchar[]` in SQL. psycopg dumps a list element by element
    in Python (a page's 100 IDs: 2-5 % of a DescribeSnapshots page's CPU), a string in
    one C call. Every element is double-quoted, with `"` and `\\` escaped, so any string
    stays one element."""

    impl = String
    cache_ok = True

    def process_bind_param(self, value: list[str] | None, dialect: Any) -> str | None:
        if value is None:
            return None
        return "{" + ",".join('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
                              for v in value) + "}"

    def bind_expression(self, bindvalue: Any) -> Any:
        return sql_cast(bindvalue, ARRAY(String()))


def _among(column: Any, name: str, arrays: bool) -> Any:
    """`column IN (the list parameter name)`. `arrays` (PostgreSQL): one array parameter,
    `column = ANY(...)` (negated: `NOT (... = ANY(...))`), a text column's as one
    TextArray string, so the statement's text stays the same whatever the number of
    values and has no expanding parameter (DriverStatement runs none); elsewhere an
    expanding IN."""
    if not arrays:
        return column.in_(bindparam(name, expanding=True))
    textual = isinstance(column.type, String | orm.StrEnumColumn)
    return column == any_(bindparam(name, type_=TextArray() if textual
                                    else ARRAY(column.type)))


_SNAPSHOT_USERS: dict[tuple[bool, bool], Any] = {}


def _snapshot_users(arrays: bool, within: bool) -> Any:
    """SqlUnitOfWork.snapshot_users' statement; `arrays` (PostgreSQL): the IDs as one
    array parameter; `within`: among given snapshot IDs."""
    parts = []
    for kind, table, usable in (("image", orm.images,
                                 _among(orm.images.c.status, "statuses", arrays)),
                                ("disk", orm.disks, orm.disks.c.released.is_(False))):
        column = table.c.source_snapshot_id
        part = select(literal(kind).label("kind"), column).where(
            table.c.account_id == bindparam("account_id"), usable, column != "")
        parts.append(part.where(_among(column, "ids", arrays)) if within else part)
    return union_all(*parts)


def _as_read(column: Any) -> Any:
    """A column as reads select it: a JSON column as its text (`_json_value` parses it;
    most hold "{}", which needs no parser)."""
    return sql_cast(column, Text) if isinstance(column.type, JSON) else column


class _RowShape:
    """The named tuple type of some columns of a table, and how to make its rows."""

    def __init__(self, table: Table, names: tuple[str, ...]) -> None:
        self.names = names
        self.type: Any = namedtuple("Row", names)  # type: ignore[misc]
        self.json = [i for i, n in enumerate(names) if isinstance(table.c[n].type, JSON)]

    def make(self, fetched: Sequence[Any]) -> list[Any]:
        make, json_at = self.type._make, self.json
        if not json_at:
            return [make(r) for r in fetched]
        out = []
        for r in fetched:
            row = list(r)
            for i in json_at:
                row[i] = _json_value(row[i])
            out.append(make(row))
        return out


_ROW_SHAPES: dict[tuple[type, tuple[str, ...]], _RowShape] = {}


def _row_shape(cls: type, table: Table, columns: tuple[str, ...]) -> _RowShape:
    """The shape of `columns` of `cls`'s table (empty: every column, by attribute name)."""
    found = _ROW_SHAPES.get((cls, columns))
    if found is None:
        names = columns or tuple(_loader(cls).keys)
        found = _ROW_SHAPES[(cls, columns)] = _RowShape(table, names)
    return found


def _tag_filtered(rows: list[Any], criteria: Criteria) -> list[Any]:
    """`rows` (objects or rows) with the tags of `criteria`, then its offset and limit
    (tags are filtered here: the statement read up to TAG_FILTER_CAP * 10 rows)."""
    if not criteria.tags:
        return rows
    rows = [r for r in rows if _has_tags(r, criteria.tags)][:TAG_FILTER_CAP]
    end = None if criteria.limit is None else criteria.offset + criteria.limit
    return rows[criteria.offset:end]


def _has_tags(obj: Any, wanted: dict[str, str]) -> bool:
    tags = getattr(obj, "tags", {}) or {}
    return all(k in tags and (v == "" or tags[k] == v) for k, v in wanted.items())


_LOCKABLE = {"instance": orm.instances, "disk": orm.disks}
_REPOSITORIES = ("accounts", "access_keys", "regions", "zones", "images", "instances", "disks",
                 "snapshots", "snapshot_groups", "tasks", "idempotency", "invocations",
                 "auto_snapshot_policies", "policy_runs",
                 "hosts")


class ReadOnlyError(RuntimeError):
    """A write through a read-only unit of work."""


class _NoSession:
    """The session of a read-only unit of work: it has none, so anything that would write
    (add, delete, locks, nonces) fails loudly instead of being silently dropped."""

    def __getattr__(self, name: str) -> Any:
        raise ReadOnlyError(f"{name}: this unit of work is read-only (uow(readonly=True))")


class SqlUnitOfWork:
    def __init__(self, session_factory: Callable[[], Session], readonly: bool = False) -> None:
        self.session_factory = session_factory
        self.readonly = readonly
        self.connection: Connection | None = None

    def __enter__(self) -> Self:
        engine = getattr(self.session_factory, "kw", {}).get("bind") if self.readonly \
            else None
        counts, since = None, 0
        if engine is not None:
            # reads go straight to one connection: no ORM session to set up and tear down
            counts = _COUNT_CACHES.get(engine)
            since = counts.sequence if counts is not None else 0  # before the first read
            self.connection = engine.connect().execution_options(ecsnap_readonly=True)
            if self.connection.dialect.name == "postgresql":
                # READ COMMITTED gives each statement its own snapshot, in a transaction or
                # not: without one there is no BEGIN and no ROLLBACK, two round trips less
                self.connection = self.connection.execution_options(
                    isolation_level="AUTOCOMMIT")
            self.session = cast(Session, _NoSession())
        else:
            self.connection = None
            self.session = self.session_factory()
        self.counted = None if self.connection is None or counts is None else (counts, since)
        for name in _REPOSITORIES:  # a unit of work entered again starts afresh
            self.__dict__.pop(name, None)
        return self

    def _repository(self, cls: type[T]) -> SqlRepository[T]:
        return SqlRepository(self.session, cls, self.connection, self.counted)

    # made on first use: a request touches two or three of them
    accounts = functools.cached_property(lambda self: self._repository(model.Account))
    access_keys = functools.cached_property(lambda self: self._repository(model.AccessKey))
    regions = functools.cached_property(lambda self: self._repository(model.Region))
    zones = functools.cached_property(lambda self: self._repository(model.Zone))
    images = functools.cached_property(lambda self: self._repository(model.Image))
    instances = functools.cached_property(lambda self: self._repository(model.Instance))
    disks = functools.cached_property(lambda self: self._repository(model.Disk))
    snapshots = functools.cached_property(lambda self: self._repository(model.Snapshot))
    snapshot_groups = functools.cached_property(
        lambda self: self._repository(model.SnapshotGroup))
    tasks = functools.cached_property(lambda self: self._repository(model.Task))
    idempotency = functools.cached_property(
        lambda self: self._repository(model.IdempotencyRecord))
    invocations = functools.cached_property(lambda self: self._repository(model.Invocation))
    auto_snapshot_policies = functools.cached_property(
        lambda self: self._repository(model.AutoSnapshotPolicy))
    policy_runs = functools.cached_property(lambda self: self._repository(model.PolicyRun))
    hosts = functools.cached_property(lambda self: self._repository(model.Host))

    def __exit__(self, *exc: object) -> None:
        if self.connection is not None:
            self.connection.close()  # ends (rolls back) the read transaction
            return
        # close() ends (rolls back) an uncommitted transaction and detaches the objects
        # with what they hold, so results stay readable after the unit of work
        self.session.close()

    def commit(self) -> None:
        if self.connection is not None:
            self.connection.commit()  # ends the read transaction; nothing was written
        else:
            self.session.commit()

    def rollback(self) -> None:
        if self.connection is not None:
            self.connection.rollback()
        else:
            self.session.rollback()

    def _loaded(self, kind: str, obj_id: str) -> Any:
        """The instance or disk if this session holds it already (no query)."""
        cls = model.Instance if kind == "instance" else model.Disk
        return self.session.identity_map.get(self.session.identity_key(cls, obj_id))

    def try_lock(self, kind: str, obj_ids: Sequence[str], task_id: str) -> str | None:
        """One conditional UPDATE for all of `obj_ids`; a SELECT only when it did not take
        them all. Objects this session holds are told the new value, without a reload."""
        assert not isinstance(obj_ids, str), "a sequence of IDs"
        table, wanted = _LOCKABLE[kind], list(dict.fromkeys(obj_ids))
        self.session.flush()
        result = self.session.execute(
            update(table).where(table.c.id.in_(wanted), table.c.lock_task_id.is_(None))
            .values(lock_task_id=task_id).execution_options(synchronize_session=False))
        holders: dict[str, str | None] = dict.fromkeys(wanted, task_id)
        if getattr(result, "rowcount", 0) != len(wanted):
            holders = dict.fromkeys(wanted, None) | dict(self.session.execute(
                select(table.c.id, table.c.lock_task_id).where(table.c.id.in_(wanted)))
                .tuples().all())
        for obj_id, holder in holders.items():
            obj = self._loaded(kind, obj_id)
            if obj is not None:
                set_committed_value(obj, "lock_task_id", holder)
        return next((obj_id for obj_id, holder in holders.items() if holder != task_id), None)

    def unlock(self, kind: str, obj_ids: Sequence[str], task_id: str) -> None:
        assert not isinstance(obj_ids, str), "a sequence of IDs"
        table = _LOCKABLE[kind]
        self.session.flush()
        self.session.execute(
            update(table).where(table.c.id.in_(obj_ids), table.c.lock_task_id == task_id)
            .values(lock_task_id=None).execution_options(synchronize_session=False))
        for obj_id in obj_ids:
            obj = self._loaded(kind, obj_id)
            if obj is not None and obj.lock_task_id == task_id:
                set_committed_value(obj, "lock_task_id", None)

    def spend_nonce(self, key_id: str, nonce: str, expires: datetime, now: datetime) -> bool:
        """One statement (the base's docstring): insert the nonce, or take over an expired
        row of it, where the key and its account are enabled. In a read-only unit of work
        it commits at once: on PostgreSQL outside any transaction (no BEGIN, no COMMIT: one
        round trip), on SQLite by ending the read transaction it opened. That commit skips
        the fsync (see make_engine): a nonce lost to an OS crash only reopens the replay of
        a request signed within the last moment before the crash, and the timestamp window
        still closes that after 15 minutes."""
        global _last_purge
        conn = self.connection if self.connection is not None else self.session.connection()
        if time.monotonic() - _last_purge > NONCE_PURGE_SECONDS:  # not on every request
            conn.execute(delete(orm.nonces).where(orm.nonces.c.expires < now))
            _last_purge = time.monotonic()
        # on PostgreSQL the statement itself sets synchronous_commit off for its
        # transaction (set_config(..., true) is SET LOCAL): no round trip of its own
        values = {"key_id": key_id, "nonce": nonce, "expires": expires, "now": now}
        if self.connection is not None and conn.dialect.name == "postgresql":
            # autocommit: committed by itself, on the driver (DriverStatement)
            return driver_statement(_SPEND_NONCE_PG, conn).run(conn, values)[1] == 1
        result = conn.execute(_SPEND_NONCE_PG if conn.dialect.name == "postgresql"
                              else _SPEND_NONCE, values)
        if self.connection is not None:
            self.connection.commit()
        return bool(result.rowcount == 1)

    def snapshot_users(self, account_id: str, image_statuses: Sequence[str],
                       snapshot_ids: Sequence[str] | None) -> tuple[set[str], set[str]]:
        """The base's docstring: `SELECT 'image', source_snapshot_id FROM images WHERE ...
        UNION ALL SELECT 'disk', ... FROM disks WHERE ...` (a page's Usage costs one round
        trip, not two)."""
        conn = self.connection if self.connection is not None else self.session.connection()
        arrays = conn.dialect.name == "postgresql"
        key = (arrays, snapshot_ids is not None)
        stmt = _SNAPSHOT_USERS.get(key)
        if stmt is None:
            stmt = _SNAPSHOT_USERS[key] = _snapshot_users(*key)
        params: dict[str, Any] = {"account_id": account_id, "statuses": list(image_statuses)}
        if snapshot_ids is not None:
            params["ids"] = list(snapshot_ids)
        found: tuple[set[str], set[str]] = (set(), set())
        for kind, snapshot_id in _fetched(self.session, self.connection, stmt, params):
            found[kind == "disk"].add(snapshot_id)
        return found

    def advance_policy_run(self, policy_id: str, disk_id: str, due: datetime,
                           snapshot_id: str = "") -> bool:
        """The conditional upsert of the base's docstring: on PostgreSQL a second writer
        of the row waits for the first, then re-checks the WHERE on the committed row."""
        key = model.PolicyRun.key(policy_id, disk_id)
        self.session.flush()
        result = self.session.execute(_ADVANCE_POLICY_RUN, {
            "id": key, "policy_id": policy_id, "disk_id": disk_id, "due": due,
            "snapshot_id": snapshot_id})
        won = bool(getattr(result, "rowcount", 0) == 1)
        obj = self.session.identity_map.get(self.session.identity_key(model.PolicyRun, key))
        if won and obj is not None:
            set_committed_value(obj, "last_due", due)
            set_committed_value(obj, "snapshot_id", snapshot_id)
        return won

    # -- the cluster: the agents' queue, leases and epoch fencing (service/cluster.py)
    def clock(self) -> datetime:
        conn = self.session.connection()
        if conn.dialect.name == "postgresql":
            return cast(datetime, conn.execute(_PG_CLOCK).scalar_one())
        return datetime.now(UTC).replace(tzinfo=None)

    def claim_tasks(self, host_id: str, epoch: int, now: datetime, lease_until: datetime,
                    limit: int) -> list[tuple[str, bool]]:
        # one statement (one round trip): UPDATE tasks ... FROM (SELECT ... FOR UPDATE OF
        # queued SKIP LOCKED LIMIT n) AS picked ... RETURNING the owner epoch before
        t, h = orm.tasks, orm.hosts
        q = t.alias("queued")
        owner_up = select(h.c.id).where(h.c.id == q.c.owner, h.c.epoch == q.c.owner_epoch,
                                        h.c.state == model.HostState.UP.value).exists()
        picked = (
            select(q.c.id, q.c.owner_epoch)
            .where(q.c.status == model.TaskStatus.PROCESSING.value,
                   (q.c.host_id.is_(None)) | (q.c.host_id == host_id),
                   (q.c.owner == "") | ~owner_up | (q.c.lease_until < now))
            .order_by(q.c.created, q.c.id).limit(limit)
            .with_for_update(of=q, skip_locked=True)).subquery("picked")
        self.session.flush()
        claimed = self.session.execute(
            update(t).where(t.c.id == picked.c.id)
            .values(owner=host_id, owner_epoch=epoch, lease_until=lease_until)
            .returning(t.c.id, picked.c.owner_epoch, t.c.created)
            .execution_options(synchronize_session=False)).tuples().all()
        return [(task_id, bool(before)) for task_id, before, _ in
                sorted(claimed, key=lambda row: (row[2], row[0]))]

    def claim_invocations(self, host_id: str, epoch: int, now: datetime,
                          limit: int) -> list[str]:
        v = orm.invocations
        self.session.flush()
        picked = self.session.execute(
            select(v.c.id)
            .where(v.c.status == model.InvocationStatus.RUNNING.value,
                   v.c.host_id == host_id, v.c.owner == "")
            .order_by(v.c.created, v.c.id).limit(limit)
            .with_for_update(skip_locked=True)).scalars().all()
        if picked:
            self.session.execute(
                update(v).where(v.c.id.in_(list(picked)), v.c.owner == "")
                .values(owner=host_id, owner_epoch=epoch, started=now)
                .execution_options(synchronize_session=False))
        return list(picked)

    def renew_leases(self, host_id: str, epoch: int, task_ids: Sequence[str],
                     lease_until: datetime) -> list[str]:
        t = orm.tasks
        if not task_ids:
            return []
        result = self.session.execute(
            update(t).where(t.c.id.in_(list(task_ids)), t.c.owner == host_id,
                            t.c.owner_epoch == epoch)
            .values(lease_until=lease_until).returning(t.c.id)
            .execution_options(synchronize_session=False))
        return [row[0] for row in result]

    def hold_epoch(self, host_id: str, epoch: int, task_id: str | None = None) -> bool:
        h, t = orm.hosts, orm.tasks
        self.session.flush()
        row = self.session.execute(
            select(h.c.id).where(h.c.id == host_id, h.c.epoch == epoch,
                                 h.c.state == model.HostState.UP.value)
            .with_for_update(read=True)).first()
        if row is None:
            return False
        if task_id is None:
            return True
        return self.session.execute(
            select(t.c.id).where(t.c.id == task_id, t.c.owner == host_id,
                                 t.c.owner_epoch == epoch)
            .with_for_update()).first() is not None

    def heartbeat(self, host_id: str, epoch: int, now: datetime) -> bool:
        h = orm.hosts
        result = self.session.execute(
            update(h).where(h.c.id == host_id, h.c.epoch == epoch,
                            h.c.state == model.HostState.UP.value)
            .values(heartbeat_at=now).execution_options(synchronize_session=False))
        return bool(getattr(result, "rowcount", 0) == 1)

    def fence_host(self, host_id: str, epoch: int, stale_before: datetime) -> bool:
        h = orm.hosts
        self.session.flush()
        result = self.session.execute(
            update(h).where(h.c.id == host_id, h.c.epoch == epoch,
                            h.c.state == model.HostState.UP.value,
                            h.c.heartbeat_at < stale_before)
            .values(epoch=epoch + 1, state=model.HostState.FENCED.value)
            .execution_options(synchronize_session=False))
        # its tasks become claimable by this alone (their owner is no longer Up at the
        # epoch that claimed them); the host row is the only one locked, so an agent's
        # commit (its rows, then the host row FOR SHARE) cannot deadlock with a fence
        return bool(getattr(result, "rowcount", 0) == 1)

    def notify(self, channel: str, payload: str = "") -> None:
        conn = self.session.connection()
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_notify(:channel, :payload)"),
                         {"channel": channel, "payload": payload})

    def lock_hosts(self) -> list[model.Host]:
        """The Up hosts in ID order, their rows locked until the end of the transaction
        (SELECT ... FOR UPDATE; SQLite has one writer at a time anyway): placement
        (service/placement.py) recounts the claims on them under this lock."""
        self.session.flush()
        stmt = select(model.Host).where(orm.hosts.c.state == model.HostState.UP.value) \
            .order_by(orm.hosts.c.id).with_for_update().execution_options(
                populate_existing=True)
        return list(self.session.scalars(stmt))


_PG_CLOCK = text("SELECT timezone('UTC', clock_timestamp())")


# The same SQL on SQLite (3.24+) and PostgreSQL; a text() statement so that it is compiled
# once (an ORM-dialect insert with ON CONFLICT is compiled on every execution).
def _spend_nonce_statement(relaxed: str = "") -> Any:
    """The nonce, inserted from the key's own row only while it and its account are enabled
    (a key disabled after an API process cached it is refused at its next request:
    service.accounts.signing_key); `relaxed`: PostgreSQL's synchronous_commit off, set by
    the statement itself."""
    return text(
        "INSERT INTO nonces (key_id, nonce, expires) SELECT k.id, :nonce, :expires "
        f"FROM access_keys AS k JOIN accounts AS a ON a.id = k.account_id{relaxed} "
        "WHERE k.id = :key_id AND k.enabled AND a.enabled "
        "ON CONFLICT (key_id, nonce) DO UPDATE SET expires = excluded.expires "
        "WHERE nonces.expires < :now",
    ).bindparams(bindparam("expires", type_=DateTime()), bindparam("now", type_=DateTime())) \
        .execution_options(preserve_rowcount=True)


_SPEND_NONCE = _spend_nonce_statement()
_SPEND_NONCE_PG = _spend_nonce_statement(
    " CROSS JOIN (SELECT set_config('synchronous_commit', 'off', true)) AS relaxed")

_ADVANCE_POLICY_RUN = text(
    "INSERT INTO policy_runs (id, policy_id, disk_id, last_due, snapshot_id) "
    "VALUES (:id, :policy_id, :disk_id, :due, :snapshot_id) "
    "ON CONFLICT (id) DO UPDATE SET last_due = excluded.last_due, "
    "snapshot_id = excluded.snapshot_id WHERE policy_runs.last_due < excluded.last_due",
).bindparams(bindparam("due", type_=DateTime())).execution_options(preserve_rowcount=True)


class CountCache:
    """Recent TotalCounts of the big listings, so that a page does not count 30,000 rows
    again (that is most of a DescribeSnapshots page: 4-6 ms of 30,000 index entries).

    Exact for every write made through this process: a commit that wrote a table (seen by
    the session events below) makes every count of that table taken before it stale.
    A count is stored with the commit sequence number read when its unit of work began,
    before its snapshot of the database was taken; it is used again only while no commit
    to its table came after that number. Writes made by another process are not seen:
    those counts stay at most `TTL` seconds old (only `ecsnap serve` writes these tables;
    the admin commands write accounts, keys and images).
    """

    TABLES = frozenset({"snapshots", "snapshot_groups", "instances", "disks"})
    TTL = 10.0

    def __init__(self) -> None:
        self.sequence = 0
        self.last_write: dict[str, int] = {}
        self.entries: dict[Any, tuple[int, int, float]] = {}
        self.lock = threading.Lock()

    def wrote(self, tables: set[str]) -> None:
        with self.lock:
            self.sequence += 1
            for table in tables:
                self.last_write[table] = self.sequence

    def get(self, table: str, key: Any) -> int | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        count, since, at = entry
        if since < self.last_write.get(table, 0) or time.monotonic() - at > self.TTL:
            return None
        return count

    def put(self, key: Any, count: int, since: int) -> None:
        if len(self.entries) > 10_000:
            self.entries.clear()
        self.entries[key] = (count, since, time.monotonic())


_COUNT_CACHES: weakref.WeakKeyDictionary[Engine, CountCache] = weakref.WeakKeyDictionary()


def session_factory(engine: Engine) -> Callable[[], Session]:
    orm.start_mappers()
    factory = sessionmaker(bind=engine, expire_on_commit=False)
    cache = _COUNT_CACHES.setdefault(engine, CountCache())

    def wrote(session: Session) -> set[str]:
        return cast(set[str], session.info.setdefault("ecsnap_wrote", set()))

    @event.listens_for(factory, "after_flush")
    def _flushed(session: Session, _context: Any) -> None:
        tables = wrote(session)
        for obj in (*session.new, *session.dirty, *session.deleted):
            table = orm.MAPPED.get(type(obj))
            if table is not None:
                tables.add(table.name)

    @event.listens_for(factory, "do_orm_execute")
    def _executed(state: Any) -> None:
        if state.is_insert or state.is_update or state.is_delete:
            table = getattr(state.statement, "table", None)
            wrote(state.session).add(getattr(table, "name", "*"))

    @event.listens_for(factory, "after_commit")
    def _committed(session: Session) -> None:
        tables = session.info.pop("ecsnap_wrote", None)
        if tables and "*" in tables:
            tables = set(CountCache.TABLES)
        if tables and tables & CountCache.TABLES:
            cache.wrote(tables)

    @event.listens_for(factory, "after_rollback")
    def _rolled_back(session: Session) -> None:
        session.info.pop("ecsnap_wrote", None)

    return factory
