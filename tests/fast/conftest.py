"""Fixtures of the fast tests: a ServiceContext on the in-memory fakes (tests/fakes), no
database server, no QEMU, no disk files (only test_storage_fake.py runs qemu-img, to
compare the storage fake with qcow2). `ctx`, `compute` and `image` override the root
conftest's fixtures of the same names (those are on real qcow2 files and SQLite)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ecsnap.domain.model import Image
from ecsnap.service import images, regions
from ecsnap.service.context import ServiceContext
from tests.conftest import REGION
from tests.fakes.compute import InMemoryCompute
from tests.fakes.context import FastWorld, fast_world
from tests.fakes.storage import InMemoryStorage
from tests.fakes.store import InMemoryStore

IMAGE_CONTENT = b"tiny linux root file system"


@pytest.fixture
def world(tmp_path: Path) -> FastWorld:
    world = fast_world(tmp_path / "data")
    regions.ensure_region(world.ctx, REGION, vcpus=8, memory_mib=8192)
    return world


@pytest.fixture
def ctx(world: FastWorld) -> ServiceContext:
    return world.ctx


@pytest.fixture
def compute(world: FastWorld) -> InMemoryCompute:
    return world.compute


@pytest.fixture
def store(world: FastWorld) -> InMemoryStore:
    return world.store


@pytest.fixture
def storage(world: FastWorld) -> InMemoryStorage:
    return world.storage(REGION)


@pytest.fixture
def image(world: FastWorld, tmp_path: Path) -> Image:
    template = tmp_path / "tiny.img"
    template.write_bytes(IMAGE_CONTENT)
    return images.register_image(world.ctx, REGION, name="tiny", os_name="Tiny Linux",
                                 template=template, size_gib=1)
