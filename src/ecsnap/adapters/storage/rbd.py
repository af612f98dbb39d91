"""The Ceph RBD storage backend: one RBD pool per region, one RBD image per disk.

A region names its pool as `rbd:POOL?conf=/etc/ceph/ceph.conf&client=admin[&keyring=PATH]`
(`parse_pool_spec`; bootstrap picks this backend for such a pool). Everything goes through
librbd's Python bindings (Debian's python3-rbd) on one cluster connection per backend,
opened at the first call and shared by every thread (librados and librbd are thread-safe;
each call opens the images it needs and closes them again). `close` shuts it once no call
is running (librados aborts the whole process when its connection is shut under one).

Images are format 2 with layering, exclusive-lock, object-map, fast-diff and deep-flatten
(the last one lets a later increment flatten clones that have snapshots; it can only be
set at creation). Disk IDs are the image names; snapshot IDs are the RBD snapshot names.

- A disk from an image template is an O(1) clone (clone v2: no protected snapshot, which
  needs `ceph osd set-require-min-compat-client mimic`) of the snapshot `ecsnap-template`
  of an image holding the template: `import_template` writes that image once per template
  file (named by a digest of the file's path, size and mtime), idempotent and safe against
  concurrent imports: the data goes into a uniquely named image, is snapshotted, and only
  then renamed to the template's name; the loser of a race removes its copy.
- Snapshots of several disks are taken side by side (one thread per disk), all or
  nothing: on a failure the snapshots this call made are removed again.
- Revert by clone and swap (`CloneRevert`): a disk's content lives in a *volume*, at
  first the image named by the disk ID; a rollback clones the snapshot (clone v2, O(1):
  no data is copied) into a new image `{disk}.{task}` and the service switches the disk to
  it. The old volume is never written again and stays while it holds snapshots (the
  safety snapshot of that rollback, among others) or has clones. A snapshot that has
  clones and is deleted goes to RBD's trash namespace (clone v2 does that by itself): it
  is gone for the user at once, and Ceph removes it when its last clone is removed or
  flattened. Volumes whose clone depth exceeds a bound are flattened, volumes nothing
  needs are removed (`flatten`, `remove_volumes`; the service's CollectVolumes task).
  Snapshots are found on whichever volume of the disk holds them. `revert`
  (`rollback_to_snap`, O(data written since the snapshot)) is still there for a snapshot
  on the volume itself.
- Bytes written since a snapshot: librbd's `diff_iterate` (guest writes, zeroes and
  discards alike), first whole objects through the fast-diff object map, then exact
  extents within the objects that changed, so the cost follows the data written. An
  object made since the snapshot counts from its start to its end (RADOS tracks objects,
  not writes): the answer may exceed what was written by up to one object (4 MiB) per
  object written. A rollback rewrites the objects it restores, which `diff_iterate`
  cannot tell from guest writes; so each revert to S leaves a hidden marker snapshot
  `ecsnap-reverted.S` (the previous marker goes), and the bytes written since S are
  counted from the marker: exact after a revert, as on qcow2. Since any other snapshot
  the objects the rollback rewrote count too (an upper bound). Across volumes (a snapshot
  on an ancestor volume) the changed extents are those each volume on the way wrote
  itself (`include_parent=False`), with the difference between the two points on the
  common volume; a volume flattened since has no ancestry left to follow (None).
- `path()` is QEMU's rbd filename (`RbdLocation`); the QEMU driver opens it as an `rbd`
  blockdev node. Snapshots of an image a VM has open are allowed (crash-consistent: the
  exclusive-lock owner takes them); a revert or delete of an image another client has
  open is refused.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar
from urllib.parse import parse_qs

from ecsnap.adapters.storage.base import (
    RbdLocation,
    SnapshotInfo,
    StorageError,
    disk_of_volume,
)

T = TypeVar("T")
P = ParamSpec("P")
R = TypeVar("R")

log = logging.getLogger(__name__)

TEMPLATE_SNAP = "ecsnap-template"
MARKER = "ecsnap-reverted."  # + the snapshot a revert restored: hidden, see the docstring
TEMPLATE_PREFIX = "ecsnap-template-"
DEFAULT_CONF = "/etc/ceph/ceph.conf"


def _bindings() -> tuple[Any, Any]:
    """(rados, rbd): imported at the first use, so that importing this module needs no
    Ceph (the structural contract checks import it)."""
    try:
        import rados
        import rbd
    except ImportError as exc:
        raise StorageError("the Ceph Python bindings (Debian's python3-rados, python3-rbd) "
                           f"are not importable from this Python: {exc}") from exc
    return rados, rbd


def _connected(method: Callable[Concatenate[RbdBackend, P], R]
               ) -> Callable[Concatenate[RbdBackend, P], R]:
    """A method that uses the cluster connection: `close` waits until no such call runs
    (librados aborts the whole process when its connection is shut under an operation)."""
    @functools.wraps(method)
    def in_use(self: RbdBackend, *args: P.args, **kwargs: P.kwargs) -> R:
        with self._in_use():
            return method(self, *args, **kwargs)
    return in_use


def parse_pool_spec(spec: str) -> dict[str, str]:
    """`rbd:POOL?conf=PATH&client=NAME&keyring=PATH` (all three optional) as RbdBackend's
    keyword arguments; ValueError when it is not one."""
    if not spec.startswith("rbd:"):
        raise ValueError(f"{spec!r}: an RBD pool is rbd:POOL?conf=...&client=...")
    pool, _, query = spec[len("rbd:"):].partition("?")
    if not pool or any(c in pool for c in "/@:&=") or pool.strip() != pool:
        raise ValueError(f"{spec!r}: {pool!r} is not an RBD pool name")
    try:
        options = parse_qs(query, keep_blank_values=False, strict_parsing=bool(query))
    except ValueError as exc:
        raise ValueError(f"{spec!r}: {exc}") from exc
    unknown = set(options) - {"conf", "client", "keyring"}
    if unknown or any(len(v) != 1 for v in options.values()):
        raise ValueError(f"{spec!r}: the options are conf, client and keyring, once each")
    out = {"pool": pool, **{k: v[0] for k, v in options.items()}}
    if out.get("client", "").startswith("client."):
        out["client"] = out["client"][len("client."):]
    return out


class RbdBackend:
    """StorageBackend on one RBD pool."""

    def __init__(self, pool: str, *, conf: str = DEFAULT_CONF, client: str = "admin",
                 keyring: str = "", qemu_img: str = "qemu-img",
                 op_timeout_s: int = 300) -> None:
        self.pool = pool
        self.conf = conf
        self.client = client
        self.keyring = keyring
        self.qemu_img = qemu_img
        self.op_timeout_s = op_timeout_s
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when _busy drops to 0
        self._busy = 0  # calls of @_connected methods running, in any thread
        self._cluster: Any = None
        self._ioctx: Any = None
        self._imports: dict[str, threading.Lock] = {}

    @classmethod
    def from_spec(cls, spec: str) -> RbdBackend:
        """The backend of a region's storage pool `rbd:POOL?...` (see parse_pool_spec)."""
        options = parse_pool_spec(spec)
        return cls(options["pool"], conf=options.get("conf", DEFAULT_CONF),
                   client=options.get("client", "admin"), keyring=options.get("keyring", ""))

    # ------------------------------------------------------------ plumbing

    @property
    def features(self) -> int:
        _, rbd = _bindings()
        return int(rbd.RBD_FEATURE_LAYERING | rbd.RBD_FEATURE_EXCLUSIVE_LOCK |
                   rbd.RBD_FEATURE_OBJECT_MAP | rbd.RBD_FEATURE_FAST_DIFF |
                   rbd.RBD_FEATURE_DEEP_FLATTEN)

    @contextlib.contextmanager
    def _in_use(self) -> Iterator[None]:
        """The connection counted in use until the block ends (`close` waits)."""
        with self._idle:
            self._busy += 1
        try:
            yield
        finally:
            with self._idle:
                self._busy -= 1
                if not self._busy:
                    self._idle.notify_all()

    @contextlib.contextmanager
    def ioctx(self) -> Iterator[Any]:
        """The pool's I/O context for librbd calls of the caller's own (benchmarks, tests),
        in use until the block ends."""
        with self._in_use():
            yield self._io()

    def _io(self) -> Any:
        """The pool's I/O context on the backend's cluster connection (made once), for a
        method marked @_connected (so that `close` cannot shut it under the call)."""
        with self._lock:
            if not self._busy:
                raise AssertionError("RbdBackend._io outside a @_connected method")
            if self._ioctx is not None:
                return self._ioctx
            rados, _ = _bindings()
            options = {"rados_osd_op_timeout": str(self.op_timeout_s),
                       "rados_mon_op_timeout": str(self.op_timeout_s),
                       "client_mount_timeout": "30",
                       # lock_break blocklists the lock's owner (break_locks; the default)
                       "rbd_blocklist_on_break_lock": "true"}
            if self.keyring:
                options["keyring"] = self.keyring
            try:
                cluster = rados.Rados(conffile=self.conf or "", rados_id=self.client or None,
                                      conf=options)
                cluster.connect(timeout=30)
            except (rados.Error, OSError) as exc:
                raise StorageError(f"cannot connect to Ceph ({self.conf}, client "
                                   f"{self.client}): {exc}") from exc
            try:
                ioctx = cluster.open_ioctx(self.pool)
            except rados.Error as exc:
                cluster.shutdown()
                raise StorageError(f"RBD pool {self.pool}: {exc}") from exc
            self._cluster, self._ioctx = cluster, ioctx
            return ioctx

    @_connected
    def blocklist(self, addrs: Sequence[str]) -> None:
        """Ceph's `osd blocklist add` for each address, through the monitors (ClientFencing:
        a fenced host's QEMUs, whatever their nonce when given by IP, write no more)."""
        self._io()
        for addr in addrs:
            command = json.dumps({"prefix": "osd blocklist", "blocklistop": "add",
                                  "addr": addr})
            with self._errors(f"osd blocklist add {addr}"):
                ret, _, status = self._cluster.mon_command(command, b"", timeout=30)
            if ret != 0:
                raise StorageError(f"osd blocklist add {addr}: {status} ({ret})")

    @_connected
    def client_addrs(self) -> list[str]:
        """This backend's own RADOS client address (`Rados.get_addrs()`, `IP:0/nonce`), the
        one a peer fencing this host blocklists for its storage steps (ClientFencing)."""
        self._io()
        with self._errors("get_addrs"):
            found = str(self._cluster.get_addrs())
        return [a for a in found.strip("[]").replace("v1:", "").replace("v2:", "")
                .split(",") if a]

    @_connected
    def break_locks(self, volumes: Sequence[str]) -> list[str]:
        """Shut out the clients that have these images open, as the field does for a fenced
        hypervisor (ClientFencing): the exclusive-lock owner's lock is broken with librbd's
        `lock_break`, which blocklists the owner (`rbd_blocklist_on_break_lock`, set on this
        connection); every other watcher (a QEMU that has the image open but holds no lock
        at this moment, and would ask for it at its next write) is blocklisted too, but for
        this backend's own handle. Missing images are skipped. The addresses shut out."""
        own = set(self.client_addrs())
        shut: list[str] = []
        for volume in volumes:
            with self._image(volume, missing_ok=True) as image:
                if image is None:
                    continue
                with self._errors(f"break the lock of {self.pool}/{volume}"):
                    for owner in list(image.lock_get_owners()):
                        lockers = image.list_lockers()  # [] when none, else with addresses
                        addrs = [str(a) for _c, _k, a in lockers["lockers"]] \
                            if isinstance(lockers, dict) else []
                        image.lock_break(owner["mode"], owner["owner"])
                        shut += [a for a in addrs or [str(owner["owner"])] if a not in shut]
                    others = [str(w["addr"]) for w in image.watchers_list()
                              if str(w["addr"]) not in own and str(w["addr"]) not in shut]
                self.blocklist(others)
                shut += others
        return shut

    def close(self) -> None:
        """Close the cluster connection once no call uses it (the next call opens a new
        one). A call still running after op_timeout_s (a hung cluster) keeps the connection
        open, logged: shutting it under the call would abort the process."""
        with self._idle:
            if not self._idle.wait_for(lambda: not self._busy, timeout=self.op_timeout_s):
                log.warning("RBD pool %s: %d call(s) still running after %d s; its Ceph "
                            "connection is left open", self.pool, self._busy,
                            self.op_timeout_s)
                return
            if self._ioctx is not None:
                with contextlib.suppress(Exception):
                    self._ioctx.close()
            if self._cluster is not None:
                with contextlib.suppress(Exception):
                    self._cluster.shutdown()
            self._ioctx = self._cluster = None

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Ceph's errors as StorageError, prefixed with what was done."""
        rados, rbd = _bindings()
        try:
            yield
        except (rbd.Error, rados.Error) as exc:
            raise StorageError(f"{what}: {type(exc).__name__}: {exc}") from exc

    @contextlib.contextmanager
    def _image(self, name: str, *, missing_ok: bool = False) -> Iterator[Any]:
        """The image open (None if it is missing and missing_ok); StorageError otherwise.

        Always read-write, even to read: librbd 16 (Debian 12's Ceph 16.2.15) aborts the
        process now and then when it opens or closes a clone read-only (a use-after-free:
        `std::system_error: Invalid argument` from a freed mutex; within 150-2,000 such
        opens with MALLOC_PERTURB_ set, and none in 4,340 read-write opens of the same
        clones). A read-write open takes no lock until it writes: a VM's lock stays its."""
        _, rbd = _bindings()
        _check_image_name(name)
        ioctx = self._io()
        try:
            with self._errors(f"open {self.pool}/{name}"):
                image = rbd.Image(ioctx, name)
        except StorageError as exc:
            if isinstance(exc.__cause__, rbd.ImageNotFound):
                if missing_ok:
                    yield None
                    return
                raise StorageError(f"{self.pool}/{name}: no such disk image") from exc
            raise
        try:
            yield image
        finally:
            with contextlib.suppress(Exception):
                image.close()

    def _user_snaps(self, image: Any) -> list[dict[str, Any]]:
        """The image's snapshots (users' and the hidden revert markers), oldest first."""
        _, rbd = _bindings()
        return [s for s in image.list_snaps()
                if s.get("namespace", rbd.RBD_SNAP_NAMESPACE_TYPE_USER)
                == rbd.RBD_SNAP_NAMESPACE_TYPE_USER]

    def _snaps(self, image: Any) -> list[dict[str, Any]]:
        """The snapshots the contract knows (the revert markers hidden)."""
        return [s for s in self._user_snaps(image) if not s["name"].startswith(MARKER)]

    def _refuse_if_open_elsewhere(self, image: Any, name: str, what: str) -> None:
        """A watcher of another client (a VM) is using the disk; this backend's own client
        (this handle, and other threads' opens) is not."""
        own = set(self.client_addrs())
        others = [str(w.get("addr")) for w in image.watchers_list()
                  if str(w.get("addr")) not in own]
        if others:
            raise StorageError(f"{what} {self.pool}/{name}: the image is open elsewhere "
                               f"({', '.join(others)})")

    # ------------------------------------------------------------ lifecycle

    def path(self, disk_id: str) -> str:
        return str(RbdLocation(self.pool, disk_id, self.client, self.conf, self.keyring))

    @_connected
    def exists(self, disk_id: str) -> bool:
        with self._image(disk_id, missing_ok=True) as image:
            return image is not None

    @_connected
    def create_blank(self, disk_id: str, size_bytes: int) -> None:
        """A new, empty image; one that exists already is replaced (as `qemu-img create`
        replaces a file), so a retry after a crash converges."""
        self._create(disk_id, lambda ioctx, rbd: rbd.RBD().create(
            ioctx, disk_id, size_bytes, old_format=False, features=self.features))

    @_connected
    def create_from_image(self, disk_id: str, image_path: str, size_bytes: int) -> None:
        """A clone of the template's snapshot, grown to `size_bytes` if that is larger."""
        template, template_size = self.import_template(image_path)
        self._create(disk_id, lambda ioctx, rbd: rbd.RBD().clone(
            ioctx, template, TEMPLATE_SNAP, ioctx, disk_id, features=self.features))
        if size_bytes > template_size:
            with self._image(disk_id) as image, self._errors(f"resize {disk_id}"):
                image.resize(size_bytes)

    def _create(self, disk_id: str, make: Callable[[Any, Any], None]) -> None:
        _, rbd = _bindings()
        _check_image_name(disk_id)
        ioctx = self._io()
        with self._errors(f"create {self.pool}/{disk_id}"):
            try:
                make(ioctx, rbd)
                return
            except rbd.ImageExists:
                pass
        self.delete(disk_id)
        with self._errors(f"create {self.pool}/{disk_id}"):
            make(ioctx, rbd)

    # ------------------------------------------------------------ volumes (CloneRevert)

    @_connected
    def volumes(self, disk_id: str) -> list[str]:
        """The images of the disk: its ID, and `{disk_id}.{task}` for each clone."""
        _, rbd = _bindings()
        disk = disk_of_volume(disk_id)
        with self._errors(f"list {self.pool}"):
            names = list(rbd.RBD().list(self._io()))
        return sorted((n for n in names if n == disk or n.startswith(disk + ".")),
                      key=lambda n: (n != disk, n))

    @_connected
    def snapshot_volume(self, disk_id: str, snapshot_id: str) -> str | None:
        with self._errors(f"snapshots of {disk_id}"):
            return self._holder(disk_id, snapshot_id)

    def _holder(self, name: str, snapshot_id: str) -> str | None:
        """The volume of the disk that holds the user snapshot (`name` looked at first)."""
        found = self._find_snap(name, snapshot_id)
        return found[0] if found else None

    def _find_snap(self, name: str, snapshot_id: str) -> tuple[str, int] | None:
        """(the volume holding the user snapshot, the snapshot's size); `name` is looked
        at first, then the disk's other volumes."""
        def look(volume: str) -> tuple[str, int] | None:
            with self._image(volume, missing_ok=True) as image:
                snap = None if image is None else next(
                    (s for s in self._snaps(image) if s["name"] == snapshot_id), None)
                return None if snap is None else (volume, int(snap["size"]))

        found = look(name)
        for volume in [] if found else [v for v in self.volumes(name) if v != name]:
            found = look(volume)
            if found:
                break
        return found

    @_connected
    def clone_to_volume(self, disk_id: str, snapshot_id: str, volume: str,
                        size_bytes: int) -> None:
        _, rbd = _bindings()
        _check_image_name(volume)
        if disk_of_volume(volume) != disk_of_volume(disk_id) or volume == disk_of_volume(volume):
            raise StorageError(f"{volume} cannot be a new volume of {disk_id}")
        found = self._find_snap(disk_id, snapshot_id)
        if found is None:
            raise StorageError(f"{disk_id}: no snapshot {snapshot_id} on any of its volumes")
        source, snap_size = found

        def clone() -> bool:
            with self._errors(f"clone {source}@{snapshot_id} to {volume}"):
                try:
                    rbd.RBD().clone(self._io(), source, snapshot_id, self._io(), volume,
                                    features=self.features)
                    return True
                except rbd.ImageExists:
                    return False

        if not clone():  # left by a crash: made again, unless something uses it
            with self._image(volume) as image, self._errors(f"inspect {volume}"):
                used = bool(list(image.list_snaps())) or bool(list(image.list_children2()))
            if used:
                raise StorageError(f"{self.pool}/{volume} exists and holds snapshots or "
                                   "clones: it is not a clone left by a crash")
            self._remove_image(volume)
            if not clone():
                raise StorageError(f"{self.pool}/{volume} was made again meanwhile")
        if snap_size < size_bytes:
            with self._image(volume) as image, self._errors(f"resize {volume}"):
                image.resize(size_bytes)

    @_connected
    def clone_many(self, items: Sequence[tuple[str, str, str, int]]) -> None:
        for _, exc in _side_by_side(lambda item: self.clone_to_volume(*item), items):
            if exc is not None:
                raise exc

    @_connected
    def remove_volumes(self, volumes: Sequence[str]) -> list[str]:
        _, rbd = _bindings()
        removed = []
        for volume in volumes:
            with self._image(volume, missing_ok=True) as image:
                if image is None:
                    continue
                with self._errors(f"inspect {volume}"):
                    if list(image.list_snaps()) or list(image.list_children2()) or \
                            len(list(image.watchers_list())) > 1:
                        continue
            with self._errors(f"remove {self.pool}/{volume}"):
                try:
                    rbd.RBD().remove(self._io(), volume)
                except (rbd.ImageNotFound, rbd.ImageHasSnapshots, rbd.ImageBusy):
                    continue  # gone meanwhile, or in use after all: kept
            removed.append(volume)
        return removed

    def _parent(self, image: Any) -> tuple[str, str] | None:
        """(image, snapshot) the open image is a clone of, in this pool; None if none."""
        _, rbd = _bindings()
        try:
            spec = image.get_parent_image_spec()
        except rbd.ImageNotFound:
            return None
        if spec["pool_name"] != self.pool or spec.get("pool_namespace"):
            return None  # another pool: not one of ours to follow
        return str(spec["image_name"]), str(spec["snap_name"])

    @_connected
    def clone_depth(self, volume: str) -> int:
        depth, name = 0, volume
        while depth < 1000:
            with self._image(name) as image, \
                    self._errors(f"parent of {name}"):
                parent = self._parent(image)
            if parent is None:
                return depth
            depth, name = depth + 1, parent[0]
        raise StorageError(f"{volume}: a clone chain without end")

    @_connected
    def flatten(self, volume: str) -> None:
        """librbd's flatten, after `_copy_up_claimed` (which makes it safe to run again
        after a flatten was cut short)."""
        _, rbd = _bindings()
        with self._image(volume) as image, self._errors(f"flatten {volume}"):
            if self._parent(image) is None:
                return
            self._copy_up_claimed(image)
            try:
                image.flatten()
            except rbd.InvalidArgument:  # flattened meanwhile
                if self._parent(image) is not None:
                    raise

    def _copy_up_claimed(self, image: Any) -> None:
        """Copy up from the parent every object the object map says the clone has but
        RADOS does not. A flatten (librbd 16) marks an object in the map before it copies
        it up, and skips the objects the map marks: after a flatten cut short (a kill -9)
        flattening again would leave those objects as zeroes once the parent is detached.
        The copy-up is RBD's own atomic class method: it writes only if the object is still
        missing (a guest write meanwhile copied it up itself), and with no snapshot context,
        so the clone's snapshots see the parent's data too, as a deep flatten makes them."""
        rados, _ = _bindings()
        overlap = int(image.overlap())
        object_size = 1 << int(image.stat()["order"])
        claimed: list[int] = []
        image.diff_iterate(0, overlap, None,
                           lambda offset, _, exists: claimed.append(offset) if exists else 0,
                           include_parent=False, whole_object=True)
        prefix, ioctx = image.block_name_prefix(), self._io()
        for offset in sorted({o - o % object_size for o in claimed}):
            name = f"{prefix}.{offset // object_size:016x}"
            try:
                ioctx.stat(name)
                continue
            except rados.ObjectNotFound:
                pass
            data = image.read(offset, min(object_size, overlap - offset))  # the parent's
            ioctx.execute(name, "rbd", "copyup", data)

    @_connected
    def import_template(self, image_path: str) -> tuple[str, int]:
        """The pool image holding the template file `image_path` (a standalone qcow2, or
        raw), written once: (its name, its size). Its snapshot TEMPLATE_SNAP is what disks
        clone. A template must never change (the image store's are read-only): a file
        changed in place (size, mtime) is imported again under a new name."""
        _, rbd = _bindings()
        source = Path(image_path).resolve()
        try:
            stat = source.stat()
        except OSError as exc:
            raise StorageError(f"template {source}: {exc}") from exc
        digest = hashlib.sha256(f"{source}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
        name = TEMPLATE_PREFIX + digest.hexdigest()[:20]
        found = self._template_size(name)
        if found is not None:
            return name, found
        with self._lock:
            lock = self._imports.setdefault(name, threading.Lock())
        with lock:
            found = self._template_size(name)
            if found is not None:
                return name, found
            # the format is never guessed: the qcow2 magic makes it qcow2, else raw
            try:
                with open(source, "rb") as fh:
                    fmt = "qcow2" if fh.read(4) == b"QFI\xfb" else "raw"
            except OSError as exc:
                raise StorageError(f"template {source}: {exc}") from exc
            info = self._run_json("info", "-U", "-f", fmt, "--output=json", str(source))
            data_file = info.get("format-specific", {}).get("data", {}).get("data-file")
            if info.get("backing-filename") or data_file:
                raise StorageError(f"{source}: a template must stand alone (it names "
                                   f"{info.get('backing-filename') or data_file})")
            size = int(info["virtual-size"])
            staging = f"{name}.importing-{uuid.uuid4().hex[:8]}"
            ioctx = self._io()
            with self._errors(f"create {self.pool}/{staging}"):
                rbd.RBD().create(ioctx, staging, size, old_format=False,
                                 features=self.features)
            try:
                self._run("convert", "-q", "-n", "--target-is-zero", "-W", "-f", fmt,
                          "-O", "raw", str(source), self.path(staging))
                with self._image(staging) as image, self._errors(f"snapshot {staging}"):
                    image.create_snap(TEMPLATE_SNAP)
                with self._errors(f"rename {staging} to {name}"):
                    try:
                        rbd.RBD().rename(ioctx, staging, name)
                        staging = ""
                    except rbd.ImageExists:  # another process imported it meanwhile
                        pass
            finally:
                if staging:
                    with contextlib.suppress(StorageError):
                        self._remove_image(staging)
        found = self._template_size(name)
        if found is None:
            raise StorageError(f"template {name} vanished right after its import")
        return name, found

    def _template_size(self, name: str) -> int | None:
        with self._image(name, missing_ok=True) as image:
            if image is None or not any(s["name"] == TEMPLATE_SNAP
                                        for s in self._user_snaps(image)):
                return None
            return int(image.size())

    @_connected
    def resize(self, disk_id: str, size_bytes: int) -> None:
        with self._image(disk_id) as image, self._errors(f"resize {disk_id}"):
            if size_bytes < image.size():
                raise StorageError(f"{disk_id}: disks only grow ({size_bytes} bytes asked)")
            if size_bytes > image.size():
                image.resize(size_bytes)

    @_connected
    def delete(self, disk_id: str) -> None:
        """Remove every volume of the disk (`disk_id` or any of its volumes) with its
        snapshots, clones before what they were cloned from; a missing one is no error."""
        depth: dict[str, int] = {}
        for volume in self.volumes(disk_id):
            try:
                depth[volume] = self.clone_depth(volume)
            except StorageError:  # removed meanwhile
                depth[volume] = 0
        for volume in sorted(depth, key=lambda v: -depth[v]):
            self._remove_or_trash(volume)
        self._purge_trash()

    # ------------------------------------------------------------ disks from snapshots

    @_connected
    def create_from_snapshot(self, disk_id: str, source_disk_id: str, snapshot_id: str,
                             size_bytes: int) -> None:
        """A clone (v2, O(1): no data copied) of the snapshot, on whichever volume of the
        source disk holds it, grown to `size_bytes` if that is larger. The snapshot may be
        deleted later: clone v2 moves a snapshot with clones to RBD's trash namespace and
        Ceph removes it with its last clone. The source disk may be deleted too: its image,
        which cannot be removed while a snapshot of it has clones, goes to the RBD trash
        (`_remove_or_trash`) and is purged once nothing is cloned from it any more
        (`_purge_trash`, after every delete)."""
        _check_snapshot_name(snapshot_id)
        with self._errors(f"snapshots of {source_disk_id}"):
            found = self._find_snap(source_disk_id, snapshot_id)
        if found is None:
            raise StorageError(f"{source_disk_id}: no snapshot {snapshot_id} on any of its "
                               "volumes")
        holder, snap_size = found
        self._create(disk_id, lambda ioctx, rbd: rbd.RBD().clone(
            ioctx, holder, snapshot_id, ioctx, disk_id, features=self.features))
        if size_bytes > snap_size:
            with self._image(disk_id) as image, self._errors(f"resize {disk_id}"):
                if size_bytes > image.size():
                    image.resize(size_bytes)

    @_connected
    def export_snapshot(self, source_disk_id: str, snapshot_id: str, target: str) -> int:
        """A custom image's template file: the snapshot (on whichever volume of the disk
        holds it) read by `qemu-img convert` from QEMU's `rbd:POOL/IMAGE@SNAP` into a
        standalone qcow2 at `target` (zeroes left out). Disks from the image are then
        clones of its template imported into the pool, as for every image."""
        _check_snapshot_name(snapshot_id)
        with self._errors(f"snapshots of {source_disk_id}"):
            found = self._find_snap(source_disk_id, snapshot_id)
        if found is None:
            raise StorageError(f"{source_disk_id}: no snapshot {snapshot_id} on any of its "
                               "volumes")
        holder, size = found
        # QEMU's rbd filename with the snapshot: rbd:POOL/IMAGE@SNAP[:options] (snapshot
        # IDs need no escape: _check_snapshot_name)
        plain = str(RbdLocation(self.pool, holder))
        full = str(RbdLocation(self.pool, holder, self.client, self.conf, self.keyring))
        image = f"{plain}@{snapshot_id}{full[len(plain):]}"
        self._run("convert", "-q", "-f", "raw", "-O", "qcow2", image, target)
        return size

    def _remove_or_trash(self, volume: str) -> None:
        """`_remove_image`; an image that still holds deleted snapshots which other disks
        are cloned from (RBD refuses to remove it) goes to the RBD trash instead."""
        _, rbd = _bindings()
        try:
            self._remove_image(volume)
            return
        except StorageError as exc:
            if not isinstance(exc.__cause__, rbd.ImageHasSnapshots):
                raise
        with self._errors(f"move {self.pool}/{volume} to the trash"), \
                contextlib.suppress(rbd.ImageNotFound):
            rbd.RBD().trash_move(self._io(), volume, 0)

    def _purge_trash(self) -> None:
        """Remove the disk images in the RBD trash that nothing is cloned from any more
        (Ceph removed their last trashed snapshot with its last clone); the others stay."""
        _, rbd = _bindings()
        with self._errors(f"trash of {self.pool}"):
            entries = list(rbd.RBD().trash_list(self._io()))
        for entry in entries:
            if str(entry.get("name", "")).startswith(TEMPLATE_PREFIX):
                continue
            try:
                rbd.RBD().trash_remove(self._io(), entry["id"])
            except (rbd.ImageHasSnapshots, rbd.ImageBusy, rbd.ImageNotFound,
                    rbd.PermissionError, rbd.InvalidArgument):
                continue  # still needed (or removed meanwhile)
            except rbd.Error as exc:
                raise StorageError(f"purge {entry.get('name')} from the trash of "
                                   f"{self.pool}: {exc}") from exc

    def _remove_image(self, disk_id: str) -> None:
        """Remove one image and its snapshots; a missing one is not an error."""
        _, rbd = _bindings()
        with self._image(disk_id, missing_ok=True) as image:
            if image is None:
                return
            with self._errors(f"delete {self.pool}/{disk_id}"):
                self._refuse_if_open_elsewhere(image, disk_id, "delete")
                for snap in self._user_snaps(image):
                    if image.is_protected_snap(snap["name"]):
                        image.unprotect_snap(snap["name"])
                    with contextlib.suppress(rbd.ImageNotFound):
                        image.remove_snap(snap["name"])
        with self._errors(f"delete {self.pool}/{disk_id}"), \
                contextlib.suppress(rbd.ImageNotFound):
            rbd.RBD().remove(self._io(), disk_id)

    @_connected
    def virtual_size(self, disk_id: str) -> int:
        with self._image(disk_id) as image, self._errors(f"size {disk_id}"):
            return int(image.size())

    @_connected
    def allocated_bytes(self, disk_id: str) -> int:
        """Bytes the disk's volumes and their snapshots hold in the pool, layer by layer as
        `rbd du` counts them (the data each snapshot, and the head, added; what a clone
        reads from its parent, a template or an older volume, is not counted again); 0 for
        a missing disk."""
        return sum(self._allocated(v) for v in self.volumes(disk_id))

    @_connected
    def _allocated(self, disk_id: str) -> int:
        with self._image(disk_id, missing_ok=True) as image:
            if image is None:
                return 0
            with self._errors(f"usage of {disk_id}"):
                total = 0
                previous: str | None = None
                for snap in [*(s["name"] for s in self._user_snaps(image)), None]:
                    image.set_snap(snap)
                    total += _diff_bytes(image, previous, existing_only=True,
                                         include_parent=False, whole_object=False)
                    previous = snap
                return total

    # ------------------------------------------------------------ snapshots

    @_connected
    def list_snapshots(self, disk_id: str) -> list[SnapshotInfo]:
        """The snapshots on every volume of the disk, oldest first."""
        found: list[SnapshotInfo] = []
        for volume in self.volumes(disk_id):
            with self._image(volume, missing_ok=True) as image:
                if image is None:
                    continue
                with self._errors(f"snapshots of {volume}"):
                    found += [SnapshotInfo(s["name"], 0,
                                           int(image.get_snap_timestamp(s["id"]).timestamp()))
                              for s in self._snaps(image)]
        return sorted(found, key=lambda s: s.date_sec)

    @_connected
    def has_snapshot(self, disk_id: str, snapshot_id: str) -> bool:
        with self._errors(f"snapshots of {disk_id}"):
            return self._holder(disk_id, snapshot_id) is not None

    @_connected
    def create_snapshots(self, items: Sequence[tuple[str, str]]) -> None:
        _, rbd = _bindings()
        for _, snapshot_id in items:
            _check_snapshot_name(snapshot_id)
        made: list[tuple[str, str]] = []

        def take(disk_id: str) -> None:  # one disk's snapshots, in order
            with self._image(disk_id) as image:
                for d, snapshot_id in items:
                    if d != disk_id:
                        continue
                    with self._errors(f"snapshot {snapshot_id} of {disk_id}"):
                        if any(s["name"] == snapshot_id for s in self._snaps(image)):
                            continue
                        try:
                            image.create_snap(snapshot_id)
                        except rbd.ImageExists:  # taken meanwhile: not ours to undo
                            continue
                    made.append((d, snapshot_id))

        failed = [exc for _, exc in _side_by_side(take, list(dict.fromkeys(d for d, _ in items)))
                  if exc is not None]
        if not failed:
            return
        undo_errors = []
        for disk_id, snapshot_id in made:
            try:
                self.delete_snapshot(disk_id, snapshot_id)
            except StorageError as undo_exc:
                undo_errors.append(str(undo_exc))
        left = f"; could not undo: {'; '.join(undo_errors)}" if undo_errors else ""
        raise StorageError(f"snapshot of {len(items)} disk(s) undone: {failed[0]}{left}") \
            from failed[0]

    @_connected
    def delete_snapshot(self, disk_id: str, snapshot_id: str) -> None:
        """Remove the snapshot (and its revert marker, if it has one) from whichever volume
        of the disk holds it. One that has clones (a later volume of the disk) goes to
        RBD's trash namespace: gone for the user, removed by Ceph with its last clone."""
        _, rbd = _bindings()
        holder = self._holder(disk_id, snapshot_id) or disk_id
        with self._image(holder, missing_ok=True) as image:
            if image is None:
                return
            for name in (MARKER + snapshot_id, snapshot_id):
                with self._errors(f"delete snapshot {name} of {holder}"), \
                        contextlib.suppress(rbd.ImageNotFound):
                    image.remove_snap(name)

    @_connected
    def revert(self, disk_id: str, snapshot_id: str) -> None:
        """`rollback_to_snap` restores the size the image had at the snapshot too; the
        image is grown back to its current size, since disks never shrink. Then the
        marker `ecsnap-reverted.<snapshot>` replaces any earlier one. Idempotent: a revert
        cut short at any point rolls back again and makes the marker again."""
        _, rbd = _bindings()
        _check_snapshot_name(snapshot_id)
        marker = MARKER + snapshot_id
        with self._image(disk_id) as image, \
                self._errors(f"revert {disk_id} to {snapshot_id}"):
            names = [s["name"] for s in self._user_snaps(image)]
            if snapshot_id not in names:
                raise StorageError(f"{disk_id}: no snapshot {snapshot_id}")
            self._refuse_if_open_elsewhere(image, disk_id, "revert")
            if marker in names:  # an earlier revert to it, and maybe writes since
                image.remove_snap(marker)
            size = int(image.size())
            image.rollback_to_snap(snapshot_id)
            if image.size() < size:
                image.resize(size)
            image.create_snap(marker, rbd.RBD_SNAP_CREATE_SKIP_QUIESCE)
            for name in names:
                if name.startswith(MARKER) and name != marker:
                    with contextlib.suppress(rbd.ImageNotFound):
                        image.remove_snap(name)

    @_connected
    def revert_many(self, items: Sequence[tuple[str, str]]) -> None:
        """`revert` of several disks side by side (one disk at most once); raises the first
        failure after all ran (each revert is idempotent: the caller may retry or undo)."""
        if len({d for d, _ in items}) != len(items):
            raise StorageError("a disk can be reverted to one snapshot only")
        for _, exc in _side_by_side(lambda item: self.revert(*item), items):
            if exc is not None:
                raise exc

    # ------------------------------------------------------------ change tracking

    @_connected
    def bytes_written_since(self, disk_id: str, snapshot_id: str) -> int | None:
        if snapshot_id.startswith(MARKER):
            return None
        with self._image(disk_id, missing_ok=True) as image:
            if image is None:
                return None
            with self._errors(f"changes of {disk_id} since {snapshot_id}"):
                names = {s["name"] for s in self._user_snaps(image)}
                if snapshot_id in names:
                    since = MARKER + snapshot_id if MARKER + snapshot_id in names \
                        else snapshot_id
                    return _diff_bytes(image, since, existing_only=False,
                                       include_parent=True, whole_object=False)
        with self._errors(f"changes of {disk_id} since {snapshot_id}"):
            return self._written_across(disk_id, snapshot_id)

    def _written_across(self, volume: str, snapshot_id: str) -> int | None:
        """Bytes written on `volume` since a snapshot on another volume of its disk: the
        extents each volume between the two points wrote itself, and what changed on the
        volume both descend from between the two points there (None: no common one)."""
        holder = self._holder(volume, snapshot_id)
        if holder is None:
            return None
        with self._image(holder) as image:
            snap_id = next(int(s["id"]) for s in self._snaps(image) if s["name"] == snapshot_id)
        here, there = self._chain(volume, None), self._chain(holder, snap_id)
        mine = [v for v, _ in here]
        meet = next(((i, mine.index(v)) for i, (v, _) in enumerate(there) if v in mine), None)
        if meet is None:
            return None
        i, j = meet
        extents: list[tuple[int, int]] = []
        for name, at in [*here[:j], *there[:i]]:
            extents += self._own_extents(name, at)
        extents += self._between(there[i][0], there[i][1], here[j][1])
        return sum(length for _, length in _merged(extents))

    def _chain(self, volume: str, at: int | None) -> list[tuple[str, int | None]]:
        """The point (volume, snapshot ID; None for the head) and each point it was cloned
        from, up through the volumes of its disk (a template is not followed)."""
        disk = disk_of_volume(volume)
        out: list[tuple[str, int | None]] = [(volume, at)]
        name = volume
        while len(out) < 1000:
            with self._image(name) as image:
                parent = self._parent(image)
            if parent is None or disk_of_volume(parent[0]) != disk:
                break
            with self._image(parent[0]) as image:
                snap = next((int(s["id"]) for s in image.list_snaps()
                             if s["name"] == parent[1]), None)
            if snap is None:
                break
            out.append((parent[0], snap))
            name = parent[0]
        return out

    def _own_extents(self, volume: str, at: int | None) -> list[tuple[int, int]]:
        """What the volume holds itself at the point (not read through its parent)."""
        with self._image(volume) as image:
            if at is not None:
                image.set_snap_by_id(at)
            return _diff_extents(image, None, existing_only=False, include_parent=False)

    def _between(self, volume: str, a: int | None, b: int | None) -> list[tuple[int, int]]:
        """The extents that differ on the volume between two of its points."""
        if a == b:
            return []
        older, newer = (a, b) if b is None or (a is not None and a < b) else (b, a)
        assert older is not None
        with self._image(volume) as image:
            snaps = {int(s["id"]): s for s in image.list_snaps()}
            since = snaps.get(older)
            if newer is not None:
                image.set_snap_by_id(newer)
            if since is None or since.get("namespace", 0) != 0:
                # the older point is a snapshot in RBD's trash (deleted by its user): all
                # the volume wrote itself up to the newer one bounds the difference
                return _diff_extents(image, None, existing_only=False, include_parent=False)
            return _diff_extents(image, str(since["name"]), existing_only=False,
                                 include_parent=True)

    # ------------------------------------------------------------ templates' plumbing

    @_connected
    def free_bytes(self) -> int | None:
        """PoolSpace: the pool's `max_avail` from the monitor's `df` (what the pool can
        still take, replication and the full ratio counted); None when the cluster reports
        no pool statistics (they come from a manager daemon: the tests' cluster has none)."""
        self._io()
        with self._errors("ceph df"):
            ret, out, _ = self._cluster.mon_command(
                json.dumps({"prefix": "df", "format": "json"}), b"", timeout=30)
        if ret != 0:
            return None
        try:
            pools = json.loads(out)["pools"]
            return next(int(p["stats"]["max_avail"]) for p in pools if p["name"] == self.pool)
        except (ValueError, KeyError, TypeError, StopIteration):
            return None

    def _run(self, *args: str) -> str:
        cmd = [self.qemu_img, *args]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as exc:
            raise StorageError(f"{' '.join(cmd)}: {exc}") from exc
        if proc.returncode != 0:
            why = proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}"
            raise StorageError(f"{' '.join(cmd)}: {why}")
        return proc.stdout

    def _run_json(self, *args: str) -> dict[str, Any]:
        return dict(json.loads(self._run(*args)))


def _diff_bytes(image: Any, since: str | None, *, existing_only: bool, include_parent: bool,
                whole_object: bool) -> int:
    """Bytes librbd reports changed on the open image (at the snapshot it is set to) since
    the snapshot `since` (None: since the image's creation). Exact extents are asked only
    within the objects the fast-diff object map reports changed."""
    if not whole_object:
        return sum(length for _, length in _diff_extents(
            image, since, existing_only=existing_only, include_parent=include_parent))
    size = int(image.size())
    objects: list[tuple[int, int]] = []

    def collect(offset: int, length: int, exists: bool) -> int:
        if exists or not existing_only:
            objects.append((offset, length))
        return 0

    image.diff_iterate(0, size, since, collect, include_parent=include_parent,
                       whole_object=True)
    return sum(length for _, length in objects)


def _diff_extents(image: Any, since: str | None, *, existing_only: bool,
                  include_parent: bool) -> list[tuple[int, int]]:
    """The extents (offset, length) librbd reports changed on the open image since the
    snapshot `since`, as `_diff_bytes` counts them, merged: first the objects through the
    fast-diff object map, then the exact extents within them."""
    objects: list[tuple[int, int]] = []
    extents: list[tuple[int, int]] = []

    def collect(into: list[tuple[int, int]]) -> Callable[[int, int, bool], int]:
        def cb(offset: int, length: int, exists: bool) -> int:
            if exists or not existing_only:
                into.append((offset, length))
            return 0
        return cb

    image.diff_iterate(0, int(image.size()), since, collect(objects),
                       include_parent=include_parent, whole_object=True)
    for offset, length in _merged(objects):
        image.diff_iterate(offset, length, since, collect(extents),
                           include_parent=include_parent, whole_object=False)
    return _merged(extents)


def _merged(extents: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for offset, length in sorted(extents):
        if out and offset <= out[-1][0] + out[-1][1]:
            start = out[-1][0]
            out[-1] = (start, max(out[-1][1], offset + length - start))
        else:
            out.append((offset, length))
    return out


def _side_by_side(fn: Callable[[T], object], items: Sequence[T],
                  ) -> list[tuple[T, BaseException | None]]:
    """Run `fn` on every item at once (one thread each: librbd waits on the cluster with
    the GIL released); every item's outcome, in order, once all have ended."""
    def outcome(item: T) -> tuple[T, BaseException | None]:
        try:
            fn(item)
            return item, None
        except (StorageError, ValueError) as exc:
            return item, exc

    if len(items) <= 1:
        return [outcome(item) for item in items]
    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        return list(pool.map(outcome, items))


def _check_image_name(name: str) -> None:
    if not name or any(c in name for c in "/@:\\") or len(name) > 200:
        raise StorageError(f"{name!r} cannot name an RBD image")


def _check_snapshot_name(snapshot_id: str) -> None:
    """The qcow2 backend's rule, kept so that backends are interchangeable: all-digit names
    would be ambiguous there (qemu-img finds snapshots by numeric ID first). The revert
    markers' prefix is this backend's own."""
    if not snapshot_id or snapshot_id.isdigit() or any(c in snapshot_id for c in "@/") or \
            snapshot_id.startswith(MARKER):
        raise StorageError(f"{snapshot_id!r}: snapshot names must not be empty, all digits, "
                           f"contain @ or / or start with {MARKER}")
