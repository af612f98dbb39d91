"""The debugfs reader and the file-level diff on real qcow2 files: exactly the changed
paths, nothing written to the disk file or its snapshots, partial answers within budgets,
and the same answer without the qcow2 change map."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest

from ecsnap.adapters.inspect.base import Budget, DiskImage, FileType
from ecsnap.adapters.inspect.debugfs import DebugfsReader
from ecsnap.service.inspect import FileChanges, FileLevel, diff
from tests.inspect import images
from tests.inspect.conftest import EXPECTED, StoryDisk


def listed(result: FileChanges) -> dict[str, tuple[str, set[str]]]:
    return {f.path: (f.change.value, set(f.what)) for f in result.files}


def check_story(result: FileChanges) -> None:
    assert result.file_level == FileLevel.SUPPORTED and not result.partial, result
    got = listed(result)
    assert set(got) == set(EXPECTED), got
    for path, (change, what) in EXPECTED.items():
        assert got[path][0] == change, (path, got[path])
        assert what <= got[path][1], (path, got[path])
    assert (result.added, result.deleted, result.modified) == (3, 2, 5)


def state(qcow2: Path) -> tuple[str, str, int]:
    snaps = subprocess.run(["qemu-img", "snapshot", "-l", str(qcow2)], check=True,
                           capture_output=True, text=True).stdout
    return images.checksum(qcow2), snaps, qcow2.stat().st_mtime_ns


def test_preview_lists_exactly_the_changed_paths(reader: DebugfsReader,
                                                 story_disk: StoryDisk) -> None:
    disk = str(story_disk.qcow2)
    before = state(story_disk.qcow2)
    with reader.open(DiskImage(disk, story_disk.snapshot)) as old, \
            reader.open(DiskImage(disk)) as new:
        # the replaced file really has the same size and mtime (only its content differs)
        a, b = reader.stat(old, (b"replaced.txt",)), reader.stat(new, (b"replaced.txt",))
        assert (a.size, a.mtime_ns) == (b.size, b.mtime_ns)
        a, b = reader.stat(old, (b"same_size.txt",)), reader.stat(new, (b"same_size.txt",))
        assert (a.size, a.mtime_ns, a.layout) == (b.size, b.mtime_ns, b.layout)
    result = diff(reader, DiskImage(disk, story_disk.snapshot), DiskImage(disk))
    check_story(result)
    modified = {f.path: f for f in result.files}["/grow.txt"]
    assert (modified.size_before, modified.size_after) == (5, 24)
    assert state(story_disk.qcow2) == before  # neither the file nor its snapshots changed


def test_the_first_n_paths_and_the_totals(reader: DebugfsReader, story_disk: StoryDisk) -> None:
    disk = str(story_disk.qcow2)
    result = diff(reader, DiskImage(disk, story_disk.snapshot), DiskImage(disk), limit=3)
    assert [f.path for f in result.files] == sorted(EXPECTED)[:3]
    assert result.total == len(EXPECTED)


def test_without_the_change_map_contents_are_hashed(reader: DebugfsReader,
                                                    story_disk: StoryDisk,
                                                    tmp_path: Path) -> None:
    """A copy of the file is not the same qcow2 file: no change map, every file of equal
    size and mtime is dumped and hashed; the answer is the same."""
    copy = tmp_path / "copy.qcow2"
    shutil.copyfile(story_disk.qcow2, copy)
    check_story(diff(reader, DiskImage(str(story_disk.qcow2), story_disk.snapshot),
                     DiskImage(str(copy))))


def test_budgets_make_a_partial_answer_without_false_changes(reader: DebugfsReader,
                                                             story_disk: StoryDisk) -> None:
    disk = str(story_disk.qcow2)
    result = diff(reader, DiskImage(disk, story_disk.snapshot), DiskImage(disk),
                  max_entries=20)
    assert "entry budget" in result.partial
    assert set(listed(result)) <= set(EXPECTED)
    result = diff(reader, DiskImage(disk, story_disk.snapshot), DiskImage(disk), max_bytes=0)
    assert "not compared" in result.partial or "content" not in {
        w for f in result.files for w in f.what}


def test_browse_and_read(reader: DebugfsReader, story_disk: StoryDisk) -> None:
    with reader.open(DiskImage(str(story_disk.qcow2), story_disk.snapshot)) as disk:
        page = reader.list_dir(disk, (b"many",), limit=100)
        assert page.total == 300 and page.more and len(page.entries) == 100
        assert page.entries[0].name == b"f000" and page.entries[0].mtime_ns == \
            images.MTIME * 10**9
        rest = reader.list_dir(disk, (b"many",), after=page.entries[-1].name, limit=1000)
        assert rest.entries[0].name == b"f100" and not rest.more and len(rest.entries) == 200
        assert reader.read_file(disk, (b"etc", b"conf")) == b"x=1\n"
        assert reader.read_file(disk, (b"same_size.txt",), offset=4990, length=100) == \
            b"A" * 10
        link = reader.stat(disk, (b"link",))
        assert link.type == FileType.SYMLINK and link.target == b"keep.txt"
        root = reader.stat(disk, ())
        assert root.type == FileType.DIRECTORY
        walk = reader.walk(disk, Budget())
        assert not walk.partial and len(walk.entries) == 312  # + lost+found


@pytest.mark.parametrize("fs", ["ext2", "ext4"])
def test_reads_at_any_offset_from_the_block_map(reader: DebugfsReader, tmp_path: Path,
                                                fs: str) -> None:
    """ext2 (the demo image's data disks: indirect blocks) and ext4 (extents), with holes:
    any range reads the bytes the file holds, as `cat` does."""
    root = tmp_path / "tree"
    root.mkdir()
    rng = random.Random(7)
    chunks = [rng.randbytes(70_000), b"", rng.randbytes(300_000)]
    with open(root / "sparse.bin", "wb") as fh:
        fh.write(chunks[0])
        fh.seek(500_000)  # a hole
        fh.write(chunks[2])
    content = (root / "sparse.bin").read_bytes()
    qcow2 = images.make_disk(tmp_path, root, name=fs, fs=fs)
    with reader.open(DiskImage(str(qcow2))) as disk:
        entry = reader.stat(disk, (b"sparse.bin",))
        assert entry.size == len(content) == 800_000
        for offset, length in ((0, 1 << 20), (69_000, 5000), (499_999, 2), (123_456, 654_321),
                               (799_990, 100)):
            assert reader.read_file(disk, (b"sparse.bin",), offset=offset, length=length) \
                == content[offset:offset + length], (offset, length)
        opened = reader._own(disk)
        assert reader._cat(opened, entry.inode, 0, 1 << 20, 30) == content
