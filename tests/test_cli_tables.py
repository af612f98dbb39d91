"""The `ecsnap` command as a new user meets it, at 80 columns: tables that never cut an ID,
`--output json` on every listing, a data directory that is found or refused (never made by
mistake), a quiet start-up screen, byte counts for people. The API server runs in this
process (real database and qcow2 files, the compute test double); each command is a child
process, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ecsnap import bootstrap, config
from ecsnap.entrypoints.cli.client import ApiClient, Credentials
from ecsnap.entrypoints.cli.common import human_bytes
from ecsnap.service import images, setup
from tests import qcow
from tests.doubles import FileBackedCompute
from tests.live import ROOT, LiveServer, free_port

REGION = "local-1"


@dataclass
class Cli:
    data_dir: Path
    api: ApiClient
    image_id: str

    def run(self, *args: str, columns: int = 80, env: dict[str, str | None] | None = None,
            cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
        """`ecsnap ARGS` in a child process, its terminal COLUMNS wide."""
        environ: dict[str, str | None] = {k: v for k, v in os.environ.items()
                                          if not k.startswith("ECSNAP_")}
        environ.update({"COLUMNS": str(columns), "ECSNAP_DATA_DIR": str(self.data_dir),
                        **(env or {})})
        return subprocess.run([sys.executable, "-m", "ecsnap", *args], capture_output=True,
                              text=True, timeout=120, cwd=cwd,
                              env={k: v for k, v in environ.items() if v is not None})


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory, template: Path) -> Iterator[Cli]:
    import uvicorn

    from ecsnap.entrypoints.api.app import create_app

    data = tmp_path_factory.mktemp("cli") / "data"
    settings = config.load(data, background_tasks=False, health_gate_timeout_s=2.0)
    ctx = bootstrap.build(settings, compute=FileBackedCompute(), background=False)
    done = setup.initialise(ctx, REGION)
    image = images.register_image(ctx, REGION, name="tiny", os_name="Tiny Linux",
                                  template=template, size_gib=1)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}/"
    (data / "credentials.json").write_text(json.dumps({
        "AccessKeyId": done.access_key.id, "AccessKeySecret": done.access_key.secret,
        "RegionId": REGION, "Endpoint": endpoint}))
    server = uvicorn.Server(uvicorn.Config(create_app(ctx), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive()
        time.sleep(0.02)
    try:
        yield Cli(data, ApiClient(Credentials(done.access_key.id, done.access_key.secret,
                                              REGION, endpoint)), image.id)
    finally:
        server.should_exit = True
        thread.join(30)
        ctx.runner.shutdown()


def _status(cli: Cli, instance_id: str) -> str:
    body = cli.api.call("DescribeInstances", {"InstanceIds": json.dumps([instance_id])})
    return str(body["Instances"]["Instance"][0]["Status"])


@pytest.fixture(scope="module")
def stopped(cli: Cli) -> dict[str, Any]:
    """A stopped instance with a named data disk, an instance snapshot of it, and 384 KiB
    written to the data disk since."""
    body = cli.api.call("RunInstances", {"ImageId": cli.image_id,
                                         "InstanceType": "ecs.t5-lc2m1.nano",
                                         "DataDisk.1.Size": "20",
                                         "InstanceName": "a-rather-long-instance-name"})
    instance_id = body["InstanceIdSets"]["InstanceIdSet"][0]
    while _status(cli, instance_id) != "Running":
        time.sleep(0.05)
    cli.api.call("StopInstance", {"InstanceId": instance_id, "StoppedMode": "KeepCharging"})
    while _status(cli, instance_id) != "Stopped":
        time.sleep(0.05)
    disks = cli.api.call("DescribeDisks", {"InstanceId": instance_id})["Disks"]["Disk"]
    group = cli.api.call("CreateSnapshotGroup", {"InstanceId": instance_id,
                                                 "Name": "before-upgrade"})
    data_disk = next(d["DiskId"] for d in disks if d["Type"] == "data")
    qcow.write(str(cli.data_dir / "pools" / REGION / f"{data_disk}.qcow2"), 0x5A,
               length=384 * 1024)
    return {"instance": instance_id, "disks": [d["DiskId"] for d in disks],
            "data_disk": data_disk, "group": group["SnapshotGroupId"],
            "image": cli.image_id}


def _ids_whole(output: str, ids: list[str]) -> None:
    for line in output.splitlines():
        assert len(line) <= 80, f"wider than the terminal: {line!r}"
    assert "…" not in output
    for id_ in ids:
        assert id_ in output, f"{id_} is cut or folded in:\n{output}"


LISTINGS = [("instances",), ("disks",), ("snapshots",), ("snapshot-groups", "list")]


@pytest.mark.parametrize("command", LISTINGS, ids=" ".join)
def test_tables_never_cut_an_id_at_80_columns(cli: Cli, stopped: dict[str, Any],
                                              command: tuple[str, ...]) -> None:
    proc = cli.run(*command)
    assert proc.returncode == 0, proc.stderr
    ids = [stopped["instance"]] if command == ("instances",) else stopped["disks"]
    if command == ("snapshot-groups", "list"):
        ids = [stopped["group"], *stopped["disks"]]
    _ids_whole(proc.stdout, ids)


def test_a_wide_terminal_shows_every_column(cli: Cli, stopped: dict[str, Any]) -> None:
    narrow = cli.run("instances")
    assert stopped["image"] not in narrow.stdout and "Image" in narrow.stderr  # said so
    wide = cli.run("instances", columns=160)
    assert stopped["image"] in wide.stdout and "a-rather-long-instance-name" in wide.stdout
    assert wide.stderr == ""


@pytest.mark.parametrize("command", LISTINGS, ids=" ".join)
def test_every_listing_answers_json(cli: Cli, stopped: dict[str, Any],
                                    command: tuple[str, ...]) -> None:
    proc = cli.run(*command, "--output", "json")
    assert proc.returncode == 0, proc.stderr
    body = json.loads(proc.stdout)
    [(_wrapper, inner)] = [(k, v) for k, v in body.items() if isinstance(v, dict)]
    [items] = inner.values()
    own = {"instances": {"Name", "Mode"}, "snapshot-groups": {"Disks"}}.get(command[0], set())
    assert items and all(not own & set(item) for item in items), \
        "the API's items, without the table's own columns"
    bad = cli.run(*command, "--output", "yaml")
    assert bad.returncode == 2 and "yaml" in bad.stderr


def test_admin_listings_answer_json(cli: Cli) -> None:
    keys = json.loads(cli.run("accesskey", "list", "--output", "json").stdout)
    assert keys["AccessKeys"][0]["State"] == "enabled"
    lockouts = json.loads(cli.run("account", "lockouts", "--output", "json").stdout)
    assert lockouts == {"Lockouts": []}


def test_rollback_preview_in_human_units(cli: Cli, stopped: dict[str, Any]) -> None:
    proc = cli.run("rollback", stopped["group"], "--disk", stopped["data_disk"], "--preview")
    assert proc.returncode == 0, proc.stderr
    assert "384.0 KiB written since" in proc.stdout and "bytes" not in proc.stdout


def test_human_bytes_as_the_console() -> None:
    from ecsnap.entrypoints.console.app import human

    for n in (0, 1023, 1024, 393216, 5 * 1024**3, 3 * 1024**5):
        assert human_bytes(n) == human(n)
    assert human_bytes(-1) == human_bytes(None) == "unknown"


# ------------------------------------------------------------------ the data directory


def test_a_data_dir_never_initialised_is_refused_not_made(cli: Cli, tmp_path: Path) -> None:
    home = tmp_path / "home"
    nowhere = tmp_path / "nowhere"
    for args in (("account", "lockouts"), ("accesskey", "list"), ("serve",),
                 ("image", "build-demo"), ("instances",)):
        proc = cli.run(*args, env={"ECSNAP_DATA_DIR": str(nowhere), "HOME": str(home)})
        assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
        assert "DataDirNotInitialised" in proc.stderr and "--data-dir" in proc.stderr
        assert str(nowhere) in proc.stderr and "./var/data" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 or "Error" in proc.stderr
    # no ECSNAP_DATA_DIR, no ./var/data: ~/.local/share/ecsnap, which is not made either
    proc = cli.run("account", "lockouts", env={"ECSNAP_DATA_DIR": None, "HOME": str(home)},
                   cwd=tmp_path)
    assert proc.returncode == 1 and str(home / ".local/share/ecsnap") in proc.stderr
    assert not nowhere.exists() and not home.exists()


def test_make_runs_data_dir_is_found_from_its_directory(cli: Cli, tmp_path: Path) -> None:
    project = tmp_path / "project"
    env: dict[str, str | None] = {"ECSNAP_DATA_DIR": None, "HOME": str(tmp_path / "home")}
    assert cli.run("init", "--data-dir", str(project / "var/data"), env=env).returncode == 0
    proc = cli.run("accesskey", "list", "--output", "json", env=env, cwd=project)
    assert proc.returncode == 0, proc.stderr
    creds = json.loads((project / "var/data/credentials.json").read_text())
    assert json.loads(proc.stdout)["AccessKeys"][0]["AccessKeyId"] == creds["AccessKeyId"]
    assert not (tmp_path / "home").exists()


def test_serve_starts_with_what_an_operator_needs(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc = subprocess.run([sys.executable, "-m", "ecsnap", "init", "--data-dir", str(data)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    server = LiveServer(data, env={"ECSNAP_ACCEL": "tcg"})
    server.start()
    try:
        deadline = time.monotonic() + 10
        while "VMs" not in server.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        start_up = server.log.read_text()
        c = server.credentials
        ApiClient(Credentials(c["AccessKeyId"], c["AccessKeySecret"], REGION,
                              server.endpoint)).call("DescribeRegions")
        time.sleep(0.2)
    finally:
        server.stop()
    lines = start_up.splitlines()
    for what in ("endpoint", "console", "credentials", "data", "accelerator", "recovery",
                 "VMs"):
        assert any(line.strip().startswith(what) for line in lines), start_up
    assert f"http://127.0.0.1:{server.port}/console/" in start_up
    assert "TCG" in start_up and "nothing to recover" in start_up
    assert "alembic" not in start_up and " INFO " not in start_up, start_up
    assert " INFO ecsnap.api request " in server.log.read_text()  # then a line a request
