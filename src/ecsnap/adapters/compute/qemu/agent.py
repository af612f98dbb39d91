"""Short-lived, synchronous sessions with qemu-guest-agent.

The guest agent speaks QMP's JSON but differs in ways the `qemu.qmp` library does not
handle alone:
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
import json
import logging
import random
import time
from collections.abc import Mapping
from typing import Any

from qemu.qmp import ExecuteError, Message, QMPClient, QMPError
from qemu.qmp.error import ProtocolError

from ecsnap.adapters.compute.base import ComputeError, GuestAgentUnavailable
from ecsnap.adapters.compute.qemu.session import CommandHook, Session, run

log = logging.getLogger("ecsnap.compute.qemu")


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


class AgentSession(Session):
    """One connection to qemu-guest-agent, synchronised before use."""

    _client: _AgentClient

    def __init__(self, path: str, name: str, timeout: float = 5.0,
                 sync_attempt: float = 1.0, *, on_command: CommandHook | None = None) -> None:
        """Connect and resynchronise within `timeout` seconds, else GuestAgentUnavailable."""
        self.path = path
        self.name = name
        self.on_command = on_command
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
        started = time.perf_counter()
        try:
            return run(self._client.execute(command, dict(arguments or {})), timeout)
        except ExecuteError as exc:
            raise ComputeError(f"guest agent {command}: {exc}") from exc
        except (QMPError, OSError, TimeoutError) as exc:
            raise GuestAgentUnavailable(f"guest agent {command} on {self.name}: "
                                        f"{type(exc).__name__}: {exc}") from exc
        finally:
            if self.on_command is not None:
                self.on_command(command, (time.perf_counter() - started) * 1000)

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


__all__ = ["AgentSession"]
