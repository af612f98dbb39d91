"""The file level of PreviewResetDisks and DescribeSnapshotFiles through the API app
(Starlette's TestClient; real database, real qcow2 disks of an ext4 image; the compute test
double)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from starlette.testclient import TestClient

from ecsnap.service import accounts
from ecsnap.service.context import ServiceContext
from tests.api.test_app import Caller, caller
from tests.conftest import REGION
from tests.inspect import images as disks
from tests.inspect.conftest import EXPECTED, change_story, ok


def preview(alice: Caller, w: dict[str, str], **extra: Any) -> dict[str, dict[str, Any]]:
    body = ok(alice("PreviewResetDisks", Disk__1__DiskId=w["system"],
                    Disk__1__SnapshotId=w["system_snap"], Disk__2__DiskId=w["data"],
                    Disk__2__SnapshotId=w["data_snap"], **extra))
    return {d["DiskId"]: d for d in body["Disks"]["Disk"]}


def test_preview_file_level_through_the_api(ctx: ServiceContext, alice: Caller,
                                            api_world: dict[str, str], tmp_path: Path) -> None:
    w = api_world
    # not asked for: the answer is as before; asked on a running instance: Unavailable
    assert "FileLevel" not in preview(alice, w)[w["system"]]
    running = preview(alice, w, IncludeFileChanges="true")
    assert running[w["system"]]["FileLevel"] == "Unavailable"
    assert "stopped" in running[w["system"]]["FileLevelReason"]
    ok(alice("StopInstance", InstanceId=w["instance"]))
    storage = ctx.storage_of(REGION)
    system_file, data_file = Path(storage.path(w["system"])), Path(storage.path(w["data"]))
    change_story(tmp_path, system_file)
    before = [disks.checksum(system_file), disks.checksum(data_file)]
    answer = preview(alice, w, IncludeFileChanges="true", MaxFileChanges=200)
    assert [disks.checksum(system_file), disks.checksum(data_file)] == before
    system, data = answer[w["system"]], answer[w["data"]]
    assert system["FileLevel"] == "Supported" and system["Allowed"] is True
    changes = system["FileChanges"]
    assert not changes["Partial"] and changes["TotalCount"] == len(EXPECTED)
    assert (changes["AddedCount"], changes["DeletedCount"], changes["ModifiedCount"]) == \
        (3, 2, 5)
    files = {f["Path"]: f for f in changes["Files"]["File"]}
    assert {p: f["Change"] for p, f in files.items()} == \
        {p: change for p, (change, _) in EXPECTED.items()}
    assert files["/replaced.txt"]["Changed"] == "content"
    assert files["/grow.txt"]["SizeInSnapshot"] == 5 and files["/grow.txt"]["SizeNow"] == 24
    assert files["/deleted.txt"]["SizeNow"] == -1
    assert files["/same_size.txt"]["ModifiedTimeNow"] == \
        files["/same_size.txt"]["ModifiedTimeInSnapshot"] == "2023-11-14T22:13:20Z"
    # the blank data disk holds no file system: said so, and the preview still answers
    assert data["FileLevel"] == "Unsupported" and "zeros" in data["FileLevelReason"]
    assert data["Allowed"] is True
    few = preview(alice, w, IncludeFileChanges="true", MaxFileChanges=2)[w["system"]]
    assert len(few["FileChanges"]["Files"]["File"]) == 2
    assert few["FileChanges"]["TotalCount"] == len(EXPECTED)
    status, body = alice("PreviewResetDisks", Disk__1__DiskId=w["system"],
                         Disk__1__SnapshotId=w["system_snap"], IncludeFileChanges="true",
                         MaxFileChanges=10**6)
    assert status == 400 and body["Code"] == "InvalidParameter"


def test_describe_snapshot_files(ctx: ServiceContext, alice: Caller, api_client: TestClient,
                                 api_world: dict[str, str], tmp_path: Path) -> None:
    w = api_world
    snap = w["system_snap"]
    change_story(tmp_path, Path(ctx.storage_of(REGION).path(w["system"])))  # the disk, not
    root = ok(alice("DescribeSnapshotFiles", SnapshotId=snap))  # the snapshot, changes
    assert root["Type"] == "directory" and root["Path"] == "/" and root["DiskId"] == w["system"]
    names = {e["Name"]: e for e in root["Entries"]["Entry"]}
    assert {"deleted.txt", "old_name.txt", "link", "many"} <= set(names)
    assert "newdir" not in names and "FileContent" not in root
    assert names["link"]["Type"] == "symlink" and names["link"]["LinkTarget"] == "keep.txt"
    assert names["perm.txt"]["Mode"] == "0644" and names["many"]["Type"] == "directory"
    conf = ok(alice("DescribeSnapshotFiles", SnapshotId=snap, Path="/etc/conf"))
    assert base64.b64decode(conf["FileContent"]) == b"x=1\n"
    assert (conf["Size"], conf["Truncated"], conf["Type"]) == (4, False, "file")
    part = ok(alice("DescribeSnapshotFiles", SnapshotId=snap, Path="/same_size.txt",
                    Offset=4990, MaxBytes=100))
    assert base64.b64decode(part["FileContent"]) == b"A" * 10 and not part["Truncated"]
    head = ok(alice("DescribeSnapshotFiles", SnapshotId=snap, Path="/same_size.txt",
                    MaxBytes=10))
    assert head["ContentLength"] == 10 and head["Truncated"] is True
    link = ok(alice("DescribeSnapshotFiles", SnapshotId=snap, Path="/link"))
    assert link["LinkTarget"] == "keep.txt" and "FileContent" not in link
    seen: list[str] = []
    token = ""
    while True:
        page = ok(alice("DescribeSnapshotFiles", SnapshotId=snap, Path="/many",
                        MaxResults=120, NextToken=token))
        seen += [e["Name"] for e in page["Entries"]["Entry"]]
        token = page["NextToken"]
        if not token:
            break
    assert seen == [f"f{n:03d}" for n in range(300)] and page["TotalCount"] == 300
    for path, code, http in (("/nope", "InvalidPath.NotFound", 404),
                             ("/link/x", "InvalidPath.NotFound", 404),
                             ("/../etc/shadow", "InvalidParameter", 400),
                             ("relative", "InvalidParameter", 400)):
        status, body = alice("DescribeSnapshotFiles", SnapshotId=snap, Path=path)
        assert (status, body["Code"]) == (http, code), body
    status, body = alice("DescribeSnapshotFiles", SnapshotId=w["data_snap"])
    assert (status, body["Code"]) == (403, "OperationDenied.UnsupportedFileSystem")
    status, body = alice("DescribeSnapshotFiles", SnapshotId=snap, NextToken="%%%")
    assert status == 400
    accounts.create_account(ctx, "bob", "violet-harbour-7")
    key = accounts.create_access_key(ctx, "bob")
    bob = caller(api_client, key.id, key.secret)
    status, body = bob("DescribeSnapshotFiles", SnapshotId=snap)
    assert (status, body["Code"]) == (404, "InvalidSnapshotId.NotFound")
    assert json.dumps(body).count(snap) <= 1
