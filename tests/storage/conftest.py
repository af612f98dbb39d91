"""Fixtures for the storage backend tests: qcow2 pools in temporary directories, and RBD
pools on a throwaway Ceph cluster (tests/ceph.py), one per pytest process."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ecsnap.adapters.storage.qcow2 import Qcow2Backend
from ecsnap.adapters.storage.rbd import TEMPLATE_PREFIX, RbdBackend
from tests.ceph import CephCluster, shared


@pytest.fixture
def backend(tmp_path: Path) -> Qcow2Backend:
    """A pool on pytest's tmp_path (the disk file system, as in production)."""
    return Qcow2Backend(str(tmp_path / "pool"))


@pytest.fixture
def ram_backend(tmp_path: Path) -> Iterator[Qcow2Backend]:
    """A pool in /dev/shm when there is one: qemu-img's fdatasync calls cost nothing there,
    which keeps many-example property tests fast on a busy disk."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield Qcow2Backend(str(tmp_path / "pool"))
        return
    with tempfile.TemporaryDirectory(dir=shm, prefix="ecsnap-test-") as tmp:
        yield Qcow2Backend(tmp)


@pytest.fixture(scope="session")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    """The throwaway cluster, started once (fails, does not skip, without Ceph)."""
    with shared(tmp_path_factory) as cluster:
        yield cluster


def rbd_images(cluster: CephCluster, pool: str) -> set[str]:
    import rbd

    with cluster.connect() as conn, conn.open_ioctx(pool) as ioctx:
        return set(rbd.RBD().list(ioctx))


@pytest.fixture
def rbd_backend(ceph: CephCluster) -> Iterator[RbdBackend]:
    """An RbdBackend on the cluster's pool; the images the test made are removed after it
    (disks first, the templates they were cloned from last)."""
    before = rbd_images(ceph, ceph.pool)
    backend = RbdBackend(ceph.pool, conf=str(ceph.conf), client="admin")
    try:
        yield backend
    finally:
        made = rbd_images(ceph, ceph.pool) - before
        for name in sorted(made, key=lambda n: (n.startswith(TEMPLATE_PREFIX), n)):
            backend.delete(name)
        backend.close()
