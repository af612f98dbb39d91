"""Wires adapters into services: the only place that picks concrete backends."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import cast

from ecsnap import metrics
from ecsnap.adapters.compute.base import BuiltImage, ComputeDriver
from ecsnap.adapters.inspect.base import FileSystemReader
from ecsnap.adapters.storage.base import StorageBackend
from ecsnap.adapters.store import sql
from ecsnap.config import Settings
from ecsnap.filemodes import secure_data_dir
from ecsnap.service import accounts, cluster
from ecsnap.service.context import ServiceContext
from ecsnap.service.recovery import RecoveryReport
from ecsnap.service.recovery import recover as run_recovery
from ecsnap.service.registry import OPERATIONS
from ecsnap.service.tasks import TaskRunner

log = logging.getLogger("ecsnap")


def _build_demo_image(out_dir: Path, cache_dir: Path) -> BuiltImage:
    from ecsnap.adapters.compute.guest_image import build_demo_image

    return build_demo_image(out_dir, cache_dir)


def _inspector(work_dir: Path) -> FileSystemReader:
    from ecsnap.adapters.inspect.debugfs import DebugfsReader

    return DebugfsReader(work_dir)


def build(settings: Settings, *, compute: ComputeDriver | None = None,
          background: bool | None = None, recover: bool = False,
          host_id: str | None = None, run_dir: Path | None = None) -> ServiceContext:
    """A ServiceContext on `settings`: migrated database, qcow2 pools, QEMU driver.

    Cluster mode (`settings.cluster`, PostgreSQL): without `host_id` an API process (no
    hypervisor, no recovery: tasks go to the agents); with it the agent of that host (its
    VMs in run/HOST, or `run_dir`; its task commits fenced by its epoch; see
    service/cluster.py)."""
    from ecsnap.adapters.storage.qcow2 import Qcow2Backend

    if (settings.cluster or host_id) and not settings.database_url.startswith("postgresql"):
        raise ValueError("cluster mode (agents, API processes) needs a PostgreSQL "
                         "database_url")
    api_only = settings.cluster and host_id is None

    # owner-only: created 0700, or wider modes of an existing one fixed (and logged)
    secure_data_dir(settings.data_dir, shallow=[settings.cache_dir])
    # an agent: a hung one (SIGSTOP) stopped inside a transaction would hold its host row
    # for ever, and no peer could fence it; the server ends such a session after the
    # heartbeat timeout (its work is refused anyway: it is fenced)
    engine = sql.make_engine(settings.database_url, idle_in_transaction_s=settings.host_timeout_s
                             if host_id else 0)
    sql.migrate(engine)
    factory = sql.session_factory(engine)

    connected: list[Callable[[], None]] = []  # the RBD pools' close, for ctx.close

    @functools.cache
    def storage_for(pool: str) -> StorageBackend:
        """A region's pool: `rbd:POOL?conf=…&client=…[&keyring=…]` is a Ceph RBD pool (one
        cluster connection per pool, opened at its first use, closed by ctx.close), anything
        else a directory of qcow2 files."""
        if pool.startswith("rbd:"):
            from ecsnap.adapters.storage.rbd import RbdBackend

            backend = RbdBackend.from_spec(pool)
            connected.append(backend.close)
            return backend
        return Qcow2Backend(pool)

    if compute is None and api_only:
        compute = cast(ComputeDriver, cluster.NoCompute())
    if compute is None:
        from ecsnap.adapters.compute.qemu import QemuDriver

        compute = QemuDriver(run_dir or (settings.run_dir / host_id if host_id
                                         else settings.run_dir),
                             accel=settings.accel,
                             snapshot_observer=metrics.live_snapshot)
    ctx = ServiceContext(settings=settings, uow=lambda readonly=False: sql.SqlUnitOfWork(factory,
                                                                        readonly),
                         storage_for=storage_for, compute=compute,
                         image_builder=_build_demo_image,
                         image_import=Qcow2Backend(str(settings.images_dir)),
                         inspector=_inspector(settings.run_dir / "inspect"))
    ctx.extras["engine"] = engine

    def close_pools() -> None:
        for close in connected:
            close()

    ctx.closers.append(close_pools)
    if api_only:
        ctx.runner = cluster.ApiRunner(
            ctx, OPERATIONS,
            wait_for_ended=sql.listener(settings.database_url, cluster.ENDED))
        if recover:  # recovery is the agents' (they take over what a crash cut short)
            accounts.seal_stored_secrets(ctx)
            ctx.extras["recovery"] = RecoveryReport()
        return ctx
    if host_id:
        ctx.uow = cluster.fenced_uow(ctx.uow)
        ctx.runner = cluster.AgentRunner(ctx, OPERATIONS, background=True,
                                         workers=settings.task_workers,
                                         command_workers=settings.command_workers)
        ctx.extras["wakeup"] = sql.listener(settings.database_url, cluster.CHANNEL)
        return ctx
    ctx.runner = TaskRunner(ctx, OPERATIONS, background=settings.background_tasks
                            if background is None else background,
                            workers=settings.task_workers,
                            command_workers=settings.command_workers)
    if recover:  # start-up of a server: first what a crash or an older release left
        accounts.seal_stored_secrets(ctx)  # AccessKey secrets an older release stored plain
        report = ctx.extras["recovery"] = run_recovery(ctx)  # for the start-up screen
        if report.forward or report.undone or report.stopped:
            log.warning("recovery: forward %s, undone %s, stopped %s", report.forward,
                        report.undone, report.stopped)
    return ctx


def build_agent(settings: Settings, host_id: str, *, vcpus: int, memory_mib: int,
                address: str = "", ceph_addrs: list[str] | None = None,
                run_dir: Path | None = None) -> cluster.Agent:
    """The agent of host `host_id` (`ecsnap agent`), on a cluster's PostgreSQL database;
    its VMs in `run_dir` (default DATA_DIR/run/HOST)."""
    ctx = build(settings, host_id=host_id, run_dir=run_dir)
    return cluster.Agent(ctx, host_id, vcpus=vcpus, memory_mib=memory_mib, address=address,
                         ceph_addrs=ceph_addrs, wait_for_wakeup=ctx.extras["wakeup"],
                         workers=settings.task_workers)
