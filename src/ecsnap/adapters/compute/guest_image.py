"""The demo guest image: a tiny Debian 12 Linux built from Debian packages.

`build_demo_image(out_dir, cache_dir)` downloads (`apt-get download`, cached in
`cache_dir`, reused when the candidate version is already there) Debian's cloud kernel,
busybox-static, qemu-guest-agent and e2fsprogs, unpacks them with `dpkg-deb -x` and
produces in `out_dir`:

- `vmlinuz`: the kernel, booted directly (`-kernel`, `DemoImage.kernel_args`);
- `initrd.img`: an initramfs (busybox and the virtio modules) that mounts the root file
  system and switches to it;
- `rootfs.qcow2`: the root file system template (ext4, 128 MiB virtual, a few MiB on
  disk), made with `mke2fs -d` (under fakeroot when not root) and `qemu-img convert`;
  instances get a copy-on-write overlay or a copy of it as their system disk;
- `manifest.json`: what the build used. The build is skipped when the manifest matches
  (same packages, same guest files), so calling this again is cheap.

The shared libraries of qemu-ga and the e2fsprogs tools come from the host (`ldd`; a
Debian 12 host has them, since qemu-system-x86 and e2fsprogs depend on the same ones);
the ones the host lacks are taken from their Debian packages instead.

The guest's scripts and multi-line configuration files are real files in `guest/` beside
this module (shipped as package data; `GUEST_FILES` says where each goes in the guest).
The guest, which is what the QEMU driver (the `qemu` package) expects:

- the system disk is the first virtio disk, /dev/vda, mounted read-write as /;
- every other virtio-blk disk is a data disk. Serial scheme: the host gives each one
  `serial=<disk id without its "d-" prefix>` (ecsnap disk IDs are "d-" and 20 lowercase
  letters and digits, and virtio-blk keeps at most 20 bytes of serial), and the guest
  mounts it at `/mnt/d-<serial>`, which is `/mnt/<disk id>`. A disk without a file
  system (no ext magic and its first 128 KiB all zero) is formatted first with
  e2fsprogs' `mke2fs -t ext4`, lazily (no inode table or journal zeroing, no discard),
  so even a 20 GiB sparse disk formats in about a second under TCG; it is mounted with
  `noinit_itable`, so the kernel does not zero the inode tables later either (which
  would fill a thin disk). A disk with other content is mounted if the kernel knows its
  file system, and never formatted. `/sbin/ecsnap-mount-disks` does this at boot, again
  on every block uevent of a whole virtio disk (busybox `uevent`: hot-plugged and
  removed disks), and whenever the host runs it through the agent;
  `ecsnap-mount-disks --wait <serial> <seconds>` also waits for that disk to be mounted.
  Its log is /run/ecsnap-disks.log;
- qemu-guest-agent runs on the virtio-serial port `org.qemu.guest_agent.0`, respawned
  by init (its log: /run/qemu-ga.log). While `/run/ecsnap-agent-off` exists, init does
  not restart it (to exercise the host's fallbacks);
- the serial console ttyS0 has a login prompt. The account `root` has an EMPTY
  password: type `root` at `login:` to get a shell (prompt `root@ecsnap:~# `). This is a
  local test guest; do not expose its console to anyone you would not give root to;
- `/sbin/shutdown` (which qemu-ga's `guest-shutdown` runs) maps to busybox's poweroff,
  halt or reboot; the ACPI power button (QMP `system_powerdown`) powers off through
  busybox acpid; Ctrl-Alt-Del reboots; on the way down init syncs, unmounts the data
  disks and remounts / read-only.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ecsnap.adapters.compute.filelock import flock_until

log = logging.getLogger("ecsnap.compute.image")

KERNEL_META = "linux-image-cloud-amd64"
PACKAGES = ("busybox-static", "qemu-guest-agent", "e2fsprogs")
# loaded in this order by the initramfs (paths under the kernel's drivers/)
INITRD_MODULES = ("virtio/virtio_ring", "virtio/virtio", "virtio/virtio_pci_modern_dev",
                  "virtio/virtio_pci_legacy_dev", "virtio/virtio_pci", "block/virtio_blk")
# loaded by the root file system's rcS
ROOTFS_MODULES = ("char/virtio_console", "input/evdev", "acpi/button")
E2FSPROGS = ("mke2fs", "e2fsck", "resize2fs", "tune2fs")
ROOTFS_MIB = 128
KERNEL_ARGS = "console=ttyS0 root=/dev/vda rw panic=-1 quiet"
OS_NAME = "Debian 12 (ecsnap demo, busybox)"
SIZE_GIB = 1
FORMAT = 5  # bump when the build itself (not a guest file) changes


def _guest_file(name: str) -> str:
    """The text of a guest file shipped in `guest/` beside this module (package data)."""
    return (resources.files("ecsnap.adapters.compute") / "guest" / name).read_text(
        encoding="utf-8")


# the initramfs' /init ("MODULES" is replaced by the module names)
INITRAMFS_INIT = _guest_file("initramfs-init.sh")
MOUNT_DISKS = _guest_file("ecsnap-mount-disks.sh")

# path in the root file system -> (mode, text)
GUEST_FILES: dict[str, tuple[int, str]] = {
    "etc/inittab": (0o644, _guest_file("inittab")),
    "etc/init.d/rcS": (0o755, _guest_file("rcS.sh")),
    "etc/init.d/rcK": (0o755, _guest_file("rcK.sh")),
    "etc/init.d/qga": (0o755, _guest_file("qga.sh")),
    "etc/init.d/uevent": (0o755, _guest_file("uevent-daemon.sh")),
    "etc/init.d/acpid": (0o755, _guest_file("acpid.sh")),
    "sbin/ecsnap-mount-disks": (0o755, MOUNT_DISKS),
    "sbin/ecsnap-uevent": (0o755, _guest_file("ecsnap-uevent.sh")),
    "sbin/shutdown": (0o755, _guest_file("shutdown.sh")),
    "etc/acpi/PWRF/00000080": (0o755, _guest_file("power-button.sh")),
    "etc/passwd": (0o644, "root::0:0:root:/root:/bin/sh\n"),
    "etc/group": (0o644, "root:x:0:\n"),
    "etc/shadow": (0o600, "root::19000:0:99999:7:::\n"),
    "etc/shells": (0o644, "/bin/sh\n/bin/ash\n"),
    "etc/securetty": (0o644, "ttyS0\nconsole\n"),
    "etc/profile": (0o644, _guest_file("profile")),
    "etc/issue": (0o644, _guest_file("issue")),
    "etc/hostname": (0o644, "ecsnap\n"),
    "etc/hosts": (0o644, "127.0.0.1 localhost ecsnap\n"),
    "etc/fstab": (0o644, "/dev/vda / ext4 rw 0 1\n"),
    "etc/os-release": (0o644, f'PRETTY_NAME="{OS_NAME}"\nNAME="ecsnap demo"\n'
                              'ID=debian\nVERSION_ID="12"\n'),
}


@dataclass(frozen=True)
class DemoImage:
    kernel_path: Path
    initrd_path: Path
    rootfs_path: Path  # a qcow2 template
    kernel_args: str
    os_name: str
    size_gib: int


class ImageBuildError(Exception):
    """The demo image could not be built."""


class _MissingLibraries(ImageBuildError):
    def __init__(self, names: list[str]) -> None:
        super().__init__(f"shared libraries not found: {', '.join(names)}")
        self.names = names


def _run(*cmd: str, cwd: Path | None = None, env: dict[str, str] | None = None,
         timeout: float = 600) -> str:
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ImageBuildError(f"{cmd[0]}: {exc}") from exc
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise ImageBuildError(f"{' '.join(cmd)}: {detail}")
    return proc.stdout


def _newest(paths: list[Path]) -> Path | None:
    return max(paths, key=lambda p: p.stat().st_mtime, default=None)


# ------------------------------------------------------------------ packages

def _kernel_package(cache: Path) -> str:
    """The versioned cloud kernel package (linux-image-6.1.0-NN-cloud-amd64)."""
    try:
        out = _run("apt-cache", "depends", KERNEL_META)
    except ImageBuildError:
        out = ""
    for line in out.splitlines():
        words = line.split()
        if len(words) == 2 and words[0] == "Depends:" and words[1].startswith("linux-image-"):
            return words[1]
    cached = _newest(list(cache.glob("linux-image-*-cloud-amd64_*.deb")))
    if cached is not None:  # no apt lists (offline): use what was downloaded before
        return cached.name.split("_")[0]
    raise ImageBuildError(f"cannot resolve {KERNEL_META}: run `apt-get update`")


def _candidates(names: list[str]) -> dict[str, str]:
    """name -> the .deb file name `apt-get download` would fetch now (from apt-cache)."""
    try:
        out = _run("apt-cache", "show", "--no-all-versions", *names)
    except ImageBuildError:
        return {}
    found: dict[str, str] = {}
    for block in out.split("\n\n"):
        fields = dict(re.findall(r"^(Package|Version|Architecture): (.+)$", block, re.M))
        if {"Package", "Version", "Architecture"} <= fields.keys():
            version = fields["Version"].replace(":", "%3a")
            found.setdefault(fields["Package"],
                             f"{fields['Package']}_{version}_{fields['Architecture']}.deb")
    return found


def _fetch(cache: Path, names: list[str]) -> dict[str, Path]:
    """The .deb of each package: from the cache when its candidate version is there,
    else downloaded into the cache with `apt-get download`."""
    cache.mkdir(parents=True, exist_ok=True)
    wanted = _candidates(names)
    debs: dict[str, Path] = {}
    missing = []
    for name in names:
        if name in wanted:
            if (cache / wanted[name]).is_file():
                debs[name] = cache / wanted[name]
                continue
        elif (old := _newest(list(cache.glob(f"{name}_*.deb")))) is not None:
            debs[name] = old  # apt knows nothing (offline): the newest cached one
            continue
        missing.append(name)
    if missing:
        log.info("downloading %s", " ".join(missing))
        # as root, apt drops to its sandbox user, which may not write here: stay root
        sandbox = ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []
        try:
            # one download into a cache at a time (builds of other output directories,
            # other processes, share it); a file another one fetched meanwhile is kept
            with _exclusive(cache / ".download.lock"):
                if not all(n in wanted and (cache / wanted[n]).is_file() for n in missing):
                    _run("apt-get", "download", "-q", *sandbox, *missing, cwd=cache)
        except ImageBuildError as exc:
            older = {n: _newest(list(cache.glob(f"{n}_*.deb"))) for n in missing}
            if any(p is None for p in older.values()):
                raise
            log.warning("apt-get download failed (%s); using the cached older versions", exc)
            wanted = {}
        for name in missing:
            got = cache / wanted[name] if name in wanted else \
                _newest(list(cache.glob(f"{name}_*.deb")))
            if got is None or not got.is_file():
                raise ImageBuildError(f"apt-get download {name} left no .deb in {cache}")
            debs[name] = got
    return debs


def _lib_packages(names: tuple[str, ...]) -> list[str]:
    out = _run("apt-cache", "depends", *names)
    return sorted({w[1] for line in out.splitlines() if len(w := line.split()) == 2
                   and w[0] in ("Depends:", "PreDepends:") and w[1].startswith("lib")})


# ------------------------------------------------------------------ files

def _libraries(binaries: list[Path], extracted: Path) -> list[Path]:
    """The shared libraries (and the dynamic loader) the binaries need, by `ldd`; the
    libraries unpacked from packages into `extracted` win over the host's."""
    dirs = [str(extracted / d) for d in ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu")]
    env = {**os.environ, "LD_LIBRARY_PATH": ":".join(dirs)}
    libs: set[Path] = set()
    missing: set[str] = set()
    for binary in binaries:
        for line in _run("ldd", str(binary), env=env).splitlines():
            words = line.split()
            if "=>" in words:
                after = words[words.index("=>") + 1:]
                if after[:2] == ["not", "found"]:
                    missing.add(words[0])
                elif after and after[0].startswith("/"):
                    libs.add(Path(after[0]))
            elif words and words[0].startswith("/"):
                libs.add(Path(words[0]))
    if missing:
        raise _MissingLibraries(sorted(missing))
    return sorted(libs)


def _guest_path(lib: Path, extracted: Path) -> Path:
    """Where a library goes in the guest: its path in the package or on the host, if
    that is a directory the guest's loader searches."""
    with contextlib.suppress(ValueError):
        return Path("/") / lib.relative_to(extracted)
    if str(lib.parent) in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64"):
        return lib
    return Path("/usr/lib/x86_64-linux-gnu") / lib.name


def _write(root: Path, rel: str, mode: int, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def _cpio(root: Path) -> bytes:
    """A newc cpio archive of `root`, every entry owned by root, timestamps zero."""
    out = bytearray()

    def entry(ino: int, name: str, mode: int, data: bytes) -> None:
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0)
        out.extend(b"070701" + "".join(f"{f:08x}" for f in fields).encode())
        out.extend(name.encode() + b"\0")
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, path in enumerate(sorted(root.rglob("*")), start=1):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            entry(ino, rel, 0o120777, os.readlink(path).encode())
        elif path.is_dir():
            entry(ino, rel, 0o040755, b"")
        else:
            entry(ino, rel, 0o100000 | (path.stat().st_mode & 0o777), path.read_bytes())
    entry(0, "TRAILER!!!", 0, b"")
    return bytes(out)


# ------------------------------------------------------------------ build

def _fingerprint(kernel_pkg: str) -> str:
    h = hashlib.sha256()
    for part in (str(FORMAT), kernel_pkg, *PACKAGES, *INITRD_MODULES, *ROOTFS_MODULES,
                 *E2FSPROGS, str(ROOTFS_MIB), KERNEL_ARGS, INITRAMFS_INIT):
        h.update(part.encode() + b"\0")
    for rel, (mode, text) in sorted(GUEST_FILES.items()):
        h.update(f"{rel}:{mode:o}:".encode() + text.encode() + b"\0")
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _exclusive(path: Path, timeout: float = 900) -> Iterator[None]:
    """One builder per output directory, across processes."""
    with open(path, "a") as handle:
        if not flock_until(handle, time.monotonic() + timeout, 0.2):
            raise ImageBuildError(f"another build holds {path}")
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_demo_image(out_dir: Path, cache_dir: Path) -> DemoImage:
    """Build the demo image in `out_dir` (or reuse the one there if it was built from the
    same inputs), with the Debian packages cached in `cache_dir`."""
    out_dir = Path(out_dir).resolve()
    cache_dir = Path(cache_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    image = DemoImage(kernel_path=out_dir / "vmlinuz", initrd_path=out_dir / "initrd.img",
                      rootfs_path=out_dir / "rootfs.qcow2", kernel_args=KERNEL_ARGS,
                      os_name=OS_NAME, size_gib=SIZE_GIB)
    manifest = out_dir / "manifest.json"
    with _exclusive(out_dir / ".build.lock"):
        kernel_pkg = _kernel_package(cache_dir)
        stamp = _fingerprint(kernel_pkg)
        with contextlib.suppress(OSError, ValueError, KeyError):
            if json.loads(manifest.read_text())["fingerprint"] == stamp and all(
                    p.is_file() for p in (image.kernel_path, image.initrd_path,
                                          image.rootfs_path)):
                return image
        started = time.monotonic()
        manifest.unlink(missing_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=out_dir))
        try:
            debs = _build(work, cache_dir, kernel_pkg, image)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        manifest.write_text(json.dumps({
            "fingerprint": stamp, "os_name": OS_NAME, "kernel_args": KERNEL_ARGS,
            "rootfs_mib": ROOTFS_MIB, "packages": {k: v.name for k, v in debs.items()},
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2) + "\n")
        log.info("built the demo image in %s in %.1f s", out_dir, time.monotonic() - started)
    return image


def _build(work: Path, cache: Path, kernel_pkg: str, image: DemoImage) -> dict[str, Path]:
    debs = _fetch(cache, [kernel_pkg, *PACKAGES])
    x = work / "x"
    x.mkdir()
    for deb in debs.values():
        _run("dpkg-deb", "-x", str(deb), str(x))
    kernels = sorted((x / "boot").glob("vmlinuz-*"))
    module_roots = sorted((x / "lib" / "modules").glob("*/kernel/drivers"))
    if not kernels or not module_roots:
        raise ImageBuildError(f"{debs[kernel_pkg].name} holds no kernel or modules")
    drivers = module_roots[-1]
    busybox = x / "bin" / "busybox"

    # the initramfs
    initrd = work / "initrd"
    for d in ("bin", "dev", "proc", "sys", "newroot", "lib/modules"):
        (initrd / d).mkdir(parents=True)
    shutil.copy2(busybox, initrd / "bin" / "busybox")
    for applet in ("sh", "mount", "umount", "insmod", "switch_root", "sleep", "cat", "echo"):
        (initrd / "bin" / applet).symlink_to("busybox")
    for module in INITRD_MODULES:
        shutil.copy2(drivers / f"{module}.ko", initrd / "lib" / "modules")
    names = " ".join(m.rsplit("/", 1)[-1] for m in INITRD_MODULES)
    _write(initrd, "init", 0o755, INITRAMFS_INIT.replace("MODULES", names))

    # the root file system
    root = work / "rootfs"
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "run", "tmp",
              "mnt", "root", "etc/init.d", "lib/modules/ecsnap"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "var").symlink_to("run")
    shutil.copy2(busybox, root / "bin" / "busybox")
    tools = [x / "usr/sbin/qemu-ga", *(x / "sbin" / t for t in E2FSPROGS)]
    for tool in tools:
        shutil.copy2(tool, root / tool.relative_to(x))
    (root / "sbin/mkfs.ext4").symlink_to("mke2fs")
    (root / "sbin/fsck.ext4").symlink_to("e2fsck")
    shutil.copy2(x / "etc/mke2fs.conf", root / "etc/mke2fs.conf")
    for applet in _run(str(busybox), "--list-full").split():
        link = root / applet
        if not link.exists() and not link.is_symlink():  # e2fsprogs' tools win
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/bin/busybox")
    for module in ROOTFS_MODULES:
        shutil.copy2(drivers / f"{module}.ko", root / "lib/modules/ecsnap")
    try:
        libs = _libraries(tools, x)
    except _MissingLibraries as exc:
        log.info("the host lacks %s; taking them from Debian packages", ", ".join(exc.names))
        for deb in _fetch(cache, _lib_packages(PACKAGES)).values():
            _run("dpkg-deb", "-x", str(deb), str(x))
        libs = _libraries(tools, x)
    for lib in libs:
        dest = root / str(_guest_path(lib, x)).lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(lib, dest, follow_symlinks=True)
    for rel, (mode, text) in GUEST_FILES.items():
        _write(root, rel, mode, text)
    (root / "root").chmod(0o700)
    (root / "tmp").chmod(0o1777)

    raw = work / "rootfs.raw"
    fakeroot = ["fakeroot"] if os.geteuid() != 0 and shutil.which("fakeroot") else []
    _run(*fakeroot, "mke2fs", "-q", "-F", "-t", "ext4", "-L", "ecsnap-root",
         "-E", "root_owner=0:0", "-d", str(root), str(raw), f"{ROOTFS_MIB}M")

    # write each output next to its final name, then rename: no reader sees half a file
    staged = {target: target.with_name(f".{target.name}.tmp")
              for target in (image.initrd_path, image.kernel_path, image.rootfs_path)}
    staged[image.initrd_path].write_bytes(
        gzip.compress(_cpio(initrd), compresslevel=6, mtime=0))
    shutil.copyfile(kernels[-1], staged[image.kernel_path])
    _run("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw),
         str(staged[image.rootfs_path]))
    for target, tmp in staged.items():
        os.replace(tmp, target)
    return debs


__all__ = ["DemoImage", "ImageBuildError", "build_demo_image"]
