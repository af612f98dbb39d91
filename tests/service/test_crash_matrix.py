"""kill -9 at every step boundary of every journaled operation, then recovery at start-up.

The cases come from the registry: every operation of `OPERATIONS` has one or more
scenarios (a set-up, the action, and how to tell whether its effect happened), and every
scenario is killed before and after each step of the operation's own `steps()` for the
scenario's plan, and at `finish:before` (and once not at all). The child process builds its
own context with a hypervisor double whose VMs outlive processes (tests/crash_compute.py),
runs the action and SIGKILLs itself at the point (ECSNAP_CRASH_AT); the parent then
recovers in a fresh context, as `ecsnap serve` does at start-up, and checks:
- the invariants of tests/crash.py (nothing Processing or locked, no orphan file or
  internal snapshot either way, instances Running or Stopped as their VMs are, capacity);
- all or nothing: the operation's effect is complete ("done", the task Finished) or absent
  ("undone", the task Failed), never in between (a rollback's disks all at one state).

Each scenario's world is built once, at the path its cases use, and copied back for each
case (one data dir per case, cheap). Real QEMU crash tests: test_crash_recovery.py.

The `rbd` scenarios run in a region on a Ceph RBD pool (the throwaway cluster of
tests/ceph.py), where a rollback or a re-initialisation clones and swaps volumes and
CollectVolumes flattens and collects them; a pool cannot be copied back, so their world is
built again for each case (its disks have new IDs: cases never see each other's volumes).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ecsnap.adapters.storage.rbd import RbdBackend
from ecsnap.domain.model import (
    GIB,
    Disk,
    DiskStatus,
    DiskType,
    Instance,
    InstanceStatus,
    Snapshot,
    SnapshotGroup,
    SnapshotStatus,
    TaskStatus,
)
from ecsnap.service import (
    disks,
    images,
    instances,
    regions,
    restore_files,
    rollback,
    snapshots,
)
from ecsnap.service.context import ServiceContext, attached_disks
from ecsnap.service.disks import (
    AttachDisk,
    AttachDiskPlan,
    CreateDisk,
    CreateDiskPlan,
    DeleteDisk,
    DetachDisk,
    DetachDiskPlan,
    DiskPlan,
    ReInitDisk,
    ReInitDiskPlan,
    ReplaceSystemDisk,
    ReplaceSystemDiskPlan,
    ResizeDisk,
    ResizeDiskPlan,
)
from ecsnap.service.images import CreateImage, CreateImagePlan, DeleteImage, DeleteImagePlan
from ecsnap.service.instances import (
    DataDiskSpec,
    DeleteInstance,
    DeleteInstancePlan,
    InstanceRequest,
    RebootInstance,
    RebootInstancePlan,
    RunInstance,
    RunInstancePlan,
    StartInstance,
    StartInstancePlan,
    StopInstance,
    StopInstancePlan,
)
from ecsnap.service.operation import Operation, Plan
from ecsnap.service.registry import OPERATIONS
from ecsnap.service.restore_files import RestoreFilesPlan, RestoreSnapshotFiles
from ecsnap.service.rollback import ResetDisks, ResetDisksPlan
from ecsnap.service.snapshots import (
    DeleteSnapshots,
    DeleteSnapshotsPlan,
    TakeSnapshots,
    TakeSnapshotsPlan,
)
from ecsnap.service.volumes import MAX_CLONE_DEPTH, CollectVolumes, CollectVolumesPlan
from tests import crash, qcow
from tests.ceph import CephCluster, shared
from tests.conftest import ACCOUNT, REGION
from tests.crash import Lab

World = dict[str, Any]  # the IDs a scenario's set-up made (JSON values)
RBD_REGION = "ceph-1"  # the region of the `rbd` scenarios, on the Ceph pool
NANO = "ecs.t5-lc2m1.nano"
NO_CRASH = "none"
OLD, NEW, DIRTY = (0xA1, 0xA2), (0xB1, 0xB2), 0xC1
FAR = 5 * GIB  # a second region of each disk, far from the first


# ---------------------------------------------------------------- reading the outcome


@dataclass
class Rows:
    instances: dict[str, Instance]
    disks: dict[str, Disk]
    snapshots: dict[str, Snapshot]
    groups: dict[str, SnapshotGroup]

    @classmethod
    def read(cls, lab: Lab) -> Rows:
        with lab.ctx.uow(readonly=True) as uow:
            return cls({i.id: i for i in uow.instances.find()},
                       {d.id: d for d in uow.disks.find()},
                       {s.id: s for s in uow.snapshots.find()},
                       {g.id: g for g in uow.snapshot_groups.find()})

    def attached(self, instance_id: str) -> list[Disk]:
        return sorted((d for d in self.disks.values()
                       if d.instance_id == instance_id and not d.released),
                      key=lambda d: (d.type != DiskType.SYSTEM, d.device))

    def status(self, instance_id: str) -> str:
        inst = self.instances.get(instance_id)
        return "gone" if inst is None else f"{inst.status.value}/{inst.stopped_mode.value}"


def has_file(lab: Lab, disk_id: str) -> bool:
    return Path(lab.path(disk_id)).exists()


def virtual_gib(lab: Lab, disk_id: str) -> int:
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json",
                                      lab.path(disk_id)], check=True, capture_output=True,
                                     text=True).stdout)
    return int(info["virtual-size"]) // GIB


def verdict(done: bool, undone: bool, what: str) -> str:
    assert not (done and undone)
    return "done" if done else "undone" if undone else f"half done: {what}"


# ---------------------------------------------------------------- set-up helpers


def new_instance(lab: Lab, world: World, *, data: tuple[bool, ...] = (True,),
                 running: bool = False) -> tuple[str, list[str]]:
    """An instance (system disk + one data disk per `data`: its DeleteWithInstance)."""
    req = InstanceRequest(image_id=world["image"], instance_type=NANO,
                          data_disks=[DataDiskSpec(20, delete_with_instance=d) for d in data])
    [instance_id] = instances.run_instances(lab.ctx, ACCOUNT, world.get("region", REGION), req,
                                            start=running)
    with lab.ctx.uow(readonly=True) as uow:
        disk_ids = [d.id for d in attached_disks(uow, instance_id)]
    return instance_id, disk_ids


def new_disk(lab: Lab) -> str:
    return disks.create_disk(lab.ctx, ACCOUNT, REGION, size_gib=20)


def group_of(lab: Lab, instance_id: str, region: str = REGION,
             ) -> tuple[str, list[tuple[str, str]]]:
    group_id, _ = snapshots.create_snapshot_group(lab.ctx, ACCOUNT, region, instance_id)
    view = snapshots.get_snapshot_group(lab.ctx, ACCOUNT, group_id)
    assert view.group.status == SnapshotStatus.ACCOMPLISHED
    return group_id, [(s.source_disk_id, s.id) for s in view.snapshots]


# ---------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    """One way to run an operation: `plan` is of the shape the action will journal (its IDs
    are placeholders), so the operation's own `steps()` name the kill points."""

    name: str
    op: type[Operation[Any]]
    plan: Plan
    setup: Callable[[Lab, World], World]  # in the parent; returns the IDs it made
    act: Callable[[ServiceContext, World], object]  # in the child
    outcome: Callable[[Lab, World], str]  # "done", "undone", or what is half done
    notes: dict[str, str] = field(default_factory=dict)
    rbd: bool = False  # in a region on the Ceph pool; its world built for each case

    def points(self) -> list[str]:
        return [*crash.crash_points(self.op, self.plan), NO_CRASH]


# RunInstances / CreateInstance


def run_act(start: bool) -> Callable[[ServiceContext, World], object]:
    def act(ctx: ServiceContext, w: World) -> object:
        req = InstanceRequest(image_id=w["image"], instance_type=NANO,
                              data_disks=[DataDiskSpec(20)])
        return instances.run_instances(ctx, ACCOUNT, REGION, req, start=start)
    return act


def run_outcome(start: bool) -> Callable[[Lab, World], str]:
    def outcome(lab: Lab, w: World) -> str:
        rows = Rows.read(lab)
        if not rows.instances:
            return verdict(False, not rows.disks, f"disks {list(rows.disks)} without instance")
        [inst] = rows.instances.values()
        attached = rows.attached(inst.id)
        want = InstanceStatus.RUNNING if start else InstanceStatus.STOPPED
        ok = inst.status == want and len(attached) == 2 == len(rows.disks) and all(
            d.status == DiskStatus.IN_USE and has_file(lab, d.id) for d in attached)
        return verdict(ok, False, f"{rows.status(inst.id)}, disks "
                                  f"{[(d.id, d.status.value) for d in rows.disks.values()]}")
    return outcome


# Start / Stop / Reboot


def running_instance(lab: Lab, w: World) -> World:
    instance_id, disk_ids = new_instance(lab, w, running=True)
    return {"instance": instance_id, "disks": disk_ids}


def stopped_charging_off(lab: Lab, w: World) -> World:
    world = running_instance(lab, w)
    instances.stop_instance(lab.ctx, ACCOUNT, world["instance"], stopped_mode="StopCharging")
    return world


def instance_is(done: str, undone: str) -> Callable[[Lab, World], str]:
    """`done`, `undone`: "Status/StoppedMode", or "Status" whatever the mode."""
    def outcome(lab: Lab, w: World) -> str:
        status = Rows.read(lab).status(w["instance"])
        return verdict(status.startswith(done), status.startswith(undone), status)
    return outcome


def rebooted(lab: Lab, w: World) -> str:
    status = Rows.read(lab).status(w["instance"])
    boots = lab.compute.boots(w["instance"])
    running = status.startswith("Running")
    return verdict(running and boots >= 2, running and boots == 1, f"{status}, {boots} boots")


# DeleteInstance


def stopped_with_kept_disk(lab: Lab, w: World) -> World:
    """System disk (with a snapshot: its file outlives it), a data disk released with the
    instance, one kept."""
    instance_id, disk_ids = new_instance(lab, w, data=(True, False))
    snap = snapshots.create_snapshot(lab.ctx, ACCOUNT, disk_ids[0])
    return {"instance": instance_id, "disks": disk_ids, "snapshot": snap}


def deleted_stopped(lab: Lab, w: World) -> str:
    rows = Rows.read(lab)
    system, released, kept = (rows.disks.get(d) for d in w["disks"])
    done = w["instance"] not in rows.instances and system is not None and system.released \
        and has_file(lab, system.id) and released is None and not has_file(lab, w["disks"][1]) \
        and kept is not None and kept.status == DiskStatus.AVAILABLE and not kept.released
    undone = w["instance"] in rows.instances and [d.id for d in rows.attached(w["instance"])] \
        == w["disks"] and all(has_file(lab, d) for d in w["disks"])
    disks_now = [(rows.disks[d].status.value if d in rows.disks else "gone",
                  "file" if has_file(lab, d) else "no file") for d in w["disks"]]
    return verdict(done, undone, f"{rows.status(w['instance'])}, disks {disks_now}")


def running_system_only(lab: Lab, w: World) -> World:
    instance_id, disk_ids = new_instance(lab, w, data=(), running=True)
    return {"instance": instance_id, "disks": disk_ids}


def deleted_running(lab: Lab, w: World) -> str:
    rows = Rows.read(lab)
    [system] = w["disks"]
    done = not rows.instances and not rows.disks and not has_file(lab, system)
    undone = rows.status(w["instance"]).startswith("Running") and system in rows.disks
    return verdict(done, undone, f"{rows.status(w['instance'])}, system disk "
                                 f"{system in rows.disks}, file {has_file(lab, system)}")


# CreateDisk / AttachDisk / DetachDisk / DeleteDisk


def created_disk(lab: Lab, w: World) -> str:
    rows = Rows.read(lab)
    if not rows.disks:
        return "undone"
    [disk] = rows.disks.values()
    ok = disk.status == DiskStatus.AVAILABLE and not disk.released and has_file(lab, disk.id)
    return verdict(ok, False, f"{disk.id} {disk.status.value} file {has_file(lab, disk.id)}")


def disk_with_snapshot(lab: Lab, w: World) -> World:
    disk_id = new_disk(lab)
    return {"disk": disk_id, "snapshot": snapshots.create_snapshot(lab.ctx, ACCOUNT, disk_id)}


def restored_disk(lab: Lab, w: World) -> str:
    """A disk from the snapshot: done, its row Available, its file, and its one link to the
    snapshot's base; undone, none of them (the base itself may stay: the snapshot does)."""
    made = [d for d in Rows.read(lab).disks.values() if d.source_snapshot_id == w["snapshot"]]
    links = sorted(p.name for p in (lab.pool / ".bases").glob("*+*"))
    if not made:
        files = sorted(p.name for p in lab.pool.glob("*.qcow2"))
        return verdict(False, not links and files == [f"{w['disk']}.qcow2"],
                       f"no row; links {links}, files {files}")
    [disk] = made
    ok = disk.status == DiskStatus.AVAILABLE and has_file(lab, disk.id) and \
        links == [f"{w['disk']}@{w['snapshot']}+{disk.id}.qcow2"]
    return verdict(ok, False, f"{disk.id} {disk.status.value} file {has_file(lab, disk.id)} "
                              f"links {links}")


def instance_and_free_disk(running: bool) -> Callable[[Lab, World], World]:
    def setup(lab: Lab, w: World) -> World:
        instance_id, _ = new_instance(lab, w, data=(), running=running)
        return {"instance": instance_id, "disk": new_disk(lab)}
    return setup


def instance_with_data_disk(running: bool) -> Callable[[Lab, World], World]:
    def setup(lab: Lab, w: World) -> World:
        instance_id, disk_ids = new_instance(lab, w, running=running)
        return {"instance": instance_id, "disks": disk_ids, "disk": disk_ids[1]}
    return setup


def disk_attachment(attached_when_done: bool) -> Callable[[Lab, World], str]:
    def outcome(lab: Lab, w: World) -> str:
        disk = Rows.read(lab).disks[w["disk"]]
        on = disk.status == DiskStatus.IN_USE and disk.instance_id == w["instance"]
        off = disk.status == DiskStatus.AVAILABLE and disk.instance_id is None
        return verdict(on if attached_when_done else off, off if attached_when_done else on,
                       f"{disk.status.value} on {disk.instance_id}")
    return outcome


def free_disk(lab: Lab, w: World) -> World:
    return {"disk": new_disk(lab)}


def deleted_disk(lab: Lab, w: World) -> str:
    disk = Rows.read(lab).disks.get(w["disk"])
    file = has_file(lab, w["disk"])
    done = disk is None and not file
    undone = disk is not None and not disk.released and file
    return verdict(done, undone, f"row {disk and disk.status.value}, file {file}")


# ResizeDisk / ReInitDisk / ReplaceSystemDisk


def resized(lab: Lab, w: World) -> str:
    size, virtual = Rows.read(lab).disks[w["disk"]].size_gib, virtual_gib(lab, w["disk"])
    return verdict(size == virtual == 30, size == virtual == 20,
                   f"{size} GiB in the database, {virtual} GiB in the file")


def dirty_data_disk(lab: Lab, w: World) -> World:
    """A stopped instance whose data disk was written after a snapshot (the snapshot must
    survive a ReInitDisk)."""
    world = instance_with_data_disk(False)(lab, w)
    snapshots.create_snapshot(lab.ctx, ACCOUNT, world["disk"])
    crash.write(lab.disk_path(world["disk"]), DIRTY, 0, FAR)
    return world


def reinited(auto_start: bool) -> Callable[[Lab, World], str]:
    def outcome(lab: Lab, w: World) -> str:
        rows = Rows.read(lab)
        path, status = lab.disk_path(w["disk"]), rows.status(w["instance"])
        blank, dirty = crash.holds(path, 0, 0, FAR), crash.holds(path, DIRTY, 0, FAR)
        in_use = rows.disks[w["disk"]].status == DiskStatus.IN_USE
        started = status.startswith("Running") if auto_start else status.startswith("Stopped")
        return verdict(in_use and blank and started,
                       in_use and dirty and status.startswith("Stopped"),
                       f"blank {blank}, dirty {dirty}, {status}")
    return outcome


def stopped_with_system_snapshot(lab: Lab, w: World) -> World:
    instance_id, disk_ids = new_instance(lab, w, data=())
    snap = snapshots.create_snapshot(lab.ctx, ACCOUNT, disk_ids[0])
    return {"instance": instance_id, "disks": disk_ids, "snapshot": snap}


def replaced(lab: Lab, w: World) -> str:
    rows = Rows.read(lab)
    [old] = w["disks"]
    systems = [d.id for d in rows.attached(w["instance"]) if d.type == DiskType.SYSTEM]
    others = [d for d in rows.disks if d != old]
    done = len(systems) == 1 and systems[0] != old and rows.disks[old].released and \
        has_file(lab, old) and others == systems
    undone = systems == [old] and not rows.disks[old].released and not others
    return verdict(done, undone, f"system disks {systems}, disks {list(rows.disks)}")


# TakeSnapshots / DeleteSnapshots


def instance_group(lab: Lab, w: World) -> str:
    rows = Rows.read(lab)
    [group] = [g for g in rows.groups.values() if g.instance_id == w["instance"]]
    members = [s for s in rows.snapshots.values() if s.group_id == group.id]
    done = group.status == SnapshotStatus.ACCOMPLISHED and \
        sorted(s.source_disk_id for s in members) == sorted(w["disks"])
    undone = group.status == SnapshotStatus.FAILED and not members
    return verdict(done, undone, f"group {group.status.value} with {len(members)} snapshots")


def snapshot_of_free_disk(lab: Lab, w: World) -> str:
    rows = Rows.read(lab)
    snaps = [s for s in rows.snapshots.values() if s.source_disk_id == w["disk"]]
    return verdict(len(snaps) == 1, not snaps, f"{len(snaps)} snapshots")


def with_group(running: bool) -> Callable[[Lab, World], World]:
    def setup(lab: Lab, w: World) -> World:
        world = instance_with_data_disk(running)(lab, w)
        group_id, items = group_of(lab, world["instance"])
        return {**world, "group": group_id, "items": items}
    return setup


def group_deleted(lab: Lab, w: World) -> str:
    rows = Rows.read(lab)
    left = [s for _, s in w["items"] if s in rows.snapshots]
    group = rows.groups.get(w["group"])
    return verdict(group is None and not left,
                   group is not None and len(left) == len(w["items"]),
                   f"group {group and group.status.value}, snapshots left {left}")


def released_disk_with_snapshot(lab: Lab, w: World) -> World:
    disk_id = new_disk(lab)
    snap = snapshots.create_snapshot(lab.ctx, ACCOUNT, disk_id)
    disks.delete_disk(lab.ctx, ACCOUNT, disk_id)
    assert Rows.read(lab).disks[disk_id].released and has_file(lab, disk_id)
    return {"disk": disk_id, "snapshot": snap}


def last_snapshot_deleted(lab: Lab, w: World) -> str:
    rows = Rows.read(lab)
    snap, disk, file = w["snapshot"] in rows.snapshots, w["disk"] in rows.disks, \
        has_file(lab, w["disk"])
    return verdict(not (snap or disk or file), snap and disk and file,
                   f"snapshot row {snap}, disk row {disk}, file {file}")


# ResetDisks


def stopped_written_after_group(lab: Lab, w: World) -> World:
    world = instance_with_data_disk(False)(lab, w)
    paths = [lab.disk_path(d) for d in world["disks"]]
    for path, pattern in zip(paths, OLD, strict=True):
        crash.write(path, pattern, 0, FAR)
    group_id, items = group_of(lab, world["instance"], w.get("region", REGION))
    for path, pattern in zip(paths, NEW, strict=True):
        crash.write(path, pattern, 0, FAR)
    return {**world, "group": group_id, "items": items}


def rolled_back(keep_safety: bool, auto_start: bool) -> Callable[[Lab, World], str]:
    def outcome(lab: Lab, w: World) -> str:
        rows = Rows.read(lab)
        data = crash.data_state([lab.disk_path(d) for d in w["disks"]],
                                {"done": OLD, "undone": NEW}, 0, FAR)
        status = rows.status(w["instance"])
        safety = [g for g in rows.groups.values() if g.id != w["group"]
                  and g.status == SnapshotStatus.ACCOMPLISHED]
        done = data == "done" and len(safety) == int(keep_safety) and \
            status.startswith("Running" if auto_start else "Stopped")
        undone = data == "undone" and not safety and status.startswith("Stopped")
        return verdict(done, undone, f"data {data}, {status}, {len(safety)} safety groups")
    return outcome


def on_volumes(outcome: Callable[[Lab, World], str]) -> Callable[[Lab, World], str]:
    """`outcome` of a clone and swap: done, every disk is on a new volume and its old one
    (its ID's) still holds what it held before; undone, every disk is on its old volume."""
    def check(lab: Lab, w: World) -> str:
        verdict_ = outcome(lab, w)
        rows = Rows.read(lab)
        moved = [rows.disks[d].current_volume != d for d in w["moved"]]
        if verdict_ == "done" and not all(moved):
            return f"done on the old volumes: {moved}"
        if verdict_ == "done" and not all(crash.holds(lab.ctx.storage_of(RBD_REGION).path(d),
                                                      w["old_data"][d], 0, FAR)
                                          for d in w["moved"]):
            return "done, but an old volume was written"
        if verdict_ == "undone" and any(moved):
            return f"undone on new volumes: {moved}"
        return verdict_
    return check


def rbd_world(setup: Callable[[Lab, World], World]) -> Callable[[Lab, World], World]:
    """The set-up in the RBD region. `moved` (for `on_volumes`): the disks the action
    moves to new volumes, and `old_data` the pattern their old ones hold at 0 and FAR."""
    def run(lab: Lab, w: World) -> World:
        world = setup(lab, {**w, "region": RBD_REGION})
        return {"moved": [], "old_data": {}, **world}
    return run


def written_after_group_rbd(lab: Lab, w: World) -> World:
    world = stopped_written_after_group(lab, w)
    return {**world, "moved": world["disks"], "old_data": dict(zip(world["disks"], NEW,
                                                                    strict=True))}


def deep_and_dirty(lab: Lab, w: World) -> World:
    """For CollectVolumes: the system disk three clones deep (the next rollback goes one
    deeper, and is flattened), the data disk on a clone that holds nothing once the next
    rollback (SafetySnapshot=false) leaves it: garbage."""
    world = instance_with_data_disk(False)(lab, w)
    system, data = world["disks"]
    for d, pattern in zip(world["disks"], OLD, strict=True):
        crash.write(lab.disk_path(d), pattern, 0, FAR)
    _, items = group_of(lab, world["instance"], RBD_REGION)
    finish(lab, rollback.reset_disks(lab.ctx, ACCOUNT, RBD_REGION, items,
                                     safety_snapshot=False).task_id)
    for _ in range(MAX_CLONE_DEPTH - 2):  # its template, the group's clone, and these
        snap = snapshots.create_snapshot(lab.ctx, ACCOUNT, system)
        finish(lab, rollback.reset_disks(lab.ctx, ACCOUNT, RBD_REGION, [(system, snap)],
                                         safety_snapshot=False).task_id)
    rows = Rows.read(lab)
    storage = lab.ctx.storage_of(RBD_REGION)
    assert isinstance(storage, RbdBackend)
    assert storage.clone_depth(rows.disks[system].current_volume) == MAX_CLONE_DEPTH
    last = snapshots.create_snapshot(lab.ctx, ACCOUNT, system)
    return {**world, "items": [(system, last), *(i for i in items if i[0] == data)],
            "garbage": rows.disks[data].current_volume, "system": system}


def finish(lab: Lab, task_id: str) -> None:
    task = instances.wait_task(lab.ctx, task_id)
    assert task.status == TaskStatus.FINISHED, task.error_message


def collected(lab: Lab, w: World) -> str:
    rows = Rows.read(lab)
    storage = lab.ctx.storage_of(RBD_REGION)
    assert isinstance(storage, RbdBackend)
    depth = storage.clone_depth(rows.disks[w["system"]].current_volume)
    gone = w["garbage"] not in storage.volumes(w["disks"][1])
    data = crash.data_state([lab.disk_path(d) for d in w["disks"]], {"rolled back": OLD},
                            0, FAR)
    return verdict(depth <= MAX_CLONE_DEPTH and gone and data == "rolled back", False,
                   f"depth {depth}, garbage gone {gone}, data {data}")


# RestoreSnapshotFiles


def ext4_data_disk_changed_after_snapshot(lab: Lab, w: World) -> World:
    """A stopped instance whose data disk holds an ext4 file system with /note.txt, a
    snapshot of it, then /note.txt changed on the disk."""
    from tests.inspect import images as ext4  # the inspection tests' image tools

    world = instance_with_data_disk(False)(lab, w)
    work = lab.data_dir / "ext4"
    work.mkdir(exist_ok=True)
    made = ext4.make_disk(work, {"note.txt": b"as in the snapshot\n"}, size="16M")
    subprocess.run(["qemu-img", "convert", "-q", "-n", "-f", "qcow2", "-O", "qcow2",
                    str(made), lab.disk_path(world["disk"])], check=True)
    snap = snapshots.create_snapshot(lab.ctx, ACCOUNT, world["disk"])
    changed = ext4.host_file(work, b"changed afterwards\n")
    ext4.edit(Path(lab.disk_path(world["disk"])), ["rm /note.txt", "cd /",
                                                   f"write {changed} note.txt"])
    return {**world, "snapshot": snap}


def file_restored(lab: Lab, w: World) -> str:
    from ecsnap.adapters.inspect.base import DiskImage
    from ecsnap.adapters.inspect.debugfs import DebugfsReader

    reader = DebugfsReader(lab.data_dir / "check-inspect")
    with reader.open(DiskImage(lab.disk_path(w["disk"]), None, w["disk"])) as disk:
        content = reader.read_file(disk, (b"note.txt",))
        reader.check(disk)  # e2fsck -n: consistent whatever the crash
    status = Rows.read(lab).status(w["instance"])
    return verdict(content == b"as in the snapshot\n" and status.startswith("Stopped"),
                   content == b"changed afterwards\n", f"{content!r}, {status}")


# CreateImage / DeleteImage


def custom_images(lab: Lab) -> list[Any]:
    with lab.ctx.uow(readonly=True) as uow:
        return [i for i in uow.images.find() if i.account_id == ACCOUNT]


def with_internal(setup: Callable[[Lab, World], World]) -> Callable[[Lab, World], World]:
    """`setup`, then the names of the internal snapshots of its system disk's file."""
    def made(lab: Lab, w: World) -> World:
        world = setup(lab, w)
        return {**world, "internal": qcow.snapshots(lab.path(world["disks"][0]))}
    return made


def image_made(from_instance: bool) -> Callable[[Lab, World], str]:
    """Done: the image Available, its whole template (no staging file left), and from an
    instance the accomplished snapshot of its system disk it was made from. Undone: no
    image, or a CreateFailed one without files; no snapshot taken (row or internal)."""
    def outcome(lab: Lab, w: World) -> str:
        rows = Rows.read(lab)
        system = w["disks"][0]
        taken = [s for s in rows.snapshots.values()
                 if s.source_disk_id == system and s.id != w.get("snapshot")]
        internal = qcow.snapshots(lab.path(system))
        untouched = not taken and internal == w["internal"]
        made = custom_images(lab)
        if not made:
            return verdict(False, untouched, f"no image; snapshots {taken}, {internal}")
        [image] = made
        home = Path(image.template_path).parent
        files = sorted(p.name for p in home.iterdir()) if home.exists() else []
        source_ok = (len(taken) == 1 and taken[0].status == SnapshotStatus.ACCOMPLISHED
                     and taken[0].id in internal and image.source_snapshot_id == taken[0].id) \
            if from_instance else (untouched and image.source_snapshot_id == w["snapshot"])
        done = image.status == "Available" and files == ["template.qcow2"] and source_ok
        undone = image.status == "CreateFailed" and not home.exists() and untouched
        return verdict(done, undone, f"{image.status}, files {files}, snapshots "
                                     f"{[(s.id, s.status.value) for s in taken]}, {internal}")
    return outcome


def unused_custom_image(lab: Lab, w: World) -> World:
    world = stopped_with_system_snapshot(lab, w)
    image_id = images.create_image(lab.ctx, ACCOUNT, REGION, snapshot_id=world["snapshot"])
    return {**world, "custom": image_id}


def image_deleted(lab: Lab, w: World) -> str:
    made = custom_images(lab)
    home = lab.ctx.settings.images_dir / w["custom"]
    done = not made and not home.exists()
    undone = [(i.id, i.status) for i in made] == [(w["custom"], "Available")] and \
        (home / "template.qcow2").exists()
    return verdict(done, undone, f"rows {[(i.id, i.status) for i in made]}, files "
                                 f"{home.exists()}")


P2 = (("d-1", "s-1"), ("d-2", "s-2"))  # two (disk, snapshot) pairs
V2 = (("d-1", "d-1", "d-1.t"), ("d-2", "d-2", "d-2.t"))  # (disk, old, new volume)

SCENARIOS: tuple[Scenario, ...] = (
    Scenario("RunInstances", RunInstance, RunInstancePlan("i", ("d-1", "d-2"), True, "t"),
             lambda lab, w: {}, run_act(True), run_outcome(True)),
    Scenario("CreateInstance", RunInstance, RunInstancePlan("i", ("d-1", "d-2"), False, "t"),
             lambda lab, w: {}, run_act(False), run_outcome(False)),
    Scenario("StartInstance", StartInstance, StartInstancePlan("i", "StopCharging"),
             stopped_charging_off,
             lambda ctx, w: instances.start_instance(ctx, ACCOUNT, w["instance"]),
             instance_is("Running", "Stopped/StopCharging")),
    Scenario("StopInstance", StopInstance, StopInstancePlan("i", False, "StopCharging"),
             running_instance,
             lambda ctx, w: instances.stop_instance(ctx, ACCOUNT, w["instance"],
                                                    stopped_mode="StopCharging"),
             instance_is("Stopped/StopCharging", "Running")),
    Scenario("RebootInstance", RebootInstance, RebootInstancePlan("i"), running_instance,
             lambda ctx, w: instances.reboot_instance(ctx, ACCOUNT, w["instance"]), rebooted),
    Scenario("DeleteInstance-stopped", DeleteInstance,
             DeleteInstancePlan("i", ("d-1", "d-2", "d-3"), ("d-1", "d-2")),
             stopped_with_kept_disk,
             lambda ctx, w: instances.delete_instance(ctx, ACCOUNT, w["instance"]),
             deleted_stopped),
    Scenario("DeleteInstance-running", DeleteInstance,
             DeleteInstancePlan("i", ("d-1",), ("d-1",)), running_system_only,
             lambda ctx, w: instances.delete_instance(ctx, ACCOUNT, w["instance"], force=True),
             deleted_running),
    Scenario("CreateDisk", CreateDisk, CreateDiskPlan("d"), lambda lab, w: {},
             lambda ctx, w: new_disk_in(ctx), created_disk),
    Scenario("CreateDisk-from-snapshot", CreateDisk, CreateDiskPlan("d", "d-src"),
             disk_with_snapshot,
             lambda ctx, w: disks.create_disk(ctx, ACCOUNT, REGION, size_gib=None,
                                              snapshot_id=w["snapshot"]), restored_disk),
    Scenario("AttachDisk-stopped", AttachDisk, AttachDiskPlan("d", "i", "/dev/xvdb"),
             instance_and_free_disk(False),
             lambda ctx, w: disks.attach_disk(ctx, ACCOUNT, w["instance"], w["disk"]),
             disk_attachment(True)),
    Scenario("AttachDisk-live", AttachDisk, AttachDiskPlan("d", "i", "/dev/xvdb", live=True),
             instance_and_free_disk(True),
             lambda ctx, w: disks.attach_disk(ctx, ACCOUNT, w["instance"], w["disk"]),
             disk_attachment(True)),
    Scenario("DetachDisk-stopped", DetachDisk, DetachDiskPlan("d", "i"),
             instance_with_data_disk(False),
             lambda ctx, w: disks.detach_disk(ctx, ACCOUNT, w["instance"], w["disk"]),
             disk_attachment(False)),
    Scenario("DetachDisk-live", DetachDisk, DetachDiskPlan("d", "i", live=True),
             instance_with_data_disk(True),
             lambda ctx, w: disks.detach_disk(ctx, ACCOUNT, w["instance"], w["disk"]),
             disk_attachment(False)),
    Scenario("DeleteDisk", DeleteDisk, DiskPlan("d"), free_disk,
             lambda ctx, w: disks.delete_disk(ctx, ACCOUNT, w["disk"]), deleted_disk),
    Scenario("ResizeDisk", ResizeDisk, ResizeDiskPlan("d", 30), instance_with_data_disk(False),
             lambda ctx, w: disks.resize_disk(ctx, ACCOUNT, w["disk"], 30), resized),
    Scenario("ReInitDisk", ReInitDisk, ReInitDiskPlan("d", "i"), dirty_data_disk,
             lambda ctx, w: disks.reinit_disk(ctx, ACCOUNT, w["disk"]), reinited(False)),
    Scenario("ReInitDisk-autostart", ReInitDisk, ReInitDiskPlan("d", "i", True),
             dirty_data_disk,
             lambda ctx, w: disks.reinit_disk(ctx, ACCOUNT, w["disk"], auto_start=True),
             reinited(True)),
    Scenario("ReplaceSystemDisk", ReplaceSystemDisk,
             ReplaceSystemDiskPlan("i", "d-new", "d-old", "t", "m"),
             stopped_with_system_snapshot,
             lambda ctx, w: disks.replace_system_disk(ctx, ACCOUNT, w["instance"], w["image"]),
             replaced),
    Scenario("CreateSnapshotGroup-stopped", TakeSnapshots,
             TakeSnapshotsPlan("i", "g", P2, True, False), instance_with_data_disk(False),
             lambda ctx, w: snapshots.create_snapshot_group(ctx, ACCOUNT, REGION,
                                                            w["instance"]),
             instance_group),
    Scenario("CreateSnapshotGroup-live", TakeSnapshots,
             TakeSnapshotsPlan("i", "g", P2, True, True), instance_with_data_disk(True),
             lambda ctx, w: snapshots.create_snapshot_group(ctx, ACCOUNT, REGION,
                                                            w["instance"]),
             instance_group),
    Scenario("CreateSnapshot-of-free-disk", TakeSnapshots,
             TakeSnapshotsPlan("", None, P2[:1], True, False), free_disk,
             lambda ctx, w: snapshots.create_snapshot(ctx, ACCOUNT, w["disk"]),
             snapshot_of_free_disk),
    Scenario("DeleteSnapshotGroup-stopped", DeleteSnapshots,
             DeleteSnapshotsPlan("g", P2, ("d-1", "d-2")), with_group(False),
             lambda ctx, w: snapshots.delete_snapshot_group(ctx, ACCOUNT, REGION, w["group"]),
             group_deleted),
    Scenario("DeleteSnapshotGroup-live", DeleteSnapshots,
             DeleteSnapshotsPlan("g", P2, ("d-1", "d-2")), with_group(True),
             lambda ctx, w: snapshots.delete_snapshot_group(ctx, ACCOUNT, REGION, w["group"]),
             group_deleted),
    Scenario("DeleteSnapshot-of-released-disk", DeleteSnapshots,
             DeleteSnapshotsPlan(None, P2[:1]), released_disk_with_snapshot,
             lambda ctx, w: snapshots.delete_snapshot(ctx, ACCOUNT, w["snapshot"]),
             last_snapshot_deleted),
    Scenario("ResetDisks", ResetDisks, ResetDisksPlan("i", P2, P2, "g", True, False),
             stopped_written_after_group,
             lambda ctx, w: rollback.reset_disks(ctx, ACCOUNT, REGION,
                                                 [tuple(i) for i in w["items"]]),
             rolled_back(True, False)),
    Scenario("ResetDisks-nosafety-autostart", ResetDisks,
             ResetDisksPlan("i", P2, P2, "g", False, True), stopped_written_after_group,
             lambda ctx, w: rollback.reset_disks(ctx, ACCOUNT, REGION,
                                                 [tuple(i) for i in w["items"]],
                                                 auto_start=True, safety_snapshot=False),
             rolled_back(False, True)),
    Scenario("ResetDisks-rbd", ResetDisks,
             ResetDisksPlan("i", P2, P2, "g", True, False, V2),
             rbd_world(written_after_group_rbd),
             lambda ctx, w: rollback.reset_disks(ctx, ACCOUNT, RBD_REGION,
                                                 [tuple(i) for i in w["items"]]),
             on_volumes(rolled_back(True, False)), rbd=True),
    Scenario("ResetDisks-rbd-nosafety-autostart", ResetDisks,
             ResetDisksPlan("i", P2, P2, "g", False, True, V2),
             rbd_world(written_after_group_rbd),
             lambda ctx, w: rollback.reset_disks(ctx, ACCOUNT, RBD_REGION,
                                                 [tuple(i) for i in w["items"]],
                                                 auto_start=True, safety_snapshot=False),
             on_volumes(rolled_back(False, True)), rbd=True),
    Scenario("ReInitDisk-rbd", ReInitDisk, ReInitDiskPlan("d", "i", False, "d", "d.t"),
             rbd_world(dirty_data_disk),
             lambda ctx, w: disks.reinit_disk(ctx, ACCOUNT, w["disk"]), reinited(False),
             rbd=True),
    Scenario("CollectVolumes-rbd", CollectVolumes, CollectVolumesPlan(("d-1", "d-2")),
             rbd_world(deep_and_dirty),
             lambda ctx, w: rollback.reset_disks(ctx, ACCOUNT, RBD_REGION,
                                                 [tuple(i) for i in w["items"]],
                                                 safety_snapshot=False),
             collected, rbd=True),
    Scenario("CreateImage-from-snapshot", CreateImage, CreateImagePlan("m", "d", "s"),
             with_internal(stopped_with_system_snapshot),
             lambda ctx, w: images.create_image(ctx, ACCOUNT, REGION,
                                                snapshot_id=w["snapshot"]),
             image_made(False)),
    Scenario("CreateImage-from-running-instance", CreateImage,
             CreateImagePlan("m", "d", "s", "i", True), with_internal(running_system_only),
             lambda ctx, w: images.create_image(ctx, ACCOUNT, REGION,
                                                instance_id=w["instance"]),
             image_made(True)),
    Scenario("DeleteImage", DeleteImage, DeleteImagePlan(("m",)), unused_custom_image,
             lambda ctx, w: images.delete_image(ctx, ACCOUNT, REGION, w["custom"]),
             image_deleted),
    Scenario("RestoreSnapshotFiles-stopped", RestoreSnapshotFiles,
             RestoreFilesPlan("i", "d", "s", REGION, "disk", (("/note.txt", "/note.txt"),)),
             ext4_data_disk_changed_after_snapshot,
             lambda ctx, w: restore_files.restore_snapshot_files(
                 ctx, ACCOUNT, w["instance"], w["snapshot"], ["/note.txt"]),
             file_restored),
)


def new_disk_in(ctx: ServiceContext) -> str:
    return disks.create_disk(ctx, ACCOUNT, REGION, size_gib=20)


def cases() -> list[Any]:
    """(scenario, point) for every operation of the registry, in its order; an operation
    without a scenario is a case that fails."""
    out = []
    for op in OPERATIONS:
        mine = [s for s in SCENARIOS if s.op is op]
        out += [pytest.param(s, p, id=f"{s.name}-{p}") for s in mine for p in s.points()]
        if not mine:
            out.append(pytest.param(None, op.action, id=f"{op.action}-no-scenario"))
    return out


# ---------------------------------------------------------------- the worlds


class Worlds:
    """Each scenario's world, built once at the data dir its cases use and kept as a
    golden copy; `fresh` puts the copy back (an `rbd` scenario's: built again, with
    `ceph` set)."""

    def __init__(self, root: Path, template: Path) -> None:
        self.root, self.template = root, template
        self.built: dict[str, World] = {}
        self.ceph: CephCluster | None = None

    def fresh(self, scenario: Scenario) -> tuple[Path, World]:
        data_dir = self.root / scenario.name / "data"
        golden = self.root / scenario.name / "golden"
        if scenario.rbd:
            shutil.rmtree(data_dir, ignore_errors=True)
            self.built.pop(scenario.name, None)
        if scenario.name not in self.built:
            lab = Lab.open(data_dir, recover=False)
            try:
                regions.ensure_region(lab.ctx, REGION, vcpus=8, memory_mib=8192)
                region = REGION
                if scenario.rbd:
                    assert self.ceph is not None
                    region = RBD_REGION
                    regions.ensure_region(lab.ctx, region, vcpus=8, memory_mib=8192,
                                          storage_pool=self.ceph.spec())
                image = images.register_image(lab.ctx, region, name="tiny", os_name="Tiny",
                                              template=self.template, size_gib=1)
                world: World = {"image": image.id}
                world.update(scenario.setup(lab, world))
                with lab.ctx.uow(readonly=True) as uow:
                    world["tasks"] = [t.id for t in uow.tasks.find()]
                    assert all(t.status == TaskStatus.FINISHED for t in uow.tasks.find())
                crash.check_invariants(lab)
            finally:
                lab.close()
            crash.copy_tree(data_dir, golden)
            self.built[scenario.name] = world
        else:
            crash.copy_tree(golden, data_dir)
        return data_dir, self.built[scenario.name]


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory, template: Path) -> Worlds:
    return Worlds(tmp_path_factory.mktemp("crash-matrix"), template)


@pytest.fixture(scope="session")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    with shared(tmp_path_factory) as cluster:
        yield cluster


def remove_volumes_of(lab: Lab) -> None:
    """An `rbd` case's images: its world's disks, every volume (the pool is shared)."""
    for disk in Rows.read(lab).disks.values():
        if disk.region_id == RBD_REGION:
            lab.ctx.storage_of(RBD_REGION).delete(disk.id)


# ---------------------------------------------------------------- the tests


def test_every_operation_has_a_scenario() -> None:
    covered = {s.op for s in SCENARIOS}
    assert [op.action for op in OPERATIONS if op not in covered] == [], \
        "an operation of the registry has no crash scenario in this file"
    assert [s.name for s in SCENARIOS if s.op not in OPERATIONS] == []
    assert [s.name for s in SCENARIOS if not isinstance(s.plan, s.op.plan_type)] == []
    assert len({s.name for s in SCENARIOS}) == len(SCENARIOS)


@pytest.mark.parametrize(("scenario", "point"), cases())
def test_kill_at_every_step_then_recover(worlds: Worlds, scenario: Scenario | None,
                                        point: str, request: pytest.FixtureRequest) -> None:
    assert scenario is not None, f"{point} has no crash scenario: add one to SCENARIOS"
    if scenario.rbd:
        worlds.ceph = request.getfixturevalue("ceph")
    data_dir, world = worlds.fresh(scenario)
    crash_at = "" if point == NO_CRASH else f"{scenario.op.action}:{point}"
    code, log = crash.crash_in_child(data_dir, crash_at, lambda ctx: scenario.act(ctx, world))
    want = 0 if point == NO_CRASH else -signal.SIGKILL
    assert code == want, f"child exit {code} at {crash_at or 'no crash point'}:\n{log[-4000:]}"

    lab = Lab.open(data_dir, recover=True)  # recovery, as at start-up
    try:
        [task] = [t for t in lab.tasks(scenario.op.action) if t.id not in world["tasks"]]
        assert crash.journaled_points(task) == crash.crash_points(scenario.op, scenario.plan), \
            f"the scenario's plan does not have the journaled steps {task.plan['steps']}"
        crash.check_invariants(lab)
        outcome = scenario.outcome(lab, world)
        expected = {TaskStatus.FINISHED: "done", TaskStatus.FAILED: "undone"}[task.status]
        assert outcome == expected, f"task {task.status.value} ({task.error_code}) but " \
                                    f"the outcome is: {outcome}"
        print(f"{scenario.name} {point}: {outcome} ({task.status.value})")
    finally:
        if scenario.rbd:
            remove_volumes_of(lab)
        lab.close()
