"""The console's Browse files pages and the rollback dialog's "Files that will change"
(in-process: Starlette's TestClient, real qcow2 disks of an ext4 image, the compute double)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

from ecsnap.entrypoints.console.app import create_console
from ecsnap.entrypoints.console.files import download_name
from ecsnap.service import accounts, images, instances, snapshots
from ecsnap.service.context import ServiceContext
from tests.conftest import REGION
from tests.console.test_console_security import PASSWORD, assert_security_headers, log_on
from tests.inspect import images as disks
from tests.inspect.conftest import change_story, story_tree

HOSTILE = '"><img src=x onerror=alert(1)>'


@pytest.fixture
def world(ctx: ServiceContext, tmp_path: Path) -> dict[str, str]:
    account = accounts.create_account(ctx, "alice", PASSWORD)
    tree = story_tree(tmp_path / "tree")
    (tree / HOSTILE).write_bytes(b"<script>alert(1)</script>\n")
    with open(os.path.join(os.fsencode(tree), b"bin\xffary"), "wb") as fh:
        fh.write(b"\0\1\2" * 100)
    os.utime(tree, (disks.MTIME, disks.MTIME))
    template = disks.make_disk(tmp_path, tree, name="template")
    image = images.register_image(ctx, REGION, name="story", os_name="Story Linux",
                                  template=template, size_gib=1)
    [iid] = instances.run_instances(ctx, account.id, REGION, instances.InstanceRequest(
        image_id=image.id, instance_type="ecs.t5-lc2m1.nano",
        data_disks=[instances.DataDiskSpec(size_gib=20)]))
    group, _ = snapshots.create_snapshot_group(ctx, account.id, REGION, iid)
    view = snapshots.get_snapshot_group(ctx, account.id, group)
    system = next(s for s in view.snapshots if s.source_disk_type.value == "system")
    return {"account": account.id, "instance": iid, "group": group, "snap": system.id,
            "disk": system.source_disk_id}


@pytest.fixture
def client(ctx: ServiceContext, world: dict[str, str]) -> Iterator[TestClient]:
    app = Starlette(routes=[Mount("/console", create_console(ctx))])
    with TestClient(app, follow_redirects=False) as c:
        assert log_on(c).status_code == 303
        yield c


def test_browse_files_of_a_snapshot(client: TestClient, world: dict[str, str]) -> None:
    listing = client.get("/console/snapshots/?tab=snapshots")
    assert f"/console/snapshots/{world['snap']}/files" in listing.text
    root = client.get(f"/console/snapshots/{world['snap']}/files")
    assert root.status_code == 200 and "keep.txt" in root.text and "many/" in root.text
    assert_security_headers(root)
    assert HOSTILE not in root.text and "<script>" not in root.text.split("</head>")[1]
    assert "bin\\xffary" in root.text  # a name that is not UTF-8, escaped
    assert "keep.txt (not followed)" in root.text  # the symlink's target, not its content
    conf = client.get(f"/console/snapshots/{world['snap']}/files", params={"path": "/etc/conf"})
    assert conf.status_code == 200 and re.search(r'id="file-text">x=1', conf.text)
    evil = client.get(f"/console/snapshots/{world['snap']}/files", params={"path": "/" + HOSTILE})
    assert evil.status_code == 200 and "<script>alert" not in evil.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in evil.text
    binary = client.get(f"/console/snapshots/{world['snap']}/files",
                        params={"path": "/bin\\xffary"})
    assert 'id="file-binary"' in binary.text
    many = client.get(f"/console/snapshots/{world['snap']}/files", params={"path": "/many"})
    assert 'id="next-page"' in many.text and "200 of 300 entries" in many.text
    got = client.get(f"/console/snapshots/{world['snap']}/files/download",
                     params={"path": "/" + HOSTILE})
    assert got.status_code == 200 and got.content == b"<script>alert(1)</script>\n"
    assert got.headers["content-type"] == "application/octet-stream"
    assert got.headers["content-disposition"] == \
        'attachment; filename="img_src_x_onerror_alert_1"'
    for path, status in (("/nope", 404), ("/../x", 400), ("/many", 400)):
        response = client.get(f"/console/snapshots/{world['snap']}/files/download",
                              params={"path": path})
        assert response.status_code == status and HOSTILE not in response.text
    assert download_name("/a/\\x0a..\\x2f..") == "x0a.._x2f"


def test_files_that_will_change_in_the_rollback_dialog(ctx: ServiceContext, client: TestClient,
                                                       world: dict[str, str],
                                                       tmp_path: Path) -> None:
    dialog = f"/console/snapshots/?tab=instance-snapshots&rollback={world['group']}"
    running = client.get(dialog)
    assert "Stop the instance to list the files" in running.text
    instances.stop_instance(ctx, world["account"], world["instance"])
    stopped = client.get(dialog)
    assert 'id="list-file-changes"' in stopped.text and "/replaced.txt" not in stopped.text
    change_story(tmp_path, Path(ctx.storage_of(REGION).path(world["disk"])))
    listed = client.get(dialog + "&files=1")
    assert listed.status_code == 200
    text = listed.text
    assert "3 to remove (added since the snapshot), 2 to restore (deleted since), 5 to " \
           "revert" in text
    for path in ("/replaced.txt", "/newdir/a.txt", "/deleted.txt"):
        assert f"<code>{path}</code>" in text
    assert "File level Unsupported: the disk holds no file system" in text  # the data disk


def test_restore_form_on_a_file_page(ctx: ServiceContext, client: TestClient,
                                     world: dict[str, str], tmp_path: Path) -> None:
    from tests.inspect.test_restore import current

    page = client.get(f"/console/snapshots/{world['snap']}/files?path=/etc/conf")
    assert 'id="restore-form"' in page.text and "into the running guest" in page.text
    instances.stop_instance(ctx, world["account"], world["instance"])
    disk = Path(ctx.storage_of(REGION).path(world["disk"]))
    change_story(tmp_path, disk)  # /deleted.txt is gone from the disk
    page = client.get(f"/console/snapshots/{world['snap']}/files?path=/deleted.txt")
    assert "onto disk " + world["disk"] in page.text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf is not None
    wrong = client.post(f"/console/snapshots/{world['snap']}/files/restore",
                        data={"csrf": "wrong", "path": "/deleted.txt",
                              "instance_id": world["instance"]})
    assert wrong.status_code in (400, 403)
    done = client.post(f"/console/snapshots/{world['snap']}/files/restore",
                       data={"csrf": csrf.group(1), "path": "/deleted.txt", "target": "",
                             "instance_id": world["instance"]})
    assert done.status_code == 303 and "/console/tasks/t-" in done.headers["location"]
    task = client.get(done.headers["location"])
    assert "Restore files" in task.text and "Finished" in task.text, task.text
    assert current(disk, (b"deleted.txt",))[0] == b"bye"
    # to another path, typed in; a bad one answers an error page, not a traceback
    client.post(f"/console/snapshots/{world['snap']}/files/restore",
                data={"csrf": csrf.group(1), "path": "/etc/conf", "target": "/conf.copy",
                      "instance_id": world["instance"]})
    assert current(disk, (b"conf.copy",))[0] == b"x=1\n"
    bad = client.post(f"/console/snapshots/{world['snap']}/files/restore",
                      data={"csrf": csrf.group(1), "path": "/etc/conf",
                            "target": "/../etc/shadow", "instance_id": world["instance"]})
    assert bad.status_code == 400 and "InvalidParameter" in bad.text


def test_the_path_of_a_page_reads_as_a_path(client: TestClient,
                                            world: dict[str, str]) -> None:
    """The path bar: the root is one `/` (no separator after it), each directory above a
    link to its page."""
    from urllib.parse import unquote

    for path, text, links in ((None, "/", ["/"]), ("/", "/", ["/"]),
                              ("/etc", "/etc", ["/", "/etc"]),
                              ("/etc/conf", "/etc/conf", ["/", "/etc", "/etc/conf"])):
        page = client.get(f"/console/snapshots/{world['snap']}/files",
                          params={"path": path} if path else {})
        assert page.status_code == 200
        found = re.search(r'<nav class="path"[^>]*>(.*?)</nav>', page.text, re.S)
        assert found is not None
        assert re.sub(r"<[^>]+>|\s", "", found.group(1)) == text, found.group(1)
        assert [unquote(h) for h in re.findall(r'href="[^"]*\?path=([^"]*)"',
                                               found.group(1))] == links
