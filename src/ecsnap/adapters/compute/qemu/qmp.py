"""Short-lived, synchronous QMP sessions (greeting, qmp_capabilities, commands, events)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError

from ecsnap.adapters.compute.base import ComputeError
from ecsnap.adapters.compute.qemu.session import CommandHook, Session, run


class QmpCommandError(ComputeError):
    """QEMU answered a QMP command with an error."""

    def __init__(self, command: str, desc: str, error_class: str = "") -> None:
        super().__init__(f"{command}: {desc}")
        self.command = command
        self.desc = desc
        self.error_class = error_class


class QmpSession(Session):
    """One QMP connection (greeting, qmp_capabilities), for one operation."""

    def __init__(self, path: str, name: str, timeout: float = 10.0, *,
                 on_command: CommandHook | None = None) -> None:
        self.path = path
        self.name = name
        self.timeout = timeout
        self.on_command = on_command
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
        started = time.perf_counter()
        try:
            return run(self._client.execute(command, dict(arguments or {})),
                       timeout or self.timeout)
        except ExecuteError as exc:
            raise QmpCommandError(command, str(exc), exc.error_class) from exc
        except (QMPError, OSError, TimeoutError) as exc:
            raise ComputeError(f"QMP {command} on {self.name}: "
                               f"{type(exc).__name__}: {exc}") from exc
        finally:
            if self.on_command is not None:
                self.on_command(command, (time.perf_counter() - started) * 1000)

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


def block_node(qmp: QmpSession, node_name: str) -> dict[str, Any] | None:
    """The VM's block node `node_name` (query-named-block-nodes), None if it has none."""
    nodes = qmp.cmd("query-named-block-nodes", {"flat": True})
    return next((dict(n) for n in nodes if n.get("node-name") == node_name), None)


__all__ = ["QmpCommandError", "QmpSession", "block_node"]
