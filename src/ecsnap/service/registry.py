"""Every journaled operation of ecsnap, written out in one place.

bootstrap hands this list to the task runner; nothing registers itself by being
imported. A new operation is added here (docs/architecture.md: "How to add an action").
"""

from __future__ import annotations

from typing import Any

from ecsnap.service.disks import (
    AttachDisk,
    CreateDisk,
    DeleteDisk,
    DetachDisk,
    ReInitDisk,
    ReplaceSystemDisk,
    ResizeDisk,
)
from ecsnap.service.images import CreateImage, DeleteImage
from ecsnap.service.instances import (
    DeleteInstance,
    RebootInstance,
    RunInstance,
    StartInstance,
    StopInstance,
)
from ecsnap.service.operation import Operation
from ecsnap.service.restore_files import RestoreSnapshotFiles
from ecsnap.service.rollback import ResetDisks
from ecsnap.service.snapshots import DeleteSnapshots, TakeSnapshots
from ecsnap.service.volumes import CollectVolumes

OPERATIONS: tuple[type[Operation[Any]], ...] = (
    RunInstance,
    StartInstance,
    StopInstance,
    RebootInstance,
    DeleteInstance,
    CreateDisk,
    AttachDisk,
    DetachDisk,
    DeleteDisk,
    ResizeDisk,
    ReInitDisk,
    ReplaceSystemDisk,
    TakeSnapshots,
    DeleteSnapshots,
    ResetDisks,
    CollectVolumes,
    RestoreSnapshotFiles,
    CreateImage,
    DeleteImage,
)
