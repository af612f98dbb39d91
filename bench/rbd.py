"""Ceph RBD: ecsnap's rollback by clone and swap, and its instance snapshot, against the bare
RBD calls on the same disks, on a throwaway single-node cluster.

For each size (GiB written per disk) a stopped instance with 3 disks (system + 2 data, 20
GiB each) in a region on the cluster's pool gets `size` GiB of pattern A on every disk,
an instance snapshot G_A, `size` GiB of pattern B over it, an instance snapshot G_B. Then,
alternating which goes first in each repeat:

- rollback: ecsnap's `ResetDisks` of the 3 disks through the service functions (safety
  snapshot group on, timed until the task has ended, as the API answers; the background
  CollectVolumes it leaves is waited for outside the timing), alternately to G_A and G_B,
  so every rollback changes `size` GiB per disk; against `Image.rollback_to_snap` (what
  `rbd snap rollback` does) of the same 3 disks' first volumes, the 3 side by side,
  alternately to the same two snapshots; and against RBD's group rollback
  (`Group.rollback_to_snap`, what `rbd group snap rollback` does) of an RBD group of the
  same 3 first volumes to group snapshots taken next to G_A and G_B (the bare and the group
  rollback share those images: each goes to the pattern they do not hold, so every one of
  them rewrites `size` GiB per disk);
- snapshot: `CreateSnapshotGroup` of the stopped instance (the disks' current volumes, side
  by side) against `Image.create_snap` of the 3 first volumes, side by side (the
  snapshots made are removed outside the timing).

The OSD stores its data in a file-backed BlueStore on the disk of `--dir` (4 GiB per disk,
twice, does not fit in RAM here), so a bare rollback pays for the objects it rewrites as a
real cluster would. A big bare rollback leaves the OSD writing back for a while, which
slows whatever comes next: every measurement starts after `--settle` seconds of quiet.
`--propose`: the monitor's paxos_propose_interval (`0.01`, or `default`: Ceph's 1 s),
which every RBD snapshot waits for.

`--guest`: what a running guest sees, on a real VM of the demo image (QEMU, 1 vCPU) with
3 RBD disks (system disk cloned from the template, 2 data disks) on the same kind of
cluster:

- read throughput right after a rollback against after the flatten: a data disk holds
  `--read-mib` MiB written from the host and a snapshot of them; each repeat clones the
  snapshot twice into new volumes (what ecsnap's rollback does), flattens the second (what
  ecsnap's background flatten does past a clone depth), starts the VM with both as data
  disks and reads each in the guest with `dd iflag=direct bs=4M` (the clone's reads go
  through to its parent), alternating which is read first. The OSD's caches are dropped
  before each read (admin socket `cache drop`), so every read comes from the OSD's disk;
- live instance snapshot of the 3 disks (guest file systems frozen through the agent):
  the driver's two ways side by side, alternating which goes first: librbd snapshots
  taken outside QEMU side by side (the default: adapters/compute/qemu/rbd_snapshots.py)
  against a QMP `transaction` of internal snapshots on the rbd nodes; the window (the
  driver's `window_ms`: freeze to thawed) and the in-guest time of the first 4 KiB direct
  write after it (QEMU's librbd takes the image's exclusive lock back from the snapshot's
  client). Both with the monitor's paxos_propose_interval at 0.01 s and at Ceph's default
  1 s (set at run time through the monitor's admin socket).

Usage: python -m bench.rbd [--sizes 0.1,1,4] [--repeats 5] [--propose 0.01|default]
       [--settle 2] [--dir /tmp] [--out FILE]   (prints the markdown section; --out too)
       python -m bench.rbd --guest [--repeats 5] [--read-mib 256] [--dir /tmp] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.ceph import CephCluster

from ecsnap import bootstrap, config
from ecsnap.adapters.storage.rbd import RbdBackend
from ecsnap.domain.model import TaskStatus
from ecsnap.service import images, instances, regions, rollback, setup, snapshots
from ecsnap.service.context import ServiceContext, attached_disks

GIB, MIB = 1024**3, 1024**2
REGION = "ceph-1"
CHUNK = 4 * MIB


class FileCluster(CephCluster):
    """The test cluster with a file-backed BlueStore OSD instead of memstore."""

    def __init__(self, root: Path, *, block_gib: int, propose_interval: float | None) -> None:
        super().__init__(root, propose_interval=propose_interval)
        self.block_gib = block_gib

    def _write_conf(self) -> None:
        super()._write_conf()
        lines = [line for line in self.conf.read_text().splitlines()
                 if not line.startswith(("osd objectstore", "memstore device bytes"))]
        at = lines.index("[global]") + 1
        lines[at:at] = ["osd objectstore = bluestore", "bluestore block create = true",
                        f"bluestore block size = {self.block_gib * GIB}",
                        "osd memory target = 2147483648"]
        self.conf.write_text("\n".join(lines) + "\n")


@dataclass
class Series:
    name: str
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> str:
        return f"{min(self.samples) * 1000:.0f}-{max(self.samples) * 1000:.0f} ms"


def side_by_side(fn: Callable[[Any], object], items: Sequence[Any]) -> None:
    errors: list[BaseException] = []

    def run(item: Any) -> None:
        try:
            fn(item)
        except BaseException as exc:  # reported after all ran
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(item,)) for item in items]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


@contextlib.contextmanager
def opened(backend: RbdBackend, name: str) -> Iterator[Any]:
    import rbd

    with backend.ioctx() as io:
        image = rbd.Image(io, name)
        try:
            yield image
        finally:
            image.close()


def fill(backend: RbdBackend, volume: str, pattern: int, size: int) -> None:
    """`size` bytes of `pattern` from offset 0 (4 MiB writes, 8 in flight)."""
    buf = bytes([pattern]) * CHUNK
    with opened(backend, volume) as image:
        pending: list[Any] = []
        for offset in range(0, size, CHUNK):
            length = min(CHUNK, size - offset)
            pending.append(image.aio_write(buf[:length], offset, lambda *_: None))
            if len(pending) >= 8:
                pending.pop(0).wait_for_complete_and_cb()
        for completion in pending:
            completion.wait_for_complete_and_cb()
        image.flush()


def quiet(ctx: ServiceContext) -> None:
    """Until no task runs (the CollectVolumes a rollback leaves, in the background)."""
    while True:
        with ctx.uow(readonly=True) as uow:
            if not uow.tasks.find(status=TaskStatus.PROCESSING):
                return
        time.sleep(0.01)


def group(ctx: ServiceContext, account: str, instance_id: str) -> list[tuple[str, str]]:
    group_id, task_id = snapshots.create_snapshot_group(ctx, account, REGION, instance_id,
                                                        quiesce=False)
    task = instances.wait_task(ctx, task_id)
    assert task.status == TaskStatus.FINISHED, task.error_message
    view = snapshots.get_snapshot_group(ctx, account, group_id)
    return [(s.source_disk_id, s.id) for s in view.snapshots]


def bench_size(ctx: ServiceContext, account: str, image_id: str, gib: float,
               repeats: int, settle: float) -> dict[str, Series]:
    backend = ctx.storage_of(REGION)
    assert isinstance(backend, RbdBackend)
    with backend.ioctx() as io:  # the RBD group's own calls, on the backend's connection
        return _bench_size(ctx, account, image_id, gib, repeats, settle, backend, io)


def _bench_size(ctx: ServiceContext, account: str, image_id: str, gib: float, repeats: int,
                settle: float, backend: RbdBackend, io: Any) -> dict[str, Series]:
    req = instances.InstanceRequest(image_id=image_id, instance_type="ecs.t5-lc2m1.nano",
                                    data_disks=[instances.DataDiskSpec(20),
                                                instances.DataDiskSpec(20)])
    [instance_id] = instances.run_instances(ctx, account, REGION, req, start=False)
    while instances.statuses(ctx, account, [instance_id])[instance_id] != "Stopped":
        time.sleep(0.05)  # its disks are made in the background
    with ctx.uow(readonly=True) as uow:
        disks = [d.id for d in attached_disks(uow, instance_id)]
    size = max(CHUNK, int(gib * GIB) // CHUNK * CHUNK)
    import rbd

    rbd_group = f"bench-{instance_id}"
    rbd.RBD().group_create(io, rbd_group)
    rgroup = rbd.Group(io, rbd_group)
    for d in disks:
        rgroup.add_image(io, d)
    side_by_side(lambda d: fill(backend, d, 0xA1, size), disks)
    items_a = group(ctx, account, instance_id)
    rgroup.create_snap("group-a")
    side_by_side(lambda d: fill(backend, d, 0xB2, size), disks)
    items_b = group(ctx, account, instance_id)
    rgroup.create_snap("group-b")
    snap_of = {d: (dict(items_a)[d], dict(items_b)[d]) for d in disks}
    out = {k: Series(k) for k in ("rollback", "bare_rollback", "group_rollback", "snapshot",
                                  "bare_snapshot")}
    holds = [1]  # the pattern the first volumes hold now: 0 = A, 1 = B

    def ours_rollback(r: int) -> float:
        items = items_a if r % 2 == 0 else items_b
        start = time.perf_counter()
        result = rollback.reset_disks(ctx, account, REGION, items)
        task = instances.wait_task(ctx, result.task_id)
        took = time.perf_counter() - start
        assert task.status == TaskStatus.FINISHED, task.error_message
        quiet(ctx)
        return took

    def bare_rollback(r: int) -> float:
        to = 1 - holds[0]

        def one(disk: str) -> None:
            with opened(backend, disk) as image:
                image.rollback_to_snap(snap_of[disk][to])
        start = time.perf_counter()
        side_by_side(one, disks)
        took = time.perf_counter() - start
        holds[0] = to
        return took

    def group_rollback(r: int) -> float:
        to = 1 - holds[0]
        start = time.perf_counter()
        rgroup.rollback_to_snap(("group-a", "group-b")[to])
        took = time.perf_counter() - start
        holds[0] = to
        return took

    def ours_snapshot(r: int) -> float:
        start = time.perf_counter()
        group_id, task_id = snapshots.create_snapshot_group(ctx, account, REGION, instance_id,
                                                            quiesce=False)
        task = instances.wait_task(ctx, task_id)
        took = time.perf_counter() - start
        assert task.status == TaskStatus.FINISHED, task.error_message
        _, delete = snapshots.delete_snapshot_group(ctx, account, REGION, group_id)
        instances.wait_task(ctx, delete)
        quiet(ctx)
        return took

    def bare_snapshot(r: int) -> float:
        def one(disk: str) -> None:
            with opened(backend, disk) as image:
                image.create_snap(f"bench-{r}")
        start = time.perf_counter()
        side_by_side(one, disks)
        took = time.perf_counter() - start

        def drop(disk: str) -> None:
            with opened(backend, disk) as image:
                image.remove_snap(f"bench-{r}")
        side_by_side(drop, disks)
        return took

    ours_rollback(1), ours_snapshot(-1)  # warm-up, not counted: to G_B, where the disks are
    for r in range(repeats):
        pairs = [(out["rollback"], ours_rollback), (out["bare_rollback"], bare_rollback),
                 (out["group_rollback"], group_rollback)]
        for series, run in pairs if r % 2 == 0 else pairs[::-1]:
            time.sleep(settle)
            series.samples.append(run(r))
        pairs = [(out["snapshot"], ours_snapshot), (out["bare_snapshot"], bare_snapshot)]
        for series, run in pairs if r % 2 == 0 else pairs[::-1]:
            time.sleep(settle)
            series.samples.append(run(r))
    return out


def run(sizes: list[float], repeats: int, propose: float | None, where: Path,
        settle: float = 2.0) -> dict[float, dict[str, Series]]:
    root = Path(tempfile.mkdtemp(prefix="ecsnap-bench-rbd-", dir=where))
    need = int(3 * 2 * max(sizes) + 20) + 8
    cluster = FileCluster(root / "ceph", block_gib=need, propose_interval=propose)
    cluster.start()
    try:
        settings = config.load(root / "data", background_tasks=True, accel="tcg")
        ctx = bootstrap.build(settings, background=True)
        done = setup.initialise(ctx, "local-1")
        regions.ensure_region(ctx, REGION, vcpus=100, memory_mib=100000,
                              storage_pool=cluster.spec())
        template = root / "template.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(template), "1G"],
                       check=True)
        image = images.register_image(ctx, REGION, name="bench", os_name="bench",
                                      template=template, size_gib=1)
        results = {}
        for gib in sizes:
            results[gib] = bench_size(ctx, done.account.id, image.id, gib, repeats, settle)
            print(f"{gib} GiB: " + ", ".join(f"{k} {v.median * 1000:.0f} ms"
                                             for k, v in results[gib].items()),
                  file=sys.stderr, flush=True)
        ctx.close()  # the runner's steps first, then the pool's Ceph connection
        return results
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


ROOT = Path(__file__).parents[1]
GVM = "i-rbdbench"
GSYS, GD1, GD2, GD3 = (f"d-{name:0<20}" for name in ("gsys", "gread", "gdata", "gflat"))


def admin_socket(cluster: CephCluster, daemon: str, *args: str) -> str:
    return subprocess.run(["ceph", "--admin-daemon", str(cluster.root / "run" /
                                                          f"{daemon}.asok"), *args],
                          check=True, capture_output=True, text=True, timeout=60).stdout


def guest_sh(driver: Any, command: str, timeout: float = 300) -> str:
    result = driver.guest_exec(GVM, command, timeout=timeout)
    assert result.exit_code == 0, result
    return str(result.stdout.decode())


NOW = "$(grep -m1 'now at' /proc/timer_list | cut -d' ' -f3)"  # the guest's clock, ns


def guest_read_mbs(driver: Any, cluster: CephCluster, serial: str, mib: int) -> float:
    """MB/s of a direct read of the first `mib` MiB of the data disk, timed in the guest."""
    admin_socket(cluster, "osd.0", "cache", "drop")
    out = guest_sh(driver, (
        f"for d in /sys/block/vd*; do [ \"$(cat $d/serial)\" = {serial} ] && "
        f"dev=/dev/${{d##*/}}; done; a={NOW}; "
        f"dd if=$dev of=/dev/null bs=4M count={mib // 4} iflag=direct 2>/dev/null; "
        f"b={NOW}; echo $((b - a))"))
    return mib * MIB / (int(out.split()[-1]) / 1e9) / 1e6


def guest_bench(where: Path, repeats: int, read_mib: int) -> dict[str, Series]:
    from tests.compute.conftest import spec_for, wait_agent

    from ecsnap.adapters.compute.base import VmDisk
    from ecsnap.adapters.compute.guest_image import build_demo_image
    from ecsnap.adapters.compute.qemu import QemuDriver

    root = Path(tempfile.mkdtemp(prefix="rbdg-", dir=where))
    cluster = FileCluster(root / "ceph", block_gib=16, propose_interval=0.01)
    cluster.start()
    out: dict[str, Series] = {}
    driver = QemuDriver(root / "run", accel="auto")
    backend = RbdBackend(cluster.pool, conf=str(cluster.conf), client="admin")
    try:
        demo = build_demo_image(ROOT / ".cache" / "demo-image", ROOT / ".cache" / "debs")
        backend.create_from_image(GSYS, str(demo.rootfs_path), GIB)
        backend.create_blank(GD1, GIB)
        backend.create_blank(GD2, GIB)
        fill(backend, GD1, 0xC3, read_mib * MIB)
        backend.create_snapshots([(GD1, "base")])
        for key in ("read_clone", "read_flat"):
            out[key] = Series(key)
        for r in range(repeats):
            clone, flat = f"{GD1}.a{r}", f"{GD1}.b{r}"
            for volume in (clone, flat):
                backend.clone_to_volume(GD1, "base", volume, GIB)
            backend.flatten(flat)
            disks = [VmDisk(GSYS, backend.path(GSYS), True),
                     VmDisk(GD1, backend.path(clone), False),
                     VmDisk(GD3, backend.path(flat), False)]
            driver.start(spec_for(demo, GVM, disks, memory_mib=512))
            try:
                wait_agent(driver, GVM, timeout=180)
                order = [("read_clone", GD1), ("read_flat", GD3)]
                for key, disk in order if r % 2 == 0 else order[::-1]:
                    out[key].samples.append(guest_read_mbs(driver, cluster, disk[2:],
                                                           read_mib))
            finally:
                driver.stop(GVM, force=True)
            print(f"read {r}: clone {out['read_clone'].samples[-1]:.0f} MB/s, flat "
                  f"{out['read_flat'].samples[-1]:.0f} MB/s", file=sys.stderr, flush=True)
        disks = [VmDisk(d, backend.path(d), d == GSYS) for d in (GSYS, GD1, GD2)]
        driver.start(spec_for(demo, GVM, disks, memory_mib=512))
        try:
            wait_agent(driver, GVM, timeout=180)
            snapshots = driver._snapshots  # the driver's LiveSnapshots, to pick the way
            n = 0
            for propose in ("0.01", "1"):
                admin_socket(cluster, "mon.a", "config", "set", "paxos_propose_interval",
                             propose)
                for way in ("librbd", "qmp"):
                    for key in (f"window_{way}_{propose}", f"write_{way}_{propose}"):
                        out[key] = Series(key)
                for r in range(repeats + 1):  # the first is a warm-up
                    ways = ["librbd", "qmp"] if r % 2 == 0 else ["qmp", "librbd"]
                    for way in ways:
                        time.sleep(1)
                        snapshots.rbd_via = way
                        n += 1
                        result = driver.snapshot_disks(
                            GVM, [(d, f"live-{n}") for d in (GSYS, GD1, GD2)])
                        assert result.method == "fsfreeze", result
                        took = guest_sh(driver, (
                            f"a={NOW}; dd if=/dev/zero of=/mnt/{GD2}/w bs=4k "
                            f"count=1 oflag=direct conv=fsync 2>/dev/null; "
                            f"b={NOW}; echo $((b - a))"))
                        if r:
                            out[f"window_{way}_{propose}"].samples.append(
                                result.window_ms / 1000)
                            out[f"write_{way}_{propose}"].samples.append(
                                int(took.split()[-1]) / 1e9)
                print(f"propose {propose}: " + ", ".join(
                    f"{k} {v.median * 1000:.0f} ms" for k, v in out.items()
                    if k.endswith(f"_{propose}")), file=sys.stderr, flush=True)
        finally:
            driver.stop(GVM, force=True)
        return out
    finally:
        backend.close()
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def guest_section(res: dict[str, Series], repeats: int, read_mib: int) -> str:
    clone, flat = res["read_clone"], res["read_flat"]
    ratios = [c / f for c, f in zip(clone.samples, flat.samples, strict=True)]

    def mbs(s: Series) -> str:
        return f"{statistics.median(s.samples):.0f} MB/s ({min(s.samples):.0f}-" \
            f"{max(s.samples):.0f})"

    lines = [
        f"### Guest reads after a rollback, and live snapshots of 3 RBD disks (medians of "
        f"{repeats}, range)",
        "",
        f"| guest direct read of {read_mib} MiB | right after the rollback (through the "
        "clone's parent) | after the flatten | ratio (per repeat) |",
        "| --- | --- | --- | --- |",
        f"| MB/s | {mbs(clone)} | {mbs(flat)} | {statistics.median(ratios):.2f} "
        f"({min(ratios):.2f}-{max(ratios):.2f}) |",
        "",
        "| paxos_propose_interval | way | guest frozen (window) | first 4 KiB direct write "
        "after the thaw |",
        "| --- | --- | --- | --- |"]
    for propose, label in (("0.01", "0.01 s"), ("1", "1 s (default)")):
        for way, name in (("librbd", "librbd snapshots, side by side, outside QEMU"),
                          ("qmp", "QMP transaction of internal snapshots")):
            w, t = res[f"window_{way}_{propose}"], res[f"write_{way}_{propose}"]
            lines.append(f"| {label} | {name} | {w.median * 1000:.0f} ms ({w.spread}) | "
                         f"{t.median * 1000:.0f} ms ({t.spread}) |")
    return "\n".join([*lines, ""])


def section(results: dict[float, dict[str, Series]], propose: str, repeats: int) -> str:
    sizes = sorted(results)
    rows = ["| GiB written per disk | ecsnap rollback (3 disks) | bare rollback_to_snap | "
            "ratio | RBD group rollback | ratio | ecsnap instance snapshot | "
            "bare create_snap | ratio |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for gib in sizes:
        r = results[gib]
        rows.append(
            f"| {gib:g} | {r['rollback'].median * 1000:.0f} ms ({r['rollback'].spread}) | "
            f"{r['bare_rollback'].median * 1000:.0f} ms ({r['bare_rollback'].spread}) | "
            f"{r['bare_rollback'].median / r['rollback'].median:.1f}x faster | "
            f"{r['group_rollback'].median * 1000:.0f} ms ({r['group_rollback'].spread}) | "
            f"{r['group_rollback'].median / r['rollback'].median:.1f}x faster | "
            f"{r['snapshot'].median * 1000:.0f} ms ({r['snapshot'].spread}) | "
            f"{r['bare_snapshot'].median * 1000:.0f} ms ({r['bare_snapshot'].spread}) | "
            f"{r['snapshot'].median / r['bare_snapshot'].median:.1f}x |")
    lo, hi = results[sizes[0]]["rollback"].median, results[sizes[-1]]["rollback"].median
    flat = hi / lo
    return "\n".join([
        f"### Ceph RBD, paxos_propose_interval {propose} (medians of {repeats}, range)",
        "",
        *rows,
        "",
        f"ecsnap's rollback at {sizes[-1]:g} GiB / at {sizes[0]:g} GiB: {flat:.2f} "
        f"(flat in the data written: target <= 1.2); against bare rollback_to_snap at "
        f"{sizes[-1]:g} GiB: "
        f"{results[sizes[-1]]['bare_rollback'].median / hi:.1f}x faster (target >= 10x), "
        f"against RBD group rollback {results[sizes[-1]]['group_rollback'].median / hi:.1f}x "
        f"faster. Instance snapshot / bare create_snap: "
        + ", ".join(f"{results[g]['snapshot'].median / results[g]['bare_snapshot'].median:.2f}"
                    f" at {g:g} GiB" for g in sizes) + " (target <= 1.3).",
        ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.1,1,4")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--settle", type=float, default=2.0)
    parser.add_argument("--propose", default="0.01")
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--out", default="")
    parser.add_argument("--guest", action="store_true")
    parser.add_argument("--read-mib", type=int, default=256)
    args = parser.parse_args(argv)
    if args.guest:
        text = guest_section(guest_bench(Path(args.dir), args.repeats, args.read_mib),
                             args.repeats, args.read_mib)
        print(text)
        if args.out:
            Path(args.out).write_text(text)
        return 0
    sizes = [float(s) for s in args.sizes.split(",")]
    propose = None if args.propose == "default" else float(args.propose)
    results = run(sizes, args.repeats, propose, Path(args.dir), args.settle)
    text = section(results, "1 s (Ceph's default)" if propose is None else f"{propose:g} s",
                   args.repeats)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except BaseException:  # the traceback, then out without waiting (below)
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    # librados' own threads can wait for ever at interpreter exit for monitors that the
    # benchmark has already stopped (seen once in a loaded make test): the report is
    # written, so leave without waiting for them
    os._exit(code)
