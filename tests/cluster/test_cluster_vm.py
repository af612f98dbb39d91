"""Cluster mode with a real QEMU VM of the demo image: kill -9 of the agent that is taking
a live instance snapshot, in the middle of its freeze window (the guest's file systems
frozen, no snapshot taken yet); the VM outlives it, the agent restarted takes the task back
and finishes or undoes it, and the guest is thawed (and the next snapshot is taken)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from ecsnap.adapters.compute.qemu import QemuDriver
from ecsnap.domain.model import InstanceStatus, SnapshotStatus, TaskStatus
from ecsnap.service.context import attached_disks
from ecsnap.service.disk_files import INITIAL
from tests import qcow
from tests.cluster.conftest import Cluster, alive
from tests.compute.conftest import wait_agent

pytestmark = [pytest.mark.qemu, pytest.mark.postgres]



def test_kill_9_of_an_agent_mid_live_snapshot_then_it_restarts(vm_cluster: Cluster) -> None:
    cluster = vm_cluster
    agent = cluster.agent("h1", program=(str(Path(__file__).with_name("frozen_kill.py")),))
    api = cluster.client(cluster.api())
    instance_id = cluster.run_demo(api, params={"DataDisk.1.Size": 20})
    with cluster.ctx.uow(readonly=True) as uow:
        inst = uow.instances.load(instance_id)
    assert inst.status == InstanceStatus.RUNNING and inst.host_id == "h1"
    vms = QemuDriver(cluster.data_dir / "run" / "h1", accel="tcg")
    wait_agent(vms, instance_id)  # the guest agent answers: the snapshot freezes the guest

    api.call("CreateSnapshotGroup", {"InstanceId": instance_id})
    [task] = cluster.tasks(action="TakeSnapshots")
    assert agent.proc.wait(120) == -signal.SIGKILL
    assert "SIGKILL with the guest frozen" in agent.text()
    assert cluster.task(task.id).status == TaskStatus.PROCESSING
    assert vms.agent_command(instance_id, "guest-fsfreeze-status") == "frozen"
    pids = [int(p.read_text()) for p in (cluster.data_dir / "run" / "h1").glob("*/*.pid")]
    assert pids
    for pid in pids:
        os.kill(pid, 0)  # the VM outlived its agent (ProcessLookupError if not)

    cluster.agent("h1")  # restarted: a new epoch; it takes its task back at once
    ended = cluster.ended(task.id, timeout=120)
    assert ended.owner == "h1"
    with cluster.ctx.uow(readonly=True) as uow:
        group = uow.snapshot_groups.find(instance_id=instance_id)[0]
        inst = uow.instances.load(instance_id)
        locked = [d.id for d in uow.disks.find(instance_id=instance_id) if d.lock_task_id]
    assert group.status == (SnapshotStatus.ACCOMPLISHED if ended.status ==
                            TaskStatus.FINISHED else SnapshotStatus.FAILED)
    assert inst.status == InstanceStatus.RUNNING and not inst.lock_task_id and not locked
    assert vms.agent_command(instance_id, "guest-fsfreeze-status") == "thawed"
    with cluster.ctx.uow(readonly=True) as uow:  # no snapshot left behind in a disk file
        for disk in attached_disks(uow, instance_id):
            known = {s.id for s in uow.snapshots.find(source_disk_id=disk.id)}
            in_file = set(qcow.snapshots(cluster.disk_path(disk.id))) - {INITIAL}
            assert in_file == known, disk.id
    # the guest was not left frozen: the next live snapshot is taken
    body = api.call("CreateSnapshotGroup", {"InstanceId": instance_id})
    again = [t for t in cluster.tasks(action="TakeSnapshots") if t.id != task.id]
    assert cluster.ended(again[0].id, timeout=120).status == TaskStatus.FINISHED, body


def test_a_hung_agent_is_fenced_its_instance_stopped_and_its_stale_vm_stopped_on_return(
        vm_cluster: Cluster) -> None:
    cluster = vm_cluster
    agents = {h: cluster.agent(h) for h in ("h1", "h2")}
    api = cluster.client(cluster.api())
    instance_id = cluster.run_demo(api)
    with cluster.ctx.uow(readonly=True) as uow:
        host_id = uow.instances.load(instance_id).host_id
    assert host_id in agents
    epoch = cluster.host(host_id).epoch  # type: ignore[union-attr]
    [pidfile] = (cluster.data_dir / "run" / host_id).glob("*/*.pid")
    vm_pid = int(pidfile.read_text())

    agents[host_id].signal(signal.SIGSTOP)  # a hung host: its VM runs on
    cluster.until(lambda: cluster.host(host_id).state.value == "Fenced",  # type: ignore[union-attr]
                  30, f"{host_id} fenced")
    cluster.until(lambda: _status(cluster, instance_id) == InstanceStatus.STOPPED, 30,
                  "its instance marked Stopped")

    agents[host_id].signal(signal.SIGCONT)  # it finds itself fenced, stops its stale VM
    cluster.until(lambda: (h := cluster.host(host_id)) is not None and
                  h.epoch == epoch + 2 and h.state.value == "Up", 30, "rejoined")
    cluster.until(lambda: not alive(vm_pid), 30, "its stale VM stopped")
    # its disks are local: it starts again on its own host, once that host is back
    api.call("StartInstance", {"InstanceId": instance_id})
    start = cluster.tasks(resource_id=instance_id, action="StartInstance")
    assert cluster.ended(start[-1].id, timeout=120).status == TaskStatus.FINISHED


def _status(cluster: Cluster, instance_id: str) -> InstanceStatus:
    with cluster.ctx.uow(readonly=True) as uow:
        return uow.instances.load(instance_id).status
