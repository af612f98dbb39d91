"""Benchmark: the file level of a rollback preview (service.inspect.diff on the debugfs
reader) against a bare `diff -rq` of the same two trees.

A qcow2 disk holds an ext4 file system of FILES small files (100 per directory; made with
`mke2fs -d`, unprivileged); it is snapshotted, then CHANGED files are changed the way a
guest would (rewritten, deleted, added: `debugfs -w` on a writable FUSE export). Measured,
each REPEATS times (median, min-max):

- preview: `diff(reader, DiskImage(disk, snapshot), DiskImage(disk))`, the whole product
  path of one disk's file level: both points opened read-only (qemu-nbd + nbdfuse), both
  trees walked by debugfs, contents compared where size and mtime agree;
- reference: `diff -rq` of the two trees extracted beforehand to host directories with
  `debugfs -R "rdump / DIR"` (the extraction is timed apart, once; the benchmark's own
  synthetic tree: this is the only place a guest tree is ever written to host paths);
- the ratio preview / diff -rq, and the ratio preview / (extraction + diff -rq), which is
  what the reference costs when the trees are not at hand.

Both answers are checked to name the same paths.

Then, through the service functions on a real ecsnap (bootstrap.build: SQLite, qcow2 pool,
the QEMU driver; instances created stopped, never booted), each disk's qcow2 given an ext4
file system spanning its whole virtual size (`mke2fs -d` on a sparse raw file written into
the disk with `qemu-img convert -n --target-is-zero`):

- one file read from a snapshot (DescribeSnapshotFiles: `service.inspect.
  describe_snapshot_files`, Path = a 1 MiB file, the most one call returns) on data disks
  of one instance holding the same tree, of READ_GIB virtual sizes (the file system spans
  each); the calls alternate between the disks (READS each): median, min-max and the
  ratio to the smallest disk, which must stay near 1 where the size ratio is 16 or 100
  (no cost proportional to the disk size);
- the whole file-level preview of a stopped 3-disk instance (PreviewResetDisks with the
  file level: `service.rollback.preview_reset_disks(..., file_changes=2 x DISK_CHANGED)`), each disk
  holding DISK_FILES files of which DISK_CHANGED changed after the instance snapshot
  (every disk's answer is checked: complete, exactly the changed paths).

Usage: python -m bench.inside [--files 10000] [--changed 100] [--repeats 3]
           [--read-gib 20,320,2048] [--read-files 3000] [--reads 15]
           [--disk-files 3000] [--disk-changed 30] [--smoke]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ecsnap import bootstrap, config
from ecsnap.adapters.inspect.base import DiskImage
from ecsnap.adapters.inspect.debugfs import DebugfsReader
from ecsnap.domain.model import TaskStatus
from ecsnap.service import images, instances, regions, rollback, setup, snapshots
from ecsnap.service.context import ServiceContext, attached_disks
from ecsnap.service.inspect import FileLevel, describe_snapshot_files, diff

SNAP = "s-bench"
PER_DIR = 100
REGION = "local-1"
GIB = 1024**3
BIG = "/big/one.bin"  # the file read from a snapshot: 1 MiB, the most one call returns


def sh(*cmd: str, stdin: str | None = None) -> str:
    return subprocess.run(cmd, input=stdin, check=True, capture_output=True,
                          text=True).stdout


def make_tree(root: Path, files: int, rng: random.Random) -> list[str]:
    paths = []
    for n in range(files):
        rel = f"dir{n // PER_DIR:04d}/file{n % PER_DIR:03d}.txt"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(rng.randint(100, 4000)))
        paths.append(rel)
    return paths


@contextlib.contextmanager
def writable(qcow2: Path) -> Iterator[Path]:
    """The disk's current state as a writable raw file (for `debugfs -w`)."""
    mount, pidfile = qcow2.with_suffix(".rw"), qcow2.with_suffix(".rwpid")
    mount.touch()
    proc = subprocess.Popen(["nbdfuse", "-P", str(pidfile), str(mount), "[", "qemu-nbd",
                             "-f", "qcow2", str(qcow2), "]"])
    while not (pidfile.exists() and pidfile.stat().st_size):
        if proc.poll() is not None:
            raise RuntimeError("nbdfuse did not start")
        time.sleep(0.01)
    try:
        yield mount
    finally:
        subprocess.run(["fusermount3", "-u", str(mount)], check=False)
        proc.wait(30)
        mount.unlink(missing_ok=True)
        pidfile.unlink(missing_ok=True)


def change(work: Path, qcow2: Path, paths: list[str], count: int,
           rng: random.Random) -> set[str]:
    """Rewrite 70 %, delete 15 %, add 15 % of `count` files; the paths changed."""
    chosen = rng.sample(paths, count)
    rewrite, delete = chosen[:count * 70 // 100], chosen[count * 70 // 100:count * 85 // 100]
    added = count - len(rewrite) - len(delete)
    commands, changed = [], set()
    for n, rel in enumerate(rewrite):
        src = work / f"src-{n}"
        src.write_bytes(rng.randbytes(rng.randint(100, 4000)))
        parent, name = rel.rsplit("/", 1)
        commands += [f"rm /{rel}", f"cd /{parent}", f"write {src} {name}"]
        changed.add("/" + rel)
    for rel in delete:
        commands.append(f"rm /{rel}")
        changed.add("/" + rel)
    for n in range(added):
        src = work / f"new-{n}"
        src.write_bytes(rng.randbytes(500))
        commands += ["cd /dir0000", f"write {src} added{n:03d}.txt"]
        changed.add(f"/dir0000/added{n:03d}.txt")
    with writable(qcow2) as image:
        sh("debugfs", "-w", "-f", "-", str(image), stdin="".join(c + "\n" for c in commands))
    return changed


def extract(qcow2: Path, snapshot: str | None, into: Path) -> None:
    """The tree at that point, into a host directory (reference only)."""
    raw = into.with_suffix(".raw")
    args = ["qemu-img", "convert", "-U", "-O", "raw"]
    if snapshot:
        args += ["-l", f"snapshot.name={snapshot}"]
    sh(*args, str(qcow2), str(raw))
    into.mkdir()
    sh("debugfs", "-c", "-R", f"rdump / {into}", str(raw))
    raw.unlink()


def diff_rq(a: Path, b: Path) -> set[str]:
    proc = subprocess.run(["diff", "-rq", str(a), str(b)], capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        raise RuntimeError(proc.stderr)
    out = set()
    for line in proc.stdout.splitlines():
        if line.startswith("Files "):
            path = line.split(" and ")[0].removeprefix("Files ")
            out.add("/" + os.path.relpath(path, a))
        elif line.startswith("Only in "):
            where, name = line.removeprefix("Only in ").split(": ", 1)
            base = a if where.startswith(str(a)) else b
            out.add("/" + os.path.relpath(os.path.join(where, name), base))
    return out


def run(files: int, changed: int, repeats: int, work: Path) -> dict[str, float]:
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(20261201)
    tree = work / "tree"
    paths = make_tree(tree, files, rng)
    raw, qcow2 = work / "disk.raw", work / "disk.qcow2"
    size_mib = max(64, files * 8 // 1024 + 64)
    sh("truncate", "-s", f"{size_mib}M", str(raw))
    sh("mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), str(raw))
    sh("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2))
    raw.unlink()
    shutil.rmtree(tree)
    sh("qemu-img", "snapshot", "-c", SNAP, str(qcow2))
    expected = change(work, qcow2, paths, changed, rng)

    reader = DebugfsReader(work / "inspect")
    previews, references = [], []
    found: set[str] = set()
    for _ in range(repeats):
        start = time.perf_counter()
        result = diff(reader, DiskImage(str(qcow2), SNAP), DiskImage(str(qcow2)),
                      limit=changed * 2)
        previews.append(time.perf_counter() - start)
        assert not result.partial, result.partial
        found = {f.path for f in result.files if f.type == "file"}
    start = time.perf_counter()
    extract(qcow2, SNAP, work / "before")
    extract(qcow2, None, work / "after")
    extraction = time.perf_counter() - start
    reference: set[str] = set()
    for _ in range(repeats):
        start = time.perf_counter()
        reference = diff_rq(work / "before", work / "after")
        references.append(time.perf_counter() - start)
    assert found == expected == reference, (len(found), len(expected), len(reference))
    preview, bare = statistics.median(previews), statistics.median(references)
    return {"files": files, "changed": changed, "preview_s": preview,
            "preview_min": min(previews), "preview_max": max(previews),
            "diff_s": bare, "diff_min": min(references), "diff_max": max(references),
            "extract_s": extraction, "ratio": preview / bare,
            "ratio_with_extraction": preview / (extraction + bare)}


def report(r: dict[str, float]) -> str:
    return "\n".join([
        f"file level of a preview: {r['files']:.0f} files, {r['changed']:.0f} changed "
        "(both answers name the same paths)",
        "| measure | median | min-max |", "| --- | ---: | ---: |",
        f"| preview (open both points, walk both trees, compare) | {r['preview_s']:.2f} s | "
        f"{r['preview_min']:.2f}-{r['preview_max']:.2f} s |",
        f"| `diff -rq` of the two extracted trees | {r['diff_s']:.2f} s | "
        f"{r['diff_min']:.2f}-{r['diff_max']:.2f} s |",
        f"| extraction of both trees (`qemu-img convert` + `debugfs rdump`), once | "
        f"{r['extract_s']:.2f} s | |",
        f"| ratio preview / diff -rq | {r['ratio']:.2f} | |",
        f"| ratio preview / (extraction + diff -rq) | {r['ratio_with_extraction']:.2f} | |",
    ])


# ---------------------------------------------------------------- through the service


@contextlib.contextmanager
def ecsnap(root: Path) -> Iterator[tuple[ServiceContext, str, str]]:
    """A real ecsnap on `root` (context, account ID, image ID); its task runner stopped at
    the end."""
    root.mkdir(parents=True, exist_ok=True)
    settings = config.load(root / "data", background_tasks=True, accel="tcg")
    ctx = bootstrap.build(settings, background=True)
    try:
        done = setup.initialise(ctx, REGION)
        regions.ensure_region(ctx, REGION, vcpus=100, memory_mib=100_000)
        template = root / "template.qcow2"
        sh("qemu-img", "create", "-q", "-f", "qcow2", str(template), "1G")
        image = images.register_image(ctx, REGION, name="bench", os_name="bench",
                                      template=template, size_gib=1)
        yield ctx, done.account.id, image.id
    finally:
        ctx.runner.shutdown()


def stopped_instance(ctx: ServiceContext, account: str, image: str,
                     data_gib: list[int]) -> list[tuple[str, str, int]]:
    """A stopped instance (CreateInstance) with a 20 GiB system disk and these data disks:
    its disks as (disk ID, qcow2 path, GiB), system first."""
    req = instances.InstanceRequest(image_id=image, instance_type="ecs.t5-lc2m1.nano",
                                    system_disk_size_gib=20,
                                    data_disks=[instances.DataDiskSpec(g) for g in data_gib])
    [iid] = instances.run_instances(ctx, account, REGION, req, start=False)
    deadline = time.monotonic() + 120
    while instances.statuses(ctx, account, [iid])[iid] != "Stopped":
        if time.monotonic() > deadline:
            raise RuntimeError(f"instance {iid} did not become Stopped")
        time.sleep(0.05)  # its disks are made in the background
    storage = ctx.storage_of(REGION)
    with ctx.uow(readonly=True) as uow:
        disks = sorted(attached_disks(uow, iid), key=lambda d: d.type.value != "system")
        return [(d.id, storage.path(d.current_volume), d.size_gib) for d in disks]


def fill(work: Path, qcow2: str, gib: int, tree: Path) -> None:
    """Give the (blank, just created) disk an ext4 file system of its whole virtual size
    holding `tree`, as if a guest had made it."""
    raw = work / "fill.raw"
    raw.unlink(missing_ok=True)
    sh("truncate", "-s", f"{gib}G", str(raw))
    sh("mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), str(raw))
    sh("qemu-img", "convert", "-q", "-n", "--target-is-zero", "-f", "raw", "-O", "qcow2",
       str(raw), qcow2)
    raw.unlink()


def snapshot_all(ctx: ServiceContext, account: str, instance_disk: str) -> dict[str, str]:
    """An instance snapshot (CreateSnapshotGroup) of the instance of that disk: disk ID ->
    snapshot ID."""
    with ctx.uow(readonly=True) as uow:
        iid = uow.disks.load(instance_disk).instance_id
    if iid is None:
        raise RuntimeError(f"disk {instance_disk} is not attached")
    group_id, task_id = snapshots.create_snapshot_group(ctx, account, REGION, iid,
                                                        quiesce=False)
    task = instances.wait_task(ctx, task_id)
    if task.status != TaskStatus.FINISHED:
        raise RuntimeError(task.error_message)
    view = snapshots.get_snapshot_group(ctx, account, group_id)
    return {s.source_disk_id: s.id for s in view.snapshots}


def bench_read(ctx: ServiceContext, account: str, image: str, work: Path, files: int,
               sizes: list[int], reads: int) -> dict[str, Any]:
    """One 1 MiB file read from a snapshot of the same tree on disks of these sizes (data
    disks of one instance), the calls alternating between the disks."""
    rng = random.Random(20261202)
    tree = work / "read-tree"
    make_tree(tree, files, rng)
    content = rng.randbytes(1 << 20)
    (tree / BIG.strip("/")).parent.mkdir()
    (tree / BIG.strip("/")).write_bytes(content)
    disks = stopped_instance(ctx, account, image, sizes)[1:]
    for _, path, gib in disks:
        fill(work, path, gib, tree)
    shutil.rmtree(tree)
    snaps = snapshot_all(ctx, account, disks[0][0])
    times: dict[str, list[float]] = {disk_id: [] for disk_id, _, _ in disks}
    for _ in range(reads):
        for disk_id, _, _ in disks:
            start = time.perf_counter()
            got = describe_snapshot_files(ctx, account, snaps[disk_id], BIG)
            times[disk_id].append(time.perf_counter() - start)
            if got.content != content:
                raise AssertionError(f"the file read from {disk_id} is not the one written")
    rows = [{"gib": gib, "file_mib": os.path.getsize(path) / (1 << 20),
             "s": statistics.median(times[disk_id]), "min": min(times[disk_id]),
             "max": max(times[disk_id])} for disk_id, path, gib in disks]
    return {"read_files": files, "reads": reads, "read_rows": rows}


def bench_preview(ctx: ServiceContext, account: str, image: str, work: Path, files: int,
                  changed: int, repeats: int) -> dict[str, float]:
    """The whole file-level preview of a stopped 3-disk instance."""
    disks = stopped_instance(ctx, account, image, [20, 20])
    expected: dict[str, set[str]] = {}
    trees: dict[str, list[str]] = {}
    for n, (disk_id, path, gib) in enumerate(disks):
        rng = random.Random(20261203 + n)
        tree = work / f"tree-{n}"
        trees[disk_id] = make_tree(tree, files, rng)
        fill(work, path, gib, tree)
        shutil.rmtree(tree)
    snaps = snapshot_all(ctx, account, disks[0][0])
    for n, (disk_id, path, _) in enumerate(disks):
        scratch = work / f"change-{n}"
        scratch.mkdir()
        expected[disk_id] = change(scratch, Path(path), trees[disk_id], changed,
                                   random.Random(20261213 + n))
        shutil.rmtree(scratch)
    items = [(disk_id, snaps[disk_id]) for disk_id, _, _ in disks]
    times, per_disk = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        preview = rollback.preview_reset_disks(ctx, account, REGION, items,
                                               file_changes=2 * changed)
        times.append(time.perf_counter() - start)
        for d in preview.disks:
            f = d.files
            if f is None or f.file_level != FileLevel.SUPPORTED or f.partial:
                raise AssertionError(f"disk {d.disk_id}: {f}")
            found = {c.path for c in f.files if c.type == "file"}
            if found != expected[d.disk_id] or f.total != len(expected[d.disk_id]):
                raise AssertionError(f"disk {d.disk_id}: {len(found)} paths listed, "
                                     f"{len(expected[d.disk_id])} changed")
        per_disk.append(sum(d.files.seconds for d in preview.disks if d.files) / len(disks))
    return {"disk_files": files, "disk_changed": changed, "disks": len(disks),
            "preview3_s": statistics.median(times), "preview3_min": min(times),
            "preview3_max": max(times), "preview3_per_disk": statistics.median(per_disk)}


def service_report(r: dict[str, Any]) -> str:
    rows, first = r["read_rows"], r["read_rows"][0]
    return "\n".join([
        f"one file read from a snapshot (DescribeSnapshotFiles, {BIG}, 1 MiB; the same "
        f"tree of {r['read_files']} files on every disk), {r['reads']} reads per disk, "
        "alternating",
        f"| disk (virtual size, qcow2 file) | median | min-max | ratio to {first['gib']} GiB "
        "(size ratio) |", "| --- | ---: | ---: | ---: |",
        *(f"| {w['gib']} GiB ({w['file_mib']:.0f} MiB) | {w['s'] * 1000:.0f} ms | "
          f"{w['min'] * 1000:.0f}-{w['max'] * 1000:.0f} ms | {w['s'] / first['s']:.2f} "
          f"(x{w['gib'] / first['gib']:g}) |" for w in rows),
        "",
        f"file-level preview of a stopped {r['disks']:.0f}-disk instance "
        f"(PreviewResetDisks, {r['disk_files']:.0f} files per disk, "
        f"{r['disk_changed']:.0f} changed on each; every disk's list exact and complete)",
        "| measure | median | min-max |", "| --- | ---: | ---: |",
        f"| whole preview, {r['disks']:.0f} disks | {r['preview3_s']:.2f} s | "
        f"{r['preview3_min']:.2f}-{r['preview3_max']:.2f} s |",
        f"| of which the file level of one disk (its own timing) | "
        f"{r['preview3_per_disk']:.2f} s | |",
    ])


def run_service(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    with ecsnap(root) as (ctx, account, image):
        out = bench_read(ctx, account, image, root, args.read_files,
                         [int(g) for g in args.read_gib.split(",")], args.reads)
        out.update(bench_preview(ctx, account, image, root, args.disk_files,
                                 args.disk_changed, args.repeats))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--changed", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--read-gib", default="20,320,2048",
                        help="the virtual sizes of the disks one file is read from")
    parser.add_argument("--read-files", type=int, default=3000)
    parser.add_argument("--reads", type=int, default=15)
    parser.add_argument("--disk-files", type=int, default=3000)
    parser.add_argument("--disk-changed", type=int, default=30)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny: 300 files, 20 changed; 20 and 40 GiB; 3 x 200 files")
    args = parser.parse_args(argv)
    if args.smoke:
        args.files, args.changed, args.repeats = 300, 20, 1
        args.read_gib, args.read_files, args.reads = "20,40", 100, 2
        args.disk_files, args.disk_changed = 200, 10
    # short: the reader's and the VMs' sockets live under it
    with tempfile.TemporaryDirectory(prefix="ecsnap-bi-") as tmp:
        print(report(run(args.files, args.changed, args.repeats, Path(tmp) / "diff")),
              flush=True)
        print()
        print(service_report(run_service(args, Path(tmp) / "svc")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
