"""Another account's IDs answer NotFound (or, where ECS ignores unknown IDs, nothing) for
every action, and change nothing: not a row, not a disk, not a snapshot, not a VM."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from ecsnap.domain.errors import EcsError, RuleViolations
from ecsnap.domain.model import Image
from ecsnap.service import commands, disks, instances, rollback, snapshots, tasks_view
from tests.conftest import ACCOUNT, OTHER, REGION
from tests.fakes.context import FastWorld
from tests.fast.story import (
    disks_of,
    fingerprint,
    finished,
    group_items,
    make_instance,
    snapshot_everything,
    stop,
)


@pytest.fixture
def alice(world: FastWorld, image: Image) -> dict[str, Any]:
    """Alice's resources: a stopped instance with two data disks, an instance snapshot,
    a detached disk, and the task that stopped the instance."""
    ctx = world.ctx
    instance_id = make_instance(ctx, image)
    group_id = snapshot_everything(ctx, instance_id)
    stop(ctx, instance_id)
    spare = disks.create_disk(ctx, ACCOUNT, REGION, size_gib=20)
    bob_disk = disks.create_disk(ctx, OTHER, REGION, size_gib=20)
    task = instances.wait_task(ctx, instances.start_instance(ctx, ACCOUNT, instance_id))
    stop(ctx, instance_id)
    return {"instance": instance_id, "group": group_id, "items": group_items(ctx, group_id),
            "disks": disks_of(ctx, instance_id), "spare": spare, "bob_disk": bob_disk,
            "task": task.id, "image": image.id}


def not_found(world: FastWorld, action: Callable[[], object]) -> str:
    before = fingerprint(world)
    with pytest.raises(EcsError) as caught:
        action()
    assert fingerprint(world) == before, "a refused action changed something"
    assert caught.value.http_status in (400, 404), caught.value
    return caught.value.code


def test_other_accounts_ids_are_not_found(world: FastWorld, alice: dict[str, Any]) -> None:
    ctx = world.ctx
    iid, gid, items = alice["instance"], alice["group"], alice["items"]
    system, data1, _ = alice["disks"]
    snap = items[0][1]
    cases: list[tuple[str, Callable[[], object]]] = [
        ("InvalidInstanceId.NotFound", lambda: instances.start_instance(ctx, OTHER, iid)),
        ("InvalidInstanceId.NotFound", lambda: instances.stop_instance(ctx, OTHER, iid)),
        ("InvalidInstanceId.NotFound", lambda: instances.reboot_instance(ctx, OTHER, iid)),
        ("InvalidInstanceId.NotFound", lambda: instances.delete_instance(ctx, OTHER, iid)),
        ("InvalidInstanceId.NotFound",
         lambda: snapshots.create_snapshot_group(ctx, OTHER, REGION, iid)),
        ("InvalidInstanceId.NotFound",
         lambda: disks.attach_disk(ctx, OTHER, iid, alice["bob_disk"])),
        ("InvalidInstanceId.NotFound", lambda: disks.detach_disk(ctx, OTHER, iid, data1)),
        ("InvalidInstanceId.NotFound",
         lambda: disks.replace_system_disk(ctx, OTHER, iid, alice["image"])),
        ("InvalidDiskId.NotFound", lambda: snapshots.create_snapshot(ctx, OTHER, data1)),
        ("InvalidDiskId.NotFound", lambda: disks.resize_disk(ctx, OTHER, data1, 40)),
        ("InvalidDiskId.NotFound", lambda: disks.reinit_disk(ctx, OTHER, system)),
        ("InvalidDiskId.NotFound",
         lambda: disks.attach_disk(ctx, ACCOUNT, iid, alice["bob_disk"])),
        ("InvalidSnapshotId.NotFound",
         lambda: snapshots.modify_snapshot(ctx, OTHER, snap, name="mine")),
        ("InvalidSnapshotGroupId.NotFound",
         lambda: snapshots.get_snapshot_group(ctx, OTHER, gid)),
        ("InvalidSnapshotGroupId.NotFound",
         lambda: snapshots.modify_snapshot_group(ctx, OTHER, REGION, gid, name="mine")),
        ("InvalidSnapshotGroupId.NotFound",
         lambda: snapshots.delete_snapshot_group(ctx, OTHER, REGION, gid)),
        ("InvalidSnapshotGroupId.NotFound",
         lambda: rollback.preview_group_rollback(ctx, OTHER, gid)),
        ("InvalidTaskId.NotFound", lambda: tasks_view.get_task(ctx, OTHER, REGION,
                                                               alice["task"])),
    ]
    for code, action in cases:
        assert not_found(world, action) == code


def test_other_accounts_rollbacks_are_not_found(world: FastWorld,
                                                alice: dict[str, Any]) -> None:
    ctx = world.ctx
    items = alice["items"]
    every = [f for disk, _ in items for f in (("InvalidSnapshotId.NotFound", disk),
                                              ("InvalidDiskId.NotFound", disk))]
    for action in (lambda: rollback.reset_disks(ctx, OTHER, REGION, items),
                   lambda: rollback.reset_disks(ctx, OTHER, REGION, items, auto_start=True),
                   lambda: rollback.preview_reset_disks(ctx, OTHER, REGION, items)):
        before = fingerprint(world)
        with pytest.raises(RuleViolations) as caught:
            action()
        assert fingerprint(world) == before
        assert [(f.code, f.disk_id) for f in caught.value.failures] == every
        assert caught.value.http_status == 404
    disk, snap = items[1]
    before = fingerprint(world)
    with pytest.raises(RuleViolations) as caught:
        rollback.reset_disk(ctx, OTHER, disk, snap)
    assert [(f.code, f.disk_id) for f in caught.value.failures] == every[2:4]
    assert fingerprint(world) == before


def test_other_accounts_listings_are_empty_and_deletes_ignored(world: FastWorld,
                                                               alice: dict[str, Any]) -> None:
    ctx = world.ctx
    before = fingerprint(world)
    assert instances.describe_instances(ctx, OTHER, REGION).items == []
    assert instances.describe_instances(ctx, OTHER, REGION,
                                        instance_ids=[alice["instance"]]).total == 0
    assert instances.statuses(ctx, OTHER, [alice["instance"]]) == {alice["instance"]: ""}
    assert [d.id for d in disks.describe_disks(ctx, OTHER, REGION).items] == \
        [alice["bob_disk"]]
    assert snapshots.describe_snapshots(ctx, OTHER, REGION).items == []
    assert snapshots.describe_snapshot_groups(ctx, OTHER, REGION).items == []
    assert [(t.action, t.resource_id) for t in
            tasks_view.describe_tasks(ctx, OTHER, REGION).items] == \
        [("CreateDisk", alice["bob_disk"])]  # Bob's own only
    # ECS ignores an unknown ID in these deletes: no error, and nothing happens
    assert snapshots.delete_snapshot(ctx, OTHER, alice["items"][0][1]) is None
    disks.delete_disk(ctx, OTHER, alice["spare"])
    assert fingerprint(world) == before
    # Cloud Assistant: the instance is not Bob's
    with pytest.raises(EcsError) as caught:
        commands.run_command(ctx, OTHER, REGION, command_type="RunShellScript",
                             content="echo hi", instance_ids=[alice["instance"]])
    assert caught.value.code == "InvalidInstanceId.NotFound"
    assert fingerprint(world) == before


def test_the_owner_still_can(world: FastWorld, alice: dict[str, Any]) -> None:
    """The same calls by the owner go through (the refusals above are about the account)."""
    ctx = world.ctx
    snapshots.modify_snapshot_group(ctx, ACCOUNT, REGION, alice["group"], name="mine")
    finished(ctx, rollback.reset_disks(ctx, ACCOUNT, REGION, alice["items"]).task_id)
    assert tasks_view.get_task(ctx, ACCOUNT, REGION, alice["task"]).id == alice["task"]
