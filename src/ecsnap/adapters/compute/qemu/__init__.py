"""The QEMU compute driver (a package of one module per capability, see driver.py)."""

from __future__ import annotations

import shutil

from ecsnap.adapters.compute.qemu.disks import disk_serial
from ecsnap.adapters.compute.qemu.driver import QemuDriver
from ecsnap.adapters.compute.qemu.live_snapshot import CommandTime, LiveSnapshotTiming


def qemu_available(binary: str = "qemu-system-x86_64") -> bool:
    return shutil.which(binary) is not None


__all__ = ["CommandTime", "LiveSnapshotTiming", "QemuDriver", "disk_serial", "qemu_available"]
