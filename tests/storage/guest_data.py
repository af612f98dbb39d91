"""Guest data of a disk, whatever its backend: written with qemu-io and read back as exact
bytes with `qemu-img convert -O raw`, on the disk's `path()` as a hypervisor would open
it: a qcow2 file, or an RBD image (QEMU's rbd driver, `RbdLocation`)."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from ecsnap.adapters.storage.base import RbdLocation


def _format(path: str) -> str:
    return "raw" if RbdLocation.parse(path) else "qcow2"


def write(path: str, pattern: int, offset: int, length: int) -> None:
    write_many(path, [(pattern, offset, length)])


def write_many(path: str, writes: list[tuple[int, int, int]]) -> None:
    """(pattern, offset, length) writes, in order, by one qemu-io process."""
    cmds = [arg for p, o, n in writes for arg in ("-c", f"write -P {p:#x} {o} {n}")]
    if cmds:
        subprocess.run(["qemu-io", "-f", _format(path), *cmds, path], check=True,
                       capture_output=True)


def qemu_io(path: str, *commands: str) -> None:
    """Other qemu-io commands (`write -z`, `discard`...), by one process."""
    subprocess.run(["qemu-io", "-f", _format(path),
                    *(arg for c in commands for arg in ("-c", c)), path],
                   check=True, capture_output=True)


def _protocol_opts(path: str) -> str:
    rbd = RbdLocation.parse(path)
    if rbd is None:
        return f"file.driver=qcow2,file.file.filename={path.replace(',', ',,')}"
    opts = f"file.driver=rbd,file.pool={rbd.pool},file.image={rbd.image}"
    if rbd.conf:
        opts += f",file.conf={rbd.conf.replace(',', ',,')}"
    if rbd.client:
        opts += f",file.user={rbd.client}"
    return opts


def read(path: str, offset: int, length: int) -> bytes:
    """Exactly the guest bytes [offset, offset+length) (multiples of 512): a raw slice of
    the disk converted to a raw file."""
    opts = f"driver=raw,offset={offset},size={length},{_protocol_opts(path)}"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "slice.raw"
        subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", "--image-opts", opts,
                        str(out)], check=True, capture_output=True)
        return out.read_bytes()


def whole(path: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "disk.raw"
        subprocess.run(["qemu-img", "convert", "-U", "-f", _format(path), "-O", "raw", path,
                        str(out)], check=True, capture_output=True)
        return out.read_bytes()
