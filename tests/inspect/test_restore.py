"""RestoreSnapshotFiles through the API app onto a stopped instance's disk (real database,
real qcow2 disks of an ext4 image, the real debugfs writer; the compute test double), and
the checks every restore makes first (paths, bounds, tenancy, the snapshot's instance).
Into a running guest: tests/e2e/test_restore_files.py (a real VM)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from ecsnap.adapters.inspect.base import DiskImage, InspectError
from ecsnap.adapters.inspect.debugfs import DebugfsReader
from ecsnap.domain.model import Image
from ecsnap.service import accounts, restore_files
from ecsnap.service import images as image_service
from ecsnap.service.context import ServiceContext
from tests.api.test_app import Caller, caller
from tests.conftest import REGION
from tests.inspect import images
from tests.inspect.conftest import ok, story_tree


@pytest.fixture
def owned_image(ctx: ServiceContext, tmp_path: Path) -> Image:
    """The story image, with files of another owner and mode than mke2fs gives."""
    template = images.make_disk(tmp_path, story_tree(tmp_path / "tree"), name="template")
    images.edit(template, ["sif /keep.txt uid 1234", "sif /keep.txt gid 2345",
                           "sif /keep.txt mode 0100640", "sif /etc/conf mode 0104755"])
    return image_service.register_image(ctx, REGION, name="story", os_name="Story Linux",
                                        template=template, size_gib=1)


@pytest.fixture
def world(ctx: ServiceContext, alice: Caller, owned_image: Image) -> dict[str, str]:
    body = ok(alice("RunInstances", ImageId=owned_image.id, InstanceType="ecs.t5-lc2m1.nano",
                    DataDisk__1__Size=20))
    [iid] = body["InstanceIdSets"]["InstanceIdSet"]
    group = ok(alice("CreateSnapshotGroup", InstanceId=iid))["SnapshotGroupId"]
    [found] = ok(alice("DescribeSnapshotGroups", SnapshotGroupId__1=group))[
        "SnapshotGroups"]["SnapshotGroup"]
    members = {s["SourceDiskType"]: s for s in found["Snapshots"]["Snapshot"]}
    return {"instance": iid, "system": members["system"]["SourceDiskId"],
            "snap": members["system"]["SnapshotId"],
            "data": members["data"]["SourceDiskId"],
            "data_snap": members["data"]["SnapshotId"]}


def task_of(alice: Caller, task_id: str) -> dict[str, Any]:
    return ok(alice("DescribeTaskAttribute", TaskId=task_id))


def fsck_clean(path: Path) -> None:
    """e2fsck -n on a read-only export: the file system the writer left is consistent."""
    reader = DebugfsReader(path.parent / "fsck-work")
    with reader.open(DiskImage(str(path), None, "d")) as disk:
        reader.check(disk)


def current(path: Path, target: tuple[bytes, ...]) -> tuple[bytes, int, int, int]:
    reader = DebugfsReader(path.parent / "read-work")
    with reader.open(DiskImage(str(path), None, "d")) as disk:
        entry = reader.stat(disk, target)
        return reader.read_file(disk, target), entry.mode, entry.uid, entry.gid


def mtime_of(path: Path, target: tuple[bytes, ...], snapshot_id: str | None = None,
             ) -> int | None:
    reader = DebugfsReader(path.parent / "read-work")
    with reader.open(DiskImage(str(path), snapshot_id, "d")) as disk:
        return reader.stat(disk, target).mtime_ns


def test_restore_onto_a_stopped_disk(ctx: ServiceContext, alice: Caller,
                                     world: dict[str, str]) -> None:
    w = world
    ok(alice("StopInstance", InstanceId=w["instance"]))
    disk = Path(ctx.storage_of(REGION).path(w["system"]))
    # the guest changed its files after the snapshot
    changed = images.host_file(disk.parent, b"changed by the guest\n")
    images.edit(disk, ["rm /keep.txt", "cd /", f"write {changed} keep.txt",
                       "sif /keep.txt mode 0100666", "rm /etc/conf",
                       "rm /replaced.txt", "symlink /replaced.txt /etc/passwd"])
    for _ in range(2):  # twice: the same result
        body = ok(alice("RestoreSnapshotFiles", InstanceId=w["instance"], SnapshotId=w["snap"],
                        Path__1="/keep.txt", Path__2="/etc/conf", Path__3="/replaced.txt"))
        assert body["RestoreMode"] == "Disk" and body["DiskId"] == w["system"]
        task = task_of(alice, body["TaskId"])
        assert task["TaskStatus"] == "Finished", task
        assert current(disk, (b"keep.txt",)) == (b"unchanged\n", 0o100640, 1234, 2345)
        assert mtime_of(disk, (b"keep.txt",)) == mtime_of(disk, (b"keep.txt",), w["snap"])
        assert current(disk, (b"etc", b"conf")) == (b"x=1\n", 0o104755, 0, 0)
        # a symlink the guest put in the way is replaced by the file, not followed
        content, mode, _, _ = current(disk, (b"replaced.txt",))
        assert content == b"R" * 300 and mode & 0o170000 == 0o100000
        fsck_clean(disk)
    # one path to another place
    body = ok(alice("RestoreSnapshotFiles", InstanceId=w["instance"], SnapshotId=w["snap"],
                    Path__1="/many/f007", TargetPath="/etc/f007.restored"))
    assert task_of(alice, body["TaskId"])["TaskStatus"] == "Finished"
    assert current(disk, (b"etc", b"f007.restored"))[0] == b"neighbour 7\n"
    # onto a directory: refused by the step, the disk left consistent
    body = ok(alice("RestoreSnapshotFiles", InstanceId=w["instance"], SnapshotId=w["snap"],
                    Path__1="/keep.txt", TargetPath="/many"))
    task = task_of(alice, body["TaskId"])
    assert (task["TaskStatus"], task["OperationProgressSet"]["OperationProgress"][0][
        "ErrorCode"]) == ("Failed", "InvalidPath.NotAFile"), task
    fsck_clean(disk)
    # the instance is free again and starts
    ok(alice("StartInstance", InstanceId=w["instance"]))


def test_what_a_restore_refuses(ctx: ServiceContext, alice: Caller, api_client: TestClient,
                                world: dict[str, str], owned_image: Image) -> None:
    w = world
    base = {"InstanceId": w["instance"], "SnapshotId": w["snap"]}
    cases: list[tuple[dict[str, str], int, str]] = [
        ({"Path__1": "/link"}, 400, "InvalidPath.NotAFile"),  # a symlink is not restored
        ({"Path__1": "/etc"}, 400, "InvalidPath.NotAFile"),
        ({"Path__1": "/nope"}, 404, "InvalidPath.NotFound"),
        ({"Path__1": "/link/keep.txt"}, 404, "InvalidPath.NotFound"),  # not followed
        ({"Path__1": "/../etc/shadow"}, 400, "InvalidParameter"),
        ({"Path__1": "/keep.txt", "TargetPath": "/a/../../b"}, 400, "InvalidParameter"),
        ({"Path__1": "/keep.txt", "Path__2": "/etc/conf", "TargetPath": "/x"}, 400,
         "InvalidParameter"),
        ({"Path__1": "relative"}, 400, "InvalidParameter"),
        ({"Path__1": "/keep.txt", "Path__2": "/keep.txt"}, 400, "InvalidParameter"),
        ({}, 400, "MissingParameter"),
        ({f"Path__{n}": f"/many/f{n:03d}" for n in range(1, restore_files.MAX_PATHS + 2)},
         400, "InvalidParameter.PathCount"),
        ({"Path__1": "/keep.txt", "SnapshotId": w["data_snap"], "InstanceId": "i-nope"}, 404,
         "InvalidInstanceId.NotFound"),
        ({"Path__1": "/keep.txt", "SnapshotId": "s-nope"}, 404, "InvalidSnapshotId.NotFound"),
    ]
    for extra, http, code in cases:
        status, body = alice("RestoreSnapshotFiles", **{**base, **extra})
        assert (status, body["Code"]) == (http, code), (extra, body)
    # a snapshot of a disk of another instance
    other = ok(alice("RunInstances", ImageId=owned_image.id, InstanceType="ecs.t5-lc2m1.nano"))
    [other_id] = other["InstanceIdSets"]["InstanceIdSet"]
    status, body = alice("RestoreSnapshotFiles", InstanceId=other_id, SnapshotId=w["snap"],
                         Path__1="/keep.txt")
    assert (status, body["Code"]) == (403, "InvalidSnapshotId.NotBelongToInstance"), body
    # too many bytes
    small = restore_files.MAX_TOTAL_BYTES
    restore_files.MAX_TOTAL_BYTES = 10
    try:
        status, body = alice("RestoreSnapshotFiles", **base, Path__1="/same_size.txt")
        assert (status, body["Code"]) == (400, "InvalidParameter.TooLarge"), body
    finally:
        restore_files.MAX_TOTAL_BYTES = small
    # another account sees neither the instance nor the snapshot
    accounts.create_account(ctx, "bob", "violet-harbour-7")
    key = accounts.create_access_key(ctx, "bob")
    bob = caller(api_client, key.id, key.secret)
    status, body = bob("RestoreSnapshotFiles", **base, Path__1="/keep.txt")
    assert (status, body["Code"]) == (404, "InvalidInstanceId.NotFound"), body
    # nothing was journaled by the refusals
    with ctx.uow(readonly=True) as uow:
        assert not uow.tasks.find(action="RestoreSnapshotFiles")


def test_a_dirty_journal_is_not_written(ctx: ServiceContext, alice: Caller,
                                        world: dict[str, str]) -> None:
    """A file system whose journal needs recovery is refused by the writer (debugfs -w
    would write past the journal), and the disk is left as it was."""
    w = world
    ok(alice("StopInstance", InstanceId=w["instance"]))
    disk = Path(ctx.storage_of(REGION).path(w["system"]))
    images.edit(disk, ["feature needs_recovery"])
    before = images.checksum(disk)
    body = ok(alice("RestoreSnapshotFiles", InstanceId=w["instance"], SnapshotId=w["snap"],
                    Path__1="/keep.txt"))
    task = task_of(alice, body["TaskId"])
    progress = task["OperationProgressSet"]["OperationProgress"][0]
    assert (task["TaskStatus"], progress["ErrorCode"]) == \
        ("Failed", "OperationDenied.UnsupportedFileSystem"), task
    assert "not shut down cleanly" in progress["ErrorMsg"]
    assert images.checksum(disk) == before


def test_the_writer_takes_guest_names_as_data(tmp_path: Path) -> None:
    """debugfs -w gets names only where they cannot be read as anything else: names it
    could misread are refused, the others (spaces, bytes that are not UTF-8) written as
    they are; a symlink on the way is not followed, a directory is not replaced."""
    import io

    from ecsnap.adapters.inspect.base import NotADirectory, NotAFile, Unsupported

    tree = images.build_tree(tmp_path / "tree", {"dir": None, "dir/f": b"old"})
    (tree / "up").symlink_to("/etc")
    qcow2 = images.make_disk(tmp_path, tree, name="names")
    writer = DebugfsReader(tmp_path / "work")
    with writer.open_writable(DiskImage(str(qcow2), None, "d")) as disk:
        for bad in (b"a\nb", b'say "hi"', b"<2>", b"..", b"a/b", b"\x7f"):
            with pytest.raises(Unsupported):
                writer.put_file(disk, (b"dir",), bad, io.BytesIO(b"x"), mode=0o644, uid=0,
                                gid=0)
        for good in (b"with space", b"caf\xe9", b"-leading-dash", b"f"):
            writer.put_file(disk, (b"dir",), good, io.BytesIO(good), mode=0o600, uid=7,
                            gid=8)
        with pytest.raises(NotADirectory):  # /up is a symlink to /etc: not followed
            writer.put_file(disk, (b"up",), b"passwd", io.BytesIO(b"x"), mode=0o644, uid=0,
                            gid=0)
        with pytest.raises(NotAFile):
            writer.put_file(disk, (), b"dir", io.BytesIO(b"x"), mode=0o644, uid=0, gid=0)
        writer.check(disk)
    for good in (b"with space", b"caf\xe9", b"-leading-dash", b"f"):
        assert current(qcow2, (b"dir", good)) == (good, 0o100600, 7, 8)
    # a snapshot is never opened for writing
    with pytest.raises(InspectError), writer.open_writable(DiskImage(str(qcow2), "s-1", "d")):
        pass
    fsck_clean(qcow2)


def test_a_restore_holds_the_instance_and_the_disk(ctx: ServiceContext, alice: Caller,
                                                   world: dict[str, str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """While its steps run, the task holds the instance and the disk (no start, no
    rollback, no second restore meanwhile); a resource another task holds is refused."""
    w = world
    ok(alice("StopInstance", InstanceId=w["instance"]))
    assert ctx.inspector is not None
    seen: list[tuple[str | None, str | None]] = []
    put_file = ctx.inspector.put_file  # type: ignore[attr-defined]

    def watching(*args: Any, **kwargs: Any) -> None:
        with ctx.uow(readonly=True) as uow:
            seen.append((uow.instances.load(w["instance"]).lock_task_id,
                         uow.disks.load(w["system"]).lock_task_id))
        put_file(*args, **kwargs)

    monkeypatch.setattr(ctx.inspector, "put_file", watching)
    body = ok(alice("RestoreSnapshotFiles", InstanceId=w["instance"], SnapshotId=w["snap"],
                    Path__1="/keep.txt"))
    assert seen == [(body["TaskId"], body["TaskId"])]
    with ctx.uow(readonly=True) as uow:  # released at the end
        assert uow.instances.load(w["instance"]).lock_task_id is None
    with ctx.uow() as uow:
        assert uow.try_lock("disk", [w["system"]], "t-someoneelse") is None
        uow.commit()
    status, answer = alice("RestoreSnapshotFiles", InstanceId=w["instance"],
                           SnapshotId=w["snap"], Path__1="/keep.txt")
    assert (status, answer["Code"]) == (403, "Operation.Conflict"), answer


def test_the_writer_keeps_the_mtime(tmp_path: Path) -> None:
    """put_file gives the file the snapshot's mtime, to the nanosecond (ext4's extra
    field), after 2038 too (its epoch bits); without one, the time of the write."""
    import io

    tree = images.build_tree(tmp_path / "tree", {"dir": None})
    qcow2 = images.make_disk(tmp_path, tree, name="times")
    writer = DebugfsReader(tmp_path / "work")
    times = {b"whole": 1_234_567_890 * 10**9, b"fraction": 1_234_567_890_123_456_789,
             b"after-2038": 4_102_444_800 * 10**9 + 5}
    with writer.open_writable(DiskImage(str(qcow2), None, "d")) as disk:
        for name, mtime_ns in times.items():
            writer.put_file(disk, (b"dir",), name, io.BytesIO(name), mode=0o644, uid=0,
                            gid=0, mtime_ns=mtime_ns)
        writer.put_file(disk, (b"dir",), b"now", io.BytesIO(b"now"), mode=0o644, uid=0,
                        gid=0)
        writer.check(disk)
    reader = DebugfsReader(tmp_path / "read")
    with reader.open(DiskImage(str(qcow2), None, "d")) as disk:
        for name, mtime_ns in times.items():
            assert reader.stat(disk, (b"dir", name)).mtime_ns == mtime_ns, name
        now = reader.stat(disk, (b"dir", b"now")).mtime_ns
        assert now is not None and abs(now - time.time_ns()) < 600 * 10**9
