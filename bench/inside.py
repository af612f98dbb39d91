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

Usage: python -m bench.inside [--files 10000] [--changed 100] [--repeats 3] [--smoke]
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

from ecsnap.adapters.inspect.base import DiskImage
from ecsnap.adapters.inspect.debugfs import DebugfsReader
from ecsnap.service.inspect import diff

SNAP = "s-bench"
PER_DIR = 100


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--changed", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny: 300 files, 20 changed")
    args = parser.parse_args(argv)
    if args.smoke:
        args.files, args.changed, args.repeats = 300, 20, 1
    with tempfile.TemporaryDirectory(prefix="ecsnap-bench-inside-") as tmp:
        print(report(run(args.files, args.changed, args.repeats, Path(tmp))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
