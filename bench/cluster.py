"""Benchmark 8, the cluster (issue 14), side by side in one run on one throwaway PostgreSQL:

1. Describe* under load: 4 concurrent clients against TWO `ecsnap serve` processes in
   cluster mode (2 clients each) vs the same 4 clients against ONE `ecsnap serve` of the
   single-process build, each on its own database of the same PostgreSQL server seeded
   with the same 10,000 snapshot groups (30,000 snapshots) and 1,000 instances
   (bench/scale.py's seed, load generator and requests); p50/p99, requests/s and the
   servers' CPU per request, taking turns A B B A.
2. Dispatch overhead: CreateSnapshotGroup of a stopped 3-disk instance, timed until its
   task has ended (as bench 1 times it), through API -> PostgreSQL queue -> agent vs the
   same call on the single-process build, alternating which goes first.
3. Fencing: an instance Running (a real QEMU, TCG) with its disks on Ceph RBD (a throwaway
   single-node cluster, tests/ceph.py) on one of three agents; SIGSTOP of that agent ->
   its host Fenced by a peer, which marks the instance Stopped and journals its
   StartInstance in one commit (the automatic restart: no call) -> Running on another
   host; the parts reported. Then SIGCONT: the old agent finds itself fenced, stops its
   stale VM and rejoins (waited for outside the timing). `--no-ceph`: a qcow2 region
   instead (the instance is pinned to its host and stays Stopped: the fence alone is
   measured, then StartInstance brings it back on its host after the rejoin).

Usage: python -m bench.cluster [--groups 10000] [--seconds 10] [--clients 4]
       [--repeats 20] [--fence-repeats 3] [--host-timeout 10] [--heartbeat 1]
       [--no-ceph] [--only describe,dispatch,fence] [--out FILE]
       python -m bench.cluster --smoke   (tiny sizes: what the smoke test runs)
       python -m bench.cluster --against DIR/src   (Describe* only: this tree against
           another build side by side, e.g. a `git worktree add DIR COMMIT`)
Prints the markdown section ("## 8. Cluster"); --out writes it to FILE too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from bench.run import Series, alternate, machine, row
from bench.scale import (
    REQUESTS,
    LeanClient,
    _percentiles,
    run_load,
    seed_metadata,
)

ROOT = Path(__file__).parents[1]
REGION = "local-1"
CEPH_REGION = "ceph-1"


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(ok: Callable[[], object], timeout: float, what: str, poll: float = 0.02) -> float:
    """Polls `ok` until true; the monotonic time it was first seen true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ok():
            return time.monotonic()
        time.sleep(poll)
    raise RuntimeError(f"timed out after {timeout} s waiting for {what}")


class Deployment:
    """A data directory on a database of the benchmark's PostgreSQL: the single-process
    build (`cluster` False: one `ecsnap serve` with its embedded agent) or a cluster (API
    processes and agents, each a child process). `ctx` is an in-process build on the same
    database (not clustered, no background work) for seeding and for reading state."""

    def __init__(self, data_dir: Path, database_url: str, *, cluster: bool,
                 heartbeat_s: float = 1.0, host_timeout_s: float = 10.0) -> None:
        from ecsnap import bootstrap, config
        from ecsnap.domain.model import QUOTA_KINDS
        from ecsnap.service import accounts, images, setup

        self.data_dir, self.cluster = data_dir, cluster
        data_dir.mkdir(parents=True)
        (data_dir / "config.json").write_text(json.dumps({
            "database_url": database_url, "cluster": cluster, "accel": "tcg",
            "heartbeat_s": heartbeat_s, "host_timeout_s": host_timeout_s}))
        settings = config.load(data_dir, cluster=False, background_tasks=False,
                               region_vcpus=100000, region_memory_mib=100000000)
        self.ctx = bootstrap.build(settings, background=False)
        done = setup.initialise(self.ctx, REGION)
        self.account_id = done.account.id
        # the seed's 1,000 instances and 30,000 snapshots are past the default quotas
        accounts.set_quotas(self.ctx, done.account.name, {k: -1 for k in QUOTA_KINDS})
        self.template = data_dir / "template.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(self.template), "1G"],
                       check=True)
        self.image = images.register_image(self.ctx, REGION, name="bench", os_name="bench",
                                           template=self.template, size_gib=1).id
        self.creds = {"AccessKeyId": done.access_key.id,
                      "AccessKeySecret": done.access_key.secret, "RegionId": REGION,
                      "Endpoint": ""}
        (data_dir / "credentials.json").write_text(json.dumps(self.creds))
        self.apis: list[tuple[subprocess.Popen[bytes], dict[str, str]]] = []
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {**os.environ, "ECSNAP_ACCEL": "tcg"}

    # ------------------------------------------------------------ processes

    def api(self) -> LeanClient:
        port = _port()
        creds = {**self.creds, "Endpoint": f"http://127.0.0.1:{port}/"}
        log = (self.data_dir / f"serve-{len(self.apis)}.log").open("ab")
        proc = subprocess.Popen([sys.executable, "-m", "ecsnap", "serve", "--data-dir",
                                 str(self.data_dir), "--listen", f"127.0.0.1:{port}"],
                                cwd=ROOT, env=self.env, stdout=log, stderr=log)
        self.apis.append((proc, creds))
        client = LeanClient(creds)

        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"ecsnap serve exited: see {log.name}")
            with contextlib.suppress(Exception):
                client.call("DescribeRegions", {})
                return True
            return False

        _wait(up, 90, "ecsnap serve", poll=0.2)
        return client

    def agent(self, host_id: str) -> subprocess.Popen[bytes]:
        log_path = self.data_dir / f"agent-{host_id}.log"
        before = log_path.read_text(errors="replace").count("joined under epoch") \
            if log_path.exists() else 0
        log = log_path.open("ab")
        proc = subprocess.Popen([sys.executable, "-m", "ecsnap", "agent", "--host-id", host_id,
                                 "--data-dir", str(self.data_dir), "--vcpus", "8",
                                 "--memory-mib", "8192"],
                                cwd=ROOT, env=self.env, stdout=log, stderr=log)
        self.agents[host_id] = proc
        self.joined(host_id, before + 1)
        return proc

    def joined(self, host_id: str, times: int, timeout: float = 90) -> None:
        log = self.data_dir / f"agent-{host_id}.log"

        def ok() -> bool:
            if self.agents[host_id].poll() is not None:
                raise RuntimeError(f"agent {host_id} exited: see {log}")
            return log.read_text(errors="replace").count("joined under epoch") >= times

        _wait(ok, timeout, f"agent {host_id} joined", poll=0.1)

    def server_pids(self) -> list[int]:
        return [p.pid for p, _ in self.apis]

    def stop(self) -> None:
        for proc in [p for p, _ in self.apis] + list(self.agents.values()):
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
        for proc in [p for p, _ in self.apis] + list(self.agents.values()):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for pidfile in (self.data_dir / "run").glob("*/*/*.pid"):  # the agents' VMs
            with contextlib.suppress(ValueError, OSError):
                os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)
        self.ctx.extras["engine"].dispose()

    # ------------------------------------------------------------ reading state

    def instance(self, instance_id: str) -> Any:
        with self.ctx.uow(readonly=True) as uow:
            return uow.instances.load(instance_id)

    def host(self, host_id: str) -> Any:
        with self.ctx.uow(readonly=True) as uow:
            return uow.hosts.get(host_id)


def call(api: LeanClient, action: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    return dict(json.loads(api.call(action, params or {})))


def wait_task(api: LeanClient, task_id: str) -> None:
    while True:
        task = call(api, "DescribeTaskAttribute", {"TaskId": task_id})
        if task["TaskStatus"] != "Processing":
            if task["TaskStatus"] != "Finished":
                raise RuntimeError(task)
            return
        time.sleep(0.005)


def wait_status(api: LeanClient, instance_id: str, status: str, region: str = REGION,
                timeout: float = 120) -> float:
    def ok() -> bool:
        found = call(api, "DescribeInstances", {"InstanceIds": json.dumps([instance_id]),
                                                "RegionId": region})
        return bool(found["Instances"]["Instance"][0]["Status"] == status)

    return _wait(ok, timeout, f"{instance_id} {status}", poll=0.05)


# ------------------------------------------------------------------ 1. Describe* under load


def load(targets: list[dict[str, str]], pids: list[int], kind: str, seconds: float,
         clients: int) -> tuple[list[float], float, float]:
    """(latencies, requests/s, servers' CPU s) of `clients` load generator processes
    (bench/scale.py's), spread in turn over the API processes' `targets`."""
    latencies, rps, _client_cpu, cpu = run_load(targets, pids, kind, seconds, clients)
    return latencies, rps, cpu


@dataclass
class Loaded:
    latencies: list[float] = field(default_factory=list)
    requests: int = 0
    elapsed: float = 0.0
    cpu: float = 0.0


def bench_describe(single: Deployment, clustered: Deployment, seconds: float, clients: int,
                   rounds: int = 2, names: tuple[str, str] = ("single", "cluster"),
                   ) -> dict[str, dict[str, Loaded]]:
    """{request: {"single"|"cluster": Loaded}} (`names`), A B B A over `rounds` (each round
    measures both builds for `seconds`, in turns which goes first)."""
    sides = dict(zip(names, (single, clustered), strict=True))
    out: dict[str, dict[str, Loaded]] = {}
    for name, kind in REQUESTS.items():
        out[name] = {s: Loaded() for s in sides}
        for r in range(rounds):
            order = list(names) if r % 2 == 0 else list(reversed(names))
            for side in order:
                dep = sides[side]
                latencies, rps, cpu = load([c for _, c in dep.apis], dep.server_pids(), kind,
                                           seconds, clients)
                got = out[name][side]
                got.latencies += latencies
                got.requests += len(latencies)
                got.elapsed += len(latencies) / rps
                got.cpu += cpu
            print(f"  {name} round {r}: " + ", ".join(
                f"{s} p99 {_percentiles(out[name][s].latencies, 1)[1]:.1f} ms"
                for s in order), file=sys.stderr, flush=True)
    return out


def compare_builds(root: Path, pg: Any, against: Path, groups: int, seconds: float,
                   clients: int) -> str:
    """Describe* of this tree against another build (`against`: the `src` directory of a
    checkout, e.g. `git worktree add /tmp/before COMMIT`), each as two API processes in
    cluster mode on its own database of `pg`, seeded alike; A B B A. A markdown table."""
    builds = []
    for name, src in (("before", against), ("this", ROOT / "src")):
        dep = Deployment(root / name, pg.fresh_database(), cluster=True)
        dep.env["PYTHONPATH"] = str(src)  # before the installed (editable) ecsnap
        builds.append(dep)
        dep.api()
        dep.api()
        seed_metadata(dep, groups, min(1000, groups))  # type: ignore[arg-type]
    try:
        result = bench_describe(builds[0], builds[1], seconds, clients,
                                names=("before", "this"))
    finally:
        for dep in builds:
            dep.stop()
    lines = [f"Describe* side by side: two API processes of each build, {clients} clients, "
             f"{groups:,} groups, {seconds:g} s per build per round, A B B A; before = "
             f"{against}", "", row("request", "build", "p50", "p99", "server CPU per request",
                                   "this / before (p99, CPU)"),
             row(*["---"] * 6)]
    for name, sides in result.items():
        figures = {}
        for side, got in sides.items():
            p50, p99, _ = _percentiles(got.latencies, 1)
            cpu = got.cpu / max(1, got.requests) * 1000
            figures[side] = (p99, cpu)
            ratio = "" if side == "before" else \
                f"{p99 / figures['before'][0]:.2f}, {cpu / figures['before'][1]:.2f}"
            lines.append(row(name, side, _ms(p50 / 1000), _ms(p99 / 1000), f"{cpu:.2f} ms",
                             ratio))
    return "\n".join(lines) + "\n"


def statements_per_request(dep: Deployment) -> dict[str, tuple[float, float]]:
    """{request: (SQL statements, server CPU ms)} of one request of each kind, answered in
    this process by the API app of an in-process build on `dep`'s database (the Describe*
    code is the same in both builds: read-only units of work), counted with a SQLAlchemy
    listener; median CPU of 20."""
    from sqlalchemy import event
    from starlette.testclient import TestClient

    from ecsnap.entrypoints.api.app import create_app
    from ecsnap.entrypoints.api.signature import rpc_v1_request_params

    engine = dep.ctx.extras["engine"]
    count = [0]

    def counted(*_: Any) -> None:
        count[0] += 1

    event.listen(engine, "before_cursor_execute", counted)
    results = {}
    try:
        with TestClient(create_app(dep.ctx, 1)) as client:
            params = {"groups": ("DescribeSnapshotGroups", {"MaxResults": "100"}),
                      "instances": ("DescribeInstances", {"PageSize": "100"}),
                      "snapshots": ("DescribeSnapshots", {"PageSize": "100"})}
            for name, kind in REQUESTS.items():
                action, values = params[kind]
                cpus, counts = [], []
                for _ in range(22):
                    query = rpc_v1_request_params(action, {"RegionId": REGION, **values},
                                                  dep.creds["AccessKeyId"],
                                                  dep.creds["AccessKeySecret"])
                    count[0] = 0
                    cpu = time.process_time()
                    response = client.post("/", params=query)
                    cpus.append(time.process_time() - cpu)
                    counts.append(count[0])
                    assert response.status_code == 200, response.text[:300]
                results[name] = (statistics.median(counts[2:]),
                                 statistics.median(cpus[2:]) * 1000)
    finally:
        event.remove(engine, "before_cursor_execute", counted)
    return results


# ------------------------------------------------------------------ 2. dispatch


def stopped_instance(api: LeanClient, image: str) -> str:
    body = call(api, "CreateInstance", {"ImageId": image, "InstanceType": "ecs.t5-lc2m1.nano",
                                        "SystemDisk.Size": 20, "DataDisk.1.Size": 20,
                                        "DataDisk.2.Size": 20})
    iid = str(body["InstanceId"])
    wait_status(api, iid, "Stopped")
    return iid


def bench_dispatch(single: Deployment, clustered: Deployment, repeats: int,
                   instances: dict[str, str]) -> dict[str, Series]:
    """A snapshot of a stopped 3-disk instance (`instances`: its ID by data directory)
    timed until its task has ended (the group it made then goes, outside the timing),
    single process vs cluster, in turns. For the cluster, the parts too, from the time the
    agent logged that it claimed the task: "request → claimed by the agent" and "claimed →
    the client has its end"."""
    timeline: list[tuple[float, float, str]] = []  # the cluster's: (sent, ended, task ID)

    def side(dep: Deployment) -> Callable[[int], float]:
        api = LeanClient(dep.apis[0][1])
        iid = instances[str(dep.data_dir)]

        def run(r: int) -> float:
            sent = time.time()
            start = time.perf_counter()
            body = call(api, "CreateSnapshotGroup", {"InstanceId": iid})
            wait_task(api, body["TaskId"])
            took = time.perf_counter() - start
            if dep.cluster and r >= 0:
                timeline.append((sent, sent + took, body["TaskId"]))
            gone = call(api, "DeleteSnapshotGroup", {"SnapshotGroupId": body["SnapshotGroupId"]})
            if gone.get("TaskId"):
                wait_task(api, gone["TaskId"])
            return took

        run(-1)  # warm: the first snapshot of the disks, connections, caches
        return run

    out = {"single": Series("single"), "cluster": Series("cluster")}
    alternate(repeats, out["single"], side(single), out["cluster"], side(clustered))
    claimed = claim_times(clustered)
    out["to claim"], out["from claim"] = Series("to claim"), Series("from claim")
    for sent, ended, task_id in timeline:
        if task_id in claimed:
            out["to claim"].samples.append(claimed[task_id] - sent)
            out["from claim"].samples.append(ended - claimed[task_id])
    return out


def claim_times(dep: Deployment) -> dict[str, float]:
    """{task ID: Unix time its agent logged that it claimed it} (logging's asctime: local
    time, milliseconds)."""
    import re
    from datetime import datetime

    line = re.compile(r"^(\S+ \S+) INFO \S+ agent \S+ claimed task (\S+)")
    found = {}
    for log in dep.data_dir.glob("agent-*.log"):
        for text in log.read_text(errors="replace").splitlines():
            if m := line.match(text):
                found[m.group(2)] = datetime.strptime(m.group(1),
                                                      "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return found


# ------------------------------------------------------------------ 3. fencing


@dataclass
class Fenced:
    detect: list[float] = field(default_factory=list)  # SIGSTOP -> host Fenced (seen)
    stopped: list[float] = field(default_factory=list)  # host Fenced -> Stopped (qcow2)
    # from the fencing agent's log (its clock and the database's, both this machine's):
    lease: list[float] = field(default_factory=list)  # SIGSTOP -> last heartbeat + timeout
    fenced: list[float] = field(default_factory=list)  # lease expired -> fence committed
    marked: list[float] = field(default_factory=list)  # fence committed -> marked Stopped
    shut: list[float] = field(default_factory=list)  # the fence's Ceph part, as it logs it
    # the automatic restart (RBD): fence committed -> Running elsewhere (no call)
    restart: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)  # SIGSTOP -> Running elsewhere
    rejoin: list[float] = field(default_factory=list)  # SIGCONT -> rejoined, stale VM gone
    blocklist: list[float] = field(default_factory=list)  # one `osd blocklist add`
    moved_to: list[str] = field(default_factory=list)


@contextlib.contextmanager
def ceph_cluster(root: Path) -> Iterator[Any]:
    sys.path.insert(0, str(ROOT))
    from tests.ceph import CephCluster

    cluster = CephCluster(root, memstore_bytes=1024 * 1024 * 1024)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def bench_fence(dep: Deployment, repeats: int, ceph: Any | None) -> Fenced:
    from ecsnap.domain.model import HostState, InstanceStatus
    from ecsnap.service import images, regions

    region, image = REGION, dep.image
    if ceph is not None:
        region = CEPH_REGION
        regions.ensure_region(dep.ctx, region, vcpus=100, memory_mib=100000,
                              storage_pool=ceph.spec())
        image = images.register_image(dep.ctx, region, name="bench-rbd", os_name="bench",
                                      template=dep.template, size_gib=1).id
    for host in ("h1", "h2", "h3"):
        dep.agent(host)
    api = dep.api()
    body = call(api, "RunInstances", {"RegionId": region, "ImageId": image,
                                      "InstanceType": "ecs.t5-lc2m1.nano",
                                      "ZoneId": f"{region}-a", "DataDisk.1.Size": 20,
                                      "DataDisk.2.Size": 20})
    [iid] = body["InstanceIdSets"]["InstanceIdSet"]
    wait_status(api, iid, "Running", region, timeout=180)
    out = Fenced()
    for r in range(repeats):
        holder = dep.instance(iid).host_id
        epoch = dep.host(holder).epoch
        [pidfile] = (dep.data_dir / "run" / holder).glob("*/*.pid")
        vm_pid = int(pidfile.read_text())
        time.sleep(1.5)  # a heartbeat or two in
        wall0 = time.time()
        t0 = time.monotonic()
        dep.agents[holder].send_signal(signal.SIGSTOP)
        t1 = _wait(partial(lambda h: dep.host(h).state == HostState.FENCED, holder), 120,
                   f"{holder} fenced")
        out.detect.append(t1 - t0)
        if ceph is None:  # pinned to its host's files: it stays Stopped
            t2 = _wait(lambda: dep.instance(iid).status == InstanceStatus.STOPPED, 60,
                       f"{iid} Stopped")
            out.stopped.append(t2 - t1)
        else:  # restarted by the fence, no call: Running on another host (never Stopped
            # in between: Stopped and its StartInstance are one commit)
            def elsewhere(held: str = holder) -> bool:
                inst = dep.instance(iid)
                return bool(inst.host_id != held and inst.status == InstanceStatus.RUNNING)

            t4 = _wait(elsewhere, 180, f"{iid} Running on another host")
            running_at = wall0 + (t4 - t0)
            out.total.append(t4 - t0)
            moved = dep.instance(iid).host_id
            out.moved_to.append(f"{holder}->{moved}")
        heard, committed, marked, shut = fence_log(dep, holder, epoch, iid)
        if shut is not None:
            out.shut.append(shut)
        expired = heard + dep.ctx.settings.host_timeout_s
        out.lease.append(expired - wall0)
        out.fenced.append(committed - expired)
        out.marked.append(marked - committed)
        if ceph is not None:
            out.restart.append(running_at - committed)
        t5 = time.monotonic()
        dep.agents[holder].send_signal(signal.SIGCONT)
        def rejoined(held: str = holder, was: int = epoch, vm: int = vm_pid) -> bool:
            h = dep.host(held)
            return bool(h.epoch >= was + 2 and h.state == HostState.UP and not _alive(vm))

        t6 = _wait(rejoined, 60, f"{holder} rejoined")
        out.rejoin.append(t6 - t5)
        print(f"  fence {r}: {out.detect[-1]:.2f} s to fenced, "
              + (f"{out.stopped[-1]:.3f} s to Stopped" if ceph is None else
                 f"{out.restart[-1]:.2f} s fence -> Running on another host by itself"),
              file=sys.stderr, flush=True)
        if ceph is None:
            call(api, "StartInstance", {"InstanceId": iid})  # pinned: back on its host
            wait_status(api, iid, "Running")
    if ceph is not None:
        from ecsnap.adapters.storage.rbd import RbdBackend

        backend = RbdBackend.from_spec(ceph.spec())
        try:
            for n in range(max(3, repeats)):
                addr = f"192.0.2.{n + 1}:0/{4242 + n}"
                start = time.monotonic()
                backend.blocklist([addr])
                out.blocklist.append(time.monotonic() - start)
                ceph.mon_command({"prefix": "osd blocklist", "blocklistop": "rm",
                                  "addr": addr})
        finally:
            backend.close()
    return out


def fence_log(dep: Deployment, holder: str, epoch: int, iid: str
              ) -> tuple[float, float, float, float | None]:
    """(last heartbeat of `holder`, fence committed, `iid` marked Stopped — with its
    StartInstance journaled, on RBD — as the fencing agent logs it) as Unix times,
    from the log of the agent that fenced `holder` out of `epoch`, and the seconds its
    Ceph clients took to shut out if that agent logs them ("... shut out ..., in N ms")."""
    import re
    from datetime import datetime

    fenced = re.compile(rf"^(\S+ \S+) WARNING \S+ host {holder} fenced by \S+: no heartbeat "
                        rf"since (.+) \(epoch {epoch} -> ")
    marked = re.compile(rf"^(\S+ \S+) WARNING \S+ instance {iid} of fenced host {holder} ")
    shut = re.compile(rf"^\S+ \S+ WARNING \S+ host {holder} fenced: .* in (\d+) ms$")

    def at(stamp: str) -> float:  # logging's asctime: local time, milliseconds
        return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()

    for log in dep.data_dir.glob("agent-*.log"):
        lines = log.read_text(errors="replace").splitlines()
        for n, line in enumerate(lines):
            if found := fenced.match(line):
                heard = datetime.fromisoformat(found.group(2)).timestamp()
                stopped = next(at(m.group(1)) for later in lines[n:]
                               if (m := marked.match(later)))
                took = next((int(m.group(1)) / 1000 for before in lines[max(0, n - 3):n]
                             if (m := shut.match(before))), None)
                return heard, at(found.group(1)), stopped, took
    raise RuntimeError(f"no agent's log says that it fenced {holder} at epoch {epoch}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie of no child of ours does not stay: QEMU daemonized, reaped by init
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


# ------------------------------------------------------------------ the report


def _ms(x: float) -> str:
    return f"{x * 1000:.1f} ms"


def _time(x: float) -> str:
    return f"{x:.2f} s" if abs(x) >= 1 else f"{x * 1000:.0f} ms"


def section(describe: dict[str, dict[str, Loaded]], profile: dict[str, tuple[float, float]],
            dispatch: dict[str, Series], fence: Fenced | None, args: argparse.Namespace
            ) -> str:
    lines = ["## 8. Cluster: Describe* against two API processes, dispatch through the "
             "PostgreSQL queue, fencing a hung agent", "",
             f"Run on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {machine()}: "
             f"`python -m bench.cluster {' '.join(args.argv)}`; load average at the start "
             f"{args.load[0]:.1f}, at the end {os.getloadavg()[0]:.1f} (other work shared "
             f"the machine).", ""]
    if describe:
        lines += [f"Describe* at {args.groups:,} snapshot groups ({args.groups * 3:,} "
                  f"snapshots), {min(1000, args.groups):,} instances, {args.clients} "
                  f"concurrent clients, PostgreSQL; {args.seconds:g} s per build per round, "
                  f"2 rounds (A B B A):", "",
                  row("request", "build", "API processes", "p50", "p99", "requests/s",
                      "server CPU per request", "p99 ≤ 20 ms", "cluster / single p99"),
                  row(*["---"] * 9)]
        for name, sides in describe.items():
            p99s = {}
            for side, got in sides.items():
                p50, p99, _ = _percentiles(got.latencies, 1)
                p99s[side] = p99
            for side, got in sides.items():
                p50, p99, _ = _percentiles(got.latencies, 1)
                rps = got.requests / got.elapsed if got.elapsed else 0.0
                lines.append(row(name, "single process" if side == "single" else "cluster",
                                 1 if side == "single" else 2, f"{p50:.1f} ms",
                                 f"{p99:.1f} ms", f"{rps:.0f}",
                                 f"{got.cpu / max(1, got.requests) * 1000:.2f} ms",
                                 "yes" if p99 <= 20 else "no",
                                 f"{p99s['cluster'] / p99s['single']:.2f}"
                                 if side == "cluster" else ""))
        lines.append("")
        if profile:
            lines += ["One request of each kind answered in process (same Describe* code in "
                      "both builds; CPU with the in-process test client's own), the groups "
                      "request one page of 100: "
                      + "; ".join(f"{name.split(' (')[0]}: {n:g} SQL statements, "
                                  f"{cpu:.1f} ms CPU" for name, (n, cpu) in profile.items())
                      + ".", ""]
    if dispatch:
        s, c = dispatch["single"], dispatch["cluster"]
        p90 = {k: sorted(v.samples)[int(0.9 * (len(v.samples) - 1))] for k, v in
               (("single", s), ("cluster", c))}
        lines += ["Dispatch: CreateSnapshotGroup of a stopped 3-disk instance (empty 20 GiB "
                  "qcow2 disks), timed until its task has ended; "
                  f"{len(s.samples)} repeats each, in turns:", "",
                  row("build", "median", "p90", "spread", "cluster / single (medians)",
                      "≤ 1.3"),
                  row(*["---"] * 6),
                  row("single process (embedded runner)", _ms(s.median), _ms(p90["single"]),
                      s.spread, "", ""),
                  row("cluster (API → PostgreSQL queue → agent)", _ms(c.median),
                      _ms(p90["cluster"]), c.spread, f"{c.median / s.median:.2f}",
                      "yes" if c.median / s.median <= 1.3 else "no"), ""]
        to, frm = dispatch["to claim"], dispatch["from claim"]
        if to.samples:
            lines += [f"The cluster's snapshot in two parts (the agent's log line \"claimed "
                      f"task\", ms resolution; medians): request sent → claimed by the "
                      f"agent {_ms(to.median)} ({to.spread}), claimed → the client has its "
                      f"end {_ms(frm.median)} ({frm.spread}).", ""]
    if fence is not None and fence.detect:
        med = statistics.median
        parts = [(f"SIGSTOP → its lease expired (last heartbeat + {args.host_timeout:g} "
                  f"s; heartbeat every {args.heartbeat:g} s)", fence.lease),
                 ("lease expired → fence committed by a peer (its next check; the fencing "
                  "transaction with Ceph's `break_locks` and blocklist)", fence.fenced),
                 *([("  of which the Ceph part of the fencing transaction (its clients shut "
                     "out, as the fencing agent logs it)", fence.shut)] if fence.shut else []),
                 ("fence committed → the instance marked Stopped (claim released)"
                  + (", its StartInstance journaled in the same commit (placed on a host "
                     "with room)" if fence.restart else ""), fence.marked)]
        if fence.stopped:
            parts += [("SIGSTOP → the instance seen Stopped (the bench polls every 20 ms)",
                       [a + b for a, b in zip(fence.detect, fence.stopped, strict=True)])]
        if fence.restart:
            parts += [("automatic restart: fence committed → Running on another host, no "
                       "call (the fence's StartInstance claimed by that host's agent, QEMU "
                       "with librbd)", fence.restart),
                      ("total: SIGSTOP → Running on another host (the bench polls every "
                       "20 ms)", fence.total)]
        parts += [("SIGCONT → old agent rejoined, its stale VM stopped", fence.rejoin)]
        if fence.blocklist:
            parts += [("one Ceph `osd blocklist add` (measured apart)", fence.blocklist)]
        storage = "Ceph RBD (single-node, memstore)" if fence.restart else \
            "qcow2 (pinned: no start elsewhere)"
        lines += [f"Fencing: a running instance (QEMU, TCG) on {storage}, three agents; "
                  f"{len(fence.detect)} repeats, each SIGSTOPping the agent that holds it"
                  + (f" ({', '.join(fence.moved_to)})" if fence.moved_to else "") + ":", "",
                  row("part", "median", "min-max"), row("---", "---", "---")]
        for what, xs in parts:
            lines.append(row(what, _time(med(xs)), f"{_time(min(xs))} to {_time(max(xs))}"))
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=10000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--fence-repeats", type=int, default=3)
    parser.add_argument("--host-timeout", type=float, default=10.0)
    parser.add_argument("--heartbeat", type=float, default=1.0)
    parser.add_argument("--no-ceph", action="store_true")
    parser.add_argument("--only", default="describe,dispatch,fence")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--against", type=Path, default=None,
                        help="only Describe*, this tree against the build in this src dir")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.smoke:
        args.groups, args.seconds, args.repeats, args.fence_repeats = 30, 0.3, 2, 1
        args.clients = 2  # one per API process: fewer load generator processes to spawn
        args.host_timeout, args.heartbeat = 2.0, 0.3
    args.load = os.getloadavg()
    only = set(args.only.split(","))
    sys.path.insert(0, str(ROOT))
    from tests.pg import PostgresServer

    root = Path(tempfile.mkdtemp(prefix="ecb-", dir="/tmp"))  # short: unix socket paths
    (root / "pg").mkdir()
    pg = PostgresServer(root / "pg")
    pg.start()
    if args.against is not None:
        try:
            text = compare_builds(root, pg, args.against.resolve(), args.groups, args.seconds,
                                  args.clients)
        finally:
            pg.stop()
            shutil.rmtree(root, ignore_errors=True)
        print(text)
        if args.out:
            args.out.write_text(text)
        return 0
    deployments: list[Deployment] = []
    describe: dict[str, dict[str, Loaded]] = {}
    profile: dict[str, tuple[float, float]] = {}
    dispatch: dict[str, Series] = {}
    fence: Fenced | None = None
    failed = True
    try:
        if only & {"describe", "dispatch"}:
            single = Deployment(root / "s", pg.fresh_database(), cluster=False)
            clustered = Deployment(root / "c", pg.fresh_database(), cluster=True)
            deployments += [single, clustered]
            single.api()
            clustered.agent("h1")
            clustered.api()
            clustered.api()
            # made before the seed, whose 1,000 instances exceed the account's quota
            instances = {str(dep.data_dir): stopped_instance(LeanClient(dep.apis[0][1]),
                                                             dep.image)
                         for dep in (single, clustered)}
            if "describe" in only:
                for dep in (single, clustered):
                    seed_metadata(dep, args.groups, min(1000, args.groups))  # type: ignore[arg-type]
            if "describe" in only:
                print("describe", file=sys.stderr, flush=True)
                describe = bench_describe(single, clustered, args.seconds, args.clients)
                profile = statements_per_request(single)
            if "dispatch" in only:
                print("dispatch", file=sys.stderr, flush=True)
                dispatch = bench_dispatch(single, clustered, args.repeats, instances)
            for dep in (single, clustered):
                dep.stop()
        if "fence" in only:
            print("fence", file=sys.stderr, flush=True)
            fenced = Deployment(root / "f", pg.fresh_database(), cluster=True,
                                heartbeat_s=args.heartbeat, host_timeout_s=args.host_timeout)
            deployments.append(fenced)
            with contextlib.ExitStack() as stack:
                ceph = None if args.no_ceph else stack.enter_context(ceph_cluster(root / "ceph"))
                try:
                    fence = bench_fence(fenced, args.fence_repeats, ceph)
                finally:
                    fenced.stop()
        failed = False
    finally:
        for dep in deployments:
            with contextlib.suppress(Exception):
                dep.stop()
        pg.stop()
        if failed:  # the logs of the processes (serve-N.log, agent-H.log) are kept
            print(f"failed: the data directories are in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    text = section(describe, profile, dispatch, fence, args)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
