"""Shared fixtures: a service context on a temporary data dir, SQLite or PostgreSQL."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ecsnap import bootstrap, config
from ecsnap.domain.model import Image
from ecsnap.service import images, regions
from ecsnap.service.context import ServiceContext
from tests import qcow
from tests.doubles import FileBackedCompute
from tests.pg import PostgresServer

ACCOUNT = "acc-alice"
OTHER = "acc-bob"
REGION = "local-1"


@pytest.fixture(autouse=True)
def _umask_restored() -> Iterator[None]:
    """Every test ends with the umask it began with: an operator command run in-process
    (CliRunner: tests/test_cli_admin.py, tests/cluster/test_hosts_views.py) restricts the
    process's umask to 0o077 for good, and the files later tests create (the guest trees of
    tests/inspect, whose modes they compare) would be owner-only."""
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


@pytest.fixture(scope="session")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small image template: 1 GiB virtual, 1 MiB of 0x11 at offset 0."""
    path = tmp_path_factory.mktemp("image") / "tiny.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1G"], check=True)
    qcow.write(str(path), 0x11)
    return path


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    server = PostgresServer(tmp_path_factory.mktemp("pg"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        server: PostgresServer = request.getfixturevalue("postgres")
        return server.fresh_database()
    return f"sqlite:///{tmp_path / 'ecsnap.db'}"


@pytest.fixture
def compute() -> FileBackedCompute:
    return FileBackedCompute()


@pytest.fixture
def ctx(tmp_path: Path, database_url: str, compute: FileBackedCompute,
        template: Path) -> Iterator[ServiceContext]:
    settings = config.load(tmp_path / "data", database_url=database_url,
                           background_tasks=False, health_gate_timeout_s=2.0)
    ctx = bootstrap.build(settings, compute=compute, background=False)
    regions.ensure_region(ctx, REGION, vcpus=8, memory_mib=8192)
    yield ctx
    # the tasks a test left running (a follow-up collecting volumes) end before the Ceph
    # connection they use is closed: librados aborts the process when it is shut under them
    ctx.close()


@pytest.fixture
def image(ctx: ServiceContext, template: Path) -> Image:
    return images.register_image(ctx, REGION, name="tiny", os_name="Tiny Linux",
                                 template=template, size_gib=1)
