"""Images: register a qcow2 template (the demo image, or a user's own), make custom images
from a system disk's snapshot or an instance (CreateImage), list and delete them.

A custom image is a directory of the image store as every image is: its template, a
standalone read-only qcow2 the snapshot was exported into (storage `export_snapshot`), and
its own copies (hard links) of the source image's kernel and initrd, so that it boots as
its source did and needs nothing of the snapshot, its disk or the source image later. Its
system disks are O(1) overlays (qcow2) or clones (RBD) of the template, as for any image.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ecsnap.adapters.storage.base import StorageError
from ecsnap.adapters.store.base import Criteria, UnitOfWork
from ecsnap.domain import errors, ids, rules
from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import GIB, DiskType, Image, InstanceStatus, Snapshot, SnapshotStatus
from ecsnap.service import idempotency, snapshot_records
from ecsnap.service.context import ServiceContext, get_instance, get_snapshot
from ecsnap.service.disk_files import delete_internal_snapshot
from ecsnap.service.listing import Page, check_page, paginate
from ecsnap.service.operation import Lock, Operation, Plan, Resume, Step
from ecsnap.service.snapshot_records import SnapshotSpec, check_snapshot_quota, new_items
from ecsnap.service.space import require_free_space
from ecsnap.service.tasks import SHORT_TASK_S
from ecsnap.service.vms import vm_running
from ecsnap.service.volumes import current_volumes

# What DescribeImages shows (its Status filter); an image being deleted, or deleted with
# Force while instances still boot from it (its row and files stay for them), is hidden
CREATING, AVAILABLE, CREATE_FAILED = "Creating", "Available", "CreateFailed"
DELETING, DELETED = "Deleting", "Deleted"
LISTED = (CREATING, AVAILABLE, CREATE_FAILED)


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
                    page_size: int | None = None, statuses: Sequence[str] = (AVAILABLE,),
                    snapshot_id: str | None = None, usage: str | None = None) -> Page[Image]:
    """DescribeImages: `statuses` of LISTED, any letter case (ECS: Available by default);
    `usage` instance (the account's instances were made from it) or none."""
    wanted = [s for s in LISTED if s.lower() in {x.lower() for x in statuses}]
    criteria = Criteria(equals={"region_id": region_id}, newest_first=True,
                        within={"status": wanted})
    if usage and usage not in ("instance", "none"):
        raise EcsError("InvalidUsage", f"The Usage \"{usage}\" is not valid (instance or "
                       "none).", 404)
    if image_ids:
        criteria.within["id"] = list(image_ids)
    if snapshot_id:
        criteria.equals["source_snapshot_id"] = snapshot_id
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
        if usage:
            used = sorted(_used_by_instances(uow, account_id, None))
            if usage == "instance":
                criteria.within["id"] = [i for i in used if "id" not in criteria.within
                                         or i in criteria.within["id"]]
            else:
                criteria.without["id"] = used
        if owner_alias in (None, ""):
            within = {k: v for k, v in criteria.within.items() if k != "account_id"}
            rows = [i for i in uow.images.find(Criteria(equals=dict(criteria.equals),
                                                        within=within,
                                                        without=criteria.without))
                    if i.account_id in (None, account_id)]
            if name:
                rows = [i for i in rows if _match(name, i.name)]
            number, size = check_page(page_number, page_size)
            return Page(rows[(number - 1) * size:number * size], len(rows), number, size, "")
        return paginate(uow.images, criteria, page_number=page_number, page_size=page_size)


def _used_by_instances(uow: UnitOfWork, account_id: str,
                       image_ids: Sequence[str] | None) -> set[str]:
    """The images (among `image_ids`, None: any) the account's instances were made from."""
    criteria = Criteria(equals={"account_id": account_id})
    if image_ids is not None:
        criteria.within["image_id"] = list(image_ids)
    return {i.image_id for i in uow.instances.find(criteria)}


def image_usage(ctx: ServiceContext, account_id: str,
                image_ids: Sequence[str]) -> dict[str, str]:
    """DescribeImages' `Usage` of each image: instance when the account has instances made
    from it, else none."""
    if not image_ids:
        return {}
    with ctx.uow(readonly=True) as uow:
        used = _used_by_instances(uow, account_id, image_ids)
    return {i: "instance" if i in used else "none" for i in image_ids}


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


# ------------------------------------------------------------------ custom images


@dataclass(frozen=True)
class CreateImagePlan(Plan):
    image_id: str
    source_disk_id: str  # the system disk the snapshot is of (locked: the snapshot stays)
    snapshot_id: str
    # CreateImage from an instance: its system disk is snapshotted first (as ECS does)
    instance_id: str = ""
    live: bool = False  # that instance was Running: the hypervisor takes the snapshot
    source_image_id: str = ""  # whose kernel and initrd the image keeps (direct boot)


class CreateImage(Operation[CreateImagePlan]):
    """A custom image from a system disk's snapshot (and, from an instance, that snapshot
    taken first): the snapshot exported into the image's template, the source image's
    kernel and initrd linked beside it; Creating until then, Available after."""

    action = "CreateImage"
    plan_type = CreateImagePlan

    @classmethod
    def locks(cls, plan: CreateImagePlan) -> list[Lock]:
        return [("disk", plan.source_disk_id)] + \
            ([("instance", plan.instance_id)] if plan.instance_id else [])

    @classmethod
    def runs_on(cls, plan: CreateImagePlan, uow: UnitOfWork) -> str | None:
        return super().runs_on(plan, uow) if plan.live else None

    def steps(self) -> list[Step]:
        snapshot = [Step(f"snapshot:{self.plan.snapshot_id}", self.snapshot)] \
            if self.plan.instance_id else []
        return [*snapshot, Step(f"export:{self.plan.image_id}", self.export)]

    def snapshot(self) -> None:
        disk, snap = self.plan.source_disk_id, self.plan.snapshot_id
        if self.plan.live:
            result = self.ctx.compute.snapshot_disks(self.plan.instance_id, [(disk, snap)],
                                                     quiesce=True)
            self.note(consistency=result.consistency)
            return
        if vm_running(self.ctx, self.plan.instance_id):
            raise EcsError("IncorrectInstanceStatus",
                           "The instance was started while its system disk was being "
                           "snapshotted.", 400)
        volume = current_volumes(self.ctx, [disk])[disk]
        self.ctx.storage_of(self.task.region_id).create_snapshots([(volume, snap)])

    def export(self) -> None:
        """The template (a staging file renamed: once there, it is whole), then the boot
        files; idempotent."""
        with self.ctx.uow(readonly=True) as uow:
            image = uow.images.load(self.plan.image_id)
            source = uow.images.get(self.plan.source_image_id) \
                if self.plan.source_image_id else None
        home = _private_dir(Path(image.template_path).parent)
        for key in ("kernel_path", "initrd_path"):
            target, origin = getattr(image, key), getattr(source, key, "") if source else ""
            if target and not Path(target).exists():
                _link_or_copy(origin, Path(target))
        template = Path(image.template_path)
        if template.exists():
            return
        staging = home / ".template.qcow2.partial"
        storage = self.ctx.storage_of(self.task.region_id)
        size = storage.export_snapshot(self.plan.source_disk_id, self.plan.snapshot_id,
                                       str(staging))
        staging.chmod(0o400)
        os.replace(staging, template)
        self.note(virtual_size=size)

    def finish(self, uow: UnitOfWork) -> None:
        uow.images.load(self.plan.image_id).status = AVAILABLE
        if self.plan.instance_id:
            snapshot_records.complete(uow, [(self.plan.source_disk_id,
                                             self.plan.snapshot_id)], None)

    def compensate(self, error: BaseException) -> None:
        with self.ctx.uow(readonly=True) as uow:
            image = uow.images.get(self.plan.image_id)
        if image is not None:
            shutil.rmtree(Path(image.template_path).parent, ignore_errors=True)
        if self.plan.instance_id:
            delete_internal_snapshot(self.ctx, self.task.region_id, self.plan.source_disk_id,
                                     self.plan.snapshot_id)

    def failed(self, uow: UnitOfWork) -> None:
        """ECS's CreateFailed (DeleteImage removes it); the snapshot it took is dropped."""
        image = uow.images.get(self.plan.image_id)
        if image is not None:
            image.status = CREATE_FAILED
        if self.plan.instance_id:
            snapshot_records.drop(uow, [(self.plan.source_disk_id, self.plan.snapshot_id)],
                                  None, group_too=False)
            if image is not None:
                image.source_snapshot_id = ""

    def before_resume(self) -> None:
        if self.plan.live:  # a crash inside the snapshot may have left the guest frozen
            self.ctx.compute.resume_guest(self.plan.instance_id)

    def resume(self) -> Resume:
        """A snapshot of a running guest cut short is not of one instant: undo; once the
        snapshot is there, the export is run again."""
        if self.plan.instance_id and not self.done(f"snapshot:{self.plan.snapshot_id}"):
            return Resume.UNDO
        return Resume.FORWARD


def _link_or_copy(origin: str, target: Path) -> None:
    if not origin or not Path(origin).is_file():
        raise StorageError(f"{target.name}: the source image's boot file {origin or '(none)'} "
                           "is gone")
    staging = target.with_name(f".{target.name}.partial")
    staging.unlink(missing_ok=True)
    try:
        os.link(origin, staging)  # the same file system as a rule: no copy
    except OSError:
        shutil.copyfile(origin, staging)
        staging.chmod(0o400)
    os.replace(staging, target)


def create_image(ctx: ServiceContext, account_id: str, region_id: str, *,
                 snapshot_id: str | None = None, instance_id: str | None = None,
                 name: str = "", description: str = "",
                 client_token: str | None = None) -> str:
    """CreateImage: a custom image (`m-…`) of a system disk, Creating until its template
    is made, then Available. From `snapshot_id` (a system disk's snapshot, accomplished),
    or from `instance_id` (Running or Stopped; ECS's precedence: the instance wins), whose
    system disk is snapshotted first, as ECS does: that snapshot is the image's source
    (DescribeSnapshots shows it). The image boots as the system disk's own image did
    (kernel, initrd, arguments), and needs nothing of the snapshot once Available."""
    rules.check_name(name, code="InvalidImageName.Malformed", field="ImageName")
    if name.lower().startswith(("aliyun", "acs:")):
        raise EcsError("InvalidImageName.Malformed",
                       "An ImageName must not start with aliyun or acs:.", 400)
    rules.check_description(description)
    if not snapshot_id and not instance_id:
        raise EcsError("MissingParameter",
                       "CreateImage needs a source: SnapshotId or InstanceId.", 400)

    def run() -> dict[str, str]:
        with ctx.uow() as uow:
            ctx.check_region(uow, region_id)
            if name and [i for i in uow.images.find(region_id=region_id, name=name)
                         if i.account_id == account_id and i.status in LISTED]:
                raise duplicated_name(name)
            image_id = ids.new_id("image")
            if instance_id:
                plan, snap_size, source_image = _from_instance(ctx, uow, account_id,
                                                               region_id, instance_id,
                                                               image_id)
            else:
                snap = _system_snapshot(uow, account_id, region_id, snapshot_id or "")
                disk = uow.disks.get(snap.source_disk_id)
                source_image = uow.images.get(disk.image_id) if disk and disk.image_id \
                    else None
                plan = CreateImagePlan(image_id, snap.source_disk_id, snap.id,
                                       source_image_id=source_image.id if source_image
                                       else "")
                snap_size = snap.source_disk_size
            uow.images.add(_image_row(ctx, plan, region_id, account_id, name or image_id,
                                      description, snap_size, source_image))
            task = ctx.runner.journal(uow, CreateImage, plan, account_id=account_id,
                                      region_id=region_id, resource_id=image_id)
            idempotency.respond(uow, {"ImageId": image_id})
            uow.commit()
        ctx.runner.submit(task, wait_up_to=SHORT_TASK_S)
        return {"ImageId": image_id}

    params = {"region": region_id, "snapshot": snapshot_id, "instance": instance_id,
              "name": name, "description": description}
    return str(idempotency.once(ctx, account_id, "CreateImage", client_token, params,
                                run)["ImageId"])


def _system_snapshot(uow: UnitOfWork, account_id: str, region_id: str,
                     snapshot_id: str) -> Snapshot:
    snap = get_snapshot(uow, account_id, snapshot_id, region_id)
    if snap.status != SnapshotStatus.ACCOMPLISHED:
        raise EcsError("InvalidSnapshotId.NotReady",
                       f"The snapshot {snap.id} is {snap.status.value}, not accomplished.", 403)
    if snap.source_disk_type != DiskType.SYSTEM:
        raise EcsError("OperationDenied",
                       f"The snapshot {snap.id} is of a data disk; an image is made from a "
                       "system disk's snapshot.", 403)
    return snap


def _from_instance(ctx: ServiceContext, uow: UnitOfWork, account_id: str, region_id: str,
                   instance_id: str, image_id: str,
                   ) -> tuple[CreateImagePlan, int, Image | None]:
    """The plan of an image from an instance, and the row (Progressing) of the snapshot of
    its system disk that the task takes."""
    inst = get_instance(uow, account_id, instance_id, region_id)
    rules.require_instance_status(inst, InstanceStatus.RUNNING, InstanceStatus.STOPPED,
                                  http_status=400)
    rules.check_not_locked(inst)
    system = [d for d in uow.disks.find(instance_id=inst.id)
              if not d.released and d.type == DiskType.SYSTEM]
    if not system:
        raise EcsError("IncorrectInstanceStatus",
                       f"The instance {inst.id} has no system disk.", 400)
    disk = system[0]
    rules.check_not_locked(disk)
    check_snapshot_quota(uow, [disk])
    require_free_space(ctx, uow, region_id, [disk.id])
    items = new_items([disk])
    snapshot_records.add_rows(uow, account_id, inst.id, [disk], items, snapshot=SnapshotSpec(
        description=f"Created for image {image_id}."))
    source_image = uow.images.get(inst.image_id) if inst.image_id else None
    plan = CreateImagePlan(image_id, disk.id, items[0][1], instance_id=inst.id,
                           live=inst.status == InstanceStatus.RUNNING,
                           source_image_id=source_image.id if source_image else "")
    return plan, disk.size_gib, source_image


def _image_row(ctx: ServiceContext, plan: CreateImagePlan, region_id: str, account_id: str,
               name: str, description: str, size_gib: int, source: Image | None) -> Image:
    home = ctx.settings.images_dir / plan.image_id
    boot = source.boot_mode if source else "bios"
    kernel = str(home / Path(source.kernel_path).name) \
        if source and source.kernel_path else ""
    initrd = str(home / Path(source.initrd_path).name) \
        if source and source.initrd_path else ""
    return Image(id=plan.image_id, region_id=region_id, name=name,
                 os_name=source.os_name if source else "Linux",
                 template_path=str(home / "template.qcow2"), size_gib=max(1, size_gib),
                 account_id=account_id, os_type=source.os_type if source else "linux",
                 architecture=source.architecture if source else "x86_64", boot_mode=boot,
                 kernel_path=kernel, initrd_path=initrd,
                 kernel_args=source.kernel_args if source else "", status=CREATING,
                 description=description, source_snapshot_id=plan.snapshot_id)


@dataclass(frozen=True)
class DeleteImagePlan(Plan):
    image_ids: tuple[str, ...]  # images no instance or disk uses any more: rows and files


class DeleteImage(Operation[DeleteImagePlan]):
    """The files of images being deleted (status Deleting, hidden), then their rows."""

    action = "DeleteImage"
    plan_type = DeleteImagePlan

    @classmethod
    def locks(cls, plan: DeleteImagePlan) -> list[Lock]:
        return []

    def steps(self) -> list[Step]:
        return [Step(f"remove:{i}", functools.partial(self.remove, i))
                for i in self.plan.image_ids]

    def remove(self, image_id: str) -> None:
        shutil.rmtree(self.ctx.settings.images_dir / image_id, ignore_errors=True)

    def finish(self, uow: UnitOfWork) -> None:
        for image_id in self.plan.image_ids:
            image = uow.images.get(image_id)
            if image is not None:
                uow.images.delete(image)


def _in_use(uow: UnitOfWork, image_id: str) -> bool:
    """Instances boot from it (its kernel), or disks are overlays on its template."""
    return uow.instances.count(image_id=image_id) > 0 or \
        uow.disks.count(image_id=image_id) > 0


def delete_image(ctx: ServiceContext, account_id: str, region_id: str, image_id: str, *,
                 force: bool = False) -> str | None:
    """DeleteImage: a custom image of the account (another account's, a system image or an
    unknown ID: InvalidImageId.NotFound). Refused while instances were made from it
    (ImageUsingByInstance) unless `force`: then it is gone for users (Deleted, hidden), but
    its row and files stay for the instances and disks that boot from it, and go with a
    later DeleteImage once nothing uses them. Returns the task ID, None when nothing is left
    to remove."""
    with ctx.uow() as uow:
        ctx.check_region(uow, region_id)
        image = uow.images.get(image_id)
        if image is None or image.account_id != account_id or \
                image.region_id != region_id or image.status not in LISTED:
            raise errors.not_found("image", image_id)
        if image.status == CREATING:
            raise EcsError("ImageIsCreating", f"The image {image.id} is being created.", 403)
        used = _in_use(uow, image.id)
        if used and not force:
            raise EcsError("ImageUsingByInstance",
                           f"The image {image.id} has been used to create instances; delete "
                           "them first, or delete the image with Force.", 403)
        image.status = DELETED if used else DELETING
        # every image of the account that waited for its last user goes now too
        gone = [i for i in uow.images.find(region_id=region_id, account_id=account_id,
                                           status=DELETED) if not _in_use(uow, i.id)]
        for each in gone:
            each.status = DELETING
        doomed = ([] if used else [image.id]) + [i.id for i in gone]
        task = ctx.runner.journal(uow, DeleteImage, DeleteImagePlan(tuple(doomed)),
                                  account_id=account_id, region_id=region_id,
                                  resource_id=image.id) if doomed else None
        uow.commit()
    if task is None:
        return None
    ctx.runner.submit(task, wait_up_to=SHORT_TASK_S)
    return task.id

