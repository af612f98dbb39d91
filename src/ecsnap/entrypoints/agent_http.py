"""An agent's listener (`ecsnap agent --address HOST:PORT`): its /metrics, and the serial
consoles of the VMs on its host for the cluster's API processes.

`/serial/{instance_id}` is a WebSocket that carries the VM's serial socket. It is not an
open door: the API process, after its own checks (the console's session and origin, the
owner's instance, Running on this host), sends a short-lived token made with this host's
secret (`console_access.serial_console`), which `console_access.agent_serial_console`
checks before anything is opened. A refusal is accepted, then closed with the console's
codes: 4401 (no valid token: bad, expired, replayed) or 4404 (no such instance on this
host, or not Running, or its socket will not open).
"""

from __future__ import annotations

import logging
import socket
import threading

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from ecsnap import metrics
from ecsnap.domain.errors import EcsError
from ecsnap.entrypoints import serial_pipe
from ecsnap.service import console_access
from ecsnap.service.context import ServiceContext

log = logging.getLogger("ecsnap.agent")


def create_agent_app(ctx: ServiceContext, host_id: str) -> Starlette:
    async def scrape(_request: Request) -> Response:
        body, content_type = await run_in_threadpool(metrics.exposition)
        return Response(body, media_type=content_type)

    async def serial(websocket: WebSocket) -> None:
        iid = websocket.path_params["instance_id"]
        token = websocket.headers.get(console_access.SERIAL_TOKEN_HEADER, "")
        try:
            path = await run_in_threadpool(console_access.agent_serial_console, ctx, host_id,
                                           iid, token)
            stream = await serial_pipe.open_serial(path)
        except (EcsError, OSError) as exc:
            code = 4401 if isinstance(exc, EcsError) and exc.http_status == 401 else 4404
            log.warning("serial console of %s refused (%s): %s", iid, code,
                        exc.message if isinstance(exc, EcsError) else exc)
            await websocket.accept()
            await websocket.close(code=code)
            return
        await websocket.accept()
        await serial_pipe.pump(websocket, stream)

    return Starlette(routes=[Route("/metrics", scrape),
                             WebSocketRoute("/serial/{instance_id}", serial)])


def listen(address: str) -> socket.socket:
    """Bind `address` (HOST:PORT; [IPv6]:PORT; empty host: 127.0.0.1) now, so that a bad or
    busy address is the caller's error at start-up (ValueError, OSError)."""
    where, _, port = address.rpartition(":")
    if not port.isdigit() or int(port) > 65535:
        raise ValueError("expected HOST:PORT")
    host = where.strip("[]") or "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def serve_in_thread(ctx: ServiceContext, host_id: str, sock: socket.socket) -> None:
    """Serve the agent's app on the bound `sock` in a daemon thread (the main thread runs
    the agent; uvicorn leaves the signals to it when not in the main thread)."""
    config = uvicorn.Config(create_agent_app(ctx, host_id), log_config=None,
                            log_level="warning", access_log=False, lifespan="off",
                            http="auto", loop="asyncio")
    server = uvicorn.Server(config)
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="agent-http",
                     daemon=True).start()
    log.info("agent %s listening at %s (/metrics, /serial)", host_id, sock.getsockname())


__all__ = ["create_agent_app", "listen", "serve_in_thread"]
