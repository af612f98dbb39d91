"""kill -9 at every step of CreateSnapshotGroup and ResetDisks, then recovery at start-up.

Each case builds a fresh data dir, runs the operation in a real child process that
SIGKILLs itself at the named step (ECSNAP_CRASH_AT), then recovers as `ecsnap serve`
does at start-up (bootstrap with recover=True) and checks the invariants:
- every disk of a rollback holds either its pre-rollback data or its snapshot's data,
  all disks of the request together (never a mix);
- no internal snapshot in a disk file that the database does not know (no orphans), and
  every snapshot the database lists is in its file;
- no task left Processing, no lock left, the instance Stopped (no leaked reservation).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ecsnap import bootstrap, config
from ecsnap.domain.model import InstanceStatus, SnapshotStatus, TaskStatus
from ecsnap.service import images, instances, regions, snapshots
from ecsnap.service.context import ServiceContext, attached_disks
from ecsnap.service.disk_files import INITIAL
from tests import qcow
from tests.conftest import ACCOUNT, REGION

OLD = (0xA1, 0xA2, 0xA3)
NEW = (0xB1, 0xB2, 0xB3)
FAR = 5 * 1024**3  # a second region of each disk, far from the first

CHILD = f"""
import json, sys
from ecsnap import bootstrap, config
from ecsnap.service import rollback, snapshots
data_dir, action, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
ctx = bootstrap.build(config.load(data_dir), background=False)
if action == "group":
    snapshots.create_snapshot_group(ctx, "{ACCOUNT}", "{REGION}", args["instance_id"])
else:
    rollback.reset_disks(ctx, "{ACCOUNT}", "{REGION}", [tuple(i) for i in args["items"]])
"""


def build(data_dir: Path, template: Path) -> ServiceContext:
    settings = config.load(data_dir, background_tasks=False, accel="tcg")
    return bootstrap.build(settings, background=False, recover=True)


def setup_instance(data_dir: Path, template: Path, *, with_group: bool,
                   ) -> tuple[str, list[str], list[tuple[str, str]]]:
    ctx = build(data_dir, template)
    regions.ensure_region(ctx, REGION, vcpus=8, memory_mib=8192)
    image = images.register_image(ctx, REGION, name="tiny", os_name="Tiny",
                                  template=template, size_gib=1)
    req = instances.InstanceRequest(image_id=image.id, instance_type="ecs.t5-lc2m1.nano",
                                    data_disks=[instances.DataDiskSpec(20),
                                                instances.DataDiskSpec(20)])
    [instance_id] = instances.run_instances(ctx, ACCOUNT, REGION, req, start=False)
    with ctx.uow() as uow:
        storage = ctx.storage(uow, REGION)
        disk_ids = [d.id for d in attached_disks(uow, instance_id)]
        paths = [storage.path(d) for d in disk_ids]
    for path, pattern in zip(paths, OLD, strict=True):
        qcow.write(path, pattern)
        qcow.write(path, pattern, FAR, 65536)
    items: list[tuple[str, str]] = []
    if with_group:
        group_id, task_id = snapshots.create_snapshot_group(ctx, ACCOUNT, REGION, instance_id)
        assert instances.wait_task(ctx, task_id).status == TaskStatus.FINISHED
        view = snapshots.get_snapshot_group(ctx, ACCOUNT, group_id)
        items = [(s.source_disk_id, s.id) for s in view.snapshots]
        for path, pattern in zip(paths, NEW, strict=True):
            qcow.write(path, pattern)
            qcow.write(path, pattern, FAR, 65536)
    return instance_id, disk_ids, items


def crash(data_dir: Path, action: str, args: dict[str, object], point: str) -> int:
    env = {**os.environ, "ECSNAP_CRASH_AT": point, "ECSNAP_ACCEL": "tcg"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(data_dir), action, json.dumps(args)],
                          env=env, capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parents[2])
    assert proc.returncode in (0, -signal.SIGKILL), proc.stderr[-3000:]
    return proc.returncode


def check_invariants(ctx: ServiceContext, instance_id: str) -> None:
    with ctx.uow() as uow:
        assert [t.id for t in uow.tasks.find(status=TaskStatus.PROCESSING)] == []
        inst = uow.instances.get(instance_id)
        assert inst is not None
        assert inst.status == InstanceStatus.STOPPED and inst.lock_task_id is None
        storage = ctx.storage(uow, REGION)
        for disk in attached_disks(uow, instance_id):
            assert disk.lock_task_id is None
            known = {s.id for s in uow.snapshots.find(source_disk_id=disk.id)}
            assert all(s.status == SnapshotStatus.ACCOMPLISHED
                       for s in uow.snapshots.find(source_disk_id=disk.id))
            in_file = set(qcow.snapshots(storage.path(disk.id)))
            assert in_file == known | {INITIAL}, f"orphans or losses on {disk.id}"
        for group in uow.snapshot_groups.find(instance_id=instance_id):
            assert group.status != SnapshotStatus.PROGRESSING


def disk_state(ctx: ServiceContext, disk_ids: list[str]) -> str:
    """"old" if every disk holds the snapshot's data, "new" if every disk holds the
    pre-rollback data; anything else is a broken invariant."""
    with ctx.uow() as uow:
        storage = ctx.storage(uow, REGION)
        paths = [storage.path(d) for d in disk_ids]
    states = set()
    for path, old, new in zip(paths, OLD, NEW, strict=True):
        if qcow.holds(path, old) and qcow.holds(path, old, FAR, 65536):
            states.add("old")
        elif qcow.holds(path, new) and qcow.holds(path, new, FAR, 65536):
            states.add("new")
        else:
            states.add(f"garbage on {path}")
    assert len(states) == 1, f"a mix of disk states: {states}"
    return states.pop()


def group_points() -> list[str]:
    # TakeSnapshots on a Stopped instance: one step that snapshots the three disks side by
    # side; "partial" is a kill inside it, when only some disks have their snapshot
    return ["snapshot:before", "snapshot:partial", "snapshot:after", "finish:before"]


def pool_path(data_dir: Path, disk_id: str) -> str:
    return str(data_dir / "pools" / REGION / f"{disk_id}.qcow2")


@pytest.mark.parametrize("point", group_points())
def test_kill_during_create_snapshot_group(tmp_path: Path, template: Path, point: str) -> None:
    data_dir = tmp_path / "data"
    instance_id, disk_ids, _ = setup_instance(data_dir, template, with_group=False)
    at = point.replace("partial", "after")
    assert crash(data_dir, "group", {"instance_id": instance_id},
                 f"TakeSnapshots:{at}") == -signal.SIGKILL
    if point == "snapshot:partial":  # as if killed before the second disk's qemu-img ran
        path = pool_path(data_dir, disk_ids[1])
        [taken] = set(qcow.snapshots(path)) - {INITIAL}
        subprocess.run(["qemu-img", "snapshot", "-d", taken, path], check=True)
    ctx = build(data_dir, template)  # recovery runs here, as at start-up
    check_invariants(ctx, instance_id)
    page = snapshots.describe_snapshot_groups(ctx, ACCOUNT, REGION, instance_id=instance_id)
    [view] = page.items
    # the one step is marked done in the transaction that finishes the group, so a kill
    # anywhere before that commit undoes the group (check_invariants: no orphan snapshot)
    assert view.group.status == SnapshotStatus.FAILED and view.snapshots == []
    assert disk_state(ctx, disk_ids) == "old"


def reset_points() -> list[str]:
    # "revert:partial": killed inside the revert step, when only some disks are reverted
    return ["safety:before", "safety:after", "revert:before", "revert:partial",
            "revert:after", "finish:before"]


@pytest.mark.parametrize("point", reset_points())
def test_kill_during_reset_disks(tmp_path: Path, template: Path, point: str) -> None:
    data_dir = tmp_path / "data"
    instance_id, disk_ids, items = setup_instance(data_dir, template, with_group=True)
    at = point.replace("partial", "after")
    assert crash(data_dir, "reset", {"items": items}, f"ResetDisks:{at}") == -signal.SIGKILL
    if point == "revert:partial":  # the second disk back at its pre-rollback data
        path = pool_path(data_dir, disk_ids[1])
        [safety] = set(qcow.snapshots(path)) - {INITIAL} - {s for _, s in items}
        subprocess.run(["qemu-img", "snapshot", "-a", safety, path], check=True)
        assert qcow.holds(path, NEW[1])
    ctx = build(data_dir, template)
    check_invariants(ctx, instance_id)
    expected = "new" if point == "safety:before" or point == "safety:after" else "old"
    assert disk_state(ctx, disk_ids) == expected
    with ctx.uow() as uow:
        [task] = uow.tasks.find(action="ResetDisks")
        assert task.status == (TaskStatus.FAILED if expected == "new" else TaskStatus.FINISHED)


def test_without_a_crash_the_child_finishes(tmp_path: Path, template: Path) -> None:
    data_dir = tmp_path / "data"
    instance_id, disk_ids, items = setup_instance(data_dir, template, with_group=True)
    assert crash(data_dir, "reset", {"items": items}, "no-such-point") == 0
    ctx = build(data_dir, template)
    check_invariants(ctx, instance_id)
    assert disk_state(ctx, disk_ids) == "old"
