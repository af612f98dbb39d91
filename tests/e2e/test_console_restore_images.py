"""Restores and custom images in the web console, in a real browser (Debian's Chromium
driven by Playwright) against a live `ecsnap serve` with a real VM: from the Snapshots
page, "Create Disk" of a data disk's snapshot makes the disk, the Disks page shows it with
its source snapshot, "Attach" hot-plugs it into the running instance, whose guest reads
the snapshot's data on it; "Create Custom Image" of a system disk's snapshot, the Images
page lists it until it is Available, and "Delete" removes it."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.e2e.test_console import api, browser, csp_violations, guest_run, log_on, shot  # noqa: F401
from tests.e2e.test_sdk import wait
from tests.live import LiveServer

pytestmark = pytest.mark.qemu


def _reload_until(page: Any, ready: Callable[[], bool], what: str,
                  timeout_s: float = 120) -> None:
    """Reload the page until `ready()` holds (the console is server-rendered)."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert time.monotonic() < deadline, what
        time.sleep(0.5)
        page.reload()


def _snapshot(client: Any, disk_id: str) -> str:
    snap = str(client.call("CreateSnapshot", {"DiskId": disk_id})["SnapshotId"])
    wait(lambda: client.call("DescribeSnapshots", {"SnapshotIds": f'["{snap}"]'})[
        "Snapshots"]["Snapshot"][0]["Status"] == "accomplished", what=f"snapshot of {disk_id}")
    return snap


def test_create_disk_attach_and_custom_image_in_the_browser(
        server: LiveServer, demo_image: str, browser: Any) -> None:  # noqa: F811
    client = api(server)
    body = client.call("RunInstances", {"ImageId": demo_image,
                                        "InstanceType": "ecs.t5-lc2m1.nano",
                                        "DataDisk.1.Size": 20})
    instance_id = body["InstanceIdSets"]["InstanceIdSet"][0]
    wait(lambda: client.call("DescribeInstances", {"InstanceIds": f'["{instance_id}"]'})[
        "Instances"]["Instance"][0]["Status"] == "Running", what="Running")
    system, d1 = (d["DiskId"] for d in sorted(
        client.call("DescribeDisks", {"InstanceId": instance_id})["Disks"]["Disk"],
        key=lambda d: d["Device"]))
    guest_run(client, instance_id, f"echo old-d1 > /mnt/{d1}/marker && sync")
    data_snap, system_snap = _snapshot(client, d1), _snapshot(client, system)
    guest_run(client, instance_id, f"echo new-d1 > /mnt/{d1}/marker && sync")

    page = browser.new_page()
    refused = csp_violations(page)
    log_on(page, server)
    with page.expect_navigation():  # the selector submits its form on change
        page.select_option("select[name=region]", server.credentials["RegionId"])

    # Snapshots > the data disk's snapshot > Actions > Create Disk
    page.get_by_role("link", name="Snapshots", exact=True).click()
    row = page.locator("#snapshots tbody tr", has_text=data_snap)
    assert row.locator("form.create-image").count() == 0  # a data disk's: no image
    row.get_by_role("button", name="Create Disk").click()
    page.wait_for_url(re.compile(r".*/console/disks/"))
    notice = page.locator(".notice.ok").inner_text()
    found = re.search(r"Disk (d-\w+) was created from " + data_snap, notice)
    assert found, notice
    new_disk = found.group(1)
    # the Disks page: the new disk with its source snapshot, then Attach
    disk_row = page.locator(f"tr[data-disk={new_disk}]")
    _reload_until(page, lambda: "Available" in disk_row.inner_text(), "disk Available")
    assert data_snap in disk_row.inner_text()
    shot(page, "disk-from-snapshot")
    disk_row.locator("select[name=instance_id]").select_option(instance_id)
    disk_row.get_by_role("button", name="Attach").click()
    page.wait_for_load_state()
    wait(lambda: client.call("DescribeDisks", {"DiskIds": f'["{new_disk}"]'})[
        "Disks"]["Disk"][0]["Status"] == "In_use", what="attached")
    page.goto(server.endpoint + "console/disks/")
    assert instance_id in page.locator(f"tr[data-disk={new_disk}]").inner_text()
    # the guest reads the snapshot's data on the new disk; the source disk kept its own
    deadline = time.monotonic() + 60
    while True:
        seen = guest_run(client, instance_id, f"cat /mnt/{new_disk}/marker /mnt/{d1}/marker "
                         "2>/dev/null; true").split()
        if seen == ["old-d1", "new-d1"] or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert seen == ["old-d1", "new-d1"]

    # Snapshots > the system disk's snapshot > Actions > Create Custom Image
    page.get_by_role("link", name="Snapshots", exact=True).click()
    page.locator("#snapshots tbody tr", has_text=system_snap).get_by_role(
        "button", name="Create Custom Image").click()
    page.wait_for_url(re.compile(r".*/console/images/"))
    notice = page.locator(".notice.ok").inner_text()
    found = re.search(r"Image (m-\w+) is being created from " + system_snap, notice)
    assert found, notice
    image_id = found.group(1)
    image_row = page.locator(f"tr[data-image={image_id}]")
    _reload_until(page, lambda: "Available" in image_row.inner_text(), "image Available",
                  timeout_s=300)
    assert system_snap in image_row.inner_text() and "self" in image_row.inner_text()
    shot(page, "custom-image")
    usage = client.call("DescribeSnapshots", {"SnapshotIds": f'["{system_snap}"]'})[
        "Snapshots"]["Snapshot"][0]["Usage"]
    assert usage == "image"
    # Delete: nothing was made from it, no Force needed
    image_row.get_by_role("button", name="Delete").click()
    page.wait_for_load_state()
    wait(lambda: not client.call("DescribeImages", {
        "ImageOwnerAlias": "self", "Status": "Creating,Available,CreateFailed"})[
        "Images"]["Image"], what="image deleted")
    page.goto(server.endpoint + "console/images/")
    assert page.locator(f"tr[data-image={image_id}]").count() == 0
    assert refused == []
