"""`ecsnap agent --run-dir`: a former single-host server joins a cluster as the agent of its
implicit host `local` and keeps its running VMs, which are in DATA_DIR/run (where `ecsnap
serve` ran them), not in DATA_DIR/run/local (an agent's default). A stand-in VM process (its
pidfile and a command line naming the instance, as the QEMU driver finds its VMs) plays the
VM that outlived the single-host server."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

from ecsnap.domain.model import InstanceStatus
from tests.cluster.conftest import Cluster


def _status(cluster: Cluster, instance_id: str) -> InstanceStatus:
    with cluster.ctx.uow(readonly=True) as uow:
        return uow.instances.load(instance_id).status


def test_the_local_agent_with_the_single_host_run_dir_keeps_its_vms(cluster: Cluster) -> None:
    inst = cluster.stopped_instance()
    with cluster.ctx.uow() as uow:  # Running on the single-host server, host `local`
        row = uow.instances.load(inst.id)
        row.status, row.host_id = InstanceStatus.RUNNING, "local"
        uow.commit()
    run = cluster.data_dir / "run"
    (run / inst.id).mkdir(parents=True, exist_ok=True)
    vm = subprocess.Popen(["bash", "-c", 'exec -a qemu-system-x86_64 "$0" -c '
                           '"import time; time.sleep(300)" -name "$1"', sys.executable,
                           f"ecsnap-{inst.id}"], start_new_session=True)
    try:
        (run / inst.id / "qemu.pid").write_text(f"{vm.pid}\n")
        agent = cluster.agent("local", args=("--run-dir", str(run)))
        # a heartbeat after the join: its reconciliation (at the join) is done
        cluster.until(lambda: (h := cluster.host("local")) is not None and
                      h.started_at is not None and h.heartbeat_at > h.started_at, 30,
                      "a heartbeat after the join")
        assert _status(cluster, inst.id) == InstanceStatus.RUNNING  # its VM found
        assert vm.poll() is None
        agent.stop()
        # the default run dir (run/local) has no VM of it: marked Stopped at the join
        cluster.agent("local", wait=False)
        cluster.until(lambda: _status(cluster, inst.id) == InstanceStatus.STOPPED, 60,
                      "the instance marked Stopped by the agent without --run-dir")
        assert cluster.host("local").epoch == 2  # type: ignore[union-attr]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(vm.pid, signal.SIGKILL)
        vm.wait(10)
