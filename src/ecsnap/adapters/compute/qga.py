"""A small client of qemu-guest-agent over the VM's unix socket.

QMP goes through QEMU's own `qemu.qmp` library (see qemu.py). The guest agent speaks the
same JSON but differs where that library cannot follow: it sends no greeting, a client
must resynchronise with `guest-sync-delimited` (0xFF framing, replies may be stale or
buffered from before the agent started), and `guest-shutdown` never answers. This client
does exactly that, with a deadline on every call and one short-lived connection per use
(the chardev serves one client at a time).
"""

from __future__ import annotations

import json
import random
import socket
import time
from typing import Any

from ecsnap.adapters.compute.base import ComputeError, GuestAgentUnavailable


class GuestAgent:
    def __init__(self, path: str, timeout: float) -> None:
        self.deadline = time.monotonic() + timeout
        self.buffer = b""
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(max(0.1, self.deadline - time.monotonic()))
            self.sock.connect(path)
        except OSError as exc:
            self.sock.close()
            raise GuestAgentUnavailable(f"guest agent socket {path}: {exc}") from exc

    def __enter__(self) -> GuestAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def _send(self, message: dict[str, Any], delimited: bool = False) -> None:
        data = json.dumps(message).encode() + b"\n"
        try:
            self.sock.sendall((b"\xff" if delimited else b"") + data)
        except OSError as exc:
            raise GuestAgentUnavailable(f"guest agent: {exc}") from exc

    def _line(self, until: float) -> dict[str, Any] | None:
        while b"\n" not in self.buffer:
            left = min(until, self.deadline) - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return None
            except OSError as exc:
                raise GuestAgentUnavailable(f"guest agent: {exc}") from exc
            if not chunk:
                raise GuestAgentUnavailable("guest agent closed the connection")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        line = line.lstrip(b"\xff").strip()
        try:
            return dict(json.loads(line)) if line else {}
        except ValueError:
            return {}

    def sync(self, attempt: float = 1.0) -> None:
        """Resynchronise: retry guest-sync-delimited until the agent answers our id."""
        while time.monotonic() < self.deadline:
            token = random.randint(1, 2**31)
            self._send({"execute": "guest-sync-delimited", "arguments": {"id": token}},
                       delimited=True)
            until = time.monotonic() + attempt
            while (reply := self._line(until)) is not None:
                if reply.get("return") == token:
                    return
        raise GuestAgentUnavailable("the guest agent did not answer")

    def call(self, command: str, **arguments: Any) -> Any:
        self._send({"execute": command, **({"arguments": arguments} if arguments else {})})
        reply = self._line(self.deadline)
        while reply == {}:
            reply = self._line(self.deadline)
        if reply is None:
            raise GuestAgentUnavailable(f"no answer to {command}")
        if "error" in reply:
            raise ComputeError(f"{command}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def send_only(self, command: str, **arguments: Any) -> None:
        """For commands that do not answer on success (guest-shutdown)."""
        self._send({"execute": command, **({"arguments": arguments} if arguments else {})})
