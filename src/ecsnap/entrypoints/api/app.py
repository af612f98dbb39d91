"""The HTTP face of ecsnap: the ECS RPC API at `/` and the web console under `/console/`.

An API request is verified (signature, freshness, nonce), decoded, handed to one action
(one service call), and rendered; every error leaves as ECS's envelope with its code and
status, never as a traceback. One log line per request carries its RequestId.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from datetime import datetime, timedelta

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route

from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import utcnow
from ecsnap.entrypoints.api.actions import ACTIONS, Call
from ecsnap.entrypoints.api.params import Params
from ecsnap.entrypoints.api.render import Rendered, new_request_id, render, render_error
from ecsnap.entrypoints.api.signature import (
    API_VERSION,
    AccessKeyRecord,
    SignedRequest,
    verify,
)
from ecsnap.service import accounts
from ecsnap.service.context import ServiceContext

log = logging.getLogger("ecsnap.api")


class DatabaseNonceStore:
    """Signature nonces in the database, so a replay is refused across restarts too."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    def remember(self, key_id: str, nonce: str, expires: datetime, now: datetime) -> bool:
        return accounts.remember_nonce(self.ctx, key_id, nonce, expires, now)


class Api:
    """Describe* requests run in `workers` threads, one request each, in arrival order;
    other actions (they may wait for their task, up to seconds) run in the default thread
    pool, beside them; the event loop stays free for the console. With SQLite a Describe
    is all CPU (SQLite runs inside the process), a few ms, and one thread does it best:
    more threads only fight over the GIL, which SQLite hands back at every row; that
    doubled a page's CPU time under 4 concurrent clients in benchmark 5. With PostgreSQL
    a request also waits on the server, and a second thread fills those waits.
    `workers=0`: that choice."""

    def __init__(self, ctx: ServiceContext, workers: int = 0) -> None:
        self.ctx = ctx
        self.nonces = DatabaseNonceStore(ctx)
        self.window = timedelta(minutes=ctx.settings.signature_window_minutes)
        self.workers = workers or (1 if ctx.settings.database_url.startswith("sqlite") else 2)
        self.limiters: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop,
                                                 anyio.CapacityLimiter] = \
            weakref.WeakKeyDictionary()

    def lookup(self, key_id: str) -> AccessKeyRecord | None:
        key = accounts.find_access_key(self.ctx, key_id)
        return None if key is None else AccessKeyRecord(key.id, key.secret, key.enabled,
                                                        key.account_id)

    def handle(self, signed: SignedRequest, endpoint: str) -> tuple[str, str, dict[str, object]]:
        """(action, account, response fields); raises EcsError."""
        auth = verify(signed, self.lookup, self.nonces, utcnow(), self.window)
        params = Params.from_pairs(signed.params())
        action = auth.action or params.str("Action") or ""
        version = auth.version or params.str("Version") or ""
        if not action:
            raise EcsError("MissingParameter", "The input parameter \"Action\" that is "
                           "mandatory for processing this request is not supplied.", 400)
        if version and version != API_VERSION:
            raise EcsError("InvalidParameter",
                           f"The Version \"{version}\" is not supported; use {API_VERSION}.",
                           400)
        fn = ACTIONS.get(action)
        if fn is None:
            raise EcsError("InvalidAction.NotFound",
                           f"The specified action \"{action}\" is not valid.", 404)
        return action, auth.account_id, fn(Call(self.ctx, auth.account_id, params, endpoint))

    def respond(self, signed: SignedRequest, pairs: list[tuple[str, str]], action: str,
                endpoint: str, request_id: str, started: float) -> Rendered:
        """The whole answer to one API request, rendered (runs in a worker thread)."""
        fmt = next((v for k, v in reversed(pairs) if k == "Format"), None)
        account = "-"
        try:
            action, account, data = self.handle(signed, endpoint)
            answer = render(action, data, request_id, fmt)
            code = "OK"
        except EcsError as exc:
            answer = render_error(exc, request_id, fmt)
            code = exc.code
        except Exception:  # a bug: logged with its traceback, answered without it
            log.exception("request %s %s failed", request_id, action)
            error = EcsError("InternalError", "The request processing has failed due to "
                             "some unknown error.", 500)
            answer = render_error(error, request_id, fmt)
            code = error.code
        log.info("request %s %s account=%s status=%d code=%s %.0fms", request_id,
                 action or "-", account, answer.status, code,
                 (time.monotonic() - started) * 1000)
        return answer

    async def endpoint(self, request: Request) -> Response:
        started = time.monotonic()
        request_id = new_request_id()
        body = await request.body()
        signed = SignedRequest.from_asgi(request.scope, body)
        pairs = signed.params()
        action = next((v for k, v in pairs if k == "Action"), "") or \
            signed.headers.get("x-acs-action", "")
        endpoint = f"{request.url.scheme}://{request.url.netloc}/"
        limiter = None  # the default thread pool
        if action.startswith("Describe"):  # (unverified yet: it only picks the queue)
            loop = asyncio.get_running_loop()
            limiter = self.limiters.get(loop)
            if limiter is None:  # one per event loop (a limiter belongs to its loop)
                limiter = self.limiters[loop] = anyio.CapacityLimiter(self.workers)
        status, content_type, out = await anyio.to_thread.run_sync(
            self.respond, signed, pairs, action, endpoint, request_id, started,
            limiter=limiter)
        return Response(out, status_code=status, media_type=None,
                        headers={"content-type": content_type, "x-acs-request-id": request_id})


def create_app(ctx: ServiceContext, api_workers: int = 0) -> Starlette:
    from ecsnap.entrypoints.console.app import create_console

    api = Api(ctx, api_workers)

    async def to_console(request: Request) -> Response:
        return RedirectResponse("/console/", status_code=307)

    return Starlette(routes=[
        Route("/", api.endpoint, methods=["GET", "POST"]),
        Route("/console", to_console),
        Mount("/console", create_console(ctx)),
    ])
