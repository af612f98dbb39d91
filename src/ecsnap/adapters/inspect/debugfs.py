"""The file-system reader on e2fsprogs' `debugfs`, over a read-only export of the disk.

Opening a disk (a qcow2 file at one of its internal snapshots, or at its current state):

    nbdfuse -r -P PIDFILE MOUNT [ qemu-nbd -r [-l snapshot.name=ID] --image-opts
                                  driver=qcow2,file.driver=file,file.filename=…,
                                  file.locking=off ]

A disk on Ceph RBD (an `rbd:` location) is opened read-only the same way through QEMU's
rbd driver (`driver=raw,file.driver=rbd,file.pool=…,file.image=…,file.snapshot=ID`, the
ceph.conf and client of its location); it is never written here.

qemu-nbd exports the disk read-only (`-l` loads the internal snapshot without changing
the file), on a socket nbdfuse hands it (socket activation: no TCP port, no path); nbdfuse
(libnbd) shows the export as one read-only file, MOUNT, on a FUSE mount. debugfs reads that
file. Nothing is copied: opening costs about 25 ms whatever the disk's size, where
`qemu-img convert -l` to a raw file costs a full copy (7 s for 2 GiB written on a 20 GiB
disk here); qemu-storage-daemon's FUSE export cannot load an internal snapshot.
No kernel block device is made and the guest's file system is never mounted: the host
kernel only sees a FUSE file of bytes. The qcow2 file is opened without a lock
(`file.locking=off`), so that looking inside a stopped instance's disk never stops it from
starting; a reader only reads.

Reading it: `debugfs -c` (read-only, "catastrophic" mode: no bitmaps, no journal replay)
runs batches of commands that name inodes by number (`ls -l <12>`, `stat <12>`) — a guest
name never reaches a command line or a host path. Its output is parsed only where it
cannot carry raw guest bytes: `ls -l` escapes names (`\\xNN`), `stat` escapes extended
attributes and is not used for symlinks (it prints their targets raw): a fast symlink's
target is read as hex (`inode_dump -b`), a slow one with `cat`. debugfs runs under
`prlimit` (memory, CPU time, file size, no core) and, when ecsnap runs as root, as
`nobody` with no new privileges (`setpriv`): it opens the FUSE file through an inherited
descriptor (/proc/self/fd/N) and writes only where content is compared, into a private
directory handed over the same way, under names ecsnap chooses.

Comparing contents of two points of one qcow2 disk: the qcow2 tables say which clusters
changed between the two points (`qcow2meta`), so a file whose blocks are the same on both
sides and lie in no changed cluster has the same content without a byte being read; where
a changed cluster holds one of its blocks, only those blocks are compared; anything else
(its blocks moved, inline data) is dumped from both sides and hashed.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import itertools
import os
import re
import shutil
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path as HostPath
from typing import BinaryIO

from ecsnap.adapters.inspect.base import (
    Budget,
    DirPage,
    DiskImage,
    FileEntry,
    FileType,
    InspectError,
    NotADirectory,
    NotAFile,
    NotFound,
    OpenDisk,
    Path,
    Unsupported,
    Walk,
    display_path,
    escape_name,
    file_type,
)
from ecsnap.adapters.storage import qcow2meta
from ecsnap.adapters.storage.base import RbdLocation

ROOT_INODE = 2
FAST_SYMLINK_MAX = 59  # a target shorter than i_block (60 bytes) lives in the inode
SLOW_SYMLINK_MAX = 4096  # PATH_MAX: a longer "target" is not read
CHUNK = 2000  # commands per debugfs run
DUMP_BATCH_BYTES = 64 << 20  # content dumped per debugfs run when comparing
MEMORY_LIMIT = 1 << 30  # debugfs's address space
OUTPUT_LIMIT = 1 << 30  # what one debugfs run may print
NOBODY = 65534
SNAPSHOT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C",
       "TZ": "UTC", "DEBUGFS_PAGER": "__none__", "PAGER": "__none__",
       "E2FSPROGS_LIBMAGIC_SUPPRESS": "1"}

# ` %6u  %6o (%d)  %5d  %5d   %5llu %2d-Mon-%4d %02d:%02d NAME` (debugfs/ls.c, -l)
_LS = re.compile(r"^ *(\d+) +([0-7]+) \((\d+)\) +(-?\d+) +(-?\d+) +(\d+) (.{17}) (.*)$")
_LS_NAME = re.compile(r"(?:[\x20-\x5b\x5d-\x7e]|\\x[0-9a-f]{2})*")
_ESCAPED = re.compile(r"\\x([0-9a-f]{2})")
_STAT_INODE = re.compile(r"^Inode: (\d+) ")
_STAT_FLAGS = re.compile(r"Flags: 0x([0-9a-f]+)")
_STAT_SIZE = re.compile(r"^User:.*\bSize: (\d+)$", re.M)
_STAT_MTIME = re.compile(r"^ ?mtime: 0x([0-9a-f]+)(?::([0-9a-f]+))?", re.M)
_RANGE = re.compile(r"\(([^)]*)\):(\d+)(?:-(\d+))?")
_DATA_RANGE = re.compile(r"\((\d+)(?:-(\d+))?(\[u\])?\):(\d+)(?:-(\d+))?")
_HEX = re.compile(r"^([0-7]{4,})  (.{40})")
INLINE_DATA_FL = 0x10000000


class _OutOfTime(Exception):
    pass


@dataclass
class _Opened:
    image: DiskImage
    mount: HostPath
    fd: int  # the FUSE file, read-only
    block_size: int
    needs_recovery: bool
    proc: subprocess.Popen[bytes]
    writable: bool = False


@dataclass(frozen=True)
class _Dirent:
    name: bytes
    inode: int
    mode: int
    uid: int
    gid: int
    size: int


@dataclass
class _Listing:
    itself: _Dirent | None  # the "." entry
    entries: list[_Dirent] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class DebugfsReader:
    """`FileSystemReader` for ext2/ext3/ext4 file systems that fill a whole disk (the
    demo image's system and data disks), on qcow2 disk files."""

    def __init__(self, work_dir: str | os.PathLike[str], *, debugfs: str = "debugfs",
                 qemu_nbd: str = "qemu-nbd", nbdfuse: str = "nbdfuse",
                 sandbox_uid: int | None = -1, max_open: int = 4,
                 open_timeout_s: float = 20.0) -> None:
        self.work_dir = HostPath(work_dir)
        self.debugfs, self.qemu_nbd, self.nbdfuse = debugfs, qemu_nbd, nbdfuse
        # -1: `nobody` when running as root, else the caller's own uid (no switch)
        self.sandbox_uid = (NOBODY if os.geteuid() == 0 else None) if sandbox_uid == -1 \
            else sandbox_uid
        self.slots = threading.BoundedSemaphore(max_open)
        self.open_timeout_s = open_timeout_s
        self._count = itertools.count()

    # ------------------------------------------------------------------ opening

    @contextlib.contextmanager
    def open(self, image: DiskImage) -> Iterator[_Opened]:
        with self._open(image, writable=False) as opened:
            yield opened

    @contextlib.contextmanager
    def _open(self, image: DiskImage, *, writable: bool) -> Iterator[_Opened]:
        location = image.location
        rbd = _rbd_location(image, writable)
        if rbd is None and (not os.path.isabs(location) or not os.path.isfile(location)):
            raise Unsupported(f"the disk file of {image.label or location} is missing")
        if image.snapshot_id is not None and not SNAPSHOT_NAME.match(image.snapshot_id):
            raise InspectError(f"{image.snapshot_id!r} is not a snapshot name")
        if not self.slots.acquire(timeout=60):
            raise InspectError("too many disks are open for inspection; try again")
        try:
            self.work_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.work_dir, 0o700)
            self._sweep()
            opened = self._export(image, writable)
            try:
                yield opened
            finally:
                self._close(opened)
        finally:
            self.slots.release()

    def _export(self, image: DiskImage, writable: bool = False) -> _Opened:
        stem = self.work_dir / f"{os.getpid()}-{next(self._count)}"
        mount, pidfile, errfile = (stem.with_suffix(s) for s in (".img", ".pid", ".err"))
        for p in (mount, pidfile, errfile):
            p.unlink(missing_ok=True)
        mount.touch(mode=0o600)
        # written: locked (no VM opens the disk meanwhile), and never at a snapshot
        opts = "driver=qcow2,file.driver=file," + ("" if writable else "file.locking=off,") \
            + "file.filename=" + image.location.replace(",", ",,")
        server = [self.qemu_nbd, *([] if writable else ["-r"]), "--image-opts"]
        rbd = _rbd_location(image, writable)
        if rbd is not None:  # QEMU's rbd driver opens the image, at the snapshot if one
            opts = _rbd_opts(rbd, image.snapshot_id)
        elif image.snapshot_id is not None:
            server += ["-l", f"snapshot.name={image.snapshot_id}"]
        argv = [self.nbdfuse, *([] if writable else ["-r"]), "-P", str(pidfile)]
        if self.sandbox_uid is not None:
            argv += ["-o", "allow_other"]  # debugfs reads it as the sandbox user
        argv += [str(mount), "[", *server, opts, "]"]
        with errfile.open("wb") as err:
            # its own session: a Ctrl-C meant for ecsnap does not pull the disk from under
            # a read; ecsnap unmounts it, which ends nbdfuse and its qemu-nbd
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                    env=ENV, start_new_session=True)
        deadline = time.monotonic() + self.open_timeout_s
        while not (pidfile.exists() and pidfile.stat().st_size > 0):
            if proc.poll() is not None or time.monotonic() > deadline:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
                why = _last_lines(errfile.read_bytes())
                for p in (mount, pidfile, errfile):
                    p.unlink(missing_ok=True)
                raise InspectError(f"cannot open {_where(image)}: {why or 'no answer'}")
            time.sleep(0.005)
        fd = -1
        try:
            fd = os.open(mount, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
            block_size, needs_recovery = _superblock(fd, image)
            if writable and needs_recovery:
                raise Unsupported(
                    f"the file system of {image.label or 'the disk'} was not shut down "
                    "cleanly (its journal holds changes not yet written in place): it is "
                    "not written without replaying them; start and stop the instance first")
            opened = _Opened(image, mount, fd, block_size, needs_recovery, proc, writable)
            self._listing(opened, ROOT_INODE, 30.0)  # the root directory must read
            return opened
        except BaseException:
            self._close(_Opened(image, mount, fd, 0, False, proc))
            raise

    def _close(self, opened: _Opened) -> None:
        if opened.fd >= 0:
            os.close(opened.fd)
            opened.fd = -1
        _unmount(opened.mount)
        try:
            opened.proc.wait(10)
        except subprocess.TimeoutExpired:
            opened.proc.kill()  # ours: nbdfuse, which takes its qemu-nbd with it
            opened.proc.wait()
        for suffix in (".img", ".pid", ".err"):
            opened.mount.with_suffix(suffix).unlink(missing_ok=True)

    def _sweep(self) -> None:
        """Unmount what a reader of a process that died (kill -9) left behind."""
        for mount in self.work_dir.glob("*-*.img"):
            pid = mount.name.partition("-")[0]
            if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
                continue
            _unmount(mount)
            for suffix in (".img", ".pid", ".err"):
                mount.with_suffix(suffix).unlink(missing_ok=True)

    @staticmethod
    def _own(disk: OpenDisk) -> _Opened:
        if not isinstance(disk, _Opened) or disk.fd < 0:
            raise InspectError("not a disk this reader has open")
        return disk

    # ------------------------------------------------------------------ running debugfs

    def _jail(self, cpu_s: float, fsize: int | str = 0) -> list[str]:
        argv = ["prlimit", f"--as={MEMORY_LIMIT}", f"--cpu={max(2, int(cpu_s) + 2)}",
                f"--fsize={fsize}", "--core=0", "--"]
        if self.sandbox_uid is not None:
            argv += ["setpriv", f"--reuid={self.sandbox_uid}", f"--regid={self.sandbox_uid}",
                     "--clear-groups", "--no-new-privs", "--"]
        return argv

    def _run(self, disk: _Opened, commands: Sequence[str], seconds: float, *,
             dir_fd: int | None = None, fsize: int = 0) -> list[str]:
        """Each command's output (text: the commands used print no raw guest bytes)."""
        return self._run_raw(disk, commands, seconds, dir_fd=dir_fd, fsize=fsize)[0]

    def _run_raw(self, disk: _Opened, commands: Sequence[str], seconds: float, *,
                 dir_fd: int | None = None, fsize: int = 0) -> tuple[list[str], str]:
        """`_run`, and debugfs's complaints (stderr)."""
        if seconds <= 0:
            raise _OutOfTime()
        # RLIMIT_FSIZE bounds every file debugfs writes: its output and what it dumps
        argv = [*self._jail(seconds, max(fsize, OUTPUT_LIMIT)), self.debugfs, "-c", "-f", "-",
                f"/proc/self/fd/{disk.fd}"]
        fds = (disk.fd,) if dir_fd is None else (disk.fd, dir_fd)
        script = "".join(c + "\n" for c in commands).encode()
        # files, not pipes: megabytes of `stat` output cost a select loop otherwise
        with tempfile.TemporaryFile() as stdin, tempfile.TemporaryFile() as stdout, \
                tempfile.TemporaryFile() as stderr:
            stdin.write(script)
            stdin.seek(0)
            try:
                subprocess.run(argv, stdin=stdin, stdout=stdout, stderr=stderr,
                               timeout=seconds, pass_fds=fds, env=ENV)
            except subprocess.TimeoutExpired as exc:
                raise _OutOfTime() from exc
            stdout.seek(0)
            stderr.seek(0)
            out, raw_err = stdout.read(), stderr.read(1 << 20)
        err = raw_err.decode("ascii", "replace")
        if "while trying to open" in err or "Filesystem not open" in err:
            if disk.proc.poll() is not None:
                raise InspectError("the read-only export of the disk ended (nbdfuse exited "
                                   f"{disk.proc.returncode})")
            raise Unsupported(_last_lines(raw_err))
        return _sections(out.decode("ascii", "replace"), commands), err

    def _listing(self, disk: _Opened, inode: int, seconds: float) -> _Listing:
        outputs, err = self._run_raw(disk, [f"ls -l <{inode}>"], seconds)
        listing = _parse_ls(outputs[0])
        if inode == ROOT_INODE and listing.itself is None:
            raise Unsupported("the root directory cannot be read, the file system is "
                              f"damaged: {_last_lines(err.encode()) or 'no answer'}")
        return listing

    def _details(self, disk: _Opened, items: Sequence[tuple[Path, _Dirent]], seconds: float,
                 *, dirs: bool) -> list[FileEntry]:
        """FileEntry of each (path, dirent): `stat` for all but symlinks (and directories
        unless `dirs`), symlink targets as hex or with `cat`. An inode that cannot be read
        keeps what its directory entry says."""
        commands: list[str] = []
        for _, d in items:
            kind = file_type(d.mode)
            if kind == FileType.SYMLINK:
                if 0 < d.size <= FAST_SYMLINK_MAX:
                    commands.append(f"inode_dump -b <{d.inode}>")
            elif kind != FileType.DIRECTORY or dirs:
                commands.append(f"stat <{d.inode}>")
        outputs: dict[str, str] = {}
        deadline = time.monotonic() + seconds
        for start in range(0, len(commands), CHUNK):
            chunk = commands[start:start + CHUNK]
            outputs.update(zip(chunk, self._run(disk, chunk, deadline - time.monotonic()),
                               strict=True))
        entries = []
        for path, d in items:
            kind = file_type(d.mode)
            base = FileEntry(path, d.inode, kind, d.mode, d.uid, d.gid, d.size)
            if kind == FileType.SYMLINK:
                if 0 < d.size <= FAST_SYMLINK_MAX:
                    raw = _parse_hexdump(outputs.get(f"inode_dump -b <{d.inode}>", ""), 60)
                    target = raw[:d.size].split(b"\0")[0] if raw is not None else None
                elif 0 < d.size <= SLOW_SYMLINK_MAX:
                    target = self._cat(disk, d.inode, 0, d.size, deadline - time.monotonic())
                else:
                    target = None
                entries.append(FileEntry(path, d.inode, kind, d.mode, d.uid, d.gid, d.size,
                                         None, target, f"symlink:{d.size}"))
                continue
            out = outputs.get(f"stat <{d.inode}>")
            entries.append(_with_stat(base, out) if out is not None else base)
        return entries

    def _cat(self, disk: _Opened, inode: int, offset: int, length: int,
             seconds: float) -> bytes:
        """Bytes [offset, offset+length) of an inode's content, streamed (never all of a
        large file in memory), debugfs stopped once they are read."""
        if seconds <= 0:
            raise _OutOfTime()
        argv = [*self._jail(seconds), self.debugfs, "-c", "-R", f"cat <{inode}>",
                f"/proc/self/fd/{disk.fd}"]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, pass_fds=(disk.fd,), env=ENV)
        killed = threading.Event()

        def stop() -> None:
            killed.set()
            proc.kill()

        timer = threading.Timer(seconds, stop)
        timer.start()
        try:
            assert proc.stdout is not None
            skip = offset
            while skip > 0:
                got = proc.stdout.read(min(skip, 1 << 20))
                if not got:
                    break
                skip -= len(got)
            data = proc.stdout.read(length) if skip <= 0 else b""
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        if killed.is_set():
            raise _OutOfTime()
        return data

    # ------------------------------------------------------------------ the reader

    def _resolve(self, disk: _Opened, path: Path, seconds: float) -> _Dirent:
        """The directory entry at `path`, walked from the root by inode number; a symlink
        on the way is not followed."""
        deadline = time.monotonic() + seconds
        root = self._listing(disk, ROOT_INODE, seconds).itself
        assert root is not None
        current = root
        for depth, name in enumerate(path):
            if file_type(current.mode) != FileType.DIRECTORY:
                what = "a symlink (not followed)" if file_type(current.mode) == \
                    FileType.SYMLINK else "not a directory"
                raise NotADirectory(f"{display_path(path[:depth])} is {what}")
            listing = self._listing(disk, current.inode, deadline - time.monotonic())
            found = next((e for e in listing.entries if e.name == name), None)
            if found is None:
                raise NotFound(f"{display_path(path[:depth + 1])}: no such file or directory")
            current = found
        return current

    def stat(self, disk: OpenDisk, path: Path) -> FileEntry:
        opened = self._own(disk)
        try:
            dirent = self._resolve(opened, path, 60.0)
            return self._details(opened, [(path, dirent)], 30.0, dirs=True)[0]
        except _OutOfTime as exc:
            raise InspectError("reading the file system took too long") from exc

    def list_dir(self, disk: OpenDisk, path: Path, *, after: bytes | None = None,
                 limit: int = 1000) -> DirPage:
        opened = self._own(disk)
        try:
            dirent = self._resolve(opened, path, 60.0)
            if file_type(dirent.mode) != FileType.DIRECTORY:
                raise NotADirectory(f"{display_path(path)} is not a directory")
            listing = self._listing(opened, dirent.inode, 60.0)
            unique = _unique(listing.entries)
            names = sorted(unique)
            start = 0 if after is None else next(
                (i for i, n in enumerate(names) if n > after), len(names))
            page = names[start:start + max(0, limit)]
            entries = self._details(opened, [((*path, n), unique[n]) for n in page], 60.0,
                                    dirs=True)
            directory = self._details(opened, [(path, dirent)], 30.0, dirs=True)[0]
        except _OutOfTime as exc:
            raise InspectError("reading the file system took too long") from exc
        return DirPage(directory, entries, len(names), start + len(page) < len(names))

    def read_file(self, disk: OpenDisk, path: Path, *, offset: int = 0,
                  length: int = 1 << 20) -> bytes:
        opened = self._own(disk)
        try:
            dirent = self._resolve(opened, path, 60.0)
            kind = file_type(dirent.mode)
            if kind != FileType.FILE:
                raise NotAFile(f"{display_path(path)} is a {kind.value}, not a regular file"
                               + (" (a symlink is never followed)"
                                  if kind == FileType.SYMLINK else ""))
            if offset >= dirent.size or length <= 0:
                return b""
            length = min(length, dirent.size - offset)
            entry = self._details(opened, [(path, dirent)], 30.0, dirs=False)[0]
            mapping = _mapping(entry.layout, opened.block_size)
            if mapping is not None:  # straight from the image: no process, O(length)
                data = _read_mapped(opened.fd, mapping, opened.block_size, offset, length)
                if data is not None:
                    return data
            return self._cat(opened, dirent.inode, offset, length, 120.0)
        except _OutOfTime as exc:
            raise InspectError("reading the file took too long") from exc

    def walk(self, disk: OpenDisk, budget: Budget) -> Walk:
        opened = self._own(disk)
        walk = Walk()
        if opened.needs_recovery:
            walk.notes.append("the journal holds changes the guest had not yet written in "
                              "place (it was not shut down cleanly); they are not replayed, "
                              "so the most recent changes may be missing")
        queue: list[tuple[Path, int]] = [((), ROOT_INODE)]
        seen_dirs = {ROOT_INODE}
        try:
            while queue:
                batch, queue = queue[:CHUNK], queue[CHUNK:]
                if budget.expired():
                    raise _OutOfTime()
                outputs = self._run(opened, [f"ls -l <{ino}>" for _, ino in batch],
                                    budget.left())
                found: list[tuple[Path, _Dirent]] = []
                listed: list[Path] = []
                for (path, _ino), out in zip(batch, outputs, strict=True):
                    listing = _parse_ls(out)
                    walk.notes += [f"{display_path(path)}: {n}" for n in listing.notes]
                    if listing.itself is None:
                        walk.notes.append(f"{display_path(path)}: cannot be read")
                        continue
                    unique = _unique(listing.entries)
                    if len(unique) < len(listing.entries):
                        walk.notes.append(f"{display_path(path)}: names listed twice")
                    if len(walk.entries) + len(found) + len(unique) > budget.max_entries:
                        walk.partial = (f"stopped at {budget.max_entries} entries (the "
                                        "entry budget)")
                        queue = []
                        break
                    found += [((*path, name), d) for name, d in sorted(unique.items())]
                    listed.append(path)
                for entry in self._details(opened, found, budget.left(), dirs=False):
                    walk.entries[entry.path] = entry
                    if entry.type == FileType.DIRECTORY:
                        if entry.inode in seen_dirs:
                            walk.notes.append(f"{display_path(entry.path)}: a directory "
                                              "seen before (a loop): not entered")
                            continue
                        seen_dirs.add(entry.inode)
                        queue.append((entry.path, entry.inode))
                walk.listed.update(listed)
                if walk.partial:
                    break
        except _OutOfTime:
            walk.partial = f"stopped after {budget.seconds:.0f} s (the time budget)"
        return walk

    def same_content(self, before: OpenDisk, after: OpenDisk,
                     pairs: Sequence[tuple[FileEntry, FileEntry]],
                     budget: Budget) -> list[bool | None]:
        a, b = self._own(before), self._own(after)
        results: list[bool | None] = [None] * len(pairs)
        changed = _changed_clusters(a.image, b.image)
        read = 0
        to_hash: list[int] = []
        for i, (x, y) in enumerate(pairs):
            if x.size != y.size:
                results[i] = False
            elif x.size == 0:
                results[i] = True
            elif changed is not None and x.layout and x.layout == y.layout and \
                    not x.layout.startswith("inline") and a.block_size == b.block_size:
                blocks = _touched_blocks(x.layout, a.block_size, *changed)
                if not blocks:
                    results[i] = True
                    continue
                if read + 2 * len(blocks) * a.block_size > budget.max_bytes or \
                        budget.expired():
                    continue
                read += 2 * len(blocks) * a.block_size
                if all(os.pread(a.fd, a.block_size, n * a.block_size) ==
                       os.pread(b.fd, b.block_size, n * b.block_size) for n in blocks):
                    results[i] = True
                else:
                    to_hash.append(i)
            else:
                to_hash.append(i)
        chosen, budget_left = [], budget.max_bytes - read
        for i in sorted(to_hash, key=lambda i: pairs[i][0].size):
            if 2 * pairs[i][0].size <= budget_left:
                chosen.append(i)
                budget_left -= 2 * pairs[i][0].size
        try:
            digests_a = self._digests(a, [pairs[i][0] for i in chosen], budget)
            digests_b = self._digests(b, [pairs[i][1] for i in chosen], budget)
        except _OutOfTime:
            return results
        for i in chosen:
            da, db = digests_a.get(pairs[i][0].inode), digests_b.get(pairs[i][1].inode)
            if da is not None and db is not None:
                results[i] = da == db
        return results

    def _digests(self, disk: _Opened, entries: Sequence[FileEntry],
                 budget: Budget) -> dict[int, str]:
        """sha256 of each entry's content, dumped by debugfs into a private directory
        (named by a counter; read, hashed and removed at once)."""
        if not entries:
            return {}
        out: dict[int, str] = {}
        tmp = tempfile.mkdtemp(prefix="cmp-", dir=self.work_dir)
        dir_fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if self.sandbox_uid is not None:
                os.chown(tmp, self.sandbox_uid, self.sandbox_uid)
            batches: list[list[FileEntry]] = []
            size = 0
            for entry in entries:
                if not batches or size + entry.size > DUMP_BATCH_BYTES:
                    batches.append([])
                    size = 0
                batches[-1].append(entry)
                size += entry.size
            for batch in batches:
                self._run(disk, [f"dump <{e.inode}> /proc/self/fd/{dir_fd}/{k}"
                                 for k, e in enumerate(batch)], budget.left(), dir_fd=dir_fd,
                          fsize=max(e.size for e in batch) + 1)
                for k, e in enumerate(batch):
                    target = os.path.join(tmp, str(k))
                    with contextlib.suppress(FileNotFoundError):
                        if os.path.getsize(target) == e.size:
                            out[e.inode] = _sha256(target)
                        os.unlink(target)
            return out
        finally:
            os.close(dir_fd)
            shutil.rmtree(tmp, ignore_errors=True)

    # ------------------------------------------------------------------ writing

    @contextlib.contextmanager
    def open_writable(self, image: DiskImage) -> Iterator[_Opened]:
        if image.snapshot_id is not None:
            raise InspectError("a snapshot is never opened for writing")
        with self._open(image, writable=True) as opened:
            yield opened

    def _run_rw(self, disk: _Opened, commands: Sequence[bytes], seconds: float,
                source_fd: int | None = None) -> str:
        """`debugfs -w` running `commands` (bytes: guest names, checked by `_safe_name`,
        are written as they are); InspectError with debugfs's complaints if it had any."""
        argv = [*self._jail(seconds, "unlimited"), self.debugfs, "-w", "-f", "-",
                f"/proc/self/fd/{disk.fd}"]
        fds = (disk.fd,) if source_fd is None else (disk.fd, source_fd)
        try:
            done = subprocess.run(argv, input=b"".join(c + b"\n" for c in commands),
                                  capture_output=True, timeout=seconds, pass_fds=fds, env=ENV)
        except subprocess.TimeoutExpired as exc:
            raise InspectError("writing the file system took too long") from exc
        complaints = [line for line in done.stderr.decode("utf-8", "replace").splitlines()
                      if line.strip() and not line.startswith("debugfs ")]
        if done.returncode != 0 or complaints:
            raise InspectError("debugfs could not write the file: " +
                               " ".join(complaints)[:500] or f"exit {done.returncode}")
        return done.stdout.decode("ascii", "replace")

    def put_file(self, disk: OpenDisk, directory: Path, name: bytes, source: BinaryIO, *,
                 mode: int, uid: int, gid: int, mtime_ns: int | None = None) -> None:
        """The new content goes into a temporary entry of the directory (named by ecsnap),
        gets its mode, owner and mtime, and only then replaces `name` (rm, ln, unlink, in
        one debugfs run). A temporary entry an interrupted run left is removed first (or,
        if it already is `name`'s inode, only unlinked). The mtime's nanoseconds go into
        `mtime_extra` (set first: `sif mtime` keeps its nanosecond bits and sets its epoch
        bits), only when there are some (an inode of 128 bytes has no extra field)."""
        opened = self._own(disk)
        if not opened.writable:
            raise InspectError("the disk is open read-only")
        _safe_name(name)
        where = display_path((*directory, name))
        try:
            dirent = self._resolve(opened, directory, 60.0)
            if file_type(dirent.mode) != FileType.DIRECTORY:
                raise NotADirectory(f"{display_path(directory)} is not a directory")
            entries = _unique(self._listing(opened, dirent.inode, 60.0).entries)
        except _OutOfTime as exc:
            raise InspectError("reading the file system took too long") from exc
        temp = b".ecsnap-restore-" + hashlib.sha256(name).hexdigest()[:16].encode()
        current, stale = entries.get(name), entries.get(temp)
        if current is not None and file_type(current.mode) not in (FileType.FILE,
                                                                    FileType.SYMLINK):
            raise NotAFile(f"{where} is a {file_type(current.mode).value} on the disk: only a "
                           "regular file or a symlink is replaced")
        quoted = b'"' + name + b'"'
        commands = [f"cd <{dirent.inode}>".encode()]
        if stale is not None:
            same = current is not None and current.inode == stale.inode
            commands.append(b"unlink " + temp if same else b"rm " + temp)
        with tempfile.NamedTemporaryFile(dir=self.work_dir, prefix="put-") as copy:
            shutil.copyfileobj(source, copy, 1 << 20)
            copy.flush()
            if self.sandbox_uid is not None:
                os.chown(copy.name, self.sandbox_uid, self.sandbox_uid)
            src = os.open(copy.name, os.O_RDONLY | os.O_CLOEXEC)
            try:
                commands += [f"write /proc/self/fd/{src} ".encode() + temp,
                             b"sif " + temp + f" mode 0{0o100000 | (mode & 0o7777):o}".encode(),
                             b"sif " + temp + f" uid {uid}".encode(),
                             b"sif " + temp + f" gid {gid}".encode()]
                if mtime_ns is not None:
                    seconds, nsec = divmod(mtime_ns, 1_000_000_000)
                    if nsec:
                        commands.append(b"sif " + temp + f" mtime_extra {nsec << 2}".encode())
                    commands.append(b"sif " + temp + f" mtime @{seconds}".encode())
                if current is not None:
                    commands.append(b"rm " + quoted)
                commands += [b"ln " + temp + b" " + quoted, b"unlink " + temp]
                self._run_rw(opened, commands, 300.0, src)
            finally:
                os.close(src)

    def check(self, disk: OpenDisk) -> None:
        """`e2fsck -f -p` (preen: fixes only what is safe to fix without asking, such as
        the block counts an interrupted write leaves), in the same jail as debugfs."""
        opened = self._own(disk)
        argv = [*self._jail(600.0, "unlimited" if opened.writable else 0), "e2fsck", "-f",
                "-p" if opened.writable else "-n", f"/proc/self/fd/{opened.fd}"]
        try:
            done = subprocess.run(argv, capture_output=True, timeout=600, pass_fds=(opened.fd,),
                                  env=ENV)
        except subprocess.TimeoutExpired as exc:
            raise InspectError("checking the file system took too long") from exc
        if done.returncode not in (0, 1):
            raise InspectError(f"the file system check found errors it could not fix (e2fsck "
                               f"exit {done.returncode}): "
                               f"{_last_lines(done.stdout + done.stderr, 3)}")


# ---------------------------------------------------------------------- helpers


def _safe_name(name: bytes) -> None:
    """Unsupported unless `name` can be given to debugfs as it is, between double quotes:
    no control character, `"`, `/` or NUL, not `.`/`..`, not starting with `<` (debugfs
    would read `<N>` as an inode number), at most 255 bytes."""
    if not name or name in (b".", b"..") or len(name) > 255 or name.startswith(b"<") or \
            any(b < 0x20 or b == 0x7F or b in b'"/' for b in name):
        raise Unsupported(f"the name {escape_name(name)!r} cannot be written onto a stopped "
                          "disk (a control character, a quote, a slash or a leading <): "
                          "restore it into the running instance instead")


def _rbd_location(image: DiskImage, writable: bool) -> RbdLocation | None:
    """The Ceph RBD image a location names (None for a file); Unsupported for what is not
    read here: writing (a disk on RBD is not written through this reader), or a keyring
    outside ceph.conf (QEMU's rbd node would need the key as a secret object)."""
    try:
        rbd = RbdLocation.parse(image.location)
    except ValueError as exc:
        raise Unsupported(str(exc)) from exc
    if rbd is not None and writable:
        raise Unsupported("files are not written onto disks on Ceph RBD")
    if rbd is not None and rbd.keyring:
        raise Unsupported("a disk on Ceph RBD whose keyring ceph.conf does not name cannot "
                          "be looked inside yet")
    return rbd


def _rbd_opts(rbd: RbdLocation, snapshot_id: str | None) -> str:
    """qemu-nbd's --image-opts of a raw view of the RBD image (read-only, at the snapshot)."""
    opts = {"driver": "raw", "file.driver": "rbd", "file.pool": rbd.pool,
            "file.image": rbd.image, "file.conf": rbd.conf, "file.user": rbd.client,
            "file.snapshot": snapshot_id or ""}
    return ",".join(f"{k}={v.replace(',', ',,')}" for k, v in opts.items() if v)


def _where(image: DiskImage) -> str:
    what = image.label or image.location
    return f"{what} at snapshot {image.snapshot_id}" if image.snapshot_id else \
        f"{what} (current state)"


def _last_lines(data: bytes, count: int = 2) -> str:
    lines = [line.strip() for line in data.decode("utf-8", "replace").splitlines()
             if line.strip() and not line.startswith("debugfs ")]
    return " ".join(lines[-count:])[:500]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _mounted(path: HostPath) -> bool:
    """Whether a mount sits on `path` (from /proc/self/mountinfo: a FUSE mount whose
    daemon died cannot even be stat'ed)."""
    target = str(path).encode()
    try:
        with open("/proc/self/mountinfo", "rb") as fh:
            for line in fh:
                fields = line.split(b" ")
                if len(fields) > 4 and re.sub(rb"\\([0-7]{3})", lambda m: bytes(
                        [int(m.group(1), 8)]), fields[4]) == target:
                    return True
    except OSError:
        return os.path.ismount(path)
    return False


def _unmount(mount: HostPath) -> None:
    for argv in (["fusermount3", "-u", str(mount)], ["fusermount3", "-u", "-z", str(mount)]):
        if not _mounted(mount):
            return
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(argv, capture_output=True, timeout=30, env=ENV)


def _superblock(fd: int, image: DiskImage) -> tuple[int, bool]:
    """(block size, journal needs recovery) from the ext2/3/4 superblock; Unsupported when
    the disk holds none at its start."""
    head = os.pread(fd, 2048, 0)
    if len(head) < 2048:
        raise Unsupported(f"{image.label or 'the disk'} is too small to hold a file system")
    magic = struct.unpack_from("<H", head, 1024 + 56)[0]
    if magic != 0xEF53:
        if head[510:512] == b"\x55\xaa":
            raise Unsupported("the disk has a partition table: only a file system on the "
                              "whole disk (as the demo image has) is read for now")
        if not any(head):
            raise Unsupported("the disk holds no file system (it reads as zeros)")
        raise Unsupported("no ext2/ext3/ext4 file system at the start of the disk (bad "
                          "superblock magic): other file systems cannot be read yet")
    log_block = struct.unpack_from("<I", head, 1024 + 24)[0]
    if log_block > 6:
        raise Unsupported(f"corrupted superblock (block size 2^{10 + log_block})")
    incompat = struct.unpack_from("<I", head, 1024 + 96)[0]
    return 1024 << log_block, bool(incompat & 0x4)


def _sections(out: str, commands: Sequence[str]) -> list[str]:
    """Split a `debugfs -f` run's output at the echo of each command (`debugfs: CMD`); the
    commands' own output never holds a raw guest line, so an echo cannot be forged."""
    result = [""] * len(commands)
    k, current = -1, list[str]()
    for line in out.split("\n"):
        if k + 1 < len(commands) and line == "debugfs: " + commands[k + 1]:
            if k >= 0:
                result[k] = "\n".join(current)
            k, current = k + 1, []
        elif k >= 0:
            current.append(line)
    if k >= 0:
        result[k] = "\n".join(current)
    return result


def _parse_ls(out: str) -> _Listing:
    listing = _Listing(None)
    for line in out.split("\n"):
        match = _LS.match(line)
        if match is None:
            continue
        ino, mode, _kind, uid, gid, size, _date, text = match.groups()
        if int(ino) == 0:
            continue
        if not _LS_NAME.fullmatch(text):
            listing.notes.append("an entry with an unreadable name was left out")
            continue
        name = _ESCAPED.sub(lambda m: chr(int(m.group(1), 16)), text).encode("latin-1")
        dirent = _Dirent(name, int(ino), int(mode, 8), int(uid) & 0xFFFFFFFF,
                         int(gid) & 0xFFFFFFFF, int(size))
        if name == b".":
            listing.itself = listing.itself or dirent
        elif name == b"..":
            continue
        elif not name:
            listing.notes.append("an entry with an empty name was left out")
        else:  # even a name with a `/` (invalid, but a crafted image has one): escaped
            listing.entries.append(dirent)
    return listing


def _unique(entries: Sequence[_Dirent]) -> dict[bytes, _Dirent]:
    out: dict[bytes, _Dirent] = {}
    for e in entries:
        out.setdefault(e.name, e)
    return out


def _with_stat(base: FileEntry, out: str) -> FileEntry:
    lines = out.split("\n")
    head = _STAT_INODE.match(lines[0]) if lines else None
    if head is None or int(head.group(1)) != base.inode:
        return base
    flags = _STAT_FLAGS.search(lines[0])
    size = _STAT_SIZE.search(out)
    mtime = _STAT_MTIME.search(out)
    mtime_ns = None
    if mtime is not None:
        seconds = int(mtime.group(1), 16)
        seconds -= (1 << 32) if seconds & (1 << 31) else 0
        nsec = 0
        if mtime.group(2) is not None:
            extra = int(mtime.group(2), 16)
            seconds += (extra & 3) << 32
            nsec = extra >> 2
        mtime_ns = seconds * 1_000_000_000 + nsec
    layout = ""
    for k, line in enumerate(lines):
        if line in ("EXTENTS:", "BLOCKS:"):
            layout = " ".join(x.strip() for x in lines[k + 1:] if x.strip())
            break
        if line.startswith("Size of inline data:"):
            layout = "inline " + line.split(":", 1)[1].strip()
            break
        if "Device major/minor number:" in line:
            layout = "device " + line.split(":", 1)[1].strip()
            break
    if flags is not None and int(flags.group(1), 16) & INLINE_DATA_FL and \
            not layout.startswith("inline"):
        layout = "inline " + layout
    return FileEntry(base.path, base.inode, base.type, base.mode, base.uid, base.gid,
                     int(size.group(1)) if size else base.size, mtime_ns, None, layout)


def _parse_hexdump(out: str, length: int) -> bytes | None:
    """The bytes of debugfs's hexdump (`%04o  xxxx xxxx … ascii`, `*` for repeated lines)."""
    data = bytearray()
    previous: bytes | None = None
    repeat = False
    for line in out.split("\n"):
        if line == "*":
            repeat = True
            continue
        match = _HEX.match(line)
        if match is None:
            continue
        offset = int(match.group(1), 8)
        if repeat and previous:
            while len(data) < offset:
                data += previous
            repeat = False
        if offset != len(data):
            return None
        try:
            previous = bytes.fromhex(match.group(2).replace(" ", ""))
        except ValueError:
            return None
        data += previous
    if repeat and previous:
        while len(data) < length:
            data += previous
    return bytes(data[:length]) if len(data) >= length else None


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _mapping(layout: str, block_size: int) -> list[tuple[int, int, int, bool]] | None:
    """(first logical block, count, first physical block, unwritten) of each data extent
    of a `stat` layout (extents or block map); None when the content is not all in mapped
    blocks (inline data, a device, an unreadable layout)."""
    if not layout or layout.startswith(("inline", "device", "symlink")):
        return None
    out = []
    for match in _DATA_RANGE.finditer(layout):
        first, last, unwritten, phys = match.groups()[:4]
        count = (int(last) if last else int(first)) - int(first) + 1
        if count <= 0:
            return None
        out.append((int(first), count, int(phys), bool(unwritten)))
    return out


def _read_mapped(fd: int, mapping: Sequence[tuple[int, int, int, bool]], block_size: int,
                 offset: int, length: int) -> bytes | None:
    """Bytes [offset, offset+length) of a file from its mapping: holes and unwritten
    extents read as zeros. None when the image is shorter than the mapping says."""
    out = bytearray(length)
    end = offset + length
    for first, count, phys, unwritten in mapping:
        lo, hi = max(offset, first * block_size), min(end, (first + count) * block_size)
        if lo >= hi or unwritten:
            continue
        data = os.pread(fd, hi - lo, phys * block_size + lo - first * block_size)
        if len(data) != hi - lo:
            return None
        out[lo - offset:hi - offset] = data
    return bytes(out)


def _touched_blocks(layout: str, block_size: int, cluster_bits: int,
                    changed: list[int]) -> list[int]:
    """The file-system blocks of a layout (data, and extent or indirect blocks) that lie in
    a changed cluster of the disk (`changed`: sorted cluster indexes)."""
    out: list[int] = []
    for match in _RANGE.finditer(layout):
        first = int(match.group(2))
        last = int(match.group(3)) if match.group(3) else first
        if last < first:
            last = first
        lo = (first * block_size) >> cluster_bits
        hi = ((last + 1) * block_size - 1) >> cluster_bits
        for cluster in changed[bisect.bisect_left(changed, lo):bisect.bisect_right(changed, hi)]:
            start = max(first, (cluster << cluster_bits) // block_size)
            end = min(last, (((cluster + 1) << cluster_bits) - 1) // block_size)
            out.extend(b for b in range(start, end + 1) if not out or b > out[-1])
    return out


def _changed_clusters(a: DiskImage, b: DiskImage) -> tuple[int, list[int]] | None:
    """(cluster bits, the guest clusters whose mapping differs) between two points of one
    qcow2 disk file; None when the images are not two points of one qcow2 file."""
    if a.location != b.location or not os.path.isfile(a.location):
        return None
    try:
        with open(a.location, "rb") as fh:
            header = qcow2meta.read_header(fh)
            tables = []
            for image in (a, b):
                if image.snapshot_id is None:
                    tables.append((header.l1_offset, header.l1_size))
                else:
                    snap = header.snapshot(image.snapshot_id)
                    if snap is None:
                        return None
                    tables.append((snap.l1_offset, snap.l1_size))
            return header.cluster_bits, sorted(_differing(fh, header, tables[0], tables[1]))
    except (OSError, qcow2meta.Qcow2FormatError, struct.error):
        return None


def _table(fh: BinaryIO, offset: int, entries: int) -> list[int]:
    if not entries:
        return []
    fh.seek(offset)
    data = fh.read(8 * entries)
    if len(data) != 8 * entries:
        raise qcow2meta.Qcow2FormatError("truncated table")
    return [e & ~qcow2meta.COPIED for e in struct.unpack(f">{entries}Q", data)]


def _differing(fh: BinaryIO, header: qcow2meta.Header, one: tuple[int, int],
               two: tuple[int, int]) -> set[int]:
    l1_a, l1_b = _table(fh, *one), _table(fh, *two)
    words = header.cluster_size // 8
    per_entry = header.l2_entry_bytes // 8
    per_table = words // per_entry
    changed: set[int] = set()
    for index in range(max(len(l1_a), len(l1_b))):
        x = l1_a[index] if index < len(l1_a) else 0
        y = l1_b[index] if index < len(l1_b) else 0
        if x == y:
            continue
        la = _table(fh, x & qcow2meta.OFFSET_MASK, words) if x & qcow2meta.OFFSET_MASK \
            else [0] * words
        lb = _table(fh, y & qcow2meta.OFFSET_MASK, words) if y & qcow2meta.OFFSET_MASK \
            else [0] * words
        for k in range(per_table):
            if la[k * per_entry:(k + 1) * per_entry] != lb[k * per_entry:(k + 1) * per_entry]:
                changed.add(index * per_table + k)
    return changed
