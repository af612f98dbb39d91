"""A ServiceContext on the in-memory fakes: store, storage pools, hypervisor; tasks inline.

`service_context` is the one place that knows how bootstrap wires a context (the runner
and its registry of operations); `fast_world` builds the fakes around it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ecsnap.adapters.compute.base import ComputeDriver
from ecsnap.adapters.storage.base import StorageBackend
from ecsnap.adapters.store.base import UnitOfWork
from ecsnap.config import Settings
from ecsnap.service.context import ServiceContext
from tests.fakes.compute import InMemoryCompute
from tests.fakes.storage import InMemoryPools, InMemoryStorage
from tests.fakes.store import InMemoryStore


def service_context(settings: Settings, *, uow: Callable[..., UnitOfWork],
                    storage_for: Callable[[str], StorageBackend],
                    compute: ComputeDriver, background: bool = False) -> ServiceContext:
    """What bootstrap.build does, without its database, qcow2 pools and QEMU. The task
    runner runs every task inline (in the caller's thread, before the call returns), or
    with `background` in its threads, as the server does."""
    from ecsnap.service.registry import OPERATIONS
    from ecsnap.service.tasks import TaskRunner

    ctx = ServiceContext(settings=settings, uow=uow, storage_for=storage_for, compute=compute)
    ctx.runner = TaskRunner(ctx, OPERATIONS, background=background)
    return ctx


@dataclass
class FastWorld:
    ctx: ServiceContext
    store: InMemoryStore
    pools: InMemoryPools
    compute: InMemoryCompute

    def storage(self, region_id: str) -> InMemoryStorage:
        """The in-memory pool of a region (ensure_region made it)."""
        with self.ctx.uow(readonly=True) as uow:
            region = uow.regions.load(region_id)
        return self.pools.for_pool(region.storage_pool)


def fast_world(data_dir: Path, **settings: object) -> FastWorld:
    """Fakes and a context on them (`settings` override Settings' fields; tasks run inline
    unless background_tasks=True). `data_dir` only gets the image store's copies of image
    templates and the (empty) pool directories that ensure_region makes."""
    values: dict[str, object] = {"background_tasks": False, "health_gate_timeout_s": 0.2,
                                 "stop_timeout_s": 0.1, **settings}
    config = Settings(data_dir=data_dir, **values)  # type: ignore[arg-type]
    store, pools = InMemoryStore(), InMemoryPools()
    compute = InMemoryCompute(pools)
    ctx = service_context(config, uow=store.unit_of_work, storage_for=pools.for_pool,
                          compute=compute, background=config.background_tasks)
    world = FastWorld(ctx, store, pools, compute)
    ctx.extras["fast_world"] = world  # for helpers that are handed the context only
    return world
