"""Internal snapshots of the disks of a running VM, in one QMP `transaction`.

The window the guest feels: with quiesce, its file systems are frozen through the agent
(guest-fsfreeze-freeze) from before the transaction until they are thawed and checked
thawed; without an agent that answers within AGENT_QUIESCE_TIMEOUT (or with quiesce
off, or when the freeze fails) the VM is paused instead (QMP stop ... cont, checked
running). The guest is always thawed or resumed, whatever happened in between.

An optional observer gets a `LiveSnapshotTiming` after each snapshot: the window and
every QMP and agent command the snapshot issued, with its round-trip time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ecsnap.adapters.compute.base import (
    ComputeError,
    GuestAgentUnavailable,
    LiveSnapshotResult,
)
from ecsnap.adapters.compute.qemu.agent import AgentSession
from ecsnap.adapters.compute.qemu.qmp import QmpCommandError, QmpSession, block_node
from ecsnap.adapters.compute.qemu.rbd_snapshots import RbdSnapshotter, rbd_locations
from ecsnap.adapters.compute.qemu.rundir import RunDirs

AGENT_QUIESCE_TIMEOUT = 2.0  # the agent must answer this fast, else pause instead
FREEZE_TIMEOUT = 20.0


@dataclass(frozen=True)
class CommandTime:
    command: str  # a QMP command ("stop", "transaction", ...) or an agent one ("guest-...")
    ms: float  # its round-trip time, answer or error


@dataclass(frozen=True)
class LiveSnapshotTiming:
    """How one `snapshot_disks` went, for benchmarks and metrics."""

    instance_id: str
    disks: int
    method: str  # "fsfreeze" or "pause", as in LiveSnapshotResult
    window_ms: float  # how long the guest was frozen or paused (LiveSnapshotResult's)
    commands: tuple[CommandTime, ...]  # every QMP and agent command issued, in order

    def total_ms(self, *commands: str) -> float:
        """The time spent in the named commands (all their calls)."""
        return sum(c.ms for c in self.commands if c.command in commands)

    @property
    def transaction_ms(self) -> float:
        """The QMP `transaction` that took the snapshots, inside the window."""
        return self.total_ms("transaction")


SnapshotObserver = Callable[[LiveSnapshotTiming], None]


def _node_snapshots(qmp: QmpSession, disk_id: str) -> list[str]:
    node = block_node(qmp, disk_id)
    if node is None:
        raise ComputeError(f"the VM has no disk {disk_id}")
    return [str(s["name"]) for s in node.get("image", {}).get("snapshots", [])]


class QemuLiveSnapshots:
    """LiveSnapshots through QMP and the guest agent."""

    def __init__(self, dirs: RunDirs, log: logging.Logger,
                 observer: SnapshotObserver | None = None, *, rbd_via: str = "librbd") -> None:
        """`rbd_via`: how the snapshots of a VM whose disks are all on RBD are taken in
        the window: "librbd" (side by side, outside QEMU: rbd_snapshots.py; the shorter
        stall) or "qmp" (the transaction, as for qcow2; kept for the benchmark)."""
        self.dirs = dirs
        self.log = log
        self.observer = observer
        self.rbd_via = rbd_via

    def snapshot_disks(self, instance_id: str, items: Sequence[tuple[str, str]], *,
                       quiesce: bool = True) -> LiveSnapshotResult:
        if not items:
            raise ComputeError("snapshot_disks needs at least one disk")
        actions: list[dict[str, object]] = [
            {"type": "blockdev-snapshot-internal-sync",
             "data": {"device": disk_id, "name": snapshot_id}} for disk_id, snapshot_id in items]
        commands: list[CommandTime] = []

        def record(command: str, ms: float) -> None:
            commands.append(CommandTime(command, ms))

        hook = record if self.observer is not None else None
        rbd_disks = rbd_locations(self.dirs.vm(instance_id).get("disks", {}), items) \
            if self.rbd_via == "librbd" else None
        with contextlib.ExitStack() as stack:
            rbd = stack.enter_context(RbdSnapshotter(rbd_disks)) if rbd_disks else None
            return self._snapshot_disks(instance_id, items, actions, quiesce, commands,
                                        hook, rbd)

    def _snapshot_disks(self, instance_id: str, items: Sequence[tuple[str, str]],
                        actions: list[dict[str, object]], quiesce: bool,
                        commands: list[CommandTime],
                        hook: Callable[[str, float], None] | None,
                        rbd: RbdSnapshotter | None) -> LiveSnapshotResult:
        with self.dirs.exclusive(instance_id), \
                self.dirs.qmp(instance_id, timeout=30, on_command=hook) as qmp:
            agent: AgentSession | None = None
            if quiesce:
                try:
                    agent = self.dirs.agent(instance_id, AGENT_QUIESCE_TIMEOUT,
                                            on_command=hook)
                except GuestAgentUnavailable as exc:
                    self.log.warning("VM %s: the guest agent does not answer (%s); pausing "
                                     "the VM instead of freezing its file systems",
                                     instance_id, exc)
            try:
                frozen_at = self._freeze(instance_id, agent) if agent is not None else None
                method = "pause" if frozen_at is None else "fsfreeze"
                started = time.monotonic() if frozen_at is None else frozen_at
                try:
                    if method == "pause":
                        qmp.cmd("stop")
                    if rbd is not None:  # all disks on RBD: librbd, side by side
                        at = time.monotonic()
                        try:
                            rbd.snapshot(items)
                        finally:
                            commands.append(CommandTime("rbd-snap-create",
                                                        (time.monotonic() - at) * 1000))
                    else:
                        qmp.cmd("transaction", {"actions": actions})
                except QmpCommandError as exc:
                    raise ComputeError(f"snapshot transaction of {instance_id} failed, no "
                                       f"snapshot was taken: {exc.desc}") from exc
                finally:
                    if agent is not None and method == "fsfreeze":
                        self._thaw(instance_id, agent)
                    else:
                        self._resume(instance_id, qmp)
                    window_ms = (time.monotonic() - started) * 1000
            finally:
                if agent is not None:
                    agent.close()
        consistency = "FileSystemConsistent" if method == "fsfreeze" else "CrashConsistent"
        self.log.info("VM %s: %d disk(s) snapshotted in one transaction (%s, guest %s for "
                      "%.1f ms)", instance_id, len(items), consistency,
                      "frozen" if method == "fsfreeze" else "paused", window_ms)
        if self.observer is not None:
            try:
                self.observer(LiveSnapshotTiming(instance_id, len(items), method, window_ms,
                                                 tuple(commands)))
            except Exception:  # an observer's failure is not the snapshot's
                self.log.exception("VM %s: the live-snapshot observer failed", instance_id)
        return LiveSnapshotResult(consistency, window_ms, method)

    def _freeze(self, instance_id: str, agent: AgentSession) -> float | None:
        """Freeze the guest's file systems: when the freeze started, or None (the guest
        thawed again) if it did not work."""
        try:
            if agent.call("guest-fsfreeze-status") == "frozen":
                self.log.warning("VM %s was left frozen; thawing it first", instance_id)
                agent.call("guest-fsfreeze-thaw", timeout=FREEZE_TIMEOUT)
            started = time.monotonic()
            count = agent.call("guest-fsfreeze-freeze", timeout=FREEZE_TIMEOUT)
            self.log.debug("VM %s: %s file system(s) frozen", instance_id, count)
            return started
        except ComputeError as exc:
            self.log.warning("VM %s: freezing the file systems failed (%s); pausing the VM "
                             "instead", instance_id, exc)
            with contextlib.suppress(ComputeError):
                self._thaw(instance_id, agent)
            return None

    def _thaw(self, instance_id: str, agent: AgentSession) -> None:
        """Thaw, and check: the guest must end up thawed whatever happened."""
        error: Exception | None = None
        for attempt in range(3):
            try:
                if attempt:  # a fresh connection, in case this one broke
                    agent.close()
                    agent = self.dirs.agent(instance_id, 10.0, on_command=agent.on_command)
                agent.call("guest-fsfreeze-thaw", timeout=FREEZE_TIMEOUT)
                status = agent.call("guest-fsfreeze-status")
                if status == "thawed":
                    return
                error = ComputeError(f"file systems still {status}")
            except ComputeError as exc:
                error = exc
            self.log.warning("VM %s: thaw attempt %d: %s", instance_id, attempt + 1, error)
        raise ComputeError(f"the file systems of {instance_id} could not be thawed: {error}")

    def _resume(self, instance_id: str, qmp: QmpSession) -> None:
        for attempt in range(3):
            try:
                qmp.cmd("cont")
                if qmp.cmd("query-status").get("running"):
                    return
            except ComputeError as exc:
                self.log.warning("VM %s: resume attempt %d: %s", instance_id, attempt + 1, exc)
        raise ComputeError(f"the VM of {instance_id} could not be resumed")

    def resume_guest(self, instance_id: str) -> None:
        if self.dirs.pid(instance_id) is None:
            return
        with self.dirs.exclusive(instance_id):
            with contextlib.suppress(ComputeError), self.dirs.qmp(instance_id) as qmp:
                if qmp.cmd("query-status").get("status") == "paused":
                    self.log.warning("VM %s was left paused; resuming it", instance_id)
                    self._resume(instance_id, qmp)
            with contextlib.suppress(ComputeError), self.dirs.agent(instance_id, 3.0) as agent:
                if agent.call("guest-fsfreeze-status") == "frozen":
                    self.log.warning("VM %s was left frozen; thawing it", instance_id)
                    self._thaw(instance_id, agent)

    def delete_disk_snapshot(self, instance_id: str, disk_id: str, snapshot_id: str) -> None:
        with self.dirs.exclusive(instance_id), self.dirs.qmp(instance_id, timeout=60) as qmp:
            try:
                qmp.cmd("blockdev-snapshot-delete-internal-sync",
                        {"device": disk_id, "name": snapshot_id})
                self.log.info("VM %s: deleted snapshot %s of %s", instance_id, snapshot_id,
                              disk_id)
            except QmpCommandError as exc:
                if snapshot_id in _node_snapshots(qmp, disk_id):
                    raise ComputeError(f"delete snapshot {snapshot_id} of {disk_id}: "
                                       f"{exc.desc}") from exc

    def has_disk_snapshot(self, instance_id: str, disk_id: str, snapshot_id: str) -> bool:
        if self.dirs.pid(instance_id) is not None:
            with contextlib.suppress(ComputeError), self.dirs.exclusive(instance_id), \
                    self.dirs.qmp(instance_id) as qmp:
                return snapshot_id in _node_snapshots(qmp, disk_id)
        path = self.dirs.vm(instance_id).get("disks", {}).get(disk_id)
        if not path:
            return False
        out = subprocess.run(["qemu-img", "info", "-U", "--output=json", path],
                             capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            return False
        return any(s.get("name") == snapshot_id
                   for s in json.loads(out.stdout).get("snapshots", []))


__all__ = ["CommandTime", "LiveSnapshotTiming", "QemuLiveSnapshots", "SnapshotObserver"]
