"""The qcow2 storage backend: one directory per pool, one qcow2 file per disk.

Everything that writes goes through `qemu-img` (create, snapshot, apply, resize, convert);
ecsnap never writes qcow2 metadata itself, nor copies whole disk files. Questions (does
this snapshot exist, what size is the disk, what was written since a snapshot) are
answered by reading the metadata with `qcow2meta`, which costs no process: a `qemu-img
info` is 10 ms here, as much as the `qemu-img snapshot` that does the work.

Snapshots are qcow2 internal snapshots named by snapshot ID, inside the disk's file, so a
snapshot and a revert cost a metadata update, whatever the disk's size. The calls of a
multi-disk operation run side by side, one `qemu-img` process per disk file.

Bytes written since a snapshot: comparing the snapshot's L1/L2 tables with the active
layer's (see `qcow2meta`), O(metadata changed), never O(disk size), and exact whenever it
is asked, with nothing to record when the snapshot is taken.
"""

from __future__ import annotations

import json
import os
import resource
import stat
import struct
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from ecsnap.adapters.storage import qcow2meta
from ecsnap.adapters.storage.base import SnapshotInfo, StorageError
from ecsnap.adapters.storage.parallel import side_by_side
from ecsnap.filemodes import private_dir

T = TypeVar("T")


class Qcow2Backend:
    def __init__(self, pool_dir: str, qemu_img: str = "qemu-img") -> None:
        self.pool = private_dir(pool_dir)  # 0700: every tenant's disks
        self.qemu_img = qemu_img

    # ------------------------------------------------------------ plumbing

    def _run(self, *args: str) -> str:
        """`qemu-img ARGS`. A disk whose image lock another qemu-img holds is waited for,
        up to LOCK_WAIT_S: after a kill -9 of ecsnap its qemu-img children may still be
        finishing when recovery undoes their work (seen in the soak's crash trials)."""
        cmd = [self.qemu_img, *args]
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True)
            except OSError as exc:
                raise StorageError(f"{' '.join(cmd)}: {exc}") from exc
            if proc.returncode == 0:
                return proc.stdout
            why = proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}"
            if "Failed to get" not in why or "lock" not in why or \
                    time.monotonic() > deadline:
                raise StorageError(f"{' '.join(cmd)}: {why}")
            time.sleep(0.1)

    def _info_of(self, path: str) -> dict[str, Any]:
        return dict(json.loads(self._run("info", "-U", "--output=json", path)))

    def _header(self, disk_id: str) -> qcow2meta.Header:
        try:
            with open(self.path(disk_id), "rb") as fh:
                return qcow2meta.read_header(fh)
        except FileNotFoundError as exc:
            raise StorageError(f"{self.path(disk_id)}: no such disk file") from exc
        except (OSError, qcow2meta.Qcow2FormatError) as exc:
            raise StorageError(f"{self.path(disk_id)}: {exc}") from exc

    # ------------------------------------------------------------ lifecycle

    def path(self, disk_id: str) -> str:
        return str(self.pool / f"{disk_id}.qcow2")

    def exists(self, disk_id: str) -> bool:
        return os.path.exists(self.path(disk_id))

    def create_blank(self, disk_id: str, size_bytes: int) -> None:
        self._run("create", "-q", "-f", "qcow2", self.path(disk_id), str(size_bytes))

    def create_from_image(self, disk_id: str, image_path: str, size_bytes: int) -> None:
        base = str(Path(image_path).resolve())
        info = self._info_of(base)
        size = max(size_bytes, int(info["virtual-size"]))
        self._run("create", "-q", "-f", "qcow2", "-b", base, "-F", str(info["format"]),
                  self.path(disk_id), str(size))

    def resize(self, disk_id: str, size_bytes: int) -> None:
        if size_bytes < self.virtual_size(disk_id):
            raise StorageError(f"{disk_id}: disks only grow ({size_bytes} bytes asked)")
        self._run("resize", "-q", self.path(disk_id), str(size_bytes))

    def delete(self, disk_id: str) -> None:
        """The disk's file, its handle on a snapshot base (a disk from a snapshot) and the
        bases of its own snapshots (the disks made from them keep theirs). The handle goes
        first: a delete cut short is finished by the next one."""
        bases = self.pool / BASES
        for link in bases.glob(f"*+{disk_id}.qcow2") if bases.is_dir() else ():
            link.unlink(missing_ok=True)
        for name in [s.name for s in self.list_snapshots(disk_id)] if self.exists(disk_id) \
                else []:
            self._base(disk_id, name).unlink(missing_ok=True)
        Path(self.path(disk_id)).unlink(missing_ok=True)

    # ------------------------------------------------------------ disks from snapshots

    def _base(self, source_disk_id: str, snapshot_id: str, disk_id: str = "") -> Path:
        """The base file of a snapshot (`disk_id` empty), or a disk's hard link to it."""
        name = f"{source_disk_id}@{snapshot_id}" + (f"+{disk_id}" if disk_id else "")
        return self.pool / BASES / f"{name}.qcow2"

    def create_from_snapshot(self, disk_id: str, source_disk_id: str, snapshot_id: str,
                             size_bytes: int) -> None:
        """A qcow2 overlay on the snapshot's *base*: QEMU cannot open an internal snapshot
        as a backing file, so the snapshot is exported once (`qemu-img convert -l`, the
        data the snapshot holds, O(allocated), not O(size)) into a read-only, standalone
        base file `.bases/SOURCE@SNAPSHOT.qcow2`, which every later disk from the same
        snapshot shares: those cost one `qemu-img create`, whatever their size. (Options
        measured and left: a full copy per disk, O(data) each time; a reflink copy of the
        source file, O(1) but only on btrfs/XFS, not the ext4 pools run on.)

        Each disk's backing file is its own hard link to the base, `...+DISK.qcow2`: the
        file system counts who needs the data. Deleting the snapshot (or its disk) drops
        the base's own name; deleting a disk drops its link; the data goes with the last
        name, with nothing to scan or to collect."""
        _check_name(snapshot_id)
        base, link = self._base(source_disk_id, snapshot_id), \
            self._base(source_disk_id, snapshot_id, disk_id)
        Path(self.path(disk_id)).unlink(missing_ok=True)  # a crash's leftover (not its link)
        if not link.exists():
            if not base.exists():
                self._export(source_disk_id, snapshot_id, base)
            try:
                os.link(base, link)
            except FileExistsError:
                pass
            except FileNotFoundError as exc:
                raise StorageError(f"{source_disk_id}: snapshot {snapshot_id} was deleted "
                                   "meanwhile") from exc
        size = max(size_bytes, self._info_of_qcow2(str(link))["virtual-size"])
        self._run("create", "-q", "-f", "qcow2", "-b", str(link), "-F", "qcow2",
                  self.path(disk_id), str(size))

    def export_snapshot(self, source_disk_id: str, snapshot_id: str, target: str) -> int:
        """A custom image's template: the snapshot exported as a snapshot's base is
        (read-only, standalone)."""
        _check_name(snapshot_id)
        self._export(source_disk_id, snapshot_id, Path(target))
        return int(self._info_of_qcow2(target)["virtual-size"])

    def _export(self, source_disk_id: str, snapshot_id: str, base: Path) -> None:
        """The snapshot's content into the read-only standalone file `base` (atomically:
        a staging file renamed; two exports side by side both give the same bytes)."""
        if not self.has_snapshot(source_disk_id, snapshot_id):
            raise StorageError(f"{source_disk_id}: no snapshot {snapshot_id}")
        private_dir(str(base.parent))
        staging = base.with_name(f".{base.name}.{os.getpid()}.{time.monotonic_ns()}")
        try:
            # -U: the source may be open in a running VM; the snapshot's clusters are
            # never written while the snapshot exists (the caller holds the disk's lock,
            # so it is not deleted meanwhile)
            self._run("convert", "-q", "-U", "-f", "qcow2", "-O", "qcow2",
                      "-l", f"snapshot.name={snapshot_id}", self.path(source_disk_id),
                      str(staging))
            staging.chmod(0o400)
            os.replace(staging, base)
        finally:
            staging.unlink(missing_ok=True)

    def virtual_size(self, disk_id: str) -> int:
        return self._header(disk_id).virtual_size

    def allocated_bytes(self, disk_id: str) -> int:
        """Bytes the file takes on the host, snapshots included."""
        try:
            return os.stat(self.path(disk_id)).st_blocks * 512
        except FileNotFoundError:
            return 0

    # ------------------------------------------------------------ image import

    def import_image(self, source: str, target: str) -> int:
        """Convert the image file `source` into a standalone qcow2 at `target` (overwritten
        if it exists); its virtual size.

        The file is whoever's, so nothing but that file is ever read (an image whose header
        names a host file or another tenant's disk would otherwise build it into an image
        every account can boot):
        - `source` is a path, never a protocol name (`nbd:…`, `json:{…}`); it is opened
          once, and qemu-img reads that open file (/dev/fd/N): the file checked is the file
          converted;
        - qemu-img never guesses the format: the qcow2 magic makes it qcow2, anything else
          is raw (its bytes are the disk), given with -f to every call;
        - a qcow2 whose header names a backing file or an external data file is refused
          before qemu-img opens it; then `qemu-img info -U -f FMT` (under CPU and memory
          limits, as OpenStack inspects images) must report the same format, no backing
          file and no data file, or the image is refused;
        - the conversion (`-f FMT`, no backing file to follow) writes a qcow2 with none.
        """
        if ":" in source.split("/", 1)[0]:
            raise StorageError(f"{source}: a protocol name, not a file path (write ./{source} "
                               "for a file of that name)")
        try:
            fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise StorageError(f"{source}: {exc.strerror}") from exc
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise StorageError(f"{source}: not a regular file")
            head = os.pread(fd, IMPORT_HEADER_BYTES, 0)
            fmt = "qcow2" if head[:4] == qcow2meta.MAGIC else "raw"
            if fmt == "qcow2":
                _refuse_external_references(source, head)
            info = json.loads(self._read_fd(fd, "info", "--output=json", "--force-share",
                                            "-f", fmt, limited=True))
            _check_standalone(source, fmt, info)
            self._read_fd(fd, "convert", "-q", "--force-share", "-f", fmt, "-O", "qcow2",
                          target=target)
        finally:
            os.close(fd)
        made = self._info_of_qcow2(target)
        if made.get("backing-filename") or made.get("format") != "qcow2":
            raise StorageError(f"{target}: the converted image is not a standalone qcow2")
        return int(made["virtual-size"])

    def _read_fd(self, fd: int, *args: str, target: str = "", limited: bool = False) -> str:
        """`qemu-img ARGS /dev/fd/FD [TARGET]`; with `limited`, under INSPECT_LIMITS."""
        cmd = [self.qemu_img, *args, f"/dev/fd/{fd}", *([target] if target else [])]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, pass_fds=(fd,),
                                  preexec_fn=_inspect_limits if limited else None)
        except OSError as exc:
            raise StorageError(f"{' '.join(cmd)}: {exc}") from exc
        if proc.returncode != 0:
            why = proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}"
            if proc.returncode < 0:
                why += f" (killed by signal {-proc.returncode}: over its CPU or memory limit?)"
            raise StorageError(f"{' '.join(cmd)}: {why}")
        return proc.stdout

    def _info_of_qcow2(self, path: str) -> dict[str, Any]:
        return dict(json.loads(self._run("info", "-U", "--output=json", "-f", "qcow2", path)))

    # ------------------------------------------------------------ snapshots

    def list_snapshots(self, disk_id: str) -> list[SnapshotInfo]:
        if not self.exists(disk_id):
            return []
        return [SnapshotInfo(s.name, s.vm_state_size, s.date_sec)
                for s in self._header(disk_id).snapshots]

    def has_snapshot(self, disk_id: str, snapshot_id: str) -> bool:
        return self.exists(disk_id) and self._header(disk_id).snapshot(snapshot_id) is not None

    def create_snapshots(self, items: Sequence[tuple[str, str]]) -> None:
        for _, snapshot_id in items:
            _check_name(snapshot_id)
        made: list[tuple[str, str]] = []

        def take(disk_id: str) -> None:  # one disk's snapshots, in order
            for d, snapshot_id in items:
                # qcow2 would happily add a second snapshot of the same name
                if d == disk_id and not self.has_snapshot(d, snapshot_id):
                    self._run("snapshot", "-c", snapshot_id, self.path(d))
                    made.append((d, snapshot_id))

        failed = [exc for _, exc in side_by_side(take, list(dict.fromkeys(d for d, _ in items)))
                  if exc is not None]
        if not failed:
            return
        undo_errors = []
        for disk_id, snapshot_id in made:
            try:
                self.delete_snapshot(disk_id, snapshot_id)
            except (StorageError, OSError) as undo_exc:
                undo_errors.append(str(undo_exc))
        left = f"; could not undo: {'; '.join(undo_errors)}" if undo_errors else ""
        raise StorageError(f"snapshot of {len(items)} disk(s) undone: {failed[0]}{left}") \
            from failed[0]

    def delete_snapshot(self, disk_id: str, snapshot_id: str) -> None:
        """The snapshot, and its base's own name (disks made from it keep their links)."""
        self._base(disk_id, snapshot_id).unlink(missing_ok=True)
        if self.has_snapshot(disk_id, snapshot_id):
            self._run("snapshot", "-d", snapshot_id, self.path(disk_id))

    def revert(self, disk_id: str, snapshot_id: str) -> None:
        """`qemu-img snapshot -a` also restores the size the disk had at the snapshot; the
        disk is grown back to its current size, since disks never shrink."""
        _check_name(snapshot_id)
        header = self._header(disk_id)
        snap = header.snapshot(snapshot_id)
        if snap is None:
            raise StorageError(f"{disk_id}: no snapshot {snapshot_id}")
        self._run("snapshot", "-a", snapshot_id, self.path(disk_id))
        if (snap.disk_size or 0) < header.virtual_size and \
                self.virtual_size(disk_id) < header.virtual_size:
            self._run("resize", "-q", self.path(disk_id), str(header.virtual_size))

    def revert_many(self, items: Sequence[tuple[str, str]]) -> None:
        """`revert` of several disks side by side (one disk at most once); raises the first
        failure after all ran (each revert is idempotent: the caller may retry or undo)."""
        if len({d for d, _ in items}) != len(items):
            raise StorageError("a disk can be reverted to one snapshot only")
        for _, exc in side_by_side(lambda item: self.revert(*item), items):
            if exc is not None:
                raise exc

    # ------------------------------------------------------------ change tracking

    def bytes_written_since(self, disk_id: str, snapshot_id: str) -> int | None:
        if not self.exists(disk_id):
            return None
        try:
            with open(self.path(disk_id), "rb") as fh:
                header = qcow2meta.read_header(fh)
                snap = header.snapshot(snapshot_id)
                if snap is None:
                    return None
                return qcow2meta.bytes_written_since(fh, header, snap)
        except (OSError, qcow2meta.Qcow2FormatError) as exc:
            raise StorageError(f"{disk_id}: {exc}") from exc


# The directory of the pool where snapshot bases live (see create_from_snapshot).
BASES = ".bases"

# How long a qemu-img call waits for an image lock that another qemu-img holds.
LOCK_WAIT_S = 10.0

# Image import: what `qemu-img info` may use on a file nobody vouches for (OpenStack's
# limits since its image-format CVEs), and how much of the file's start is read to find a
# qcow2's backing file and external data file (the header and its extensions).
INSPECT_ADDRESS_SPACE = 1 << 30
INSPECT_CPU_SECONDS = 30
IMPORT_HEADER_BYTES = 64 * 1024
_QCOW2_INCOMPAT_DATA_FILE = 1 << 2
_QCOW2_EXT_DATA_FILE = 0x44415441
_QCOW2_EXT_BACKING_FORMAT = 0xE2792ACA


def _inspect_limits() -> None:  # in the child, before qemu-img starts (as `prlimit` does)
    resource.setrlimit(resource.RLIMIT_AS, (INSPECT_ADDRESS_SPACE, INSPECT_ADDRESS_SPACE))
    resource.setrlimit(resource.RLIMIT_CPU, (INSPECT_CPU_SECONDS, INSPECT_CPU_SECONDS))


def _refuse_external_references(source: str, head: bytes) -> None:
    """A qcow2 header (and its extensions) that names any other file is refused."""
    if len(head) < 72:
        raise StorageError(f"{source}: a truncated qcow2 header")
    version, backing_offset, backing_size = struct.unpack_from(">IQI", head, 4)
    if version not in (2, 3):
        raise StorageError(f"{source}: qcow2 version {version} is not supported")
    if backing_offset or backing_size:
        raise StorageError(f"{source}: the image has a backing file; import a standalone "
                           "image (qemu-img convert -O qcow2 it first)")
    incompat, header_length = (0, 72)
    if version == 3:
        if len(head) < 104:
            raise StorageError(f"{source}: a truncated qcow2 header")
        incompat = struct.unpack_from(">Q", head, 72)[0]
        header_length = struct.unpack_from(">I", head, 100)[0]
    if incompat & _QCOW2_INCOMPAT_DATA_FILE:
        raise StorageError(f"{source}: the image keeps its data in an external data file; "
                           "import a standalone image")
    offset = header_length
    while offset + 8 <= len(head):
        kind, length = struct.unpack_from(">II", head, offset)
        if kind == 0:
            break
        if kind in (_QCOW2_EXT_DATA_FILE, _QCOW2_EXT_BACKING_FORMAT):
            raise StorageError(f"{source}: the qcow2 header names an external file")
        offset += 8 + length + (-length % 8)


def _check_standalone(source: str, fmt: str, info: dict[str, Any]) -> None:
    """What `qemu-img info` says of the image must be a standalone image of format `fmt`."""
    if info.get("format") != fmt:
        raise StorageError(f"{source}: qemu-img reads it as {info.get('format')}, not {fmt}")
    if any(info.get(k) for k in ("backing-filename", "full-backing-filename",
                                 "backing-filename-format")):
        raise StorageError(f"{source}: the image has a backing file "
                           f"({info.get('backing-filename')!r}); import a standalone image")
    data = (info.get("format-specific") or {}).get("data") or {}
    if data.get("data-file") or data.get("data-file-raw"):
        raise StorageError(f"{source}: the image keeps its data in an external data file "
                           f"({data.get('data-file')!r}); import a standalone image")
    if data.get("corrupt"):
        raise StorageError(f"{source}: the image is marked corrupt")


def _check_name(snapshot_id: str) -> None:
    """`qemu-img snapshot -a N` finds a snapshot by its numeric qcow2 ID before its name, so
    an all-digit name could revert to another snapshot."""
    if not snapshot_id or snapshot_id.isdigit():
        raise StorageError(f"{snapshot_id!r}: snapshot names must not be empty or all digits")
