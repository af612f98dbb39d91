"""kill -9 of ecsnap in the middle of RestoreSnapshotFiles into a running guest (a real
QEMU VM of the demo image, its guest agent), then recovery.

The process that restores is a child (its own context on the data dir, as `ecsnap serve`
builds it) that kills itself with SIGKILL:
- at a step boundary, through ECSNAP_CRASH_AT (`copy#1:before`, `copy#1:after`,
  `copy#2:after`, `finish:before`);
- in the middle of a copy, right after the agent wrote the temporary file
  (`<target>.ecsnap-restore`) and before it was renamed over the target: ecsnap has no
  crash point inside a step, so the child wraps the agent's `guest_write_file` (a
  test-only fault; nothing else of the product is changed). The temporary file is in the
  guest when ecsnap starts again.

Then ecsnap starts again (`bootstrap.build(..., recover=True)`, recovery first, as
`ecsnap serve` does): the task goes forward and is Finished; the guest's files have the
snapshot's content, mode, owner and mtime; no `.ecsnap-restore` file is left in the
guest; no lock is left on the instance or its disk.
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
from ecsnap.domain.model import InvocationStatus, TaskStatus
from ecsnap.service import commands, images, instances, setup, snapshots
from ecsnap.service.context import ServiceContext, attached_disks
from tests.conftest import REGION
from tests.live import ROOT

pytestmark = pytest.mark.qemu

CACHE = Path(os.environ.get("ECSNAP_TEST_CACHE", ROOT / ".cache"))
BOOT_TIMEOUT_S = 300.0
CHILD_TIMEOUT_S = 300.0
MTIME = 1_600_000_000  # the files' mtime in the snapshot
FILES = {"/root/precious.txt": ("precious\\nbytes\\n", "1234:2345", "640"),
         "/root/other.txt": ("other\\n", "0:7", "4751")}
SHOW = "for f in {files}; do stat -c '%n %a %u %g %Y' $f && cat $f; done"
TEMPS = "find / -xdev -name '*.ecsnap-restore' 2>/dev/null"

# The ecsnap process that dies: it restores the files and SIGKILLs itself at the point
# ECSNAP_CRASH_AT names (in the task runner), or (`mode` "written") as soon as the agent
# wrote the first temporary file.
CHILD = """
import os, signal, sys
from pathlib import Path
from ecsnap import bootstrap, config
from ecsnap.adapters.compute.qemu.guest import QemuGuestAgent
from ecsnap.service import restore_files

data_dir, account, instance, snapshot, mode, *paths = sys.argv[1:]
if mode == "written":
    original = QemuGuestAgent.guest_write_file

    def killed_after(self, instance_id, path, data, **kw):
        original(self, instance_id, path, data, **kw)
        print(f"SIGKILL after writing {path}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    QemuGuestAgent.guest_write_file = killed_after
ctx = bootstrap.build(config.load(Path(data_dir), background_tasks=False), background=False)
restore_files.restore_snapshot_files(ctx, account, instance, snapshot, paths)
print("the restore ended: the fault never fired", flush=True)
sys.exit(3)
"""


@dataclass
class Lab:
    data_dir: Path
    ctx: ServiceContext
    account: str
    instance: str
    system_disk: str
    snapshot: str = ""

    def settings(self) -> config.Settings:
        return config.load(self.data_dir, background_tasks=False, health_gate_timeout_s=60.0)

    def restart(self) -> None:
        """ecsnap starts again on the data dir: recovery first, as `ecsnap serve` does."""
        self.ctx.extras["engine"].dispose()
        self.ctx = bootstrap.build(self.settings(), background=False, recover=True)

    def wait_agent(self) -> None:
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while not self.ctx.compute.guest_ping(self.instance, timeout=2):
            assert self.ctx.compute.state(self.instance).running, "the VM died"
            assert time.monotonic() < deadline, "the guest agent never answered"
            time.sleep(1)

    def run(self, command: str) -> str:
        """RunCommand (inline: this context runs tasks and commands in the caller); its
        output, the command having succeeded."""
        _, invoke_id = commands.run_command(self.ctx, self.account, REGION,
                                            command_type="RunShellScript", content=command,
                                            instance_ids=[self.instance], timeout=30)
        [row] = commands.describe_invocation_results(self.ctx, self.account, REGION,
                                                     invoke_id=invoke_id).items
        assert row.status == InvocationStatus.SUCCESS, (row.status, row.output)
        return row.output


def as_in_snapshot() -> str:
    return "".join(f"{path} {mode} {owner.replace(':', ' ')} {MTIME}\n" +
                   content.replace("\\n", "\n")
                   for path, (content, owner, mode) in FILES.items())


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """A data dir of its own with the demo image, a Running instance, its files written
    with their owner, mode and mtime, and a snapshot of its system disk."""
    data_dir = tmp_path_factory.mktemp("crash-restore") / "data"
    data_dir.mkdir()
    CACHE.mkdir(parents=True, exist_ok=True)  # the demo image's packages, between runs
    (data_dir / "config.json").write_text(json.dumps({"cache": str(CACHE)}))
    settings = config.load(data_dir, background_tasks=False, health_gate_timeout_s=60.0)
    ctx = bootstrap.build(settings, background=False)
    account = setup.initialise(ctx, REGION).account.id
    image = images.build_demo_image(ctx, REGION)
    req = instances.InstanceRequest(image_id=image.id, instance_type="ecs.t5-lc2m1.nano",
                                    data_disks=[])
    [instance_id] = instances.run_instances(ctx, account, REGION, req)
    with ctx.uow(readonly=True) as uow:
        [system] = [d.id for d in attached_disks(uow, instance_id)]
    lab = Lab(data_dir, ctx, account, instance_id, system)
    try:
        lab.wait_agent()
        lab.run(" && ".join(f"printf '{content}' > {path} && chown {owner} {path} && "
                            f"chmod {mode} {path} && touch -m -d @{MTIME} {path}"
                            for path, (content, owner, mode) in FILES.items()) + " && sync")
        lab.snapshot = snapshots.create_snapshot(lab.ctx, account, system)
        yield lab
    finally:
        lab.ctx.compute.stop(instance_id, force=True)


@pytest.fixture
def changed(lab: Lab) -> Lab:
    """The files changed after the snapshot (content, owner, mode, mtime), as each case
    starts."""
    lab.wait_agent()
    lab.run(" && ".join(f"echo changed > {p} && chown 0:0 {p} && chmod 777 {p}"
                        for p in FILES) + " && sync")
    assert as_in_snapshot() != lab.run(SHOW.format(files=" ".join(FILES)))
    return lab


def crash_in_child(lab: Lab, mode: str) -> str:
    """The child restores FILES from the snapshot and dies (SIGKILL) where `mode` says (a
    crash point, or "written"). Returns its output."""
    lab.ctx.extras["engine"].dispose()  # no connection of ours open while it writes
    env = {k: v for k, v in os.environ.items() if k != "ECSNAP_CRASH_AT"}
    if mode != "written":
        env["ECSNAP_CRASH_AT"] = f"RestoreSnapshotFiles:{mode}"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(lab.data_dir), lab.account,
                           lab.instance, lab.snapshot, mode, *FILES], capture_output=True,
                          text=True, timeout=CHILD_TIMEOUT_S, cwd=ROOT, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == -9, f"the child did not die by SIGKILL ({proc.returncode}):\n" \
        f"{out[-3000:]}"
    return out


@pytest.mark.parametrize("mode", ["copy#1:before", "copy#1:after", "copy#2:after",
                                  "finish:before", "written"])
def test_kill_9_in_a_restore_into_the_guest_is_recovered(changed: Lab, mode: str) -> None:
    lab = changed
    out = crash_in_child(lab, mode)
    # what the crash left: the task Processing, the instance and its disk locked
    with lab.ctx.uow(readonly=True) as uow:
        [task] = [t for t in uow.tasks.find(action="RestoreSnapshotFiles")
                  if t.status == TaskStatus.PROCESSING]
        assert uow.instances.load(lab.instance).lock_task_id == task.id
        assert uow.disks.load(lab.system_disk).lock_task_id == task.id
    if mode == "written":  # the temporary file is in the guest, the target not yet back
        assert "SIGKILL after writing /root/precious.txt.ecsnap-restore" in out, out
        found = lab.ctx.compute.guest_exec(lab.instance, TEMPS, timeout=30)
        assert found.stdout.decode() == "/root/precious.txt.ecsnap-restore\n"
        assert lab.ctx.compute.guest_exec(lab.instance, "cat /root/precious.txt",
                                          timeout=30).stdout == b"changed\n"

    lab.restart()

    with lab.ctx.uow(readonly=True) as uow:
        task = uow.tasks.load(task.id)
        assert task.status == TaskStatus.FINISHED, (task.error_code, task.error_message)
        assert sorted(task.result.get("restored", [])) == sorted(FILES)
        assert [t.id for t in uow.tasks.find() if t.status == TaskStatus.PROCESSING] == []
        inst = uow.instances.load(lab.instance)
        assert (inst.status.value, inst.lock_task_id) == ("Running", None)
        assert [d.lock_task_id for d in attached_disks(uow, lab.instance)] == [None]
    # the files as in the snapshot (content, mode, owner, mtime); no temporary file left
    assert lab.run(SHOW.format(files=" ".join(FILES))) == as_in_snapshot()
    assert lab.run(TEMPS + "; true") == ""
