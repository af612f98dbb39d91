"""The demo guest image: a tiny Debian 12 Linux built from Debian packages, no root needed.

Packages (`apt-get download`, cached): the cloud kernel, busybox-static, qemu-guest-agent
and e2fsprogs; the shared libraries of qemu-ga and mke2fs come from the host (which has
them: qemu-system-x86 and e2fsprogs need the same ones). Output: vmlinuz, an initramfs
(busybox + virtio modules) and a qcow2 root file system template.

The guest:
- mounts the system disk (the first virtio disk, /dev/vda) as its root file system;
- finds each data disk's ID in sysfs: the host gives each virtio-blk device
  `serial=<disk id without "d-">` (20 characters, the most virtio-blk keeps), and the guest
  mounts it at `/mnt/d-<serial>`, i.e. `/mnt/<disk id>`, formatting it (ext4, lazy inode
  tables, so even a large sparse disk formats in a moment) when it holds no file system;
  `/sbin/ecsnap-mount-disks` does that at boot, and the host runs it through the agent
  after a hot-plug;
- runs qemu-guest-agent on the virtio-serial port `org.qemu.guest_agent.0` (respawned);
- offers a login shell on the serial console ttyS0: user `root`, no password (a local test
  guest; do not expose its console).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("busybox-static", "qemu-guest-agent", "e2fsprogs")
KERNEL_META = "linux-image-cloud-amd64"
VIRTIO_MODULES = ("virtio/virtio_ring", "virtio/virtio", "virtio/virtio_pci_modern_dev",
                  "virtio/virtio_pci_legacy_dev", "virtio/virtio_pci", "block/virtio_blk")
ROOTFS_MIB = 128
BUILD_VERSION = "4"  # bump when the guest's scripts change

INITRAMFS_INIT = """#!/bin/sh
mount -t devtmpfs devtmpfs /dev
exec 0</dev/console 1>/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk
do insmod /lib/modules/$m.ko; done
root=/dev/vda
for i in $(seq 1 100); do [ -b $root ] && break; sleep 0.1; done
mount -t ext4 -o rw $root /newroot || { echo "ecsnap: cannot mount $root"; sh; }
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/init
"""

INITTAB = """::sysinit:/etc/init.d/rcS
::respawn:/etc/init.d/qga
ttyS0::respawn:/sbin/getty -L 115200 ttyS0 vt100
::ctrlaltdel:/sbin/reboot
::shutdown:/etc/init.d/rcK
"""

RCS = """#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
hostname ecsnap
insmod /lib/modules/virtio_console.ko 2>/dev/null
/sbin/ecsnap-mount-disks
"""

MOUNT_DISKS = """#!/bin/sh
# Mount every data disk at /mnt/d-<serial>; format it first if it holds no file system.
for dev in /sys/block/vd*; do
  name=${dev##*/}
  [ "$name" = vda ] && continue
  serial=$(cat $dev/serial 2>/dev/null)
  [ -n "$serial" ] || continue
  target=/mnt/d-$serial
  grep -q " $target " /proc/mounts && continue
  [ -b /dev/$name ] || mknod /dev/$name b $(tr ':' ' ' < $dev/dev)
  magic=$(dd if=/dev/$name bs=1 skip=1080 count=2 2>/dev/null | od -An -tx1 | tr -d ' \\n')
  if [ "$magic" != "53ef" ]; then
    /sbin/mke2fs -q -F -t ext4 -E lazy_itable_init=1,lazy_journal_init=1 /dev/$name
  fi
  mkdir -p $target && mount -t ext4 /dev/$name $target
done
# forget the mount points of disks that are gone
for m in $(awk '$2 ~ "^/mnt/d-" {print $2}' /proc/mounts); do
  grep -q " $m " /proc/mounts || continue
  dev=$(awk -v m=$m '$2 == m {print $1}' /proc/mounts)
  [ -b "$dev" ] || umount -l $m
done
"""

QGA = """#!/bin/sh
for p in /sys/class/virtio-ports/*; do
  if [ "$(cat $p/name 2>/dev/null)" = org.qemu.guest_agent.0 ]; then
    exec /usr/sbin/qemu-ga -m virtio-serial -p /dev/${p##*/} -t /run
  fi
done
sleep 2
"""

RCK = """#!/bin/sh
sync
for m in $(awk '$2 ~ "^/mnt/" {print $2}' /proc/mounts); do umount $m; done
mount -o remount,ro /
"""

SHUTDOWN = """#!/bin/sh
# qemu-ga runs `shutdown -h|-P|-r +0 "reason"`; busybox has poweroff, halt and reboot.
case "$1" in
  -r) exec /sbin/reboot ;;
  -H) exec /sbin/halt ;;
  *) exec /sbin/poweroff ;;
esac
"""

PROFILE = """export PATH=/sbin:/usr/sbin:/bin:/usr/bin
export PS1='root@ecsnap:\\w# '
cd /root
"""


@dataclass(frozen=True)
class DemoImage:
    kernel_path: Path
    initrd_path: Path
    rootfs_path: Path
    kernel_args: str
    os_name: str
    size_gib: int


class ImageBuildError(Exception):
    pass


def _run(*cmd: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ImageBuildError(f"{' '.join(cmd)}: {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def _kernel_package() -> str:
    out = _run("apt-cache", "depends", KERNEL_META)
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            return line.split()[-1]
    raise ImageBuildError(f"cannot resolve {KERNEL_META}: run apt-get update")


def _download(cache: Path, names: list[str]) -> dict[str, Path]:
    cache.mkdir(parents=True, exist_ok=True)
    found = {}
    missing = []
    for name in names:
        debs = sorted(cache.glob(f"{name}_*.deb"))
        if debs:
            found[name] = debs[-1]
        else:
            missing.append(name)
    if missing:
        os.chmod(cache, 0o777)  # apt's sandbox user may write here
        _run("apt-get", "download", "-q", *missing, cwd=cache)
        for name in missing:
            found[name] = sorted(cache.glob(f"{name}_*.deb"))[-1]
    return found


def _libs(binary: Path) -> list[str]:
    out = _run("ldd", str(binary))
    libs = []
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) > parts.index("=>") + 1 and \
                parts[parts.index("=>") + 1].startswith("/"):
            libs.append(parts[parts.index("=>") + 1])
        elif parts and parts[0].startswith("/"):
            libs.append(parts[0])
    return libs


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def _cpio_newc(root: Path) -> bytes:
    """A newc cpio archive of `root` with every file owned by root (no cpio tool needed)."""
    out = io.BytesIO()
    ino = 1

    def entry(name: str, mode: int, data: bytes) -> None:
        nonlocal ino
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
        header = "070701" + "".join(f"{f:08x}" for f in fields)
        out.write(header.encode() + name.encode() + b"\0")
        out.write(b"\0" * (-(110 + len(name) + 1) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))
        ino += 1

    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        st = path.lstat()
        if path.is_symlink():
            entry(rel, 0o120777, os.readlink(path).encode())
        elif path.is_dir():
            entry(rel, 0o040755, b"")
        else:
            entry(rel, 0o100000 | (st.st_mode & 0o777), path.read_bytes())
    entry("TRAILER!!!", 0, b"")
    return out.getvalue()


def build_demo_image(out_dir: Path, cache_dir: Path) -> DemoImage:
    """Build (or reuse) the demo image in `out_dir`, downloading packages into `cache_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kernel_pkg = _kernel_package()
    stamp = hashlib.sha256(f"{BUILD_VERSION}:{kernel_pkg}".encode()).hexdigest()[:12]
    done = out_dir / f"done-{stamp}"
    image = DemoImage(kernel_path=out_dir / "vmlinuz", initrd_path=out_dir / "initrd.img",
                      rootfs_path=out_dir / "rootfs.qcow2",
                      kernel_args="console=ttyS0 root=/dev/vda rw panic=-1 quiet",
                      os_name="Debian 12 (ecsnap demo: busybox, qemu-guest-agent)",
                      size_gib=1)
    if done.exists():
        return image
    debs = _download(Path(cache_dir), [kernel_pkg, *PACKAGES])
    work = out_dir / "work"
    shutil.rmtree(work, ignore_errors=True)
    extracted = work / "x"
    extracted.mkdir(parents=True)
    for deb in debs.values():
        _run("dpkg-deb", "-x", str(deb), str(extracted))
    modules = next((extracted / "lib" / "modules").iterdir()) / "kernel" / "drivers"
    busybox = extracted / "bin" / "busybox"
    applets = [a for a in _run(str(busybox), "--list").split() if a not in ("busybox",)]

    # initramfs
    initrd = work / "initrd"
    for d in ("bin", "dev", "proc", "sys", "newroot", "lib/modules"):
        (initrd / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, initrd / "bin" / "busybox")
    for applet in ("sh", "mount", "umount", "insmod", "switch_root", "sleep", "seq", "echo"):
        (initrd / "bin" / applet).symlink_to("busybox")
    for module in VIRTIO_MODULES:
        shutil.copy2(modules / f"{module}.ko", initrd / "lib" / "modules")
    _write(initrd / "init", INITRAMFS_INIT, 0o755)
    image.initrd_path.write_bytes(gzip.compress(_cpio_newc(initrd), compresslevel=1))
    shutil.copy2(next((extracted / "boot").glob("vmlinuz-*")), image.kernel_path)

    # root file system
    root = work / "rootfs"
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "run", "tmp", "mnt",
              "root", "etc/init.d", "lib/modules"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "var").symlink_to("run")
    shutil.copy2(busybox, root / "bin" / "busybox")
    for applet in applets:
        link = root / "bin" / applet
        if not link.exists():
            link.symlink_to("busybox")
    for name in ("init", "getty", "poweroff", "reboot", "halt", "login"):
        (root / "sbin" / name).symlink_to("/bin/busybox")
    shutil.copy2(modules / "char" / "virtio_console.ko", root / "lib" / "modules")
    for binary, target in ((extracted / "usr/sbin/qemu-ga", root / "usr/sbin/qemu-ga"),
                           (extracted / "sbin/mke2fs", root / "sbin/mke2fs")):
        shutil.copy2(binary, target)
        for lib in _libs(binary):
            dest = root / lib.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(lib, dest, follow_symlinks=True)
    _write(root / "etc/inittab", INITTAB)
    _write(root / "etc/init.d/rcS", RCS, 0o755)
    _write(root / "etc/init.d/rcK", RCK, 0o755)
    _write(root / "etc/init.d/qga", QGA, 0o755)
    _write(root / "sbin/shutdown", SHUTDOWN, 0o755)
    _write(root / "sbin/ecsnap-mount-disks", MOUNT_DISKS, 0o755)
    _write(root / "etc/passwd", "root::0:0:root:/root:/bin/sh\n")
    _write(root / "etc/group", "root:x:0:\n")
    _write(root / "etc/shadow", "root::19000:0:99999:7:::\n", 0o600)
    _write(root / "etc/profile", PROFILE)
    _write(root / "etc/hostname", "ecsnap\n")
    _write(root / "etc/os-release", 'PRETTY_NAME="Debian 12 (ecsnap demo)"\nID=debian\n')
    raw = work / "rootfs.raw"
    fakeroot = ["fakeroot"] if shutil.which("fakeroot") and os.geteuid() != 0 else []
    _run(*fakeroot, "mke2fs", "-q", "-t", "ext4", "-L", "root", "-E", "root_owner=0:0",
         "-d", str(root), str(raw), f"{ROOTFS_MIB}M")
    _run("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw),
         str(image.rootfs_path))
    shutil.rmtree(work, ignore_errors=True)
    for old in out_dir.glob("done-*"):
        old.unlink()
    done.write_text(kernel_pkg)
    return image


__all__ = ["DemoImage", "build_demo_image"]
