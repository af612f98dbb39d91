"""Fixtures of the inspection tests: a reader on a private work directory, and the story
disk (an ext4 qcow2, snapshotted, then changed in known ways)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from ecsnap.adapters.inspect.debugfs import DebugfsReader
from ecsnap.domain.model import Image
from ecsnap.entrypoints.api.app import create_app
from ecsnap.service import images as image_service
from ecsnap.service import setup
from ecsnap.service.context import ServiceContext
from tests.api.test_app import Caller, caller
from tests.conftest import REGION
from tests.inspect import images

SNAP = "s-before"


@pytest.fixture
def reader(tmp_path: Path) -> Iterator[DebugfsReader]:
    work = tmp_path / "inspect-work"
    yield DebugfsReader(work)
    # nothing is left behind: no mount, no file
    assert not list(work.iterdir()) if work.exists() else True
    with open("/proc/self/mountinfo") as fh:
        assert str(work) not in fh.read()


def story_tree(root: Path) -> Path:
    tree: dict[str, bytes | None] = {
        "keep.txt": b"unchanged\n", "grow.txt": b"short", "same_size.txt": b"A" * 5000,
        "replaced.txt": b"R" * 300, "deleted.txt": b"bye", "old_name.txt": b"moving",
        "perm.txt": b"p", "many": None, "etc": None, "etc/conf": b"x=1\n",
    }
    tree.update({f"many/f{n:03d}": f"neighbour {n}\n".encode() for n in range(300)})
    images.build_tree(root, tree)
    os.symlink("keep.txt", root / "link")
    os.utime(root / "link", (images.MTIME, images.MTIME), follow_symlinks=False)
    return root


# the changes made after the snapshot, and what the preview must list: path -> (change,
# what changed for a modified path)
EXPECTED: dict[str, tuple[str, set[str]]] = {
    "/deleted.txt": ("deleted", set()),
    "/grow.txt": ("modified", {"size", "mtime"}),
    "/link": ("modified", {"target"}),
    "/new_name.txt": ("added", set()),
    "/newdir": ("added", set()),
    "/newdir/a.txt": ("added", set()),
    "/old_name.txt": ("deleted", set()),
    "/perm.txt": ("modified", {"mode"}),
    "/replaced.txt": ("modified", {"content"}),
    "/same_size.txt": ("modified", {"content"}),
}


def change_story(work: Path, qcow2: Path) -> None:
    """Change the disk as a guest would: grow a file, rewrite one in place (same size, same
    mtime), replace one by another of the same size and set its mtime back, delete, rename,
    chmod, retarget a symlink, add a directory with a file."""
    longer = images.host_file(work, b"much longer than before\n")
    same = images.host_file(work, b"S" * 300)
    new = images.host_file(work, b"new file\n")
    images.edit(qcow2, [
        "rm /grow.txt", "cd /", f"write {longer} grow.txt",
        "zap_block -f /same_size.txt -p 0x42 -o 100 -l 8 1",
        "rm /replaced.txt", f"write {same} replaced.txt",
        f"set_inode_field /replaced.txt mtime @{images.MTIME}",
        "set_inode_field /replaced.txt mtime_extra 0",
        "rm /deleted.txt",
        "ln /old_name.txt /new_name.txt", "unlink /old_name.txt",
        "set_inode_field /perm.txt mode 0100600",
        "rm /link", "symlink /link /somewhere/else",
        "mkdir /newdir", "cd /newdir", f"write {new} a.txt",
    ])


@dataclass
class StoryDisk:
    qcow2: Path
    snapshot: str


@pytest.fixture
def story_disk(tmp_path: Path) -> StoryDisk:
    qcow2 = images.make_disk(tmp_path, story_tree(tmp_path / "tree"), name="story")
    images.snapshot(qcow2, SNAP)
    change_story(tmp_path, qcow2)
    return StoryDisk(qcow2, SNAP)


# ---------------------------------------------------------------- through the API


@pytest.fixture
def api_client(ctx: ServiceContext) -> Iterator[TestClient]:
    with TestClient(create_app(ctx), base_url="http://127.0.0.1") as c:
        yield c


@pytest.fixture
def alice(ctx: ServiceContext, api_client: TestClient) -> Caller:
    done = setup.initialise(ctx, REGION)
    return caller(api_client, done.access_key.id, done.access_key.secret)


@pytest.fixture
def ext4_image(ctx: ServiceContext, tmp_path: Path) -> Image:
    template = images.make_disk(tmp_path, story_tree(tmp_path / "tree"), name="template")
    return image_service.register_image(ctx, REGION, name="story", os_name="Story Linux",
                                        template=template, size_gib=1)


def ok(result: tuple[int, dict[str, Any]]) -> dict[str, Any]:
    status, body = result
    assert status == 200, body
    return body


@pytest.fixture
def api_world(ctx: ServiceContext, alice: Caller, ext4_image: Image) -> dict[str, str]:
    """An instance of the ext4 image with one blank data disk (running), and an instance
    snapshot of it."""
    body = ok(alice("RunInstances", ImageId=ext4_image.id, InstanceType="ecs.t5-lc2m1.nano",
                    DataDisk__1__Size=20))
    [iid] = body["InstanceIdSets"]["InstanceIdSet"]
    group = ok(alice("CreateSnapshotGroup", InstanceId=iid))["SnapshotGroupId"]
    [found] = ok(alice("DescribeSnapshotGroups", SnapshotGroupId__1=group))[
        "SnapshotGroups"]["SnapshotGroup"]
    members = {s["SourceDiskType"]: s for s in found["Snapshots"]["Snapshot"]}
    return {"instance": iid, "group": group, "system": members["system"]["SourceDiskId"],
            "system_snap": members["system"]["SnapshotId"],
            "data": members["data"]["SourceDiskId"], "data_snap": members["data"]["SnapshotId"]}
