"""Read and write guest data of real qcow2 files with qemu-io, for assertions (also of
an RBD image, given its `rbd:` path: raw through QEMU's rbd driver)."""

from __future__ import annotations

import subprocess

MIB = 1024 * 1024


def _format(path: str) -> str:
    return "raw" if path.startswith("rbd:") else "qcow2"


def write(path: str, pattern: int, offset: int = 0, length: int = MIB) -> None:
    subprocess.run(["qemu-io", "-f", _format(path), "-c",
                    f"write -P {pattern:#x} {offset} {length}", path],
                   check=True, capture_output=True)


def holds(path: str, pattern: int, offset: int = 0, length: int = MIB) -> bool:
    """True if every byte of [offset, offset+length) equals `pattern`."""
    out = subprocess.run(["qemu-io", "-f", _format(path), "-r", "-U", "-c",
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
