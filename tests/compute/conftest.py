"""Fixtures for the compute tests: the demo image (built once per session, Debian packages
cached across runs in $ECSNAP_TEST_CACHE/debs, default <repo>/.cache/debs), disk files
made with qemu-img, and one run root for every VM of the session (so the accelerator is
probed once; whatever is still running there at the end is stopped)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ecsnap.adapters.compute.base import VmDisk, VmSpec
from ecsnap.adapters.compute.guest_image import DemoImage, build_demo_image
from ecsnap.adapters.compute.qemu import QemuDriver

CACHE = Path(os.environ.get("ECSNAP_TEST_CACHE", Path(__file__).parents[2] / ".cache"))
BOOT_TIMEOUT = 60.0

HAVE_QEMU = all(shutil.which(tool) for tool in ("qemu-system-x86_64", "qemu-img"))


@pytest.fixture(scope="session")
def demo_image(tmp_path_factory: pytest.TempPathFactory) -> DemoImage:
    if not HAVE_QEMU:
        pytest.fail("QEMU is not installed: `make test` installs it (scripts/system-deps.sh)")
    return build_demo_image(tmp_path_factory.mktemp("demo-image"), CACHE / "debs")


@pytest.fixture(scope="session")
def run_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if not HAVE_QEMU:
        pytest.fail("QEMU is not installed: `make test` installs it (scripts/system-deps.sh)")
    # short: unix socket paths must stay under 108 bytes
    root = tmp_path_factory.mktemp("run")
    try:
        yield root
    finally:
        driver = QemuDriver(root, accel="tcg")
        for instance_id in driver.running():
            driver.stop(instance_id, force=True)


MakeDisk = Callable[..., VmDisk]


@pytest.fixture(scope="session")
def make_disk(tmp_path_factory: pytest.TempPathFactory) -> MakeDisk:
    folder = tmp_path_factory.mktemp("disks")

    def make(disk_id: str, size: str = "1G", backing: Path | None = None) -> VmDisk:
        path = folder / f"{disk_id}.qcow2"
        cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
        if backing is not None:
            cmd += ["-b", str(backing), "-F", "qcow2"]
        subprocess.run([*cmd, str(path), size], check=True)
        return VmDisk(disk_id, str(path), backing is not None)

    return make


def spec_for(image: DemoImage, instance_id: str, disks: list[VmDisk],
             memory_mib: int = 256) -> VmSpec:
    return VmSpec(instance_id, 1, memory_mib, disks, "direct", str(image.kernel_path),
                  str(image.initrd_path), image.kernel_args)


def wait_agent(driver: QemuDriver, instance_id: str, timeout: float = BOOT_TIMEOUT) -> float:
    """Seconds until the guest agent answers (fails the test after `timeout`)."""
    started = time.monotonic()
    while not driver.guest_ping(instance_id, timeout=2):
        assert driver.state(instance_id).running, "the VM died while booting"
        assert time.monotonic() - started < timeout, \
            f"the guest agent of {instance_id} did not answer in {timeout:.0f} s"
    return time.monotonic() - started


def snapshots_in(path: str) -> list[str]:
    """Internal snapshots of a qcow2 file, read with qemu-img (-U: QEMU has it open)."""
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", path],
                         check=True, capture_output=True, text=True).stdout
    return [s["name"] for s in json.loads(out).get("snapshots", [])]
