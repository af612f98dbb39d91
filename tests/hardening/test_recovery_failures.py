"""Start-up never dies for one bad resource (hardening item 8).

Two tasks are journaled and left Processing, as a crash leaves them: a rollback of
instance A, a snapshot group of instance B. A's disk file is then corrupted, so its
rollback can be neither driven forward nor undone. Recovery at start-up (bootstrap with
recover=True) does not raise: A's task is Failed with the reason, its locks are released
and its instance and disks carry the `ecsnap:needs-attention` tag (seen by Describe*);
B's task is undone as usual, and the service answers.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from ecsnap import bootstrap, config
from ecsnap.domain.model import TaskStatus
from ecsnap.service import images, instances, regions, rollback, snapshots
from ecsnap.service.context import ServiceContext, attached_disks
from ecsnap.service.disks import describe_disks
from tests.conftest import ACCOUNT, REGION
from tests.doubles import FileBackedCompute

ATTENTION_TAG = "ecsnap:needs-attention"  # ecsnap.service.recovery.ATTENTION_TAG


def build(data_dir: Path, *, recover: bool) -> ServiceContext:
    settings = config.load(data_dir, background_tasks=False)
    return bootstrap.build(settings, compute=FileBackedCompute(), background=False,
                           recover=recover)


def new_instance(ctx: ServiceContext, image_id: str) -> str:
    req = instances.InstanceRequest(image_id=image_id, instance_type="ecs.t5-lc2m1.nano",
                                    data_disks=[instances.DataDiskSpec(20)])
    [instance_id] = instances.run_instances(ctx, ACCOUNT, REGION, req, start=False)
    return instance_id


def test_a_task_that_cannot_be_recovered_is_failed_and_flagged(
        tmp_path: Path, template: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    data_dir = tmp_path / "data"
    ctx = build(data_dir, recover=False)
    regions.ensure_region(ctx, REGION, vcpus=8, memory_mib=8192)
    image = images.register_image(ctx, REGION, name="tiny", os_name="Tiny", template=template,
                                  size_gib=1)
    a, b = new_instance(ctx, image.id), new_instance(ctx, image.id)
    group_id, task_id = snapshots.create_snapshot_group(ctx, ACCOUNT, REGION, a)
    assert instances.wait_task(ctx, task_id).status == TaskStatus.FINISHED
    items = [(s.source_disk_id, s.id)
             for s in snapshots.get_snapshot_group(ctx, ACCOUNT, group_id).snapshots]

    # journaled, never run: what a kill -9 right after the commit leaves
    monkeypatch.setattr(ctx.runner, "submit", lambda task, wait_up_to=0.0: None)
    stuck = rollback.reset_disks(ctx, ACCOUNT, REGION, items).task_id
    _, undone = snapshots.create_snapshot_group(ctx, ACCOUNT, REGION, b)
    monkeypatch.undo()
    with ctx.uow() as uow:
        disks_of_a = [d.id for d in attached_disks(uow, a)]
        broken = ctx.storage(uow, REGION).path(disks_of_a[-1])
    with open(broken, "r+b") as fh:  # the qcow2 header is gone
        fh.write(b"\0" * 4096)

    caplog.set_level(logging.ERROR, logger="ecsnap.recovery")
    ctx = build(data_dir, recover=True)  # must not raise

    with ctx.uow() as uow:
        task = uow.tasks.load(stuck)
        assert task.status == TaskStatus.FAILED
        assert task.error_code == "Task.RecoveryFailed"
        assert "StorageError" in task.error_message and disks_of_a[-1] in task.error_message
        assert uow.tasks.load(undone).status == TaskStatus.FAILED
        assert uow.tasks.load(undone).error_code == "Task.Interrupted"
        assert uow.tasks.find(status=TaskStatus.PROCESSING) == []
        for inst in uow.instances.find():
            assert inst.lock_task_id is None
        for disk in uow.disks.find():
            assert disk.lock_task_id is None
    # the operator sees what needs attention, and nothing else is flagged
    flagged = instances.describe_instances(ctx, ACCOUNT, REGION, tags={ATTENTION_TAG: stuck})
    assert [i.id for i in flagged.items] == [a]
    flagged_disks = describe_disks(ctx, ACCOUNT, REGION, tags={ATTENTION_TAG: stuck})
    assert sorted(d.id for d in flagged_disks.items) == sorted(disks_of_a)
    healthy = instances.describe_instances(ctx, ACCOUNT, REGION, instance_ids=[b]).items[0]
    assert ATTENTION_TAG not in healthy.tags
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(stuck in m and a in m and ATTENTION_TAG in m for m in errors), errors
    # and the service serves: B can be snapshotted again
    _, task_id = snapshots.create_snapshot_group(ctx, ACCOUNT, REGION, b)
    assert instances.wait_task(ctx, task_id).status == TaskStatus.FINISHED
