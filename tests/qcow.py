"""Read and write guest data of real qcow2 files with qemu-io, for assertions."""

from __future__ import annotations

import subprocess

MIB = 1024 * 1024


def write(path: str, pattern: int, offset: int = 0, length: int = MIB) -> None:
    subprocess.run(["qemu-io", "-f", "qcow2", "-c",
                    f"write -P {pattern:#x} {offset} {length}", path],
                   check=True, capture_output=True)


def holds(path: str, pattern: int, offset: int = 0, length: int = MIB) -> bool:
    """True if every byte of [offset, offset+length) equals `pattern`."""
    out = subprocess.run(["qemu-io", "-f", "qcow2", "-r", "-U", "-c",
                          f"read -P {pattern:#x} {offset} {length}", path],
                         capture_output=True, text=True)
    text = out.stdout + out.stderr
    return out.returncode == 0 and "Pattern verification failed" not in text \
        and "read " in text


def snapshots(path: str) -> list[str]:
    import json

    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", path],
                                     check=True, capture_output=True, text=True).stdout)
    return [s["name"] for s in info.get("snapshots", [])]
