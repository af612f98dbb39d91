"""Serial consoles carried over WebSockets: the console's (browser <-> the VM's unix socket on
the single-host server, or <-> the agent of the instance's host in a cluster) and the
agent's (API process <-> the VM's unix socket on its host). The checks are the callers'
(console/app.py, agent_http.py) and the services'; this module only moves bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Protocol

from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from ecsnap.service.console_access import SERIAL_TOKEN_HEADER, AgentSerial

CHUNK = 4096
AGENT_OPEN_TIMEOUT_S = 10.0


class SerialStream(Protocol):
    close_code: int | None  # how the far end closed, when it says (an agent's refusal)

    async def read(self) -> bytes:
        """The next bytes of the console, b"" at its end."""
        ...

    async def write(self, data: bytes) -> None: ...

    async def close(self) -> None: ...


class UnixSerial:
    """A VM's serial socket on this host."""

    close_code: int | None = None

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def read(self) -> bytes:
        return await self.reader.read(CHUNK)

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def close(self) -> None:
        self.writer.close()


class AgentSerialClient:
    """The serial console of a VM on another host, through that host's agent."""

    close_code: int | None = None

    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection

    async def read(self) -> bytes:
        try:
            data = await self.connection.recv()
        except ConnectionClosed as closed:
            code = closed.rcvd.code if closed.rcvd is not None else 0
            self.close_code = code if 4000 <= code < 5000 else None  # ours: 4401, 4404
            return b""
        return data if isinstance(data, bytes) else data.encode()

    async def write(self, data: bytes) -> None:
        with contextlib.suppress(ConnectionClosed):  # read() sees the end
            await self.connection.send(data)

    async def close(self) -> None:
        await self.connection.close()


async def open_serial(target: str | AgentSerial) -> SerialStream:
    """Open the serial console `console_access.serial_console` answered: a unix socket
    path, or an agent's WebSocket (OSError or a websockets error if it cannot be reached or
    refuses the handshake)."""
    if isinstance(target, AgentSerial):
        connection = await connect(target.url, proxy=None, compression=None,
                                   open_timeout=AGENT_OPEN_TIMEOUT_S, close_timeout=2,
                                   additional_headers={SERIAL_TOKEN_HEADER: target.token})
        return AgentSerialClient(connection)
    return UnixSerial(*await asyncio.open_unix_connection(target))


async def pump(websocket: WebSocket, stream: SerialStream,
               *until: Awaitable[None]) -> None:
    """Carry bytes both ways between an accepted `websocket` and `stream` until either side
    ends or one of `until` returns (the console's session check); then close both, the
    WebSocket with the close code the stream ended with (an agent's 4401 / 4404)."""

    async def pump_out() -> None:
        while data := await stream.read():
            await websocket.send_bytes(data)

    async def pump_in() -> None:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes") or (message.get("text") or "").encode()
            await stream.write(data)

    tasks = [asyncio.ensure_future(pump_out()), asyncio.ensure_future(pump_in()),
             *(asyncio.ensure_future(u) for u in until)]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    except WebSocketDisconnect:
        pass
    finally:
        for t in tasks:
            t.cancel()
        await stream.close()
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):  # closed already
            await websocket.close(code=stream.close_code or 1000)
