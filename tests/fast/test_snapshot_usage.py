"""What a snapshot was used for, on the in-memory fakes: DeleteSnapshotGroup keeps a member
that backs a custom image or created disks (ECS), and DescribeSnapshots' `Usage` (image,
disk, image_disk, none) and DescribeImages' `Usage` (instance, none) are computed from the
disks, images and instances there are, and filter as ECS does."""

from __future__ import annotations

import pytest

from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import Image
from ecsnap.service import disks, images, instances, snapshots
from ecsnap.service.snapshots import MemberOutcome
from tests.conftest import ACCOUNT, OTHER, REGION
from tests.fakes.context import FastWorld
from tests.fast.story import disks_of, finished, group_items, make_instance, snapshot_everything

TYPE = "ecs.t5-lc2m1.nano"


def _usage(world: FastWorld, *snap_ids: str) -> list[str]:
    page = snapshots.describe_snapshots(world.ctx, ACCOUNT, REGION, snapshot_ids=list(snap_ids))
    return [page.usage[s] for s in snap_ids]


def _with_usage(world: FastWorld, usage: str) -> set[str]:
    return {s.id for s in snapshots.describe_snapshots(world.ctx, ACCOUNT, REGION,
                                                       usage=usage).items}


def test_delete_snapshot_group_keeps_the_members_in_use(world: FastWorld,
                                                        image: Image) -> None:
    ctx, storage = world.ctx, world.storage(REGION)
    instance_id = make_instance(ctx, image, data_disks=2)
    group_id = snapshot_everything(ctx, instance_id)
    (system, s_sys), (data1, s_d1), (_, s_d2) = group_items(ctx, group_id)
    image_id = images.create_image(ctx, ACCOUNT, REGION, snapshot_id=s_sys)
    made = disks.create_disk(ctx, ACCOUNT, REGION, size_gib=None, snapshot_id=s_d1)
    outcomes, task_id = snapshots.delete_snapshot_group(ctx, ACCOUNT, REGION, group_id)
    finished(ctx, task_id)
    by_id = {o.snapshot_id: o for o in outcomes}
    assert by_id[s_d2] == MemberOutcome(s_d2)
    assert by_id[s_sys].code == "SnapshotCreatedImage" and image_id in by_id[s_sys].message
    assert by_id[s_d1].code == "SnapshotCreatedDisk"
    # the group is gone; the kept members are snapshots of their own, still in the pool
    with pytest.raises(EcsError) as caught:
        snapshots.get_snapshot_group(ctx, ACCOUNT, group_id)
    assert caught.value.code.startswith("InvalidSnapshotGroupId")
    left = {s.id: s for s in snapshots.describe_snapshots(ctx, ACCOUNT, REGION).items}
    assert set(left) == {s_sys, s_d1}
    assert all(s.group_id is None for s in left.values())
    assert storage.has_snapshot(system, s_sys) and storage.has_snapshot(data1, s_d1)
    assert not any(storage.has_snapshot(d, s_d2) for d in disks_of(ctx, instance_id))
    # then as DeleteSnapshot says: Force for the disk's, the image first for the image's
    finished(ctx, snapshots.delete_snapshot(ctx, ACCOUNT, s_d1, force=True))
    assert images.delete_image(ctx, ACCOUNT, REGION, image_id) is not None
    finished(ctx, snapshots.delete_snapshot(ctx, ACCOUNT, s_sys))
    assert snapshots.describe_snapshots(ctx, ACCOUNT, REGION).items == []
    assert made


def test_a_group_whose_members_are_all_in_use_goes_without_a_task(world: FastWorld,
                                                                  image: Image) -> None:
    ctx = world.ctx
    instance_id = make_instance(ctx, image, data_disks=0)
    group_id = snapshot_everything(ctx, instance_id)
    [(_, snap)] = group_items(ctx, group_id)
    disks.create_disk(ctx, ACCOUNT, REGION, size_gib=None, snapshot_id=snap)
    outcomes, task_id = snapshots.delete_snapshot_group(ctx, ACCOUNT, REGION, group_id)
    assert task_id == "" and [o.code for o in outcomes] == ["SnapshotCreatedDisk"]
    assert snapshots.describe_snapshot_groups(ctx, ACCOUNT, REGION).items == []
    [kept] = snapshots.describe_snapshots(ctx, ACCOUNT, REGION).items
    assert (kept.id, kept.group_id) == (snap, None)


def test_a_group_with_nothing_in_use_is_deleted_whole(world: FastWorld, image: Image) -> None:
    ctx = world.ctx
    instance_id = make_instance(ctx, image, data_disks=1)
    group_id = snapshot_everything(ctx, instance_id)
    outcomes, task_id = snapshots.delete_snapshot_group(ctx, ACCOUNT, REGION, group_id)
    finished(ctx, task_id)
    assert [o.code for o in outcomes] == ["", ""]
    assert snapshots.describe_snapshots(ctx, ACCOUNT, REGION).items == []


def test_snapshot_usage_follows_its_disks_and_images(world: FastWorld, image: Image) -> None:
    ctx = world.ctx
    instance_id = make_instance(ctx, image, data_disks=1)
    system, data = disks_of(ctx, instance_id)
    s_sys = snapshots.create_snapshot(ctx, ACCOUNT, system)
    s_data = snapshots.create_snapshot(ctx, ACCOUNT, data)
    s_idle = snapshots.create_snapshot(ctx, ACCOUNT, data)
    assert _usage(world, s_sys, s_data, s_idle) == ["none"] * 3
    image_id = images.create_image(ctx, ACCOUNT, REGION, snapshot_id=s_sys)
    assert _usage(world, s_sys) == ["image"]
    from_sys = disks.create_disk(ctx, ACCOUNT, REGION, size_gib=None, snapshot_id=s_sys)
    from_data = disks.create_disk(ctx, ACCOUNT, REGION, size_gib=None, snapshot_id=s_data)
    assert _usage(world, s_sys, s_data, s_idle) == ["image_disk", "disk", "none"]
    # the filter: each value, exactly
    assert (_with_usage(world, "image_disk"), _with_usage(world, "disk"),
            _with_usage(world, "none"), _with_usage(world, "image")) == \
        ({s_sys}, {s_data}, {s_idle}, set())
    assert {s.id for s in snapshots.describe_snapshots(
        ctx, ACCOUNT, REGION, snapshot_ids=[s_data, s_idle], usage="disk").items} == {s_data}
    # a released disk no longer uses it; a deleted image neither
    disks.delete_disk(ctx, ACCOUNT, from_sys)
    assert _usage(world, s_sys) == ["image"] and _with_usage(world, "image") == {s_sys}
    images.delete_image(ctx, ACCOUNT, REGION, image_id)
    disks.delete_disk(ctx, ACCOUNT, from_data)
    assert _usage(world, s_sys, s_data) == ["none", "none"]
    assert _with_usage(world, "none") == {s_sys, s_data, s_idle}
    # another account sees none of them (its own images and disks alone count: the
    # store's snapshot_users, tests/store/test_store.py)
    assert snapshots.describe_snapshots(ctx, OTHER, REGION, snapshot_ids=[s_sys]).items == []
    with pytest.raises(EcsError) as caught:
        snapshots.describe_snapshots(ctx, ACCOUNT, REGION, usage="instance")
    assert (caught.value.code, caught.value.http_status) == ("InvalidUsage", 404)


def test_image_usage_follows_the_accounts_instances(world: FastWorld, image: Image) -> None:
    ctx = world.ctx
    instance_id = make_instance(ctx, image, data_disks=0)
    [system] = disks_of(ctx, instance_id)
    custom = images.create_image(ctx, ACCOUNT, REGION,
                                 snapshot_id=snapshots.create_snapshot(ctx, ACCOUNT, system))
    assert images.image_usage(ctx, ACCOUNT, [image.id, custom]) == \
        {image.id: "instance", custom: "none"}
    assert images.image_usage(ctx, OTHER, [image.id]) == {image.id: "none"}

    def listed(usage: str, alias: str | None = None) -> set[str]:
        return {m.id for m in images.describe_images(ctx, ACCOUNT, REGION, usage=usage,
                                                     owner_alias=alias).items}

    assert (listed("instance"), listed("none")) == ({image.id}, {custom})
    assert (listed("instance", "self"), listed("none", "self")) == (set(), {custom})
    [user] = instances.run_instances(ctx, ACCOUNT, REGION,
                                     instances.InstanceRequest(custom, TYPE))
    assert images.image_usage(ctx, ACCOUNT, [custom]) == {custom: "instance"}
    assert (listed("instance", "self"), listed("none")) == ({custom}, set())
    finished(ctx, instances.delete_instance(ctx, ACCOUNT, user, force=True))
    finished(ctx, instances.delete_instance(ctx, ACCOUNT, instance_id, force=True))
    assert listed("none") == {image.id, custom}
    with pytest.raises(EcsError) as caught:
        images.describe_images(ctx, ACCOUNT, REGION, usage="disk")
    assert (caught.value.code, caught.value.http_status) == ("InvalidUsage", 404)
