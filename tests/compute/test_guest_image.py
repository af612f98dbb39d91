"""The demo image build: outputs, what the root file system holds (read with debugfs, no
boot needed; test_qemu_driver.py boots it), and that building again reuses the outputs."""

from __future__ import annotations

import gzip
import json
import subprocess
from pathlib import Path

import pytest

from ecsnap.adapters.compute import guest_image
from ecsnap.adapters.compute.guest_image import DemoImage, build_demo_image
from ecsnap.adapters.compute.qemu import disk_serial
from tests.compute.conftest import CACHE


@pytest.fixture(scope="module")
def rootfs_raw(demo_image: DemoImage, tmp_path_factory: pytest.TempPathFactory) -> Path:
    raw = tmp_path_factory.mktemp("rootfs") / "rootfs.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw",
                    str(demo_image.rootfs_path), str(raw)], check=True)
    return raw


def debugfs(raw: Path, request: str) -> str:
    return subprocess.run(["debugfs", "-R", request, str(raw)], check=True,
                          capture_output=True, text=True).stdout


def test_outputs(demo_image: DemoImage) -> None:
    kernel = demo_image.kernel_path.read_bytes()
    assert kernel[0x202:0x206] == b"HdrS"  # a Linux bzImage
    info = json.loads(subprocess.run(
        ["qemu-img", "info", "--output=json", str(demo_image.rootfs_path)],
        check=True, capture_output=True, text=True).stdout)
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == guest_image.ROOTFS_MIB * 1024 * 1024
    assert info["actual-size"] < 40 * 1024 * 1024  # a thin template
    assert "root=/dev/vda" in demo_image.kernel_args and "console=ttyS0" in demo_image.kernel_args
    assert demo_image.os_name.startswith("Debian 12") and demo_image.size_gib >= 1
    initrd = gzip.decompress(demo_image.initrd_path.read_bytes())
    assert initrd.startswith(b"070701")  # newc cpio
    for name in (b"init\0", b"bin/busybox\0", b"lib/modules/virtio_blk.ko\0",
                 b"lib/modules/virtio_pci.ko\0"):
        assert name in initrd
    manifest = json.loads((demo_image.kernel_path.parent / "manifest.json").read_text())
    assert set(manifest["packages"]) >= {"busybox-static", "qemu-guest-agent", "e2fsprogs"}
    assert any(p.startswith("linux-image-") for p in manifest["packages"])
    assert list((CACHE / "debs").glob("qemu-guest-agent_*.deb"))  # cached for next time


def test_root_file_system(rootfs_raw: Path) -> None:
    # owned by root (fakeroot when built unprivileged), right modes
    shadow = debugfs(rootfs_raw, "stat /etc/shadow")
    assert "User:     0   Group:     0" in shadow and "Mode:  0600" in shadow
    assert "root::" in debugfs(rootfs_raw, "cat /etc/passwd")  # root, empty password
    # real e2fsprogs (not busybox's mke2fs), the agent and their libraries
    assert "Type: regular" in debugfs(rootfs_raw, "stat /sbin/mke2fs")
    assert "Type: regular" in debugfs(rootfs_raw, "stat /usr/sbin/qemu-ga")
    libs = debugfs(rootfs_raw, "ls /lib/x86_64-linux-gnu") + \
        debugfs(rootfs_raw, "ls /usr/lib/x86_64-linux-gnu")
    for lib in ("libc.so.6", "libglib-2.0.so.0", "libext2fs.so.2"):
        assert lib in libs
    assert "ld-linux-x86-64.so.2" in debugfs(rootfs_raw, "ls /lib64")
    # the guest's scripts
    assert "ecsnap-mount-disks" in debugfs(rootfs_raw, "ls /sbin")
    inittab = debugfs(rootfs_raw, "cat /etc/inittab")
    assert "ttyS0::respawn:/sbin/getty" in inittab and "/etc/init.d/qga" in inittab
    assert "root@ecsnap" in debugfs(rootfs_raw, "cat /etc/profile")
    assert "/sbin/poweroff" in debugfs(rootfs_raw, "cat /sbin/shutdown")


def test_building_again_reuses_the_outputs(demo_image: DemoImage) -> None:
    out = demo_image.kernel_path.parent
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    again = build_demo_image(out, CACHE / "debs")
    assert again == demo_image  # nothing was built again: every output is untouched
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == before


def test_changed_guest_files_mean_a_new_build(monkeypatch: pytest.MonkeyPatch) -> None:
    before = guest_image._fingerprint("linux-image-x")
    monkeypatch.setitem(guest_image.GUEST_FILES, "etc/motd", (0o644, "hello\n"))
    assert guest_image._fingerprint("linux-image-x") != before


def test_serial_scheme() -> None:
    disk_id = "d-" + "k3x9" * 5  # ecsnap disk IDs: "d-" and 20 characters
    assert disk_serial(disk_id) == disk_id[2:] and len(disk_serial(disk_id)) == 20
    assert "/mnt/d-$serial" in guest_image.MOUNT_DISKS  # the guest mounts /mnt/<disk id>
