"""RBD failover end to end (issue 14): PostgreSQL, the single-node Ceph (tests/ceph.py), two
real `ecsnap agent` processes and an `ecsnap serve`, a real QEMU VM of the demo guest whose
disks are RBD images.

The VM runs on agent A and writes a marker; A is stopped with SIGSTOP (a hung host: its
QEMU runs on). After the timeout A is fenced by its peer, which shuts out the clients that
have the VM's images open (each QEMU has its own librbd client: the exclusive-lock owner's
lock is broken with blocklisting), so the old guest's writes fail; in the transaction that
marks the instance Stopped the fencing agent journals its StartInstance (the automatic
restart: no user call), placed on agent B, and the guest there reads the marker and not
what the old guest tried to write after the fence. On SIGCONT A finds itself fenced, stops
its stale QEMU and rejoins under a new epoch. The fencing time is logged with its parts.

The guest is reached through its QEMU guest agent from the test (a QemuDriver on the
agent's run directory): RunCommand is refused in cluster mode."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from ecsnap.adapters.compute.qemu import QemuDriver
from ecsnap.domain.model import HostState, InstanceStatus, TaskStatus
from ecsnap.entrypoints.cli.client import ApiClient, load_credentials
from tests.ceph import CephCluster, shared
from tests.cluster.conftest import (
    CACHE,
    HEARTBEAT_S,
    HOST_TIMEOUT_S,
    Cluster,
    alive,
    kill_vms,
)
from tests.compute.conftest import wait_agent
from tests.live import ecsnap

pytestmark = [pytest.mark.qemu, pytest.mark.postgres]

REGION = "ceph-1"
log = logging.getLogger("ecsnap.tests")


@pytest.fixture(scope="module")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    with shared(tmp_path_factory) as cluster:
        yield cluster


@pytest.fixture
def rbd_cluster(cluster: Cluster, ceph: CephCluster) -> Iterator[Cluster]:
    """The cluster with a region on the Ceph pool and the demo image registered in it."""
    config_file = cluster.data_dir / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                       "cache": str(CACHE)}))
    ecsnap("init", "--data-dir", str(cluster.data_dir), "--region", REGION,
           "--storage-pool", ceph.spec())
    ecsnap("image", "build-demo", "--data-dir", str(cluster.data_dir), "--region", REGION)
    try:
        yield cluster
    finally:
        kill_vms(cluster)
        for agent in cluster.agents:  # a stopped agent (SIGSTOP) would block the teardown
            with contextlib.suppress(OSError):
                agent.signal(signal.SIGCONT)


def _client(cluster: Cluster) -> ApiClient:
    live = cluster.api()
    creds = dataclasses.replace(load_credentials(cluster.data_dir), endpoint=live.endpoint,
                                region_id=REGION)
    return ApiClient(creds)


def _instance(cluster: Cluster, instance_id: str):  # type: ignore[no-untyped-def]
    with cluster.ctx.uow(readonly=True) as uow:
        return uow.instances.load(instance_id)


def _sh(driver: QemuDriver, instance_id: str, command: str, timeout: float = 60) -> str:
    result = driver.guest_exec(instance_id, command, timeout=timeout)
    assert result.exit_code == 0, result
    return result.stdout.decode()


def _blocklisted(ceph: CephCluster) -> set[str]:
    text = ceph.mon_command({"prefix": "osd blocklist ls", "format": "json"})
    listed, _ = json.JSONDecoder().raw_decode(text)  # Pacific appends its range list: []
    return {str(entry["addr"]) for entry in listed}


def test_a_hung_host_is_fenced_its_qemu_shut_out_and_the_instance_starts_elsewhere(
        rbd_cluster: Cluster, ceph: CephCluster) -> None:
    """The instance comes back Running on the other host by itself: no StartInstance."""
    cluster = rbd_cluster
    agents = {h: cluster.agent(h) for h in ("h1", "h2")}
    api = _client(cluster)
    for host_id in agents:  # each agent registered its own RADOS client's address
        host = cluster.host(host_id)
        assert host is not None and host.ceph_addrs, host
    instance_id = cluster.run_demo(api, zone=f"{REGION}-a")
    a = _instance(cluster, instance_id).host_id
    assert a in agents
    [b] = [h for h in agents if h != a]
    epoch = cluster.host(a).epoch  # type: ignore[union-attr]
    old = QemuDriver(cluster.data_dir / "run" / a, accel="tcg")
    wait_agent(old, instance_id)
    _sh(old, instance_id, "echo marker-before-the-hang > /root/marker && sync")
    [pidfile] = (cluster.data_dir / "run" / a).glob("*/*.pid")
    vm_pid = int(pidfile.read_text())

    # the clients that have the instance's images open: its QEMU's own librbd client
    volumes = [d.current_volume for d in cluster.disks(instance_id)]
    import rbd

    with ceph.connect() as conn, conn.open_ioctx(ceph.pool) as ioctx, \
            rbd.Image(ioctx, volumes[0]) as image:  # read-write: see RbdBackend._image
        own = str(conn.get_addrs())
        qemu_clients = {str(w["addr"]) for w in image.watchers_list()
                        if str(w["addr"]) not in own}
    assert qemu_clients, "the VM has its system disk open"
    assert not qemu_clients & set(cluster.host(a).ceph_addrs)  # type: ignore[union-attr]

    hung = time.monotonic()
    agents[a].signal(signal.SIGSTOP)  # a hung host: its VM runs on
    cluster.until(lambda: cluster.host(a).state == HostState.FENCED,  # type: ignore[union-attr]
                  30, f"{a} fenced")
    fenced = time.monotonic()
    assert alive(vm_pid), "the hung host's QEMU runs on"
    listed = _blocklisted(ceph)
    assert qemu_clients <= listed, (qemu_clients, listed)  # its QEMU shut out of Ceph
    assert set(cluster.host(a).ceph_addrs) <= listed  # type: ignore[union-attr]

    # no StartInstance call: the fence restarts it on b by itself; seen from a thread, so
    # that the check of the old guest's late write below does not delay the timing
    seen: list[float] = []

    def running_on_b() -> None:
        cluster.until(lambda: (i := _instance(cluster, instance_id)).host_id == b and
                      i.status == InstanceStatus.RUNNING, 180, f"{instance_id} Running on {b}")
        seen.append(time.monotonic())

    watch = threading.Thread(target=running_on_b, daemon=True)
    watch.start()

    # the old guest cannot write to its disk any more (direct I/O: no page cache between)
    late = old.guest_exec(instance_id, "dd if=/dev/urandom of=/root/late bs=4096 count=16 "
                          "oflag=direct conv=fsync", timeout=30)
    assert late.exit_code != 0, late
    watch.join(200)
    assert seen, f"{instance_id} never Running on {b} by itself"
    running = seen[0]
    [start] = [t for t in cluster.tasks(resource_id=instance_id)
               if t.action == "StartInstance"]  # the fence's own, journaled with Stopped
    assert cluster.task(start.id).status == TaskStatus.FINISHED
    assert f"instance {instance_id} of fenced host {a} marked Stopped and restarted on " \
        f"host {b} (task {start.id})" in agents[b].text()
    new = QemuDriver(cluster.data_dir / "run" / b, accel="tcg")
    wait_agent(new, instance_id)
    answered = time.monotonic()
    assert _sh(new, instance_id, "cat /root/marker").strip() == "marker-before-the-hang"
    assert _sh(new, instance_id, "test -e /root/late && echo there || echo absent").strip() \
        == "absent"  # what the old guest wrote after the fence never reached the image
    [shut_out_ms] = [float(m) for m in re.findall(
        rf"host {a} fenced: in region {REGION}, .* in (\d+) ms", agents[b].text())]
    [qemu_s] = [float(m) for m in re.findall(
        rf"VM {instance_id} started: .* in ([\d.]+) s", agents[b].text())]
    log.warning(
        "failover of %s from hung %s to %s, no user call: %.1f s from SIGSTOP to Running "
        "(%.1f s to the guest agent): lease timeout and detection %.1f s (host_timeout_s "
        "%.1f, heartbeat %.1f s; the Fenced state seen after %.1f s; of which Ceph clients "
        "shut out %.0f ms), automatic restart: fence seen -> Running on %s %.1f s (its "
        "StartInstance journaled with the Stopped mark, claimed by %s; of which QEMU's "
        "start with librbd %.1f s), +%.1f s boot to the guest agent",
        instance_id, a, b, running - hung, answered - hung,
        fenced - hung - shut_out_ms / 1000, HOST_TIMEOUT_S, HEARTBEAT_S, fenced - hung,
        shut_out_ms, b, running - fenced, b, qemu_s, answered - running)

    # SIGCONT: the old agent finds itself fenced, stops its stale QEMU, rejoins empty
    agents[a].signal(signal.SIGCONT)
    cluster.until(lambda: (h := cluster.host(a)) is not None and h.epoch == epoch + 2 and
                  h.state == HostState.UP, 30, "rejoined")
    cluster.until(lambda: not alive(vm_pid), 30, "its stale VM stopped")
    assert "stopping the VMs of this host and rejoining empty" in agents[a].text()
    inst = _instance(cluster, instance_id)
    assert (inst.status, inst.host_id) == (InstanceStatus.RUNNING, b)
    # the rejoined agent's own storage client is a new one, not blocklisted
    assert not set(cluster.host(a).ceph_addrs) & _blocklisted(ceph)  # type: ignore[union-attr]
    _sh(new, instance_id, "echo after-the-return > /root/after && sync")
    assert _sh(new, instance_id, "cat /root/marker /root/after").split() == \
        ["marker-before-the-hang", "after-the-return"]
    api.call("StopInstance", {"InstanceId": instance_id, "ForceStop": "true"})
