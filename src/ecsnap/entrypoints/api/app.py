"""The HTTP face of ecsnap: the ECS RPC API at `/` and the web console under `/console/`.

An API request is verified (signature, freshness, nonce), decoded, handed to one action
(one service call), and rendered; every error leaves as ECS's envelope with its code and
status, never as a traceback. One log line per request carries its RequestId; every value
in it that the client chose goes through :func:`log_value`, so no request can break the
line or forge another.

Requests are bounded before anything is parsed or verified (settings
``max_query_bytes``, ``max_request_params``, ``max_request_bytes``): the query string and
the parameter count first, then the declared ``Content-Length``, then the body's bytes
counted as they stream in (chunked requests declare none), so an oversized request costs
at most one limit's worth of memory whoever sends it.

A full data file system fails soft: a request that cannot be recorded (its signature
nonce, a task, any small write) answers ``503 ServiceUnavailable``, never a traceback,
while the writes that still fit (reads, deletes that free space) go on being answered.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import re
import time
import urllib.parse
import weakref
from datetime import datetime, timedelta

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.types import Receive, Scope, Send

from ecsnap import metrics
from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import utcnow
from ecsnap.entrypoints.api.actions import ACTIONS, Call
from ecsnap.entrypoints.api.params import Params
from ecsnap.entrypoints.api.render import Rendered, new_request_id, render, render_error
from ecsnap.entrypoints.api.signature import (
    API_VERSION,
    FORM_CONTENT_TYPE,
    AccessKeyRecord,
    SignedRequest,
    asgi_headers,
    verify,
)
from ecsnap.service import accounts, hosts
from ecsnap.service.context import ServiceContext

log = logging.getLogger("ecsnap.api")

MAX_LOGGED_CHARS = 128
_LOG_WORD = re.compile(rf"[A-Za-z0-9._:/@+-]{{1,{MAX_LOGGED_CHARS}}}")


def log_value(value: str | None) -> str:
    """A value the client chose, as one field of a log line: as it is when it is a plain
    word (an action name, an ID), else JSON-quoted with ASCII escapes (control characters,
    line and paragraph separators, quotes, backslashes, lone surrogates and all non-ASCII)
    and cut after 128 characters. No value can end the line or pose as another field."""
    if not value:
        return "-"
    if _LOG_WORD.fullmatch(value):
        return value
    shown = json.dumps(value[:MAX_LOGGED_CHARS], ensure_ascii=True)
    return shown + ("..." if len(value) > MAX_LOGGED_CHARS else "")


def _fields(raw: bytes) -> int:
    """At most how many pairs a form-encoded string holds (``parse_qsl`` splits on ``&``
    only), counted without parsing it."""
    return raw.count(b"&") + 1 if raw else 0


def _raw_param(query: bytes, name: str) -> str:
    """One parameter of a raw query, found without parsing the whole query (for refusals
    that come before it is parsed); "" when absent or over 256 bytes."""
    found = re.search(rb"(?:^|&)" + name.encode() + rb"=([^&]{0,256})(?:&|$)", query)
    if found is None:
        return ""
    return urllib.parse.unquote_plus(found.group(1).decode("utf-8", "replace"))


class RequestRefused(Exception):
    """A request over a bound, refused before it was read in full or parsed."""

    def __init__(self, error: EcsError) -> None:
        super().__init__(error.message)
        self.error = error


_FULL_WORDS = ("database or disk is full", "no space left on device", "disk quota exceeded")
_SQLITE_FULL = 13
_PG_DISK_FULL = "53100"


def out_of_space(exc: BaseException) -> bool:
    """True when `exc`, or an error it wraps (a driver's error inside SQLAlchemy's, a cause,
    a context), says the file system or the database is full."""
    todo: list[BaseException | None] = [exc]
    seen: set[int] = set()
    while todo:
        error = todo.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if getattr(error, "sqlite_errorcode", None) == _SQLITE_FULL or \
                _PG_DISK_FULL in (getattr(error, "sqlstate", None),
                                  getattr(error, "pgcode", None)):
            return True
        if any(word in str(error).lower() for word in _FULL_WORDS):
            return True
        todo += [getattr(error, "orig", None), error.__cause__, error.__context__]
    return False


def service_unavailable() -> EcsError:
    return EcsError("ServiceUnavailable", "The request could not be recorded: the file "
                    "system of ecsnap's data is full. Retry once space is freed (deleting "
                    "snapshots frees space).", 503)


class DatabaseNonceStore:
    """Signature nonces in the database, so a replay is refused across restarts too; a
    nonce that cannot be stored (a full file system) refuses the request with
    ServiceUnavailable: no request runs with its nonce unrecorded."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    def remember(self, key_id: str, nonce: str, expires: datetime, now: datetime) -> bool:
        try:
            return accounts.spend_nonce(self.ctx, key_id, nonce, expires, now)
        except Exception as exc:
            if out_of_space(exc):
                log.error("signature nonce not stored: the data file system is full (%s)",
                          log_value(str(exc).splitlines()[0] if str(exc) else ""))
                raise service_unavailable() from exc
            raise


class Api:
    """Describe* requests run in `workers` threads, one request each, in arrival order;
    other actions (they may wait for their task, up to seconds) run in the default thread
    pool, beside them; the event loop stays free for the console. With SQLite a Describe
    is all CPU (SQLite runs inside the process), a few ms, and one thread does it best:
    more threads only fight over the GIL, which SQLite hands back at every row; that
    doubled a page's CPU time under 4 concurrent clients in benchmark 5. With PostgreSQL
    a request also waits on the server, and a second thread fills those waits, unless
    other API processes of a cluster share the cores: they fill them, and a second thread
    only fights over this one's GIL (benchmark 8, two processes, 4 clients: p99 25 against
    32 ms a groups page, 22 against 26 ms an instances page). `workers=0`: that choice."""

    def __init__(self, ctx: ServiceContext, workers: int = 0) -> None:
        self.ctx = ctx
        self.nonces = DatabaseNonceStore(ctx)
        self.window = timedelta(minutes=ctx.settings.signature_window_minutes)
        self.workers = workers or (
            1 if ctx.settings.database_url.startswith("sqlite") or ctx.settings.cluster else 2)
        self.limiters: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop,
                                                 anyio.CapacityLimiter] = \
            weakref.WeakKeyDictionary()

    def lookup(self, key_id: str) -> AccessKeyRecord | None:
        key = accounts.signing_key(self.ctx, key_id)
        return None if key is None else AccessKeyRecord(key.id, key.secret, key.enabled,
                                                        key.account_id)

    def handle(self, signed: SignedRequest, pairs: list[tuple[str, str]],
               endpoint: str) -> tuple[str, str, dict[str, object]]:
        """(action, account, response fields); raises EcsError. `pairs`: signed.params()."""
        auth = verify(signed, self.lookup, self.nonces, utcnow(), self.window)
        params = Params.from_pairs(pairs)
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
            action, account, data = self.handle(signed, pairs, endpoint)
            answer = render(action, data, request_id, fmt)
            code = "OK"
        except EcsError as exc:
            answer = render_error(exc, request_id, fmt)
            code = exc.code
        except Exception as exc:
            if out_of_space(exc):  # no bug: the disk is full; said in one line
                log.error("request %s %s failed: the data file system is full (%s)",
                          request_id, log_value(action),
                          log_value(str(exc).splitlines()[0] if str(exc) else ""))
                error = service_unavailable()
            else:  # a bug: logged with its traceback, answered without it
                log.exception("request %s %s failed", request_id, log_value(action))
                error = EcsError("InternalError", "The request processing has failed due "
                                 "to some unknown error.", 500)
            answer = render_error(error, request_id, fmt)
            code = error.code
        elapsed = time.monotonic() - started
        log.info("request %s %s account=%s status=%d code=%s %.0fms", request_id,
                 log_value(action), log_value(account), answer.status, code, elapsed * 1000)
        metrics.api_request(action, code, elapsed)
        return answer

    async def read_bounded(self, scope: Scope, headers: dict[str, str],
                           receive: Receive) -> bytes | None:
        """The body, once the request is known to be within the bounds; RequestRefused
        as soon as it is not (before any byte of the body is read when the query, the
        parameter count or the declared length says so; else once the bytes streamed in
        pass the limit, which then are all that was read). None: the client left."""
        settings = self.ctx.settings
        query = bytes(scope.get("query_string") or b"")
        if len(query) > settings.max_query_bytes:
            raise RequestRefused(EcsError(
                "RequestTooLarge.QueryString",
                f"The query string is {len(query)} bytes; at most "
                f"{settings.max_query_bytes} are accepted.", 414))
        params = _fields(query)
        if params > settings.max_request_params:
            raise RequestRefused(_too_many(settings.max_request_params))
        limit = settings.max_request_bytes
        too_large = EcsError("RequestTooLarge.Body",
                             f"The request body exceeds {limit} bytes.", 413)
        declared = headers.get("content-length", "").strip()
        if declared.isdigit() and int(declared) > limit:
            raise RequestRefused(too_large)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise RequestRefused(too_large)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        content_type = headers.get("content-type", "").split(";", 1)[0]
        if content_type.strip().lower() == FORM_CONTENT_TYPE and \
                params + _fields(body) > settings.max_request_params:
            raise RequestRefused(_too_many(settings.max_request_params))
        return body

    def refuse(self, scope: Scope, headers: dict[str, str], error: EcsError,
               request_id: str, started: float) -> Rendered:
        """The ECS error envelope for a refused request (the connection is closed after
        it, so the server does not go on receiving a body nobody will read)."""
        query = bytes(scope.get("query_string") or b"")
        action = headers.get("x-acs-action") or _raw_param(query, "Action")
        answer = render_error(error, request_id, _raw_param(query, "Format"))
        elapsed = time.monotonic() - started
        log.info("request %s %s account=- status=%d code=%s %.0fms", request_id,
                 log_value(action), answer.status, error.code, elapsed * 1000)
        metrics.api_request(action, error.code, elapsed)
        return answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The API at `/`, as a plain ASGI application: a Describe page's request is
        answered without a framework's request and response objects, routing and
        middleware (Starlette's layers held the GIL in a sixth of the samples of a profiled
        DescribeInstances load, benchmark 8's)."""
        started = time.monotonic()
        request_id = new_request_id()
        if scope["method"] not in ("GET", "HEAD", "POST"):
            await _send(send, 405, "text/plain; charset=utf-8", b"Method Not Allowed",
                        [(b"allow", b"GET, HEAD, POST")])
            return
        headers = asgi_headers(scope)
        try:
            body = await self.read_bounded(scope, headers, receive)
        except RequestRefused as refused:
            status, content_type, out = self.refuse(scope, headers, refused.error,
                                                    request_id, started)
            await _send(send, status, content_type, out, [
                (b"x-acs-request-id", request_id.encode()), (b"connection", b"close")])
            return
        if body is None:
            return
        signed = SignedRequest.from_asgi(scope, body, headers)
        pairs = signed.params()
        action = next((v for k, v in pairs if k == "Action"), "") or \
            signed.headers.get("x-acs-action", "")
        host = signed.headers.get("host") or "{}:{}".format(*scope.get("server") or
                                                              ("127.0.0.1", 80))
        endpoint = f"{scope.get('scheme', 'http')}://{host}/"
        limiter = None  # the default thread pool
        if action.startswith("Describe"):  # (unverified yet: it only picks the queue)
            loop = asyncio.get_running_loop()
            limiter = self.limiters.get(loop)
            if limiter is None:  # one per event loop (a limiter belongs to its loop)
                limiter = self.limiters[loop] = anyio.CapacityLimiter(self.workers)
        status, content_type, out = await anyio.to_thread.run_sync(
            self.respond, signed, pairs, action, endpoint, request_id, started,
            limiter=limiter)
        await _send(send, status, content_type, out,
                    [(b"x-acs-request-id", request_id.encode())])


async def _send(send: Send, status: int, content_type: str, body: bytes,
                headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", content_type.encode("latin-1")),
        (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


class Application:
    """The ASGI application: an API request (`/`) goes straight to the API; the console,
    /metrics and the server's lifespan go through Starlette."""

    def __init__(self, api: Api, app: Starlette) -> None:
        self.api, self.app = api, app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/":
            await self.api(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def _too_many(limit: int) -> EcsError:
    return EcsError("InvalidParameter.TooMany",
                    f"The request has more than {limit} parameters.", 400)


def create_app(ctx: ServiceContext, api_workers: int = 0) -> Application:
    from ecsnap.entrypoints.console.app import create_console

    api = Api(ctx, api_workers)
    metrics.know_actions(ACTIONS)
    metrics.watch_hosts("api", lambda: hosts.host_samples(ctx))

    async def to_console(request: Request) -> Response:
        return RedirectResponse("/console/", status_code=307)

    async def scrape(request: Request) -> Response:
        """Prometheus's scrape: unauthenticated, as is the norm for /metrics (serve on
        127.0.0.1 or keep /metrics off the public side of the proxy: docs/deployment.md);
        in a thread, as the hosts are read from the database."""
        body, content_type = await anyio.to_thread.run_sync(metrics.exposition)
        return Response(body, media_type=None, headers={"content-type": content_type})

    return Application(api, Starlette(routes=[
        Route("/metrics", scrape, methods=["GET"]),
        Route("/console", to_console),
        Mount("/console", create_console(ctx)),
    ]))
