"""The metadata store on SQLite and on a real PostgreSQL server: same code, same results."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import StatementError

from ecsnap.adapters.store import sql
from ecsnap.adapters.store.base import Criteria
from ecsnap.domain.model import (
    AccessKey,
    Account,
    Disk,
    DiskStatus,
    Instance,
    InstanceStatus,
    Snapshot,
    SnapshotGroup,
    Task,
    utcnow,
)
from tests.store.contract import check_nonces


@pytest.fixture(params=["sqlite", "postgres"])
def uow_factory(request: pytest.FixtureRequest, tmp_path):  # type: ignore[no-untyped-def]
    if request.param == "postgres":
        url = request.getfixturevalue("postgres").fresh_database()
    else:
        url = f"sqlite:///{tmp_path / 'store.db'}"
    engine = sql.make_engine(url)
    sql.migrate(engine)
    sql.migrate(engine)  # idempotent
    factory = sql.session_factory(engine)
    yield lambda readonly=False: sql.SqlUnitOfWork(factory, readonly)
    engine.dispose()


def make_instance(n: int, **kw: object) -> Instance:
    return Instance(id=f"i-{n:04d}", account_id="acc", region_id="r", zone_id="r-a",
                    instance_type="ecs.g6.large", vcpus=2, memory_mib=8192, image_id="m",
                    name=f"web-{n}", **kw)  # type: ignore[arg-type]


def test_round_trip_of_every_field(uow_factory) -> None:  # type: ignore[no-untyped-def]
    with uow_factory() as uow:
        uow.instances.add(make_instance(1, tags={"env": "prod"},
                                        status=InstanceStatus.RUNNING))
        uow.disks.add(Disk(id="d-1", account_id="acc", region_id="r", zone_id="r-a",
                           size_gib=20, status=DiskStatus.IN_USE, instance_id="i-0001"))
        uow.snapshot_groups.add(SnapshotGroup(id="ssg-1", account_id="acc", region_id="r",
                                              instance_id="i-0001", window_ms=12.5))
        uow.snapshots.add(Snapshot(id="s-1", account_id="acc", region_id="r",
                                   source_disk_id="d-1", source_disk_type="data",  # type: ignore[arg-type]
                                   source_disk_size=20, group_id="ssg-1"))
        uow.tasks.add(Task(id="t-1", account_id="acc", region_id="r", action="X",
                           plan={"steps": ["a", "b"]}))
        uow.commit()
    with uow_factory() as uow:
        inst = uow.instances.get("i-0001")
        assert inst.status is InstanceStatus.RUNNING and inst.tags == {"env": "prod"}
        assert uow.disks.get("d-1").status is DiskStatus.IN_USE
        assert uow.snapshot_groups.get("ssg-1").window_ms == 12.5
        assert uow.snapshots.find(group_id="ssg-1")[0].id == "s-1"
        task = uow.tasks.get("t-1")
        task.done.append("a")  # in-place changes of JSON columns are saved
        task.result["x"] = 1
        uow.commit()
    with uow_factory() as uow:
        task = uow.tasks.get("t-1")
        assert task.done == ["a"] and task.result == {"x": 1}


def test_uncommitted_work_is_rolled_back(uow_factory) -> None:  # type: ignore[no-untyped-def]
    with uow_factory() as uow:
        uow.instances.add(make_instance(1))
    with uow_factory() as uow:
        assert uow.instances.get("i-0001") is None


def test_locks_are_exclusive_even_across_threads(uow_factory) -> None:  # type: ignore[no-untyped-def]
    with uow_factory() as uow:
        uow.instances.add(make_instance(1))
        uow.commit()
    winners: list[str] = []

    def grab(task_id: str) -> None:
        with uow_factory() as uow:
            if uow.try_lock("instance", ["i-0001"], task_id) is None:
                winners.append(task_id)
            uow.commit()

    threads = [threading.Thread(target=grab, args=(f"t-{n}",)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1
    with uow_factory() as uow:
        uow.unlock("instance", ["i-0001"], "t-other")  # not the holder: no effect
        assert uow.instances.get("i-0001").lock_task_id == winners[0]
        uow.unlock("instance", ["i-0001"], winners[0])
        uow.commit()
    with uow_factory() as uow:
        assert uow.instances.get("i-0001").lock_task_id is None


def test_several_locks_at_once_name_the_one_refused(uow_factory) -> None:  # type: ignore[no-untyped-def]
    with uow_factory() as uow:
        for n in range(1, 4):
            uow.instances.add(make_instance(n))
        uow.commit()
    with uow_factory() as uow:
        assert uow.try_lock("instance", ["i-0002"], "t-a") is None
        uow.commit()
    with uow_factory() as uow:
        held = uow.instances.get("i-0001")  # held by this session: told without a reload
        assert uow.try_lock("instance", ["i-0001", "i-0002", "i-0003"], "t-b") == "i-0002"
        assert held.lock_task_id == "t-b"
        assert uow.try_lock("instance", ["i-0003", "i-0009"], "t-b") == "i-0009"  # unknown
    with uow_factory() as uow:  # the refused transaction was not committed: nothing taken
        assert [uow.instances.get(f"i-000{n}").lock_task_id for n in (1, 2, 3)] == \
            [None, "t-a", None]
        assert uow.try_lock("instance", ["i-0001", "i-0003"], "t-b") is None
        uow.unlock("instance", ["i-0001", "i-0002", "i-0003"], "t-b")  # only its own
        uow.commit()
    with uow_factory() as uow:
        assert [uow.instances.get(f"i-000{n}").lock_task_id for n in (1, 2, 3)] == \
            [None, "t-a", None]


def test_criteria_and_keyset_pages(uow_factory) -> None:  # type: ignore[no-untyped-def]
    start = utcnow()
    with uow_factory() as uow:
        for n in range(25):
            uow.instances.add(make_instance(n, created=start + timedelta(seconds=n // 2),
                                            tags={"n": str(n % 3)}))
        uow.commit()
    with uow_factory() as uow:
        assert uow.instances.count(account_id="acc") == 25
        assert uow.instances.count(Criteria(wildcard={"name": "web-1*"})) == 11
        assert uow.instances.count(Criteria(within={"id": ["i-0001", "i-0002", "x"]})) == 2
        # lists of IDs (PostgreSQL: one array parameter, = ANY / <> ALL), and enum values
        many = [f"i-{n:04d}" for n in range(0, 25, 2)] + [f"x-{n}" for n in range(200)]
        assert uow.instances.count(Criteria(within={"id": many})) == 13
        assert uow.instances.count(Criteria(without={"id": many})) == 12
        assert uow.instances.count(Criteria(within={"id": []})) == 0
        assert uow.instances.count(Criteria(without={"id": []})) == 25
        assert uow.instances.count(Criteria(within={"id": many}, without={"id": ["i-0000"]})) \
            == 12
        assert uow.instances.count(Criteria(within={"status": ["Running", "Pending"]})) == \
            uow.instances.count(Criteria(without={"status": ["Stopped", "Starting"]}))
        assert uow.instances.count(Criteria(tags={"n": "0"})) == 9
        assert [i.id for i in uow.instances.find(Criteria(tags={"n": "0"}, limit=2,
                                                          offset=1))] == ["i-0021", "i-0018"]
        seen: list[str] = []
        after = None
        for _ in range(20):  # 7 pages; keyset paging that never ends must not hang
            page = uow.instances.find(Criteria(limit=4, after=after))
            if not page:
                break
            seen += [i.id for i in page]
            after = (page[-1].created, page[-1].id)
        else:
            raise AssertionError(f"keyset pages never ended: {seen}")
        assert seen == sorted(seen, reverse=True) and len(set(seen)) == 25
        wild = uow.instances.count(Criteria(wildcard={"name": "web_1"}))
        assert wild == 0  # '_' is a literal, not a SQL wildcard


def test_nonces_are_spent_while_their_key_is_usable(uow_factory) -> None:  # type: ignore[no-untyped-def]
    check_nonces(uow_factory)


def test_read_only_units_of_work_read_the_same_objects(uow_factory) -> None:  # type: ignore[no-untyped-def]
    start = utcnow()
    with uow_factory() as uow:
        for n in range(5):
            uow.instances.add(make_instance(n, tags={"n": str(n)}, created=start,
                                            status=InstanceStatus.RUNNING))
        uow.tasks.add(Task(id="t-1", account_id="acc", region_id="r", action="X",
                           plan={"steps": ["a"]}, done=["a"]))
        uow.commit()
    fields = [f for f in vars(make_instance(0)) if not f.startswith("_")]
    with uow_factory() as uow:
        expected = [{f: getattr(i, f) for f in fields}
                    for i in uow.instances.find(Criteria(limit=3, after=(start, "i-0004")))]
    with uow_factory(readonly=True) as ro:
        found = ro.instances.find(Criteria(limit=3, after=(start, "i-0004")))
        assert [{f: getattr(i, f) for f in fields} for i in found] == expected
        assert [i.id for i in found] == ["i-0003", "i-0002", "i-0001"]
        assert type(found[0]) is Instance and found[0].status is InstanceStatus.RUNNING
        assert ro.instances.get("i-0001").tags == {"n": "1"}
        assert ro.instances.get("nope") is None
        assert ro.tasks.get("t-1").plan == {"steps": ["a"]}
        assert ro.instances.count(Criteria(within={"id": ["i-0001", "x"]})) == 1
        assert ro.instances.find(Criteria(tags={"n": "2"}))[0].id == "i-0002"
        found[0].name = "changed"  # a detached copy: settable, never saved
        with pytest.raises(sql.ReadOnlyError):
            ro.instances.add(make_instance(9))
        with pytest.raises(sql.ReadOnlyError):
            ro.try_lock("instance", ["i-0001"], "t-1")
    with uow_factory() as uow:
        assert uow.instances.get("i-0003").name == "web-3"
        assert uow.instances.count() == 5


def test_enums_are_stored_by_value_and_only_their_members(uow_factory) -> None:  # type: ignore[no-untyped-def]
    """An enum column holds its member's value as a plain string, and reads back as the
    member; a string that is no member's is refused on the way in, and one found in a row
    (written by something else) on the way out."""
    with uow_factory() as uow:
        uow.instances.add(make_instance(1, status=InstanceStatus.RUNNING))
        uow.commit()
    with uow_factory() as uow:
        raw = uow.session.execute(text("SELECT status FROM instances")).scalar()
        assert type(raw) is str and raw == "Running"
        uow.session.execute(text("UPDATE instances SET status = 'Stopped'"))
        uow.commit()
    for readonly in (True, False):
        with uow_factory(readonly=readonly) as uow:
            assert uow.instances.load("i-0001").status is InstanceStatus.STOPPED
    with uow_factory() as uow, pytest.raises(StatementError, match="Sleeping"):
        uow.instances.add(make_instance(2, status="Sleeping"))
        uow.commit()
    with uow_factory() as uow:
        uow.session.execute(text("UPDATE instances SET status = 'Sleeping'"))
        uow.commit()
    for readonly in (True, False):
        with uow_factory(readonly=readonly) as uow, pytest.raises(KeyError, match="Sleeping"):
            uow.instances.load("i-0001")
        # a filter by a value no member has is refused too, before it reaches the database
        # (read-only on PostgreSQL: sql.DriverStatement applies the same bind processing)
        with uow_factory(readonly=readonly) as uow, pytest.raises(LookupError,
                                                                 match="Dozing"):
            try:
                uow.instances.find(status="Dozing")
            except StatementError as exc:  # SQLAlchemy's wrapping of it
                raise exc.orig from exc  # type: ignore[misc]


def test_rows_give_only_the_columns_asked_for(uow_factory) -> None:  # type: ignore[no-untyped-def]
    start = utcnow()
    with uow_factory() as uow:
        for n in range(4):
            uow.instances.add(make_instance(n, created=start, status=InstanceStatus.RUNNING))
        uow.commit()
    for readonly in (True, False):
        with uow_factory(readonly=readonly) as uow:
            rows = uow.instances.rows(("id", "status"),
                                      Criteria(within={"id": ["i-0001", "i-0003", "x"]},
                                               newest_first=False))
            assert [tuple(r) for r in rows] == [("i-0001", InstanceStatus.RUNNING),
                                                ("i-0003", InstanceStatus.RUNNING)]
            assert rows[0].status is InstanceStatus.RUNNING and not hasattr(rows[0], "name")


@pytest.mark.postgres
def test_a_nonce_commit_skips_the_fsync_and_nothing_else_does(
        request: pytest.FixtureRequest) -> None:
    """PostgreSQL: the nonce's transaction commits with synchronous_commit off, set by its
    own INSERT (seen here in a writing unit of work; in a read-only one the INSERT is its
    own transaction); the next transaction on that connection is durable again."""
    engine = sql.make_engine(request.getfixturevalue("postgres").fresh_database())
    sql.migrate(engine)
    factory = sql.session_factory(engine)

    def uow_factory() -> sql.SqlUnitOfWork:
        return sql.SqlUnitOfWork(factory)

    now = utcnow()
    with uow_factory() as uow:
        uow.accounts.add(Account(id="acc", name="acc"))
        uow.access_keys.add(AccessKey(id="k", secret="sealed", account_id="acc"))
        uow.commit()
    with uow_factory() as uow:
        assert uow.spend_nonce("k", "n-sync", now + timedelta(minutes=15), now)
        assert uow.session.execute(text("SHOW synchronous_commit")).scalar() == "off"
        uow.commit()
    with uow_factory() as uow:  # the same pooled connection: its next transaction is durable
        uow.instances.add(make_instance(1))
        assert uow.session.execute(text("SHOW synchronous_commit")).scalar() == "on"
        uow.commit()
    engine.dispose()


@pytest.mark.postgres
def test_a_pooled_connection_dropped_while_idle_is_replaced_unseen(
        request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection the server ended while it sat in the pool (a restart, an idle timeout
    of a proxy) is tested before use once it has been idle a while, and replaced; the
    caller never sees the error."""
    with _store_and_killer(request) as (factory, kill):
        for readonly in (True, False):
            with sql.SqlUnitOfWork(factory, readonly) as uow:
                run = uow.session.execute if uow.connection is None else uow.connection.execute
                pid = run(text("SELECT pg_backend_pid()")).scalar()
            kill(pid)  # while the connection sits in the pool
            monkeypatch.setattr(sql, "PING_AFTER_IDLE_S", 0.0)
            with sql.SqlUnitOfWork(factory, readonly) as uow:
                assert uow.instances.count() == 0
            monkeypatch.setattr(sql, "PING_AFTER_IDLE_S", 2.0)


@contextlib.contextmanager
def _store_and_killer(request: pytest.FixtureRequest) -> Iterator[tuple[Any, Any]]:
    """A migrated store on a fresh PostgreSQL database (its session factory), and a
    function that ends one of its server processes (pg_terminate_backend)."""
    url = request.getfixturevalue("postgres").fresh_database()
    engine = sql.make_engine(url)
    killer = sql.make_engine(url)
    sql.migrate(engine)

    def kill(pid: int) -> None:
        with killer.connect().execution_options(isolation_level="AUTOCOMMIT") as other:
            other.exec_driver_sql(f"SELECT pg_terminate_backend({pid})")

    try:
        yield sql.session_factory(engine), kill
    finally:
        engine.dispose()
        killer.dispose()


@pytest.mark.postgres
def test_a_read_on_a_connection_the_server_ended_fails_once_and_is_replaced(
        request: pytest.FixtureRequest) -> None:
    """Read-only units of work run their statements on the driver (sql.DriverStatement).
    When the server ended the connection under one, the read fails with SQLAlchemy's
    error (its `orig` the driver's), and the connection is invalidated, not given back
    to the pool: the next read works."""
    from sqlalchemy.exc import OperationalError

    with _store_and_killer(request) as (factory, kill):
        with sql.SqlUnitOfWork(factory, True) as uow:
            assert uow.instances.find() == []
            assert uow.connection is not None
            kill(uow.connection.exec_driver_sql("SELECT pg_backend_pid()").scalar())
            with pytest.raises(OperationalError) as failed:
                uow.instances.find()
            assert failed.value.connection_invalidated
        with sql.SqlUnitOfWork(factory, True) as uow:
            assert uow.instances.find() == [] and uow.instances.rows(["id"]) == []


def test_counts_are_exact_after_every_commit(uow_factory,  # type: ignore[no-untyped-def]
                                             request: pytest.FixtureRequest) -> None:
    sqlite = request.node.callspec.params["uow_factory"] == "sqlite"
    def count(**equals: object) -> int:
        with uow_factory(readonly=True) as ro:
            return int(ro.instances.count(Criteria(equals=dict(equals))))

    with uow_factory() as uow:
        uow.instances.add(make_instance(1))
        uow.commit()
    assert count(account_id="acc") == 1 == count(account_id="acc")  # the second is cached
    with uow_factory(readonly=True) as reader:
        assert reader.instances.get("i-0001") is not None  # its snapshot: before the commit
        with uow_factory() as uow:
            uow.instances.add(make_instance(2))
            uow.commit()
        # the reader counts in its own snapshot on SQLite (a read transaction sees the
        # database as it was at its first read); PostgreSQL reads at READ COMMITTED
        old = reader.instances.count(Criteria(equals={"account_id": "acc"}))
        assert old == (1 if sqlite else 2)
        # the reader's old figure did not go into the cache for the others: 2
        assert count(account_id="acc") == 2
    assert count(account_id="acc") == 2
    with uow_factory() as uow:
        uow.instances.get("i-0001").account_id = "other"
        uow.commit()
    assert (count(account_id="acc"), count(account_id="other")) == (1, 1)
    with uow_factory() as uow:
        uow.instances.delete(uow.instances.get("i-0002"))
        uow.commit()
    assert count(account_id="acc") == 0
    with uow_factory() as uow:
        uow.instances.add(make_instance(3))
        assert uow.instances.count(account_id="acc") == 1  # flushed, never committed
        uow.rollback()
    assert count(account_id="acc") == 0


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_migrations_go_down_and_up_again(request: pytest.FixtureRequest, tmp_path: Path,
                                         database: str) -> None:
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import inspect

    url = request.getfixturevalue("postgres").fresh_database() if database == "postgres" \
        else f"sqlite:///{tmp_path / 'm.db'}"
    engine = sql.make_engine(url)

    def owner_index() -> list[str]:
        with engine.connect() as connection:
            found = {i["name"]: i["column_names"]
                     for i in inspect(connection).get_indexes("snapshots")}
        return [str(c) for c in found["ix_snapshots_owner"]]

    sql.migrate(engine)
    assert owner_index() == ["account_id", "region_id", "created", "id"]
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(sql.__file__).parent / "migrations"))
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.downgrade(cfg, "0001")
    assert owner_index() == ["account_id", "region_id", "created"]
    sql.migrate(engine)
    assert owner_index() == ["account_id", "region_id", "created", "id"]
    engine.dispose()


NAMES = ["plain", 'say "hi"', "back\\slash", "a,b", "{braces}", " spaced ", "", "NULL",
         "naïve ✓", "\\\"", "'quoted'"]


def test_lists_of_any_strings_select_exactly_their_rows(uow_factory) -> None:  # type: ignore[no-untyped-def]
    """A list parameter (on PostgreSQL one text in array syntax, sql.TextArray) keeps each
    string one element, whatever it holds: quotes, backslashes, commas, braces, spaces,
    the empty string, the word NULL."""
    with uow_factory() as uow:
        for n, name in enumerate(NAMES):
            instance = make_instance(n)
            instance.name = name
            uow.instances.add(instance)
        uow.commit()
    with uow_factory(readonly=True) as uow:
        for n in range(len(NAMES)):
            wanted = [*NAMES[n:n + 3], "absent", 'absent"', "absent\\"]
            found = {i.name for i in uow.instances.find(Criteria(within={"name": wanted}))}
            assert found == set(NAMES[n:n + 3])
            left = {i.name for i in uow.instances.find(Criteria(without={"name": wanted}))}
            assert left == set(NAMES) - set(wanted)
        # an enum's column and a number's take lists too (read-only: no expanding IN)
        assert uow.instances.count(Criteria(within={"status": ["Pending", "Running"]})) == \
            len(NAMES) == uow.instances.count(Criteria(without={"status": ["Stopped"]}))
        assert uow.instances.count(Criteria(within={"vcpus": [2, 4]})) == len(NAMES)
        assert uow.instances.count(Criteria(without={"vcpus": [2]})) == 0
        assert [r.name for r in uow.instances.rows(["name"], Criteria(
            within={"id": ["i-0001", "i-0002"]}, newest_first=False))] == NAMES[1:3]


def test_snapshot_users_in_one_statement(uow_factory) -> None:  # type: ignore[no-untyped-def]
    """DescribeSnapshots' Usage: the snapshots behind the account's images in the given
    statuses and behind its disks not released, among given IDs or all."""
    from ecsnap.domain.model import Image

    with uow_factory() as uow:
        for n, (status, source) in enumerate([("Available", "s-img"), ("Creating", "s-both"),
                                              ("Deprecated", "s-old"), ("Available", "")]):
            uow.images.add(Image(id=f"m-{n}", account_id="acc", region_id="r", name=f"m{n}",
                                 os_name="x", template_path="t", size_gib=1,
                                 status=status, source_snapshot_id=source))
        uow.images.add(Image(id="m-other", account_id="other", region_id="r", name="o",
                             os_name="x", template_path="t", size_gib=1,
                             status="Available", source_snapshot_id="s-theirs"))
        for n, (released, source) in enumerate([(False, "s-disk"), (False, "s-both"),
                                                 (True, "s-gone"), (False, "")]):
            uow.disks.add(Disk(id=f"d-{n}", account_id="acc", region_id="r", zone_id="r-a",
                               size_gib=20, released=released, source_snapshot_id=source))
        uow.commit()
    with uow_factory(readonly=True) as uow:
        holds = ("Creating", "Available")
        assert uow.snapshot_users("acc", holds, None) == ({"s-img", "s-both"},
                                                          {"s-disk", "s-both"})
        assert uow.snapshot_users("acc", holds, ["s-both", "s-disk", "s-old", "x"]) == \
            ({"s-both"}, {"s-disk", "s-both"})
        assert uow.snapshot_users("acc", holds, []) == (set(), set())
        assert uow.snapshot_users("other", holds, None) == ({"s-theirs"}, set())
        assert uow.snapshot_users("acc", ("Deprecated",), None)[0] == {"s-old"}


def test_statement_listeners_see_every_read(uow_factory) -> None:  # type: ignore[no-untyped-def]
    """`before_cursor_execute` listeners (the benchmarks count statements with one) see
    the statements of read-only units of work too, run on the driver on PostgreSQL."""
    from sqlalchemy import event

    seen: list[str] = []
    with uow_factory(readonly=True) as uow:
        engine = uow.session_factory.kw["bind"]
        listener = lambda *args: seen.append(args[2])  # noqa: E731 (conn, cursor, statement, ...)
        event.listen(engine, "before_cursor_execute", listener)
        try:
            uow.instances.find(Criteria(within={"id": ["i-1"]}))
            uow.instances.rows(["id"])
            uow.snapshot_users("acc", ("Available",), ["s-1"])
        finally:
            event.remove(engine, "before_cursor_execute", listener)
    selects = [s for s in seen if s.startswith("SELECT")]  # (SQLite: BEGIN, PRAGMAs too)
    assert len(selects) == 3
    assert "instances" in selects[0] and "images" in selects[2]


def test_rows_of_every_column_read_as_the_objects_do(uow_factory) -> None:  # type: ignore[no-untyped-def]
    """`rows()` (every column) gives the listings' rows: each field as the object has it
    (enums as members, JSON as dicts, datetimes), and filters by tags as `find` does."""
    start = utcnow()
    with uow_factory() as uow:
        for n in range(6):
            uow.instances.add(make_instance(n, created=start, status=InstanceStatus.RUNNING,
                                            tags={"n": str(n % 2)} if n else {}))
        uow.commit()
    for readonly in (True, False):
        with uow_factory(readonly=readonly) as uow:
            objects = uow.instances.find()
            rows = uow.instances.rows()
            fields = [f for f in vars(make_instance(0)) if not f.startswith("_")]
            assert [{f: getattr(r, f) for f in fields} for r in rows] == \
                [{f: getattr(o, f) for f in fields} for o in objects]
            assert rows[0].status is InstanceStatus.RUNNING and rows[-1].tags == {}
            assert type(rows[1].tags) is dict and rows[1].tags == {"n": "0"}
            wanted = Criteria(tags={"n": "1"}, limit=2, offset=1)
            assert [r.id for r in uow.instances.rows(None, wanted)] == \
                [o.id for o in uow.instances.find(wanted)] == ["i-0003", "i-0001"]
