"""ecsnap's reliability soak: the figures of the Hardening issue, in one run.

  1. Crash trials: `ecsnap serve` (a real process on its own data dir) is killed with
     SIGKILL at a RANDOM moment (a random delay after the request went out, not a step
     boundary) inside ResetDisks, CreateSnapshotGroup of a stopped instance,
     CreateSnapshotGroup of a running instance (a real QEMU VM under TCG, one VM reused
     across the trials: VMs outlive ecsnap) and DeleteSnapshotGroup; then restarted
     (recovery runs at start-up) and checked: the invariants of tests/crash.py (nothing
     Processing or locked, no orphan file or internal snapshot either way, instances as
     their VMs are, capacity = a recount) and the data: distinct byte patterns written into
     the qcow2 files from the host (qemu-io) and read back from the files and from the
     snapshots inside them (the qcow2 tables, read here), every disk at exactly the old or
     the new state, all disks of one request alike. Recovery time: from the restart until
     the API answers.
  2. Concurrency: rounds of 50 concurrent conflicting calls (ResetDisks,
     DeleteSnapshotGroup, CreateSnapshotGroup, StopInstance, StartInstance, DeleteInstance)
     from two tenants on the same instances of a live server: every answer is a result or
     an ECS error code (never 5xx, never a traceback); the invariants hold after each round.
  3. Fuzz: hypothesis-generated requests in-process (the API app through ASGI, real
     database and qcow2 files, the compute double of tests/doubles.py): every action with
     parameters drawn from the API's own parameter reads (entrypoints/api/actions.py, the
     `Params` accessors), validly signed, plus malformed signatures, timestamps, query
     strings, encodings, bodies and methods: no 5xx, no traceback, and no state change on
     a rejected call (the database and the disk files compared before and after each).

Usage: python -m bench.soak [--out docs/reliability.md] [--only crash|concurrency|fuzz]
       python -m bench.soak --smoke   (tiny counts, what `make test` runs)
The work directory is removed at the end unless something failed (or --keep): the data
dirs of failed trials are kept under WORK/evidence, and the report names them.
"""

from __future__ import annotations

import argparse
import ast
import base64
import contextlib
import functools
import http.client
import inspect
import json
import os
import random
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from bench.run import ROOT, Server, machine, sh
from bench.scale import LeanClient

REGION = "local-1"
NANO = "ecs.t5-lc2m1.nano"
GIB = 1024**3
BLOCK = 65536  # one region of a pattern: one qcow2 cluster
FAR = 3 * GIB  # a region far from the head (beyond the demo guest's 128 MiB root file system)
OLD = (0xA1, 0xA2, 0xA3)  # the base snapshot group's data, one pattern per disk
RUN_STATE = (0xD1, 0xD2, 0xD3)  # the running instance's data
NOTES = "## Notes"  # a hand-written section at the end of the report: a rerun keeps it
CONCURRENT_ACTIONS = ("ResetDisks", "DeleteSnapshotGroup", "CreateSnapshotGroup",
                      "StopInstance", "StartInstance", "DeleteInstance")


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ qcow2 data


def offsets(n: int) -> tuple[int, ...]:
    """The regions a pattern is written to on disk n (0 = the system disk: only far from
    the head, where a guest's root file system may live)."""
    return (FAR,) if n == 0 else (0, FAR)


def write_state(paths: Sequence[str], patterns: Sequence[int]) -> None:
    """Each disk's regions filled with its pattern, from the host (the VM is not running)."""
    for n, (path, pattern) in enumerate(zip(paths, patterns, strict=True)):
        cmds: list[str] = []
        for at in offsets(n):
            cmds += ["-c", f"write -q -P {pattern:#x} {at} {BLOCK}"]
        sh("qemu-io", "-f", "qcow2", *cmds, path)


def read_region(path: str, offset: int, snapshot: str | None = None) -> bytes | None:
    """BLOCK bytes of the guest's view at `offset` (cluster-aligned) of the active layer or
    of an internal snapshot, from the qcow2 tables (ecsnap's reader for the header); None
    when unallocated there (or no such snapshot). Works on a file a VM has open."""
    from ecsnap.adapters.storage.qcow2meta import OFFSET_MASK, read_header

    with open(path, "rb") as fh:
        header = read_header(fh)
        if header.l2_entry_bytes != 8:
            raise RuntimeError(f"{path}: extended L2 entries are not read here")
        if snapshot is None:
            l1_offset, l1_size = header.l1_offset, header.l1_size
        else:
            entry = header.snapshot(snapshot)
            if entry is None:
                return None
            l1_offset, l1_size = entry.l1_offset, entry.l1_size
        out = bytearray()
        size = header.cluster_size
        for guest in range(offset, offset + BLOCK, size):
            l1_index, l2_index = divmod(guest // size, header.l2_entries)
            if l1_index >= l1_size:
                return None
            fh.seek(l1_offset + 8 * l1_index)
            l2_table = struct.unpack(">Q", fh.read(8))[0] & OFFSET_MASK
            if not l2_table:
                return None
            fh.seek(l2_table + 8 * l2_index)
            l2_entry = struct.unpack(">Q", fh.read(8))[0]
            if l2_entry & (1 << 62):
                raise RuntimeError(f"{path}: a compressed cluster at {guest}")
            if l2_entry & 1:
                out += bytes(size)
                continue
            host = l2_entry & OFFSET_MASK
            if not host:
                return None
            fh.seek(host)
            out += fh.read(size)
        return bytes(out[:BLOCK])


def disk_state(path: str, n: int, states: Mapping[str, Sequence[int]],
               snapshot: str | None = None) -> str:
    """The name of the state disk n holds (or its snapshot holds), else what it holds."""
    found = [read_region(path, at, snapshot) for at in offsets(n)]
    for name, patterns in states.items():
        if all(data is not None and data == bytes([patterns[n]]) * BLOCK for data in found):
            return name
    seen = ["unallocated" if d is None else
            f"{d[0]:#04x}" + ("" if d.count(d[0]) == len(d) else " and other bytes")
            for d in found]
    where = f" in {snapshot}" if snapshot else ""
    return f"garbage on {Path(path).name}{where} ({', '.join(seen)})"


def instance_state(paths: Sequence[str], states: Mapping[str, Sequence[int]],
                   snapshots: Sequence[str] | None = None) -> str:
    """The state all the disks (or these snapshots of them) hold, or a description of the
    mix (a broken invariant)."""
    per_disk = [disk_state(p, n, states, snapshots[n] if snapshots else None)
                for n, p in enumerate(paths)]
    if len(set(per_disk)) == 1 and not per_disk[0].startswith("garbage"):
        return per_disk[0]
    return "a mix of disk states: " + "; ".join(per_disk)


def internal_snapshots(path: str) -> set[str]:
    from ecsnap.adapters.storage.qcow2meta import read_header

    with open(path, "rb") as fh:
        return {s.name for s in read_header(fh).snapshots}


class StateCounter:
    """Fresh pattern sets, each distinct from the last few and from OLD/RUN_STATE."""

    def __init__(self, seed: int) -> None:
        self.count = seed

    def fresh(self, disks: int = 3) -> tuple[int, ...]:
        self.count += 1
        return tuple(0x10 + (disks * self.count + n) % 0x8C for n in range(disks))


# ------------------------------------------------------------------ server and client


class Client(LeanClient):
    """LeanClient's signing (RPC v1, a fresh nonce per request), answering the status and
    the parsed body of any answer instead of raising on errors; no retry."""

    def answer(self, action: str, params: dict[str, Any] | None = None,
               sent: threading.Event | None = None) -> tuple[int, dict[str, Any]]:
        from ecsnap.entrypoints.api.signature import rpc_v1_request_params

        values = {"RegionId": self.region,
                  **{k: str(v) for k, v in (params or {}).items() if v is not None}}
        query = urllib.parse.urlencode(rpc_v1_request_params(action, values, self.key,
                                                             self.secret))
        try:
            self.conn.request("POST", f"/?{query}", headers={"Content-Length": "0"})
            if sent is not None:
                sent.set()
            response = self.conn.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            raise
        try:
            body = json.loads(raw)
        except ValueError:
            body = {"_raw": raw.decode("utf-8", "replace")[:2000]}
        return response.status, body if isinstance(body, dict) else {"_raw": str(body)}

    def ok(self, action: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        status, body = self.answer(action, params)
        if status != 200:
            raise RuntimeError(f"{action} {params}: {status} {body}")
        return body


class SoakServer(Server):
    """bench.run's Server (a fresh data dir, `ecsnap serve`, a signed client) that can also
    be killed with SIGKILL and restarted on the same data dir and port."""

    def __init__(self, data_dir: Path, settings: dict[str, Any] | None = None) -> None:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if settings:  # owner-only, as ecsnap wants its data dir
            fd = os.open(data_dir / "config.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(settings))
        super().__init__(data_dir)
        self.data_dir = data_dir.resolve()

    @property
    def creds(self) -> dict[str, str]:
        return dict(json.loads((self.data_dir / "credentials.json").read_text()))

    def client(self, creds: dict[str, str] | None = None) -> Client:
        return Client(creds or self.creds)

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def restart(self, timeout: float = 120) -> float:
        """Start `ecsnap serve` again (it recovers first); seconds until the API answers."""
        started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ecsnap", "serve", "--data-dir", str(self.data_dir),
             "--listen", f"127.0.0.1:{self.port}"],
            cwd=ROOT, env=self.env, stdout=self.log, stderr=self.log)
        while True:
            with contextlib.suppress(OSError, http.client.HTTPException):
                if self.client().answer("DescribeRegions")[0] == 200:
                    return time.monotonic() - started
            if self.proc.poll() is not None:
                raise RuntimeError(f"ecsnap serve exited with {self.proc.returncode}; see "
                                   f"{self.data_dir / 'serve.log'}")
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"ecsnap serve did not answer in {timeout} s")
            time.sleep(0.02)

    def close(self) -> None:
        """Stop the server, then the VMs it started (each by the pid in its run dir)."""
        if self.proc.poll() is None:
            self.stop()
        for pidfile in (self.data_dir / "run").glob("*/qemu.pid"):
            with contextlib.suppress(ValueError, OSError):
                os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)
        self.ctx.extras["engine"].dispose()

    # -------------------------------------------------------------- reading the store

    def task_ids(self) -> set[str]:
        with self.ctx.uow(readonly=True) as uow:
            return {t.id for t in uow.tasks.find()}

    def tasks_processing(self) -> list[str]:
        from ecsnap.domain.model import TaskStatus

        with self.ctx.uow(readonly=True) as uow:
            return [t.id for t in uow.tasks.find(status=TaskStatus.PROCESSING)]

    def wait_idle(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while self.tasks_processing():
            if time.monotonic() > deadline:
                raise RuntimeError(f"tasks still Processing after {timeout} s: "
                                   f"{self.tasks_processing()}")
            time.sleep(0.1)

    def wait_status(self, instance_id: str, status: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            found = self.call("DescribeInstances", {"InstanceIds": json.dumps([instance_id])})
            now = found["Instances"]["Instance"][0]["Status"]
            if now == status:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{instance_id} is {now}, not {status}, after {timeout} s")
            time.sleep(0.1)

    def instance_disks(self, instance_id: str) -> list[str]:
        """The attached disks of an instance, the system disk first."""
        from ecsnap.service.context import attached_disks

        with self.ctx.uow(readonly=True) as uow:
            return [d.id for d in attached_disks(uow, instance_id)]

    def path(self, disk_id: str) -> str:
        return str(self.data_dir / "pools" / REGION / f"{disk_id}.qcow2")

    def group(self, group_id: str) -> tuple[str, list[tuple[str, str]]] | None:
        """(status, [(disk, snapshot)] in disk order) of a group; None when it is gone."""
        with self.ctx.uow(readonly=True) as uow:
            group = uow.snapshot_groups.get(group_id)
            if group is None:
                return None
            snaps = [(s.source_disk_id, s.id) for s in uow.snapshots.find(group_id=group_id)]
        return group.status.value, snaps

    def groups_of(self, instance_id: str) -> list[str]:
        with self.ctx.uow(readonly=True) as uow:
            return sorted(g.id for g in uow.snapshot_groups.find(instance_id=instance_id))

    def new_instance(self, image: str, data_disks: int = 2, start: bool = False) -> str:
        params: dict[str, Any] = {"ImageId": image, "InstanceType": NANO,
                                  "SystemDisk.Size": 20}
        for n in range(1, data_disks + 1):
            params[f"DataDisk.{n}.Size"] = 20
        instance_id = str(self.call("CreateInstance", params)["InstanceId"])
        self.wait_status(instance_id, "Stopped")
        return instance_id

    def take_group(self, instance_id: str) -> str:
        body = self.call("CreateSnapshotGroup", {"InstanceId": instance_id})
        self.wait_task(body["TaskId"])
        return str(body["SnapshotGroupId"])

    def drop_group(self, group_id: str) -> None:
        status, body = self.client().answer("DeleteSnapshotGroup",
                                            {"SnapshotGroupId": group_id})
        if status != 200:
            raise RuntimeError(f"DeleteSnapshotGroup {group_id}: {status} {body}")
        if body.get("TaskId"):
            self.wait_task(body["TaskId"])


class RealVms:
    """What tests/crash.check_invariants asks of a hypervisor, from QEMU's run dirs: the
    VMs running, and the disks each was started with (vm.json; no hot-plug here)."""

    def __init__(self, data_dir: Path) -> None:
        from ecsnap.adapters.compute.qemu.rundir import RunDirs

        self.dirs = RunDirs(data_dir / "run")

    def running(self) -> list[str]:
        return self.dirs.running()

    def vm_disks(self, instance_id: str) -> dict[str, str]:
        return {k: str(v) for k, v in self.dirs.vm(instance_id).get("disks", {}).items()}

    def pid(self, instance_id: str) -> int | None:
        return self.dirs.pid(instance_id)


def invariants(server: SoakServer) -> list[str]:
    """The invariants the crash matrix checks (tests/crash.py), on a live data dir."""
    sys.path.insert(0, str(ROOT))
    from tests.crash import Lab, check_invariants

    lab = Lab(server.data_dir, server.ctx, cast(Any, RealVms(server.data_dir)))
    try:
        check_invariants(lab)
    except AssertionError as broken:
        return [line.strip() for line in str(broken).splitlines()[1:] if line.strip()]
    return []


def keep_evidence(work: Path, server: SoakServer, name: str, details: dict[str, Any]) -> str:
    """A copy of the data dir (VM sockets left out) and what went wrong, for the report."""
    target = work / "evidence" / name
    shutil.copytree(server.data_dir, target / "data", symlinks=True,
                    ignore=shutil.ignore_patterns("*.sock"))
    (target / "details.json").write_text(json.dumps(details, indent=2, default=str))
    return str(target)


# ------------------------------------------------------------------ 1. crash trials


@dataclass
class Trial:
    kind: str
    number: int
    delay_ms: float
    answered: bool  # the client had its answer before the kill
    at_kill: str  # where the task was when the process died
    outcome: str  # what recovery made of it
    recovery_s: float
    problems: list[str]
    evidence: str = ""


class Flight:
    """One request in flight in a thread; `sent` is set once it has gone out."""

    def __init__(self, client: Client, action: str, params: dict[str, Any]) -> None:
        self.sent = threading.Event()
        self.result: tuple[int, dict[str, Any]] | None = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.result = client.answer(action, params, sent=self.sent)
            except BaseException as exc:
                self.error = exc
                self.sent.set()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()


def kill_during(server: SoakServer, action: str, params: dict[str, Any], delay: float,
                ) -> tuple[bool, str, float, dict[str, Any]]:
    """Send the request, SIGKILL the server `delay` s after it went out, restart it.
    Returns (answered before the kill, where the task was, recovery s, the answer)."""
    before = server.task_ids()
    flight = Flight(server.client(), action, params)
    flight.sent.wait(30)
    time.sleep(delay)
    server.kill()
    flight.thread.join(30)
    answered = flight.result is not None
    with server.ctx.uow(readonly=True) as uow:
        new = [t for t in uow.tasks.find() if t.id not in before]
    if not new:
        at_kill = "not journaled yet"
    elif new[0].status.value == "Processing":
        done, steps = len(new[0].done), len(new[0].plan.get("steps", []))
        at_kill = f"Processing, {done}/{steps} steps done"
    else:
        at_kill = f"task {new[0].status.value}"
    try:
        recovery = server.restart()
    except RuntimeError as exc:
        raise TrialBroke(f"the server did not come back after the kill: {exc}", answered,
                         at_kill) from exc
    return answered, at_kill, recovery, flight.result[1] if flight.result else {}


class TrialBroke(Exception):
    """A trial that could not run to its checks (what it knew of the kill, if anything)."""

    def __init__(self, message: str, answered: bool = False, at_kill: str = "unknown") -> None:
        super().__init__(message)
        self.answered, self.at_kill = answered, at_kill


Outcome = tuple[bool, str, float, str, list[str]]


def guarded(run: Callable[[], Outcome]) -> tuple[Outcome, bool]:
    """A trial's outcome; an exception is a failed trial (with what it says), and True when
    the server is to be given up (it did not come back)."""
    try:
        return run(), False
    except TrialBroke as exc:
        return (exc.answered, exc.at_kill, float("nan"), "server down", [str(exc)]), True
    except Exception as exc:
        return (False, "unknown", float("nan"), "trial error",
                [f"the trial broke off: {type(exc).__name__}: {exc}"]), True


class StoppedWorld:
    """A live server with one stopped instance of 3 disks (system + 2 data) whose base
    snapshot group holds OLD; the trials of the stopped kinds run on it."""

    def __init__(self, work: Path, name: str, counter: StateCounter) -> None:
        self.name = name
        self.counter = counter
        self.server = SoakServer(work / name, {"stop_timeout_s": 3, "health_gate_timeout_s": 10})
        self.instance = self.server.new_instance(self.server.image)
        self.disks = self.server.instance_disks(self.instance)
        self.paths = [self.server.path(d) for d in self.disks]
        write_state(self.paths, OLD)
        self.base = self.server.take_group(self.instance)
        self.base_snaps = self.snapshots_of(self.base)

    def snapshots_of(self, group_id: str) -> list[str]:
        found = self.server.group(group_id)
        assert found is not None, group_id
        by_disk = dict(found[1])
        return [by_disk.get(d, "") for d in self.disks]

    def reset_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for n, (disk, snap) in enumerate(zip(self.disks, self.base_snaps, strict=True), 1):
            params[f"Disk.{n}.DiskId"], params[f"Disk.{n}.SnapshotId"] = disk, snap
        return params

    def check_group(self, group_id: str, state: Sequence[int], name: str) -> list[str]:
        """An existing group: accomplished with a snapshot of every disk holding `state`,
        or failed with none (a progressing one is left to invariants())."""
        found = self.server.group(group_id)
        if found is None:
            return []
        status, members = found
        if status == "failed":
            return [f"failed group {group_id} kept snapshots {members}"] if members else []
        if status != "accomplished":
            return []
        snaps = self.snapshots_of(group_id)
        if not all(snaps):
            return [f"{name} group {group_id} lacks a disk: {members}"]
        held = instance_state(self.paths, {name: state}, snaps)
        return [] if held == name else [f"{name} group {group_id}: {held}"]

    def common_checks(self, active: dict[str, Sequence[int]], expect: Sequence[str],
                      ) -> tuple[str, list[str]]:
        problems = invariants(self.server)
        held = instance_state(self.paths, active)
        if held not in expect:
            problems.append(f"disks: {held} (expected one of {list(expect)})")
        base = self.check_group(self.base, OLD, "base")
        if self.server.group(self.base) is None or self.snapshots_of(self.base) != \
                self.base_snaps:
            base.append(f"the base group {self.base} changed: {self.server.group(self.base)}")
        problems += base
        with self.server.ctx.uow(readonly=True) as uow:
            inst = uow.instances.get(self.instance)
        if inst is None or inst.status.value != "Stopped":
            problems.append(f"instance {self.instance} is "
                            f"{inst.status.value if inst else 'gone'}, not Stopped")
        return held, problems

    def extra_groups(self) -> list[str]:
        return [g for g in self.server.groups_of(self.instance) if g != self.base]

    def cleanup(self) -> None:
        for group_id in self.extra_groups():
            self.server.drop_group(group_id)

    # -------------------------------------------------------------- the trials

    def reset_disks(self, delay: float) -> tuple[bool, str, float, str, list[str]]:
        new = self.counter.fresh()
        write_state(self.paths, new)
        answered, at_kill, recovery, _ = kill_during(self.server, "ResetDisks",
                                                     self.reset_params(), delay)
        held, problems = self.common_checks({"rolled back": OLD, "not rolled back": new},
                                            ("rolled back", "not rolled back"))
        safety = self.extra_groups()
        for group_id in safety:
            problems += self.check_group(group_id, new, "safety")
        kept = [g for g in safety if (self.server.group(g) or ("",))[0] == "accomplished"]
        if held == "rolled back" and not kept:
            problems.append("rolled back with no accomplished safety group to undo it")
        return answered, at_kill, recovery, held, problems

    def create_group(self, delay: float) -> tuple[bool, str, float, str, list[str]]:
        new = self.counter.fresh()
        write_state(self.paths, new)
        answered, at_kill, recovery, _ = kill_during(self.server, "CreateSnapshotGroup",
                                                     {"InstanceId": self.instance}, delay)
        _, problems = self.common_checks({"unchanged": new}, ("unchanged",))
        made = self.extra_groups()
        if len(made) > 1:
            problems.append(f"one request made {len(made)} groups: {made}")
        statuses = []
        for group_id in made:
            problems += self.check_group(group_id, new, "new")
            statuses.append((self.server.group(group_id) or ("gone",))[0])
        outcome = "group accomplished" if "accomplished" in statuses else \
            "group failed" if statuses else "no group"
        return answered, at_kill, recovery, outcome, problems

    def delete_group(self, delay: float) -> tuple[bool, str, float, str, list[str]]:
        kept_state = self.counter.fresh()
        write_state(self.paths, kept_state)
        group_id = self.server.take_group(self.instance)
        snaps = self.snapshots_of(group_id)
        after = self.counter.fresh()
        write_state(self.paths, after)
        answered, at_kill, recovery, _ = kill_during(
            self.server, "DeleteSnapshotGroup", {"SnapshotGroupId": group_id}, delay)
        _, problems = self.common_checks({"unchanged": after}, ("unchanged",))
        found = self.server.group(group_id)
        in_files = [s for path in self.paths for s in internal_snapshots(path)
                    if s in snaps]
        with self.server.ctx.uow(readonly=True) as uow:
            rows = [s for s in snaps if uow.snapshots.get(s) is not None]
        if found is None:
            outcome = "group deleted"
            if rows or in_files:
                problems.append(f"group {group_id} gone but snapshots left: rows {rows}, "
                                f"in files {in_files}")
        else:
            outcome = "group kept"
            if found[0] != "accomplished" or len(rows) != len(snaps) or \
                    len(in_files) != len(snaps):
                problems.append(f"group {group_id} half deleted: {found[0]}, rows {rows}, "
                                f"in files {in_files} of {snaps}")
            else:
                problems += self.check_group(group_id, kept_state, "kept")
        return answered, at_kill, recovery, outcome, problems


class RunningWorld:
    """A live server with one RUNNING instance of the demo image (system + 2 data disks,
    their regions written before the start; the guest mounts no data disk whose head is
    not blank, and its root file system ends at 128 MiB, far before FAR). The VM is
    started once and outlives every restart of ecsnap."""

    def __init__(self, work: Path, counter: StateCounter) -> None:
        from ecsnap.service import images

        cache = os.environ.get("ECSNAP_CACHE_DIR") or os.environ.get("ECSNAP_TEST_CACHE") or \
            str(ROOT / ".cache")
        self.server = SoakServer(work / "running", {"cache": cache, "stop_timeout_s": 5,
                                                    "health_gate_timeout_s": 180})
        log("building (or reusing) the demo image")
        image = images.build_demo_image(self.server.ctx, REGION).id
        self.instance = self.server.new_instance(image)
        self.disks = self.server.instance_disks(self.instance)
        self.paths = [self.server.path(d) for d in self.disks]
        write_state(self.paths, RUN_STATE)
        self.probes = 0
        started = time.monotonic()
        self.server.call("StartInstance", {"InstanceId": self.instance})
        self.server.wait_status(self.instance, "Running", 300)
        if not self.guest_answers(timeout=300):
            raise RuntimeError("the demo guest did not answer in 300 s")
        self.boot_s = time.monotonic() - started
        log(f"{self.instance} up and answering in {self.boot_s:.1f} s")
        self.vms = RealVms(self.server.data_dir)
        self.pid = self.vms.pid(self.instance)

    def guest_answers(self, timeout: float = 90) -> bool:
        """A Cloud Assistant command that writes to the guest's root file system (it hangs
        if the file system were left frozen, or the VM paused) answers in time."""
        self.probes += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, body = self.server.client().answer("RunCommand", {
                "Type": "RunShellScript", "InstanceId.1": self.instance, "Timeout": 30,
                "CommandContent": f"echo soak > /root/soak-probe-{self.probes} && sync && "
                                  "echo ok"})
            if status != 200:  # the agent is not up yet (a boot)
                time.sleep(1)
                continue
            while time.monotonic() < deadline:
                result = self.server.call("DescribeInvocationResults", {
                    "InvokeId": body["InvokeId"]})["Invocation"]["InvocationResults"][
                    "InvocationResult"]
                if result and result[0]["InvocationStatus"] != "Running":
                    if result[0]["InvocationStatus"] == "Success" and \
                            base64.b64decode(result[0]["Output"]).strip() == b"ok":
                        return True
                    break
                time.sleep(0.3)
            time.sleep(1)
        return False

    def create_group(self, delay: float, quiesce: bool,
                     ) -> tuple[bool, str, float, str, list[str]]:
        before = set(self.server.groups_of(self.instance))
        answered, at_kill, recovery, _ = kill_during(
            self.server, "CreateSnapshotGroup",
            {"InstanceId": self.instance, "FileSystemConsistent": str(quiesce).lower()}, delay)
        problems = invariants(self.server)
        held = instance_state(self.paths, {"unchanged": RUN_STATE})
        if held != "unchanged":
            problems.append(f"disks: {held}")
        if self.vms.pid(self.instance) != self.pid:
            problems.append(f"the VM of {self.instance} is not the one started (pid "
                            f"{self.pid} -> {self.vms.pid(self.instance)})")
        made = [g for g in self.server.groups_of(self.instance) if g not in before]
        statuses = []
        for group_id in made:
            found = self.server.group(group_id)
            if found is None:
                continue
            status, members = found
            statuses.append(status)
            if status == "failed" and members:
                problems.append(f"failed group {group_id} kept snapshots {members}")
            if status == "accomplished":
                by_disk = dict(members)
                snaps = [by_disk.get(d, "") for d in self.disks]
                if not all(snaps):
                    problems.append(f"group {group_id} lacks a disk: {members}")
                else:
                    got = instance_state(self.paths, {"snapshot": RUN_STATE}, snaps)
                    if got != "snapshot":
                        problems.append(f"group {group_id}: {got}")
        if not self.guest_answers():
            problems.append("the guest did not run a command writing to its root file "
                            "system within 90 s (left frozen or paused?)")
        outcome = "group accomplished" if "accomplished" in statuses else \
            "group failed" if statuses else "no group"
        for group_id in made:
            if self.server.group(group_id) is not None:
                self.server.drop_group(group_id)
        return answered, at_kill, recovery, outcome, problems


def run_and_clean(world: StoppedWorld, run: Callable[[float], Outcome],
                  delay: float) -> Outcome:
    """A trial, then (when it found nothing wrong) the groups it made deleted."""
    outcome = run(delay)
    if not outcome[4]:
        world.cleanup()
    return outcome


WINDOW = 1.25  # the kill delay is drawn from 0 to WINDOW x the median uncrashed answer time


def calibrate(run: Callable[[], float], times: int = 3) -> float:
    """The kill window of a kind of request: WINDOW x the median of `times` uncrashed runs
    (request out to answer), in s; about a fifth of the kills then land after the end."""
    return WINDOW * statistics.median(run() for _ in range(times))


def timed_call(server: SoakServer, action: str, params: dict[str, Any]) -> tuple[float, str]:
    started = time.monotonic()
    body = server.client().ok(action, params)
    took = time.monotonic() - started
    if body.get("TaskId"):
        server.wait_task(body["TaskId"])
    return took, str(body.get("SnapshotGroupId") or "")


def run_crash_trials(work: Path, counts: dict[str, int], rng: random.Random,
                     world_trials: int = 40) -> tuple[list[Trial], dict[str, Any]]:
    """The trials of each kind, the stopped kinds interleaved at random on a world that is
    replaced every `world_trials` trials (and after a failure), then the running kind."""
    counter = StateCounter(rng.randrange(1000))
    trials: list[Trial] = []
    meta: dict[str, Any] = {"windows_ms": {}}
    stopped = [k for k in ("ResetDisks", "CreateSnapshotGroup (stopped)",
                           "DeleteSnapshotGroup") for _ in range(counts.get(k, 0))]
    rng.shuffle(stopped)
    world: StoppedWorld | None = None
    windows: dict[str, float] = {}
    worlds = 0
    try:
        for number, kind in enumerate(stopped, 1):
            if world is None or (number - 1) % world_trials == 0:
                if world is not None:
                    world.server.close()
                worlds += 1
                world = StoppedWorld(work, f"crash-stopped-{worlds}", counter)
                if worlds == 1:
                    meta["self_check_missed"] = self_check(world)
                if not windows:
                    windows = calibrate_stopped(world)
                    meta["windows_ms"].update({k: round(v * 1000) for k, v in windows.items()})
            delay = rng.uniform(0, windows[kind])
            run = {"ResetDisks": world.reset_disks,
                   "CreateSnapshotGroup (stopped)": world.create_group,
                   "DeleteSnapshotGroup": world.delete_group}[kind]
            (answered, at_kill, recovery, outcome, problems), _ = guarded(
                functools.partial(run_and_clean, world, run, delay))
            trial = Trial(kind, number, delay * 1000, answered, at_kill, outcome, recovery,
                          problems)
            if problems:
                trial.evidence = keep_evidence(work, world.server, f"trial-{number}", {
                    "kind": kind, "delay_ms": trial.delay_ms, "at_kill": at_kill,
                    "answered": answered, "outcome": outcome, "problems": problems})
                log(f"trial {number} {kind}: BROKEN {problems}")
                with contextlib.suppress(Exception):
                    world.server.close()
                world = None
            trials.append(trial)
            log(f"trial {number}/{len(stopped)} {kind}: {delay * 1000:.0f} ms, {at_kill}, "
                f"{outcome}, recovery {recovery:.2f} s")
    finally:
        if world is not None:
            world.server.close()
    meta["stopped_worlds"] = worlds
    running = counts.get("CreateSnapshotGroup (running)", 0)
    if running:
        trials += run_running_trials(work, running, rng, counter, meta, len(trials))
    return trials, meta


def calibrate_stopped(world: StoppedWorld) -> dict[str, float]:
    """Each stopped kind's window for the kill delay (calibrate)."""
    server = world.server
    took: dict[str, float] = {}

    def reset() -> float:
        write_state(world.paths, world.counter.fresh())
        return timed_call(server, "ResetDisks", world.reset_params())[0]

    def create() -> float:
        return timed_call(server, "CreateSnapshotGroup", {"InstanceId": world.instance})[0]

    def delete() -> float:
        group_id = server.take_group(world.instance)
        return timed_call(server, "DeleteSnapshotGroup", {"SnapshotGroupId": group_id})[0]

    took["ResetDisks"] = calibrate(reset)
    world.cleanup()
    took["CreateSnapshotGroup (stopped)"] = calibrate(create)
    world.cleanup()
    took["DeleteSnapshotGroup"] = calibrate(delete)
    world.cleanup()
    log("kill windows: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in took.items()))
    return took


def run_running_trials(work: Path, count: int, rng: random.Random, counter: StateCounter,
                       meta: dict[str, Any], numbered: int) -> list[Trial]:
    kind = "CreateSnapshotGroup (running)"
    world = RunningWorld(work, counter)
    meta["vm_boot_s"] = round(world.boot_s, 1)
    trials: list[Trial] = []
    try:
        def create(quiesce: bool) -> float:
            took, group_id = timed_call(world.server, "CreateSnapshotGroup", {
                "InstanceId": world.instance, "FileSystemConsistent": str(quiesce).lower()})
            world.server.drop_group(group_id)
            return took

        windows = {q: calibrate(functools.partial(create, q)) for q in (True, False)}
        meta["windows_ms"][kind + ", fsfreeze"] = round(windows[True] * 1000)
        meta["windows_ms"][kind + ", pause"] = round(windows[False] * 1000)
        for n in range(1, count + 1):
            quiesce = rng.random() < 0.5
            delay = rng.uniform(0, windows[quiesce])
            (answered, at_kill, recovery, outcome, problems), down = guarded(
                functools.partial(world.create_group, delay, quiesce))
            trial = Trial(kind, numbered + n, delay * 1000, answered, at_kill,
                          f"{outcome} ({'fsfreeze' if quiesce else 'pause'})", recovery,
                          problems)
            if problems:
                trial.evidence = keep_evidence(work, world.server, f"trial-{numbered + n}", {
                    "kind": kind, "delay_ms": trial.delay_ms, "at_kill": at_kill,
                    "quiesce": quiesce, "answered": answered, "outcome": outcome,
                    "problems": problems})
                log(f"trial {numbered + n} {kind}: BROKEN {problems}")
            trials.append(trial)
            log(f"running trial {n}/{count}: {delay * 1000:.0f} ms, {at_kill}, "
                f"{trial.outcome}, recovery {recovery:.2f} s")
            if down:
                log("the running world is given up: the remaining running trials are not run")
                break
    finally:
        world.server.close()
    return trials


def self_check(world: StoppedWorld) -> list[str]:
    """The checks must be able to fail: plant a disk holding another pattern and an orphan
    internal snapshot, see each reported, take them back. Returns what was NOT caught."""
    missed = []
    write_state(world.paths, OLD)
    sh("qemu-io", "-f", "qcow2", "-c", f"write -q -P 0x9e 0 {BLOCK}", world.paths[1])
    held = instance_state(world.paths, {"old": OLD})
    if not held.startswith("a mix"):
        missed.append(f"a disk with other data went unseen ({held})")
    write_state(world.paths, OLD)
    sh("qemu-img", "snapshot", "-c", "soak-orphan", world.paths[2])
    if not any("orphan internal snapshots" in p for p in invariants(world.server)):
        missed.append("an orphan internal snapshot went unseen")
    sh("qemu-img", "snapshot", "-d", "soak-orphan", world.paths[2])
    if invariants(world.server):
        missed.append(f"invariants broken after the self-check: {invariants(world.server)}")
    return missed


# ------------------------------------------------------------------ 2. concurrency


@dataclass
class Answer:
    action: str
    tenant: str
    status: int
    code: str
    bad: str = ""  # why the answer is not a result or an ECS error ("" when it is)


def judge(action: str, tenant: str, status: int, body: dict[str, Any]) -> Answer:
    text = json.dumps(body)
    code = "OK" if status == 200 else str(body.get("Code") or "")
    bad = ""
    if status >= 500:
        bad = f"HTTP {status}"
    elif "Traceback" in text or 'File "' in text:
        bad = "a traceback in the answer"
    elif status != 200 and not (body.get("Code") and body.get("Message") and
                                body.get("RequestId")):
        bad = "an error without the ECS envelope"
    elif status == 200 and not body.get("RequestId"):
        bad = "a result without RequestId"
    return Answer(action, tenant, status, code, bad + (f": {text[:300]}" if bad else ""))


class ConcurrencyWorld:
    """A live server, the admin tenant's instances (bench image: BIOS boot of a blank disk,
    no guest), a second tenant made with `ecsnap account create` / `accesskey create`."""

    def __init__(self, work: Path, rng: random.Random, instances: int) -> None:
        self.rng = rng
        self.server = SoakServer(work / "concurrency", {"stop_timeout_s": 3,
                                                        "health_gate_timeout_s": 5})
        data = str(self.server.data_dir)
        subprocess.run([sys.executable, "-m", "ecsnap", "account", "create", "tenant-b",
                        "--password", "violet-harbour-7", "--data-dir", data],
                       check=True, capture_output=True, cwd=ROOT)
        key = json.loads(subprocess.run(
            [sys.executable, "-m", "ecsnap", "accesskey", "create", "tenant-b", "--output",
             "json", "--data-dir", data], check=True, capture_output=True, text=True,
            cwd=ROOT).stdout)
        self.tenant_b = {**self.server.creds, **key}
        self.counter = StateCounter(rng.randrange(1000))
        self.wanted = instances
        self.states: dict[str, dict[str, tuple[int, ...]]] = {}  # instance -> known states
        self.instances: list[str] = []

    def live(self) -> list[str]:
        with self.server.ctx.uow(readonly=True) as uow:
            return [i for i in self.instances if uow.instances.get(i) is not None]

    def status(self, instance_id: str) -> str:
        with self.server.ctx.uow(readonly=True) as uow:
            inst = uow.instances.get(instance_id)
        return inst.status.value if inst else "gone"

    def prepare(self) -> None:
        """As many live instances as wanted; each stopped one with a fresh state written
        and a group of it taken; at most 4 groups an instance."""
        self.instances = self.live()
        while len(self.instances) < self.wanted:
            self.instances.append(self.server.new_instance(self.server.image))
        for instance_id in self.instances:
            groups = self.server.groups_of(instance_id)
            for group_id in groups[:-3]:
                self.server.drop_group(group_id)
            if self.status(instance_id) != "Stopped":
                continue
            paths = [self.server.path(d) for d in self.server.instance_disks(instance_id)]
            state = self.counter.fresh(len(paths))
            write_state(paths, state)
            known = self.states.setdefault(instance_id, {})
            known[f"state {len(known) + 1}"] = state
            self.server.take_group(instance_id)

    def call_for(self, instance_id: str) -> tuple[str, dict[str, Any]]:
        rng = self.rng
        action = rng.choices(CONCURRENT_ACTIONS, weights=(3, 2, 3, 2, 2, 1))[0]
        groups = self.server.groups_of(instance_id)
        group = rng.choice(groups) if groups else "ssg-nosuchgroup0000000"
        if action == "ResetDisks":
            found = self.server.group(group)
            members = found[1] if found else []
            params: dict[str, Any] = {}
            for n, (disk, snap) in enumerate(members, 1):
                params[f"Disk.{n}.DiskId"], params[f"Disk.{n}.SnapshotId"] = disk, snap
            if not members:
                params = {"Disk.1.DiskId": "d-nosuchdisk000000000",
                          "Disk.1.SnapshotId": "s-nosuchsnap000000000"}
            if rng.random() < 0.2:
                params["AutoStartInstance"] = "true"
            return action, params
        if action == "DeleteSnapshotGroup":
            return action, {"SnapshotGroupId": group}
        if action == "StopInstance":
            return action, {"InstanceId": instance_id,
                            "ForceStop": rng.choice(["true", "false"]),
                            "StoppedMode": rng.choice(["KeepCharging", "StopCharging"])}
        if action == "DeleteInstance":
            return action, {"InstanceId": instance_id,
                            "Force": rng.choice(["true", "false"])}
        return action, {"InstanceId": instance_id}

    def round(self, calls: int) -> tuple[list[Answer], list[str], Counter[str]]:
        self.prepare()
        before = self.server.task_ids()
        plan = []
        for _ in range(calls):
            tenant = "B" if self.rng.random() < 0.2 else "A"
            plan.append((tenant, *self.call_for(self.rng.choice(self.instances))))
        barrier = threading.Barrier(len(plan))
        answers: list[Answer] = []
        lock = threading.Lock()

        def one(tenant: str, action: str, params: dict[str, Any]) -> None:
            client = self.server.client(self.tenant_b if tenant == "B" else None)
            barrier.wait(60)
            try:
                status, body = client.answer(action, params)
                answer = judge(action, tenant, status, body)
            except Exception as exc:
                answer = Answer(action, tenant, 0, "no answer", f"{type(exc).__name__}: {exc}")
            with lock:
                answers.append(answer)

        threads = [threading.Thread(target=one, args=p, daemon=True) for p in plan]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        self.server.wait_idle()
        problems = invariants(self.server) + self.data_problems()
        with self.server.ctx.uow(readonly=True) as uow:
            tasks = Counter(f"{t.action} {t.status.value}"
                            + (f" ({t.error_code})" if t.error_code else "")
                            for t in uow.tasks.find() if t.id not in before)
        return answers, problems, tasks

    def data_problems(self) -> list[str]:
        """Every live instance's disks, and every accomplished group's snapshots, hold one
        state written to that instance, all disks alike."""
        problems = []
        for instance_id in self.live():
            disks = self.server.instance_disks(instance_id)
            paths = [self.server.path(d) for d in disks]
            known = self.states.get(instance_id, {})
            held = instance_state(paths, known)
            if held not in known:
                problems.append(f"{instance_id} ({self.status(instance_id)}): {held}")
            for group_id in self.server.groups_of(instance_id):
                found = self.server.group(group_id)
                if found is None or found[0] != "accomplished":
                    continue
                by_disk = dict(found[1])
                if [d for d in disks if d not in by_disk]:
                    continue  # a group of a disk set since changed (never here) is not read
                got = instance_state(paths, known, [by_disk[d] for d in disks])
                if got not in known:
                    problems.append(f"group {group_id} of {instance_id}: {got}")
        return problems


def run_concurrency(work: Path, rounds: int, calls: int, instances: int,
                    rng: random.Random) -> dict[str, Any]:
    world = ConcurrencyWorld(work, rng, instances)
    answers: list[Answer] = []
    tasks: Counter[str] = Counter()
    broken: list[tuple[int, list[str], str]] = []
    took = []
    try:
        for r in range(1, rounds + 1):
            started = time.monotonic()
            try:
                got, problems, new_tasks = world.round(calls)
            except Exception as exc:  # a set-up or a check that could not run: a finding
                evidence = keep_evidence(work, world.server, f"concurrency-round-{r}",
                                         {"error": repr(exc)})
                broken.append((r, [f"the round broke off: {type(exc).__name__}: {exc}"],
                               evidence))
                log(f"concurrency round {r}: broke off: {exc!r}")
                break
            took.append(time.monotonic() - started)
            answers += got
            tasks.update(new_tasks)
            bad = [a for a in got if a.bad]
            evidence = ""
            if problems or bad:
                evidence = keep_evidence(work, world.server, f"concurrency-round-{r}", {
                    "problems": problems, "bad answers": [vars(a) for a in bad]})
                broken.append((r, problems + [f"{a.action} ({a.tenant}): {a.bad}"
                                              for a in bad], evidence))
            codes = Counter(a.code for a in got)
            log(f"concurrency round {r}/{rounds}: {len(got)} answers {dict(codes)}; "
                f"{len(problems)} broken invariants, {len(bad)} bad answers "
                f"({took[-1]:.1f} s)")
    finally:
        world.server.close()
    return {"answers": answers, "tasks": tasks, "broken": broken, "rounds": rounds,
            "calls": calls, "instances": instances, "round_s": took}


# ------------------------------------------------------------------ 3. fuzz

ACCESSORS = {"str", "int", "bool", "enum", "list", "items", "objects", "json_list", "csv",
             "tags"}
POLICY_KINDS = ("ignored", "refused", "constant")  # parameters an action does not implement


@dataclass(frozen=True)
class ParamSpec:
    """One parameter an action reads, as its `Params` accessor call states it."""

    name: str
    kind: str  # the accessor: str, int, bool, enum, list, items, objects, json_list, ...
    required: bool = False
    low: int | None = None
    high: int | None = None
    allowed: tuple[str, ...] = ()
    fields: tuple[ParamSpec, ...] = ()  # items / objects: each item's fields


def _constant(node: ast.expr | None) -> Any:
    if node is None:
        return None
    with contextlib.suppress(ValueError, TypeError):
        return ast.literal_eval(node)
    return None


def _spec(accessor: str, call: ast.Call) -> ParamSpec | None:
    name = _constant(call.args[0]) if call.args else ("Tag" if accessor == "tags" else None)
    if not isinstance(name, str):
        return None
    kw = {k.arg: k.value for k in call.keywords if k.arg}
    allowed: tuple[str, ...] = ()
    if accessor == "enum" and len(call.args) > 1:
        allowed = tuple(sorted(_constant(call.args[1]) or ()))
    fields: tuple[ParamSpec, ...] = ()
    if accessor == "objects":
        fields = tuple(ParamSpec(f, "str") for f in _constant(kw.get("fields")) or ())
    if accessor == "tags":
        fields = (ParamSpec("Key", "str"), ParamSpec("Value", "str"))
    low, high = _constant(kw.get("min")), _constant(kw.get("max"))
    return ParamSpec(name, accessor, bool(_constant(kw.get("required"))),
                     low if isinstance(low, int) else None,
                     high if isinstance(high, int) else None, allowed, fields)


def action_schemas() -> dict[str, tuple[ParamSpec, ...]]:
    """Every action's parameters, read from the API's own code: the `Params` accessor
    calls (`c.p.int("PageSize", min=1, max=100)`, ...) of its function in
    entrypoints/api/actions.py and of the helpers it calls, items' fields from the loops
    over `p.items(...)`. A new action or parameter is fuzzed without a change here."""
    from ecsnap.entrypoints.api import actions

    tree = ast.parse(inspect.getsource(actions))
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}

    def reads(fn: ast.FunctionDef, seen: frozenset[str]) -> list[ParamSpec]:
        loops: dict[str, str] = {}
        for node in ast.walk(fn):
            if isinstance(node, ast.For | ast.comprehension) and \
                    isinstance(node.target, ast.Name) and isinstance(node.iter, ast.Call) \
                    and isinstance(node.iter.func, ast.Attribute) and \
                    node.iter.func.attr == "items" and node.iter.args:
                name = _constant(node.iter.args[0])
                if isinstance(name, str):
                    loops[node.target.id] = name
        top: list[ParamSpec] = []
        nested: dict[str, list[ParamSpec]] = {}
        for node in ast.walk(fn):
            if isinstance(node, ast.Attribute) and node.attr.startswith("region") and \
                    isinstance(node.value, ast.Name) and node.value.id == "c":
                top.append(ParamSpec("RegionId", "str", node.attr == "region"))
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if isinstance(func, ast.Name) and func.id in functions and func.id not in seen:
                top += reads(functions[func.id], seen | {func.id})
            if not (isinstance(func, ast.Attribute) and func.attr in ACCESSORS):
                continue
            owner = func.value
            if isinstance(owner, ast.Name) and owner.id in loops:
                into = nested.setdefault(loops[owner.id], [])
            elif (isinstance(owner, ast.Attribute) and owner.attr == "p") or \
                    (isinstance(owner, ast.Name) and owner.id == "p"):
                into = top
            else:
                continue
            spec = _spec(func.attr, node)
            if spec is not None:
                into.append(spec)
        out: dict[tuple[str, str], ParamSpec] = {}
        for spec in top:
            if spec.kind == "items" and spec.name in nested:
                spec = ParamSpec(spec.name, "items",
                                 fields=tuple({f.name: f for f in nested.get(spec.name, [])}
                                              .values()))
            out.setdefault((spec.name, spec.kind), spec)
        return list(out.values())

    schemas: dict[str, tuple[ParamSpec, ...]] = {}
    for fn in functions.values():
        for deco in fn.decorator_list:
            if isinstance(deco, ast.Call) and isinstance(deco.func, ast.Name) and \
                    deco.func.id == "action":
                for name in (_constant(a) for a in deco.args):
                    schemas[str(name)] = tuple(reads(fn, frozenset({fn.name})))
    missing = set(actions.ACTIONS) - set(schemas)
    if missing:
        raise RuntimeError(f"actions without a parameter table: {sorted(missing)}")
    # the parameters an action does not implement, from its policy (`@action(...,
    # ignored=, refused=, constant=)`), when the API states one
    for name, policy in getattr(actions, "POLICIES", {}).items():
        if name not in schemas:
            continue
        one = re.compile(r"(?<=\.)N(?=\.|$)")
        extra = [ParamSpec(one.sub("1", n), "ignored")
                 for n in sorted(getattr(policy, "ignored", ()))]
        extra += [ParamSpec(one.sub("1", n), "refused",
                            allowed=tuple(getattr(rule, "accepted", ())))
                  for n, rule in sorted(getattr(policy, "refused", {}).items())]
        extra += [ParamSpec(one.sub("1", n), "constant", allowed=tuple(values))
                  for n, values in sorted(getattr(policy, "constant", {}).items())]
        schemas[name] += tuple(extra)
    return schemas


@dataclass
class RawRequest:
    category: str
    label: str
    method: str = "POST"
    path: bytes = b"/"
    query: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes | list[bytes] = b""  # a list: sent in chunks, with no Content-Length
    must_reject: bool = False  # accepting it would be a hole (bad signature, replay...)
    # bytes no HTTP parser in front of the app lets through: `ecsnap serve` (uvicorn with
    # httptools) answers 400 itself to a request line with a byte outside 0x21-0x7e
    asgi_only: bool = False


class AsgiCaller:
    """The app called through ASGI on one event loop (a blocking portal, as Starlette's
    TestClient does), with the query string, headers and body bytes exactly as given."""

    def __init__(self, app: Any) -> None:
        from anyio.from_thread import start_blocking_portal

        self.app = app
        self._portal_cm = start_blocking_portal()
        self.portal = self._portal_cm.__enter__()

    def close(self) -> None:
        self._portal_cm.__exit__(None, None, None)

    def __call__(self, req: RawRequest) -> tuple[int, bytes]:
        return self.portal.call(self._run, req)

    async def _run(self, req: RawRequest) -> tuple[int, bytes]:
        chunks = req.body if isinstance(req.body, list) else [req.body]
        headers = [(b"host", b"127.0.0.1")] + [h for h in req.headers if h[0] != b"host"]
        if not isinstance(req.body, list) and not any(h[0] == b"content-length"
                                                      for h in req.headers):
            headers.append((b"content-length", str(len(req.body)).encode()))
        if any(h[0] == b"host" for h in req.headers):
            headers[0] = next(h for h in req.headers if h[0] == b"host")
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
                 "http_version": "1.1", "method": req.method, "scheme": "http",
                 "path": urllib.parse.unquote(req.path.decode("latin-1")),
                 "raw_path": req.path, "query_string": req.query, "root_path": "",
                 "headers": headers, "client": ("127.0.0.1", 40000),
                 "server": ("127.0.0.1", 80)}
        pending = list(chunks)
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            if pending:
                chunk = pending.pop(0)
                return {"type": "http.request", "body": chunk, "more_body": bool(pending)}
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        try:
            await self.app(scope, receive, send)
        except Exception as exc:  # escaped the app: what a server would answer 500 to
            return 599, f"exception escaped the app: {exc!r}".encode()
        start = next((m for m in sent if m["type"] == "http.response.start"), None)
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return (int(start["status"]) if start else 598), body


class FuzzWorld:
    """An in-process ecsnap (real SQLite database and qcow2 files, the compute double of
    tests/doubles.py, tasks inline): two tenants with instances, disks, snapshots and
    groups, an AccessKey that is disabled, and the API app."""

    def __init__(self, work: Path) -> None:
        sys.path.insert(0, str(ROOT))
        from tests.doubles import FileBackedCompute

        from ecsnap import bootstrap, config
        from ecsnap.entrypoints.api.app import create_app
        from ecsnap.service import accounts, images, setup

        data = work / "fuzz"
        data.mkdir(mode=0o700, parents=True, exist_ok=True)
        settings = config.load(data, background_tasks=False, health_gate_timeout_s=0.5,
                               stop_timeout_s=0.5, accel="tcg", crash_at="")
        self.compute = FileBackedCompute()
        self.ctx = bootstrap.build(settings, compute=self.compute, background=False)
        done = setup.initialise(self.ctx, REGION)
        self.keys = {"alice": (done.access_key.id, done.access_key.secret)}
        self.accounts = {"alice": done.account.id}
        bob = accounts.create_account(self.ctx, "bob", "violet-harbour-7")
        key = accounts.create_access_key(self.ctx, "bob")
        self.keys["bob"] = (key.id, key.secret)
        self.accounts["bob"] = bob.id
        off = accounts.create_access_key(self.ctx, "bob")
        accounts.disable_access_key(self.ctx, off.id)
        self.disabled = (off.id, off.secret)
        template = data / "template.qcow2"
        sh("qemu-img", "create", "-q", "-f", "qcow2", str(template), "1G")
        self.image = images.register_image(self.ctx, REGION, name="fuzz", os_name="fuzz",
                                           template=template, size_gib=1).id
        self.pool = settings.pools_dir / REGION
        self.engine = self.ctx.extras["engine"]
        from sqlalchemy import inspect as sa_inspect

        # every table but the nonces (spent by any verified request, accepted or not: by
        # design) and alembic's
        self.tables = sorted(t for t in sa_inspect(self.engine).get_table_names()
                             if t not in ("nonces", "alembic_version"))
        self.ids: dict[str, dict[str, list[str]]] = {}
        self.members: dict[str, list[tuple[str, str]]] = {}  # alice's groups' (disk, snap)
        self.replenish()
        self.call = AsgiCaller(create_app(self.ctx))
        self.last_valid: RawRequest | None = None

    def close(self) -> None:
        self.call.close()
        self.engine.dispose()

    def replenish(self) -> None:
        """Each tenant with a running and a stopped instance (a group each); at most 12
        instances a tenant; then the ID pools read again."""
        from ecsnap.domain.errors import EcsError
        from ecsnap.service import instances, snapshots

        for account in self.accounts.values():
            with self.ctx.uow(readonly=True) as uow:
                mine = uow.instances.find(account_id=account)
            statuses = Counter(i.status.value for i in mine)
            for status in ("Running", "Stopped"):
                if statuses[status]:
                    continue
                with contextlib.suppress(EcsError):
                    req = instances.InstanceRequest(
                        image_id=self.image, instance_type=NANO,
                        data_disks=[instances.DataDiskSpec(20)])
                    [new] = instances.run_instances(self.ctx, account, REGION, req,
                                                    start=status == "Running")
                    snapshots.create_snapshot_group(self.ctx, account, REGION, new)
            for extra in sorted(mine, key=lambda i: i.created)[:-12]:
                with contextlib.suppress(EcsError):
                    instances.delete_instance(self.ctx, account, extra.id, force=True)
        self.refresh_ids()

    def refresh_ids(self) -> None:
        with self.ctx.uow(readonly=True) as uow:
            for who, account in self.accounts.items():
                self.ids[who] = {
                    "instance": [i.id for i in uow.instances.find(account_id=account)],
                    "disk": [d.id for d in uow.disks.find(account_id=account)],
                    "snapshot": [s.id for s in uow.snapshots.find(account_id=account)],
                    "group": [g.id for g in uow.snapshot_groups.find(account_id=account)],
                    "task": [t.id for t in uow.tasks.find(account_id=account)][-20:],
                    "image": [self.image],
                }
            self.members = {}
            for snap in uow.snapshots.find(account_id=self.accounts["alice"]):
                if snap.group_id:
                    self.members.setdefault(snap.group_id, []).append((snap.source_disk_id,
                                                                       snap.id))

    def digest(self) -> dict[str, str]:
        """A digest per table (every row), of the double's VMs and of the pool's files
        (name, size, mtime): what a rejected call must leave as it was."""
        import hashlib

        from sqlalchemy import text

        out = {}
        with self.engine.connect() as conn:
            for table in self.tables:
                rows = sorted(repr(tuple(r)) for r in conn.execute(text(f"SELECT * FROM {table}")))
                out[table] = hashlib.sha256("\n".join(rows).encode()).hexdigest()
        out["vms"] = repr(sorted(self.compute.vms.items()))
        files = []
        with os.scandir(self.pool) as entries:
            for entry in entries:
                stat = entry.stat()
                files.append((entry.name, stat.st_size, stat.st_mtime_ns))
        out["files"] = repr(sorted(files))
        return out


ODD_VALUES = ["", " ", "true", "false", "0", "-1", "99999999999999999999", "[]", '["x"]',
              "[1,2]", "{", "null", "None", "1e9", "\x00", "%", "%00", "a" * 300, "数据",
              "http://x", "\u2028", "<x>&amp;", "'", '"', "\\", "acs:x", "aliyun-x",
              "x" * 129, "i-x", "d-x", "s-x", "ssg-x", "t-" + "a" * 20, "i-" + "0" * 20,
              "KeepCharging", "ecs.g6.large", "\U0001f600", "\u202eabc", "a\r\nb: c"]
NAMED_VALUES = {
    "Type": ["RunShellScript", "RunBatScript", "RunPowerShellScript"],
    "Status": ["Running", "Stopped", "Pending", "accomplished", "progressing", "failed",
               "Available", "In_use"],
    "CommandContent": ["echo hi", "ZWNobyBoaQ==", "x" * 20000],
    "ContentEncoding": ["Base64", "PlainText"], "BatchOptimization": ["AllTogether",
                                                                        "SuccessFirst"],
    "RepeatMode": ["Once", "Period"], "ImageOwnerAlias": ["system", "self", "others"],
    "DiskType": ["system", "data", "all"], "Category": ["cloud_essd", "cloud", "x"],
    "DiskCategory": ["cloud_essd", "cloud_ssd", "x"], "TaskAction": ["ResetDisks",
                                                                     "StartInstance"],
    "TaskStatus": ["Finished", "Processing", "Failed"],
    "InvokeRecordStatus": ["Running", "Finished"], "SourceDiskType": ["system", "data"],
}
UNKNOWN_NAMES = ["Foo", "Disk.0.DiskId", "Disk.01.DiskId", "Tag.1.key", "DataDisk.1",
                 "InstanceId.0", "X.1.Y.2.Z", "Action.1", "Signature2", "OwnerId",
                 "ResourceOwnerAccount", "SystemDisk.Category", "a" * 200]
TEXT = None  # set by _strategies (hypothesis is imported lazily)


def _st() -> Any:
    from hypothesis import strategies as st

    return st


def _pool(name: str) -> str | None:
    lowered = name.lower()
    for key, kind in (("snapshotgroup", "group"), ("snapshot", "snapshot"),
                      ("instancetype", ""), ("instance", "instance"), ("disk", "disk"),
                      ("image", "image"), ("task", "task")):
        if key in lowered:
            return kind or None
    return None


def draw_str(data: Any, name: str, world: FuzzWorld) -> str:
    """A string for parameter `name`: mostly a real ID of the kind it names (the tenant's
    own, sometimes the other tenant's), else a value typical of the name, an odd value or
    any text. The same draws are made whatever the world holds (hypothesis asks that the
    shape of the data drawn depend on earlier draws only): IDs are picked by index."""
    st = _st()
    choice = data.draw(st.integers(0, 9))
    index = data.draw(st.integers(0, 2**16))
    named = data.draw(st.sampled_from(NAMED_VALUES[name])) if name in NAMED_VALUES else ""
    odd = data.draw(st.sampled_from(ODD_VALUES))
    text = data.draw(st.text(st.characters(blacklist_categories=("Cs",)), max_size=40))
    kind = _pool(name)
    if kind and choice < 6:
        pool = world.ids["bob" if choice == 5 else "alice"][kind]
        if pool:
            return pool[index % len(pool)]
    if name == "RegionId" and choice < 8:
        return REGION
    if "instancetype" in name.lower() and choice < 7:
        return [NANO, "ecs.g6.large", "ecs.nosuch"][index % 3]
    if "zone" in name.lower() and choice < 6:
        return ["local-1-a", "local-1-b", "cn-x"][index % 3]
    if named and choice < 7:
        return str(named)
    return str(odd) if choice < 8 else str(text)


def draw_param(data: Any, spec: ParamSpec, world: FuzzWorld,
               prefix: str = "") -> list[tuple[str, str]]:
    """The wire pairs of one parameter, mostly of its type and range, sometimes not."""
    st = _st()
    name = prefix + spec.name
    kind = spec.kind
    if kind == "int":
        if data.draw(st.integers(0, 9)) < 7:
            low = spec.low if spec.low is not None else -3
            high = spec.high if spec.high is not None else (64 if "Size" in name else 12)
            return [(name, str(data.draw(st.integers(low - 2, high + 2))))]
        return [(name, data.draw(st.sampled_from(
            ["", "1.5", "1e3", "0x10", " 1", "\u0661", "99999999999999999999", "-0", "+5",
             "abc", "9" * 19])))]
    if kind == "bool":
        return [(name, data.draw(st.sampled_from(["true", "false", "True", "FALSE", "", "1",
                                                    "yes"])))]
    if kind == "enum" or (kind in POLICY_KINDS and spec.allowed):
        return [(name, data.draw(st.sampled_from([*spec.allowed, "", "x",
                                                  spec.allowed[0].lower(),
                                                  spec.allowed[0].upper()])))]
    if kind in ("list", "csv", "json_list"):
        values = [draw_str(data, spec.name, world)
                  for _ in range(data.draw(st.integers(0, 3)))]
        if kind == "csv":
            return [(name, ",".join(values))]
        if kind == "json_list":
            odd = data.draw(st.integers(0, 9))
            if odd == 0:
                return [(name, data.draw(st.sampled_from(
                    ["[", "{}", "[1]", '"x"', "[" * 5000, "null", '["' + "a" * 300 + '"]',
                     json.dumps(["i-x"] * 101)])))]
            return [(name, json.dumps(values))]
        if data.draw(st.integers(0, 9)) == 0:
            return [(f"{name}.{data.draw(st.sampled_from(['0', '01', '999999', '', 'x']))}",
                     values[0] if values else "")]
        return [(f"{name}.{n}", v) for n, v in enumerate(values, 1)]
    if kind in ("items", "objects", "tags"):
        pairs = []
        fields = spec.fields or (ParamSpec("Field", "str"),)
        for n in range(1, data.draw(st.integers(0 if kind == "tags" else 1, 3)) + 1):
            for f in fields:
                if data.draw(st.integers(0, 9)) < 7:
                    pairs += draw_param(data, f, world, f"{name}.{n}.")
        return pairs
    return [(name, draw_str(data, spec.name, world))]


def sign_rpc(world: FuzzWorld, action: str, params: list[tuple[str, str]], *,
             who: str = "alice", fmt: str = "JSON", method: str = "POST",
             key: tuple[str, str] | None = None, **kw: Any) -> list[tuple[str, str]]:
    from ecsnap.entrypoints.api.signature import rpc_v1_request_params

    key_id, secret = key or world.keys[who]
    return rpc_v1_request_params(action, params, key_id, secret, fmt=fmt, method=method, **kw)


def encode(pairs: Sequence[tuple[str, str]]) -> bytes:
    return urllib.parse.urlencode(list(pairs)).encode()


def build_valid(data: Any, world: FuzzWorld,
                schemas: dict[str, tuple[ParamSpec, ...]]) -> RawRequest:
    """A validly signed request of any action, its parameters drawn from its table."""
    st = _st()
    action = data.draw(st.sampled_from(sorted(schemas)))
    who = "bob" if data.draw(st.integers(0, 6)) == 0 else "alice"
    params: list[tuple[str, str]] = []
    implemented = [p for p in schemas[action] if p.kind not in POLICY_KINDS]
    for spec in implemented:
        if data.draw(st.integers(0, 99)) < (85 if spec.required else 30):
            params += draw_param(data, spec, world)
    policy = [p for p in schemas[action] if p.kind in POLICY_KINDS]
    chosen = data.draw(st.integers(0, 2**16))
    if policy and data.draw(st.integers(0, 3)) == 0:  # a parameter it does not implement
        params += draw_param(data, policy[chosen % len(policy)], world)
    coherent, index = (data.draw(st.integers(0, 9)), data.draw(st.integers(0, 2**16))) \
        if action in ("ResetDisks", "PreviewResetDisks") else (9, 0)
    if coherent < 4 and world.members:  # a coherent rollback: one group's own snapshots
        members = world.members[sorted(world.members)[index % len(world.members)]]
        params = [p for p in params if not p[0].startswith("Disk.")]
        for n, (disk, snap) in enumerate(members, 1):
            params += [(f"Disk.{n}.DiskId", disk), (f"Disk.{n}.SnapshotId", snap)]
    if data.draw(st.integers(0, 9)) == 0:
        params.append((data.draw(st.sampled_from(UNKNOWN_NAMES)), draw_str(data, "", world)))
    if "RegionId" not in dict(params) and data.draw(st.integers(0, 9)) < 9:
        params.append(("RegionId", REGION))
    fmt = "XML" if data.draw(st.integers(0, 6)) == 0 else "JSON"
    if data.draw(st.integers(0, 9)) == 0:  # ACS3-HMAC-SHA256, as the newer SDK signs
        from ecsnap.entrypoints.api.signature import acs3_request_headers

        key_id, secret = world.keys[who]
        headers = acs3_request_headers(action, params, "127.0.0.1", key_id, secret)
        return RawRequest("valid", f"{action} (ACS3)", query=encode(params),
                          headers=[(k.encode(), v.encode()) for k, v in headers.items()])
    req = RawRequest("valid", action, query=encode(sign_rpc(world, action, params, who=who,
                                                            fmt=fmt)))
    return req


SIGNATURE_FIELDS = ("Signature", "AccessKeyId", "SignatureNonce", "Timestamp",
                    "SignatureMethod", "SignatureVersion")


def build_signature(data: Any, world: FuzzWorld,
                    schemas: dict[str, tuple[ParamSpec, ...]]) -> RawRequest:
    """An RPC v1 request with its signature fields wrong, absent, stale or replayed."""
    from datetime import UTC, datetime, timedelta

    from ecsnap.entrypoints.api.signature import sign_rpc_v1

    st = _st()
    action = data.draw(st.sampled_from(["DescribeInstances", "DeleteInstance", "ResetDisks",
                                        "CreateSnapshotGroup", "StopInstance"]))
    alice = world.ids["alice"]
    target = {"DescribeInstances": [],
              "DeleteInstance": [("InstanceId", (alice["instance"] or ["i-x"])[0]),
                                 ("Force", "true")],
              "ResetDisks": [("Disk.1.DiskId", (alice["disk"] or ["d-x"])[0]),
                             ("Disk.1.SnapshotId", (alice["snapshot"] or ["s-x"])[0])],
              "CreateSnapshotGroup": [("InstanceId", (alice["instance"] or ["i-x"])[0])],
              "StopInstance": [("InstanceId", (alice["instance"] or ["i-x"])[0]),
                               ("ForceStop", "true")]}[action]
    params = [("RegionId", REGION), *target]
    how = data.draw(st.sampled_from(
        ["drop", "garble", "stale", "fresh-skew", "bad-timestamp", "wrong-secret", "tamper",
         "duplicate", "replay", "disabled-key", "unknown-key", "long-nonce", "lowercase",
         "unsigned", "post-signed-as-get"]))
    pairs = sign_rpc(world, action, params)
    must = True
    label = how
    if how == "drop":
        name = data.draw(st.sampled_from(SIGNATURE_FIELDS))
        pairs = [p for p in pairs if p[0] != name]
        label = f"drop {name}"
    elif how == "garble":
        index = data.draw(st.integers(0, len(pairs) - 1))
        value = data.draw(st.sampled_from(ODD_VALUES[:20]))
        if value == pairs[index][1]:
            value += "x"
        label = f"garble {pairs[index][0]}"
        pairs[index] = (pairs[index][0], value)
    elif how in ("stale", "fresh-skew"):
        minutes = data.draw(st.integers(16, 100000) if how == "stale" else st.integers(-14, 14))
        sign = -1 if data.draw(st.booleans()) else 1
        now = datetime.now(UTC) + timedelta(minutes=sign * minutes)
        pairs = sign_rpc(world, action, params, now=now)
        must = how == "stale"
        label = f"{how} {sign * minutes} min"
    elif how == "bad-timestamp":
        stamp = data.draw(st.sampled_from(
            ["", "yesterday", "2024-13-01T00:00:00Z", "2024-02-30T00:00:00Z",
             datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S"),
             datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S+08:00"),
             datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.123Z"), "0", "9" * 40]))
        unsigned = [p for p in pairs if p[0] not in ("Timestamp", "Signature")]
        unsigned.append(("Timestamp", stamp))
        pairs = [*unsigned, ("Signature", sign_rpc_v1(unsigned, world.keys["alice"][1]))]
    elif how == "wrong-secret":
        pairs = sign_rpc(world, action, params, key=(world.keys["alice"][0], "x" * 30))
    elif how == "tamper":
        index = data.draw(st.integers(0, len(params) - 1))
        pairs = [(k, v + "x") if k == params[index][0] else (k, v) for k, v in pairs]
    elif how == "duplicate":
        index = data.draw(st.integers(0, len(pairs) - 1))
        pairs = [*pairs, pairs[index]]
        label = f"duplicate {pairs[index][0]}"
    elif how == "replay" and world.last_valid is not None:
        replay = world.last_valid
        return RawRequest("signature", "replay", replay.method, replay.path, replay.query,
                          replay.headers, replay.body, must_reject=True)
    elif how == "disabled-key":
        pairs = sign_rpc(world, action, params, key=world.disabled)
    elif how == "unknown-key":
        pairs = sign_rpc(world, action, params, key=("LTAI" + "x" * 20, "y" * 30))
    elif how == "long-nonce":
        pairs = sign_rpc(world, action, params, nonce="n" * data.draw(st.integers(60, 5000)))
        must = False  # a long nonce is refused or not by its length: either is fine
    elif how == "lowercase":
        pairs = [(k.lower() if k in SIGNATURE_FIELDS else k, v) for k, v in pairs]
    elif how == "unsigned":
        pairs = [p for p in pairs if p[0] not in SIGNATURE_FIELDS]
    elif how == "post-signed-as-get":
        return RawRequest("signature", how, "GET", query=encode(pairs), must_reject=True)
    return RawRequest("signature", label, query=encode(pairs), must_reject=must)


def build_acs3(data: Any, world: FuzzWorld,
               schemas: dict[str, tuple[ParamSpec, ...]]) -> RawRequest:
    """An ACS3-HMAC-SHA256 request with its headers broken one way or another."""
    from datetime import UTC, datetime, timedelta

    from ecsnap.entrypoints.api.signature import acs3_request_headers

    st = _st()
    params = [("RegionId", REGION)]
    key_id, secret = world.keys["alice"]
    body = b""
    how = data.draw(st.sampled_from(["drop", "garble-auth", "body-changed", "query-changed",
                                     "action-changed", "stale", "unsigned-header",
                                     "host-changed", "replay"]))
    when = datetime.now(UTC) - timedelta(minutes=30) if how == "stale" else None
    headers = acs3_request_headers("DescribeInstances", params, "127.0.0.1", key_id, secret,
                                   body=body, now=when)
    query = encode(params)
    if how == "drop":
        name = data.draw(st.sampled_from(["authorization", "x-acs-date",
                                          "x-acs-signature-nonce", "x-acs-content-sha256"]))
        headers.pop(name)
        how = f"drop {name}"
    elif how == "garble-auth":
        headers["authorization"] = data.draw(st.sampled_from(
            ["ACS3-HMAC-SHA256", "ACS3-HMAC-SHA256 Credential=,SignedHeaders=,Signature=",
             "ACS3-HMAC-SHA256 Credential=x", "ACS3-X " + "a" * 5000,
             headers["authorization"].replace("Signature=", "Signature=00"),
             headers["authorization"] + ",Signature=abc", "acs3-hmac-sha256 ,,,,="]))
    elif how == "body-changed":
        body = b"RegionId=local-2"
        headers["content-type"] = "application/x-www-form-urlencoded"
    elif how == "query-changed":
        query = encode([("RegionId", "local-2")])
    elif how == "action-changed":
        headers["x-acs-action"] = "DeleteInstance"
    elif how == "unsigned-header":
        headers["x-acs-extra"] = "1"
    elif how == "host-changed":
        headers["host"] = "127.0.0.1:9"
    elif how == "replay":
        world.call(RawRequest("acs3", "first", query=query, headers=[
            (k.encode(), v.encode()) for k, v in headers.items()]))
    return RawRequest("acs3", how, query=query, body=body, must_reject=True,
                      headers=[(k.encode(), v.encode("latin-1", "replace"))
                               for k, v in headers.items()])


def build_encoding(data: Any, world: FuzzWorld,
                   schemas: dict[str, tuple[ParamSpec, ...]]) -> RawRequest:
    """Query strings that are garbled, huge, oddly encoded or deeply nested."""
    st = _st()
    how = data.draw(st.sampled_from(["random-bytes", "corrupted", "unicode-values",
                                     "too-long", "too-many", "long-value", "deep-json",
                                     "raw-non-ascii"]))
    if how == "random-bytes":  # what reaches the app through uvicorn: 0x21-0x7e, no '#'
        alphabet = st.sampled_from([bytes([b]) for b in range(0x21, 0x7F) if b != 0x23])
        query = b"".join(data.draw(st.lists(alphabet, max_size=300)))
        return RawRequest("encoding", how, query=query, must_reject=True)
    if how == "raw-non-ascii":  # raw UTF-8 or other bytes >= 0x80: ASGI only
        pairs = sign_rpc(world, "DescribeDisks", [("RegionId", REGION),
                                                  ("DiskName", "disk-é数据")])
        raw = data.draw(st.sampled_from([
            "&".join(f"{k}={v}" for k, v in pairs).encode("utf-8"), b"a=\xff",
            b"a=\xc0\xaf", b"a=\xed\xa0\x80", b"a=\x00b", b"a=b c"]))
        return RawRequest("encoding", how, query=raw, asgi_only=True)
    if how == "corrupted":
        query = encode(sign_rpc(world, "DescribeInstances", [("RegionId", REGION)]))
        at = data.draw(st.integers(0, 2**16)) % (len(query) + 1)  # its length varies
        junk = data.draw(st.sampled_from([b"%", b"%G1", b"%FF", b"%ED%A0%80", b"%C0%AF",
                                          b"%00", b"+", b"&", b"=", b"&&=", b"%EF%BB%BF",
                                          b"\xff", b"\x00", b";", b"%25"]))
        return RawRequest("encoding", f"insert {junk!r}", query=query[:at] + junk + query[at:],
                          asgi_only=any(b < 0x21 or b > 0x7E for b in junk))
    if how == "unicode-values":
        value = data.draw(st.text(st.characters(blacklist_categories=("Cs",)), min_size=1,
                                  max_size=60))
        name = data.draw(st.sampled_from(["InstanceName", "Description", "Name",
                                          "InstanceIds", "Tag.1.Key"]))
        action = data.draw(st.sampled_from(["DescribeInstances", "ModifySnapshotGroup",
                                            "DescribeDisks"]))
        return RawRequest("encoding", how, query=encode(sign_rpc(
            world, action, [("RegionId", REGION), (name, value)])))
    if how == "too-long":
        return RawRequest("encoding", how, query=b"a=" + b"x" * (257 * 1024), must_reject=True)
    if how == "too-many":
        return RawRequest("encoding", how,
                          query=b"&".join(b"p%d=1" % n for n in range(1001)), must_reject=True)
    if how == "long-value":
        size = data.draw(st.integers(1000, 200_000))
        return RawRequest("encoding", how, query=encode(sign_rpc(
            world, "DescribeDisks", [("RegionId", REGION), ("DiskName", "d" * size)])))
    return RawRequest("encoding", how, query=encode(sign_rpc(
        world, "DescribeInstances",
        [("RegionId", REGION), ("InstanceIds", "[" * data.draw(st.integers(500, 60000)))])))


def build_body(data: Any, world: FuzzWorld,
               schemas: dict[str, tuple[ParamSpec, ...]]) -> RawRequest:
    """Parameters in the body, garbage bodies, oversized and streamed bodies."""
    st = _st()
    form = (b"content-type", b"application/x-www-form-urlencoded")
    how = data.draw(st.sampled_from(["form-signed", "form-garbage", "too-large",
                                     "too-large-streamed", "form-too-many", "json-body",
                                     "multipart", "form-charset", "chunked-small"]))
    signed = encode(sign_rpc(world, "DescribeInstances", [("RegionId", REGION)]))
    if how == "form-signed":
        return RawRequest("body", how, headers=[form], body=signed)
    if how == "form-garbage":
        return RawRequest("body", how, headers=[form], body=data.draw(st.binary(max_size=400)),
                          must_reject=True)
    if how == "too-large":
        return RawRequest("body", how, headers=[form], body=b"a" * (1024 * 1024 + 1),
                          must_reject=True)
    if how == "too-large-streamed":
        return RawRequest("body", how, headers=[form], body=[b"a" * 65536] * 17,
                          must_reject=True)
    if how == "form-too-many":
        return RawRequest("body", how, headers=[form], query=signed,
                          body=b"&".join(b"q%d=1" % n for n in range(1000)), must_reject=True)
    if how == "json-body":
        return RawRequest("body", how, query=signed,
                          headers=[(b"content-type", b"application/json")],
                          body=b'{"Action": "DeleteInstance", "InstanceId": "i-x"}')
    if how == "multipart":
        return RawRequest("body", how, headers=[(b"content-type",
                                                 b"multipart/form-data; boundary=zz")],
                          body=b"--zz\r\nContent-Disposition: form-data; name=\"Action\""
                               b"\r\n\r\nDescribeInstances\r\n--zz--\r\n", must_reject=True)
    if how == "form-charset":
        return RawRequest("body", how, body=signed, headers=[
            (b"content-type", b"application/x-www-form-urlencoded; charset=utf-16")])
    return RawRequest("body", how, headers=[form], body=[signed[:10], signed[10:], b""])


def build_method(data: Any, world: FuzzWorld,
                 schemas: dict[str, tuple[ParamSpec, ...]]) -> RawRequest:
    """Other methods and paths."""
    st = _st()
    method = data.draw(st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD",
                                        "TRACE", "CONNECT", "BREW"]))
    path = data.draw(st.sampled_from([b"/", b"/x", b"//", b"/console", b"/console/../",
                                      b"/%2e%2e/", b"/console/static/%2e%2e/%2e%2e/etc/passwd",
                                      b"/console/login", b"/?", b"/" + b"a" * 5000]))
    query = encode(sign_rpc(world, "DescribeRegions", [("RegionId", REGION)], method=method))
    return RawRequest("method", f"{method} {path[:40]!r}", method, path, query,
                      must_reject=method not in ("GET", "POST", "HEAD") and path == b"/")


BUILDERS: dict[str, Callable[[Any, FuzzWorld, dict[str, tuple[ParamSpec, ...]]],
                             RawRequest]] = {
    "valid": build_valid, "signature": build_signature, "acs3": build_acs3,
    "encoding": build_encoding, "body": build_body, "method": build_method}
# each kind's share of the requests: 55% valid requests, the rest malformed (each kind is
# its own hypothesis run: drawn from one, hypothesis would favour the first)
SHARES = {"valid": 11, "signature": 3, "acs3": 1, "encoding": 2, "body": 2, "method": 1}


@dataclass
class FuzzStats:
    sent: int = 0
    by_category: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)
    valid: dict[str, Counter[str]] = field(default_factory=dict)  # action -> outcome
    rejected: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    failure_kinds: Counter[str] = field(default_factory=Counter)
    asgi_only: int = 0  # requests only an ASGI caller can make (see RawRequest)
    asgi_findings: list[dict[str, Any]] = field(default_factory=list)
    asgi_kinds: Counter[str] = field(default_factory=Counter)


def judge_raw(world: FuzzWorld, req: RawRequest, status: int, body: bytes,
              changed: list[str]) -> list[str]:
    text = body.decode("utf-8", "replace")
    bad = []
    if status >= 500:
        bad.append(f"HTTP {status}")
    if "Traceback" in text or 'File "/' in text:
        bad.append("a traceback in the answer")
    api = req.path == b"/" and req.method in ("GET", "POST")
    if api and status >= 400 and "<Code>" not in text:
        with contextlib.suppress(ValueError):
            parsed = json.loads(text)
            if not (isinstance(parsed, dict) and parsed.get("Code") and
                    parsed.get("RequestId")):
                bad.append("an error without the ECS envelope")
    if req.must_reject and status < 400:
        bad.append(f"accepted ({status}) though it must be refused")
    if status >= 400 and changed:
        bad.append(f"rejected ({status}) yet changed {changed}")
    return bad


def run_fuzz(work: Path, count: int, seed: int) -> dict[str, Any]:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as fixed_seed
    from hypothesis import strategies as st

    world = FuzzWorld(work)
    schemas = action_schemas()
    stats = FuzzStats()
    current = [world.digest()]
    started = time.monotonic()

    def one(data: Any, category: str) -> None:
        if stats.sent and stats.sent % 200 == 0:
            world.replenish()
            current[0] = world.digest()
        elif stats.sent % 20 == 0:
            world.refresh_ids()
        try:
            req = BUILDERS[category](data, world, schemas)
            current[0] = world.digest()  # a builder may have sent a request of its own
            status, body = world.call(req)
            after = world.digest()
        except Exception as exc:  # the harness's own error: counted, shown, not hidden
            stats.sent += 1
            stats.by_category[category] += 1
            stats.failure_kinds["harness error"] += 1
            if len(stats.failures) < 50:
                stats.failures.append({"category": category, "label": "harness error",
                                       "method": "", "path": "", "query": "", "status": 0,
                                       "problems": [repr(exc)], "body": ""})
            current[0] = world.digest()
            return
        changed = sorted(k for k in after if after[k] != current[0][k])
        current[0] = after
        stats.sent += 1
        stats.by_category[category] += 1
        if not req.asgi_only:  # (those are counted apart: see RawRequest.asgi_only)
            stats.statuses[f"{status // 100}xx"] += 1
        code = "OK"
        if status >= 400:
            stats.rejected += 1
            code = f"HTTP {status}"
            with contextlib.suppress(ValueError, AttributeError):
                code = str(json.loads(body).get("Code") or code)
            if code.startswith("HTTP") and b"<Code>" in body:
                code = body.split(b"<Code>", 1)[1].split(b"<", 1)[0].decode("utf-8", "replace")
        if not req.asgi_only:
            stats.codes[code] += 1
        if category == "valid":
            stats.valid.setdefault(req.label.split(" ")[0], Counter())[
                "accepted" if status < 400 else "rejected"] += 1
            if status < 400 and req.headers == []:
                world.last_valid = req
        bad = judge_raw(world, req, status, body, changed)
        stats.asgi_only += req.asgi_only
        kinds, found = (stats.asgi_kinds, stats.asgi_findings) if req.asgi_only else \
            (stats.failure_kinds, stats.failures)
        for b in bad:
            kinds[b.split(" (")[0].split(":")[0]] += 1
        if bad and len(found) < 50:
            found.append({"category": category, "label": req.label, "method": req.method,
                          "path": req.path[:80].decode("latin-1"),
                          "query": req.query[:600].decode("latin-1"), "status": status,
                          "problems": bad, "body": body[:600].decode("utf-8", "replace")})
        if stats.sent % 1000 == 0:
            log(f"fuzz: {stats.sent} requests, {stats.rejected} rejected, "
                f"{sum(stats.failure_kinds.values())} failures, "
                f"{sum(stats.asgi_kinds.values())} ASGI-only findings "
                f"({time.monotonic() - started:.0f} s)")

    try:
        total = sum(SHARES.values())
        for n, (category, share) in enumerate(SHARES.items()):
            quota = count * share // total if n else count - count * (total - share) // total
            goal = stats.by_category[category] + quota
            for attempt in range(1000):  # hypothesis stops early once it has tried every
                left = goal - stats.by_category[category]  # shape of a small space (acs3)
                if left <= 0:
                    break

                @fixed_seed(seed + 100 * n + attempt)
                @settings(max_examples=left, deadline=None, database=None,
                          phases=[Phase.generate], suppress_health_check=list(HealthCheck))
                @given(st.data())
                def fuzz(data: Any) -> None:
                    one(data, category)  # noqa: B023 (run at once, inside the loop)

                fuzz()
    finally:
        world.close()
    return {"stats": stats, "seconds": time.monotonic() - started, "actions": len(schemas),
            "schemas": schemas, "tables": world.tables}


# ------------------------------------------------------------------ the report


def row(*cells: object) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def seconds(values: Sequence[float]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return (f"{statistics.median(ordered):.2f} / {p95:.2f} / {ordered[-1]:.2f} s")


def crash_section(trials: list[Trial], meta: dict[str, Any]) -> list[str]:
    kinds = list(dict.fromkeys(t.kind for t in trials))
    failed = [t for t in trials if t.problems]
    lines = [
        "## 1. Crash trials: kill -9 at random moments, restart, check", "",
        f"**{len(trials)} trials, {len(failed)} failed** (target: 0).", "",
        row("operation", "trials", "failed", "killed before the task was journaled",
            "killed mid-task", "killed after the task ended", "outcomes after recovery",
            "recovery median / p95 / max"),
        row(*["---"] * 8)]
    for kind in kinds:
        of = [t for t in trials if t.kind == kind]
        at = Counter("before" if t.at_kill.startswith("not") else
                     "mid" if t.at_kill.startswith("Processing") else "after" for t in of)
        outcomes = Counter(t.outcome for t in of)
        lines.append(row(kind, len(of), sum(1 for t in of if t.problems), at["before"],
                         at["mid"], at["after"],
                         ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items())),
                         seconds([t.recovery_s for t in of])))
    lines.append(row("all", len(trials), len(failed), "", "", "", "",
                     seconds([t.recovery_s for t in trials])))
    lines += ["", "Where the mid-task kills landed (steps done when the process died):", "",
              row("operation", "journal at the kill", "trials"), row("---", "---", "---")]
    for kind in kinds:
        spots = Counter(t.at_kill for t in trials if t.kind == kind and
                        t.at_kill.startswith("Processing"))
        for spot, n in sorted(spots.items()):
            lines.append(row(kind, spot.removeprefix("Processing, "), n))
    windows = meta.get("windows_ms", {})
    missed = meta.get("self_check_missed")
    lines += [
        "", "Method. Each trial sends one signed API request to a real `ecsnap serve` (RPC "
        f"v1, as the SDKs sign), waits a delay drawn uniformly from 0 to {WINDOW} times the "
        "median answer time of 3 such requests run without a kill (" +
        ", ".join(f"{k}: 0-{v} ms" for k, v in windows.items()) + "), so that the kill "
        "falls anywhere from the request's parsing to after its answer, and SIGKILLs the "
        "server process. The journal is read to tell where the kill landed. The server is "
        "started again on the same data dir (recovery runs before it serves) and the "
        "recovery time is measured from that start until the API answers a signed "
        "DescribeRegions. Then:",
        "- the invariants of the crash matrix (`tests/crash.py` `check_invariants`, on the "
        "live data dir, with the VMs read from QEMU's run dirs): no task Processing, no lock "
        "left on an instance or disk, every disk file and internal snapshot (`qemu-img "
        "info`) known to the database and the other way round, snapshots accomplished, no "
        "group left progressing, failed groups without snapshots, instances Running or "
        "Stopped as their VMs are, each VM with exactly its instance's disks, the region's "
        "reserved vCPUs and memory equal to a recount of the instances;",
        "- the data: before each trial every disk gets a new byte pattern (a different one "
        "per disk) written from the host with `qemu-io` into 64 KiB at 0 (data disks) and "
        "at 3 GiB; after recovery the patterns are read back from the qcow2 files, and from "
        "the internal snapshots inside them through their own L1/L2 tables (the reader is "
        "in `bench/soak.py`, on `ecsnap.adapters.storage.qcow2meta`): ResetDisks leaves "
        "all three disks at the snapshot's data or all at their pre-rollback data, and when "
        "rolled back an accomplished safety group holds the pre-rollback data; a "
        "CreateSnapshotGroup makes at most one group, accomplished with a snapshot of every "
        "disk holding the data of the moment, or failed with none, and the disks are "
        "unchanged; a DeleteSnapshotGroup leaves the group whole (rows, internal snapshots "
        "and data) or entirely gone, and the disks unchanged; the base group the rollbacks "
        "return to keeps its data throughout; the instance stays Stopped;",
        "- for the running instance, also: the same QEMU process (pid) is running, its "
        "disks read unchanged while it runs, an accomplished group's snapshots hold the "
        "data, and the guest runs a Cloud Assistant command that writes to its root file "
        "system within 90 s (it would hang on a file system left frozen or a VM left "
        "paused). Half the trials take the group file-system-consistent (the guest agent "
        "freezes the file systems), half crash-consistent (the VM is paused).", "",
        f"The stopped kinds ran interleaved at random on {meta.get('stopped_worlds', 0)} "
        "data dirs, each a fresh `ecsnap serve` with one stopped instance (system disk + 2 "
        "data disks, 20 GiB qcow2 each), replaced every 40 trials. The running kind used "
        "one instance of the demo image (direct kernel boot, qemu-guest-agent) under TCG, "
        f"booted once ({meta.get('vm_boot_s', '-')} s to the agent answering) and kept "
        "running across every restart of ecsnap: the VM outlives the server.",
        "Before the first trial the checks were shown to fail on planted faults (one disk "
        "with other data: reported as a mix; an orphan internal snapshot made with "
        "`qemu-img snapshot -c`: reported by the invariants): " +
        ("both caught." if missed == [] else f"NOT caught: {missed}." if missed else
         "not run."), ""]
    if failed:
        lines += ["### Failed trials", ""]
        for t in failed:
            lines += [f"- trial {t.number}, {t.kind}: killed {t.delay_ms:.0f} ms after the "
                      f"request went out ({t.at_kill}; answered before the kill: "
                      f"{t.answered}); outcome {t.outcome}; evidence `{t.evidence}`:"]
            lines += [f"  - {p}" for p in t.problems]
        lines.append("")
    return lines


def concurrency_section(result: dict[str, Any]) -> list[str]:
    answers: list[Answer] = result["answers"]
    bad = [a for a in answers if a.bad]
    lines = [
        "## 2. Concurrency: conflicting calls from two tenants", "",
        f"**{result['rounds']} round(s) of {result['calls']} concurrent calls "
        f"({len(answers)} answers): {sum(1 for a in answers if a.status >= 500)} answered "
        f"5xx, {len(bad)} answers not a result or an ECS error; invariants broken after "
        f"{len(result['broken'])} rounds** (target: 0, 0, 0).", "",
        row("action", "tenant", "answer", "count"), row("---", "---", "---", "---")]
    for (action, tenant, code), n in sorted(Counter((a.action, a.tenant, a.code)
                                                    for a in answers).items()):
        lines.append(row(action, tenant, code, n))
    lines += ["", "The tasks the accepted calls started ended as:", "",
              row("task", "count"), row("---", "---")]
    lines += [row(k, v) for k, v in sorted(result["tasks"].items())]
    lines += [
        "", f"Method. A live `ecsnap serve`; tenant A (the admin account) holds "
        f"{result['instances']} instances of 3 disks (BIOS boot of a blank system disk: "
        "real QEMU processes, no guest), tenant B was made with `ecsnap account create` and "
        "`ecsnap accesskey create` in the data dir. Before each round every Stopped "
        "instance gets a new byte pattern on its disks and a snapshot group of it (at most "
        "4 groups kept per instance), and a deleted instance is replaced. Each round fires "
        f"{result['calls']} calls at once (each on its own connection, released together "
        "by a barrier): ResetDisks (to a group of the instance, a fifth with "
        "AutoStartInstance), DeleteSnapshotGroup, CreateSnapshotGroup, StopInstance "
        "(forced or not, either stopped mode), StartInstance and DeleteInstance (forced or "
        "not), weights 3:2:3:2:2:1, on instances drawn at random, 80% signed by tenant A "
        "and 20% by tenant B with the same IDs. After the round, once no task is "
        "Processing, the invariants of section 1 are checked, and the data: every live "
        "instance's disks, and every accomplished group's snapshots, hold one of the "
        "patterns written to that instance, all disks alike. Round times: " +
        ", ".join(f"{s:.1f}" for s in result["round_s"]) + " s.", ""]
    if result["broken"]:
        lines += ["### Failed rounds", ""]
        for number, problems, evidence in result["broken"]:
            lines.append(f"- round {number} (evidence `{evidence}`):")
            lines += [f"  - {p}" for p in problems]
        lines.append("")
    return lines


def fuzz_section(result: dict[str, Any], seed: int) -> list[str]:
    stats: FuzzStats = result["stats"]
    kinds = stats.failure_kinds
    five = sum(v for k, v in kinds.items() if k.startswith("HTTP 5"))
    lines = [
        "## 3. Fuzz: generated and malformed requests", "",
        f"**{stats.sent} requests in {result['seconds']:.0f} s: {five} answered 5xx, "
        f"{kinds['a traceback in the answer']} with a traceback, "
        f"{kinds['rejected']} rejected calls that changed state, "
        f"{kinds['accepted']} malformed requests accepted, "
        f"{kinds['an error without the ECS envelope']} errors without the ECS envelope, "
        f"{kinds['harness error']} errors of the fuzzer itself** (target: 0 each).", "",
        row("kind of request", "requests"), row("---", "---")]
    lines += [row(k, v) for k, v in sorted(stats.by_category.items())]
    lines += ["", row("answers (the ASGI-only requests apart, see below)", "count"),
              row("---", "---")]
    lines += [row(k, v) for k, v in sorted(stats.statuses.items())]
    lines += ["", "Validly signed requests per action (accepted: 2xx; rejected: an ECS "
              "error):", "", row("action", "accepted", "rejected"), row("---", "---", "---")]
    for action, counts in sorted(stats.valid.items()):
        lines.append(row(action, counts["accepted"], counts["rejected"]))
    lines += ["", "Most frequent answers: " + ", ".join(
        f"{code} {n}" for code, n in stats.codes.most_common(25)) + ".", ""]
    lines += [
        f"Method. In-process: the API app (`create_app`) called through ASGI on one event "
        "loop, so the query string, headers and body reach it byte for byte as generated; "
        "a real SQLite database and real qcow2 files, the compute double of "
        "`tests/doubles.py`, tasks inline. Two tenants, each kept with a running and a "
        "stopped instance and a snapshot group (re-made every 200 requests), an AccessKey "
        f"that is disabled. Hypothesis (seed {seed}) draws each request: 55% validly "
        f"signed requests of any of the {result['actions']} actions (RPC v1, a tenth "
        "ACS3-HMAC-SHA256; a seventh XML), each parameter of the action's table present "
        "or not and drawn mostly of its type and range, sometimes not (the table is read "
        "from `entrypoints/api/actions.py`: every `Params` accessor call of the action "
        "and of its helpers, with its kind, `required`, `min`/`max`, enum values, list and "
        "item fields), IDs mostly real (the tenant's own, the other tenant's, made-up), "
        "rollbacks often of one group's own snapshots; and 45% malformed: RPC v1 "
        "signature fields absent, garbled, duplicated, lower-cased, stale or skewed "
        "timestamps, bad timestamp formats, a wrong secret, a parameter changed after "
        "signing, replays, the disabled or an unknown key, long nonces, a POST signature "
        "sent as GET; ACS3 headers absent or garbled, body, query, action or host changed "
        "after signing, unsigned x-acs- headers, replays; raw query strings of random "
        "printable bytes, signed queries with `%`, `%G1`, `%FF`, `%ED%A0%80`, `&`, `=` "
        "inserted, unicode values, a 257 KiB query, 1001 parameters, 200 KB values, JSON "
        "nested 60,000 deep; parameters in a form body, garbage and multipart bodies, "
        "bodies over 1 MiB declared or streamed, 1000 form parameters; other methods and "
        "paths. Each answer must be below 500 with no traceback; an error on the API "
        "path must carry the ECS envelope (Code, Message, RequestId); a request that "
        "must be refused (bad signature, replay, oversize...) must be; and a rejected call "
        "must change nothing: every table but the signature nonces (spent by any verified "
        "request, by design) is dumped and compared before and after each call, with the "
        "double's VMs and the disk files' names, sizes and mtimes. Tables compared: " +
        ", ".join(result["tables"]) + ".", ""]
    if stats.failures:
        lines += ["### Failures", ""]
        for f in stats.failures:
            lines.append(f"- {f['category']} `{f['label']}` {f['method']} {f['path']}: "
                         f"{f['status']}, {'; '.join(f['problems'])}; query `"
                         f"{f['query'][:200]}`; answer `{f['body'][:200]}`")
        lines.append("")
    lines += [
        f"Beside these, {stats.asgi_only} requests carried bytes in the query string that "
        "no HTTP parser in front of the app lets through (outside 0x21-0x7e: raw UTF-8, "
        "0xFF, NUL, space; `ecsnap serve`'s uvicorn with httptools answers such a request "
        "line `400 Invalid HTTP request received.` itself, checked over a socket): "
        f"{sum(stats.asgi_kinds.values())} of their answers broke a rule above" +
        (": " + ", ".join(f"{k} {v}" for k, v in stats.asgi_kinds.items()) + "." if
         stats.asgi_kinds else "."), ""]
    if stats.asgi_findings:
        lines += [f"- {f['label']}: {f['status']}, {'; '.join(f['problems'])}; answer "
                  f"`{f['body'][:300]}`" for f in stats.asgi_findings[:5]]
        lines.append("")
    return lines


def merge_earlier(text: str, earlier: str) -> str:
    """The sections this run did not measure (a run with --only), and the hand-written
    notes, taken from the earlier report."""
    def sections(doc: str) -> tuple[str, dict[str, str]]:
        head, *parts = ("\n" + doc).split("\n## ")
        return head.strip("\n"), {("notes" if p.startswith(NOTES[3:]) else p.split(".")[0]):
                                  "## " + p.rstrip("\n") + "\n" for p in parts}

    head, new = sections(text)
    old_head, old = sections(earlier)
    when = next((line.removeprefix("Run on ").split(",", 1)[0]
                 for line in old_head.splitlines() if line.startswith("Run on ")), "unknown")
    for key, section in old.items():
        if key not in new:
            if key != "notes" and "From the run of" not in section:
                title, rest = section.split("\n", 1)
                section = f"{title}\n\nFrom the run of {when}, not run again in this one.\n{rest}"
            new[key] = section
    order = sorted(new, key=lambda k: (k == "notes", k))
    return head + "\n\n" + "\n".join(new[k] for k in order)


def report(args: argparse.Namespace, crash: tuple[list[Trial], dict[str, Any]] | None,
           concurrency: dict[str, Any] | None, fuzz: dict[str, Any] | None,
           took: dict[str, float]) -> str:
    lines = ["# ecsnap reliability: crash trials, concurrency, fuzz", "",
             f"Run on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {machine()}.",
             f"Command: `python -m bench.soak "
             f"{os.environ.get('ECSNAP_SOAK_COMMAND', ' '.join(args.argv))}` (seed "
             f"{args.seed}); times: " +
             ", ".join(f"{k} {v / 60:.1f} min" for k, v in took.items()) + ".",
             "Code under test: " + os.environ.get("ECSNAP_SOAK_CODE", "this tree as it was "
                                                  "during the run (--in-place)") + ".", ""]
    if crash is not None:
        lines += crash_section(*crash)
    if concurrency is not None:
        lines += concurrency_section(concurrency)
    if fuzz is not None:
        lines += fuzz_section(fuzz, args.seed)
    text = "\n".join(lines)
    if args.out and args.out.exists():
        text = merge_earlier(text, args.out.read_text())
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text.rstrip("\n") + "\n")
    return text


def failures(crash: tuple[list[Trial], dict[str, Any]] | None,
             concurrency: dict[str, Any] | None, fuzz: dict[str, Any] | None) -> int:
    count = 0
    if crash is not None:
        count += sum(1 for t in crash[0] if t.problems) + len(crash[1].get(
            "self_check_missed") or [])
    if concurrency is not None:
        count += len(concurrency["broken"])
    if fuzz is not None:
        count += sum(fuzz["stats"].failure_kinds.values())
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reset-trials", type=int, default=50)
    parser.add_argument("--group-trials", type=int, default=50)
    parser.add_argument("--delete-trials", type=int, default=50)
    parser.add_argument("--running-trials", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--instances", type=int, default=4)
    parser.add_argument("--fuzz", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--only", choices=("crash", "concurrency", "fuzz"), default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=None,
                        help="where the data dirs go (default: a new directory in /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny counts: proves the soak still runs (what make test runs)")
    parser.add_argument("--in-place", action="store_true",
                        help="run the code of this tree as it is (the default for --smoke); "
                        "else a copy of src/, bench/ and tests/ taken at the start is run, "
                        "so that edits made meanwhile do not land in the middle of the soak")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    if args.smoke:
        args.reset_trials, args.group_trials, args.delete_trials = 2, 2, 1
        args.running_trials, args.rounds, args.fuzz = 1, 1, 300
        args.in_place = True
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1, 10**6)
    made = args.work is None or not args.work.exists()  # only a dir made here is removed
    work = args.work or Path(tempfile.mkdtemp(prefix="ecsnap-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    if not args.in_place:
        return run_on_snapshot(args, work, made)
    rng = random.Random(args.seed)
    log(f"work dir {work}, seed {args.seed}")
    crash = concurrency = fuzz = None
    took: dict[str, float] = {}
    broken = 0
    try:
        if args.only in (None, "crash"):
            started = time.monotonic()
            crash = run_crash_trials(work, {
                "ResetDisks": args.reset_trials,
                "CreateSnapshotGroup (stopped)": args.group_trials,
                "DeleteSnapshotGroup": args.delete_trials,
                "CreateSnapshotGroup (running)": args.running_trials}, rng)
            took["crash trials"] = time.monotonic() - started
        if args.only in (None, "concurrency"):
            started = time.monotonic()
            concurrency = run_concurrency(work, args.rounds, args.calls, args.instances, rng)
            took["concurrency"] = time.monotonic() - started
        if args.only in (None, "fuzz"):
            started = time.monotonic()
            fuzz = run_fuzz(work, args.fuzz, args.seed)
            took["fuzz"] = time.monotonic() - started
    except BaseException:
        broken = 1  # the soak itself broke off: keep everything for a look
        raise
    finally:
        broken += failures(crash, concurrency, fuzz)
        if broken or args.keep or not made:
            log(f"kept the work dir {work} ({broken} failures)")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(report(args, crash, concurrency, fuzz, took))
    return 1 if broken else 0


def code_state(code: Path) -> str:
    """What code a run tests: the commit, the uncommitted changes, a digest of the copy."""
    import hashlib

    def git(*cmd: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *cmd], capture_output=True,
                              text=True).stdout.strip()

    digest = hashlib.sha256()
    for path in sorted(code.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(code)).encode() + b"\0" + path.read_bytes())
    changed = len(git("status", "--porcelain", "--", "src", "bench", "tests").splitlines())
    return (f"the working tree copied at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
            f"commit {git('rev-parse', '--short', 'HEAD') or 'unknown'} with {changed} "
            f"files of src/, bench/, tests/ changed or new, not committed (sha256 of the "
            f"copy {digest.hexdigest()[:16]})")


def run_on_snapshot(args: argparse.Namespace, work: Path, made: bool) -> int:
    """Copy src/, bench/ and tests/ into WORK/code and run the soak there (its ecsnap
    first on the import path, for the server processes too)."""
    code = work / "code"
    for part in ("src", "bench", "tests"):
        shutil.copytree(ROOT / part, code / part,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*cache*"))
    shutil.copy2(ROOT / "pyproject.toml", code / "pyproject.toml")
    inner = ["--reset-trials", str(args.reset_trials), "--group-trials", str(args.group_trials),
             "--delete-trials", str(args.delete_trials), "--running-trials",
             str(args.running_trials), "--rounds", str(args.rounds), "--calls",
             str(args.calls), "--instances", str(args.instances), "--fuzz", str(args.fuzz),
             "--seed", str(args.seed), "--in-place", "--work", str(work / "run")]
    if args.only:
        inner += ["--only", args.only]
    if args.out:
        inner += ["--out", str(args.out.resolve())]
    env = {**os.environ, "PYTHONPATH": str(code / "src"),
           "ECSNAP_SOAK_CODE": code_state(code),
           "ECSNAP_SOAK_COMMAND": " ".join(args.argv),
           "ECSNAP_TEST_CACHE": os.environ.get("ECSNAP_TEST_CACHE") or str(ROOT / ".cache")}
    log(f"running on a copy of the code in {code}")
    rc = subprocess.run([sys.executable, "-m", "bench.soak", *inner], cwd=code,
                        env=env).returncode
    if rc == 0 and made and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        log(f"kept {work}")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
