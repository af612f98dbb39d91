"""Owner-only files: what ecsnap keeps under its data directory is for its own user only.

The data directory holds the database (AccessKey secrets, encrypted with `secret.key`
beside it), `credentials.json`, the disk files of every tenant, the image templates and
the VMs' run directories (QMP and guest-agent sockets, serial logs). Every directory is
created 0700 and every file 0600 (an image template 0400), whatever the umask:

- every `ecsnap` process that creates files sets its umask to 0o077 first
  (`restrict_umask`, called by the operator commands: `init`, `serve`, `image`, ...), so
  what `qemu-img` and QEMU create (disk files, sockets, logs) is owner-only too;
- the places that create files say so explicitly where they can (the SQLite file, the run
  directories, the pools, the image templates);
- at every start-up `secure_data_dir` (called by bootstrap) puts back owner-only modes on
  an existing data directory, and logs a warning naming each path it fixed.

QEMU runs as the same user as ecsnap, so owner-only modes never keep it from its files.
This module uses the standard library only; any layer may use it.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("ecsnap.filemodes")

PRIVATE_UMASK = 0o077
DIR_MODE = 0o700
FILE_MODE = 0o600
SHOWN_FIXES = 20  # warnings naming a path; more are counted in one line


def restrict_umask() -> int:
    """Make everything this process creates from now on owner-only; the old umask."""
    return os.umask(PRIVATE_UMASK)


def private_dir(path: str | os.PathLike[str]) -> Path:
    """`path` as a directory (and its missing parents) of mode 0700, whatever the umask;
    an existing directory keeps its mode (`secure_data_dir` fixes those at start-up)."""
    folder = Path(path)
    missing = []
    for parent in (folder, *folder.parents):
        if parent.exists():
            break
        missing.append(parent)
    folder.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    for made in missing:  # mkdir's mode is cut by the umask; chmod is not
        os.chmod(made, DIR_MODE)
    return folder


def private_file(path: str | os.PathLike[str]) -> None:
    """Create `path` empty with mode 0600 if it does not exist (else leave it as it is)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return
    os.fchmod(fd, FILE_MODE)  # O_CREAT's mode is cut by the umask too
    os.close(fd)


def restrict(path: str | os.PathLike[str]) -> int | None:
    """Take away every permission of group and others from `path` (not following a
    symbolic link); the old mode if it changed, else None."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode) or not st.st_mode & 0o077:
        return None
    os.chmod(path, stat.S_IMODE(st.st_mode) & ~0o077)
    return stat.S_IMODE(st.st_mode)


def secure_data_dir(data_dir: Path, *, shallow: Iterable[Path] = ()) -> list[tuple[Path, int]]:
    """Create the data directory (0700) or take away the group's and others' permissions on
    it and on everything under it; a directory in `shallow` (the download cache: its
    contents are no secret, and a guest image being built keeps its own modes) gets only
    its own mode fixed. Symbolic links are not followed. Returns (path, old mode) of every
    path fixed, each one logged as a warning (the first SHOWN_FIXES by name)."""
    if not data_dir.exists():
        private_dir(data_dir)
        return []
    skip = {Path(p).resolve() for p in shallow}
    fixed: list[tuple[Path, int]] = []

    def fix(path: Path) -> None:
        try:
            old = restrict(path)
        except OSError as exc:  # a file going away, or not ours: say so, go on
            log.warning("could not restrict the mode of %s: %s", path, exc)
            return
        if old is not None:
            fixed.append((path, old))

    fix(data_dir)
    for root, dirs, files in os.walk(data_dir):
        here = Path(root)
        for name in files:
            fix(here / name)
        kept = []
        for name in dirs:
            fix(here / name)
            if (here / name).resolve() not in skip and not (here / name).is_symlink():
                kept.append(name)
        dirs[:] = kept
    for path, old in fixed[:SHOWN_FIXES]:
        log.warning("%s was readable by others (mode %04o); it is now owner-only (%04o)",
                    path, old, old & ~0o077)
    if len(fixed) > SHOWN_FIXES:
        log.warning("%d more paths under %s were readable by others; all are now "
                    "owner-only", len(fixed) - SHOWN_FIXES, data_dir)
    return fixed


__all__ = ["DIR_MODE", "FILE_MODE", "PRIVATE_UMASK", "private_dir", "private_file",
           "restrict", "restrict_umask", "secure_data_dir"]
