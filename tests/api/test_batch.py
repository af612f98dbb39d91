"""StartInstances / StopInstances: with BatchOptimization=AllTogether (the default) one bad
instance refuses the whole batch and nothing is started or stopped; with SuccessFirst the
others go ahead and each outcome is reported (found by the soak's fuzz)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient

from ecsnap.domain.model import Image
from ecsnap.entrypoints.api.app import create_app
from ecsnap.service import instances, setup
from ecsnap.service.context import ServiceContext
from tests.api.test_app import Caller, caller
from tests.conftest import REGION


@pytest.fixture
def api(ctx: ServiceContext) -> Iterator[tuple[Caller, str]]:
    done = setup.initialise(ctx, REGION)
    with TestClient(create_app(ctx), base_url="http://127.0.0.1") as client:
        yield caller(client, done.access_key.id, done.access_key.secret), done.account.id


def _stopped_instance(ctx: ServiceContext, account_id: str, image: Image) -> str:
    req = instances.InstanceRequest(image_id=image.id, instance_type="ecs.t5-lc2m1.nano")
    [instance_id] = instances.run_instances(ctx, account_id, REGION, req, start=False)
    return instance_id


def test_all_together_acts_on_none_when_one_is_refused(
        ctx: ServiceContext, image: Image, api: tuple[Caller, str]) -> None:
    call, account_id = api
    good = _stopped_instance(ctx, account_id, image)
    status, body = call("StartInstances", InstanceId__1=good,
                        InstanceId__2="i-doesnotexist0000000")
    assert (status, body["Code"]) == (404, "InvalidInstanceId.NotFound"), body
    assert instances.statuses(ctx, account_id, [good])[good] == "Stopped"
    status, body = call("StartInstances", InstanceId__1=good, DryRun="true")
    assert body["Code"] == "DryRunOperation"
    assert instances.statuses(ctx, account_id, [good])[good] == "Stopped"


def test_success_first_starts_the_others_and_reports_each(
        ctx: ServiceContext, image: Image, api: tuple[Caller, str]) -> None:
    call, account_id = api
    good = _stopped_instance(ctx, account_id, image)
    status, body = call("StartInstances", InstanceId__1=good,
                        InstanceId__2="i-doesnotexist0000000",
                        BatchOptimization="SuccessFirst")
    assert status == 200, body
    codes = {r["InstanceId"]: r["Code"] for r in body["InstanceResponses"]["InstanceResponse"]}
    assert codes == {good: "200", "i-doesnotexist0000000": "InvalidInstanceId.NotFound"}
    assert instances.statuses(ctx, account_id, [good])[good] == "Running"
