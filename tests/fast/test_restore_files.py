"""RestoreSnapshotFiles on the in-memory fakes (store, storage, hypervisor and the
file-system reader/writer of tests/fakes/inspect.py): what it refuses (and then changes
nothing), the locks it holds while it runs, and what it asks of the guest agent (a
running instance) or of the file-system writer (a stopped one): the right target, the
snapshot's content, mode, owner and mtime. The real thing: tests/inspect/test_restore.py
(debugfs), tests/e2e/test_restore_files.py and test_restore_files_crash.py (QEMU)."""

from __future__ import annotations

import stat
from dataclasses import dataclass
from typing import Any

import pytest

from ecsnap.adapters.compute.base import ExecResult
from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import Image, InstanceStatus, TaskStatus
from ecsnap.service import restore_files, snapshots
from ecsnap.service.context import ServiceContext
from tests.conftest import ACCOUNT, OTHER
from tests.fakes.context import FastWorld
from tests.fakes.inspect import FakeFile, InMemoryFileSystems, directory
from tests.fast.story import disks_of, make_instance, stop

MTIME = 1_600_000_000_123_456_789
SNAPSHOT_TREE = {
    (b"root",): directory(0o700),
    (b"root", b"precious.txt"): FakeFile(b"precious\n", stat.S_IFREG | 0o4640, 1234, 2345,
                                         MTIME),
    (b"root", b"link"): FakeFile(b"", stat.S_IFLNK | 0o777, target=b"/etc/shadow"),
    (b"dev",): directory(),
    (b"dev", b"null"): FakeFile(b"", stat.S_IFCHR | 0o666),
    (b"r",): directory(),
    (b"r", b"data.txt"): FakeFile(b"data\n", stat.S_IFREG | 0o600, 0, 0, MTIME),
}
NOW_TREE = {
    (b"root",): directory(0o700),
    (b"root", b"precious.txt"): FakeFile(b"changed\n", stat.S_IFREG | 0o777),
    (b"r",): directory(),
    (b"r", b"data.txt"): directory(),  # a directory where the file was
}


@dataclass
class Story:
    world: FastWorld
    fs: InMemoryFileSystems
    instance: str
    system: str
    data: str
    snap: str  # of the system disk
    data_snap: str

    @property
    def ctx(self) -> ServiceContext:
        return self.world.ctx


@pytest.fixture
def story(world: FastWorld, image: Image) -> Story:
    """A running instance with a data disk, a snapshot of each disk, and their trees."""
    fs = InMemoryFileSystems()
    world.ctx.inspector = fs
    instance = make_instance(world.ctx, image, data_disks=1)
    system, data = disks_of(world.ctx, instance)
    snap = snapshots.create_snapshot(world.ctx, ACCOUNT, system)
    data_snap = snapshots.create_snapshot(world.ctx, ACCOUNT, data)
    for disk, snapshot in ((system, snap), (data, data_snap)):
        fs.put_tree(disk, snapshot, SNAPSHOT_TREE)
        fs.put_tree(disk, None, NOW_TREE)
    return Story(world, fs, instance, system, data, snap, data_snap)


def restore(s: Story, paths: list[str], *, instance: str | None = None,
            snapshot: str | None = None, account: str = ACCOUNT,
            target: str | None = None) -> restore_files.RestoreResult:
    return restore_files.restore_snapshot_files(s.ctx, account, instance or s.instance,
                                                snapshot or s.snap, paths,
                                                target_path=target)


def task_of(s: Story, task_id: str):  # type: ignore[no-untyped-def]
    with s.ctx.uow(readonly=True) as uow:
        return uow.tasks.load(task_id)


def refused(s: Story, code: str, http: int, paths: list[str], **kw: Any) -> str:
    """The restore is refused with that code, journals nothing, asks nothing of the
    guest or of the writer. Returns the message."""
    compute = s.world.compute
    before = (len(compute.commands), dict(compute.guest_files), list(s.fs.puts))
    with pytest.raises(EcsError) as caught:
        restore(s, paths, **kw)
    assert (caught.value.code, caught.value.http_status) == (code, http), caught.value.message
    assert (len(compute.commands), dict(compute.guest_files), list(s.fs.puts)) == before
    with s.ctx.uow(readonly=True) as uow:
        assert not uow.tasks.find(action="RestoreSnapshotFiles")
    assert not [w for _, w in s.fs.opened if w], "a refused restore opened a disk to write"
    return caught.value.message


def test_refusals(story: Story, image: Image) -> None:
    s = story
    refused(s, "InvalidInstanceId.NotFound", 404, ["/root/precious.txt"], instance="i-nope")
    refused(s, "InvalidSnapshotId.NotFound", 404, ["/root/precious.txt"], snapshot="s-nope")
    # another account sees neither the instance nor the snapshot
    refused(s, "InvalidInstanceId.NotFound", 404, ["/root/precious.txt"], account=OTHER)
    # a snapshot of a disk of another instance: the files go back to their own disk only
    other = make_instance(s.ctx, image, data_disks=0)
    refused(s, "InvalidSnapshotId.NotBelongToInstance", 403, ["/root/precious.txt"],
            instance=other)
    # too many paths, or none, or bad ones
    many = [f"/root/f{n}" for n in range(restore_files.MAX_PATHS + 1)]
    refused(s, "InvalidParameter.PathCount", 400, many)
    refused(s, "MissingParameter", 400, [])
    refused(s, "InvalidParameter", 400, ["/root/../etc/shadow"])
    refused(s, "InvalidParameter", 400, ["/"])
    # what is not a regular file in the snapshot: a symlink, a device, a directory
    for path, kind in (("/root/link", "symlink"), ("/dev/null", "chardev"),
                       ("/root", "directory")):
        message = refused(s, "InvalidPath.NotAFile", 400, [path])
        assert f"{path} is a {kind}" in message
    refused(s, "InvalidPath.NotFound", 404, ["/root/nope"])
    refused(s, "InvalidPath.NotFound", 404, ["/root/link/x"])  # a symlink is not followed
    # an instance neither Running nor Stopped
    for status in (InstanceStatus.PENDING, InstanceStatus.STARTING, InstanceStatus.STOPPING):
        with s.ctx.uow() as uow:
            uow.instances.load(s.instance).status = status
            uow.commit()
        refused(s, "IncorrectInstanceStatus", 403, ["/root/precious.txt"])
    with s.ctx.uow() as uow:
        uow.instances.load(s.instance).status = InstanceStatus.RUNNING
        uow.commit()
    # a resource another task holds
    for kind, obj in (("instance", s.instance), ("disk", s.system)):
        with s.ctx.uow() as uow:
            assert uow.try_lock(kind, [obj], "t-someoneelse") is None
            uow.commit()
        refused(s, "Operation.Conflict", 403, ["/root/precious.txt"])
        with s.ctx.uow() as uow:
            uow.unlock(kind, [obj], "t-someoneelse")
            uow.commit()
    # no reader configured
    s.ctx.inspector = None
    refused(s, "OperationDenied.NoFileSystemReader", 403, ["/root/precious.txt"])


def test_into_the_running_guest(story: Story) -> None:
    """The agent writes the snapshot's content to `<target>.ecsnap-restore`, then the
    guest gives it the owner, mode and mtime and renames it over the target; the task
    holds the instance and the disk meanwhile."""
    s, compute = story, story.world.compute
    seen: list[tuple[str | None, str | None]] = []

    def guest(instance_id: str, command: str) -> ExecResult:
        with s.ctx.uow(readonly=True) as uow:
            seen.append((uow.instances.load(s.instance).lock_task_id,
                         uow.disks.load(s.system).lock_task_id))
        return ExecResult(exit_code=0)

    compute.exec_handler = guest
    result = restore(s, ["/root/precious.txt"])
    assert (result.mode, result.disk_id, result.status) == ("guest", s.system, "Finished")
    assert result.items == [("/root/precious.txt", "/root/precious.txt")]
    assert compute.guest_files == {
        (s.instance, "/root/precious.txt.ecsnap-restore"): b"precious\n"}
    prepare, place = [c for i, c in compute.commands if i == s.instance]
    assert "rm -f -- /root/precious.txt.ecsnap-restore" in prepare
    assert place == ("chown 1234:2345 /root/precious.txt.ecsnap-restore && "
                     "chmod 4640 /root/precious.txt.ecsnap-restore && "
                     "touch -m -d @1600000000 /root/precious.txt.ecsnap-restore && "
                     "mv -f -- /root/precious.txt.ecsnap-restore /root/precious.txt")
    assert seen == [(result.task_id, result.task_id)] * 2  # both locks, in both commands
    with s.ctx.uow(readonly=True) as uow:  # released at the end
        assert uow.instances.load(s.instance).lock_task_id is None
        assert uow.disks.load(s.system).lock_task_id is None
    assert task_of(s, result.task_id).result["restored"] == ["/root/precious.txt"]
    assert not [w for _, w in s.fs.opened if w]  # the disk is not written under the VM

    # a data disk's file goes under /mnt/<disk>, a TargetPath as it is (quoted)
    compute.guest_files.clear()
    result = restore(s, ["/r/data.txt"], snapshot=s.data_snap)
    assert result.items == [("/r/data.txt", f"/mnt/{s.data}/r/data.txt")]
    assert list(compute.guest_files) == [(s.instance, f"/mnt/{s.data}/r/data.txt"
                                          ".ecsnap-restore")]
    compute.guest_files.clear()
    restore(s, ["/r/data.txt"], snapshot=s.data_snap, target="/srv/it's here")
    assert compute.guest_files == {(s.instance, "/srv/it's here.ecsnap-restore"): b"data\n"}
    assert compute.commands[-1][1].endswith(
        "mv -f -- '/srv/it'\"'\"'s here.ecsnap-restore' '/srv/it'\"'\"'s here'")


def test_a_guest_that_refuses_fails_the_task_and_its_temporary_file_goes(
        story: Story) -> None:
    s, compute = story, story.world.compute

    def guest(instance_id: str, command: str) -> ExecResult:
        if command.startswith("chown"):
            return ExecResult(exit_code=1, stderr=b"chown: read-only file system")
        return ExecResult(exit_code=0)

    compute.exec_handler = guest
    result = restore(s, ["/root/precious.txt"])
    task = task_of(s, result.task_id)
    assert (task.status, task.error_code) == (TaskStatus.FAILED,
                                              "InvalidInstance.GuestCommandFailed")
    assert "read-only file system" in (task.error_message or "")
    assert compute.commands[-1][1] == "rm -f -- /root/precious.txt.ecsnap-restore"
    with s.ctx.uow(readonly=True) as uow:
        assert uow.instances.load(s.instance).lock_task_id is None
    # the agent gone: refused by the step, the task failed, locks released
    compute.agent_up = False
    task = task_of(s, restore(s, ["/root/precious.txt"]).task_id)
    assert task.status == TaskStatus.FAILED
    assert task.error_code == "InvalidInstance.GuestAgentError"


def test_onto_the_stopped_disk(story: Story) -> None:
    """The writer gets the disk's current state (never the snapshot) with the snapshot's
    content, mode, owner and mtime at the target path, then the check runs; the guest is
    not asked anything."""
    s = story
    stop(s.ctx, s.instance)
    seen: list[tuple[str | None, str | None]] = []
    put_file = s.fs.put_file

    def watching(*args, **kwargs):  # type: ignore[no-untyped-def]
        with s.ctx.uow(readonly=True) as uow:
            seen.append((uow.instances.load(s.instance).lock_task_id,
                         uow.disks.load(s.system).lock_task_id))
        return put_file(*args, **kwargs)

    s.fs.put_file = watching  # type: ignore[method-assign]
    commands = len(s.world.compute.commands)
    result = restore(s, ["/root/precious.txt"], target="/root/again.txt")
    assert (result.mode, result.status) == ("disk", "Finished")
    assert s.fs.puts == [(s.system, (b"root",), b"again.txt", b"precious\n", 0o4640, 1234,
                          2345, MTIME)]
    assert seen == [(result.task_id, result.task_id)]
    assert s.fs.checks == [s.system]
    assert {(p, w) for p, w in s.fs.opened if w} == {((s.system, None), True)}
    assert s.fs.tree(s.system)[(b"root", b"again.txt")].content == b"precious\n"
    assert len(s.world.compute.commands) == commands
    # a directory at the target: refused by the step, the task failed, locks released
    task = task_of(s, restore(s, ["/r/data.txt"], snapshot=s.data_snap).task_id)
    assert (task.status, task.error_code) == (TaskStatus.FAILED, "InvalidPath.NotAFile")
    with s.ctx.uow(readonly=True) as uow:
        assert uow.instances.load(s.instance).lock_task_id is None
        assert uow.disks.load(s.data).lock_task_id is None
