"""The qcow2 storage backend: one directory per pool, one qcow2 file per disk, driven by
`qemu-img` only (it never writes qcow2 metadata itself).

Snapshots are qcow2 internal snapshots named by snapshot ID, inside the disk's file, so a
snapshot and a revert cost a metadata update, whatever the disk's size.

Bytes written since a snapshot: right after an internal snapshot, the active layer's
mapping (guest offset -> host offset, from `qemu-img map`) is the snapshot's, and is kept
in a small sidecar file. Every later guest write to a shared cluster is copied to a new
host cluster, so the guest ranges whose mapping differs from the kept one are exactly the
ranges written since. Comparing two extent lists is O(extents), never O(disk size).
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

Extent = tuple[int, int, tuple[Any, ...]]  # start, end, what the range maps to


class Qcow2Backend:
    def __init__(self, pool_dir: str, qemu_img: str = "qemu-img") -> None:
        self.pool = Path(pool_dir)
        self.pool.mkdir(parents=True, exist_ok=True)
        self.qemu_img = qemu_img

    # ------------------------------------------------------------ plumbing

    def _run(self, *args: str) -> str:
        cmd = [self.qemu_img, *args]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise StorageError(f"{' '.join(cmd)}: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout

    def path(self, disk_id: str) -> str:
        return str(self.pool / f"{disk_id}.qcow2")

    def _maps(self, disk_id: str) -> Path:
        return self.pool / f"{disk_id}.maps"

    def _info(self, disk_id: str) -> dict[str, Any]:
        return dict(json.loads(self._run("info", "-U", "--output=json", self.path(disk_id))))

    # ------------------------------------------------------------ lifecycle

    def exists(self, disk_id: str) -> bool:
        return os.path.exists(self.path(disk_id))

    def create_blank(self, disk_id: str, size_bytes: int) -> None:
        self._run("create", "-q", "-f", "qcow2", self.path(disk_id), str(size_bytes))

    def create_from_image(self, disk_id: str, image_path: str, size_bytes: int) -> None:
        base = str(Path(image_path).resolve())
        info = json.loads(self._run("info", "-U", "--output=json", base))
        size = max(size_bytes, int(info["virtual-size"]))
        self._run("create", "-q", "-f", "qcow2", "-b", base, "-F", info["format"],
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
        return int(self._info(disk_id).get("actual-size", 0))

    def import_image(self, source: str, target: str) -> int:
        fmt = json.loads(self._run("info", "-U", "--output=json", source))["format"]
        if fmt not in ("qcow2", "raw"):
            raise StorageError(f"{source}: {fmt} images are not supported (qcow2 or raw)")
        self._run("convert", "-q", "-f", fmt, "-O", "qcow2", source, target)
        return int(json.loads(self._run("info", "--output=json", target))["virtual-size"])

    # ------------------------------------------------------------ snapshots

    def list_snapshots(self, disk_id: str) -> list[SnapshotInfo]:
        if not self.exists(disk_id):
            return []
        return [SnapshotInfo(s["name"], int(s.get("vm-state-size", 0)),
                             int(s.get("date-sec", 0)))
                for s in self._info(disk_id).get("snapshots", [])]

    def has_snapshot(self, disk_id: str, snapshot_id: str) -> bool:
        return any(s.name == snapshot_id for s in self.list_snapshots(disk_id))

    def create_snapshots(self, items: Sequence[tuple[str, str]]) -> None:
        made: list[tuple[str, str]] = []
        try:
            for disk_id, snapshot_id in items:
                if self.has_snapshot(disk_id, snapshot_id):
                    continue
                self._run("snapshot", "-c", snapshot_id, self.path(disk_id))
                made.append((disk_id, snapshot_id))
                self.record_snapshot_map(disk_id, snapshot_id)
        except (StorageError, OSError) as exc:
            for disk_id, snapshot_id in made:
                self.delete_snapshot(disk_id, snapshot_id)
            raise StorageError(f"snapshot of {len(items)} disk(s) undone: {exc}") from exc

    def delete_snapshot(self, disk_id: str, snapshot_id: str) -> None:
        if self.has_snapshot(disk_id, snapshot_id):
            self._run("snapshot", "-d", snapshot_id, self.path(disk_id))
        (self._maps(disk_id) / f"{snapshot_id}.json").unlink(missing_ok=True)

    def revert(self, disk_id: str, snapshot_id: str) -> None:
        self._run("snapshot", "-a", snapshot_id, self.path(disk_id))

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
        extents = [[s, e, list(k)] for s, e, k in self._map(disk_id)]
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(extents, fh)
        os.replace(tmp, folder / f"{snapshot_id}.json")

    def bytes_written_since(self, disk_id: str, snapshot_id: str) -> int | None:
        kept = self._maps(disk_id) / f"{snapshot_id}.json"
        if not kept.exists():
            return None
        then = [(int(s), int(e), tuple(k)) for s, e, k in json.loads(kept.read_text())]
        return _differing_bytes(then, self._map(disk_id))


def _differing_bytes(a: list[Extent], b: list[Extent]) -> int:
    """Guest bytes mapped differently by two sorted, gap-free extent lists. A host offset is
    kept relative to the guest offset, so one extent that maps a contiguous run compares
    equal to the same run split in pieces."""
    i = j = 0
    pos = 0
    differing = 0
    while i < len(a) and j < len(b):
        end = min(a[i][1], b[j][1])
        if a[i][2] != b[j][2]:
            differing += end - pos
        pos = end
        if a[i][1] == end:
            i += 1
        if b[j][1] == end:
            j += 1
    return differing
