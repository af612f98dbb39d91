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
import subprocess
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from ecsnap.adapters.storage import qcow2meta
from ecsnap.adapters.storage.base import SnapshotInfo, StorageError

T = TypeVar("T")


class Qcow2Backend:
    def __init__(self, pool_dir: str, qemu_img: str = "qemu-img") -> None:
        self.pool = Path(pool_dir)
        self.pool.mkdir(parents=True, exist_ok=True)
        self.qemu_img = qemu_img

    # ------------------------------------------------------------ plumbing

    def _run(self, *args: str) -> str:
        cmd = [self.qemu_img, *args]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as exc:
            raise StorageError(f"{' '.join(cmd)}: {exc}") from exc
        if proc.returncode != 0:
            why = proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}"
            raise StorageError(f"{' '.join(cmd)}: {why}")
        return proc.stdout

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
        Path(self.path(disk_id)).unlink(missing_ok=True)

    def virtual_size(self, disk_id: str) -> int:
        return self._header(disk_id).virtual_size

    def allocated_bytes(self, disk_id: str) -> int:
        """Bytes the file takes on the host, snapshots included."""
        try:
            return os.stat(self.path(disk_id)).st_blocks * 512
        except FileNotFoundError:
            return 0

    def import_image(self, source: str, target: str) -> int:
        fmt = self._info_of(source)["format"]
        if fmt not in ("qcow2", "raw"):
            raise StorageError(f"{source}: {fmt} images are not supported (qcow2 or raw)")
        self._run("convert", "-q", "-f", fmt, "-O", "qcow2", source, target)
        return int(self._info_of(target)["virtual-size"])

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

        failed = [exc for _, exc in _side_by_side(take, list(dict.fromkeys(d for d, _ in items)))
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
        for _, exc in _side_by_side(lambda item: self.revert(*item), items):
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


def _side_by_side(fn: Callable[[T], object], items: Sequence[T],
                  ) -> list[tuple[T, BaseException | None]]:
    """Run `fn` on every item at once (one thread each: the work is in child processes);
    every item's outcome, in order, once all have ended."""
    def outcome(item: T) -> tuple[T, BaseException | None]:
        try:
            fn(item)
            return item, None
        except (StorageError, OSError, ValueError) as exc:
            return item, exc

    if len(items) <= 1:
        return [outcome(item) for item in items]
    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        return list(pool.map(outcome, items))


def _check_name(snapshot_id: str) -> None:
    """`qemu-img snapshot -a N` finds a snapshot by its numeric qcow2 ID before its name, so
    an all-digit name could revert to another snapshot."""
    if not snapshot_id or snapshot_id.isdigit():
        raise StorageError(f"{snapshot_id!r}: snapshot names must not be empty or all digits")
