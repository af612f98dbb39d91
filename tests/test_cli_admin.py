"""The operator's commands for AccessKeys, passwords and log-on lockouts (in-process, on a
data directory; no VM)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from ecsnap.entrypoints.cli.main import app

runner = CliRunner()


def ecsnap(data: Path, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, [*args, "--data-dir", str(data)])
    return result.exit_code, result.output


def test_accesskeys_rotate_disable_delete_and_passwords(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert ecsnap(data, "init")[0] == 0
    creds = json.loads((data / "credentials.json").read_text())
    first = creds["AccessKeyId"]
    code, listing = ecsnap(data, "accesskey", "list")
    assert code == 0 and f"{first} admin enabled" in listing
    assert creds["AccessKeySecret"] not in listing
    code, rotated = ecsnap(data, "accesskey", "rotate", first, "--output", "json")
    new = json.loads(rotated)["AccessKeyId"]
    assert code == 0 and new != first
    listing = ecsnap(data, "accesskey", "list", "admin")[1]
    assert f"{first} admin disabled" in listing and f"{new} admin enabled" in listing
    assert ecsnap(data, "accesskey", "enable", first)[0] == 0
    assert f"{first} admin enabled" in ecsnap(data, "accesskey", "list")[1]
    assert ecsnap(data, "accesskey", "delete", first)[0] == 0
    assert first not in ecsnap(data, "accesskey", "list")[1]
    code, out = ecsnap(data, "accesskey", "disable", first)
    assert code == 1 and "InvalidAccessKeyId.NotFound" in out
    code, out = ecsnap(data, "account", "password", "admin", "--password", "short")
    assert code == 1 and "InvalidPassword.Malformed" in out
    code, out = ecsnap(data, "account", "password", "admin", "--password",
                       "a-long-enough-passphrase")
    assert code == 0 and "changed" in out
    code, out = ecsnap(data, "account", "lockouts")
    assert code == 0 and out == ""
