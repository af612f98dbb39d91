"""Hostile guest file systems: names that are not text, symlinks out of the tree, device
files, a directory loop, a 10,000-entry directory, corrupted superblocks. None may touch
the host: nothing is followed, nothing is written under a guest name, output is escaped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ecsnap.adapters.inspect.base import (
    Budget,
    DiskImage,
    FileType,
    InspectError,
    NotADirectory,
    NotAFile,
    Unsupported,
    display_path,
    escape_name,
    parse_path,
    unescape_name,
)
from ecsnap.adapters.inspect.debugfs import DebugfsReader
from ecsnap.service.inspect import diff
from tests.inspect import images

ODD_NAMES = [b"new\nline", b"bad\xff\xfename", b"back\\slash", b"[red]markup",
             b"[link=https:evil]click", "\u202eevil.txt".encode(), b"spaced name ",
             b"quote\"'`$(touch x)", b"\x1b[31mansi", "caf\u00e9".encode()]
SNAP = "s-hostile"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("hostile")
    root = work / "tree"
    images.build_tree(root, {"sub": None, "sub/f": b"in sub\n", "big": None})
    for n in range(10_000):
        (root / "big" / f"entry-{n:05d}").write_bytes(b"")
    for name in ODD_NAMES:
        with open(os.path.join(os.fsencode(root), name), "wb") as fh:
            fh.write(b"odd:" + name)
    os.symlink("/etc/shadow", root / "shadow")
    os.symlink("../../../../etc/passwd", root / "up")
    os.symlink("/" + "x" * 200, root / "slowlink")  # a target too long for the inode
    qcow2 = images.make_disk(work, root, name="hostile", size="128M")
    # debugfs makes "/slash" a name with a slash in it (no guest could): a crafted entry
    images.edit(qcow2, ["cd /", "mknod null c 1 3", "mknod /slash p", "link /sub /sub/loop"])
    images.snapshot(qcow2, SNAP)
    return qcow2


def test_names_are_data_and_links_are_never_followed(reader: DebugfsReader,
                                                     hostile: Path) -> None:
    shadow_before = Path("/etc/shadow").stat().st_mtime_ns
    with reader.open(DiskImage(str(hostile), SNAP)) as disk:
        walk = reader.walk(disk, Budget())
        assert not walk.partial
        names = {p[-1] for p in walk.entries if len(p) == 1}
        assert set(ODD_NAMES) <= names
        assert sum(1 for p in walk.entries if p[0] == b"big" and len(p) == 2) == 10_000
        assert any("loop" in n for n in walk.notes), walk.notes
        for name in ODD_NAMES:
            assert reader.read_file(disk, (name,)) == b"odd:" + name
            text = display_path((name,))
            assert "\n" not in text and "\x1b" not in text and "\u202e" not in text
            assert parse_path(text) == (name,)
        assert display_path((b"new\nline",)) == "/new\\x0aline"
        assert display_path((b"back\\slash",)) == "/back\\x5cslash"
        shadow = reader.stat(disk, (b"shadow",))
        assert shadow.type == FileType.SYMLINK and shadow.target == b"/etc/shadow"
        assert reader.stat(disk, (b"up",)).target == b"../../../../etc/passwd"
        assert reader.stat(disk, (b"slowlink",)).target == b"/" + b"x" * 200
        with pytest.raises(NotAFile):
            reader.read_file(disk, (b"shadow",))
        with pytest.raises(NotADirectory):
            reader.read_file(disk, (b"shadow", b"x"))
        null = reader.stat(disk, (b"null",))
        assert null.type == FileType.CHAR_DEVICE and "01:03" in null.layout
        with pytest.raises(NotAFile):
            reader.read_file(disk, (b"null",))
        page = reader.list_dir(disk, (b"big",), limit=1000)
        assert page.total == 10_000 and page.more and len(page.entries) == 1000
        assert reader.list_dir(disk, (b"sub", b"loop")).total == 2  # f, loop: not recursed
        slash = reader.stat(disk, parse_path("/\\x2fslash"))
        assert slash.type == FileType.FIFO and slash.path == (b"/slash",)
        assert (b"/slash",) in walk.entries and (b"slash",) not in walk.entries
    assert Path("/etc/shadow").stat().st_mtime_ns == shadow_before


def test_a_big_tree_is_cut_by_the_entry_budget(reader: DebugfsReader, hostile: Path) -> None:
    with reader.open(DiskImage(str(hostile), SNAP)) as disk:
        walk = reader.walk(disk, Budget(max_entries=5_000))
    assert "entry budget" in walk.partial and (b"big",) not in walk.listed
    result = diff(reader, DiskImage(str(hostile), SNAP), DiskImage(str(hostile)),
                  max_entries=5_000)
    assert result.partial and result.total == 0  # nothing is claimed that was not seen


def test_hostile_disk_unchanged(reader: DebugfsReader, hostile: Path) -> None:
    before = images.checksum(hostile)
    result = diff(reader, DiskImage(str(hostile), SNAP), DiskImage(str(hostile)))
    assert result.total == 0 and not result.partial, result
    assert images.checksum(hostile) == before


@pytest.mark.parametrize(("damage", "says"), [
    ("write -P 0 1080 2", "superblock magic"),  # no ext magic
    ("write -P 0 1024 4", "damaged"),  # s_inodes_count 0: no inode can be read
    ("write -P 0xff 1048 4", "corrupted superblock"),  # s_log_block_size absurd
    ("write -P 0 0 4M", "reads as zeros"),
])
def test_a_corrupted_superblock_is_unsupported(reader: DebugfsReader, tmp_path: Path,
                                               damage: str, says: str) -> None:
    qcow2 = images.make_disk(tmp_path, {"f": b"x"}, name="broken")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", damage, str(qcow2)], check=True,
                   capture_output=True)
    images.snapshot(qcow2, "s-1")
    with pytest.raises(Unsupported) as caught:
        diff(reader, DiskImage(str(qcow2), "s-1"), DiskImage(str(qcow2)))
    assert says in str(caught.value).lower()


def test_a_partitioned_or_foreign_disk_is_unsupported(reader: DebugfsReader,
                                                      tmp_path: Path) -> None:
    qcow2 = tmp_path / "mbr.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "16M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x55 510 1", "-c",
                    "write -P 0xaa 511 1", str(qcow2)], check=True, capture_output=True)
    with pytest.raises(Unsupported, match="partition table"), \
            reader.open(DiskImage(str(qcow2))):
        pass
    # a disk on Ceph RBD is read through QEMU's rbd driver (tests/storage/test_rbd_files.py):
    # one whose cluster cannot be reached does not open, one with its own keyring is refused
    with pytest.raises(InspectError, match="cannot open"), \
            reader.open(DiskImage("rbd:pool/d-1")):
        pass
    with pytest.raises(Unsupported, match="keyring"), \
            reader.open(DiskImage("rbd:pool/d-1:keyring=/k")):
        pass


def test_a_killed_reader_leaves_nothing_mounted(hostile: Path, tmp_path: Path) -> None:
    """kill -9 while a disk is open: the next reader on the work directory unmounts it."""
    work = tmp_path / "work"
    script = (f"import os, signal\nfrom ecsnap.adapters.inspect.debugfs import DebugfsReader\n"
              f"from ecsnap.adapters.inspect.base import DiskImage\n"
              f"r = DebugfsReader({str(work)!r})\n"
              f"with r.open(DiskImage({str(hostile)!r}, {SNAP!r})):\n"
              f"    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    left = list(work.glob("*.img"))
    assert left and os.path.ismount(left[0])
    reader = DebugfsReader(work)
    with reader.open(DiskImage(str(hostile), SNAP)) as disk:
        assert reader.stat(disk, (b"sub", b"f")).size == 7
    assert not os.path.ismount(left[0]) and not list(work.glob("*"))


@given(st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=4))
def test_paths_as_text_read_back_and_never_break_a_line(parts: list[bytes]) -> None:
    path = tuple(parts)
    text = display_path(path)
    assert all(c.isprintable() for c in text)
    assert [unescape_name(escape_name(p)) for p in parts] == parts
    if all(p not in (b".", b"..") for p in parts):
        assert parse_path(text) == path


@pytest.mark.parametrize("bad", ["", "relative", "/a/../b", "/..", "/./x", "/a\\q"])
def test_paths_that_climb_or_are_relative_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_path(bad)


def test_an_export_that_dies_mid_read_is_an_error_and_is_unmounted(reader: DebugfsReader,
                                                                   hostile: Path) -> None:
    with reader.open(DiskImage(str(hostile), SNAP)) as disk:
        os.kill(reader._own(disk).proc.pid, signal.SIGKILL)  # nbdfuse: ours, started above
        reader._own(disk).proc.wait()
        with pytest.raises(InspectError, match="export of the disk ended") as caught:
            reader.walk(disk, Budget())
        assert not isinstance(caught.value, Unsupported)
    # the reader fixture checks that nothing is left mounted in its work directory
