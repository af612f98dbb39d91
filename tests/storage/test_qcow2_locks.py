"""A qemu-img left running by a killed ecsnap holds its image's write lock for a while;
the backend waits for it (bounded) instead of failing the recovery that undoes its work."""

from __future__ import annotations

import subprocess
import time

import pytest

from ecsnap.adapters.storage import qcow2
from ecsnap.adapters.storage.base import StorageError
from ecsnap.adapters.storage.qcow2 import Qcow2Backend


def _hold_lock(path: str, ms: int) -> subprocess.Popen[bytes]:
    """A qemu-io that opens the image read-write (taking its lock) and sleeps."""
    proc = subprocess.Popen(["qemu-io", "-f", "qcow2", path, "-c", f"sleep {ms}"])
    time.sleep(0.3)  # it has the image open
    return proc


def test_a_lock_held_for_a_moment_is_waited_for(backend: Qcow2Backend) -> None:
    backend.create_blank("d-1", 1 << 30)
    holder = _hold_lock(backend.path("d-1"), 1500)
    try:
        assert holder.poll() is None
        backend.create_snapshots([("d-1", "s-1")])
        assert holder.poll() is not None  # it could only run once the holder had gone
    finally:
        holder.wait(timeout=10)
    assert backend.has_snapshot("d-1", "s-1")


def test_a_lock_held_too_long_fails_clearly(backend: Qcow2Backend,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qcow2, "LOCK_WAIT_S", 0.3)
    backend.create_blank("d-1", 1 << 30)
    holder = _hold_lock(backend.path("d-1"), 3000)
    try:
        with pytest.raises(StorageError, match="lock"):
            backend.create_snapshots([("d-1", "s-1")])
    finally:
        holder.wait(timeout=10)
    assert not backend.has_snapshot("d-1", "s-1")
