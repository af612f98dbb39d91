"""Benchmark 5, the scale of the metadata: 10,000 snapshot groups (30,000 snapshots) and
1,000 instances in the store; p50/p99 latency and requests/s of DescribeSnapshotGroups
(NextToken walk, pages of 100), DescribeInstances and DescribeSnapshots under a bounded
loopback load, SQLite and PostgreSQL side by side; at 1 client (the service latency) and
at N concurrent clients (contended); each beside its reference, the bare SQL of the same
answer straight from the database (BareSql), by the same clients for the same time.

The load generator is a set of worker processes (not threads: the GIL would make the
clients queue behind each other and be measured as server latency), each with one
keep-alive HTTP connection, signing every request with ecsnap's own RPC v1 signer (a
fresh nonce each time, as the SDKs do). Its CPU time and the server's are measured too
and reported per request: on a small machine they share the cores."""

from __future__ import annotations

import http.client
import json
import multiprocessing
import os
import queue
import re
import resource
import statistics
import time
import urllib.parse
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from bench.run import Server

PAGES = 5  # DescribeSnapshotGroups walks five pages deep, each a request of its own
REQUESTS = {
    "DescribeSnapshotGroups (5 pages of 100)": "groups",
    "DescribeInstances (page of 100)": "instances",
    "DescribeSnapshots (page of 100)": "snapshots",
}
BARE = "bare SQL: "  # results[BARE + key]: the reference of results[key]
CPU_KEY = "load generator CPU"  # results[f"{CPU_KEY} @{n}"] = (client, server ms/request, -)
_NEXT_TOKEN = re.compile(rb'"NextToken":"([A-Za-z0-9_=-]*)"')


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
    engine = ctx.extras["engine"]
    if engine.dialect.name == "postgresql":
        # what autovacuum does within a minute of such a bulk load (statistics, visibility
        # map); the benchmark measures seconds after it
        from sqlalchemy import text

        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))


# ------------------------------------------------------------------ the load generator


class LeanClient:
    """One keep-alive connection; every request signed (RPC v1, fresh nonce) like ApiClient
    does, without httpx's per-request overhead (~2 ms of CPU here)."""

    def __init__(self, creds: dict[str, str]) -> None:
        url = urllib.parse.urlsplit(creds["Endpoint"])
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        self.key, self.secret = creds["AccessKeyId"], creds["AccessKeySecret"]
        self.region = creds.get("RegionId", "local-1")
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)

    def call(self, action: str, params: dict[str, Any]) -> bytes:
        """The raw JSON body of a successful answer (parsing 60 KiB of JSON would cost the
        load generator ~1 ms a page; the benchmark only needs NextToken: `next_token`)."""
        from ecsnap.entrypoints.api.signature import rpc_v1_request_params

        values = {"RegionId": self.region,
                  **{k: str(v) for k, v in params.items() if v is not None}}
        query = urllib.parse.urlencode(rpc_v1_request_params(action, values, self.key,
                                                             self.secret))
        for attempt in (1, 2):
            try:
                self.conn.request("POST", f"/?{query}", headers={"Content-Length": "0"})
                response = self.conn.getresponse()
                body = response.read()
                break
            except (ConnectionError, http.client.HTTPException):
                self.conn.close()  # the server closed a keep-alive connection: reconnect
                if attempt == 2:
                    raise
        if response.status != 200:
            raise RuntimeError(f"{action}: {response.status} {body[:500]!r}")
        return body


def next_token(body: bytes) -> str:
    found = _NEXT_TOKEN.search(body)
    return found.group(1).decode() if found else str(json.loads(body)["NextToken"])


def _request(kind: str) -> Callable[[LeanClient], None]:
    def groups(api: LeanClient) -> None:
        token = None
        for _ in range(PAGES):
            token = next_token(api.call("DescribeSnapshotGroups", {"MaxResults": 100,
                                                                   "NextToken": token}))

    def instances(api: LeanClient) -> None:
        api.call("DescribeInstances", {"PageSize": 100})

    def snapshots(api: LeanClient) -> None:
        api.call("DescribeSnapshots", {"PageSize": 100})

    return {"groups": groups, "instances": instances, "snapshots": snapshots}[kind]


class BareSql:
    """The reference: the same answers straight from the database, the statements ecsnap's
    store runs for them (the page, its total count; for the groups, each page's members),
    as text SQL on one connection, rows fetched; no HTTP, no signature, no objects, no
    rendering."""

    def __init__(self, target: dict[str, str]) -> None:
        from sqlalchemy import bindparam, create_engine, text

        self.conn = create_engine(target["url"]).connect()
        self.owner = {"account": target["account"], "region": target["region"]}
        where = "WHERE account_id = :account AND region_id = :region"
        order = "ORDER BY created DESC, id DESC"
        self.page = {t: text(f"SELECT * FROM {t} {where} {order} LIMIT 100")
                     for t in ("instances", "snapshots")}
        self.count = {t: text(f"SELECT count(*) FROM {t} {where}")
                      for t in ("instances", "snapshots")}
        self.first = text(f"SELECT * FROM snapshot_groups {where} {order} LIMIT 101")
        self.after = text(f"SELECT * FROM snapshot_groups {where} AND (created < :created OR "
                          f"(created = :created AND id < :id)) {order} LIMIT 101")
        self.members = text("SELECT * FROM snapshots WHERE group_id IN :ids "
                            "ORDER BY created, id").bindparams(bindparam("ids", expanding=True))

    def call(self, kind: str) -> None:
        with self.conn.begin():  # one read transaction per request, as ecsnap's
            if kind in self.page:
                self.conn.execute(self.page[kind], self.owner).all()
                self.conn.execute(self.count[kind], self.owner).scalar()
                return
            last = None
            for _ in range(PAGES):  # a walk that runs out starts over, as the API's does
                rows = self.conn.execute(self.first if last is None else self.after,
                                         {**self.owner, **(last or {})}).all()
                self.conn.execute(self.members, {"ids": [r.id for r in rows[:100]]}).all()
                last = {"created": rows[99].created, "id": rows[99].id} \
                    if len(rows) > 100 else None


def _worker(target: dict[str, str], kind: str, seconds: float, ready: Any, go: Any,
            out: Any) -> None:
    """Issues `kind` back to back: to ecsnap's API (`target`: credentials and endpoint) or,
    for the reference, to the database (`target`: its URL and the owner of the rows)."""
    call: Callable[[], None] = partial(BareSql(target).call, kind) if "url" in target else \
        partial(_request(kind), LeanClient(target))
    for _ in range(3):  # warm: connection up, server caches filled
        call()
    ready.release()
    go.wait()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    latencies: list[float] = []
    stop_at = time.monotonic() + seconds
    while time.monotonic() < stop_at:
        start = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - start)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    out.put((latencies, cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime))


def _process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(server: Server, kind: str, seconds: float, clients: int,
         bare: bool = False) -> tuple[list[float], float, float, float]:
    """(latencies per request, requests/s, load generator CPU s, server CPU s) of `clients`
    worker processes issuing `kind` back to back for `seconds`; with `bare`, the reference
    (BareSql) instead of ecsnap's API."""
    target = json.loads((server.data_dir / "credentials.json").read_text())
    if bare:
        engine = server.ctx.extras["engine"]
        target = {"url": engine.url.render_as_string(hide_password=False),
                  "account": server.account_id, "region": "local-1"}
    return run_load([target], [server.proc.pid], kind, seconds, clients)


def run_load(targets: list[dict[str, str]], pids: list[int], kind: str, seconds: float,
             clients: int) -> tuple[list[float], float, float, float]:
    """(latencies per request, requests/s, load generator CPU s, CPU s of the processes
    `pids`) of `clients` worker processes issuing `kind` back to back for `seconds`, spread
    in turn over `targets` (several API processes: as a round-robin proxy would)."""
    mp = multiprocessing.get_context("spawn")  # nothing of this process (engine, pool)
    ready, go, out = mp.Semaphore(0), mp.Event(), mp.Queue()
    workers = [mp.Process(target=_worker, args=(targets[n % len(targets)], kind, seconds,
                                                ready, go, out)) for n in range(clients)]
    for w in workers:
        w.start()
    deadline = time.monotonic() + 120
    for _ in workers:
        while not ready.acquire(timeout=0.5):
            if time.monotonic() > deadline or any(w.exitcode is not None for w in workers):
                _failed(workers)
    server_cpu = sum(_process_cpu(pid) for pid in pids)
    began = time.monotonic()
    go.set()
    latencies: list[float] = []
    client_cpu = 0.0
    for _ in workers:
        try:
            mine, cpu = out.get(timeout=seconds + 60)
        except queue.Empty:
            _failed(workers)
        latencies += mine
        client_cpu += cpu
    elapsed = time.monotonic() - began
    server_cpu = sum(_process_cpu(pid) for pid in pids) - server_cpu
    for w in workers:
        w.join()
    if kind == "groups":
        latencies = [x / PAGES for x in latencies for _ in range(PAGES)]
    return latencies, len(latencies) / elapsed, client_cpu, server_cpu


def _failed(workers: list[Any]) -> NoReturn:
    """A worker that died (its traceback is on stderr) would leave the run waiting."""
    codes = [w.exitcode for w in workers]
    for w in workers:
        w.kill()
    raise RuntimeError(f"a load generator process failed or hung (exit codes {codes})")


def bench_scale(server: Server, seconds: float, clients: int) -> dict[str, tuple[float, float,
                                                                                  float]]:
    """{f"{request} @{n}": (p50 ms, p99 ms, requests/s)} for n = 1 and `clients`, and
    {f"{CPU_KEY} @{n}": (load generator ms CPU/request, server ms CPU/request, 0)}."""
    results = {}
    for n in sorted({1, clients}):
        client_cpu = server_cpu = 0.0
        count = 0
        for name, kind in REQUESTS.items():
            latencies, rps, client, served = load(server, kind, seconds, n)
            client_cpu += client
            server_cpu += served
            count += len(latencies)
            results[f"{name} @{n}"] = _percentiles(latencies, rps)
            latencies, rps, _, _ = load(server, kind, seconds, n, bare=True)
            results[f"{BARE}{name} @{n}"] = _percentiles(latencies, rps)
        results[f"{CPU_KEY} @{n}"] = (client_cpu / count * 1000, server_cpu / count * 1000,
                                      0.0)
    return results


def _percentiles(latencies: list[float], rps: float) -> tuple[float, float, float]:
    """(p50 ms, p99 ms, requests/s)"""
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return q[49] * 1000, q[98] * 1000, rps


def scale_section(scale: dict[str, dict[str, tuple[float, float, float]]], groups: int,
                  instances: int, clients: int) -> list[str]:
    from bench.run import row

    lines: list[str] = []
    lines += [f"## 5. Metadata scale: {groups:,} snapshot groups ({groups * 3:,} "
              f"snapshots), {instances:,} instances; 1 and {clients} concurrent clients", "",
              row("request", "database", "clients", "p50", "p99", "requests/s",
                  "bare SQL p50", "bare SQL p99", "bare SQL requests/s",
                  "ratio of p50s", "p99 ≤ 20 ms"),
              row(*["---"] * 11)]
    method = []
    for db, results in scale.items():
        for key, (p50, p99, rps) in results.items():
            if key.startswith(BARE):
                continue
            name, _, n = key.rpartition(" @")
            if name == CPU_KEY:
                total = p50 + p99
                method.append(f"{db}, {n} client{'s' if n != '1' else ''}: load generator "
                              f"{p50:.2f} ms CPU per request, server {p99:.2f} ms "
                              f"(the load generator's share of the CPU: "
                              f"{100 * p50 / total if total else 0:.0f}%)")
                continue
            b50, b99, brps = results[BARE + key]
            lines.append(row(name, db, n, f"{p50:.1f} ms", f"{p99:.1f} ms", f"{rps:.0f}",
                             f"{b50:.1f} ms", f"{b99:.1f} ms", f"{brps:.0f}",
                             f"{p50 / b50:.1f}", "yes" if p99 <= 20 else "no"))
    lines += ["", "Method: the load generator runs on the same machine, over loopback: one "
              "process per client, each with one keep-alive connection, each request signed "
              "(RPC v1, fresh nonce) and answered before the next; a page of "
              "DescribeSnapshotGroups counts as one request (the walk's time / 5). 1 client "
              "is the service latency; with more clients the requests queue in the one "
              "server process. The reference, measured right after each ecsnap row with the "
              "same clients and time: the bare SQL of the same answer (the page and its "
              "total count; for the groups each page's member snapshots too) as text "
              "statements on one database connection per client, rows fetched, without "
              "HTTP, signature, objects or rendering; SQLite's clients read the file "
              "side by side, in their own processes. The rows are seeded straight into the "
              "store; PostgreSQL then gets the VACUUM ANALYZE autovacuum would run within a "
              "minute. CPU per ecsnap request (user + system, from the processes' own "
              "counters):", ""]
    lines += [f"- {m}" for m in method]
    lines.append("")
    return lines
