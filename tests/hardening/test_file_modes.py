"""Owner-only files whatever the umask (hardening item 2, file modes).

`ecsnap init`, `ecsnap image import` and `ecsnap serve` run as child processes under a
permissive umask (0o022); after a service run (an instance created, a snapshot group
taken) every directory under the data directory is 0700 at most and every file 0600 at
most. Start-up puts back owner-only modes on a data directory left wider, and says so.
"""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ecsnap import bootstrap, config
from ecsnap.adapters.compute.qemu.rundir import RunDirs
from ecsnap.entrypoints.cli.client import ApiClient, load_credentials
from ecsnap.service import regions
from tests.conftest import REGION
from tests.doubles import FileBackedCompute
from tests.live import ROOT, LiveServer

MIB = 1024 * 1024


def wider_than_owner(root: Path) -> list[str]:
    """Every path under `root` (itself included) that group or others may use."""
    found = []
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if not stat.S_ISLNK(path.lstat().st_mode) and mode & 0o077:
            found.append(f"{path.relative_to(root.parent)} {mode:04o}")
    return found


def run_ecsnap(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "ecsnap", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300, preexec_fn=lambda: os.umask(0o022),
                          env={**os.environ, "ECSNAP_ACCEL": "tcg"})
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_init_and_a_service_run_leave_only_owner_only_paths(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    live = LiveServer(data_dir, env={"ECSNAP_ACCEL": "tcg"})
    live.log = tmp_path / "serve.log"  # the test's log, outside the data directory
    old = os.umask(0o022)  # the server inherits it, as from a permissive shell
    try:
        run_ecsnap("init", "--data-dir", str(data_dir), "--endpoint", live.endpoint)
        image_file = tmp_path / "disk.raw"
        image_file.write_bytes(b"\x42" * MIB)
        run_ecsnap("image", "import", str(image_file), "--name", "mine", "--data-dir",
                   str(data_dir))
        live.start()
    finally:
        os.umask(old)
    try:
        api = ApiClient(load_credentials(data_dir))
        [image] = api.call("DescribeImages", {"ImageName": "mine"})["Images"]["Image"]
        instance_id = api.call("CreateInstance", {
            "ImageId": image["ImageId"], "InstanceType": "ecs.t5-lc2m1.nano",
            "DataDisk.1.Size": "20"})["InstanceId"]
        deadline = time.monotonic() + 60
        while api.call("DescribeInstances", {"InstanceIds": f'["{instance_id}"]'})[
                "Instances"]["Instance"][0]["Status"] != "Stopped":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        group = api.call("CreateSnapshotGroup", {"InstanceId": instance_id})
        [view] = api.call("DescribeSnapshotGroups", {
            "SnapshotGroupId.1": group["SnapshotGroupId"]})["SnapshotGroups"]["SnapshotGroup"]
        assert view["Status"] == "accomplished"
    finally:
        assert live.stop() == 0
    assert list((data_dir / "pools").rglob("*.qcow2")), "the run made disks"
    assert wider_than_owner(data_dir) == []


def test_the_run_directories_are_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        runs = RunDirs(tmp_path / "run")
        with runs.exclusive("i-modes"):
            runs.save_vm("i-modes", {"disks": []})
    finally:
        os.umask(old)
    assert wider_than_owner(tmp_path / "run") == []
    assert sorted(p.name for p in (tmp_path / "run" / "i-modes").iterdir()) == \
        ["lock", "vm.json"]


def test_start_up_fixes_a_wide_data_dir_and_says_so(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    data_dir = tmp_path / "data"
    settings = config.load(data_dir, background_tasks=False)
    ctx = bootstrap.build(settings, compute=FileBackedCompute(), background=False)
    regions.ensure_region(ctx, REGION, vcpus=4, memory_mib=4096)
    database = data_dir / "ecsnap.db"
    pool = next((data_dir / "pools").iterdir())
    wide = {data_dir: 0o755, database: 0o644, pool: 0o755}
    for path, mode in wide.items():
        os.chmod(path, mode)
    (data_dir / "notes.txt").write_text("left by someone")
    os.chmod(data_dir / "notes.txt", 0o664)
    caplog.set_level(logging.WARNING, logger="ecsnap.filemodes")
    bootstrap.build(settings, compute=FileBackedCompute(), background=False)
    assert wider_than_owner(data_dir) == []
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(database.stat().st_mode) == 0o600
    assert stat.S_IMODE((data_dir / "notes.txt").stat().st_mode) == 0o660 & ~0o077
    warned = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for path in [*wide, data_dir / "notes.txt"]:
        assert str(path) in warned
