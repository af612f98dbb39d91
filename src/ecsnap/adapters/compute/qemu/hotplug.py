"""Disks plugged into and out of a running VM (on the spare PCIe root ports the command
line provides; disks.py: how a disk appears). The demo guest mounts a plugged disk by
itself; the driver waits for that, and lets the guest unmount a disk before unplugging
it, both best effort through the agent."""

from __future__ import annotations

import contextlib
import logging
import time

from ecsnap.adapters.compute.base import ComputeError, GuestAgent, VmDisk
from ecsnap.adapters.compute.qemu import disks
from ecsnap.adapters.compute.qemu.qmp import QmpCommandError, QmpSession, block_node
from ecsnap.adapters.compute.qemu.rundir import RunDirs


def _free_ports(qmp: QmpSession) -> list[str]:
    """The PCIe root ports with nothing behind them (ours are rp1, rp2, ...)."""
    free = []
    for bus in qmp.cmd("query-pci"):
        for dev in bus.get("devices", []):
            bridge = dev.get("pci_bridge")
            if bridge is not None and dev.get("qdev_id") and not bridge.get("devices"):
                free.append(str(dev["qdev_id"]))
    return sorted(free, key=lambda p: (len(p), p))


class QemuHotPlug:
    """DiskHotPlug through QMP (blockdev-add/device_add, device_del/blockdev-del)."""

    def __init__(self, dirs: RunDirs, guest: GuestAgent, log: logging.Logger) -> None:
        self.dirs = dirs
        self.guest = guest
        self.log = log

    def attach_disk(self, instance_id: str, disk: VmDisk) -> None:
        node, location = disks.checked(disk)
        with self.dirs.exclusive(instance_id), \
                self.dirs.qmp(instance_id, timeout=30) as qmp:
            if block_node(qmp, node) is not None:
                self.log.info("VM %s already has disk %s", instance_id, node)
                return
            ports = _free_ports(qmp)
            if not ports:
                raise ComputeError(f"{instance_id} has no free hot-plug slot; stop the "
                                   "instance to attach more disks")
            added: list[str] = []
            secrets: list[str] = []
            try:
                for secret, key in disks.secrets(node, location):  # a cephx key
                    with contextlib.suppress(QmpCommandError):  # left by an earlier plug
                        qmp.cmd("object-del", {"id": secret})
                    qmp.cmd("object-add", {"qom-type": "secret", "id": secret,
                                           "data": key, "format": "base64"})
                    secrets.append(secret)
                for blockdev in disks.nodes(node, location):
                    qmp.cmd("blockdev-add", blockdev)
                    added.append(blockdev["node-name"])
                qmp.cmd("device_add", disks.device(node, ports[0]))
            except QmpCommandError as exc:
                for name in reversed(added):
                    with contextlib.suppress(ComputeError):
                        qmp.cmd("blockdev-del", {"node-name": name})
                for secret in secrets:
                    with contextlib.suppress(ComputeError):
                        qmp.cmd("object-del", {"id": secret})
                raise ComputeError(f"attach {node} to {instance_id}: {exc}") from exc
            vm = self.dirs.vm(instance_id)
            vm.setdefault("disks", {})[node] = location
            self.dirs.save_vm(instance_id, vm)
        self.log.info("VM %s: disk %s attached on %s", instance_id, node, ports[0])
        # the demo guest mounts it by itself (uevent); wait for that, best effort
        if not self.guest.guest_ping(instance_id, timeout=2.0):
            self.log.info("VM %s: no guest agent to ask whether %s is mounted", instance_id,
                          node)
            return
        try:
            result = self.guest.guest_exec(
                instance_id, f"/sbin/ecsnap-mount-disks --wait {disks.disk_serial(node)} 20",
                timeout=30, working_dir="/")
            if result.exit_code == 0:
                self.log.info("VM %s: the guest mounted %s at /mnt/%s", instance_id, node,
                              node)
            else:
                self.log.info("VM %s: the guest did not mount %s (exit %s)", instance_id,
                              node, result.exit_code)
        except ComputeError as exc:
            self.log.info("VM %s: could not ask the guest to mount %s: %s", instance_id,
                          node, exc)

    def detach_disk(self, instance_id: str, disk_id: str) -> None:
        if self.dirs.vm(instance_id).get("system_disk") == disk_id:
            raise ComputeError(f"{disk_id} is the system disk of {instance_id}")
        self.dirs.require(instance_id)
        if self.guest.guest_ping(instance_id, timeout=2.0):  # let the guest let go, best effort
            with contextlib.suppress(ComputeError):
                self.guest.guest_exec(instance_id,
                                      f"sync; umount /mnt/{disk_id} 2>/dev/null || "
                                      f"umount -l /mnt/{disk_id} 2>/dev/null; sync",
                                      timeout=20, working_dir="/")
        with self.dirs.exclusive(instance_id), \
                self.dirs.qmp(instance_id, timeout=30) as qmp:
            def present() -> bool:
                return any(d.get("name") == f"dev-{disk_id}"
                           for d in qmp.cmd("qom-list", {"path": "/machine/peripheral"}))

            if present():
                started = time.monotonic()
                qmp.cmd("device_del", {"id": f"dev-{disk_id}"})
                event = qmp.wait_event("DEVICE_DELETED",
                                       lambda d: d.get("device") == f"dev-{disk_id}", 30.0)
                if event is None and present():
                    raise ComputeError(f"the guest of {instance_id} did not release "
                                       f"{disk_id} in 30 s")
                self.log.info("VM %s: disk %s unplugged in %.1f s", instance_id, disk_id,
                              time.monotonic() - started)
            for node in (disk_id, f"f-{disk_id}"):
                try:
                    qmp.cmd("blockdev-del", {"node-name": node})
                except QmpCommandError as exc:
                    if block_node(qmp, node) is not None:
                        raise ComputeError(f"detach {disk_id}: {exc}") from exc
            with contextlib.suppress(QmpCommandError):  # its cephx key, if it had one
                qmp.cmd("object-del", {"id": disks.secret_id(disk_id)})
            vm = self.dirs.vm(instance_id)
            vm.get("disks", {}).pop(disk_id, None)
            self.dirs.save_vm(instance_id, vm)


__all__ = ["QemuHotPlug"]
