"""A read-only reader of qcow2 metadata: the header, the snapshot table and the L1/L2
tables, as the qcow2 specification (docs/interop/qcow2.txt in QEMU) lays them out.

Why not `qemu-img info` / `qemu-img map`: each is a process start (10-20 ms here), and a
snapshot or a rollback would otherwise spend more time asking questions than the
`qemu-img snapshot` call that does the work. Everything that writes a qcow2 file still goes
through `qemu-img` (or QEMU); this module only reads, and refuses what it does not know.

Bytes written since a snapshot come straight from the tables: an internal snapshot keeps
its own copy of the L1 table, sharing every L2 table and data cluster with the active
layer, and QEMU copies a shared L2 table or cluster before writing to it. So an L1 entry
still equal to the snapshot's means its whole L2 range is unchanged, and within a copied
L2 table the entries that differ are exactly the clusters written (or discarded, or
zeroed) since. The COPIED flag (bit 63) only records sharing and is ignored.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO

MAGIC = b"QFI\xfb"
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00  # bits 9-55: host offset of an L2 table / cluster
COPIED = 1 << 63
INCOMPAT_EXTENDED_L2 = 1 << 4
KNOWN_INCOMPAT = 0b11111  # dirty, corrupt, external data, compression type, extended L2


class Qcow2FormatError(Exception):
    pass


@dataclass(frozen=True)
class SnapshotEntry:
    name: str
    l1_offset: int
    l1_size: int
    date_sec: int
    vm_state_size: int
    disk_size: int | None  # the virtual size when it was taken (extra data, qcow2 v3)


@dataclass(frozen=True)
class Header:
    virtual_size: int
    cluster_bits: int
    l1_offset: int
    l1_size: int
    l2_entry_bytes: int
    snapshots: tuple[SnapshotEntry, ...]

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // self.l2_entry_bytes

    def snapshot(self, name: str) -> SnapshotEntry | None:
        return next((s for s in self.snapshots if s.name == name), None)


def _read(fh: BinaryIO, offset: int, size: int) -> bytes:
    fh.seek(offset)
    data = fh.read(size)
    if len(data) != size:
        raise Qcow2FormatError(f"truncated file: {size} bytes at {offset} asked")
    return data


def read_header(fh: BinaryIO) -> Header:
    head = _read(fh, 0, 104)
    magic, version = head[:4], struct.unpack_from(">I", head, 4)[0]
    if magic != MAGIC or version not in (2, 3):
        raise Qcow2FormatError("not a qcow2 (v2/v3) file")
    cluster_bits, size = struct.unpack_from(">IQ", head, 20)
    l1_size, l1_offset = struct.unpack_from(">IQ", head, 36)
    nb_snapshots, snapshots_offset = struct.unpack_from(">IQ", head, 60)
    incompat = struct.unpack_from(">Q", head, 72)[0] if version == 3 else 0
    if incompat & ~KNOWN_INCOMPAT:
        raise Qcow2FormatError(f"unknown incompatible features {incompat:#x}")
    snapshots = []
    offset = snapshots_offset
    for _ in range(nb_snapshots):
        fixed = _read(fh, offset, 40)
        s_l1_offset, s_l1_size, id_len, name_len, date_sec, _nsec, _clock, vm_state, \
            extra_len = struct.unpack(">QIHHIIQII", fixed)
        extra = _read(fh, offset + 40, extra_len) if extra_len else b""
        name_at = offset + 40 + extra_len + id_len
        name = _read(fh, name_at, name_len).decode("utf-8", "replace") if name_len else ""
        disk_size = struct.unpack_from(">Q", extra, 8)[0] if extra_len >= 16 else None
        if extra_len >= 8:
            vm_state = max(vm_state, struct.unpack_from(">Q", extra, 0)[0])
        snapshots.append(SnapshotEntry(name, s_l1_offset, s_l1_size, date_sec, vm_state,
                                       disk_size))
        entry = 40 + extra_len + id_len + name_len
        offset += entry + (-entry % 8)
    return Header(size, cluster_bits, l1_offset, l1_size,
                  16 if incompat & INCOMPAT_EXTENDED_L2 else 8, tuple(snapshots))


def _table(fh: BinaryIO, offset: int, entries: int) -> list[int]:
    if not entries:
        return []
    return [e & ~COPIED for e in struct.unpack(f">{entries}Q", _read(fh, offset, 8 * entries))]


def _l2(fh: BinaryIO, header: Header, l1_entry: int) -> list[int]:
    """An L2 table's entries (a pair of words per entry with extended L2), COPIED masked."""
    words = header.cluster_size // 8
    if not l1_entry & OFFSET_MASK:
        return [0] * words
    return _table(fh, l1_entry & OFFSET_MASK, words)


def bytes_written_since(fh: BinaryIO, header: Header, snapshot: SnapshotEntry) -> int:
    """Guest bytes whose mapping differs between `snapshot` and the active layer.

    Clusters beyond the snapshot's L1 table (the disk grew since) count when allocated or
    flagged now: grown space reads as zeros until written."""
    now = _table(fh, header.l1_offset, header.l1_size)
    then = _table(fh, snapshot.l1_offset, snapshot.l1_size)
    per_entry = header.l2_entry_bytes // 8
    differing = 0
    for index, entry in enumerate(now):
        old = then[index] if index < len(then) else 0
        if entry == old:
            continue  # the same L2 table (or both unallocated): nothing written here
        a, b = _l2(fh, header, entry), _l2(fh, header, old)
        for k in range(0, len(a), per_entry):
            if a[k:k + per_entry] != b[k:k + per_entry]:
                differing += 1
    return differing * header.cluster_size
