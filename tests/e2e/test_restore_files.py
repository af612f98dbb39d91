"""Restoring single files from a snapshot onto a real VM of the demo image (issue 16), and
the look-inside flows of the console in Chromium.

- into the running guest through its agent: a file written, snapshotted, changed (content,
  mode, owner) and deleted, restored, read back through RunCommand with its content, mode
  and owner; a data disk's file under /mnt/<disk>; to another path; twice (same result);
- onto the stopped instance's disk: restored, the instance started, read back;
- in the browser: the Rollback instance dialog lists the files that will change, Browse
  files lists a snapshot's files and downloads one (the bytes checked), the Restore form
  restores a file into the running guest.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from ecsnap.entrypoints.cli.client import ApiClient, load_credentials
from tests.e2e.test_console import browser, guest_run, log_on, shot, status  # noqa: F401
from tests.e2e.test_sdk import wait
from tests.live import LiveServer

pytestmark = pytest.mark.qemu

BEFORE = ("printf 'precious\\nbytes\\n' > /root/precious.txt && chown 1234:2345 "
          "/root/precious.txt && chmod 640 /root/precious.txt && mkdir -p /mnt/{d}/r && "
          "printf 'data-disk file\\n' > /mnt/{d}/r/data.txt && chmod 600 /mnt/{d}/r/data.txt && "
          "echo keep > /root/keep.txt && sync")
AFTER = ("echo overwritten > /root/precious.txt && chown 0:0 /root/precious.txt && "
         "chmod 777 /root/precious.txt && rm /mnt/{d}/r/data.txt && echo new > /root/new.txt "
         "&& sync")
SHOW = "stat -c '%a %u %g' {p} && cat {p}"


def api(server: LiveServer) -> ApiClient:
    return ApiClient(load_credentials(server.data_dir))


def story(server: LiveServer, demo_image: str) -> dict[str, Any]:
    """A running instance with a data disk, files written, an instance snapshot, the files
    changed after it."""
    client = api(server)
    body = client.call("RunInstances", {"ImageId": demo_image,
                                        "InstanceType": "ecs.t5-lc2m1.nano",
                                        "DataDisk.1.Size": 20})
    iid = body["InstanceIdSets"]["InstanceIdSet"][0]
    wait(lambda: status(client, iid) == "Running", what="Running")
    disks = sorted(client.call("DescribeDisks", {"InstanceId": iid})["Disks"]["Disk"],
                   key=lambda d: d["Device"])
    system, data = (d["DiskId"] for d in disks)
    guest_run(client, iid, BEFORE.format(d=data))
    group = client.call("CreateSnapshotGroup", {"InstanceId": iid})["SnapshotGroupId"]
    wait(lambda: client.call("DescribeSnapshotGroups", {"SnapshotGroupId.1": group})
         ["SnapshotGroups"]["SnapshotGroup"][0]["Status"] == "accomplished", what="group")
    found = client.call("DescribeSnapshotGroups", {"SnapshotGroupId.1": group})[
        "SnapshotGroups"]["SnapshotGroup"][0]
    snaps = {s["SourceDiskId"]: s["SnapshotId"] for s in found["Snapshots"]["Snapshot"]}
    guest_run(client, iid, AFTER.format(d=data))
    return {"instance": iid, "system": system, "data": data, "group": group,
            "system_snap": snaps[system], "data_snap": snaps[data]}


def restore(client: ApiClient, params: dict[str, Any]) -> dict[str, Any]:
    """RestoreSnapshotFiles, and its task once it ended (Finished is asserted)."""
    body = client.call("RestoreSnapshotFiles", params)
    wait(lambda: client.call("DescribeTaskAttribute", {"TaskId": body["TaskId"]})
         ["TaskStatus"] != "Processing", what="the restore task")
    task = client.call("DescribeTaskAttribute", {"TaskId": body["TaskId"]})
    assert task["TaskStatus"] == "Finished", task
    return body


def test_restore_into_the_running_guest_then_onto_the_stopped_disk(
        server: LiveServer, demo_image: str) -> None:
    client = api(server)
    w = story(server, demo_image)
    iid = w["instance"]
    assert guest_run(client, iid, SHOW.format(p="/root/precious.txt")) == \
        "777 0 0\noverwritten\n"
    for _ in range(2):  # twice: the same file
        body = restore(client, {"InstanceId": iid, "SnapshotId": w["system_snap"],
                                "Path.1": "/root/precious.txt"})
        assert body["RestoreMode"] == "GuestAgent"
        assert guest_run(client, iid, SHOW.format(p="/root/precious.txt")) == \
            "640 1234 2345\nprecious\nbytes\n"
    # a data disk's file goes back under /mnt/<disk>
    body = restore(client, {"InstanceId": iid, "SnapshotId": w["data_snap"],
                            "Path.1": "/r/data.txt"})
    target = f"/mnt/{w['data']}/r/data.txt"
    assert body["Files"]["File"] == [{"Path": "/r/data.txt", "TargetPath": target}]
    assert guest_run(client, iid, SHOW.format(p=target)) == "600 0 0\ndata-disk file\n"
    # to another path (its directory made), nothing left beside the targets
    restore(client, {"InstanceId": iid, "SnapshotId": w["system_snap"],
                     "Path.1": "/root/keep.txt", "TargetPath": "/root/restored/keep.copy"})
    assert guest_run(client, iid, "cat /root/restored/keep.copy") == "keep\n"
    assert guest_run(client, iid, "ls -a /root /root/restored /mnt/*/r | "
                     "grep -c ecsnap-restore || true") == "0\n"

    # the stopped path: the guest changes the file again, stops; restored onto the disk
    guest_run(client, iid, "echo changed-again > /root/precious.txt && "
                           "chmod 604 /root/precious.txt && sync")
    client.call("StopInstance", {"InstanceId": iid})
    wait(lambda: status(client, iid) == "Stopped", what="Stopped")
    body = restore(client, {"InstanceId": iid, "SnapshotId": w["system_snap"],
                            "Path.1": "/root/precious.txt"})
    assert body["RestoreMode"] == "Disk"
    client.call("StartInstance", {"InstanceId": iid})
    wait(lambda: status(client, iid) == "Running", what="Running")
    assert guest_run(client, iid, SHOW.format(p="/root/precious.txt")) == \
        "640 1234 2345\nprecious\nbytes\n"
    assert guest_run(client, iid, "cat /root/new.txt") == "new\n"  # the rest untouched
    client.call("DeleteInstance", {"InstanceId": iid, "Force": "true"})


def test_console_rollback_files_browse_download_and_restore(
        server: LiveServer, demo_image: str, browser: Any,  # noqa: F811
        tmp_path: Path) -> None:
    client = api(server)
    w = story(server, demo_image)
    iid = w["instance"]
    page = browser.new_page()
    log_on(page, server)

    # Browse files of the system disk's snapshot (the instance runs): list, then download
    page.goto(server.endpoint + "console/snapshots/?tab=snapshots")
    page.locator(f"a.browse-files[href*='{w['system_snap']}']").first.click()
    page.wait_for_selector("#file-entries")
    assert "root/" in page.inner_text("#file-entries")
    page.locator("#file-entries a", has_text=re.compile(r"^root/$")).click()
    page.locator("#file-entries a", has_text="precious.txt").click()
    assert page.inner_text("#file-text") == "precious\nbytes\n"
    assert "mode 0640, owner 1234:2345" in page.inner_text("#file-meta")
    with page.expect_download() as caught:
        page.click("#download")
    saved = tmp_path / "download.bin"
    caught.value.save_as(str(saved))
    assert saved.read_bytes() == b"precious\nbytes\n"
    assert caught.value.suggested_filename == "precious.txt"
    shot(page, "browse-files-file")

    # the Restore form: into the running guest, to the path it had
    assert "into the running guest" in page.inner_text("#restore-form")
    page.once("dialog", lambda d: d.accept())
    page.click("#restore-button")
    page.wait_for_selector("#task-result", timeout=120_000)
    assert page.inner_text("#task-result") == "The files are restored.", \
        page.inner_text("#task")
    shot(page, "restore-task")
    assert guest_run(client, iid, SHOW.format(p="/root/precious.txt")) == \
        "640 1234 2345\nprecious\nbytes\n"

    # the Rollback instance dialog of a stopped instance lists the files that will change
    client.call("StopInstance", {"InstanceId": iid})
    wait(lambda: status(client, iid) == "Stopped", what="Stopped")
    page.goto(server.endpoint + "console/snapshots/?tab=instance-snapshots")
    page.locator(f"tr[data-group={w['group']}]").get_by_text("Rollback instance").click()
    page.click("#list-file-changes")
    page.wait_for_selector("#files-that-will-change .disk-files", timeout=120_000)
    listed = page.inner_text("#files-that-will-change")
    assert "/root/new.txt" in listed and "/r/data.txt" in listed, listed
    system = page.locator(f"#files-that-will-change .disk-files[data-disk={w['system']}]")
    assert "remove" in system.inner_text()
    shot(page, "rollback-files-that-will-change")
    page.close()
    client.call("DeleteInstance", {"InstanceId": iid, "Force": "true"})
