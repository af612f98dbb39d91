"""Guest-side benchmarks 4 and 6: what a running guest feels of ecsnap's snapshots.

Everything runs on real instances of the demo image (real QEMU VM, real kernel, real
qemu-guest-agent; 1 vCPU, 512 MiB), created, snapshotted and started through ecsnap's
service functions in this process (the same functions the API calls), on a fresh data
directory, one instance at a time: for benchmark 4 a system disk and two ext4 data disks
(mounted by the guest at /mnt/<disk id>); for benchmark 6 four unformatted data disks and
a raw-format reference disk hot-plugged through QMP (ecsnap itself only attaches qcow2).

  4. Live snapshot of a running instance. A writer in the guest does 4 KiB O_DIRECT
     writes back to back into a file on a data disk; after each completed write it sends
     one byte to the serial console, which the host reads from QEMU's console socket and
     timestamps with the host clock. Each writer run has three equal phases: (a) nothing
     (the reference: the longest gap between writes with no snapshot), (b) an instance
     snapshot through ecsnap (`snapshots.create_snapshot_group` on the Running instance,
     all three disks; quiesce on = freeze -> transaction -> thaw through
     the agent, or quiesce off = the pause fallback, QMP stop -> transaction -> cont,
     the same code the driver runs when the agent does not answer), (c) a bare QMP
     `transaction` of `blockdev-snapshot-internal-sync` on the same three disks, sent
     straight through `qemu.qmp` (the reference for the transaction time).
     The stall reported is the longest gap between two write completions as seen by the
     HOST (each gap counts for the phase it overlaps most). The writer also keeps the
     guest's own CLOCK_MONOTONIC time of every write; that in-guest figure is shown too,
     but it is blind to most of the pause fallback: under QMP `stop` the guest's clocks
     stop as well (the guest TSC runs on QEMU's virtual clock, which does not run while
     the VM is stopped), so the guest does not see the time it spent paused (measured:
     a 1.7 s pause showed as a 42 ms gap inside the guest). The host clock sees both
     paths, hence it is the one reported against the target. ecsnap's own breakdown
     (the freeze, transaction, thaw, stop and cont commands) is what the driver reports
     to its live-snapshot observer (each QMP and agent command of the snapshot with its
     round-trip time); the window is the driver's `window_ms`.
  6. Guest I/O cost of snapshots. Four qcow2 data disks carry 0, 1, 10 and 50 internal
     snapshots (taken through ecsnap's `snapshots.create_snapshot` on the stopped
     instance, after the measured regions were written from the host with `qemu-io`, so
     every measured cluster is shared with the snapshots and its first write in the guest
     copies it); the raw reference disk has the same regions written. In the guest,
     on the bare block devices (no file system, O_DIRECT): sequential 1 MiB writes over a
     region then fdatasync (MB/s), and random 4 KiB writes at queue depth 1 for a fixed
     time over another region then fdatasync (IOPS, same random sequence everywhere).
     Each repeat uses fresh regions (never written since the snapshots), the disks in a
     rotating order; ratios are per repeat (qcow2 / raw of the same repeat), then the
     median and min-max of those.

The guest writer is a small static C program (bench/guest_tools/ecsnap-bench-io.c),
compiled on the host (`gcc -static`, Debian packages gcc and libc6-dev) and copied into
the guest's /run through the agent (`guest-file-write`). It was chosen over a busybox
loop (a process per write: far too slow and coarse under TCG) and over fio (its Debian
package brings a dozen shared libraries and its own timing model; the demo image would
need to change): one process, microsecond clock, nothing to install in the guest.

Usage: python -m bench.guest [--smoke] [--repeats N] [--only 4|6]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ecsnap.adapters.compute.qemu import LiveSnapshotTiming

ROOT = Path(__file__).parents[1]
TOOL_SOURCE = Path(__file__).parent / "guest_tools" / "ecsnap-bench-io.c"
GUEST_TOOL = "/run/ecsnap-bench-io"
REGION = "local-1"
MIB = 1024**2
MARK = ord("|")
SNAPSHOT_COUNTS = (0, 1, 10, 50)
RAW_SERIAL = "rawref"
REGION_BASE = 64 * MIB  # bench 6 regions start here; the head holds a non-file-system mark
TRANSACTION_TARGET_MS = 20.0
STALL_TARGET_MS = 200.0


@dataclass
class Plan:
    repeats: int
    phase_s: float  # bench 4: length of each phase of a writer run
    warmup_s: float
    seq_mib: int  # bench 6: sequential region per repeat
    rand_mib: int  # bench 6: random-write region per repeat
    rand_s: float

    @classmethod
    def for_run(cls, repeats: int, smoke: bool) -> Plan:
        if smoke:
            return cls(repeats=1, phase_s=0.6, warmup_s=0.3, seq_mib=4, rand_mib=4, rand_s=0.3)
        return cls(repeats=repeats, phase_s=2.0, warmup_s=1.0, seq_mib=64, rand_mib=64,
                   rand_s=2.0)


@dataclass
class Samples:
    values: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.values.append(value)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    def spread(self, fmt: str = "{:.1f}") -> str:
        if not self.values:
            return "-"
        return f"{fmt.format(min(self.values))}-{fmt.format(max(self.values))}"


def row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def log(message: str) -> None:
    print(f"bench guest: {message}", file=sys.stderr, flush=True)


def sh(*cmd: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {(proc.stderr or proc.stdout).strip()[-1000:]}")
    return proc.stdout


# ---------------------------------------------------------------- instrumentation

class SnapshotTimings:
    """The driver's live-snapshot observer: keeps, while recording, the LiveSnapshotTiming
    of each snapshot the driver takes (each QMP and agent command with its time)."""

    def __init__(self) -> None:
        self.timings: list[LiveSnapshotTiming] = []
        self.enabled = False

    def __call__(self, timing: LiveSnapshotTiming) -> None:
        if self.enabled:
            self.timings.append(timing)

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[LiveSnapshotTiming]]:
        self.timings = []
        self.enabled = True
        try:
            yield self.timings
        finally:
            self.enabled = False

    @staticmethod
    def total(timings: list[LiveSnapshotTiming], *names: str) -> float:
        return sum(t.total_ms(*names) for t in timings)


# ---------------------------------------------------------------- the serial console

class ConsoleWatch:
    """Reads the VM's serial console socket on a thread; timestamps (host clock) every
    chunk that holds write marks, with the running count of marks."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.lock = threading.Lock()
        self.arrivals: list[tuple[float, int]] = []
        self.count = 0
        self.tail = b""
        self.ended: int | None = None
        self.closed = False
        self.thread = threading.Thread(target=self._read, name="bench-console", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self.closed:
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                return
            now = time.perf_counter()
            if not chunk:
                return
            with self.lock:
                marks = chunk.count(MARK)
                if marks:
                    self.count += marks
                    self.arrivals.append((now, self.count))
                self.tail = (self.tail + chunk)[-256:]
                if self.ended is None and b"END " in self.tail:
                    words = self.tail.split(b"END ", 1)[1].split(b"\n", 1)
                    if len(words) == 2 and words[0].strip().isdigit():
                        self.ended = int(words[0])

    def reset(self) -> None:
        with self.lock:
            self.arrivals, self.count, self.tail, self.ended = [], 0, b"", None

    def wait(self, name: str, timeout: float) -> None:
        """Wait for the writer's first write ("start") or its END mark ("end")."""
        deadline = time.monotonic() + timeout
        while not (self.count > 0 if name == "start" else self.ended is not None):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the guest writer: no {name} in {timeout:.0f} s")
            time.sleep(0.01)

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)


def phase_stalls(arrivals: list[tuple[float, int]], stamps: list[int],
                 phases: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """Per phase (name -> host start, end): the longest gap between two successive write
    completions by the host clock (console arrivals) and by the guest clock (the
    writer's own stamps, us), in seconds. Each gap counts for the one phase it overlaps
    most, so a stall that begins a moment before a phase starts is still that phase's."""
    host_at: list[float] = []  # host arrival time of each write, in order
    for t, count in arrivals:
        host_at.extend([t] * (count - len(host_at)))
    longest = {name: [0.0, 0.0] for name in phases}
    for i in range(1, len(host_at)):
        start, end = host_at[i - 1], host_at[i]
        best, overlap = "", -1.0
        for name, (p0, p1) in phases.items():
            o = min(end, p1) - max(start, p0)
            if o >= 0 and o > overlap:
                best, overlap = name, o
        if not best:
            continue
        longest[best][0] = max(longest[best][0], end - start)
        if i < len(stamps):
            longest[best][1] = max(longest[best][1], (stamps[i] - stamps[i - 1]) / 1e6)
    return {name: (host, guest) for name, (host, guest) in longest.items()}


# ---------------------------------------------------------------- the lab

class GuestLab:
    """A fresh ecsnap data dir and instances of the demo image, one running at a time;
    `close` stops every VM started here (QEMU quit, else SIGKILL by its pid)."""

    def __init__(self, work: Path, plan: Plan) -> None:
        from ecsnap import bootstrap, config
        from ecsnap.adapters.compute.qemu import QemuDriver
        from ecsnap.service import images, setup

        self.work = work
        self.plan = plan
        self.data_dir = work / "guest"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cache = os.environ.get("ECSNAP_CACHE_DIR") or os.environ.get("ECSNAP_TEST_CACHE") or \
            str(ROOT / ".cache")
        self.accel = os.environ.get("ECSNAP_ACCEL", "tcg")
        settings = config.load(self.data_dir, accel=self.accel, cache=cache, crash_at="",
                               database_url=f"sqlite:///{self.data_dir / 'ecsnap.db'}",
                               background_tasks=False, region_vcpus=64,
                               region_memory_mib=65536)
        self.timings = SnapshotTimings()
        # the driver bootstrap would build, with an observer of its live snapshots
        self.driver = QemuDriver(settings.run_dir, accel=settings.accel,
                                 snapshot_observer=self.timings)
        self.ctx = bootstrap.build(settings, compute=self.driver, background=False)
        self.account_id = setup.initialise(self.ctx, REGION).account.id
        self.instance_id = ""  # the current instance
        self.instances: list[str] = []
        self.accelerator = ""
        self.console: ConsoleWatch | None = None
        self.tool = self._compile()
        log("building (or reusing) the demo image")
        self.image_id = images.build_demo_image(self.ctx, REGION).id
        self.raw_path = work / "raw-reference.img"

    # ---------------------------------------------------------------- set-up

    def _compile(self) -> Path:
        out = self.work / "ecsnap-bench-io"
        if not shutil.which("gcc"):
            raise RuntimeError("the guest benchmarks compile their guest tool with gcc: "
                               "apt-get install gcc libc6-dev")
        sh("gcc", "-O2", "-static", "-s", "-o", str(out), str(TOOL_SOURCE))
        return out

    def _create(self, name: str, data_disks: int) -> list[str]:
        """A new stopped instance of the demo image; its disk IDs, system disk first."""
        from ecsnap.service import instances
        from ecsnap.service.context import attached_disks

        req = instances.InstanceRequest(
            image_id=self.image_id, instance_type="ecs.t5-lc2m1.nano", name=name,
            data_disks=[instances.DataDiskSpec(size_gib=20) for _ in range(data_disks)])
        [self.instance_id] = instances.run_instances(self.ctx, self.account_id, REGION, req,
                                                     start=False)
        self.instances.append(self.instance_id)
        with self.ctx.uow() as uow:
            disks = attached_disks(uow, self.instance_id)
            storage = self.ctx.storage(uow, REGION)
            self.paths = {d.id: storage.path(d.id) for d in disks}
        return [d.id for d in disks]

    def _start(self) -> None:
        """Start the current instance and wait for its agent; copy the tool in."""
        from ecsnap.service import instances

        started = time.monotonic()
        self._task_done(instances.start_instance(self.ctx, self.account_id,
                                                 self.instance_id))
        while not self.driver.guest_ping(self.instance_id, timeout=2):
            if not self.driver.state(self.instance_id).running:
                raise RuntimeError("the VM died while booting")
            if time.monotonic() - started > 180:
                raise RuntimeError("the guest agent did not answer in 180 s")
        self.accelerator = self.driver.state(self.instance_id).accelerator
        log(f"{self.instance_id} up in {time.monotonic() - started:.1f} s ({self.accelerator})")
        self._upload(self.tool, GUEST_TOOL)
        self.run(f"chmod 755 {GUEST_TOOL}")

    def stop_vm(self) -> None:
        """Power the current instance's VM off (QEMU quit, then its pid killed)."""
        if self.instance_id and self.driver.state(self.instance_id).running:
            self.driver.stop(self.instance_id, force=True)

    def setup_live(self) -> None:
        """Benchmark 4's instance: system disk + 2 ext4 data disks, running."""
        ids = self._create("bench-live", 2)
        self.system, self.stall_disks = ids[0], ids[1:3]
        self._start()
        for disk_id in self.stall_disks:
            self.run(f"/sbin/ecsnap-mount-disks --wait {disk_id.removeprefix('d-')} 60",
                     timeout=90)

    def setup_io(self) -> None:
        """Benchmark 6's instance: 4 data disks with their regions written and 0, 1, 10
        and 50 snapshots taken, running, with the raw reference disk hot-plugged."""
        from ecsnap.service import snapshots

        ids = self._create("bench-io", len(SNAPSHOT_COUNTS))
        self.by_count = dict(zip(SNAPSHOT_COUNTS, ids[1:], strict=True))
        # mark the head (so the guest neither formats nor mounts the disk), write every
        # region, then take the snapshots
        sh("qemu-img", "create", "-q", "-f", "raw", str(self.raw_path), "20G")
        started = time.monotonic()
        for disk_id in self.by_count.values():
            self._fill(self.paths[disk_id], "qcow2")
        self._fill(str(self.raw_path), "raw")
        log(f"wrote the regions of 5 disks in {time.monotonic() - started:.1f} s")
        started = time.monotonic()
        for count, disk_id in self.by_count.items():
            for _ in range(count):
                snapshots.create_snapshot(self.ctx, self.account_id, disk_id)
        log(f"took {sum(SNAPSHOT_COUNTS)} snapshots through ecsnap in "
            f"{time.monotonic() - started:.1f} s")
        self._check_snapshot_counts()
        self._start()
        self._hotplug_raw()
        self.devices = self._devices()

    def _regions(self) -> list[tuple[int, int, int]]:
        """(seq offset, rand offset, _) of every repeat's fresh regions."""
        p = self.plan
        stride = (p.seq_mib + p.rand_mib) * MIB
        return [(REGION_BASE + r * stride, REGION_BASE + r * stride + p.seq_mib * MIB, 0)
                for r in range(p.repeats)]

    def _fill(self, path: str, fmt: str) -> None:
        cmds = ["-c", f"write -q -P 0x5a 0 {4 * MIB}"]
        for r, (seq_at, rand_at, _) in enumerate(self._regions()):
            cmds += ["-c", f"write -q -P {0x61 + r % 16} {seq_at} {self.plan.seq_mib * MIB}",
                     "-c", f"write -q -P {0x71 + r % 16} {rand_at} {self.plan.rand_mib * MIB}"]
        sh("qemu-io", "-f", fmt, *cmds, path)
        # on disk before anything is measured: no writeback of the fill behind the figures
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _check_snapshot_counts(self) -> None:
        from ecsnap.service.disk_files import INITIAL

        for count, disk_id in self.by_count.items():
            info = json.loads(sh("qemu-img", "info", "-U", "--output=json",
                                 self.paths[disk_id]))
            # every ecsnap disk also has the snapshot its creation took (INITIAL, of the
            # blank disk): it shares none of the regions, which were written after it
            found = [s["name"] for s in info.get("snapshots", []) if s["name"] != INITIAL]
            if len(found) != count:
                raise RuntimeError(f"{disk_id} has {len(found)} snapshots, expected {count}")

    def _task_done(self, task_id: str) -> dict[str, Any]:
        from ecsnap.domain.model import TaskStatus

        task = self.ctx.runner.wait(task_id)
        if task.status != TaskStatus.FINISHED:
            raise RuntimeError(f"task {task_id} {task.action}: {task.status} "
                               f"{task.error_code} {task.error_message}")
        return dict(task.result)

    def run(self, command: str, timeout: float = 120) -> str:
        result = self.driver.guest_exec(self.instance_id, command, timeout=timeout,
                                        working_dir="/")
        if result.exit_code != 0:
            raise RuntimeError(f"guest command {command!r}: exit {result.exit_code}: "
                               f"{result.stderr.decode(errors='replace')[-500:]}")
        return str(result.stdout.decode(errors="replace"))

    def _upload(self, source: Path, target: str) -> None:
        data = source.read_bytes()
        agent = self.driver.agent_command  # the agent's file handles outlive a session
        handle = agent(self.instance_id, "guest-file-open", {"path": target, "mode": "w"})
        try:
            for at in range(0, len(data), 48 * 1024):
                chunk = base64.b64encode(data[at:at + 48 * 1024]).decode()
                agent(self.instance_id, "guest-file-write", {"handle": handle, "buf-b64": chunk},
                      timeout=30)
        finally:
            agent(self.instance_id, "guest-file-close", {"handle": handle})

    def _qmp(self, commands: list[tuple[str, dict[str, Any]]]) -> list[tuple[Any, float]]:
        """Commands straight through qemu.qmp (a session of our own, no ecsnap code in
        the way): each one's return value and its time in ms."""
        from qemu.qmp import QMPClient

        async def session(sock: str) -> list[tuple[Any, float]]:
            client = QMPClient("ecsnap-bench")
            await client.connect(sock)
            out = []
            try:
                for name, args in commands:
                    start = time.perf_counter()
                    value = await client.execute(name, args)
                    out.append((value, (time.perf_counter() - start) * 1000))
            finally:
                await client.disconnect()
            return out

        with self.driver.borrow_qmp_socket(self.instance_id) as sock:
            return asyncio.run(session(sock))

    def _hotplug_raw(self) -> None:
        pci = self._qmp([("query-pci", {})])[0][0]
        ports = sorted((str(d["qdev_id"]) for bus in pci for d in bus.get("devices", [])
                        if d.get("pci_bridge") is not None and d.get("qdev_id")
                        and not d["pci_bridge"].get("devices")), key=lambda p: (len(p), p))
        if not ports:
            raise RuntimeError("no free PCIe root port for the raw reference disk")
        self._qmp([("blockdev-add", {"driver": "file", "node-name": "f-rawref",
                                     "filename": str(self.raw_path), "discard": "unmap"}),
                   ("blockdev-add", {"driver": "raw", "node-name": "rawref",
                                     "file": "f-rawref", "discard": "unmap"}),
                   ("device_add", {"driver": "virtio-blk-pci", "drive": "rawref",
                                   "id": "dev-rawref", "serial": RAW_SERIAL,
                                   "bus": ports[0]})])

    def _devices(self) -> dict[str, str]:
        """serial -> /dev/vdX in the guest (waiting for the hot-plugged raw disk)."""
        wanted = {RAW_SERIAL, *(d.removeprefix("d-")[:20] for d in self.by_count.values())}
        deadline = time.monotonic() + 60
        while True:
            out = self.run("for d in /sys/block/vd*; do echo ${d##*/} $(cat $d/serial); "
                           "[ -b /dev/${d##*/} ] || mknod /dev/${d##*/} b "
                           "$(tr ':' ' ' < $d/dev); done")
            found = {words[1]: f"/dev/{words[0]}" for line in out.splitlines()
                     if len(words := line.split()) == 2}
            if wanted <= found.keys():
                return found
            if time.monotonic() > deadline:
                raise RuntimeError(f"the guest lacks disks {wanted - found.keys()}")
            time.sleep(0.5)

    # ---------------------------------------------------------------- benchmark 4

    def bench_live_snapshot(self) -> dict[str, dict[str, Samples]]:
        from ecsnap.service import snapshots

        p = self.plan
        run_dir = Path(self.driver.state(self.instance_id).extra["run_dir"])
        self.console = ConsoleWatch(str(run_dir / "serial.sock"))
        target = f"/mnt/{self.stall_disks[0]}/ecsnap-stall.dat"
        self.run(f"dd if=/dev/zero of={target} bs=1M count=4 2>/dev/null && sync")
        disks = [self.system, *self.stall_disks]
        results: dict[str, dict[str, Samples]] = {}
        for r in range(p.repeats):
            methods = ("fsfreeze", "pause") if r % 2 == 0 else ("pause", "fsfreeze")
            for method in methods:
                log(f"bench 4: repeat {r + 1}/{p.repeats}, {method}")
                out = results.setdefault(method, {})
                console = self.console
                console.reset()
                flush_ms = host_flush_ms(self.data_dir)
                seconds = p.warmup_s + 3 * p.phase_s + 0.5
                self.run(f"rm -f /run/stall.out; {GUEST_TOOL} stall {target} {seconds} "
                         "/dev/ttyS0 /run/stall.out >/run/stall.log 2>&1 </dev/null &")
                console.wait("start", 30)
                time.sleep(p.warmup_s)
                t0 = time.perf_counter()
                time.sleep(p.phase_s)
                t1 = time.perf_counter()
                with self.timings.recording() as timings:
                    group_id, task_id = snapshots.create_snapshot_group(
                        self.ctx, self.account_id, REGION, self.instance_id, disk_ids=disks,
                        name=f"bench-{r}-{method}", quiesce=method == "fsfreeze")
                    result = self._task_done(task_id)
                if result.get("method") != method:
                    raise RuntimeError(f"asked for {method}, the driver did "
                                       f"{result.get('method')}: {result}")
                time.sleep(max(0.0, t1 + p.phase_s - time.perf_counter()))
                t2 = time.perf_counter()
                names = [f"bare-{r}-{method}-{n}" for n in range(len(disks))]
                [(_, bare_ms)] = self._qmp([("transaction", {"actions": [
                    {"type": "blockdev-snapshot-internal-sync",
                     "data": {"device": d, "name": name}}
                    for d, name in zip(disks, names, strict=True)]})])
                time.sleep(max(0.0, t2 + p.phase_s - time.perf_counter()))
                t3 = time.perf_counter()
                console.wait("end", 60 + seconds)
                stamps = [int(x) for x in self.run("cat /run/stall.out").split()]
                with console.lock:
                    arrivals = list(console.arrivals)
                stalls = phase_stalls(arrivals, stamps, {"ref": (t0, t1), "snap": (t1, t2),
                                                         "bare": (t2, t3)})
                m = {"window": float(result["window_ms"]),
                     "transaction": SnapshotTimings.total(timings, "transaction"),
                     "freeze": SnapshotTimings.total(timings, "guest-fsfreeze-freeze"),
                     "thaw": SnapshotTimings.total(timings, "guest-fsfreeze-thaw",
                                                   "guest-fsfreeze-status"),
                     "stop": SnapshotTimings.total(timings, "stop"),
                     "cont": SnapshotTimings.total(timings, "cont", "query-status"),
                     "bare": bare_ms,
                     "stall_ref": stalls["ref"][0] * 1000,
                     "stall_snap": stalls["snap"][0] * 1000,
                     "stall_bare": stalls["bare"][0] * 1000,
                     "gstall_ref": stalls["ref"][1] * 1000,
                     "gstall_snap": stalls["snap"][1] * 1000,
                     "writes_per_s": _rate(arrivals, t0, t1),
                     "host_flush": flush_ms}
                m["window_ratio"] = m["window"] / m["bare"]
                m["transaction_ratio"] = m["transaction"] / m["bare"]
                m["stall_ratio"] = m["stall_snap"] / max(1e-3, m["stall_ref"])
                m["gstall_ratio"] = m["gstall_snap"] / max(1e-3, m["gstall_ref"])
                for key, value in m.items():
                    out.setdefault(key, Samples()).add(value)
                log("bench 4: " + ", ".join(f"{k} {v:.1f}" for k, v in m.items()))
                snapshots.delete_snapshot_group(self.ctx, self.account_id, REGION, group_id)
                self._qmp([("blockdev-snapshot-delete-internal-sync",
                            {"device": d, "name": name})
                           for d, name in zip(disks, names, strict=True)])
        self.console.close()
        self.console = None
        return results

    # ---------------------------------------------------------------- benchmark 6

    def bench_guest_io(self) -> dict[str, dict[str, Samples]]:
        p = self.plan
        targets = [("raw", RAW_SERIAL)] + [(str(n), d.removeprefix("d-")[:20])
                                           for n, d in self.by_count.items()]
        out: dict[str, dict[str, Samples]] = {name: {"seq": Samples(), "rand": Samples()}
                                              for name, _ in targets}
        ratios: dict[str, dict[str, Samples]] = {}
        for r, (seq_at, rand_at, _) in enumerate(self._regions()):
            log(f"bench 6: repeat {r + 1}/{p.repeats}")
            order = targets[r % len(targets):] + targets[:r % len(targets)]
            this: dict[str, dict[str, float]] = {name: {} for name, _ in targets}
            for name, serial in order:
                words = dict(w.split("=") for w in self.run(
                    f"{GUEST_TOOL} seq {self.devices[serial]} {seq_at} "
                    f"{p.seq_mib * MIB}").split()[1:])
                this[name]["seq"] = int(words["bytes"]) / MIB / float(words["seconds"])
            for name, serial in order:
                words = dict(w.split("=") for w in self.run(
                    f"{GUEST_TOOL} rand {self.devices[serial]} {rand_at} "
                    f"{p.rand_mib * MIB} {p.rand_s} {1234 + r}").split()[1:])
                this[name]["rand"] = int(words["ops"]) / float(words["seconds"])
            for name, _ in targets:
                for kind in ("seq", "rand"):
                    out[name][kind].add(this[name][kind])
                    ratios.setdefault(name, {}).setdefault(kind, Samples()).add(
                        this[name][kind] / this["raw"][kind])
        for name in out:
            out[name].update({f"{k}_ratio": v for k, v in ratios[name].items()})
        return out

    # ---------------------------------------------------------------- tear-down

    def close(self) -> None:
        if self.console is not None:
            with contextlib.suppress(Exception):
                self.console.close()
        try:
            for instance_id in self.instances:
                with contextlib.suppress(Exception):
                    self.driver.stop(instance_id, force=True)
        finally:
            # whatever QEMU of this data dir still runs: kill it by its pid
            for pidfile in (self.data_dir / "run").glob("*/qemu.pid"):
                with contextlib.suppress(ValueError, OSError):
                    instance_id = pidfile.parent.name
                    pid = self.driver.pid(instance_id)
                    if pid is not None:
                        os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                self.ctx.runner.shutdown()
            with contextlib.suppress(Exception):
                self.ctx.extras["engine"].dispose()


def host_flush_ms(folder: Path, samples: int = 5) -> float:
    """Context: the host's 4 KiB write + fdatasync latency (ms, median) where the disks
    are, since every snapshot and every guest flush waits for such flushes."""
    path = folder / "flush-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    times = []
    try:
        for n in range(samples):
            start = time.perf_counter()
            os.pwrite(fd, bytes([n]) * 4096, 0)
            os.fdatasync(fd)
            times.append((time.perf_counter() - start) * 1000)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return statistics.median(times)


def _repeats(plan: Plan) -> str:
    return f"{plan.repeats} repeat{'s' if plan.repeats != 1 else ''}"


def _rate(arrivals: list[tuple[float, int]], start: float, end: float) -> float:
    inside = [(t, n) for t, n in arrivals if start <= t <= end]
    if len(inside) < 2:
        return 0.0
    return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


# ---------------------------------------------------------------- the report

def live_section(res: dict[str, dict[str, Samples]], plan: Plan) -> list[str]:
    lines = ["## 4. Live snapshot of a running instance: guest I/O pause, under a "
             "continuous guest writer", "",
             row("figure", "path", "ecsnap median", "ecsnap spread", "reference",
                 "reference median", "reference spread", "ratio (median, spread)", "target",
                 "met"),
             row(*["---"] * 10)]

    def line(label: str, method: str, ours: str, ref: str, ratio: str, reference: str,
             target: float | None) -> str:
        s = res[method]
        met = "-" if target is None else ("yes" if s[ours].median <= target else "no")
        return row(label, method, f"{s[ours].median:.1f} ms", f"{s[ours].spread()} ms",
                   reference, f"{s[ref].median:.1f} ms", f"{s[ref].spread()} ms",
                   f"{s[ratio].median:.2f} ({s[ratio].spread('{:.2f}')})",
                   "-" if target is None else f"≤ {target:.0f} ms", met)

    for method in ("fsfreeze", "pause"):
        if method not in res:
            continue
        lines += [
            line("QMP `transaction` inside ecsnap's window", method, "transaction", "bare",
                 "transaction_ratio", "bare QMP `transaction`, same 3 disks",
                 TRANSACTION_TARGET_MS),
            line("guest I/O window (driver's `window_ms`: "
                 + ("freeze → transaction → thaw" if method == "fsfreeze"
                    else "stop → transaction → cont") + ")", method, "window", "bare",
                 "window_ratio", "bare QMP `transaction`, same 3 disks", None),
            line("longest write stall, host clock", method, "stall_snap", "stall_ref",
                 "stall_ratio", "same writer, equal period, no snapshot", STALL_TARGET_MS),
            line("longest write stall, guest clock", method, "gstall_snap", "gstall_ref",
                 "gstall_ratio", "same writer, equal period, no snapshot", None)]
    lines.append("")
    parts = []
    for method in ("fsfreeze", "pause"):
        if method not in res:
            continue
        s = res[method]
        steps = ("freeze", "transaction", "thaw") if method == "fsfreeze" else \
            ("stop", "transaction", "cont")
        parts.append(f"{method}: " + ", ".join(f"{k} {s[k].median:.1f} ms" for k in steps)
                     + f"; a bare transaction stalls the writer {s['stall_bare'].median:.1f} ms"
                     f" ({s['stall_bare'].spread()} ms); writer "
                     f"{s['writes_per_s'].median:.0f} writes/s; host write + fdatasync "
                     f"{s['host_flush'].median:.1f} ms ({s['host_flush'].spread()} ms)")
    lines += ["ecsnap's steps (medians, each QMP / agent command as ecsnap issued it): "
              + "; ".join(parts) + ".", "",
              f"Method: {_repeats(plan)} per path, the paths alternating (met: on the "
              "median). A static C "
              "writer in the guest does 4 KiB O_DIRECT writes back to back into a file on "
              "an ext4 data disk and sends a byte to the serial console after each; each "
              f"run has three {plan.phase_s:g} s phases: nothing (reference), an instance "
              "snapshot through ecsnap (`create_snapshot_group`, all 3 disks of the instance: "
              "system + 2 ext4 data disks; "
              "fsfreeze = quiesce on, pause = quiesce off, the fallback the driver takes "
              "when the agent does not answer), and a bare QMP `transaction` through "
              "`qemu.qmp` on the same disks. The stall is the longest gap between write "
              "completions overlapping the phase; the host clock (console bytes "
              "timestamped on arrival) is the one held against the target, because under "
              "QMP `stop` the guest's clocks stop too, so the guest clock cannot see a "
              "pause. The transaction target is checked on the `transaction` command inside "
              "ecsnap's window; ratios are per run (ecsnap / reference), median and "
              "min-max.", ""]
    return lines


def io_section(res: dict[str, dict[str, Samples]], plan: Plan) -> list[str]:
    lines = ["## 6. Guest I/O cost of snapshots: writes into clusters shared with 0, 1, 10 "
             "and 50 internal snapshots vs a raw disk", "",
             row("workload", "snapshots on the qcow2 disk", "qcow2 median", "qcow2 spread",
                 "raw median", "raw spread", "ratio to raw (median, spread)", "target",
                 "met"),
             row(*["---"] * 9)]
    raw = res["raw"]
    for kind, unit, fmt in (("seq", "MB/s", "{:.1f}"), ("rand", "IOPS", "{:.0f}")):
        label = f"sequential 1 MiB writes, {plan.seq_mib} MiB + fdatasync" if kind == "seq" \
            else f"random 4 KiB writes, QD1, {plan.rand_s:g} s over {plan.rand_mib} MiB"
        for count in SNAPSHOT_COUNTS:
            s = res[str(count)]
            lines.append(row(label, count, f"{fmt.format(s[kind].median)} {unit}",
                             f"{s[kind].spread(fmt)} {unit}",
                             f"{fmt.format(raw[kind].median)} {unit}",
                             f"{raw[kind].spread(fmt)} {unit}",
                             f"{s[kind + '_ratio'].median:.2f} "
                             f"({s[kind + '_ratio'].spread('{:.2f}')})",
                             "none in the issue", "-"))
    lines += ["", f"Method: {_repeats(plan)}; one guest, the four qcow2 data disks "
              "(ecsnap disks, snapshots taken through `create_snapshot` on the stopped "
              "instance after the regions were written from the host; each disk also holds "
              "the `ecsnap-initial` snapshot ecsnap takes of the blank disk when it creates "
              "it, which shares none of the measured clusters) and a raw-format "
              "reference disk hot-plugged on the same guest, the same regions written on "
              "it. Writes go to the bare block devices with O_DIRECT; every repeat uses "
              "regions not written since the snapshots, so each first write of a 64 KiB "
              "cluster copies it; disks in a rotating order; the ratio is qcow2 / raw of "
              "the same repeat (higher is better, 1.00 = as fast as raw). Guest clock "
              "(the VM is never paused here).", ""]
    return lines


def run_guest_benchmarks(work: Path, *, repeats: int, smoke: bool,
                         only: str | None = None) -> list[str]:
    """Benchmarks 4 and 6 (or `only` "4" or "6") on one real guest under `work`; the
    report's markdown lines."""
    plan = Plan.for_run(repeats, smoke)
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    lab = GuestLab(work, plan)
    try:
        live: dict[str, dict[str, Samples]] = {}
        io: dict[str, dict[str, Samples]] = {}
        if only != "6":
            lab.setup_live()
            live = lab.bench_live_snapshot()
            lab.stop_vm()
        if only != "4":
            lab.setup_io()
            io = lab.bench_guest_io()
            lab.stop_vm()
        accel = lab.accelerator
    finally:
        lab.close()
    setup = (f"Real VMs of the demo image (1 vCPU, 512 MiB, {accel.upper()}), real guest "
             "agent, through ecsnap's service functions.")
    # the line goes under each section's heading, so that each section stands on its own
    return [*(_under_heading(live_section(live, plan), setup) if live else []),
            *(_under_heading(io_section(io, plan), setup) if io else [])]


def _under_heading(section: list[str], line: str) -> list[str]:
    return [*section[:2], line, "", *section[2:]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true",
                        help="everything once, smallest settings: proves the code still runs")
    parser.add_argument("--only", choices=("4", "6"), default=None,
                        help="run only benchmark 4 or 6")
    args = parser.parse_args(argv)
    # a SIGTERM ends the run through the `finally` blocks, which stop the VM
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="ecsnap-bg-") as tmp:
        lines = run_guest_benchmarks(Path(tmp), repeats=args.repeats, smoke=args.smoke,
                                     only=args.only)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
