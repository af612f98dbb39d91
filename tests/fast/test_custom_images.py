"""Custom images (CreateImage from a system disk's snapshot or from an instance,
DescribeImages, DeleteImage, RunInstances from the image), on the in-memory fakes."""

from __future__ import annotations

from pathlib import Path

import pytest

from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import Image, TaskStatus
from ecsnap.service import disks, images, instances, snapshots
from tests.conftest import ACCOUNT, OTHER, REGION
from tests.fakes.context import FastWorld
from tests.fast.story import disks_of, finished, make_instance, stop

TYPE = "ecs.t5-lc2m1.nano"


@pytest.fixture
def direct(world: FastWorld, tmp_path: Path) -> Image:
    """A system image that boots its own kernel and initrd (as the demo guest does)."""
    for name, data in (("tpl.img", b"base system"), ("vmlinuz", b"KERNEL"),
                       ("initrd.img", b"INITRD")):
        (tmp_path / name).write_bytes(data)
    return images.register_image(world.ctx, REGION, name="direct", os_name="Tiny Linux",
                                 template=tmp_path / "tpl.img", size_gib=1,
                                 boot_mode="direct", kernel=tmp_path / "vmlinuz",
                                 initrd=tmp_path / "initrd.img",
                                 kernel_args="console=ttyS0 quiet")


def _image(world: FastWorld, image_id: str) -> Image:
    with world.ctx.uow(readonly=True) as uow:
        return uow.images.load(image_id)


def _system_snapshot(world: FastWorld, image: Image, content: bytes) -> tuple[str, str, str]:
    """(instance, its system disk, a snapshot of it holding `content`)."""
    ctx, storage = world.ctx, world.storage(REGION)
    instance_id = make_instance(ctx, image, data_disks=1)
    system = disks_of(ctx, instance_id)[0]
    storage.write(system, content)
    snap = snapshots.create_snapshot(ctx, ACCOUNT, system)
    storage.write(system, b"written after the snapshot")
    return instance_id, system, snap


def _run(world: FastWorld, image_id: str, account: str = ACCOUNT) -> str:
    [instance_id] = instances.run_instances(world.ctx, account, REGION,
                                            instances.InstanceRequest(image_id, TYPE))
    return instance_id


def test_an_image_from_a_system_disk_snapshot(world: FastWorld, direct: Image) -> None:
    ctx, storage = world.ctx, world.storage(REGION)
    _, system, snap = _system_snapshot(world, direct, b"marker in the system disk")
    image_id = images.create_image(ctx, ACCOUNT, REGION, snapshot_id=snap, name="golden",
                                   description="my golden image")
    assert image_id.startswith("m-")
    image = _image(world, image_id)
    assert (image.status, image.name, image.description, image.account_id,
            image.source_snapshot_id, image.size_gib) == \
        ("Available", "golden", "my golden image", ACCOUNT, snap, 20)
    # it boots as its source did: the same kernel arguments, its own kernel and initrd
    assert (image.boot_mode, image.kernel_args) == ("direct", "console=ttyS0 quiet")
    assert Path(image.kernel_path).read_bytes() == b"KERNEL"
    assert Path(image.initrd_path).read_bytes() == b"INITRD"
    assert Path(image.kernel_path).parent == Path(image.template_path).parent
    assert ("export_snapshot", f"{system}@{snap}") in storage.calls
    # an instance from it: its system disk has the snapshot's content, boots the kernel
    instance_id = _run(world, image_id)
    new_system = disks_of(ctx, instance_id)[0]
    assert storage.content(new_system) == b"marker in the system disk"
    assert storage.disks[new_system].base_image == image.template_path  # an overlay
    spec = world.compute.vms[instance_id].spec
    assert (spec.boot_mode, spec.kernel_path, spec.kernel_args) == \
        ("direct", image.kernel_path, "console=ttyS0 quiet")
    # DescribeImages: ImageOwnerAlias=self lists it with its source snapshot
    page = images.describe_images(ctx, ACCOUNT, REGION, owner_alias="self")
    assert [(m.id, m.source_snapshot_id) for m in page.items] == [(image_id, snap)]
    everything = images.describe_images(ctx, ACCOUNT, REGION)
    assert {m.id for m in everything.items} == {direct.id, image_id}
    assert [m.id for m in images.describe_images(ctx, ACCOUNT, REGION, owner_alias="system"
                                                 ).items] == [direct.id]
    assert [m.id for m in images.describe_images(ctx, ACCOUNT, REGION,
                                                 snapshot_id=snap).items] == [image_id]


def test_an_image_from_an_instance_snapshots_its_system_disk(world: FastWorld,
                                                            direct: Image) -> None:
    """As ECS does: a fresh snapshot of the system disk (Running: by the hypervisor), which
    DescribeSnapshots shows as the image's source."""
    ctx, storage = world.ctx, world.storage(REGION)
    instance_id = make_instance(ctx, direct, data_disks=1)
    system, data = disks_of(ctx, instance_id)
    storage.write(system, b"live system disk")
    storage.write(data, b"data disk: not in the image")
    image_id = images.create_image(ctx, ACCOUNT, REGION, instance_id=instance_id,
                                   name="from-running")
    image = _image(world, image_id)
    assert image.status == "Available" and image.source_snapshot_id
    [snap] = snapshots.describe_snapshots(ctx, ACCOUNT, REGION, disk_id=system).items
    assert (snap.id, snap.status.value) == (image.source_snapshot_id, "accomplished")
    assert image_id in snap.description
    assert storage.content(disks_of(ctx, _run(world, image_id))[0]) == b"live system disk"
    # Stopped works too (through the storage backend); Pending or another state does not
    stop(ctx, instance_id)
    storage.write(system, b"stopped system disk")
    stopped = images.create_image(ctx, ACCOUNT, REGION, instance_id=instance_id,
                                  snapshot_id="s-ignored-instance-wins")
    assert storage.content(disks_of(ctx, _run(world, stopped))[0]) == b"stopped system disk"


def test_deleting_the_source_snapshot_later_breaks_nothing(world: FastWorld,
                                                          direct: Image) -> None:
    ctx, storage = world.ctx, world.storage(REGION)
    source_instance, system, snap = _system_snapshot(world, direct, b"keep me")
    image_id = images.create_image(ctx, ACCOUNT, REGION, snapshot_id=snap)
    assert _image(world, image_id).name == image_id  # no ImageName: its ID
    made = _run(world, image_id)
    # ECS: the snapshot of an image cannot be deleted, Force or not
    for force in (False, True):
        with pytest.raises(EcsError) as caught:
            snapshots.delete_snapshot(ctx, ACCOUNT, snap, force=force)
        assert (caught.value.code, caught.value.http_status) == ("SnapshotCreatedImage", 403)
    # the image gone (Force: an instance uses it), the snapshot and its disk may go
    assert images.delete_image(ctx, ACCOUNT, REGION, image_id, force=True) is None
    finished(ctx, snapshots.delete_snapshot(ctx, ACCOUNT, snap))
    finished(ctx, instances.delete_instance(ctx, ACCOUNT, source_instance, force=True))
    assert not storage.exists(system)
    # the instance made from the image still has its disk, and boots its kernel
    stop(ctx, made)
    finished(ctx, instances.start_instance(ctx, ACCOUNT, made))
    spec = world.compute.vms[made].spec
    assert Path(spec.kernel_path).read_bytes() == b"KERNEL"
    assert storage.content(disks_of(ctx, made)[0]) == b"keep me"


def test_an_image_outlives_its_snapshot_in_the_pool(world: FastWorld, direct: Image) -> None:
    """The template stands alone: the snapshot removed from the pool (as when its disk's
    file goes), new instances still get its content."""
    ctx, storage = world.ctx, world.storage(REGION)
    _, system, snap = _system_snapshot(world, direct, b"standalone")
    image_id = images.create_image(ctx, ACCOUNT, REGION, snapshot_id=snap)
    storage.delete_snapshot(system, snap)
    storage.delete(system)
    assert storage.content(disks_of(ctx, _run(world, image_id))[0]) == b"standalone"


def test_delete_image(world: FastWorld, direct: Image) -> None:
    ctx = world.ctx
    _, _, snap = _system_snapshot(world, direct, b"x")
    image_id = images.create_image(ctx, ACCOUNT, REGION, snapshot_id=snap, name="used")
    home = Path(_image(world, image_id).template_path).parent
    user = _run(world, image_id)
    with pytest.raises(EcsError) as caught:
        images.delete_image(ctx, ACCOUNT, REGION, image_id)
    assert (caught.value.code, caught.value.http_status) == ("ImageUsingByInstance", 403)
    assert _image(world, image_id).status == "Available"
    # Force: gone for users, its files stay for the instance that boots from them
    images.delete_image(ctx, ACCOUNT, REGION, image_id, force=True)
    assert image_id not in {m.id for m in images.describe_images(ctx, ACCOUNT, REGION,
                                                                 owner_alias="self").items}
    assert (home / "template.qcow2").exists()
    with pytest.raises(EcsError) as caught:
        _run(world, image_id)
    assert caught.value.code == "OperationDenied.ImageNotValid"
    with pytest.raises(EcsError) as caught:
        images.delete_image(ctx, ACCOUNT, REGION, image_id)
    assert caught.value.code == "InvalidImageId.NotFound"
    # the name is free again
    again = images.create_image(ctx, ACCOUNT, REGION, snapshot_id=snap, name="used")
    # once its last instance is gone, the next DeleteImage removes its files too
    finished(ctx, instances.delete_instance(ctx, ACCOUNT, user, force=True))
    finished(ctx, images.delete_image(ctx, ACCOUNT, REGION, again))
    assert not home.exists()
    assert not Path(_image_home(world, again)).exists()
    with ctx.uow(readonly=True) as uow:
        assert uow.images.get(image_id) is None and uow.images.get(again) is None
    # the snapshot is free to go now
    finished(ctx, snapshots.delete_snapshot(ctx, ACCOUNT, snap))


def _image_home(world: FastWorld, image_id: str) -> Path:
    return world.ctx.settings.images_dir / image_id


def test_refusals(world: FastWorld, direct: Image) -> None:
    ctx = world.ctx
    instance_id, _, snap = _system_snapshot(world, direct, b"x")
    data = disks_of(ctx, instance_id)[1]
    data_snap = snapshots.create_snapshot(ctx, ACCOUNT, data)
    images.create_image(ctx, ACCOUNT, REGION, snapshot_id=snap, name="taken")
    cases: list[tuple[dict[str, str], str, int]] = [
        ({}, "MissingParameter", 400),
        ({"snapshot_id": "s-missing"}, "InvalidSnapshotId.NotFound", 404),
        ({"snapshot_id": data_snap}, "OperationDenied", 403),
        ({"instance_id": "i-missing"}, "InvalidInstanceId.NotFound", 404),
        ({"snapshot_id": snap, "name": "taken"}, "InvalidImageName.Duplicated", 400),
        ({"snapshot_id": snap, "name": "x"}, "InvalidImageName.Malformed", 400),
        ({"snapshot_id": snap, "name": "http://x"}, "InvalidImageName.Malformed", 400),
        ({"snapshot_id": snap, "name": "aliyun-mine"}, "InvalidImageName.Malformed", 400),
        ({"snapshot_id": snap, "description": "http://x"}, "InvalidDescription.Malformed",
         400),
    ]
    for params, code, status in cases:
        before = world.store.dump()
        with pytest.raises(EcsError) as caught:
            images.create_image(ctx, ACCOUNT, REGION, **params)
        assert (caught.value.code, caught.value.http_status) == (code, status), params
        assert world.store.dump() == before, params
    # a snapshot still being taken is not ready
    with ctx.uow() as uow:
        from ecsnap.domain.model import SnapshotStatus
        uow.snapshots.load(snap).status = SnapshotStatus.PROGRESSING
        uow.commit()
    with pytest.raises(EcsError) as caught:
        images.create_image(ctx, ACCOUNT, REGION, snapshot_id=snap)
    assert (caught.value.code, caught.value.http_status) == ("InvalidSnapshotId.NotReady", 403)
    # an instance being created is in the wrong state (400 for CreateImage, as ECS)
    pending = make_instance(ctx, direct, data_disks=0, start=False)
    with ctx.uow() as uow:
        from ecsnap.domain.model import InstanceStatus
        uow.instances.load(pending).status = InstanceStatus.PENDING
        uow.commit()
    with pytest.raises(EcsError) as caught:
        images.create_image(ctx, ACCOUNT, REGION, instance_id=pending)
    assert (caught.value.code, caught.value.http_status) == ("IncorrectInstanceStatus", 400)


def test_another_accounts_snapshot_instance_and_image_do_not_exist(
        world: FastWorld, direct: Image) -> None:
    ctx = world.ctx
    instance_id, _, snap = _system_snapshot(world, direct, b"alice's")
    image_id = images.create_image(ctx, ACCOUNT, REGION, snapshot_id=snap, name="alice")
    before = (world.store.dump(), world.storage(REGION).state())
    for params, code in (({"snapshot_id": snap}, "InvalidSnapshotId.NotFound"),
                         ({"instance_id": instance_id}, "InvalidInstanceId.NotFound")):
        with pytest.raises(EcsError) as caught:
            images.create_image(ctx, OTHER, REGION, **params)
        assert caught.value.code == code
    for force in (False, True):
        with pytest.raises(EcsError) as caught:
            images.delete_image(ctx, OTHER, REGION, image_id, force=force)
        assert (caught.value.code, caught.value.http_status) == ("InvalidImageId.NotFound",
                                                                 404)
    with pytest.raises(EcsError) as caught:  # nor is a system image anyone's to delete
        images.delete_image(ctx, ACCOUNT, REGION, direct.id)
    assert caught.value.code == "InvalidImageId.NotFound"
    with pytest.raises(EcsError) as caught:
        _run(world, image_id, account=OTHER)
    assert caught.value.code == "InvalidImageId.NotFound"
    assert images.describe_images(ctx, OTHER, REGION, image_ids=[image_id]).items == []
    assert images.describe_images(ctx, OTHER, REGION, owner_alias="self").items == []
    assert (world.store.dump(), world.storage(REGION).state()) == before


def test_a_failed_export_leaves_a_create_failed_image_and_no_files(
        world: FastWorld, direct: Image) -> None:
    ctx, storage = world.ctx, world.storage(REGION)
    instance_id = make_instance(ctx, direct, data_disks=0)
    [system] = disks_of(ctx, instance_id)
    storage.fail("export_snapshot")
    image_id = images.create_image(ctx, ACCOUNT, REGION, instance_id=instance_id)
    image = _image(world, image_id)
    assert (image.status, image.source_snapshot_id) == ("CreateFailed", "")
    assert not Path(image.template_path).parent.exists()
    # the snapshot it took is undone, row and internal snapshot
    assert snapshots.describe_snapshots(ctx, ACCOUNT, REGION, disk_id=system).items == []
    assert storage.snapshot_names(system) == ["ecsnap-initial"]
    with ctx.uow(readonly=True) as uow:
        [task] = uow.tasks.find(resource_id=image_id)
        assert task.status == TaskStatus.FAILED
        assert uow.disks.load(system).lock_task_id is None
    assert [m.id for m in images.describe_images(ctx, ACCOUNT, REGION,
                                                 statuses=["CreateFailed"]).items] == \
        [image_id]
    finished(ctx, images.delete_image(ctx, ACCOUNT, REGION, image_id))


def _held(world: FastWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tasks are journaled (their locks taken) but not run: they stay Processing."""
    monkeypatch.setattr(world.ctx.runner, "submit", lambda *args, **kwargs: None)


def test_create_image_holds_the_source_disk(world: FastWorld, direct: Image,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """While the export runs, the snapshot's disk is locked: a DeleteSnapshot of any of
    its snapshots (whose storage step rewrites the file the export reads) is refused."""
    ctx = world.ctx
    _, system, snap = _system_snapshot(world, direct, b"x")
    other = snapshots.create_snapshot(ctx, ACCOUNT, system)
    _held(world, monkeypatch)
    image_id = images.create_image(ctx, ACCOUNT, REGION, snapshot_id=snap)
    assert _image(world, image_id).status == "Creating"
    with pytest.raises(EcsError) as caught:
        snapshots.delete_snapshot(ctx, ACCOUNT, other)
    assert caught.value.code == "Operation.Conflict"
    with pytest.raises(EcsError) as caught:  # and the image is not deleted while Creating
        images.delete_image(ctx, ACCOUNT, REGION, image_id)
    assert (caught.value.code, caught.value.http_status) == ("ImageIsCreating", 403)


def test_create_disk_from_a_snapshot_holds_the_source_disk(
        world: FastWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    """CreateDisk from a snapshot locks the snapshot's disk until the new disk is made:
    a DeleteSnapshot of it meanwhile (whose storage step would remove what the new disk is
    made from) is refused with Operation.Conflict."""
    ctx = world.ctx
    source = disks.create_disk(ctx, ACCOUNT, REGION, size_gib=20)
    snap = snapshots.create_snapshot(ctx, ACCOUNT, source)
    _held(world, monkeypatch)
    disks.create_disk(ctx, ACCOUNT, REGION, size_gib=None, snapshot_id=snap)
    with pytest.raises(EcsError) as caught:
        snapshots.delete_snapshot(ctx, ACCOUNT, snap, force=True)
    assert caught.value.code == "Operation.Conflict"
    assert world.storage(REGION).has_snapshot(source, snap)
