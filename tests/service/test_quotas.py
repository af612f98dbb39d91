"""Quotas per account (hardening): instances, vCPUs, memory, disks, disk GiB and snapshots,
with ECS's codes, set by the admin; MinAmount cannot take more than the quota."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import Image
from ecsnap.service import accounts, disks, instances, rollback, snapshots
from ecsnap.service.context import ServiceContext
from tests.conftest import REGION

PASSWORD = "a long enough passphrase"


@pytest.fixture
def tenant(ctx: ServiceContext) -> str:
    return accounts.create_account(ctx, "tenant", PASSWORD).id


def _req(image: Image, data: int = 0) -> instances.InstanceRequest:
    return instances.InstanceRequest(image_id=image.id, instance_type="ecs.t5-lc2m1.nano",
                                     data_disks=[instances.DataDiskSpec(20)
                                                 for _ in range(data)])


def _code(call: Callable[[], object]) -> str:
    with pytest.raises(EcsError) as refused:
        call()
    return refused.value.code


def test_instances_and_min_amount_stop_at_the_quota(ctx: ServiceContext, image: Image,
                                                    tenant: str) -> None:
    accounts.set_quotas(ctx, "tenant", {"instances": 3})
    made = instances.run_instances(ctx, tenant, REGION, _req(image), amount=5, min_amount=1,
                                   start=False)
    assert len(made) == 3  # the region has room for 8: the quota, not the region, bounds it
    assert _code(lambda: instances.run_instances(ctx, tenant, REGION, _req(image),
                                                 start=False)) == "QuotaExceed.ElasticQuota"
    accounts.set_quotas(ctx, "tenant", {"instances": -1, "vcpus": 4})
    assert _code(lambda: instances.run_instances(ctx, tenant, REGION, _req(image), amount=2,
                                                 start=False)) == "QuotaExceed.ElasticQuota"
    assert len(instances.run_instances(ctx, tenant, REGION, _req(image), amount=2,
                                       min_amount=1, start=False)) == 1


def test_disks_and_disk_capacity(ctx: ServiceContext, image: Image, tenant: str) -> None:
    accounts.set_quotas(ctx, "tenant", {"disks": 2})
    assert _code(lambda: instances.run_instances(ctx, tenant, REGION, _req(image, data=2),
                                                 start=False)) == "QuotaExceed.PostPaidDisk"
    instances.run_instances(ctx, tenant, REGION, _req(image, data=1), start=False)
    assert _code(lambda: disks.create_disk(ctx, tenant, REGION, size_gib=20)) == \
        "QuotaExceed.PostPaidDisk"
    accounts.set_quotas(ctx, "tenant", {"disks": -1, "disk_gib": 60})
    disk_id = disks.create_disk(ctx, tenant, REGION, size_gib=20)
    assert _code(lambda: disks.create_disk(ctx, tenant, REGION, size_gib=20)) == \
        "QuotaExceed.DiskCapacity"
    assert _code(lambda: disks.resize_disk(ctx, tenant, disk_id, 40)) == \
        "QuotaExceed.DiskCapacity"


def test_snapshots_count_safety_ones_too(ctx: ServiceContext, image: Image,
                                         tenant: str) -> None:
    [iid] = instances.run_instances(ctx, tenant, REGION, _req(image, data=1), start=False)
    accounts.set_quotas(ctx, "tenant", {"snapshots": 3})
    group_id, _ = snapshots.create_snapshot_group(ctx, tenant, REGION, iid)  # 2 snapshots
    assert _code(lambda: snapshots.create_snapshot_group(ctx, tenant, REGION, iid)) == \
        "QuotaExceed.Snapshot"
    items = [(s.source_disk_id, s.id)
             for s in snapshots.get_snapshot_group(ctx, tenant, group_id).snapshots]
    assert _code(lambda: rollback.reset_disks(ctx, tenant, REGION, items)) == \
        "QuotaExceed.Snapshot"
    # without a safety snapshot nothing is kept, so nothing counts
    rollback.reset_disks(ctx, tenant, REGION, items, safety_snapshot=False)
    report = {line.kind: line for line in accounts.quota_report(ctx, "tenant")}
    assert (report["snapshots"].used, report["snapshots"].limit, report["snapshots"].own) == \
        (2, 3, True)
    assert (report["instances"].used, report["instances"].own) == (1, False)


def test_an_unknown_quota_is_refused(ctx: ServiceContext, tenant: str) -> None:
    assert _code(lambda: accounts.set_quotas(ctx, "tenant", {"gpus": 1})) == \
        "InvalidParameter"
