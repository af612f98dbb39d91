"""A full data file system (hardening item 9): the data directory on a small tmpfs.

Nearly full (less free than a snapshot needs): Describe* answers 200, CreateSnapshotGroup,
CreateSnapshot and ResetDisks are refused early with OperationDenied.NoSpace (nothing
journaled), DeleteSnapshot and DeleteSnapshotGroup work and free space. Full to the last
byte: a signed call whose nonce cannot be written answers 503 ServiceUnavailable, not 500;
once space is freed, calls succeed again.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from ecsnap import bootstrap, config
from ecsnap.entrypoints.api.app import create_app
from ecsnap.service import images, setup, space
from ecsnap.service.context import ServiceContext
from tests import qcow
from tests.api.test_app import Caller, caller
from tests.conftest import REGION
from tests.doubles import FileBackedCompute

MIB = 1024 * 1024


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "fs"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m,mode=0700", "tmpfs",
                              str(mount_point)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs here (make test runs as root): "
                    f"{mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


def free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: Path, leave: int = 0) -> None:
    """Write `path` (a new file) until its file system has at most `leave` bytes free."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for block in (MIB, 64 * 1024, 4096, 512, 1):
            while free(path.parent) - block >= leave:
                try:
                    os.write(fd, b"\xff" * block)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)


def test_a_full_data_file_system(small_fs: Path, template: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(space, "RESERVE_BYTES", 8 * MIB)  # the tmpfs is 40 MiB
    monkeypatch.setattr(space, "PER_DISK_BYTES", 1 * MIB)
    data_dir = small_fs / "data"
    ctx: ServiceContext = bootstrap.build(config.load(data_dir, background_tasks=False),
                                          compute=FileBackedCompute(), background=False)
    done = setup.initialise(ctx, REGION)
    image = images.register_image(ctx, REGION, name="tiny", os_name="Tiny", template=template,
                                  size_gib=1)
    with TestClient(create_app(ctx), base_url="http://127.0.0.1") as client:
        call: Caller = caller(client, done.access_key.id, done.access_key.secret)
        status, body = call("CreateInstance", ImageId=image.id,
                            InstanceType="ecs.t5-lc2m1.nano", DataDisk__1__Size=20)
        assert status == 200, body
        instance_id = body["InstanceId"]
        status, body = call("DescribeDisks", InstanceId=instance_id)
        disks = {d["DiskId"]: d for d in body["Disks"]["Disk"]}
        paths = {d: ctx.storage_of(REGION).path(d) for d in disks}
        for path in paths.values():
            qcow.write(path, 0x11, 0, 2 * MIB)
        status, body = call("CreateSnapshotGroup", InstanceId=instance_id)
        assert status == 200, body
        group_id = body["SnapshotGroupId"]
        data_disk = next(d for d, v in disks.items() if v["Type"] == "data")
        status, body = call("CreateSnapshot", DiskId=data_disk)
        assert status == 200, body
        snapshot_id = body["SnapshotId"]
        for path in paths.values():  # the snapshots alone hold the old data now
            qcow.write(path, 0x22, 0, 2 * MIB)

        filler = small_fs / "filler"
        fill(filler, leave=2 * MIB)  # nearly full: under what a snapshot needs
        for action, params in (("DescribeInstances", {}), ("DescribeDisks", {}),
                               ("DescribeSnapshotGroups", {"InstanceId": instance_id}),
                               ("DescribeSnapshots", {})):
            status, body = call(action, **params)
            assert status == 200, (action, body)
        _, before = call("DescribeSnapshots")
        for action, params in (
                ("CreateSnapshotGroup", {"InstanceId": instance_id}),
                ("CreateSnapshot", {"DiskId": data_disk}),
                ("ResetDisks", {"Disk__1__DiskId": data_disk,
                                "Disk__1__SnapshotId": snapshot_id})):
            status, body = call(action, **params)
            assert (status, body["Code"]) == (403, "OperationDenied.NoSpace"), (action, body)
            assert "MiB free" in body["Message"]
        _, after = call("DescribeSnapshots")
        assert after["TotalCount"] == before["TotalCount"]  # nothing was journaled
        with ctx.uow() as uow:
            assert uow.tasks.find(status="Processing") == []

        freed_from = free(small_fs)
        status, body = call("DeleteSnapshot", SnapshotId=snapshot_id)
        assert status == 200, body
        status, body = call("DeleteSnapshotGroup", SnapshotGroupId=group_id)
        assert status == 200, body
        _, left = call("DescribeSnapshots")
        assert left["TotalCount"] == 0
        assert free(small_fs) - freed_from >= 2 * MIB  # the old data went with the snapshots

        # full to the last byte, with the database's write-ahead log emptied first: no
        # nonce can be stored
        with contextlib.closing(sqlite3.connect(data_dir / "ecsnap.db")) as conn:
            busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            assert busy == 0 and (data_dir / "ecsnap.db-wal").stat().st_size == 0
        fill(small_fs / "filler-2")
        for action in ("DescribeRegions", "DeleteSnapshotGroup"):
            status, body = call(action, SnapshotGroupId="ssg-nothing")
            assert (status, body["Code"]) == (503, "ServiceUnavailable"), (action, body)
        for used in (filler, small_fs / "filler-2"):
            with contextlib.suppress(FileNotFoundError):
                used.unlink()
        status, body = call("DescribeInstances")
        assert status == 200, body
