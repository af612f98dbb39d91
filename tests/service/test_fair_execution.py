"""Fair task execution (hardening): guest commands, which may run for hours, never hold up
the workers that snapshots and rollbacks need, and no tenant can run commands without
bound (per instance and per account)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ecsnap import bootstrap, config
from ecsnap.adapters.compute.base import ExecResult
from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import InvocationStatus, TaskStatus
from ecsnap.service import commands, images, instances, regions, snapshots
from ecsnap.service.context import ServiceContext
from tests.conftest import ACCOUNT, OTHER, REGION
from tests.doubles import FileBackedCompute


class SlowGuest(FileBackedCompute):
    """A guest whose commands run until the test lets them end."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.began = threading.Semaphore(0)

    def guest_exec(self, instance_id: str, command: str, *, timeout: float = 60.0,
                   working_dir: str = "/root") -> ExecResult:
        self.began.release()
        self.release.wait(timeout=60)
        return ExecResult(0, b"done\n")


@pytest.fixture
def slow() -> SlowGuest:
    return SlowGuest()


@pytest.fixture
def bg(tmp_path: Path, slow: SlowGuest, template: Path) -> Iterator[ServiceContext]:
    settings = config.load(tmp_path / "data", background_tasks=True, task_workers=2,
                           command_workers=8, max_commands_per_instance=2,
                           max_commands_per_account=4)
    ctx = bootstrap.build(settings, compute=slow, background=True)
    regions.ensure_region(ctx, REGION, vcpus=16, memory_mib=16384)
    yield ctx
    slow.release.set()
    ctx.runner.shutdown()


def _instance(ctx: ServiceContext, account: str, template: Path, *, start: bool) -> str:
    image = images.register_image(ctx, REGION, name="tiny", os_name="Tiny", template=template,
                                  size_gib=1)
    req = instances.InstanceRequest(image_id=image.id, instance_type="ecs.t5-lc2m1.nano",
                                    data_disks=[instances.DataDiskSpec(20)])
    [instance_id] = instances.run_instances(ctx, account, REGION, req, start=start)
    wanted = "Running" if start else "Stopped"
    for _ in range(200):
        if instances.statuses(ctx, account, [instance_id])[instance_id] == wanted:
            return instance_id
        threading.Event().wait(0.05)
    raise AssertionError(f"{instance_id} never became {wanted}")


def test_a_snapshot_runs_while_commands_fill_more_than_the_task_workers(
        bg: ServiceContext, slow: SlowGuest, template: Path) -> None:
    busy = [_instance(bg, OTHER, template, start=True) for _ in range(2)]
    mine = _instance(bg, ACCOUNT, template, start=False)
    for instance_id in busy:  # 4 commands: twice the task workers
        commands.run_command(bg, OTHER, REGION, command_type="RunShellScript",
                             content="sleep 86400", instance_ids=[instance_id, instance_id])
    for _ in range(4):
        assert slow.began.acquire(timeout=10), "the commands did not start"
    group_id, task_id = snapshots.create_snapshot_group(bg, ACCOUNT, REGION, mine)
    task = bg.runner.wait(task_id, timeout=10)  # raises TimeoutError if it never ran
    assert task.status == TaskStatus.FINISHED
    assert snapshots.get_snapshot_group(bg, ACCOUNT, group_id).group.status.value == \
        "accomplished"


def test_commands_are_bounded_per_instance_and_per_account(
        bg: ServiceContext, slow: SlowGuest, template: Path) -> None:
    first, second, third = (_instance(bg, OTHER, template, start=True) for _ in range(3))
    commands.run_command(bg, OTHER, REGION, command_type="RunShellScript", content="sleep 1",
                         instance_ids=[first, first])
    with pytest.raises(EcsError) as refused:
        commands.run_command(bg, OTHER, REGION, command_type="RunShellScript",
                             content="sleep 1", instance_ids=[first])
    assert (refused.value.code, refused.value.http_status) == ("Throttling.Resource", 429)
    assert first in refused.value.message
    commands.run_command(bg, OTHER, REGION, command_type="RunShellScript", content="sleep 1",
                         instance_ids=[second, third])
    with pytest.raises(EcsError) as refused:  # the account's 4 are running
        commands.run_command(bg, OTHER, REGION, command_type="RunShellScript",
                             content="sleep 1", instance_ids=[third])
    assert refused.value.code == "Throttling.Resource"
    assert "account" in refused.value.message
    with bg.uow(readonly=True) as uow:  # a refused call recorded nothing
        assert uow.invocations.count(account_id=OTHER) == 4
    slow.release.set()
    for _ in range(200):
        with bg.uow(readonly=True) as uow:
            if not uow.invocations.count(account_id=OTHER, status=InvocationStatus.RUNNING):
                break
        threading.Event().wait(0.05)
    commands.run_command(bg, OTHER, REGION, command_type="RunShellScript", content="true",
                         instance_ids=[first])  # room again once they ended
