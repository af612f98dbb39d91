"""The web console in a real browser (Debian's Chromium driven by Playwright) against a
live `ecsnap serve` with a real VM: the seed's flow click by click."""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ecsnap.entrypoints.cli.client import ApiClient, load_credentials
from tests.e2e.test_sdk import READ, WRITE, wait
from tests.live import LiveServer, ecsnap

pytestmark = pytest.mark.qemu

ARTIFACTS = Path(os.environ.get("ECSNAP_ARTIFACTS", Path(__file__).parents[2] /
                                "test-artifacts"))
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    assert shutil.which(CHROMIUM), "Debian's chromium is not installed"
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-quic", "--no-first-run",
                  "--disable-sync"])
        try:
            yield context
        finally:
            context.close()


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def api(server: LiveServer) -> ApiClient:
    return ApiClient(load_credentials(server.data_dir))


def guest_run(client: ApiClient, instance_id: str, command: str) -> str:
    """Run a command in the guest (again while the agent does not answer yet, right after
    a boot); its output. Every wait has a deadline."""
    deadline = time.monotonic() + 120
    while True:
        body = client.call("RunCommand", {"Type": "RunShellScript", "InstanceId.1": instance_id,
                                          "CommandContent": command, "Timeout": 60})
        ends = time.monotonic() + 90  # the command's own 60 s, and some
        while True:
            res = client.call("DescribeInvocationResults", {"InvokeId": body["InvokeId"],
                                                            "ContentEncoding": "PlainText"})
            row = res["Invocation"]["InvocationResults"]["InvocationResult"][0]
            if row["InvokeRecordStatus"] != "Running":
                break
            assert time.monotonic() < ends, f"the command still runs: {row}"
            time.sleep(0.3)
        if not row["ErrorCode"] or time.monotonic() > deadline:
            assert not row["ErrorCode"], row
            return str(row["Output"])
        time.sleep(1)


def status(client: ApiClient, instance_id: str) -> str:
    body = client.call("DescribeInstances", {"InstanceIds": f'["{instance_id}"]'})
    return str(body["Instances"]["Instance"][0]["Status"])


def prepared_instance(server: LiveServer, demo_image: str) -> dict[str, Any]:
    """Through the API: an instance with 3 disks, old markers, an instance snapshot,
    new markers, stopped (the part of the story before the console's flow)."""
    client = api(server)
    body = client.call("RunInstances", {"ImageId": demo_image,
                                        "InstanceType": "ecs.t5-lc2m1.nano",
                                        "DataDisk.1.Size": 20, "DataDisk.2.Size": 20})
    instance_id = body["InstanceIdSets"]["InstanceIdSet"][0]
    wait(lambda: status(client, instance_id) == "Running", what="Running")
    disks = sorted(client.call("DescribeDisks", {"InstanceId": instance_id})["Disks"]["Disk"],
                   key=lambda d: d["Device"])
    system, d1, d2 = (d["DiskId"] for d in disks)
    guest_run(client, instance_id, WRITE.format(tag="old", d1=d1, d2=d2))
    group_id = client.call("CreateSnapshotGroup", {"InstanceId": instance_id,
                                                   "Name": "console-story"})["SnapshotGroupId"]
    wait(lambda: client.call("DescribeSnapshotGroups", {"SnapshotGroupId.1": group_id})
         ["SnapshotGroups"]["SnapshotGroup"][0]["Status"] == "accomplished", what="group")
    guest_run(client, instance_id, WRITE.format(tag="new", d1=d1, d2=d2))
    return {"instance": instance_id, "group": group_id, "system": system, "d1": d1, "d2": d2}


def log_on(page: Any, server: LiveServer) -> None:
    creds = server.credentials
    page.context.clear_cookies()
    page.goto(server.endpoint + "console/")
    page.fill("input[name=account]", "admin")
    page.fill("input[name=password]", creds["ConsolePassword"])
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r".*/console/instances/"))


def csp_violations(page: Any) -> list[str]:
    """Collects what the browser refuses under the console's Content-Security-Policy."""
    seen: list[str] = []
    page.on("console", lambda m: seen.append(m.text)
            if "Content Security Policy" in m.text else None)
    return seen


def test_seed_flow_in_the_browser(server: LiveServer, demo_image: str, browser: Any) -> None:
    story = prepared_instance(server, demo_image)
    page = browser.new_page()
    refused = csp_violations(page)
    log_on(page, server)
    csp = page.request.get(server.endpoint + "console/login").headers
    assert "script-src 'self'" in csp["content-security-policy"]
    # choose the region in the top navigation bar
    with page.expect_navigation():  # the selector submits its form on change
        page.select_option("select[name=region]", server.credentials["RegionId"])
    # stop the instance from the Instances page, in KeepCharging mode
    row = page.locator(f"tr[data-instance={story['instance']}]")
    row.get_by_text("Stop", exact=True).click()
    page.wait_for_selector("#stop-charging-warning")  # the StopCharging warning
    assert page.locator("#stop-charging-warning").is_visible()
    page.get_by_role("button", name="OK").click()
    page.wait_for_selector("#task-result", timeout=90_000)
    assert "stopped" in page.inner_text("#task-result")
    # Storage & Snapshots > Snapshots > Instance Snapshots tab
    page.get_by_role("link", name="Snapshots", exact=True).click()
    page.get_by_role("tab", name="Instance Snapshots").click()
    group_row = page.locator(f"tr[data-group={story['group']}]")
    group_row.get_by_text("Rollback instance").click()
    dialog = page.locator("#rollback-dialog")
    precautions = dialog.locator("#precautions").inner_text()
    assert "cannot be undone" in precautions and "must be Stopped" in precautions
    # the per-disk preview: exactly the figure the preview API gives, for every disk
    figures = written_since(api(server), story, ("system", "d1", "d2"))
    for disk, figure in figures.items():
        assert figure > 0, figures  # new markers were written after the snapshot
        written = dialog.locator(f"tr[data-disk={disk}] td.written").inner_text()
        assert written.strip() == human_bytes(figure), (disk, written, figure)
    dialog.get_by_label("Start Instance Immediately after Rollback").check()
    dialog.get_by_label(f"Roll back {story['d2']}").uncheck()  # 2 of 3 disks
    assert dialog.get_by_label("Create a safety snapshot first (recommended)").is_checked()
    shot(page, "rollback-dialog")
    dialog.get_by_role("button", name="OK Rollback").click()
    page.wait_for_selector("#task-result", timeout=180_000)
    assert "finished" in page.inner_text("#task-result")
    assert page.get_by_role("button", name="Undo rollback").is_visible()
    # log on to the instance through the serial console and check the data
    page.goto(server.endpoint + f"console/instances/{story['instance']}/connect")
    page.wait_for_function("document.getElementById('conn-state').textContent === 'connected'")
    terminal = page.locator("#terminal")
    screen = read_terminal_until(page, "login:", send="\r", timeout=120)
    page.keyboard.type("root\r")
    read_terminal_until(page, "#", timeout=30)
    page.keyboard.type(READ.format(d1=story["d1"], d2=story["d2"]) + " | tr '\\n' ' '; "
                       "echo END\r")
    screen = read_terminal_until(page, "END", timeout=30, occurrences=2)
    assert "old-sys old-d1 new-d2" in screen
    terminal.screenshot(path=str(ARTIFACTS / "serial-console.png"))
    shot(page, "connect")
    # the whole flow (region selector, task page reloads, xterm.js) ran under the CSP
    assert refused == []


def written_since(client: ApiClient, story: dict[str, Any],
                  roles: tuple[str, ...]) -> dict[str, int]:
    """PreviewResetDisks' BytesWrittenSinceSnapshot of the story's disks against the
    story's instance snapshot (what a rollback to it would lose), by disk."""
    group = client.call("DescribeSnapshotGroups", {"SnapshotGroupId.1": story["group"]})[
        "SnapshotGroups"]["SnapshotGroup"][0]
    snaps = {s["SourceDiskId"]: s["SnapshotId"] for s in group["Snapshots"]["Snapshot"]}
    params: dict[str, object] = {}
    for n, role in enumerate(roles, 1):
        params[f"Disk.{n}.DiskId"] = story[role]
        params[f"Disk.{n}.SnapshotId"] = snaps[story[role]]
    body = client.call("PreviewResetDisks", params)
    return {d["DiskId"]: int(d["BytesWrittenSinceSnapshot"]) for d in body["Disks"]["Disk"]}


def human_bytes(n: int) -> str:
    """A byte count as the console writes it: 512 B, 1.5 KiB, 3.0 MiB, ..."""
    if n < 1024:
        return f"{n} B"
    value, units = n / 1024, ["KiB", "MiB", "GiB", "TiB"]
    while value >= 1024 and len(units) > 1:
        value, units = value / 1024, units[1:]
    return f"{value:.1f} {units[0]}"


def read_terminal_until(page: Any, text: str, *, timeout: float, send: str | None = None,
                        occurrences: int = 1) -> str:
    deadline = time.monotonic() + timeout
    last_send = 0.0
    while time.monotonic() < deadline:
        screen = page.evaluate("""() => { const b = window.ecsnapTerminal.buffer.active;
            let out = []; for (let i = 0; i < b.length; i++) {
            out.push(b.getLine(i).translateToString(true)); } return out.join('\\n'); }""")
        if screen.count(text) >= occurrences:
            return str(screen)
        if send and time.monotonic() - last_send > 3:
            page.keyboard.type(send)
            last_send = time.monotonic()
        time.sleep(0.3)
    raise AssertionError(f"{text!r} never appeared on the serial console")


def test_disabled_disk_undo_and_tenancy(server: LiveServer, demo_image: str,
                                        browser: Any) -> None:
    story = prepared_instance(server, demo_image)
    client = api(server)
    client.call("StopInstance", {"InstanceId": story["instance"],
                                 "StoppedMode": "StopCharging"})
    wait(lambda: status(client, story["instance"]) == "Stopped", what="Stopped")
    client.call("DetachDisk", {"InstanceId": story["instance"], "DiskId": story["d2"]})
    page = browser.new_page()
    log_on(page, server)
    page.goto(server.endpoint + "console/snapshots/?tab=instance-snapshots")
    page.locator(f"tr[data-group={story['group']}]").get_by_text("Rollback instance").click()
    dialog = page.locator("#rollback-dialog")
    d2 = dialog.locator(f"tr[data-disk={story['d2']}]")
    assert d2.locator("input[type=checkbox]").is_disabled()
    assert "detached" in d2.inner_text() and "IncorrectDiskStatus" in d2.inner_text()
    assert "StopCharging" in dialog.locator("#stop-charging-note").inner_text()
    shot(page, "rollback-dialog-disabled-disk")
    before = written_since(client, story, ("system", "d1"))
    assert all(n > 0 for n in before.values()), before
    dialog.get_by_role("button", name="OK Rollback").click()
    page.wait_for_selector("#task-result", timeout=120_000)
    assert "finished" in page.inner_text("#task-result")
    # after the rollback: the two disks are their snapshot again, d2 (disabled) untouched
    assert written_since(client, story, ("system", "d1")) == dict.fromkeys(before, 0)
    client.call("StartInstance", {"InstanceId": story["instance"]})
    wait(lambda: status(client, story["instance"]) == "Running", what="Running")
    out = guest_run(client, story["instance"], "cat /root/marker /mnt/" + story["d1"] +
                    "/marker")
    assert out.split() == ["old-sys", "old-d1"]
    client.call("StopInstance", {"InstanceId": story["instance"],
                                 "StoppedMode": "StopCharging"})
    wait(lambda: status(client, story["instance"]) == "Stopped", what="Stopped")
    page.get_by_role("button", name="Undo rollback").click()
    page.wait_for_selector("#task-result", timeout=120_000)
    assert "finished" in page.inner_text("#task-result")
    shot(page, "undo-rollback")
    # after the undo: the data written since the snapshot is back, exactly
    assert written_since(client, story, ("system", "d1")) == before
    # the undo brought the newer data back: start and read it through the agent
    client.call("StartInstance", {"InstanceId": story["instance"]})
    wait(lambda: status(client, story["instance"]) == "Running", what="Running")
    out = guest_run(client, story["instance"], "cat /root/marker /mnt/" + story["d1"] +
                    "/marker")
    assert out.split() == ["new-sys", "new-d1"]
    # a second account sees none of it
    ecsnap("account", "create", "carol", "--password", "violet-harbour-42", "--data-dir",
           str(server.data_dir))
    other = browser.new_page()
    other.context.clear_cookies()
    other.goto(server.endpoint + "console/")
    other.fill("input[name=account]", "carol")
    other.fill("input[name=password]", "violet-harbour-42")
    other.click("button[type=submit]")
    other.wait_for_url(re.compile(r".*/console/instances/"))
    assert story["instance"] not in other.content()
    assert "No instances in this region" in other.content()
    other.goto(server.endpoint + f"console/instances/{story['instance']}")
    assert "does not exist" in other.content()
    shot(other, "second-account")
