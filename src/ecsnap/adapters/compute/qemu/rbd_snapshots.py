"""Snapshots of a running VM's RBD disks taken through librbd, outside QEMU, side by side.

A QMP `transaction` of `blockdev-snapshot-internal-sync` on rbd nodes makes QEMU create
the RBD snapshots one after another with the guest's I/O drained; each RBD snapshot waits
for a snapshot ID from the monitor (one `paxos_propose_interval`, 1 s by default), so the
guest stalls N intervals for N disks. Here the caller freezes (or pauses) the guest, and
the snapshots are created by this process's librbd, one thread per disk: the monitor
batches the N requests into about one proposal. The image's exclusive lock is QEMU's; a
snapshot request from another client is proxied to the lock owner (QEMU's librbd), which
flushes its cache first, so the snapshot holds everything the guest wrote before the
freeze. Measured side by side in bench/rbd.py (`--guest`) and docs/benchmarks.md.

All or nothing: on a failure the snapshots this call made are removed again. The cluster
connection is opened before the guest is frozen (`RbdSnapshotter.open`), so the window
only holds the snapshot calls.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from typing import Any

from ecsnap.adapters.compute.base import ComputeError
from ecsnap.adapters.storage.base import RbdLocation


def rbd_locations(disks: dict[str, str], items: Sequence[tuple[str, str]]
                  ) -> dict[str, RbdLocation] | None:
    """The RBD location of every disk of `items` (from vm.json's disks), or None when one
    of them is not on RBD (or unknown, e.g. hot-plugged): then QMP takes them."""
    out: dict[str, RbdLocation] = {}
    for disk_id, _ in items:
        try:
            location = RbdLocation.parse(disks.get(disk_id, ""))
        except ValueError:
            return None
        if location is None:
            return None
        out[disk_id] = location
    return out


class RbdSnapshotter:
    """One cluster connection per (conf, client, keyring) of the disks, for one snapshot."""

    def __init__(self, locations: dict[str, RbdLocation], timeout_s: int = 60) -> None:
        self.locations = locations
        self.timeout_s = timeout_s
        self._clusters: dict[tuple[str, str, str], Any] = {}
        self._ioctxs: dict[tuple[str, str, str, str], Any] = {}

    def open(self) -> None:
        try:
            import rados
        except ImportError as exc:
            raise ComputeError(f"the Ceph Python bindings are not importable: {exc}") from exc
        try:
            for loc in self.locations.values():
                key = (loc.conf, loc.client, loc.keyring)
                if key not in self._clusters:
                    options = {"rados_osd_op_timeout": str(self.timeout_s),
                               "rados_mon_op_timeout": str(self.timeout_s)}
                    if loc.keyring:
                        options["keyring"] = loc.keyring
                    cluster = rados.Rados(conffile=loc.conf or "",
                                          rados_id=loc.client or None, conf=options)
                    self._clusters[key] = cluster
                    cluster.connect(timeout=30)
                io_key = (*key, loc.pool)
                if io_key not in self._ioctxs:
                    self._ioctxs[io_key] = self._clusters[key].open_ioctx(loc.pool)
        except (rados.Error, OSError) as exc:
            self.close()
            raise ComputeError(f"cannot connect to Ceph for the snapshot: {exc}") from exc

    def close(self) -> None:
        for ioctx in self._ioctxs.values():
            with contextlib.suppress(Exception):
                ioctx.close()
        for cluster in self._clusters.values():
            with contextlib.suppress(Exception):
                cluster.shutdown()
        self._ioctxs.clear()
        self._clusters.clear()

    def __enter__(self) -> RbdSnapshotter:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ioctx(self, loc: RbdLocation) -> Any:
        return self._ioctxs[(loc.conf, loc.client, loc.keyring, loc.pool)]

    def snapshot(self, items: Sequence[tuple[str, str]]) -> None:
        """Each (disk, snapshot name) snapshotted, side by side; all or nothing."""
        import rbd

        made: list[tuple[str, str]] = []
        errors: list[str] = []
        guard = threading.Lock()

        def take(disk_id: str, name: str) -> None:
            loc = self.locations[disk_id]
            try:
                with rbd.Image(self._ioctx(loc), loc.image) as image:
                    image.create_snap(name)
                with guard:
                    made.append((disk_id, name))
            except rbd.ImageExists:  # taken before (a retried step): kept, not ours to undo
                pass
            except Exception as exc:  # librbd's errors: reported together, after all ran
                with guard:
                    errors.append(f"{disk_id}: {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=take, args=item) for item in items]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if not errors:
            return
        for disk_id, name in made:
            loc = self.locations[disk_id]
            with contextlib.suppress(Exception), rbd.Image(self._ioctx(loc), loc.image) as image:
                image.remove_snap(name)
        raise ComputeError(f"snapshot of {len(items)} RBD disk(s) failed, none was kept: "
                           f"{'; '.join(errors)}")


__all__ = ["RbdSnapshotter", "rbd_locations"]
