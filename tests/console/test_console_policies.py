"""The console's Automatic Snapshot Policies page (Storage & Snapshots): create, modify,
apply to disks, cancel, delete; the Disks page shows each disk's policy (in process:
Starlette's TestClient, real database, the same service functions as the API)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

from ecsnap.entrypoints.console.app import create_console
from ecsnap.service import accounts, disks, policies
from ecsnap.service.context import ServiceContext
from tests.conftest import REGION
from tests.console.test_console_restore import csrf
from tests.console.test_console_security import PASSWORD, logged_on


@pytest.fixture
def alice(ctx: ServiceContext) -> str:
    return accounts.create_account(ctx, "alice", PASSWORD).id


@pytest.fixture
def client(ctx: ServiceContext, alice: str) -> Iterator[TestClient]:
    app = Starlette(routes=[Mount("/console", create_console(ctx))])
    with TestClient(app, follow_redirects=False) as c:
        yield logged_on(c)


def test_policies_page_create_modify_apply_cancel_delete(ctx: ServiceContext, alice: str,
                                                         client: TestClient) -> None:
    disk_id = disks.create_disk(ctx, alice, REGION, size_gib=20)
    page = client.get("/console/policies/")
    assert page.status_code == 200
    assert "Automatic Snapshot Policies" in page.text and "No automatic snapshot" in page.text
    made = client.post("/console/policies/create", data={
        "csrf": csrf(page.text), "name": "nightly", "hour": ["2", "14"],
        "weekday": ["1", "7"], "retention_days": "7"})
    assert made.status_code == 303
    [view] = policies.describe_policies(ctx, alice, REGION).items
    policy_id = view.policy.id
    page = client.get("/console/policies/")
    assert policy_id in page.text and "02:00, 14:00" in page.text and "Mon, Sun" in page.text

    bad = client.post("/console/policies/create", data={
        "csrf": csrf(page.text), "hour": ["2"], "weekday": [], "retention_days": "7"})
    assert bad.status_code == 303
    assert "InvalidRepeatWeekdays.Malformed" in client.get("/console/policies/").text

    client.post(f"/console/policies/{policy_id}/modify", data={
        "csrf": csrf(page.text), "name": "weekly", "hour": ["3"], "weekday": ["6"],
        "retention_days": "-1"})
    [view] = policies.describe_policies(ctx, alice, REGION).items
    assert (view.policy.name, view.policy.time_points, view.policy.repeat_weekdays,
            view.policy.retention_days) == ("weekly", [3], [6], -1)

    client.post(f"/console/policies/{policy_id}/apply",
                data={"csrf": csrf(page.text), "disk": [disk_id]})
    listing = client.get("/console/disks/").text
    assert "Snapshot policy" in listing and policy_id in listing and "weekly" in listing
    assert policies.describe_policies(ctx, alice, REGION).items[0].disk_nums == 1

    client.post(f"/console/policies/{policy_id}/cancel",
                data={"csrf": csrf(page.text), "disk": [disk_id]})
    assert policy_id not in client.get("/console/disks/").text

    client.post(f"/console/policies/{policy_id}/apply",
                data={"csrf": csrf(page.text), "disk": [disk_id]})
    client.post(f"/console/policies/{policy_id}/delete", data={"csrf": csrf(page.text)})
    assert policies.describe_policies(ctx, alice, REGION).total == 0
    assert policy_id not in client.get("/console/disks/").text


def test_another_accounts_policy_is_not_found(ctx: ServiceContext, alice: str,
                                              client: TestClient) -> None:
    bob = accounts.create_account(ctx, "bob", PASSWORD).id
    theirs = policies.create_policy(ctx, bob, REGION, time_points=["1"],
                                    repeat_weekdays=["1"], retention_days=-1)
    page = client.get("/console/policies/")
    assert theirs not in page.text
    client.post(f"/console/policies/{theirs}/delete", data={"csrf": csrf(page.text)})
    assert "InvalidAutoSnapshotPolicyId.NotFound" in client.get("/console/policies/").text
    assert policies.describe_policies(ctx, bob, REGION).total == 1
