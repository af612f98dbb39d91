"""The background task runner: short tasks have ended when the service answers; long ones
go on after at most `wait_up_to` seconds."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from ecsnap import bootstrap, config
from ecsnap.adapters.storage.qcow2 import Qcow2Backend
from ecsnap.domain.model import SnapshotStatus, TaskStatus
from ecsnap.service import images, instances, regions, snapshots
from ecsnap.service.context import ServiceContext
from tests.conftest import ACCOUNT, REGION
from tests.doubles import FileBackedCompute


def background_ctx(tmp_path: Path, template: Path) -> tuple[ServiceContext, str]:
    settings = config.load(tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'db'}")
    ctx = bootstrap.build(settings, compute=FileBackedCompute(), background=True)
    regions.ensure_region(ctx, REGION, vcpus=8, memory_mib=8192)
    image = images.register_image(ctx, REGION, name="tiny", os_name="Tiny",
                                  template=template, size_gib=1)
    req = instances.InstanceRequest(image_id=image.id, instance_type="ecs.t5-lc2m1.nano",
                                    data_disks=[instances.DataDiskSpec(20)])
    [instance_id] = instances.run_instances(ctx, ACCOUNT, REGION, req, start=False)
    deadline = time.monotonic() + 30
    while instances.statuses(ctx, ACCOUNT, [instance_id])[instance_id] != "Stopped":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return ctx, instance_id


def test_a_short_task_has_ended_when_the_call_returns(tmp_path: Path, template: Path) -> None:
    ctx, instance_id = background_ctx(tmp_path, template)
    try:
        group_id, task_id = snapshots.create_snapshot_group(ctx, ACCOUNT, REGION, instance_id)
        view = snapshots.get_snapshot_group(ctx, ACCOUNT, group_id)
        assert view.group.status == SnapshotStatus.ACCOMPLISHED and len(view.snapshots) == 2
        with ctx.uow() as uow:
            task = uow.tasks.get(task_id)
            assert task is not None and task.status == TaskStatus.FINISHED
    finally:
        ctx.runner.shutdown()


def test_a_long_task_goes_on_in_the_background(tmp_path: Path, template: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    ctx, instance_id = background_ctx(tmp_path, template)
    release = threading.Event()
    with ctx.uow() as uow:
        storage = ctx.storage(uow, REGION)
    original = type(storage).create_snapshots

    def held(self: Qcow2Backend, items: list[tuple[str, str]]) -> None:  # a slow disk
        release.wait(30)
        original(self, items)

    monkeypatch.setattr(Qcow2Backend, "create_snapshots", held)
    try:
        group_id, task_id = snapshots.create_snapshot_group(ctx, ACCOUNT, REGION, instance_id)
        # answered (after the 2 s bound) while the disk is still held
        assert snapshots.get_snapshot_group(ctx, ACCOUNT, group_id).group.status == \
            SnapshotStatus.PROGRESSING
        release.set()
        task = ctx.runner.wait(task_id, timeout=30)
        assert task.status == TaskStatus.FINISHED
        assert snapshots.get_snapshot_group(ctx, ACCOUNT, group_id).group.status == \
            SnapshotStatus.ACCOMPLISHED
    finally:
        release.set()
        ctx.runner.shutdown()


def test_close_lets_the_running_steps_end_before_it_closes_the_storage(
        tmp_path: Path, template: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ctx.close (a server or agent stopping, a test's end) waits for the steps under way,
    then closes what the context opened: librados aborts the whole process when a pool's
    connection is shut under an operation that runs on it."""
    ctx, instance_id = background_ctx(tmp_path, template)
    release, events = threading.Event(), []
    original = Qcow2Backend.create_snapshots

    def held(self: Qcow2Backend, items: list[tuple[str, str]]) -> None:
        release.wait(30)
        original(self, items)
        events.append("step ended")

    monkeypatch.setattr(Qcow2Backend, "create_snapshots", held)
    monkeypatch.setattr(snapshots, "SHORT_TASK_S", 0.0)  # the call returns at once
    ctx.closers.append(lambda: events.append("storage closed"))
    try:
        snapshots.create_snapshot_group(ctx, ACCOUNT, REGION, instance_id)
        closing = threading.Thread(target=ctx.close)
        closing.start()
        closing.join(0.5)
        assert closing.is_alive() and events == []  # waiting for the step
        release.set()
        closing.join(30)
        assert not closing.is_alive() and events == ["step ended", "storage closed"]
    finally:
        release.set()
        ctx.close()
