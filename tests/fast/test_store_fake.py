"""The in-memory unit of work against the SQL store on SQLite: the same calls, the same
answers (transactions, detached objects, identity map, locks, nonces, listings)."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from ecsnap.adapters.store import sql
from ecsnap.adapters.store.base import Criteria, MissingRow, UnitOfWork
from ecsnap.domain.model import (
    IdempotencyKey,
    IdempotencyRecord,
    Instance,
    InstanceStatus,
    Region,
    Task,
    utcnow,
)
from tests.fakes.store import InMemoryStore, WriterBusy
from tests.store.contract import check_nonces

Factory = Callable[..., UnitOfWork]


@pytest.fixture(params=["memory", "sqlite"])
def uow_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Factory]:
    if request.param == "memory":
        yield InMemoryStore(writer_timeout=1.0).unit_of_work
        return
    engine = sql.make_engine(f"sqlite:///{tmp_path / 'store.db'}")
    sql.migrate(engine)
    factory = sql.session_factory(engine)
    yield lambda readonly=False: sql.SqlUnitOfWork(factory, readonly)
    engine.dispose()


def make_instance(n: int, **kw: object) -> Instance:
    inst = Instance(id=f"i-{n:04d}", account_id="acc", region_id="r", zone_id="r-a",
                    instance_type="ecs.g6.large", vcpus=2, memory_mib=8192, image_id="m",
                    name=f"web-{n}")
    for name, value in kw.items():
        setattr(inst, name, value)
    return inst


def add(uow_factory: Factory, *objs: Instance) -> None:
    with uow_factory() as uow:
        for obj in objs:
            uow.instances.add(obj)
        uow.commit()


def test_changes_are_seen_after_commit_only(uow_factory: Factory) -> None:
    add(uow_factory, make_instance(1))
    with uow_factory() as uow:
        uow.instances.load("i-0001").name = "renamed"
        uow.instances.add(make_instance(2))
        with uow_factory(readonly=True) as reader:  # before the commit
            assert reader.instances.load("i-0001").name == "web-1"
            assert reader.instances.get("i-0002") is None
        uow.commit()
    with uow_factory(readonly=True) as reader:
        assert reader.instances.load("i-0001").name == "renamed"
        assert reader.instances.count() == 2


def test_leaving_the_block_without_commit_discards(uow_factory: Factory) -> None:
    add(uow_factory, make_instance(1))
    with uow_factory() as uow:
        uow.instances.load("i-0001").name = "lost"
        uow.instances.add(make_instance(2))
        uow.instances.delete(uow.instances.load("i-0001"))
    with uow_factory() as uow:
        assert uow.instances.load("i-0001").name == "web-1"
        assert uow.instances.get("i-0002") is None
    with uow_factory() as uow:
        uow.instances.add(make_instance(3))
        assert uow.instances.count() == 2  # its own pending work is seen (autoflush)
        uow.rollback()
        assert uow.instances.count() == 1
        uow.commit()
    with uow_factory() as uow, pytest.raises(MissingRow):
        uow.instances.load("i-0003")


def test_objects_are_detached_copies_identity_mapped_per_unit_of_work(
        uow_factory: Factory) -> None:
    add(uow_factory, make_instance(1, tags={"env": "prod"}))
    with uow_factory() as uow:
        first = uow.instances.load("i-0001")
        assert uow.instances.get("i-0001") is first
        assert uow.instances.find(name="web-1")[0] is first
    first.name = "changed after the block"
    first.tags["env"] = "dev"
    with uow_factory() as uow:
        again = uow.instances.load("i-0001")
        assert again is not first and (again.name, again.tags) == ("web-1", {"env": "prod"})
        again.tags["env"] = "test"  # an in-place change of a JSON column is saved
        again.status = "Running"  # type: ignore[assignment]  # a plain string: an enum again
        uow.commit()
    with uow_factory(readonly=True) as reader:
        found = reader.instances.load("i-0001")
        assert found.tags == {"env": "test"} and found.status is InstanceStatus.RUNNING
        assert reader.instances.get("i-0001") is not found  # no identity map when reading


def test_a_stale_object_does_not_overwrite_what_others_committed(uow_factory: Factory) -> None:
    add(uow_factory, make_instance(1))
    with uow_factory() as first:
        mine = first.instances.load("i-0001")
        first.commit()  # the write lock is free again; `mine` stays in this unit of work
        with uow_factory() as second:
            second.instances.load("i-0001").description = "by the second"
            second.commit()
        mine.name = "by the first"
        first.commit()  # only the changed field is written
    with uow_factory(readonly=True) as reader:
        found = reader.instances.load("i-0001")
        assert (found.name, found.description) == ("by the first", "by the second")


def test_read_only_units_of_work_refuse_writes(uow_factory: Factory) -> None:
    add(uow_factory, make_instance(1))
    with uow_factory(readonly=True) as reader:
        found = reader.instances.load("i-0001")
        found.name = "never saved"
        for write in (lambda: reader.instances.add(make_instance(2)),
                      lambda: reader.instances.delete(found),
                      lambda: reader.try_lock("instance", ["i-0001"], "t-1"),
                      lambda: reader.unlock("instance", ["i-0001"], "t-1")):
            with pytest.raises(sql.ReadOnlyError):
                write()
        reader.commit()
    with uow_factory(readonly=True) as reader:
        assert reader.instances.load("i-0001").name == "web-1"


def test_locks(uow_factory: Factory) -> None:
    add(uow_factory, *(make_instance(n) for n in (1, 2, 3)))
    with uow_factory() as uow:
        assert uow.try_lock("instance", ["i-0002"], "t-a") is None
        uow.commit()
    with uow_factory() as uow:
        held = uow.instances.load("i-0001")  # held by this unit of work: told the value
        assert uow.try_lock("instance", ["i-0001", "i-0002", "i-0003"], "t-b") == "i-0002"
        assert held.lock_task_id == "t-b"
        assert uow.try_lock("instance", ["i-0003", "i-0009"], "t-b") == "i-0009"  # unknown
        assert uow.try_lock("instance", ["i-0003"], "t-b") is None  # held already: fine
    with uow_factory() as uow:  # not committed: nothing taken
        assert [uow.instances.load(f"i-000{n}").lock_task_id for n in (1, 2, 3)] == \
            [None, "t-a", None]
        assert uow.try_lock("instance", ["i-0001", "i-0003"], "t-b") is None
        uow.unlock("instance", ["i-0001", "i-0002", "i-0003"], "t-b")  # only its own
        uow.commit()
    with uow_factory() as uow:
        assert [uow.instances.load(f"i-000{n}").lock_task_id for n in (1, 2, 3)] == \
            [None, "t-a", None]
        new = make_instance(4)
        uow.instances.add(new)  # a pending object is flushed, then locked
        assert uow.try_lock("instance", [new.id], "t-c") is None
        assert new.lock_task_id == "t-c"
        uow.commit()
    with uow_factory(readonly=True) as reader:
        assert reader.instances.load("i-0004").lock_task_id == "t-c"


def test_locks_are_exclusive_across_threads(uow_factory: Factory) -> None:
    add(uow_factory, make_instance(1))
    winners: list[str] = []

    def grab(task_id: str) -> None:
        with uow_factory() as uow:
            if uow.try_lock("instance", ["i-0001"], task_id) is None:
                winners.append(task_id)
            uow.commit()

    threads = [threading.Thread(target=grab, args=(f"t-{n}",)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1


def test_nonces(uow_factory: Factory) -> None:
    check_nonces(uow_factory)


def test_idempotency_records_are_keyed(uow_factory: Factory) -> None:
    key = IdempotencyKey("acc", "RunInstances", "token-1")
    with uow_factory() as uow:
        uow.idempotency.add(IdempotencyRecord("acc", "RunInstances", "token-1", "digest"))
        uow.commit()
    with uow_factory() as uow:
        record = uow.idempotency.load(key)
        assert uow.idempotency.get(key) is record
        assert uow.idempotency.get(IdempotencyKey("acc", "CreateDisk", "token-1")) is None
        record.response = {"InstanceIds": ["i-1"]}
        uow.commit()
    with uow_factory() as uow:
        assert uow.idempotency.load(key).response == {"InstanceIds": ["i-1"]}
        uow.idempotency.delete(uow.idempotency.load(key))
        uow.commit()
    with uow_factory() as uow, pytest.raises(MissingRow):
        uow.idempotency.load(key)


def test_regions_have_no_created_column(uow_factory: Factory) -> None:
    with uow_factory() as uow:
        for name in ("b", "a", "c"):
            uow.regions.add(Region(id=name, local_name=name, vcpu_capacity=1,
                                   memory_mib_capacity=1, storage_pool="/p"))
        uow.commit()
    with uow_factory(readonly=True) as reader:
        assert sorted(r.id for r in reader.regions.find()) == ["a", "b", "c"]
        assert reader.regions.count(Criteria(limit=1)) == 3  # counts ignore the page


def test_tasks_keep_their_json(uow_factory: Factory) -> None:
    with uow_factory() as uow:
        uow.tasks.add(Task(id="t-1", account_id="acc", region_id="r", action="X",
                           plan={"steps": ["a", "b"]}))
        uow.commit()
    with uow_factory() as uow:
        task = uow.tasks.load("t-1")
        task.done.append("a")
        task.result["x"] = 1
        uow.commit()
    with uow_factory(readonly=True) as reader:
        task = reader.tasks.load("t-1")
        assert (task.plan, task.done, task.result) == ({"steps": ["a", "b"]}, ["a"], {"x": 1})


def test_an_unknown_column_is_an_error(uow_factory: Factory) -> None:
    with uow_factory(readonly=True) as reader, pytest.raises(KeyError):
        reader.instances.find(Criteria(equals={"no_such_column": 1}))


def test_a_second_writer_in_one_thread_is_refused_at_once() -> None:
    store = InMemoryStore()
    with store.unit_of_work() as first:
        first.instances.count()  # the first statement takes the write lock
        with store.unit_of_work() as second, pytest.raises(WriterBusy):
            second.instances.count()
        first.commit()
        with store.unit_of_work() as third:  # free again after the commit
            assert third.instances.count() == 0


# ------------------------------------------------------------------ listings, compared


def _rows(seed: int) -> list[Instance]:
    rng = random.Random(seed)
    start = utcnow()
    rows = []
    for n in range(40):
        rows.append(make_instance(
            n, created=start + timedelta(seconds=rng.randrange(6)),  # many ties
            name=rng.choice(["web-1", "web-12", "web_1", "db-1", "w%b", "a\\b", "api"]),
            status=rng.choice(list(InstanceStatus)),
            lock_task_id=rng.choice([None, None, "t-1"]),
            account_id=rng.choice(["acc", "other"]),
            tags=rng.choice([{}, {"env": "prod"}, {"env": "dev"}, {"env": "", "x": "1"}])))
    return rows


def _criteria(rng: random.Random, rows: list[Instance]) -> Criteria:
    c = Criteria(newest_first=rng.random() < 0.5)
    if rng.random() < 0.4:
        c.equals["account_id"] = rng.choice(["acc", "other"])
    if rng.random() < 0.2:
        c.equals["lock_task_id"] = rng.choice([None, "t-1"])
    if rng.random() < 0.3:
        c.within["status"] = rng.sample([s.value for s in InstanceStatus], 2)
    if rng.random() < 0.2:
        c.within["id"] = [r.id for r in rng.sample(rows, 5)] + ["i-none"]
    if rng.random() < 0.3:
        c.wildcard["name"] = rng.choice(["web*", "*1", "web_1", "w%b", "a\\b", "*", "*-*"])
    if rng.random() < 0.3:
        c.created_from = rng.choice(rows).created
    if rng.random() < 0.3:
        c.created_to = rng.choice(rows).created
    if rng.random() < 0.3:
        c.tags = rng.choice([{"env": "prod"}, {"env": ""}, {"x": "1"}])
    if rng.random() < 0.4:
        pivot = rng.choice(rows)
        c.after = (pivot.created, pivot.id)
    if rng.random() < 0.4:
        c.offset = rng.randrange(5)
    if rng.random() < 0.6:
        c.limit = rng.randrange(1, 12)
    return c


def test_listings_and_counts_match_sqlite(tmp_path: Path) -> None:
    rows = _rows(7)
    engine = sql.make_engine(f"sqlite:///{tmp_path / 'store.db'}")
    sql.migrate(engine)
    factory = sql.session_factory(engine)
    memory = InMemoryStore()
    for uow_factory in (memory.unit_of_work,
                        lambda readonly=False: sql.SqlUnitOfWork(factory, readonly)):
        add(uow_factory, *(replace(r) for r in rows))
    rng = random.Random(11)
    try:
        for _ in range(300):
            criteria = _criteria(rng, rows)
            with memory.unit_of_work(readonly=True) as fake, \
                    sql.SqlUnitOfWork(factory, readonly=True) as real:
                assert [i.id for i in fake.instances.find(criteria)] == \
                    [i.id for i in real.instances.find(criteria)], criteria
                assert fake.instances.count(criteria) == real.instances.count(criteria), \
                    criteria
    finally:
        engine.dispose()
