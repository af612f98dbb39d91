"""Fixtures for the storage backend tests: qcow2 pools in temporary directories."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ecsnap.adapters.storage.qcow2 import Qcow2Backend


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
