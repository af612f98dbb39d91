"""The console's custom images: **Create Custom Image** in a system-disk snapshot's Actions
and on the instance page, the Images page lists custom images with **Delete** (Force when
instances use them). In process: Starlette's TestClient, real database and qcow2 files,
the compute test double."""

from __future__ import annotations

from starlette.testclient import TestClient

from ecsnap.domain.model import Image
from ecsnap.service import images, instances, snapshots
from ecsnap.service.context import ServiceContext, attached_disks
from tests.conftest import REGION
from tests.console.test_console_restore import alice, client, csrf  # noqa: F401

TYPE = "ecs.t5-lc2m1.nano"


def _run(ctx: ServiceContext, account: str, image_id: str) -> str:
    [instance_id] = instances.run_instances(ctx, account, REGION, instances.InstanceRequest(
        image_id, TYPE, data_disks=[instances.DataDiskSpec(20)]), start=False)
    return instance_id


def test_create_custom_image_from_a_snapshot_and_an_instance_then_delete(
        ctx: ServiceContext, alice: str, image: Image, client: TestClient) -> None:  # noqa: F811
    instance_id = _run(ctx, alice, image.id)
    with ctx.uow(readonly=True) as uow:
        system, data = (d.id for d in attached_disks(uow, instance_id))
    snap = snapshots.create_snapshot(ctx, alice, system)
    data_snap = snapshots.create_snapshot(ctx, alice, data)
    page = client.get("/console/snapshots/").text
    assert f'action="/console/snapshots/{snap}/create-image"' in page
    assert f'action="/console/snapshots/{data_snap}/create-image"' not in page  # data disk
    made = client.post(f"/console/snapshots/{snap}/create-image", data={"csrf": csrf(page)})
    assert made.status_code == 303 and made.headers["location"] == "/console/images/"
    [custom] = images.describe_images(ctx, alice, REGION, owner_alias="self").items
    assert (custom.source_snapshot_id, custom.status) == (snap, "Available")
    listing = client.get("/console/images/").text
    assert f"Image {custom.id} is being created from {snap}." in listing
    assert f'action="/console/images/{custom.id}/delete"' in listing
    assert f'action="/console/images/{image.id}/delete"' not in listing  # a system image

    page = client.get(f"/console/instances/{instance_id}").text
    assert f'action="/console/instances/{instance_id}/create-image"' in page
    client.post(f"/console/instances/{instance_id}/create-image",
                data={"csrf": csrf(page), "name": "from-the-page"})
    [named] = [m for m in images.describe_images(ctx, alice, REGION, owner_alias="self").items
               if m.name == "from-the-page"]
    assert named.status == "Available" and named.source_snapshot_id not in ("", snap)

    # Delete: refused while an instance uses the image; with Force it goes
    _run(ctx, alice, custom.id)
    client.post(f"/console/images/{custom.id}/delete", data={"csrf": csrf(listing)})
    assert "ImageUsingByInstance" in client.get("/console/images/").text
    client.post(f"/console/images/{custom.id}/delete",
                data={"csrf": csrf(listing), "force": "true"})
    assert custom.id not in client.get("/console/images/").text
