"""Image import reads the file it is given and nothing else (hardening item 1).

Crafted images name a host file holding a secret: as a qcow2 backing file, as a `json:`
backing name, as an external data file. None imports; a raw file does; the secret never
reaches the image store, where every account could boot it.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest

from ecsnap.adapters.storage import qcow2
from ecsnap.adapters.storage.base import StorageError
from ecsnap.adapters.storage.qcow2 import Qcow2Backend
from ecsnap.domain.errors import EcsError
from ecsnap.service import images
from ecsnap.service.context import ServiceContext
from tests import qcow
from tests.conftest import REGION

MIB = 1024 * 1024


@pytest.fixture
def secret(tmp_path: Path) -> tuple[bytes, Path]:
    """A host file (1 MiB, raw) full of a secret no image may ever hold."""
    word = f"HOST-SECRET-{uuid.uuid4().hex}".encode()
    path = tmp_path / "host-secret.raw"
    path.write_bytes((word * (MIB // len(word) + 1))[:MIB])
    return word, path


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


@pytest.fixture
def crafted(tmp_path: Path, secret: tuple[bytes, Path]) -> dict[str, Path]:
    _, host_file = secret
    made = tmp_path / "crafted"
    made.mkdir()
    backing = made / "backing.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(host_file), "-F", "raw", str(backing),
             "1M")
    as_json = made / "json.qcow2"
    spec = json.dumps({"driver": "raw", "file": {"driver": "file",
                                                 "filename": str(host_file)}})
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", f"json:{spec}", "-F", "raw",
             str(as_json), "1M")
    data_file = made / "data-file.qcow2"
    outside = made / "data-file.raw"  # created by qemu-img; then the secret is put in it
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={outside},data_file_raw=on",
             str(data_file), "1M")
    outside.write_bytes(host_file.read_bytes())
    return {"backing": backing, "json": as_json, "data-file": data_file}


@pytest.fixture
def raw_image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes([0x5A]) * MIB + bytes(MIB))
    return path


def stored_bytes(root: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for p in root.rglob("*") if p.is_file()]


def test_only_the_standalone_raw_image_imports(ctx: ServiceContext, crafted: dict[str, Path],
                                               raw_image: Path,
                                               secret: tuple[bytes, Path]) -> None:
    word, _ = secret
    for kind, path in crafted.items():
        with pytest.raises(EcsError) as refused:
            images.import_image(ctx, REGION, path, name=f"evil-{kind}")
        assert refused.value.code == "InvalidParameter.File", kind
        assert refused.value.http_status == 400
    image = images.import_image(ctx, REGION, raw_image, name="mine")
    assert image.size_gib == 1 and image.account_id is None
    assert qcow.holds(image.template_path, 0x5A, 0, MIB)
    assert qcow.holds(image.template_path, 0, MIB, MIB)
    names = [i.name for i in images.describe_images(ctx, "acc-anyone", REGION).items]
    assert names == ["mine"]
    data_dir = ctx.settings.data_dir
    leaks = [p for p, content in stored_bytes(data_dir) if word in content]
    assert leaks == [], f"the host secret reached {leaks}"
    assert not list(ctx.settings.images_dir.glob(".import-*"))  # no staging file left


def test_the_format_is_never_guessed(ctx: ServiceContext, raw_image: Path,
                                     tmp_path: Path) -> None:
    image = tmp_path / "image.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(image), "2M")
    with pytest.raises(EcsError) as refused:
        images.import_image(ctx, REGION, raw_image, name="as-qcow2", image_format="qcow2")
    assert refused.value.code == "InvalidParameter.Format"
    with pytest.raises(EcsError) as refused:
        images.import_image(ctx, REGION, image, name="as-raw", image_format="raw")
    assert refused.value.code == "InvalidParameter.Format"
    made = images.import_image(ctx, REGION, image, name="qcow2-ok", image_format="qcow2")
    assert made.size_gib == 1
    # a raw file whose bytes look like another format is imported as raw bytes
    vmdk = tmp_path / "descriptor.vmdk"
    vmdk.write_text('# Disk DescriptorFile\nversion=1\ncreateType="monolithicFlat"\n'
                    f'RW 2048 FLAT "{raw_image}" 0\n')
    made = images.import_image(ctx, REGION, vmdk, name="vmdk-as-raw")
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json",
                                      made.template_path], check=True, capture_output=True,
                                     text=True).stdout)
    assert info["virtual-size"] == 512  # its own 132 bytes, not the 2 MiB file it names


def test_importing_a_name_twice_is_refused(ctx: ServiceContext, raw_image: Path) -> None:
    first = images.import_image(ctx, REGION, raw_image, name="mine")
    with pytest.raises(EcsError) as refused:
        images.import_image(ctx, REGION, raw_image, name="mine")
    assert refused.value.code == "InvalidImageName.Duplicated"
    assert [i.id for i in images.describe_images(ctx, "acc-x", REGION).items] == [first.id]
    homes = [p for p in ctx.settings.images_dir.iterdir()]
    assert homes == [Path(first.template_path).parent]  # no second copy, no staging file


def test_the_backend_refuses_every_external_reference(tmp_path: Path,
                                                      crafted: dict[str, Path],
                                                      secret: tuple[bytes, Path],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    word, _ = secret
    backend = Qcow2Backend(str(tmp_path / "pool"))
    target = tmp_path / "pool" / "t.qcow2"
    for name in ("nbd:localhost:10809", 'json:{"driver":"file","filename":"/etc/hostname"}'):
        with pytest.raises(StorageError, match="protocol"):
            backend.import_image(name, str(target))
    with pytest.raises(StorageError, match="regular file"):
        backend.import_image("/dev/zero", str(target))
    for kind, path in crafted.items():
        with pytest.raises(StorageError):
            backend.import_image(str(path), str(target))
        # without the header check, what `qemu-img info` reports still refuses it
        with monkeypatch.context() as m:
            m.setattr(qcow2, "_refuse_external_references", lambda source, head: None)
            with pytest.raises(StorageError, match=r"backing file|data file"):
                backend.import_image(str(path), str(target))
        assert not target.exists() or word not in target.read_bytes(), kind


def test_qemu_img_inspects_under_limits(tmp_path: Path, raw_image: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    backend = Qcow2Backend(str(tmp_path / "pool"))
    target = str(tmp_path / "pool" / "t.qcow2")
    monkeypatch.setattr(qcow2, "INSPECT_ADDRESS_SPACE", 8 * MIB)  # too little to start
    with pytest.raises(StorageError):
        backend.import_image(str(raw_image), target)
    monkeypatch.undo()
    assert backend.import_image(str(raw_image), target) == 2 * MIB
