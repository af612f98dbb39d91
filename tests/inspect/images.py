"""Real ext4 disk images for the inspection tests: built unprivileged with `mke2fs -d`,
converted to qcow2, snapshotted with `qemu-img snapshot -c`, and changed afterwards the way
a guest would, with `debugfs -w` on a writable FUSE export of the qcow2 (nbdfuse +
qemu-nbd: the host kernel never mounts them)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

# a file's content, or None for a directory; mtimes are whole seconds (as mke2fs stores)
Tree = Mapping[str, bytes | None]
MTIME = 1_700_000_000


def build_tree(root: Path, tree: Tree) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for rel, content in sorted(tree.items()):
        path = root / rel
        if content is None:
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
    for path in [*root.rglob("*"), root]:
        os.utime(path, (MTIME, MTIME), follow_symlinks=False)
    return root


def make_raw(work: Path, tree: Tree | Path, *, size: str = "64M", name: str = "disk",
             fs: str = "ext4") -> Path:
    """A raw disk image holding an ext4 (or `fs`) file system made from `tree`; every
    timestamp is MTIME, so two images built from the same files differ only in content."""
    source = tree if isinstance(tree, Path) else build_tree(work / f"{name}-tree", tree)
    raw = work / f"{name}.raw"
    raw.unlink(missing_ok=True)
    subprocess.run(["truncate", "-s", size, str(raw)], check=True)
    subprocess.run(["mke2fs", "-q", "-F", "-t", fs, "-d", str(source), str(raw)], check=True,
                   env={**os.environ, "E2FSPROGS_FAKE_TIME": str(MTIME)})
    return raw


def make_disk(work: Path, tree: Tree | Path, *, size: str = "64M", name: str = "disk",
              fs: str = "ext4") -> Path:
    """A qcow2 disk holding an ext4 (or `fs`) file system made from `tree`."""
    raw = make_raw(work, tree, size=size, name=name, fs=fs)
    qcow2 = work / f"{name}.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw),
                    str(qcow2)], check=True)
    raw.unlink()
    return qcow2


def snapshot(qcow2: Path, name: str) -> None:
    subprocess.run(["qemu-img", "snapshot", "-c", name, str(qcow2)], check=True)


def checksum(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def writable(qcow2: Path) -> Iterator[Path]:
    """The disk's current state as a writable raw file (a FUSE export), for `debugfs -w`."""
    mount = qcow2.with_suffix(".rw")
    pidfile = qcow2.with_suffix(".rwpid")
    mount.touch()
    pidfile.unlink(missing_ok=True)
    proc = subprocess.Popen(["nbdfuse", "-P", str(pidfile), str(mount), "[", "qemu-nbd",
                             "-f", "qcow2", str(qcow2), "]"])
    deadline = time.monotonic() + 20
    while not (pidfile.exists() and pidfile.stat().st_size):
        assert proc.poll() is None and time.monotonic() < deadline, "nbdfuse did not start"
        time.sleep(0.01)
    try:
        yield mount
    finally:
        subprocess.run(["fusermount3", "-u", str(mount)], check=False)
        proc.wait(30)
        mount.unlink(missing_ok=True)
        pidfile.unlink(missing_ok=True)


def debugfs_w(image: Path, commands: list[str]) -> str:
    done = subprocess.run(["debugfs", "-w", "-f", "-", str(image)],
                          input="".join(c + "\n" for c in commands), capture_output=True,
                          text=True, check=True)
    errors = [line for line in done.stderr.splitlines()
              if line.strip() and not line.startswith("debugfs ")]
    assert not errors, errors
    return done.stdout


def edit(qcow2: Path, commands: list[str]) -> str:
    """Run `debugfs -w` commands on the disk's current state (as a guest would write)."""
    with writable(qcow2) as image:
        return debugfs_w(image, commands)


def host_file(work: Path, content: bytes) -> Path:
    """A host file for debugfs's `write` (its content becomes a guest file's)."""
    path = work / f"src-{hashlib.sha256(content).hexdigest()[:16]}"
    path.write_bytes(content)
    return path
