"""Automatic snapshot policies on PostgreSQL (a throwaway server, tests/pg.py), READ
COMMITTED: two schedulers (two `ecsnap serve` processes: each its own engine) take each time
point of each disk exactly once (service/policies.py, `UnitOfWork.advance_policy_run`).

Real service calls, real qcow2 files; the disks are unattached (storage only, no VM)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from ecsnap import bootstrap, config
from ecsnap.adapters.storage.base import StorageBackend
from ecsnap.service import disks, policies, regions, snapshots
from ecsnap.service.context import ServiceContext
from tests.conftest import ACCOUNT, REGION
from tests.doubles import FileBackedCompute
from tests.pg import PostgresServer

ROOT = Path(__file__).resolve().parents[2]
EVERY_DAY = [str(d) for d in range(1, 8)]
MONDAY_0930 = datetime(2026, 3, 2, 9, 30)  # 2026-03-02 is a Monday


def _build(data_dir: Path, url: str) -> ServiceContext:
    settings = config.load(data_dir, database_url=url, background_tasks=False)
    return bootstrap.build(settings, compute=FileBackedCompute(), background=False)


@pytest.fixture
def pg_url(postgres: PostgresServer) -> str:
    return postgres.fresh_database()


@pytest.fixture
def two(tmp_path: Path, pg_url: str) -> Iterator[tuple[ServiceContext, ServiceContext]]:
    """Two service contexts on one database and one pool: two serve processes' worth."""
    a = _build(tmp_path / "data", pg_url)
    regions.ensure_region(a, REGION, vcpus=8, memory_mib=8192)
    b = _build(tmp_path / "data", pg_url)
    yield a, b
    for ctx in (a, b):
        ctx.extras["engine"].dispose()


def _setup(ctx: ServiceContext, hours: list[str], n_disks: int) -> tuple[str, list[str]]:
    policy_id = policies.create_policy(ctx, ACCOUNT, REGION, time_points=hours,
                                       repeat_weekdays=EVERY_DAY, retention_days=-1,
                                       now=MONDAY_0930)
    disk_ids = [disks.create_disk(ctx, ACCOUNT, REGION, size_gib=20) for _ in range(n_disks)]
    policies.apply_policy(ctx, ACCOUNT, REGION, policy_id, disk_ids, now=MONDAY_0930)
    return policy_id, disk_ids


def _autos(ctx: ServiceContext) -> dict[str, list[str]]:
    """Disk ID -> names of its automatic snapshots."""
    page = snapshots.describe_snapshots(ctx, ACCOUNT, REGION, snapshot_type="auto",
                                        page_size=100)
    found: dict[str, list[str]] = {}
    for snap in page.items:
        found.setdefault(snap.source_disk_id, []).append(snap.name)
    return {d: sorted(n) for d, n in found.items()}


class _PausingStorage:
    """The storage of scheduler A, which stops once inside `_take`'s transaction (at the
    free-space check, after it has read the pair's last run) until told to go on."""

    def __init__(self, inner: StorageBackend) -> None:
        self.inner = inner
        self.inside, self.go = threading.Event(), threading.Event()
        self.armed = True

    def path(self, disk_id: str) -> str:
        if self.armed and threading.current_thread().name == "scheduler-a":
            self.armed = False
            self.inside.set()
            assert self.go.wait(30)
        return self.inner.path(disk_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_scheduler_that_read_the_run_before_another_committed_takes_nothing(
        two: tuple[ServiceContext, ServiceContext]) -> None:
    """The READ COMMITTED interleaving made deterministic: A reads the (policy, disk) run,
    B takes the time point (snapshot journaled, taken and its lock released), then A goes
    on. The claim must refuse A: a read-then-write would take a second snapshot."""
    a, b = two
    _, [disk_id] = _setup(a, ["10"], 1)
    pausing = _PausingStorage(a.storage_of(REGION))
    a.storage_for = lambda pool: pausing
    at = MONDAY_0930 + timedelta(hours=1)
    reports: list[policies.TickReport] = []
    thread = threading.Thread(target=lambda: reports.append(policies.run_due(a, at)),
                              name="scheduler-a")
    thread.start()
    assert pausing.inside.wait(30), "scheduler A never reached the free-space check"
    report_b = policies.run_due(b, at)  # does not wait for A: A has written nothing yet
    assert len(report_b.taken) == 1
    pausing.go.set()
    thread.join(30)
    [report_a] = reports
    assert report_a.taken == []
    assert _autos(b) == {disk_id: ["auto_20260302_1"]}


def test_two_schedulers_racing_in_threads_take_each_time_point_once(
        two: tuple[ServiceContext, ServiceContext]) -> None:
    a, b = two
    _, disk_ids = _setup(a, ["10", "11", "12"], 6)
    taken: list[str] = []
    for hour in (10, 11, 12):
        at = datetime(2026, 3, 2, hour, 0)
        start = threading.Barrier(2)

        def run(ctx: ServiceContext, at: datetime = at,
                start: threading.Barrier = start) -> None:
            start.wait()
            taken.extend(policies.run_due(ctx, at).taken)

        threads = [threading.Thread(target=run, args=(c,)) for c in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        # a disk busy with the other scheduler's task waits for the next tick: one more
        policies.run_due(a, at)
    names = ["auto_20260302_1", "auto_20260302_2", "auto_20260302_3"]
    assert _autos(a) == {d: names for d in disk_ids}


_SCHEDULER = """
import json, sys, time
from datetime import datetime
from pathlib import Path
from ecsnap.service import policies
from tests.service.test_policies_pg import _build
ctx = _build(Path(sys.argv[1]), sys.argv[2])
start = float(sys.argv[4])
time.sleep(max(0.0, start - time.time()))
taken = []
for at in sys.argv[3].split(","):
    taken += policies.run_due(ctx, datetime.fromisoformat(at)).taken
print(json.dumps(taken))
"""


def test_two_scheduler_processes_take_each_time_point_once(tmp_path: Path,
                                                           pg_url: str) -> None:
    ctx = _build(tmp_path / "data", pg_url)
    regions.ensure_region(ctx, REGION, vcpus=8, memory_mib=8192)
    _, disk_ids = _setup(ctx, ["10", "11"], 5)
    times = ",".join(datetime(2026, 3, 2, h, m).isoformat()
                     for h, m in ((10, 0), (10, 1), (11, 0), (11, 1)))
    start = time.time() + 4  # both interpreters up and built by then
    procs = [subprocess.Popen(
        [sys.executable, "-c", _SCHEDULER, str(tmp_path / "data"), pg_url, times, str(start)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)}) for _ in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    taken = [s for out, _ in outs for s in json.loads(out.strip().splitlines()[-1])]
    assert len(taken) == len(set(taken)) == 10
    names = ["auto_20260302_1", "auto_20260302_2"]
    assert _autos(ctx) == {d: names for d in disk_ids}
    ctx.extras["engine"].dispose()
