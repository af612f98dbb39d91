"""A cluster on one machine: a throwaway PostgreSQL, agents and API processes as real
`ecsnap agent` / `ecsnap serve` child processes on 127.0.0.1, one data directory (the
qcow2 pool is shared; each agent has its own run directory, DATA_DIR/run/HOST).

The instances the tests act on are made in-process on the same database by an embedded
build with the test double of the hypervisor and then stopped, so that no VM is needed:
what the agents do to them (snapshots, rollbacks) is storage work on real qcow2 files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from ecsnap import bootstrap, config
from ecsnap.domain.model import Disk, Host, Instance, InstanceStatus, Task, TaskStatus
from ecsnap.entrypoints.cli.client import ApiClient, load_credentials
from ecsnap.service import accounts, images, instances
from ecsnap.service import cluster as cluster_service
from ecsnap.service.context import ServiceContext, attached_disks
from tests.crash import Lab
from tests.crash_compute import JsonFileCompute
from tests.doubles import FileBackedCompute
from tests.live import ROOT, LiveServer, ecsnap
from tests.pg import PostgresServer

HOST_TIMEOUT_S = 3.0
HEARTBEAT_S = 0.3
CACHE = Path(os.environ.get("ECSNAP_TEST_CACHE", ROOT / ".cache"))  # the demo image's packages


class AgentProcess:
    def __init__(self, data_dir: Path, host_id: str, env: dict[str, str] | None = None,
                 args: tuple[str, ...] = (), program: tuple[str, ...] = ("-m", "ecsnap"),
                 ) -> None:
        """`program`: what the interpreter runs, `ecsnap` or a wrapper of it (a test's
        fault injection, e.g. tests/cluster/frozen_kill.py)."""
        self.data_dir, self.host_id = data_dir, host_id
        self.log = data_dir / f"agent-{host_id}.log"
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, *program, "agent", "--host-id", host_id, "--data-dir",
             str(data_dir), "--vcpus", "8", "--memory-mib", "8192", *args],
            stdout=out, stderr=out, cwd=ROOT, env={**os.environ, **(env or {})})

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@dataclasses.dataclass
class Cluster:
    data_dir: Path
    ctx: ServiceContext  # an embedded build on the same database: set-up and checks
    account_id: str
    image_id: str
    agents: list[AgentProcess] = dataclasses.field(default_factory=list)
    apis: list[LiveServer] = dataclasses.field(default_factory=list)

    def agent(self, host_id: str, env: dict[str, str] | None = None,
              wait: bool = True, args: tuple[str, ...] = (),
              program: tuple[str, ...] = ("-m", "ecsnap")) -> AgentProcess:
        agent = AgentProcess(self.data_dir, host_id, env, args, program)
        self.agents.append(agent)
        if wait:
            self.until(lambda: (h := self.host(host_id)) is not None and
                       h.started_at is not None and agent.proc.poll() is None and
                       "joined under epoch" in agent.text(), 60, f"agent {host_id} up")
        return agent

    def api(self) -> LiveServer:
        live = LiveServer(self.data_dir)
        live.log = self.data_dir / f"serve-{len(self.apis)}.log"
        live.start()
        self.apis.append(live)
        return live

    def client(self, live: LiveServer) -> ApiClient:
        creds = dataclasses.replace(load_credentials(self.data_dir), endpoint=live.endpoint)
        return ApiClient(creds)

    def run_demo(self, api: ApiClient, zone: str = "local-1-a",
                 params: dict[str, Any] | None = None) -> str:
        """RunInstances of the demo image (vm_cluster) through `api`, waited for until its
        task finished: the instance's ID."""
        images = api.call("DescribeImages", {"ImageOwnerAlias": "system"})["Images"]["Image"]
        [demo] = [i["ImageId"] for i in images if i["ImageName"] == "ecsnap-demo-debian12"]
        [instance_id] = api.call("RunInstances", {
            "ImageId": demo, "InstanceType": "ecs.t5-lc2m1.nano", "ZoneId": zone,
            **(params or {})})["InstanceIdSets"]["InstanceIdSet"]
        [run] = self.tasks(resource_id=instance_id)
        assert self.ended(run.id, timeout=300).status == TaskStatus.FINISHED
        return str(instance_id)

    def stopped_instance(self) -> Instance:
        req = instances.InstanceRequest(image_id=self.image_id,
                                        instance_type="ecs.t5-lc2m1.nano",
                                        data_disks=[instances.DataDiskSpec(size_gib=20)])
        [instance_id] = instances.run_instances(self.ctx, self.account_id, "local-1", req)
        instances.stop_instance(self.ctx, self.account_id, instance_id)
        with self.ctx.uow(readonly=True) as uow:
            inst = uow.instances.load(instance_id)
        assert inst.status == InstanceStatus.STOPPED
        return inst

    def disks(self, instance_id: str) -> list[Disk]:
        with self.ctx.uow(readonly=True) as uow:
            return attached_disks(uow, instance_id)

    def disk_path(self, disk_id: str) -> str:
        return self.lab().disk_path(disk_id)

    def lab(self) -> Lab:
        """The crash tests' view of this data directory, for their invariants."""
        return Lab(self.data_dir, self.ctx, cast(JsonFileCompute, self.ctx.compute))

    def host(self, host_id: str) -> Host | None:
        with self.ctx.uow(readonly=True) as uow:
            return uow.hosts.get(host_id)

    def task(self, task_id: str) -> Task:
        with self.ctx.uow(readonly=True) as uow:
            return uow.tasks.load(task_id)

    def tasks(self, **equals: Any) -> list[Task]:
        with self.ctx.uow(readonly=True) as uow:
            return uow.tasks.find(**equals)

    def ended(self, task_id: str, timeout: float = 45) -> Task:
        self.until(lambda: self.task(task_id).status != TaskStatus.PROCESSING, timeout,
                   f"task {task_id} ended")
        return self.task(task_id)

    def until(self, ok: Callable[[], object], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ok():
                return
            time.sleep(0.1)
        logs = "\n".join(f"--- {a.host_id}\n{a.text()[-3000:]}" for a in self.agents)
        raise AssertionError(f"timed out waiting for {what}\n{logs}")


@pytest.fixture
def cluster(postgres: PostgresServer, template: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    data_dir = tmp_path_factory.mktemp("cl") / "d"
    data_dir.mkdir()
    (data_dir / "config.json").write_text(json.dumps({
        "database_url": postgres.fresh_database(), "cluster": True, "accel": "tcg",
        "host_timeout_s": HOST_TIMEOUT_S, "heartbeat_s": HEARTBEAT_S}))
    ecsnap("init", "--data-dir", str(data_dir))
    settings = config.load(data_dir, cluster=False, background_tasks=False,
                           stop_timeout_s=1.0)
    ctx = bootstrap.build(settings, compute=FileBackedCompute(), background=False)
    creds = json.loads((data_dir / "credentials.json").read_text())
    account = accounts.get_account(ctx, creds.get("Account", "admin"))
    assert account is not None
    image = images.register_image(ctx, "local-1", name="tiny", os_name="Tiny Linux",
                                  template=template, size_gib=1)
    lab = Cluster(data_dir, ctx, account.id, image.id)
    try:
        yield lab
    finally:
        for api in lab.apis:
            if api.proc is not None and api.proc.poll() is None:
                api.stop()
        for agent in lab.agents:
            agent.stop()


@pytest.fixture
def vm_cluster(cluster: Cluster) -> Iterator[Cluster]:
    """The cluster with the demo image (QEMU tests); the VMs its agents left behind are
    killed at the end (they outlive their agents by design)."""
    config_file = cluster.data_dir / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                       "cache": str(CACHE)}))
    ecsnap("image", "build-demo", "--data-dir", str(cluster.data_dir))
    try:
        yield cluster
    finally:
        kill_vms(cluster)


def kill_vms(cluster: Cluster) -> None:
    """SIGKILL every VM the cluster's agents started (their pidfiles in DATA_DIR/run)."""
    for pidfile in (cluster.data_dir / "run").glob("*/*/*.pid"):
        with contextlib.suppress(ValueError, OSError):
            os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def pg_ctx(postgres: PostgresServer, tmp_path: Path) -> Iterator[ServiceContext]:
    """An agent's context in this process (its unit of work fenced) on a fresh database,
    the hypervisor the test double."""
    settings = config.load(tmp_path / "data", database_url=postgres.fresh_database(),
                           background_tasks=False)
    ctx = bootstrap.build(settings, compute=FileBackedCompute(), background=False)
    ctx.uow = cluster_service.fenced_uow(ctx.uow)
    yield ctx
    ctx.extras["engine"].dispose()
