"""Images: register a qcow2 template (the demo image, or a user's own) and list images."""

from __future__ import annotations

import fnmatch
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ecsnap.adapters.storage.base import StorageError
from ecsnap.adapters.store.base import Criteria
from ecsnap.domain import ids, rules
from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import GIB, Image
from ecsnap.service.context import ServiceContext
from ecsnap.service.listing import Page, check_page, paginate


def register_image(ctx: ServiceContext, region_id: str, *, name: str, os_name: str,
                   template: Path, size_gib: int, account_id: str | None = None,
                   boot_mode: str = "bios", kernel: Path | None = None,
                   initrd: Path | None = None, kernel_args: str = "",
                   description: str = "", unique: bool = False,
                   move_template: bool = False) -> Image:
    """Copy the template (and kernel/initrd for direct boot) into the image store, once, and
    record the Image. Disks are thin overlays on the copy, so it must never change: it is
    read-only, owner-only (0400; QEMU runs as the same user).

    An image of that name (same region, same owner) is returned as it is, or with `unique`
    refused (`InvalidImageName.Duplicated`). `move_template`: the template is a staging
    file in the image store, moved rather than copied."""
    rules.check_name(name, code="InvalidImageName.Malformed", field="ImageName")
    if boot_mode not in ("bios", "direct"):
        raise EcsError("InvalidParameter.BootMode", "BootMode is bios or direct.", 400)
    if boot_mode == "direct" and not (kernel and initrd):
        raise EcsError("MissingParameter", "Direct boot needs a kernel and an initrd.", 400)
    with ctx.uow() as uow:
        ctx.check_region(uow, region_id)
        same = [i for i in uow.images.find(region_id=region_id, name=name)
                if i.account_id == account_id]
        if same and unique:
            raise duplicated_name(name)
        if same:
            return same[0]
    image_id = ids.new_id("image")
    home = _private_dir(ctx.settings.images_dir / image_id)
    paths = {}
    for key, source in (("template", template), ("kernel", kernel), ("initrd", initrd)):
        if source is not None:
            target = home / (Path(source).name if key != "template" else "template.qcow2")
            if key == "template" and move_template:
                os.replace(source, target)
            else:
                shutil.copyfile(source, target)
            target.chmod(0o400)
            paths[key] = str(target)
    image = Image(id=image_id, region_id=region_id, name=name, os_name=os_name,
                  template_path=paths["template"], size_gib=max(1, size_gib),
                  account_id=account_id, boot_mode=boot_mode,
                  kernel_path=paths.get("kernel", ""), initrd_path=paths.get("initrd", ""),
                  kernel_args=kernel_args, description=description)
    with ctx.uow() as uow:
        if unique and [i for i in uow.images.find(region_id=region_id, name=name)
                       if i.account_id == account_id]:  # imported meanwhile
            shutil.rmtree(home, ignore_errors=True)
            raise duplicated_name(name)
        uow.images.add(image)
        uow.commit()
    return image


def duplicated_name(name: str) -> EcsError:
    return EcsError("InvalidImageName.Duplicated",
                    f"An image named \"{name}\" exists already in this region.", 400)


def size_gib_of(virtual_size: int) -> int:
    return max(1, -(-virtual_size // GIB))


def describe_images(ctx: ServiceContext, account_id: str, region_id: str, *,
                    image_ids: Sequence[str] | None = None, name: str | None = None,
                    owner_alias: str | None = None, page_number: int | None = None,
                    page_size: int | None = None) -> Page[Image]:
    criteria = Criteria(equals={"region_id": region_id}, newest_first=True)
    if image_ids:
        criteria.within["id"] = list(image_ids)
    if name:
        criteria.wildcard["name"] = name
    if owner_alias == "system":
        criteria.equals["account_id"] = None
    elif owner_alias == "self":
        criteria.equals["account_id"] = account_id
    elif owner_alias not in (None, "", "others", "marketplace"):
        raise EcsError("InvalidImageOwnerAlias.ValueNotSupported",
                       f"The ImageOwnerAlias \"{owner_alias}\" is not valid.", 400)
    else:
        criteria.within["account_id"] = [account_id]
    with ctx.uow(readonly=True) as uow:
        ctx.check_region(uow, region_id)
        if owner_alias in (None, ""):
            rows = [i for i in uow.images.find(Criteria(equals={"region_id": region_id},
                                                        within=dict(criteria.within) if
                                                        image_ids else {}))
                    if i.account_id in (None, account_id)]
            if name:
                rows = [i for i in rows if _match(name, i.name)]
            number, size = check_page(page_number, page_size)
            return Page(rows[(number - 1) * size:number * size], len(rows), number, size, "")
        return paginate(uow.images, criteria, page_number=page_number, page_size=page_size)


def _match(pattern: str, value: str) -> bool:

    return fnmatch.fnmatchcase(value, pattern)


DEMO_IMAGE_NAME = "ecsnap-demo-debian12"
QCOW2_MAGIC = b"QFI\xfb"


def build_demo_image(ctx: ServiceContext, region_id: str) -> Image:
    """Build the small demo Linux guest from Debian packages (cached) and register it as a
    system image (direct kernel boot; qemu-guest-agent; data disks at /mnt/<disk id>)."""
    with ctx.uow() as uow:
        ctx.check_region(uow, region_id)
        found = [i for i in uow.images.find(region_id=region_id, name=DEMO_IMAGE_NAME)
                 if i.account_id is None]
        if found:
            return found[0]
    if ctx.image_builder is None:
        raise EcsError("OperationDenied", "No guest image builder is configured.", 403)
    built = ctx.image_builder(ctx.settings.cache_dir / "demo-image",
                              ctx.settings.cache_dir / "debs")
    return register_image(ctx, region_id, name=DEMO_IMAGE_NAME, os_name=built.os_name,
                          template=built.rootfs_path, size_gib=built.size_gib,
                          boot_mode="direct", kernel=built.kernel_path,
                          initrd=built.initrd_path, kernel_args=built.kernel_args,
                          description="Tiny Debian 12 guest built by ecsnap: busybox, "
                                      "qemu-guest-agent, data disks at /mnt/<disk id>, "
                                      "root login without password on the serial console.")


IMAGE_FORMATS = ("auto", "qcow2", "raw")


def import_image(ctx: ServiceContext, region_id: str, source: Path, *, name: str,
                 os_name: str = "Linux", account_id: str | None = None,
                 image_format: str = "auto") -> Image:
    """Register a user's own qcow2 or raw image (BIOS boot from the system disk).

    Only that file is read: the importer refuses an image naming a backing file, an
    external data file or any other file, and never lets qemu-img guess the format
    (`image_format` auto: a qcow2 by its magic, else raw; qcow2 or raw: the file must be
    that). A name taken already is refused (InvalidImageName.Duplicated)."""
    rules.check_name(name, code="InvalidImageName.Malformed", field="ImageName")
    if image_format not in IMAGE_FORMATS:
        raise EcsError("InvalidParameter.Format", "The image format is auto, qcow2 or raw.",
                       400)
    if not Path(source).is_file():
        raise EcsError("InvalidParameter.File", f"No image file at {source}.", 400)
    if ctx.image_import is None:
        raise EcsError("OperationDenied", "No image importer is configured.", 403)
    is_qcow2 = _has_qcow2_magic(Path(source))
    if image_format == "qcow2" and not is_qcow2:
        raise EcsError("InvalidParameter.Format", f"{source} is not a qcow2 image.", 400)
    if image_format == "raw" and is_qcow2:
        raise EcsError("InvalidParameter.Format",
                       f"{source} is a qcow2 image; import it as qcow2.", 400)
    with ctx.uow(readonly=True) as uow:
        ctx.check_region(uow, region_id)
        if [i for i in uow.images.find(region_id=region_id, name=name)
                if i.account_id == account_id]:
            raise duplicated_name(name)
    images_dir = _private_dir(ctx.settings.images_dir)
    # a staging file of its own (0600) for each import: two imports never share one
    fd, staged = tempfile.mkstemp(prefix=".import-", suffix=".qcow2", dir=images_dir)
    os.close(fd)
    staging = Path(staged)
    try:
        try:
            size = ctx.image_import.import_image(str(source), str(staging))
        except StorageError as exc:
            raise EcsError("InvalidParameter.File", f"The image was refused: {exc}",
                           400) from exc
        return register_image(ctx, region_id, name=name, os_name=os_name, template=staging,
                              size_gib=size_gib_of(size), account_id=account_id,
                              unique=True, move_template=True)
    finally:
        staging.unlink(missing_ok=True)


def _private_dir(path: Path) -> Path:
    """A directory of the image store, owner-only (0700) whatever the umask."""
    made = not path.is_dir()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if made:
        path.chmod(0o700)
    return path


def _has_qcow2_magic(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == QCOW2_MAGIC


def images_by_id(ctx: ServiceContext, image_ids: set[str]) -> dict[str, Image]:
    with ctx.uow(readonly=True) as uow:
        return {i.id: i for i in uow.images.find(Criteria(within={"id": sorted(image_ids)}))}
