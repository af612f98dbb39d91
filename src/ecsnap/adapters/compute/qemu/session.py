"""What the QMP and guest-agent sessions share: a private event loop, and a connection
that is always closed.

QEMU's own `qemu.qmp` library is asyncio-based. Its coroutines run here on one private
event loop in a daemon thread, so the blocking session methods work from any thread,
including one that runs an event loop of its own (a web server's).

Both protocols are served by QEMU chardev sockets that accept ONE client at a time, so a
session is opened per operation and always closed (the driver serialises the sessions of
an instance, see rundir.py). Every call has a deadline.

A session may be given an `on_command` hook: it is called after each command with the
command's name and its round-trip time in milliseconds (whether it succeeded or not).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Self, TypeVar

from qemu.qmp import QMPClient

T = TypeVar("T")

CommandHook = Callable[[str, float], None]  # (command, milliseconds)


class _Loop:
    """One asyncio event loop on a daemon thread, shared by every session."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def get(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None or cls._loop.is_closed():
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="ecsnap-qmp",
                                 daemon=True).start()
                cls._loop = loop
            return cls._loop


def run(coro: Coroutine[Any, Any, T], timeout: float) -> T:
    """Run `coro` on the session loop and wait for it, at most `timeout` seconds
    (then TimeoutError, and the coroutine is cancelled)."""
    future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, max(0.01, timeout)),
                                              _Loop.get())
    try:
        return future.result(timeout + 5)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise TimeoutError(f"no answer in {timeout:.1f} s") from None


class Session:
    """A connection closed on leaving its `with` block (or by close(), any number of times)."""

    _client: QMPClient
    on_command: CommandHook | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            run(self._client.disconnect(), 5.0)


__all__ = ["CommandHook", "Session", "run"]
