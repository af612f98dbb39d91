"""Benchmark 5, the scale of the metadata: 10,000 snapshot groups (30,000 snapshots) and
1,000 instances in the store; p50/p99 latency and requests/s of DescribeSnapshotGroups
(NextToken walk, pages of 100), DescribeInstances and DescribeSnapshots under a bounded
loopback load, SQLite and PostgreSQL side by side."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.run import Server


def seed_metadata(server: Server, groups: int, instances: int) -> None:
    """Rows straight into the store (the API would take hours to make them)."""
    from datetime import timedelta

    from ecsnap.domain import ids
    from ecsnap.domain.model import (
        Instance,
        InstanceStatus,
        Snapshot,
        SnapshotGroup,
        SnapshotStatus,
        StoppedMode,
        utcnow,
    )

    start = utcnow() - timedelta(days=30)
    ctx, account = server.ctx, server.account_id
    for batch in range(0, groups, 1000):
        with ctx.uow() as uow:
            for n in range(batch, min(groups, batch + 1000)):
                when = start + timedelta(seconds=n)
                inst = f"i-bench{n % instances:014d}"
                g = SnapshotGroup(id=ids.new_id("snapshot_group"), account_id=account,
                                  region_id="local-1", instance_id=inst, created=when,
                                  status=SnapshotStatus.ACCOMPLISHED)
                uow.snapshot_groups.add(g)
                for k in range(3):
                    uow.snapshots.add(Snapshot(
                        id=ids.new_id("snapshot"), account_id=account, region_id="local-1",
                        source_disk_id=f"d-bench{n % instances:06d}{k}",
                        source_disk_type="data", source_disk_size=20,  # type: ignore[arg-type]
                        instance_id=inst, group_id=g.id, created=when,
                        status=SnapshotStatus.ACCOMPLISHED, progress=100))
            uow.commit()
    with ctx.uow() as uow:
        for n in range(instances):
            uow.instances.add(Instance(
                id=f"i-bench{n:014d}", account_id=account, region_id="local-1",
                zone_id="local-1-a", instance_type="ecs.t5-lc2m1.nano", vcpus=1,
                memory_mib=512, image_id=server.image, name=f"bench-{n}",
                status=InstanceStatus.STOPPED, stopped_mode=StoppedMode.STOP_CHARGING,
                created=start + timedelta(seconds=n)))
        uow.commit()


def load(server: Server, request: Callable[[Any], None], seconds: float,
         clients: int) -> tuple[list[float], float]:
    latencies: list[float] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def worker() -> None:
        api = server.client()
        mine = []
        while time.monotonic() < stop_at:
            start = time.perf_counter()
            request(api)
            mine.append(time.perf_counter() - start)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, len(latencies) / (time.monotonic() - began)


def bench_scale(server: Server, seconds: float, clients: int) -> dict[str, tuple[float, float,
                                                                                  float]]:
    def walk(api: Any) -> None:
        token = None
        for _ in range(5):  # five pages deep, each a request of its own
            body = api.call("DescribeSnapshotGroups", {"MaxResults": 100, "NextToken": token})
            token = body["NextToken"]

    requests = {
        "DescribeSnapshotGroups (5 pages of 100)": walk,
        "DescribeInstances (page of 100)": lambda api: api.call("DescribeInstances",
                                                               {"PageSize": 100}),
        "DescribeSnapshots (page of 100)": lambda api: api.call("DescribeSnapshots",
                                                               {"PageSize": 100}),
    }
    results = {}
    for name, request in requests.items():
        latencies, rps = load(server, request, seconds, clients)
        if "5 pages" in name:
            latencies = [x / 5 for x in latencies]
            rps *= 5
        q = statistics.quantiles(latencies, n=100)
        results[name] = (q[49] * 1000, q[98] * 1000, rps)
    return results



def scale_section(scale: dict[str, dict[str, tuple[float, float, float]]], groups: int,
                  instances: int, clients: int) -> list[str]:
    from bench.run import row

    lines: list[str] = []
    lines += [f"## 5. Metadata scale: {groups:,} snapshot groups ({groups * 3:,} "
              f"snapshots), {instances:,} instances; {clients} concurrent clients", "",
              row("request", "database", "p50", "p99", "requests/s", "p99 ≤ 20 ms"),
              row(*["---"] * 6)]
    for db, results in scale.items():
        for name, (p50, p99, rps) in results.items():
            lines.append(row(name, db, f"{p50:.1f} ms", f"{p99:.1f} ms", f"{rps:.0f}",
                             "yes" if p99 <= 20 else "no"))
    lines.append("")
    return lines
