"""How a disk appears in a VM; the command line (lifecycle.py) and hot plug follow it.

Each disk is a `-blockdev` pair, a file node `f-<disk id>` under a qcow2 node named by the
disk ID (the name QMP snapshot commands use), on a virtio-blk-pci device `dev-<disk id>`.
A disk of a Ceph RBD pool (its path an `rbd:` location, storage/base.RbdLocation) is one
`rbd` node named by the disk ID: QEMU's rbd driver implements internal snapshots, so the
same QMP snapshot commands work on it. Its cache is set explicitly to writeback with
flushes honoured (`cache.direct` off, which makes QEMU turn librbd's `rbd_cache` on, and
`no-flush` off, so a guest's flush reaches the cluster): what Ceph recommends for QEMU,
and safe for snapshots, which librbd takes after flushing its cache.
QEMU's rbd node takes no keyring path: when the location names a keyring (a cluster with
cephx), the client's key is read from it (`rbd_key`) and handed to QEMU as a `secret`
object `key-<disk id>` (`secrets`; the node's `key-secret`): on the command line from an
owner-only file in the VM's run directory (never in the command line itself), on a hot
plug through QMP `object-add`.
Serial scheme: the device's `serial` is the disk ID without its "d-" prefix (ecsnap disk
IDs are "d-" and 20 characters; virtio-blk keeps 20 bytes of serial); the demo guest
mounts the disk at `/mnt/d-<serial>`, i.e. `/mnt/<disk id>`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ecsnap.adapters.compute.base import ComputeError, VmDisk
from ecsnap.adapters.storage.base import RbdLocation

_NODE = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,29}$")


def disk_serial(disk_id: str) -> str:
    """The virtio-blk serial of a disk: its ID without "d-" (at most 20 bytes)."""
    return disk_id.removeprefix("d-")[:20]


def checked(disk: VmDisk) -> tuple[str, str]:
    """(block node name, location) of a disk to attach, or ComputeError: the location is
    the absolute path of its file, or its `rbd:` location as given."""
    node = disk.disk_id
    if not _NODE.match(node):
        raise ComputeError(f"disk id {node!r} cannot name a QEMU block node")
    try:
        rbd = RbdLocation.parse(disk.path)
    except ValueError as exc:
        raise ComputeError(f"disk {node}: {exc}") from exc
    if rbd is not None:
        if rbd.keyring:
            rbd_key(rbd)  # now, so that a VM does not start with a disk it cannot open
        return node, disk.path
    path = str(Path(disk.path).resolve())
    if not Path(path).is_file():
        raise ComputeError(f"disk {node}: no file at {path}")
    return node, path


def nodes(node: str, location: str) -> list[dict[str, Any]]:
    """The `-blockdev` nodes of a disk at `location` (as `checked` gives it), in the order
    they are added; the last one is named by the disk ID."""
    rbd = RbdLocation.parse(location)
    if rbd is not None:
        return [rbd_node(node, rbd)]
    return [file_node(node, location), qcow2_node(node)]


def rbd_node(node: str, rbd: RbdLocation) -> dict[str, Any]:
    """The disk's RBD image as one node, named by the disk ID (cache: see above)."""
    out: dict[str, Any] = {"driver": "rbd", "node-name": node, "pool": rbd.pool,
                           "image": rbd.image, "discard": "unmap",
                           "cache": {"direct": False, "no-flush": False}}
    if rbd.conf:
        out["conf"] = rbd.conf
    if rbd.client:
        out["user"] = rbd.client
    if rbd.keyring:
        out["key-secret"] = secret_id(node)
    return out


def secret_id(node: str) -> str:
    """The id of the QEMU `secret` object holding the cephx key of the disk's node."""
    return f"key-{node}"


def secrets(node: str, location: str) -> Iterator[tuple[str, str]]:
    """(secret object id, base64 cephx key) of the disk, if its node needs one."""
    rbd = RbdLocation.parse(location)
    if rbd is not None and rbd.keyring:
        yield secret_id(node), rbd_key(rbd)


_SECTION = re.compile(r"^\s*\[\s*([^\]]+?)\s*\]\s*$")
_KEY = re.compile(r"^\s*key\s*=\s*([A-Za-z0-9+/]+={0,2})\s*$")


def rbd_key(rbd: RbdLocation) -> str:
    """The base64 cephx key of the location's client (`client.<id>`, default admin) in
    its keyring file (Ceph's keyring format: `[client.NAME]` sections of `key = ...`),
    or ComputeError."""
    entity = f"client.{rbd.client or 'admin'}"
    try:
        text = Path(rbd.keyring).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ComputeError(f"cannot read the keyring {rbd.keyring}: {exc}") from exc
    section = ""
    for line in text.splitlines():
        head = _SECTION.match(line)
        if head:
            section = head.group(1)
            continue
        key = _KEY.match(line)
        if key and section == entity:
            return key.group(1)
    raise ComputeError(f"the keyring {rbd.keyring} has no key for {entity}")


def file_node(node: str, path: str) -> dict[str, Any]:
    """The protocol node `f-<disk id>` on the disk's file."""
    return {"driver": "file", "node-name": f"f-{node}", "filename": path, "discard": "unmap"}


def qcow2_node(node: str) -> dict[str, Any]:
    """The format node, named by the disk ID, on its file node."""
    return {"driver": "qcow2", "node-name": node, "file": f"f-{node}", "discard": "unmap"}


def device(node: str, bus: str | None, bootindex: int | None = None) -> dict[str, Any]:
    """The virtio-blk-pci device `dev-<disk id>` of the disk (on `bus`, if given)."""
    dev: dict[str, Any] = {"driver": "virtio-blk-pci", "drive": node, "id": f"dev-{node}",
                           "serial": disk_serial(node)}
    if bus:
        dev["bus"] = bus
    if bootindex is not None:
        dev["bootindex"] = bootindex
    return dev


__all__ = ["checked", "device", "disk_serial", "file_node", "nodes", "qcow2_node", "rbd_key",
           "rbd_node", "secret_id", "secrets"]
