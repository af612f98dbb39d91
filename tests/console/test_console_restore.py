"""The console's restore: **Create Disk** in a snapshot's Actions makes a disk with the
snapshot's content, and the Disks page attaches an Available disk to an instance (in
process: Starlette's TestClient, real database and qcow2 files, the compute test double)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

from ecsnap.domain.model import Image
from ecsnap.entrypoints.console.app import create_console
from ecsnap.service import accounts, disks, instances, snapshots
from ecsnap.service.context import ServiceContext
from tests.conftest import REGION
from tests.console.test_console_security import PASSWORD, logged_on


@pytest.fixture
def alice(ctx: ServiceContext) -> str:
    return accounts.create_account(ctx, "alice", PASSWORD).id


@pytest.fixture
def client(ctx: ServiceContext, alice: str) -> Iterator[TestClient]:
    app = Starlette(routes=[Mount("/console", create_console(ctx))])
    with TestClient(app, follow_redirects=False) as c:
        yield logged_on(c)


def csrf(page: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, page
    return match.group(1)


def test_create_disk_from_a_snapshot_then_attach_it(ctx: ServiceContext, alice: str,
                                                   image: Image, client: TestClient) -> None:
    source = disks.create_disk(ctx, alice, REGION, size_gib=20)
    snap = snapshots.create_snapshot(ctx, alice, source)
    page = client.get("/console/snapshots/")
    assert f'action="/console/snapshots/{snap}/create-disk"' in page.text
    made = client.post(f"/console/snapshots/{snap}/create-disk",
                       data={"csrf": csrf(page.text)})
    assert made.status_code == 303 and made.headers["location"] == "/console/disks/"
    [new] = [d for d in disks.describe_disks(ctx, alice, REGION).items
             if d.source_snapshot_id == snap]
    listing = client.get("/console/disks/").text
    assert f"Disk {new.id} was created from {snap}." in listing
    assert f'action="/console/disks/{new.id}/attach"' in listing

    # a snapshot of another account, or none: an error on the page, nothing made
    refused = client.post("/console/snapshots/s-nosuchsnapshot/create-disk",
                          data={"csrf": csrf(listing)})
    assert refused.status_code == 303
    assert "InvalidSnapshotId.NotFound" in client.get("/console/snapshots/").text
    assert len(disks.describe_disks(ctx, alice, REGION).items) == 2

    [instance_id] = instances.run_instances(ctx, alice, REGION, instances.InstanceRequest(
        image.id, "ecs.t5-lc2m1.nano"), start=False)
    listing = client.get("/console/disks/").text
    assert f'<option value="{instance_id}">' in listing
    attached = client.post(f"/console/disks/{new.id}/attach",
                           data={"csrf": csrf(listing), "instance_id": instance_id})
    assert attached.status_code == 303
    [disk] = disks.describe_disks(ctx, alice, REGION, disk_ids=[new.id]).items
    assert (disk.status.value, disk.instance_id) == ("In_use", instance_id)
