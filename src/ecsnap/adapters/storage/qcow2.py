"""The qcow2 storage backend: one directory per pool, one qcow2 file per disk, driven by
`qemu-img` only (it never writes qcow2 metadata itself, nor copies whole disk files).

Snapshots are qcow2 internal snapshots named by snapshot ID, inside the disk's file, so a
snapshot and a revert cost a metadata update, whatever the disk's size.

Bytes written since a snapshot: right after an internal snapshot, the active layer's
mapping (guest offset -> host offset, from `qemu-img map`) is the snapshot's, and is kept
in a small sidecar file `<pool>/<disk>.maps/<snapshot>.json`. Every later guest write to a
cluster shared with the snapshot is copied to a new host cluster, and the snapshot keeps
its old clusters referenced, so the guest ranges whose mapping differs from the kept one
are exactly the ranges written since. Comparing two extent lists is O(extents), never
O(disk size).

Read-only queries (info, map) pass `-U`, so they also work while a VM has the file open.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ecsnap.adapters.storage.base import SnapshotInfo, StorageError

# One extent of `qemu-img map`: guest [start, end) and what it maps to, as
# (depth, present, zero, data, host offset - guest offset or None). The offset is kept
# relative to the guest offset, so a run split in pieces compares equal to the whole run.
Key = tuple[Any, ...]
Extent = tuple[int, int, Key]


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

    def _info(self, disk_id: str) -> dict[str, Any]:
        return self._info_of(self.path(disk_id))

    def _maps(self, disk_id: str) -> Path:
        return self.pool / f"{disk_id}.maps"

    def _map_file(self, disk_id: str, snapshot_id: str) -> Path:
        return self._maps(disk_id) / f"{snapshot_id}.json"

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
        shutil.rmtree(self._maps(disk_id), ignore_errors=True)

    def virtual_size(self, disk_id: str) -> int:
        return int(self._info(disk_id)["virtual-size"])

    def allocated_bytes(self, disk_id: str) -> int:
        """Bytes the file takes on the host (`actual-size`), snapshots included."""
        return int(self._info(disk_id).get("actual-size", 0))

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
        return [SnapshotInfo(str(s["name"]), int(s.get("vm-state-size", 0)),
                             int(s.get("date-sec", 0)))
                for s in self._info(disk_id).get("snapshots", [])]

    def has_snapshot(self, disk_id: str, snapshot_id: str) -> bool:
        return any(s.name == snapshot_id for s in self.list_snapshots(disk_id))

    def create_snapshots(self, items: Sequence[tuple[str, str]]) -> None:
        made: list[tuple[str, str]] = []
        try:
            for disk_id, snapshot_id in items:
                _check_name(snapshot_id)
                if self.has_snapshot(disk_id, snapshot_id):
                    continue  # qcow2 would happily add a second one of the same name
                self._run("snapshot", "-c", snapshot_id, self.path(disk_id))
                made.append((disk_id, snapshot_id))
                self.record_snapshot_map(disk_id, snapshot_id)
        except (StorageError, OSError, ValueError) as exc:
            undo_errors = []
            for disk_id, snapshot_id in reversed(made):
                try:
                    self.delete_snapshot(disk_id, snapshot_id)
                except (StorageError, OSError) as undo_exc:
                    undo_errors.append(str(undo_exc))
            left = f"; could not undo: {'; '.join(undo_errors)}" if undo_errors else ""
            raise StorageError(f"snapshot of {len(items)} disk(s) undone: {exc}{left}") from exc

    def delete_snapshot(self, disk_id: str, snapshot_id: str) -> None:
        if self.has_snapshot(disk_id, snapshot_id):
            self._run("snapshot", "-d", snapshot_id, self.path(disk_id))
        self._map_file(disk_id, snapshot_id).unlink(missing_ok=True)

    def revert(self, disk_id: str, snapshot_id: str) -> None:
        """`qemu-img snapshot -a` also restores the size the disk had at the snapshot; the
        disk is grown back to its current size, since disks never shrink."""
        _check_name(snapshot_id)
        size = self.virtual_size(disk_id)
        self._run("snapshot", "-a", snapshot_id, self.path(disk_id))
        if self.virtual_size(disk_id) < size:
            self._run("resize", "-q", self.path(disk_id), str(size))
        # The active layer now shares the snapshot's L2 tables, so its mapping is the kept
        # one again; should a qemu-img ever remap, keep the map exact all the same.
        if self.bytes_written_since(disk_id, snapshot_id):
            self.record_snapshot_map(disk_id, snapshot_id)

    # ------------------------------------------------------------ change tracking

    def _map(self, disk_id: str) -> list[Extent]:
        extents = json.loads(self._run("map", "-U", "--output=json", self.path(disk_id)))
        return [(int(e["start"]), int(e["start"]) + int(e["length"]),
                 (e.get("depth"), e.get("present"), e.get("zero"), e.get("data"),
                  None if e.get("offset") is None else int(e["offset"]) - int(e["start"])))
                for e in extents]

    def record_snapshot_map(self, disk_id: str, snapshot_id: str) -> None:
        folder = self._maps(disk_id)
        folder.mkdir(exist_ok=True)
        extents = [[start, end, list(key)] for start, end, key in self._map(disk_id)]
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{snapshot_id}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(extents, fh, separators=(",", ":"))
            os.replace(tmp, self._map_file(disk_id, snapshot_id))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def bytes_written_since(self, disk_id: str, snapshot_id: str) -> int | None:
        kept = self._map_file(disk_id, snapshot_id)
        try:
            text = kept.read_text()
        except FileNotFoundError:
            return None
        then = [(int(s), int(e), tuple(k)) for s, e, k in json.loads(text)]
        return _differing_bytes(then, self._map(disk_id))


def _check_name(snapshot_id: str) -> None:
    """`qemu-img snapshot -a N` finds a snapshot by its numeric qcow2 ID before its name, so
    an all-digit name could revert to another snapshot."""
    if not snapshot_id or snapshot_id.isdigit():
        raise StorageError(f"{snapshot_id!r}: snapshot names must not be empty or all digits")


def _differing_bytes(then: list[Extent], now: list[Extent]) -> int:
    """Guest bytes mapped differently by two sorted, gap-free extent lists from offset 0.

    Beyond the end of `then` (the disk grew since), bytes count where `now` has them
    allocated in some layer: grown space reads as zeros until it is written."""
    i = j = 0
    pos = differing = 0
    while i < len(then) and j < len(now):
        end = min(then[i][1], now[j][1])
        if then[i][2] != now[j][2]:
            differing += end - pos
        pos = end
        if then[i][1] == end:
            i += 1
        if now[j][1] == end:
            j += 1
    for start, end, key in now[j:]:
        if key[1] or key[3]:  # present or data
            differing += end - max(start, pos)
    return differing
