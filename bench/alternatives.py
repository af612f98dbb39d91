"""Benchmark 3, the copy-on-write alternatives: a btrfs subvolume snapshot and XFS
`cp --reflink=always`, on the same three disk files as the ecsnap figures, each on a
file system made for the run in a sparse file and loop-mounted under the work directory.

Where the machine does not allow it (no mkfs.btrfs / mkfs.xfs, no free loop device, mount
refused, not enough free space), the result is a string with the reason, which the report
prints as a note instead of a figure.

Only the loop devices and mounts made here are ever touched: the loop device is attached
with `losetup --find --show` on our image, and detached only after checking that its
backing file is still that image.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.run import Series

MIB = 1024**2
GIB = 1024**3

# Keys of the results, also used by bench/plots.py.
BTRFS = "btrfs"
XFS_REFLINK = "xfs_reflink"
LABELS = {BTRFS: "btrfs subvolume snapshot", XFS_REFLINK: "XFS cp --reflink=always"}
PACKAGES = {BTRFS: "btrfs-progs", XFS_REFLINK: "xfsprogs"}
MKFS = {BTRFS: ["mkfs.btrfs", "-q", "-f"], XFS_REFLINK: ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"]}
FSTYPE = {BTRFS: "btrfs", XFS_REFLINK: "xfs"}


class Unavailable(Exception):
    """The machine does not allow this alternative; the message is the note."""


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise CalledProcessError whose str() names the command and
    its stderr (which is what ends up in the report's note)."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        err = " ".join((proc.stderr or proc.stdout).split())
        raise subprocess.CalledProcessError(proc.returncode, cmd, proc.stdout,
                                            f"`{' '.join(cmd)}` failed: {err}")
    return proc


def _why(exc: subprocess.CalledProcessError) -> str:
    return str(exc.stderr) if exc.stderr else str(exc)


def _timed(*cmd: str) -> float:
    start = time.perf_counter()
    _run(*cmd)
    return time.perf_counter() - start


def _allocated(files: Sequence[str]) -> int:
    return sum(os.stat(f).st_blocks * 512 for f in files)


def _image_size(files: Sequence[str]) -> int:
    """Apparent size of the sparse image: the files' apparent sizes (so that any of them
    fits even where cp would not keep holes) plus a quarter and 768 MiB for metadata, the
    log and btrfs' DUP metadata; at least 1 GiB (XFS needs 300 MiB, small btrfs file
    systems behave differently). Sparse, so only what is written costs disk space."""
    apparent = sum(os.stat(f).st_size for f in files)
    size = max(GIB, apparent + apparent // 4 + 768 * MIB)
    return (size + MIB - 1) // MIB * MIB


def _check_space(files: Sequence[str], where: Path) -> None:
    need = _allocated(files) * 11 // 10 + 512 * MIB
    free = shutil.disk_usage(where).free
    if free < need + GIB:  # keep 1 GiB for everyone else on the host
        raise Unavailable(f"not enough free space under {where}: the copy needs about "
                          f"{need / GIB:.1f} GiB plus 1 GiB spare, {free / GIB:.1f} GiB free")


def _backing_file(device: str) -> str:
    path = Path("/sys/block") / Path(device).name / "loop" / "backing_file"
    try:
        return path.read_text().strip()
    except OSError:
        return ""


@contextlib.contextmanager
def loop_fs(kind: str, image_size: int, parent: Path) -> Iterator[Path]:
    """A fresh file system of `kind` (BTRFS or XFS_REFLINK) in a sparse file under
    `parent`, attached to a loop device and mounted; yields the mount point. Unmounts,
    detaches and deletes everything on the way out, also on error or Ctrl-C. Raises
    Unavailable when the machine does not allow it."""
    mkfs = MKFS[kind]
    if shutil.which(mkfs[0]) is None:
        raise Unavailable(f"{mkfs[0]} not found (Debian package {PACKAGES[kind]})")
    for tool in ("losetup", "mount", "umount"):
        if shutil.which(tool) is None:
            raise Unavailable(f"{tool} not found (Debian package mount)")
    base = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=parent))
    image = base / "fs.img"
    mnt = base / "mnt"
    mnt.mkdir()
    device = ""
    mounted = False
    try:
        with image.open("wb") as f:
            f.truncate(image_size)
        try:
            _run(*mkfs, str(image))
        except subprocess.CalledProcessError as e:
            raise Unavailable(_why(e)) from e
        try:
            device = _run("losetup", "--find", "--show", str(image)).stdout.strip()
        except subprocess.CalledProcessError as e:
            raise Unavailable(f"no loop device: {_why(e)}") from e
        if not device.startswith("/dev/loop"):
            raise Unavailable(f"unexpected answer from losetup --find --show: {device!r}")
        try:
            _run("mount", "-t", FSTYPE[kind], device, str(mnt))
        except subprocess.CalledProcessError as e:
            raise Unavailable(f"mount refused: {_why(e)}") from e
        mounted = True
        yield mnt
    finally:
        problems: list[str] = []
        if mounted:
            for attempt in range(10):
                if subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0:
                    break
                time.sleep(0.3 * (attempt + 1))
            else:
                lazy = subprocess.run(["umount", "--lazy", str(mnt)], capture_output=True,
                                      text=True)
                problems.append(f"{mnt} was busy, lazily unmounted "
                                f"(rc {lazy.returncode} {lazy.stderr.strip()})")
        if device:
            if kind == BTRFS and shutil.which("btrfs"):
                subprocess.run(["btrfs", "device", "scan", "--forget", device],
                               capture_output=True)
            backing = _backing_file(device)
            if backing and Path(backing.removesuffix(" (deleted)")).resolve() != \
                    image.resolve():
                problems.append(f"{device} now backs {backing}, not ours: left alone")
            elif backing:
                gone = subprocess.run(["losetup", "-d", device], capture_output=True,
                                      text=True)
                if gone.returncode != 0:
                    problems.append(f"losetup -d {device}: {gone.stderr.strip()}")
        if not (mounted and os.path.ismount(mnt)):
            shutil.rmtree(base, ignore_errors=True)
        else:
            problems.append(f"{mnt} is still mounted: {base} kept")
        for problem in problems:
            print(f"bench.alternatives cleanup: {problem}", file=sys.stderr)


def _copy_in(files: Sequence[str], dest: Path) -> list[Path]:
    """Copy the disks in, untimed, and write them out, so that the timed operation does not
    pay for the writeback of the copy."""
    copies = []
    for n, f in enumerate(files):
        copy = dest / f"{n}-{Path(f).name}"
        _run("cp", "--sparse=always", "--reflink=never", f, str(copy))
        copies.append(copy)
    _run("sync", "--file-system", str(dest))
    return copies


def _btrfs(files: Sequence[str], mnt: Path, repeats: int, series: Series) -> None:
    """One `btrfs subvolume snapshot` of a subvolume holding the three disks per sample
    (what a user with the disks on btrfs would do); the snapshot is deleted and the cleaner
    waited for after each sample, untimed."""
    source = mnt / "disks"
    _run("btrfs", "subvolume", "create", str(source))
    _copy_in(files, source)
    for r in range(repeats):
        snap = mnt / f"snap-{r}"
        series.samples.append(_timed("btrfs", "subvolume", "snapshot", "-r", str(source),
                                     str(snap)))
        _run("btrfs", "subvolume", "delete", "--commit-after", str(snap))
        _run("btrfs", "subvolume", "sync", str(mnt))


def _xfs(files: Sequence[str], mnt: Path, repeats: int, series: Series) -> None:
    """`cp --reflink=always` of each of the three disks per sample, one process per disk as
    for the full copy in bench/run.py; the copies are deleted after each sample, untimed."""
    source = mnt / "disks"
    source.mkdir()
    copies = _copy_in(files, source)
    for r in range(repeats):
        dest = mnt / f"copy-{r}"
        dest.mkdir()
        start = time.perf_counter()
        for c in copies:
            _run("cp", "--reflink=always", str(c), str(dest / c.name))
        series.samples.append(time.perf_counter() - start)
        shutil.rmtree(dest)
        _run("sync", "--file-system", str(mnt))


def reflink_alternatives(files: list[str], work: Path,
                         repeats: int) -> dict[str, Series | str]:
    """Time a btrfs subvolume snapshot and XFS `cp --reflink=always` of `files` (the three
    disks of the instance, not in use), each `repeats` times, on loop-mounted file systems
    made under `work` one after the other (the first is gone before the second is made, so
    the peak extra disk use is one copy of the files). Returns {"btrfs": ..., "xfs_reflink":
    ...}: a Series of seconds, or a string saying why it was not measured."""
    from bench.run import Series  # here, not at the top: bench.run imports this module

    out: dict[str, Series | str] = {}
    for kind, bench in ((BTRFS, _btrfs), (XFS_REFLINK, _xfs)):
        series = Series(kind)
        try:
            _check_space(files, work)
            with loop_fs(kind, _image_size(files), work) as mnt:
                bench(files, mnt, repeats, series)
            out[kind] = series
        except Unavailable as e:
            out[kind] = f"not measured: {e}"
        except (subprocess.CalledProcessError, OSError) as e:
            why = _why(e) if isinstance(e, subprocess.CalledProcessError) else str(e)
            out[kind] = f"failed after {len(series.samples)} of {repeats} samples: {why}"
    return out


# ---- report ---------------------------------------------------------------------------

def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _ms(value: Series | str | None, digits: int = 1, spread: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return "not measured"
    text = f"{value.median * 1000:.{digits}f} ms"
    return f"{text} ({value.spread})" if spread else text


def _ratio(value: Series | str | None, ecsnap: float) -> str:
    if value is None or isinstance(value, str):
        return "-"
    ratio = value.median / ecsnap
    return f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.2f}x"


def _fastest_copy(results: Mapping[str, Series | str]) -> Series | None:
    copies = [v for k in ("cp", "convert") if not isinstance(v := results.get(k, ""), str)]
    return min(copies, key=lambda s: s.median) if copies else None


def alternatives_row(size: float, ecsnap_median: float,
                     results: Mapping[str, Series | str]) -> str:
    """One table line for one size: `results` holds "cp" and "convert" (Series) and,
    optionally, "btrfs" and "xfs_reflink" (Series or a note); `ecsnap_median` is the
    median of the ecsnap instance snapshot at that size, in seconds. A ratio above 1 means
    ecsnap is that many times faster."""
    return _row(size, _ms(results.get("cp"), 0), _ms(results.get("convert"), 0),
                _ms(results.get(BTRFS), spread=True), _ms(results.get(XFS_REFLINK), spread=True),
                f"{ecsnap_median * 1000:.1f} ms", _ratio(_fastest_copy(results), ecsnap_median),
                _ratio(results.get(BTRFS), ecsnap_median),
                _ratio(results.get(XFS_REFLINK), ecsnap_median))


def alternatives_rows(sizes: Sequence[float],
                      per_size: Mapping[float, Mapping[str, Series | str]],
                      target_gib: float = 4.0, target: float = 100.0) -> list[str]:
    """Section 3 of the report: header, one line per size (ecsnap = per_size[size]["group"],
    the rest as for alternatives_row), the target line and the notes for what was not
    measured. Drop-in for the section 3 part of bench.run.disk_sections."""
    lines = ["## 3. The alternatives: full copies and copy-on-write clones of the same 3 disks",
             "",
             _row("GiB written per disk", "cp --sparse=always", "qemu-img convert",
                  f"{LABELS[BTRFS]} (spread)", f"{LABELS[XFS_REFLINK]} (spread)",
                  "ecsnap instance snapshot", "fastest full copy / ecsnap", "btrfs / ecsnap",
                  "reflink / ecsnap"),
             _row(*["---"] * 9)]
    for size in sizes:
        group = per_size[size]["group"]
        assert not isinstance(group, str)
        lines.append(alternatives_row(size, group.median, per_size[size]))
    lines.append("")
    if target_gib in per_size:
        s = per_size[target_gib]
        group, copy = s["group"], _fastest_copy(s)
        if copy is not None and not isinstance(group, str):
            ratio = copy.median / group.median
            lines += [f"Target: ecsnap ≥ {target:.0f}x faster than a full copy at "
                      f"{target_gib:g} GiB: {ratio:.0f}x "
                      f"({'met' if ratio >= target else 'not met'}).", ""]
    else:
        lines += [f"Target (≥ {target:.0f}x faster than a full copy at {target_gib:g} GiB): "
                  f"not measured at that size in this run.", ""]
    lines += ["Ratios are alternative / ecsnap medians: above 1, ecsnap is faster. The btrfs "
              "figure is one `btrfs subvolume snapshot -r` of a subvolume holding the 3 disks; "
              "the XFS figure is one `cp --reflink=always` per disk (as for `cp --sparse`); "
              "both on a file system made for the run in a sparse file on the same host disk "
              "and loop-mounted, with the disks copied in and synced beforehand, untimed.", ""]
    for kind in (BTRFS, XFS_REFLINK):
        notes = {size: v for size in sizes if isinstance(v := per_size[size].get(kind), str)}
        if len(set(notes.values())) == 1 and len(notes) == len(sizes):
            lines += [f"{LABELS[kind]}: {next(iter(notes.values()))}", ""]
        else:
            lines += [f"{LABELS[kind]} at {size} GiB: {note}" for size, note in notes.items()]
            lines += [""] if notes else []
    return lines
