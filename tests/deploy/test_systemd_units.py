"""deploy/systemd: the unit files are checked by systemd itself (`systemd-analyze verify`,
on Debian 12 with systemd installed), and their decisions read back."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
ECSNAP = Path(sys.executable).parent / "ecsnap"  # this venv's `ecsnap`, for verify's check


def directives(unit: Path) -> dict[str, list[str]]:
    """Each directive's values, in order (keys may repeat)."""
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def installed(tmp_path: Path) -> list[Path]:
    """The units as systemd-analyze sees them: the agent's template instantiated (host h1),
    ExecStart on this venv's ecsnap (verify checks the binary exists)."""
    out = []
    for unit, name in (("ecsnap.service", "ecsnap.service"),
                       ("ecsnap-agent@.service", "ecsnap-agent@h1.service")):
        text = (UNITS / unit).read_text().replace("/opt/ecsnap/bin/ecsnap", str(ECSNAP))
        (tmp_path / name).write_text(text)
        out.append(tmp_path / name)
    return out


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd not installed")
def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    assert ECSNAP.exists()
    units = installed(tmp_path)
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, units)],
                          capture_output=True, text=True, timeout=60)
    # verify exits 0 on unknown keys and bad values too, but says so: nothing may be said
    said = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == 0 and said == [], said


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd not installed")
def test_verify_would_catch_a_bad_directive(tmp_path: Path) -> None:
    unit = installed(tmp_path)[0]
    unit.write_text(unit.read_text().replace("KillMode=process", "KillMode=processes"))
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                          capture_output=True, text=True, timeout=60)
    assert "kill mode" in done.stderr.lower()


def test_the_units_decisions() -> None:
    serve = directives(UNITS / "ecsnap.service")
    agent = directives(UNITS / "ecsnap-agent@.service")
    for unit in (serve, agent):
        assert unit["User"] == ["ecsnap"] and unit["Restart"] == ["on-failure"]
        # VMs (daemonized QEMU, in the unit's cgroup) survive a restart of their owner
        assert unit["KillMode"] == ["process"]
        assert unit["ProtectSystem"] == ["strict"] and unit["UMask"] == ["0077"]
        assert "StateDirectory" in unit
    assert "--host-id %i" in agent["ExecStart"][0]
    assert agent["ExecStart"][0].endswith("$ECSNAP_AGENT_OPTIONS")  # --vcpus ... per host
    assert "/dev/kvm rw" in agent["DeviceAllow"]
    assert "serve" in serve["ExecStart"][0]
