"""`ecsnap files ls|get|changes` against the API app in-process (the signed client's HTTP
client is Starlette's TestClient)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from starlette.testclient import TestClient
from typer.testing import CliRunner

from ecsnap.entrypoints.cli import files_commands
from ecsnap.entrypoints.cli.client import ApiClient, Credentials
from ecsnap.service import setup
from ecsnap.service.context import ServiceContext
from tests.api.test_app import Caller
from tests.conftest import REGION
from tests.inspect.conftest import EXPECTED, change_story, ok

app = typer.Typer()
app.add_typer(files_commands.files_app, name="files")
runner = CliRunner()


@pytest.fixture
def cli(ctx: ServiceContext, api_client: TestClient, alice: Caller,
        monkeypatch: pytest.MonkeyPatch) -> None:
    key = setup.initialise(ctx, REGION).access_key  # the same account as alice's
    api = ApiClient(Credentials(key.id, key.secret, REGION, "http://127.0.0.1/"))
    api.http = api_client
    monkeypatch.setattr(files_commands, "client", lambda data_dir: api)


@pytest.mark.usefixtures("cli")
def test_files_ls_get_and_changes(ctx: ServiceContext, alice: Caller,
                                  api_world: dict[str, str], tmp_path: Path) -> None:
    w = api_world
    done = runner.invoke(app, ["files", "ls", w["system_snap"], "/"])
    assert done.exit_code == 0, done.output
    assert "keep.txt" in done.output and "link -> keep.txt" in done.output
    done = runner.invoke(app, ["files", "ls", w["system_snap"], "/many", "--output", "json"])
    assert len(json.loads(done.stdout)["Entries"]["Entry"]) == 300
    target = tmp_path / "out.bin"
    done = runner.invoke(app, ["files", "get", w["system_snap"], "/same_size.txt", "-o",
                               str(target)])
    assert done.exit_code == 0 and target.read_bytes() == b"A" * 5000
    done = runner.invoke(app, ["files", "get", w["system_snap"], "/etc/conf"])
    assert done.stdout == "x=1\n"
    done = runner.invoke(app, ["files", "get", w["system_snap"], "/link"])
    assert done.exit_code == 1 and "not followed" in done.output
    done = runner.invoke(app, ["files", "get", w["system_snap"], "/../etc/shadow"])
    assert done.exit_code == 1 and "InvalidParameter" in done.output
    ok(alice("StopInstance", InstanceId=w["instance"]))
    change_story(tmp_path, Path(ctx.storage_of(REGION).path(w["system"])))
    done = runner.invoke(app, ["files", "changes", w["group"]])
    assert done.exit_code == 0, done.output
    assert "3 to remove, 2 to restore, 5 to revert" in done.output
    for path in EXPECTED:
        assert f" {path}" in done.output
    assert "file level Unsupported" in done.output


@pytest.mark.usefixtures("cli")
def test_files_restore(ctx: ServiceContext, alice: Caller, api_world: dict[str, str],
                       tmp_path: Path) -> None:
    from tests.inspect.test_restore import current

    w = api_world
    ok(alice("StopInstance", InstanceId=w["instance"]))
    disk = Path(ctx.storage_of(REGION).path(w["system"]))
    change_story(tmp_path, disk)
    done = runner.invoke(app, ["files", "restore", w["instance"], w["system_snap"],
                               "/deleted.txt", "/grow.txt"])
    assert done.exit_code == 0, done.output
    assert f"/deleted.txt -> /deleted.txt (onto disk {w['system']})" in done.output
    assert "Finished" in done.output
    assert current(disk, (b"deleted.txt",))[0] == b"bye"
    assert current(disk, (b"grow.txt",))[0] == b"short"
    done = runner.invoke(app, ["files", "restore", w["instance"], w["system_snap"],
                               "/etc/conf", "--to", "/conf.old", "--output", "json"])
    assert json.loads(done.stdout)["TaskStatus"] == "Finished"
    assert current(disk, (b"conf.old",))[0] == b"x=1\n"
    done = runner.invoke(app, ["files", "restore", w["instance"], w["system_snap"], "/link"])
    assert done.exit_code == 1 and "InvalidPath.NotAFile" in done.output
    done = runner.invoke(app, ["files", "restore", w["instance"], w["system_snap"],
                               "/keep.txt", "--to", "/many"])  # a directory there
    assert done.exit_code == 1 and "InvalidPath.NotAFile" in done.output
