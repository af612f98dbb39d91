"""Crash-test harness: run an action in a child process that SIGKILLs itself at a task's
step boundary, recover in a fresh context, and check what must hold after any crash.

- `Lab`: a data dir and a service context on it, with the `JsonFileCompute` double (its
  VMs outlive processes, as QEMU's do).
- `crash_in_child`: fork a child that builds its own context (own engine, own double) with
  the setting ECSNAP_CRASH_AT sets (`crash_at`) and runs the action; the child kills
  itself with SIGKILL at that point. A fork rather than a fresh interpreter: the child
  needs nothing of the parent but its imports (1.5 s a case saved); the parent holds no
  database connection while it runs.
- `check_invariants`: nothing left Processing or locked; every disk file and internal
  snapshot known to the database and the other way round; instances Running or Stopped
  as their VMs are, each VM with exactly its instance's In_use disks; capacity = recount.
  A disk of a region on a Ceph RBD pool: its current volume exists, its snapshots (on any
  of its volumes) are the database's, and every other volume of it holds a snapshot or
  has a clone (no orphan volume: what a rollback by clone and swap makes is either the
  disk's volume or gone).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from ecsnap import bootstrap, config
from ecsnap.adapters.storage.rbd import RbdBackend
from ecsnap.domain import rules
from ecsnap.domain.model import (
    Disk,
    DiskStatus,
    DiskType,
    Instance,
    InstanceStatus,
    Snapshot,
    SnapshotStatus,
    StoppedMode,
    Task,
    TaskStatus,
)
from ecsnap.service import regions
from ecsnap.service.context import ServiceContext
from ecsnap.service.disks import INITIAL
from ecsnap.service.operation import Operation, Plan, Step
from ecsnap.service.tasks import _places
from tests import qcow
from tests.conftest import REGION
from tests.crash_compute import JsonFileCompute

CHILD_TIMEOUT_S = 60.0


def settings(data_dir: Path, **overrides: Any) -> config.Settings:
    return config.load(data_dir, background_tasks=False, health_gate_timeout_s=2.0,
                       stop_timeout_s=1.0, accel="tcg", **overrides)


@dataclass
class Lab:
    """A data dir and a context on it (the parent's: for set-up, recovery and checks)."""

    data_dir: Path
    ctx: ServiceContext
    compute: JsonFileCompute

    @classmethod
    def open(cls, data_dir: Path, *, recover: bool) -> Lab:
        compute = JsonFileCompute(data_dir)
        ctx = bootstrap.build(settings(data_dir), compute=compute, background=False,
                              recover=recover)
        return cls(data_dir, ctx, compute)

    def close(self) -> None:
        """The context (its runner's threads first: a follow-up task a recovery submitted
        may still run on a Ceph pool, and librados aborts the process when its connection
        is shut under an operation; then the pools' connections) and the database engine."""
        self.ctx.close()
        self.ctx.extras["engine"].dispose()

    @property
    def pool(self) -> Path:
        return self.data_dir / "pools" / REGION

    def path(self, disk_id: str) -> str:
        return str(self.pool / f"{disk_id}.qcow2")

    def disk_path(self, disk_id: str) -> str:
        """Where the disk's current content is, in its region's pool (a qcow2 file, or the
        `rbd:` path of its current volume)."""
        with self.ctx.uow(readonly=True) as uow:
            disk = uow.disks.load(disk_id)
            return self.ctx.storage(uow, disk.region_id).path(disk.current_volume)

    def tasks(self, action: str) -> list[Task]:
        with self.ctx.uow(readonly=True) as uow:
            return uow.tasks.find(action=action)

    def instances(self) -> list[Instance]:
        with self.ctx.uow(readonly=True) as uow:
            return uow.instances.find()


def crash_points(op: type[Operation[Any]], plan: Plan) -> list[str]:
    """Every kill point of the operation's steps for `plan`, by place (`kind#n`), before
    and after each step, then `finish:before`: where tasks.TaskRunner can crash."""
    places = _places(op(cast(Any, None), cast(Any, None), plan).steps())  # names only
    return [f"{place}:{when}" for place in places.values() for when in ("before", "after")] \
        + ["finish:before"]


def journaled_points(task: Task) -> list[str]:
    """The same list for a journaled task, from the step names it recorded."""
    places = _places([Step(name, lambda: None) for name in task.plan["steps"]])
    return [f"{place}:{when}" for place in places.values() for when in ("before", "after")] \
        + ["finish:before"]


def crash_in_child(data_dir: Path, crash_at: str,
                   action: Callable[[ServiceContext], object]) -> tuple[int, str]:
    """Fork a child that builds its own context on `data_dir` (fresh engine, the same VM
    double), with `crash_at` as ECSNAP_CRASH_AT, and runs `action` inline. Returns the
    child's exit code (-SIGKILL when it killed itself) and its log."""
    log = data_dir / "child.log"
    pid = os.fork()
    if pid == 0:  # the child: never returns into the parent's code
        code = 70
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            logging.basicConfig(stream=os.fdopen(2, "w", buffering=1), level=logging.INFO,
                                format="%(name)s %(levelname)s %(message)s", force=True)
            ctx = bootstrap.build(settings(data_dir, crash_at=crash_at),
                                  compute=JsonFileCompute(data_dir), background=False)
            action(ctx)
            code = 0
        except BaseException:
            with open(log, "a") as fh:
                traceback.print_exc(file=fh)
        finally:
            os._exit(code)
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"the child hung: {log.read_text()[-3000:]}")
        time.sleep(0.005)
    text = log.read_text() if log.exists() else ""
    return os.waitstatus_to_exitcode(status), text


def copy_tree(source: Path, target: Path) -> None:
    """`target` replaced by a copy of `source`. A data dir is only ever put back at the
    path it was built at, so every absolute path in its database and VM double holds."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)


# ---------------------------------------------------------------- invariants


def reserved_recount(instances: Sequence[Instance]) -> tuple[int, int]:
    """vCPUs and MiB held, counted from statuses: Running instances and Stopped ones in
    KeepCharging (StopCharging gave them back)."""
    held = [i for i in instances if i.status == InstanceStatus.RUNNING or (
        i.status == InstanceStatus.STOPPED and i.stopped_mode == StoppedMode.KEEP_CHARGING)]
    return sum(i.vcpus for i in held), sum(i.memory_mib for i in held)


def orphan_bases(bases: Path, disks: dict[str, Disk], snaps: set[str]) -> list[str]:
    """A snapshot's base stays while its snapshot does; a disk's link while its file does."""
    problems = []
    for path in sorted(bases.iterdir()):
        source, _, rest = path.name.removesuffix(".qcow2").partition("@")
        snap, _, disk_id = rest.partition("+")
        needed = (disk_id in disks and os.path.exists(bases.parent / f"{disk_id}.qcow2")) \
            if disk_id else snap in snaps and source in disks
        if not needed:
            problems.append(f"orphan snapshot base in the pool: {path.name}")
    return problems


def check_invariants(lab: Lab) -> None:
    problems: list[str] = []
    with lab.ctx.uow(readonly=True) as uow:
        processing = [f"{t.action} {t.id}" for t in uow.tasks.find()
                      if t.status == TaskStatus.PROCESSING]
        instances = uow.instances.find()
        disks = uow.disks.find()
        snaps = uow.snapshots.find()
        groups = uow.snapshot_groups.find()
        all_regions = uow.regions.find()
        rbd_regions = {r.id for r in all_regions if r.storage_pool.startswith("rbd:")}
    if processing:
        problems.append(f"tasks left Processing: {processing}")
    locks = [(i.id, i.lock_task_id) for i in instances] + [(d.id, d.lock_task_id) for d in disks]
    problems += [f"lock left on {obj} by {task}" for obj, task in locks if task is not None]

    # disk files and snapshots: no orphan either way (RBD volumes: check_volumes)
    disk_by_id = {d.id: d for d in disks}
    problems += check_volumes(lab, [d for d in disks if d.region_id in rbd_regions], snaps)
    all_disks, disks = disks, [d for d in disks if d.region_id not in rbd_regions]
    files = sorted(p.name for p in lab.pool.iterdir()) if lab.pool.exists() else []
    for name in files:
        disk_id = name.removesuffix(".qcow2")
        if name == ".bases":  # snapshots' bases and disks' links to them (qcow2.py)
            problems += orphan_bases(lab.pool / name, disk_by_id, {s.id for s in snaps})
        elif not name.endswith(".qcow2") or disk_id not in disk_by_id:
            problems.append(f"orphan file in the pool: {name}")
    snaps_of: dict[str, set[str]] = {}
    for snap in snaps:
        if snap.source_disk_id not in disk_by_id:
            problems.append(f"snapshot {snap.id} of a disk with no row {snap.source_disk_id}")
        if snap.region_id in rbd_regions:
            continue
        snaps_of.setdefault(snap.source_disk_id, set()).add(snap.id)
        if snap.status != SnapshotStatus.ACCOMPLISHED:
            problems.append(f"snapshot {snap.id} left {snap.status.value}")
    for disk in disks:
        exists = os.path.exists(lab.path(disk.id))
        if not disk.released and not exists:
            problems.append(f"disk {disk.id} ({disk.status.value}) has no file")
        if disk.released and not snaps_of.get(disk.id):
            problems.append(f"released disk {disk.id} kept its row with no snapshot")
        if not exists:
            continue
        in_file = set(qcow.snapshots(lab.path(disk.id)))
        known = snaps_of.get(disk.id, set())
        if INITIAL not in in_file:
            problems.append(f"{disk.id}: no {INITIAL} snapshot")
        if in_file - known - {INITIAL}:
            problems.append(f"{disk.id}: orphan internal snapshots {in_file - known - {INITIAL}}")
        if known - in_file:
            problems.append(f"{disk.id}: snapshots the database lists are not in the file: "
                            f"{known - in_file}")
    for snap_disk in set(snaps_of) - {d.id for d in disks if os.path.exists(lab.path(d.id))}:
        problems.append(f"snapshots {snaps_of[snap_disk]} of {snap_disk}, whose file is gone")
    members: dict[str, int] = {}
    for snap in snaps:
        if snap.group_id:
            members[snap.group_id] = members.get(snap.group_id, 0) + 1
    for group in groups:
        if group.status == SnapshotStatus.PROGRESSING:
            problems.append(f"snapshot group {group.id} left progressing")
        elif group.status == SnapshotStatus.ACCOMPLISHED and not members.get(group.id):
            problems.append(f"accomplished snapshot group {group.id} has no snapshot")
        elif group.status == SnapshotStatus.FAILED and members.get(group.id):
            problems.append(f"failed snapshot group {group.id} kept {members[group.id]} "
                            "snapshots")

    # instances and disks: stable states, as the hypervisor has them
    disks = all_disks
    running = set(lab.compute.running())
    inst_ids = {i.id for i in instances}
    problems += [f"a VM runs for {i}, which has no instance" for i in running - inst_ids]
    for inst in instances:
        if inst.status not in (InstanceStatus.RUNNING, InstanceStatus.STOPPED):
            problems.append(f"instance {inst.id} left {inst.status.value}")
        if (inst.status == InstanceStatus.RUNNING) != (inst.id in running):
            problems.append(f"instance {inst.id} is {inst.status.value} but its VM "
                            f"{'runs' if inst.id in running else 'does not run'}")
        if inst.status == InstanceStatus.STOPPED and inst.stopped_mode not in (
                StoppedMode.KEEP_CHARGING, StoppedMode.STOP_CHARGING):
            problems.append(f"instance {inst.id} Stopped in mode {inst.stopped_mode.value}")
        attached = [d for d in disks if d.instance_id == inst.id and not d.released]
        systems = [d for d in attached if d.type == DiskType.SYSTEM]
        if len(systems) != 1:
            problems.append(f"instance {inst.id} has {len(systems)} system disks")
        if inst.id in running:
            in_vm = lab.compute.vm_disks(inst.id)
            wanted = {d.id: lab.disk_path(d.id) for d in attached}
            if in_vm != wanted:
                problems.append(f"the VM of {inst.id} has disks {sorted(in_vm)}, its "
                                f"instance {sorted(wanted)}")
    for disk in disks:
        if disk.status not in (DiskStatus.AVAILABLE, DiskStatus.IN_USE):
            problems.append(f"disk {disk.id} left {disk.status.value}")
        if disk.released:
            if disk.instance_id or disk.status != DiskStatus.AVAILABLE:
                problems.append(f"released disk {disk.id} is {disk.status.value} on "
                                f"{disk.instance_id}")
        elif (disk.status == DiskStatus.IN_USE) != bool(disk.instance_id):
            problems.append(f"disk {disk.id} is {disk.status.value} on {disk.instance_id!r}")
        elif disk.instance_id and disk.instance_id not in inst_ids:
            problems.append(f"disk {disk.id} is attached to a gone instance {disk.instance_id}")

    # capacity: what each region counts as reserved is a recount of the statuses
    for region in all_regions:
        mine = [i for i in instances if i.region_id == region.id]
        used = regions.region_capacity(lab.ctx, region.id)
        recount = reserved_recount(mine)
        if (used.vcpus_used, used.memory_mib_used) != recount or \
                rules.reserved(mine) != recount:
            problems.append(f"{region.id}: reserved {used.vcpus_used} vCPU / "
                            f"{used.memory_mib_used} MiB, a recount says {recount}")
        if recount[0] > region.vcpu_capacity or recount[1] > region.memory_mib_capacity:
            problems.append(f"{region.id}: more reserved than the region has: {recount}")
    assert not problems, "invariants broken after recovery:\n  " + "\n  ".join(problems)


def check_volumes(lab: Lab, disks: Sequence[Disk], snaps: Sequence[Snapshot]) -> list[str]:
    """The invariants of disks on a Ceph RBD pool (see the module docstring)."""
    import rbd

    problems: list[str] = []
    for disk in disks:
        backend = lab.ctx.storage_of(disk.region_id)
        assert isinstance(backend, RbdBackend)
        volumes = backend.volumes(disk.id)
        known = {s.id for s in snaps if s.source_disk_id == disk.id}
        problems += [f"snapshot {s.id} left {s.status.value}" for s in snaps
                     if s.source_disk_id == disk.id and s.status != SnapshotStatus.ACCOMPLISHED]
        if disk.released and not known:
            problems.append(f"released disk {disk.id} kept its row with no snapshot")
        if not volumes:
            if not disk.released or known:
                problems.append(f"disk {disk.id} has no volume")
            continue
        if disk.current_volume not in volumes and not disk.released:
            problems.append(f"disk {disk.id} is on {disk.current_volume}, which is gone")
        held = {s.name for s in backend.list_snapshots(disk.id)}
        if INITIAL not in held:
            problems.append(f"{disk.id}: no {INITIAL} snapshot")
        if held - known - {INITIAL}:
            problems.append(f"{disk.id}: orphan snapshots {held - known - {INITIAL}}")
        if known - held:
            problems.append(f"{disk.id}: snapshots the database lists are on no volume: "
                            f"{known - held}")
        for volume in volumes:
            if volume == disk.current_volume:
                continue
            # read-write: see RbdBackend._image
            with backend.ioctx() as ioctx, rbd.Image(ioctx, volume) as image:
                needed = list(image.list_snaps()) or list(image.list_children2())
            if not needed:
                problems.append(f"{disk.id}: orphan volume {volume} (not current, no "
                                "snapshot, no clone)")
    return problems


# ---------------------------------------------------------------- guest data


def write(path: str, pattern: int, *offsets: int) -> None:
    for offset in offsets or (0,):
        qcow.write(path, pattern, offset, 65536)


def holds(path: str, pattern: int, *offsets: int) -> bool:
    return all(qcow.holds(path, pattern, offset, 65536) for offset in offsets or (0,))


def data_state(paths: Sequence[str], states: dict[str, Sequence[int]],
               *offsets: int) -> str:
    """The name of the state every disk is in (states: name -> one pattern per disk), or a
    description of the mix."""
    per_disk = []
    for n, path in enumerate(paths):
        names = [name for name, patterns in states.items()
                 if holds(path, patterns[n], *offsets)]
        per_disk.append(names[0] if names else f"garbage on {Path(path).name}")
    if len(set(per_disk)) == 1:
        return per_disk[0]
    return f"a mix of disk states: {per_disk}"
