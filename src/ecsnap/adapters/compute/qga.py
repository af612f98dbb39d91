"""Short-lived, synchronous QMP and guest-agent sessions on QEMU's own `qemu.qmp` library.

`qemu.qmp` is asyncio-based. Its coroutines run here on one private event loop in a
daemon thread, so the blocking methods below work from any thread, including one that
runs an event loop of its own (a web server's).

Both protocols are served by QEMU chardev sockets that accept ONE client at a time, so a
session is opened per operation and always closed (the driver serialises the sessions of
an instance). Every call has a deadline.

The guest agent speaks QMP's JSON but differs in ways the library does not handle alone:
- no greeting and no capabilities negotiation (`await_greeting`/`negotiate` off);
- the channel may hold stale data (requests written while the agent was not running are
  delivered when it starts; replies to earlier clients may arrive late), so a session
  first sends 0xFF (which resets the agent's parser) and then `guest-sync-delimited`
  with a random id until the agent returns that id. The agent prefixes that reply with
  0xFF, which is stripped before parsing; replies whose id nobody waits for, and lines
  that do not parse, are dropped;
- `guest-shutdown` does not answer on success: it is written without waiting.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Self, TypeVar

from qemu.qmp import EventListener, ExecuteError, Message, QMPClient, QMPError
from qemu.qmp.error import ProtocolError

from ecsnap.adapters.compute.base import ComputeError, GuestAgentUnavailable

log = logging.getLogger("ecsnap.compute.qemu")

T = TypeVar("T")


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


class QmpCommandError(ComputeError):
    """QEMU answered a QMP command with an error."""

    def __init__(self, command: str, desc: str, error_class: str = "") -> None:
        super().__init__(f"{command}: {desc}")
        self.command = command
        self.desc = desc
        self.error_class = error_class


class _Session:
    """A connection closed on leaving its `with` block (or by close(), any number of times)."""

    _client: QMPClient

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            run(self._client.disconnect(), 5.0)


class QmpSession(_Session):
    """One QMP connection (greeting, qmp_capabilities), for one operation."""

    def __init__(self, path: str, name: str, timeout: float = 10.0) -> None:
        self.path = path
        self.name = name
        self.timeout = timeout
        self._client = QMPClient(f"qmp:{name}")
        self._events = EventListener()
        self._client.register_listener(self._events)
        try:
            run(self._client.connect(path), timeout)
        except (QMPError, OSError, TimeoutError) as exc:
            self.close()
            raise ComputeError(f"QMP of {name} ({path}): {type(exc).__name__}: {exc} "
                               "(is QEMU running, is another client attached?)") from exc

    def cmd(self, command: str, arguments: Mapping[str, object] | None = None, *,
            timeout: float | None = None) -> Any:
        """The command's `return` value; QmpCommandError if QEMU reports an error."""
        try:
            return run(self._client.execute(command, dict(arguments or {})),
                       timeout or self.timeout)
        except ExecuteError as exc:
            raise QmpCommandError(command, str(exc), exc.error_class) from exc
        except (QMPError, OSError, TimeoutError) as exc:
            raise ComputeError(f"QMP {command} on {self.name}: "
                               f"{type(exc).__name__}: {exc}") from exc

    def wait_event(self, name: str, match: Callable[[dict[str, Any]], bool],
                   timeout: float) -> dict[str, Any] | None:
        """The first event `name` (received since the session opened) that `match`es,
        or None after `timeout` seconds."""
        async def wait() -> dict[str, Any] | None:
            while True:
                event = await self._events.get()
                data = event.get("data")
                if event.get("event") == name and \
                        match(dict(data) if isinstance(data, dict) else {}):
                    return dict(event)

        try:
            return run(wait(), timeout)
        except TimeoutError:
            return None


class _AgentClient(QMPClient):
    """QMPClient for qemu-guest-agent: 0xFF delimiters stripped, garbage and stale
    replies dropped, raw writes for resync and for commands without a reply."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.await_greeting = False
        self.negotiate = False

    async def _do_recv(self) -> Message:
        while True:
            line = (await self._readline()).lstrip(b"\xff").strip()
            if not line:
                continue
            try:
                return Message(line, eager=True)
            except ProtocolError:
                log.debug("guest agent: dropped an unparsable line %r", line[:200])

    async def _on_message(self, msg: Message) -> None:
        if "event" not in msg and msg.get("id") not in self._pending:
            log.debug("guest agent: dropped a stale reply %s", str(msg)[:200])
            return
        await super()._on_message(msg)

    async def write_raw(self, data: bytes) -> None:
        assert self._writer is not None
        self._writer.write(data)
        await self._writer.drain()


class AgentSession(_Session):
    """One connection to qemu-guest-agent, synchronised before use."""

    _client: _AgentClient

    def __init__(self, path: str, name: str, timeout: float = 5.0,
                 sync_attempt: float = 1.0) -> None:
        """Connect and resynchronise within `timeout` seconds, else GuestAgentUnavailable."""
        self.path = path
        self.name = name
        self._client = _AgentClient(f"qga:{name}")
        deadline = time.monotonic() + timeout
        try:
            run(self._client.connect(path), timeout)
            run(self._client.write_raw(b"\xff"), 2.0)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GuestAgentUnavailable(
                        f"the guest agent of {name} did not answer in {timeout:.1f} s")
                token = random.randint(1, 2**31 - 1)
                try:
                    if run(self._client.execute("guest-sync-delimited", {"id": token}),
                           min(sync_attempt, left)) == token:
                        break
                except TimeoutError:
                    continue
        except GuestAgentUnavailable:
            self.close()
            raise
        except (QMPError, OSError, TimeoutError) as exc:
            self.close()
            raise GuestAgentUnavailable(
                f"the guest agent of {name}: {type(exc).__name__}: {exc}") from exc

    def call(self, command: str, arguments: Mapping[str, object] | None = None, *,
             timeout: float = 10.0) -> Any:
        """The command's `return` value. ComputeError if the agent reports an error,
        GuestAgentUnavailable if it does not answer in time."""
        try:
            return run(self._client.execute(command, dict(arguments or {})), timeout)
        except ExecuteError as exc:
            raise ComputeError(f"guest agent {command}: {exc}") from exc
        except (QMPError, OSError, TimeoutError) as exc:
            raise GuestAgentUnavailable(f"guest agent {command} on {self.name}: "
                                        f"{type(exc).__name__}: {exc}") from exc

    def send_only(self, command: str, arguments: Mapping[str, object] | None = None) -> None:
        """Write a command that does not answer on success (guest-shutdown)."""
        message: dict[str, object] = {"execute": command}
        if arguments:
            message["arguments"] = dict(arguments)
        try:
            run(self._client.write_raw(json.dumps(message).encode() + b"\n"), 2.0)
            run(asyncio.sleep(0.2), 1.0)  # let QEMU pass it on before the connection closes
        except (QMPError, OSError, TimeoutError) as exc:
            raise GuestAgentUnavailable(f"guest agent {command} on {self.name}: {exc}") from exc


__all__ = ["AgentSession", "QmpCommandError", "QmpSession", "run"]
