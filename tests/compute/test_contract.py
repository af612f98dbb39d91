"""The compute contract and the QEMU driver's shape, without booting anything: the
capability Protocols add up to ComputeDriver, the driver implements each method with the
contract's signature, and the guest files ship as package data."""

from __future__ import annotations

import inspect
import tomllib
from importlib import resources
from pathlib import Path

from ecsnap.adapters.compute import base, guest_image
from ecsnap.adapters.compute.qemu import QemuDriver

CAPABILITIES = (base.VmLifecycle, base.LiveSnapshots, base.DiskHotPlug, base.GuestAgent)


def methods(protocol: type) -> set[str]:
    return {name for name, value in vars(protocol).items()
            if callable(value) and not name.startswith("_")}


def test_compute_driver_is_the_union_of_the_capabilities() -> None:
    parts = [methods(p) for p in CAPABILITIES]
    assert sum(len(p) for p in parts) == len(set().union(*parts))  # no method twice
    assert set().union(*parts) == {
        "start", "stop", "reboot", "state", "running", "serial_socket", "snapshot_disks",
        "delete_disk_snapshot", "has_disk_snapshot", "resume_guest", "attach_disk",
        "detach_disk", "guest_ping", "guest_exec", "guest_write_file"}
    assert methods(base.ComputeDriver) == set()  # nothing of its own
    assert all(p in base.ComputeDriver.__mro__ for p in CAPABILITIES)
    for protocol in CAPABILITIES:  # the docstrings are the contract
        assert protocol.__doc__ and all(getattr(protocol, name).__doc__
                                        for name in methods(protocol))


def test_the_qemu_driver_has_the_contract_signatures() -> None:
    for protocol in CAPABILITIES:
        for name in methods(protocol):
            assert str(inspect.signature(getattr(QemuDriver, name))) == \
                str(inspect.signature(getattr(protocol, name))), name


def test_guest_files_ship_as_package_data() -> None:
    folder = resources.files("ecsnap.adapters.compute") / "guest"
    shipped = {f.name: f.read_text(encoding="utf-8") for f in folder.iterdir() if f.is_file()}
    used = [text for _, text in guest_image.GUEST_FILES.values()] + [guest_image.INITRAMFS_INIT]
    assert shipped and all(text in used for text in shipped.values())  # none is left over
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert "adapters/compute/guest/*" in \
        pyproject["tool"]["setuptools"]["package-data"]["ecsnap"]
