"""kill -9 of ecsnap in the middle of a live snapshot of a running VM (a real QEMU VM of the
demo image): while the guest's file systems are frozen through its agent, or while the
VM is paused (FileSystemConsistent=false).

The process that takes the snapshot is a child that kills itself with SIGKILL right after
the freeze (or the QMP `stop`) returned, before the QMP transaction: the guest is left
frozen (or paused), the TakeSnapshots task Processing. ecsnap has no crash point there
(ECSNAP_CRASH_AT stops before or after a whole step), so the child wraps the agent's
(QMP's) command call: a test-only fault, nothing else of the product is changed.

Then ecsnap starts again (`bootstrap.build(..., recover=True)`): the guest must be thawed
(resumed) and answer its agent (a command writes a file on a data disk and reads it), and
the task undone cleanly: Failed, its group failed and empty, no snapshot left in any disk
file, no lock; and the next instance snapshot is taken as usual.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ecsnap import bootstrap, config
from ecsnap.adapters.compute.qemu import QemuDriver
from ecsnap.domain.model import Consistency, InvocationStatus, SnapshotStatus, TaskStatus
from ecsnap.service import commands, images, instances, setup, snapshots
from ecsnap.service.context import ServiceContext, attached_disks
from ecsnap.service.disk_files import INITIAL
from tests import qcow
from tests.conftest import REGION
from tests.live import ROOT

pytestmark = pytest.mark.qemu

CACHE = Path(os.environ.get("ECSNAP_TEST_CACHE", ROOT / ".cache"))
BOOT_TIMEOUT_S = 300.0
CHILD_TIMEOUT_S = 300.0

# The ecsnap process that dies: it takes the instance snapshot and SIGKILLs itself as soon
# as the guest is frozen (the agent's guest-fsfreeze-freeze returned) or paused (QMP stop).
CHILD = """
import os, signal, sys
from pathlib import Path
from ecsnap import bootstrap, config
from ecsnap.adapters.compute.qemu import QemuDriver
from ecsnap.adapters.compute.qemu.agent import AgentSession
from ecsnap.adapters.compute.qemu.qmp import QmpSession
from ecsnap.service import snapshots

data_dir, account, region, instance, mode = sys.argv[1:6]
session, command = (AgentSession, "guest-fsfreeze-freeze") if mode == "fsfreeze" else \\
    (QmpSession, "stop")
original = session.call if mode == "fsfreeze" else session.cmd

def killed_after(self, name, arguments=None, **kw):
    result = original(self, name, arguments, **kw)
    if name == command:
        print(f"SIGKILL after {name}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return result

setattr(session, "call" if mode == "fsfreeze" else "cmd", killed_after)
ctx = bootstrap.build(config.load(Path(data_dir), background_tasks=False), background=False)
snapshots.create_snapshot_group(ctx, account, region, instance, name="cut-short",
                                quiesce=mode == "fsfreeze")
print("the snapshot ended: the fault never fired", flush=True)
sys.exit(3)
"""


@dataclass
class Lab:
    data_dir: Path
    ctx: ServiceContext
    account: str
    instance: str
    data_disk: str
    paths: dict[str, str]

    def settings(self) -> config.Settings:
        return config.load(self.data_dir, background_tasks=False, health_gate_timeout_s=60.0)

    def restart(self) -> None:
        """ecsnap starts again on the data dir: recovery first, as `ecsnap serve` does."""
        self.ctx.extras["engine"].dispose()
        self.ctx = bootstrap.build(self.settings(), background=False, recover=True)

    @property
    def driver(self) -> QemuDriver:
        assert isinstance(self.ctx.compute, QemuDriver)
        return self.ctx.compute

    def agent(self, command: str) -> object:
        return self.driver.agent_command(self.instance, command)

    def qmp_status(self) -> str:
        return str(self.driver.qmp_command(self.instance, "query-status")["status"])

    def wait_agent(self) -> None:
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while not self.ctx.compute.guest_ping(self.instance, timeout=2):
            assert self.ctx.compute.state(self.instance).running, "the VM died"
            assert time.monotonic() < deadline, "the guest agent never answered"
            time.sleep(1)

    def run(self, command: str) -> tuple[InvocationStatus, str]:
        """RunCommand (inline: this context runs tasks and commands in the caller)."""
        _, invoke_id = commands.run_command(self.ctx, self.account, REGION,
                                            command_type="RunShellScript", content=command,
                                            instance_ids=[self.instance], timeout=30)
        [row] = commands.describe_invocation_results(self.ctx, self.account, REGION,
                                                     invoke_id=invoke_id).items
        return row.status, row.output

    def internal_snapshots(self) -> dict[str, list[str]]:
        return {d: sorted(qcow.snapshots(p)) for d, p in self.paths.items()}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """A data dir of its own with the demo image, and a Running instance with a data disk."""
    data_dir = tmp_path_factory.mktemp("crash-live") / "data"
    data_dir.mkdir()
    CACHE.mkdir(parents=True, exist_ok=True)  # the demo image's packages, between runs
    (data_dir / "config.json").write_text(json.dumps({"cache": str(CACHE)}))
    settings = config.load(data_dir, background_tasks=False, health_gate_timeout_s=60.0)
    ctx = bootstrap.build(settings, background=False)
    account = setup.initialise(ctx, REGION).account.id
    image = images.build_demo_image(ctx, REGION)
    req = instances.InstanceRequest(image_id=image.id, instance_type="ecs.t5-lc2m1.nano",
                                    data_disks=[instances.DataDiskSpec(20)])
    [instance_id] = instances.run_instances(ctx, account, REGION, req)
    with ctx.uow(readonly=True) as uow:
        storage = ctx.storage(uow, REGION)
        disks = attached_disks(uow, instance_id)
        paths = {d.id: storage.path(d.id) for d in disks}
    lab = Lab(data_dir, ctx, account, instance_id, disks[1].id, paths)
    try:
        lab.wait_agent()
        yield lab
    finally:
        lab.ctx.compute.stop(instance_id, force=True)


@pytest.fixture
def healthy(lab: Lab) -> Lab:
    """The VM as it should be before each case: running, its agent answering, thawed."""
    if lab.qmp_status() != "running" or lab.agent("guest-fsfreeze-status") != "thawed":
        lab.ctx.compute.resume_guest(lab.instance)  # what an earlier case may have left
    lab.wait_agent()
    assert (lab.qmp_status(), lab.agent("guest-fsfreeze-status")) == ("running", "thawed")
    return lab


def crash_in_child(lab: Lab, mode: str) -> str:
    """The child takes the instance snapshot and dies (SIGKILL) with the guest frozen or
    paused. Returns its output."""
    lab.ctx.extras["engine"].dispose()  # no connection of ours open while it writes
    proc = subprocess.run([sys.executable, "-c", CHILD, str(lab.data_dir), lab.account,
                           REGION, lab.instance, mode], capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT_S, cwd=ROOT, env=os.environ.copy())
    out = proc.stdout + proc.stderr
    assert proc.returncode == -9, f"the child did not die by SIGKILL ({proc.returncode}):\n" \
        f"{out[-3000:]}"
    return out


@pytest.mark.parametrize("mode", ["fsfreeze", "pause"])
def test_kill_9_in_a_live_snapshot_is_recovered(healthy: Lab, mode: str) -> None:
    lab = healthy
    assert lab.run(f"echo before-{mode} > /mnt/{lab.data_disk}/m && sync && "
                   f"cat /mnt/{lab.data_disk}/m") == (InvocationStatus.SUCCESS,
                                                      f"before-{mode}\n")
    files_before = lab.internal_snapshots()
    assert all(INITIAL in names for names in files_before.values())

    out = crash_in_child(lab, mode)
    assert ("SIGKILL after guest-fsfreeze-freeze" if mode == "fsfreeze" else
            "SIGKILL after stop") in out
    # what the crash left: the guest frozen (or paused), the task Processing
    if mode == "fsfreeze":
        assert lab.agent("guest-fsfreeze-status") == "frozen"
    else:
        assert lab.qmp_status() == "paused"
    with lab.ctx.uow(readonly=True) as uow:
        [task] = [t for t in uow.tasks.find(action="TakeSnapshots")
                  if t.status == TaskStatus.PROCESSING]
        group_id = task.resource_id

    lab.restart()

    # the guest is back: running, thawed, and its agent runs commands that write
    assert lab.qmp_status() == "running"
    assert lab.agent("guest-fsfreeze-status") == "thawed"
    assert lab.run(f"echo after-{mode} > /mnt/{lab.data_disk}/m && sync && "
                   f"cat /mnt/{lab.data_disk}/m") == (InvocationStatus.SUCCESS,
                                                      f"after-{mode}\n")
    # the task was undone cleanly
    with lab.ctx.uow(readonly=True) as uow:
        task = uow.tasks.load(task.id)
        assert (task.status, task.error_code) == (TaskStatus.FAILED, "Task.Interrupted")
        assert [t.id for t in uow.tasks.find() if t.status == TaskStatus.PROCESSING] == []
        inst = uow.instances.load(lab.instance)
        assert (inst.status.value, inst.lock_task_id) == ("Running", None)
        assert [d.lock_task_id for d in attached_disks(uow, lab.instance)] == [None, None]
    view = snapshots.get_snapshot_group(lab.ctx, lab.account, group_id)
    assert (view.group.status, view.snapshots) == (SnapshotStatus.FAILED, [])
    assert lab.internal_snapshots() == files_before, "a snapshot was left in a disk file"
    # and the next instance snapshot is taken as usual
    next_id, task_id = snapshots.create_snapshot_group(lab.ctx, lab.account, REGION,
                                                       lab.instance,
                                                       quiesce=mode == "fsfreeze")
    assert instances.wait_task(lab.ctx, task_id).status == TaskStatus.FINISHED
    view = snapshots.get_snapshot_group(lab.ctx, lab.account, next_id)
    assert view.group.status == SnapshotStatus.ACCOMPLISHED
    assert view.group.consistency == (Consistency.FILE_SYSTEM if mode == "fsfreeze"
                                      else Consistency.CRASH)
    assert {s.source_disk_id for s in view.snapshots} == set(lab.paths)
    assert (lab.qmp_status(), lab.agent("guest-fsfreeze-status")) == ("running", "thawed")
